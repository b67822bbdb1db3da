"""Analysis: which weights stay on the device and which stream from the host
tier, under a device budget for weights, by the cost model's predicted time.

Streamed weights are copied in the order of their first use through two
staging slots (double buffering, as ZeRO-Infinity and Superpipeline do): the
copy of the j-th streamed weight starts once the (j-2)-th is no longer used
and the previous copy is done, on a copy lane beside compute. An op that
needs a weight whose copy is not finished waits. `simulate` gives the step
time of a choice; `plan_tiers` starts from everything on the device and moves
weights to the host, at each step the one (among the largest few) that adds
least predicted time, until resident bytes plus the two staging slots fit.

Weights used by more than one op (tied embeddings) stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...ir.errors import PlaitError


class TierError(PlaitError):
    pass


@dataclass(frozen=True)
class Weight:
    name: str
    size: int  # bytes
    first: int  # index of the op that uses it first
    last: int  # index of the op that uses it last


@dataclass
class TierPlan:
    streamed: list[str]  # in copy order
    device_bytes: int  # resident weights + the staging slots
    predicted: float  # seconds per step
    all_device: float  # seconds per step with every weight resident


def staging_bytes(streamed: list[Weight]) -> int:
    """Peak bytes of streamed weights on the device: two consecutive copies."""
    if len(streamed) < 2:
        return sum(w.size for w in streamed)
    return max(a.size + b.size for a, b in zip(streamed, streamed[1:]))


def simulate(times: list[float], streamed: list[Weight], bandwidth: float) -> float:
    """Step time with `streamed` (sorted by first use) copied as described above."""
    needs = {w.first: j for j, w in enumerate(streamed)}
    done_at = [0.0] * len(streamed)  # when each copy finishes
    op_end: list[float] = []
    clock = copy_free = 0.0
    started = 0

    def start_ready_copies(now_index: int) -> None:
        nonlocal started, copy_free
        while started < len(streamed):
            j = started
            slot = streamed[j - 2].last if j >= 2 else -1  # the slot frees after this op
            if slot >= now_index:
                return
            slot_free = op_end[slot] if slot >= 0 else 0.0
            begin = max(copy_free, slot_free)
            copy_free = done_at[j] = begin + streamed[j].size / bandwidth
            started += 1

    for k, t in enumerate(times):
        start_ready_copies(k)
        if k in needs:
            clock = max(clock, done_at[needs[k]])
        clock += t
        op_end.append(clock)
    return clock


def plan_tiers(
    times: list[float], weights: list[Weight], budget: int, bandwidth: float, candidates: int = 6
) -> TierPlan:
    single = [w for w in weights if w.first == w.last]  # streamable
    fixed = sum(w.size for w in weights if w.first != w.last)
    # copy order: first use, then program order (a weight and its bias share an op),
    # as the backend orders them; staging bytes depend on it
    position = {w: i for i, w in enumerate(weights)}

    def in_order(ws: list[Weight]) -> list[Weight]:
        return sorted(ws, key=lambda w: (w.first, position[w]))

    everything = in_order(single)
    minimum = fixed + staging_bytes(everything)
    if budget < minimum:
        raise TierError(
            f"a weight budget of {budget} bytes is below the minimum that fits, {minimum} bytes "
            f"(weights used more than once: {fixed}; two staging slots for streamed weights: "
            f"{minimum - fixed}); raise the budget to at least {minimum}"
        )
    all_device = simulate(times, [], bandwidth)
    resident = set(single)
    streamed: list[Weight] = []

    def device_bytes(stream: list[Weight]) -> int:
        return fixed + sum(w.size for w in resident) + staging_bytes(stream)

    while device_bytes(streamed) > budget:
        best = None
        for w in sorted(resident, key=lambda w: (-w.size, w.first))[:candidates]:
            trial = in_order([*streamed, w])
            resident.discard(w)
            fits = device_bytes(trial) <= budget
            resident.add(w)
            time = simulate(times, trial, bandwidth)
            key = (not fits, time, -w.size)
            if best is None or key < best[0]:
                best = (key, w, trial)
        _, w, streamed = best
        resident.discard(w)
    return TierPlan(
        streamed=[w.name for w in streamed],
        device_bytes=device_bytes(streamed),
        predicted=simulate(times, streamed, bandwidth),
        all_device=all_device,
    )
