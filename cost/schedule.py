"""Analysis: simulate one rank's program on two resources, compute and communication.

Ops run in program order. A compute op starts when the compute lane is free
and its inputs are ready. A blocking collective holds the compute lane until
it finishes; an async one is issued on the communication lane and only its
`plait.wait` blocks compute, so compute between the two overlaps it. The
time the compute lane spends waiting on collectives is exposed communication.
Where a collective's own work runs on the cores compute uses (gloo on a CPU:
its link's `contention`), each compute op is longer by that share of its
overlap with the collectives in flight. A collective also waits for the
ranks to arrive: its link's `skew` times the compute the rank did since
its previous collective (ranks' compute times drift apart between syncs).
`offload`'s host ops run in order on a third lane, the host's thread (see
backends/host_tasks.py); a device op that reads a host value waits for it.

Memory: weights and inputs stay resident; every other result is allocated
when produced and freed after its last use (views share their base's memory),
giving the peak bytes alive at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsl.dialects import func
from xdsl.ir import Operation, SSAValue

from ..hardware import Link
from ..ir.memory import on_host
from ..ir.ops import AllGatherOp, ParamOp, WaitOp
from .comm_cost import comm_axis


@dataclass
class Event:
    op: Operation
    lane: str  # "compute" | "comm" | "host"
    start: float
    duration: float


@dataclass
class Schedule:
    events: list[Event] = field(default_factory=list)
    step_time: float = 0.0
    compute_busy: float = 0.0
    comm_busy: float = 0.0
    exposed_comm: float = 0.0
    weight_bytes: float = 0.0
    activation_peak: float = 0.0
    peak_live: list[SSAValue] = field(default_factory=list)  # what is alive at the peak
    bases: dict[SSAValue, SSAValue] = field(default_factory=dict)  # view -> whose memory
    # value -> (first, last) op index at which it is alive (the peak's view of it);
    # inputs and weights, alive throughout, are not listed
    lifetimes: dict[SSAValue, tuple[int, int]] = field(default_factory=dict)

    @property
    def peak_memory(self) -> float:
        return self.weight_bytes + self.activation_peak


def simulate(
    fn: func.FuncOp,
    times: dict[Operation, float],
    sizes: dict[SSAValue, float],
    views: set[Operation],
    links: dict[Operation, Link] | None = None,
) -> Schedule:
    """Timeline and memory of `fn`, given each op's time and each value's bytes.

    `views` are ops whose results alias their first operand (no allocation);
    `links`: collective -> the link it crosses (its contention and skew).
    """
    out = Schedule()
    ready: dict[SSAValue, float] = {}
    compute_free = comm_free = host_free = 0.0
    since_sync = 0.0  # compute seconds since this rank's last collective
    links = links or {}
    # (start, end, share) of the contending collectives in flight
    in_flight: list[tuple[float, float, float]] = []
    block = fn.body.blocks.first
    for arg in block.args:
        ready[arg] = 0.0
    for op in block.ops:
        inputs_ready = max((ready.get(v, 0.0) for v in op.operands), default=0.0)
        duration = times.get(op, 0.0)
        if comm_axis(op) is not None:  # a collective, or a kernel that communicates
            link = links.get(op)
            if link is not None and duration > 0:  # (over one rank: no peers to wait for)
                duration += link.skew * since_sync
            since_sync = 0.0
            start = max(comm_free, inputs_ready, compute_free)
            comm_free = start + duration
            share = link.contention if link is not None else 0.0
            if share > 0 and getattr(op, "is_async", None) is not None:
                in_flight.append((start, comm_free, share))
            out.events.append(Event(op, "comm", start, duration))
            out.comm_busy += duration
            if getattr(op, "is_async", None) is None:  # blocking: compute waits for it
                out.exposed_comm += comm_free - max(compute_free, inputs_ready)
                compute_free = comm_free
            for result in op.results:
                ready[result] = comm_free
        elif isinstance(op, WaitOp):
            done = ready[op.input]
            out.exposed_comm += max(0.0, done - compute_free)
            compute_free = max(compute_free, done)
            ready[op.result] = compute_free
        elif isinstance(op, func.ReturnOp):
            continue
        elif on_host(op):
            start = max(host_free, inputs_ready)
            host_free = start + duration
            out.events.append(Event(op, "host", start, duration))
            for result in op.results:
                ready[result] = host_free
        else:
            start = max(compute_free, inputs_ready)
            in_flight = [w for w in in_flight if w[1] > start]
            duration += _contended(start, duration, in_flight)
            compute_free = start + duration
            if duration > 0:
                out.events.append(Event(op, "compute", start, duration))
            out.compute_busy += duration
            since_sync += duration
            for result in op.results:
                ready[result] = compute_free
    out.step_time = max(compute_free, comm_free, host_free)  # (the step drains the host)
    _memory(block, sizes, views, out)
    return out


def _contended(start: float, duration: float, in_flight) -> float:
    """Extra time of a compute op from `start` for `duration`: each
    collective in flight takes its share of the time they overlap. (The
    collectives run one after another, so overlaps do not add up past the op.)"""
    extra = 0.0
    for begin, end, share in in_flight:
        overlap = min(end, start + duration) - max(begin, start)
        extra += share * max(0.0, overlap)
    return extra


def _memory(block, sizes: dict[SSAValue, float], views: set[Operation], out: Schedule) -> None:
    ops = list(block.ops)
    base: dict[SSAValue, SSAValue] = {}
    last_use: dict[SSAValue, int] = {}
    # async all-gather's result -> the buffer it sends: the process group holds
    # that until the wait (measured on gloo; the functional all-reduce sends a
    # copy it makes itself, the result, and reduce-scatter lets go at the start)
    in_flight: dict[SSAValue, SSAValue] = {}
    for index, op in enumerate(ops):
        for value in op.operands:
            root = base.get(value, value)
            last_use[root] = index
            if value in in_flight:  # the wait: the sent buffer was read until now
                sent = in_flight.pop(value)
                last_use[base.get(sent, sent)] = index
        if isinstance(op, AllGatherOp) and op.is_async is not None:
            in_flight[op.result] = op.input
        if op in views and op.operands:
            for result in op.results:
                base[result] = base.get(op.operands[0], op.operands[0])
    for value in block.args:  # the caller owns the inputs: alive throughout
        last_use[value] = len(ops)
    live: dict[SSAValue, float] = {a: sizes.get(a, 0.0) for a in block.args}
    current = sum(live.values())
    peak, peak_live = current, list(live)
    born: dict[SSAValue, int] = {}
    for index, op in enumerate(ops):
        if isinstance(op, ParamOp):
            out.weight_bytes += sizes.get(op.result, 0.0)
            continue
        for result in op.results:
            if result not in base:
                live[result] = sizes.get(result, 0.0)
                current += live[result]
                born[result] = index
        if current > peak:
            peak, peak_live = current, list(live)
        for value in list(live):
            if last_use.get(value, -1) <= index and not isinstance(op, func.ReturnOp):
                current -= live.pop(value)
                out.lifetimes[value] = (born[value], index)
    for value in live:
        if value in born:
            out.lifetimes[value] = (born[value], len(ops) - 1)
    out.activation_peak, out.peak_live, out.bases = peak, peak_live, base
