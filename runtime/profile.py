"""Measured per-op times of a program, and traces in Chrome's event format.

    times = profile_ops(program, inputs, repeats=10)   # IR op -> median seconds
    write_trace("measured.json", measured_events(program, inputs))   # one event per fx node
    write_trace("ops.json", op_events(program, inputs))   # one per IR op (`plait run --trace`)

Traces open in Perfetto (ui.perfetto.dev) or chrome://tracing; `plait
estimate --trace` writes the simulated schedule in the same format, one
process per rank and one thread per lane, so the two can be laid side by side.
"""

from __future__ import annotations

import gc
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx

from ..backends.fx import OP_META, Program


@dataclass
class TraceEvent:
    name: str
    lane: str  # "compute", "comm" or "host" (offload's thread)
    start: float  # seconds
    duration: float
    rank: int = 0
    args: dict | None = None


class _TimingInterpreter(torch.fx.Interpreter):
    """Runs the graph node by node, timing each call.

    With `repeats`, each call is also repeated on its own inputs and the
    fastest kept: the op's own cost with warm caches, as a per-op model (and
    `plait calibrate`) measure it, rather than whatever the previous op or
    another process left behind.
    """

    def __init__(self, module: torch.fx.GraphModule, sync, repeats: int = 0):
        super().__init__(module)
        self.sync = sync
        self.repeats = repeats
        self.spans: list[tuple[torch.fx.Node, float, float]] = []

    def _timed(self, node, args, kwargs):
        self.sync()
        start = time.perf_counter()
        result = getattr(self, node.op)(node.target, args, kwargs)
        self.sync()
        return result, start, time.perf_counter() - start

    def run_node(self, node: torch.fx.Node):
        if node.op not in ("call_function", "call_method"):
            return super().run_node(node)
        args, kwargs = _plain(self.fetch_args_kwargs_from_env(node))
        result, start, seconds = self._timed(node, args, kwargs)
        if self.repeats:
            seconds = min(self._timed(node, args, kwargs)[2] for _ in range(self.repeats))
        self.spans.append((node, start, seconds))
        return result


def _plain(value):
    """fx hands arguments over as its immutable list and dict subclasses, which
    ATen's argument parser takes a slower path for (a view's size list costs
    ~2 us more); the generated program passes plain ones."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _spans(program: Program, inputs, repeats: int = 0) -> list[tuple[torch.fx.Node, float, float]]:
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    interpreter = _TimingInterpreter(program.graph_module, sync, repeats)
    collecting = gc.isenabled()
    gc.disable()  # a collection would land on whichever op allocates at that moment
    try:
        with torch.inference_mode():
            interpreter.run(*inputs)
    finally:
        if collecting:
            gc.enable()
    return interpreter.spans


def profile_ops(program: Program, inputs, repeats: int = 10) -> dict:
    """IR op -> measured seconds: each op run `repeats` times on its own inputs,
    the fastest kept, summed over the nodes the op lowers to."""
    _spans(program, inputs)  # warm up
    per_op: dict[object, float] = defaultdict(float)
    for node, _, seconds in _spans(program, inputs, repeats):
        op = node.meta.get(OP_META)
        if op is not None:
            per_op[op] += seconds
    return dict(per_op)


def measured_events(program: Program, inputs, rank: int = 0) -> list[TraceEvent]:
    """One timed run, as trace events on the compute lane."""
    spans = _spans(program, inputs)
    origin = spans[0][1] if spans else 0.0
    return [
        TraceEvent(
            node.name, "compute", start - origin, seconds, rank, {"target": str(node.target)}
        )
        for node, start, seconds in spans
    ]


def op_events(program: Program, inputs, rank: int = 0) -> list[TraceEvent]:
    """One timed run, as one trace event per IR op (the fx nodes it lowers to,
    summed), named as `plait estimate --trace` names them: family and module
    path; collectives on the comm lane."""
    from ..cost.estimate import family
    from ..ir.ops import CollectiveOp, WaitOp
    from ..ir.text import module_path

    spans = _spans(program, inputs)
    origin = spans[0][1] if spans else 0.0
    per_op: dict[object, list] = {}  # op -> [start, seconds, nodes], in the order ops ran
    for node, start, seconds in spans:
        op = node.meta.get(OP_META)
        if op is None:
            continue
        entry = per_op.setdefault(op, [start, 0.0, 0])
        entry[1] += seconds
        entry[2] += 1
    return [
        TraceEvent(
            f"{family(op)} {module_path(op)}".strip(),
            "comm" if isinstance(op, (CollectiveOp, WaitOp)) else "compute",
            start - origin,
            seconds,
            rank,
            {"op": op.name, "target": getattr(op, "target_name", op.name), "nodes": nodes},
        )
        for op, (start, seconds, nodes) in per_op.items()
    ]


def chrome_trace(events: list[TraceEvent]) -> dict:
    lanes = {"compute": 0, "comm": 1, "host": 2}
    out = []
    for rank in sorted({e.rank for e in events}):
        out.append(
            {"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}}
        )
        for lane, tid in lanes.items():
            out.append(
                {"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": lane}}
            )
    for e in events:
        out.append(
            {
                "ph": "X",
                "name": e.name,
                "pid": e.rank,
                "tid": lanes[e.lane],
                "ts": e.start * 1e6,
                "dur": e.duration * 1e6,
                "args": e.args or {},
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_trace(path: str | Path, events: list[TraceEvent]) -> None:
    Path(path).write_text(json.dumps(chrome_trace(events)))
