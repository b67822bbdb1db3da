"""Analysis: offsets for a program's buffers in one arena.

    plan = plan_arena(buffers)          # Buffers from `liveness`
    plan.size, plan.lower_bound, plan.offsets[i], plan.method
    check(buffers, plan.offsets)        # raises if two live buffers overlap

The lower bound is the most bytes alive at any one time. Several greedy
orders place each buffer at the best-fitting free gap among the buffers alive
with it (by size, by lifetime, by area, in program order — the XLA-style
"best of" heuristics), and the smallest arena wins. Where the best is above
the lower bound and there are few enough buffers, z3 searches for an exact
packing within a time limit; it is kept only if smaller, so a plan is never
worse than greedy. Sizes are rounded up to `ALIGN` bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...ir.errors import PlaitError
from .liveness import Buffer

ALIGN = 64
EXACT_MAX_BUFFERS = 40  # z3 packing beyond this rarely finishes in its time limit


class PlanError(PlaitError):
    pass


@dataclass
class Plan:
    offsets: list[int]
    size: int
    lower_bound: int
    method: str

    @property
    def ratio(self) -> float:
        return self.size / self.lower_bound if self.lower_bound else 1.0


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def lower_bound(buffers: Sequence[Buffer]) -> int:
    events: dict[int, int] = {}
    for b in buffers:
        events[b.start] = events.get(b.start, 0) + _aligned(b.size)
        events[b.end + 1] = events.get(b.end + 1, 0) - _aligned(b.size)
    live = peak = 0
    for t in sorted(events):
        live += events[t]
        peak = max(peak, live)
    return peak


class _TimeIndex:
    """Placed buffers by time bucket, to find those alive with a new one quickly."""

    def __init__(self, buffers: Sequence[Buffer], buckets: int = 512):
        horizon = max((b.end for b in buffers), default=0) + 1
        self.width = max(1, -(-horizon // buckets))
        self.slots: dict[int, list[int]] = {}

    def add(self, i: int, b: Buffer) -> None:
        for k in range(b.start // self.width, b.end // self.width + 1):
            self.slots.setdefault(k, []).append(i)

    def overlapping(self, b: Buffer, buffers: Sequence[Buffer]) -> set[int]:
        found = set()
        for k in range(b.start // self.width, b.end // self.width + 1):
            for i in self.slots.get(k, ()):
                o = buffers[i]
                if o.start <= b.end and b.start <= o.end:
                    found.add(i)
        return found


def _best_fit(buffers: Sequence[Buffer], order: list[int]) -> list[int]:
    offsets = [0] * len(buffers)
    index = _TimeIndex(buffers)
    for i in order:
        b = buffers[i]
        size = _aligned(b.size)
        taken = sorted(
            (offsets[j], offsets[j] + _aligned(buffers[j].size))
            for j in index.overlapping(b, buffers)
        )
        best, best_gap, cursor = None, None, 0
        for lo, hi in taken:
            gap = lo - cursor
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, hi)
        offsets[i] = best if best is not None else cursor
        index.add(i, b)
    return offsets


ORDERS: dict[str, Callable[[Buffer], tuple]] = {
    "size": lambda b: (-b.size, -b.lifetime, b.start),
    "lifetime": lambda b: (-b.lifetime, -b.size, b.start),
    "area": lambda b: (-b.size * b.lifetime, b.start),
    "program": lambda b: (b.start, -b.size),
}


def _arena_size(buffers: Sequence[Buffer], offsets: list[int]) -> int:
    return max((o + _aligned(b.size) for b, o in zip(buffers, offsets)), default=0)


def _exact(buffers: Sequence[Buffer], limit: int, timeout_ms: int) -> list[int] | None:
    """A packing into fewer than `limit` bytes, by z3, or None."""
    import z3

    n = len(buffers)
    unit = ALIGN
    sizes = [_aligned(b.size) // unit for b in buffers]
    x = [z3.Int(f"o{i}") for i in range(n)]
    opt = z3.Optimize()
    opt.set(timeout=timeout_ms)
    top = z3.Int("top")
    for i in range(n):
        opt.add(x[i] >= 0, x[i] + sizes[i] <= top)
        for j in range(i + 1, n):
            a, b = buffers[i], buffers[j]
            if a.start <= b.end and b.start <= a.end:
                opt.add(z3.Or(x[i] + sizes[i] <= x[j], x[j] + sizes[j] <= x[i]))
    opt.add(top * unit < limit)
    opt.minimize(top)
    if opt.check() != z3.sat:
        return None
    model = opt.model()
    return [model.eval(v).as_long() * unit for v in x]


def plan_arena(buffers: Sequence[Buffer], exact_timeout_ms: int = 2000) -> Plan:
    bound = lower_bound(buffers)
    best: Plan | None = None
    for name, key in ORDERS.items():
        order = sorted(range(len(buffers)), key=lambda i: key(buffers[i]))
        offsets = _best_fit(buffers, order)
        size = _arena_size(buffers, offsets)
        if best is None or size < best.size:
            best = Plan(offsets, size, bound, f"best-fit by {name}")
        if size == bound:
            break
    if best is None:
        return Plan([], 0, 0, "empty")
    if best.size > bound and len(buffers) <= EXACT_MAX_BUFFERS:
        offsets = _exact(buffers, best.size, exact_timeout_ms)
        if offsets is not None:
            best = Plan(offsets, _arena_size(buffers, offsets), bound, "exact (z3)")
    check(buffers, best.offsets)
    return best


def check(buffers: Sequence[Buffer], offsets: Sequence[int]) -> None:
    """Raise if two buffers alive at the same time share bytes."""
    order = sorted(range(len(buffers)), key=lambda i: buffers[i].start)
    active: list[int] = []
    for i in order:
        b = buffers[i]
        active = [j for j in active if buffers[j].end >= b.start]
        lo, hi = offsets[i], offsets[i] + b.size
        for j in active:
            if lo < offsets[j] + buffers[j].size and offsets[j] < hi:
                raise PlanError(
                    f"arena plan overlaps: {_name(buffers, i)} [{lo}, {hi}) and "
                    f"{_name(buffers, j)} [{offsets[j]}, {offsets[j] + buffers[j].size}) "
                    "are alive together"
                )
        active.append(i)


def _name(buffers: Sequence[Buffer], i: int) -> str:
    value = buffers[i].value
    return f"%{value.name_hint}" if value is not None and value.name_hint else f"buffer {i}"
