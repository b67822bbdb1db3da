"""Text reports of estimates: a table per layer kind, totals, and formulas."""

from __future__ import annotations

import re
from collections import defaultdict

import sympy

from .estimate import Estimate

_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def group_key(row, by: str) -> str:
    """'family': op family (linear, attention, all_reduce...); 'module': module path with
    layer indices folded ("model.layers.*.mlp.down_proj")."""
    if by == "module":
        return _LAYER_INDEX.sub(".*", row.module) or "(top level)"
    return row.family


def grouped(estimate: Estimate, by: str = "family") -> list[tuple[str, int, float, float, float]]:
    """(group, ops, flops, bytes, seconds) per group, slowest first."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for row in estimate.ops:
        if row.time == 0 and row.flops == 0:
            continue
        entry = totals[group_key(row, by)]
        entry[0] += 1
        entry[1] += row.flops
        entry[2] += row.bytes
        entry[3] += row.time
    rows = [(name, int(v[0]), v[1], v[2], v[3]) for name, v in totals.items()]
    return sorted(rows, key=lambda r: -r[4])


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _round(expr: sympy.Expr, digits: int = 4) -> sympy.Expr:
    return expr.xreplace({f: sympy.Float(f, digits) for f in expr.atoms(sympy.Float)})


def summary(estimate: Estimate) -> list[tuple[str, str]]:
    s = estimate.schedule
    hw = estimate.target.hardware
    return [
        ("step time", f"{s.step_time * 1e3:.3f} ms"),
        ("compute busy", f"{s.compute_busy * 1e3:.3f} ms"),
        ("communication busy", f"{s.comm_busy * 1e3:.3f} ms"),
        (
            "exposed communication",
            f"{s.exposed_comm * 1e3:.3f} ms ({estimate.comm_share:.1%} of the step)",
        ),
        (
            "peak memory per rank",
            f"{_bytes(s.peak_memory)} (weights {_bytes(s.weight_bytes)}, "
            f"activations {_bytes(s.activation_peak)}; device has {_bytes(hw.memory_capacity)})",
        ),
        *memory_range(estimate),
        ("MFU", f"{estimate.mfu:.1%}"),
        *compression(estimate),
        *memory_plan(estimate),
        *pipeline(estimate),
    ]


def pipeline(estimate: Estimate) -> list[tuple[str, str]]:
    """A pipelined step's stages: the cut, the pass's prediction, each stage's actions."""
    from ..ir.attrs import PIPELINE_ATTR

    if not estimate.ops:
        return []
    module = estimate.ops[0].op.parent_block().parent_op().get_toplevel_object()
    attr = module.attributes.get(PIPELINE_ATTR)
    if attr is None:
        return []
    fields = attr.data
    rows = [
        (
            "pipeline",
            f"{fields['schedule'].data}, {fields['stages'].value.data} stages x "
            f"{fields['microbatches'].value.data} micro-batches; cut {fields['cut'].data}",
        ),
        ("pipeline prediction", fields["predicted"].data),
    ]
    for s, row in enumerate(fields["actions"].data):
        rows.append((f"stage {s} actions", " ".join(a.data for a in row.data)))
    return rows


def memory_plan(estimate: Estimate) -> list[tuple[str, str]]:
    """Program state (a KV cache), the planned arena (memplan), the weight
    tiering (tier) and the rematerialization (remat), where the plan has them."""
    from ..ir.attrs import ARENA_ATTR, MEMORY_PLAN_ATTR, MESH_PLAN_ATTR, REMAT_ATTR, TIERING_ATTR
    from ..ir.ops import ParamOp
    from ..ir.training import gradients, step_memory

    if not estimate.ops:
        return []
    block = estimate.ops[0].op.parent_block()
    module = block.parent_op().get_toplevel_object()
    rows = []
    state = sum(
        int(op.result.type.nbytes) for op in block.ops if isinstance(op, ParamOp) and op.is_state
    )
    training = step_memory(block.parent_op()) if gradients(block.parent_op()) else None
    if training:  # a training step: its state by kind, the peak by kind, its phases
        parts = ", ".join(f"{kind} {_bytes(n)}" for kind, n in training.items() if n)
        rows.append(("training state", f"{parts} per rank"))
        peak = ", ".join(f"{kind} {_bytes(n)}" for kind, n in estimate.peak_kinds.items() if n)
        rows.append(("peak memory by kind", f"{peak} per rank"))
        phases = ", ".join(f"{p} {t * 1e3:.3f} ms" for p, t in estimate.phase_times.items())
        rows.append(("step phases", f"{phases} (op time, collectives included)"))
    elif state:
        rows.append(("program state", f"{_bytes(state)} per rank (KV cache; in the weights above)"))
    if ARENA_ATTR in module.attributes:
        arena = module.attributes[ARENA_ATTR].value.data
        rows.append(("activation arena", f"{_bytes(arena)} (memplan, at the planned sizes)"))
    if TIERING_ATTR in module.attributes:
        rows.append(("weight tiering", module.attributes[TIERING_ATTR].data))
    if REMAT_ATTR in module.attributes:
        rows.append(("rematerialization", module.attributes[REMAT_ATTR].data))
    choices = (  # why this mesh (parallelize), why this stage and remat (shard{memory})
        (MESH_PLAN_ATTR, "mesh plan", "meshes considered"),
        (MEMORY_PLAN_ATTR, "memory plan", "plans considered"),
    )
    for attr, chosen_row, considered_row in choices:
        if attr in module.attributes:
            chosen, _, considered = module.attributes[attr].data.partition("; considered: ")
            rows += [(chosen_row, chosen), (considered_row, considered)]
    return rows


def memory_range(estimate: Estimate) -> list[tuple[str, str]]:
    """Whether the peak memory fits the device at every size the plan was
    compiled for, proved by z3 (none where the plan has no size symbol)."""
    from ..ir.attrs import SYMBOLS_ATTR
    from ..ir.symbolic import symbol
    from .estimate import memory_over_range

    if not estimate.ops:
        return []
    module = estimate.ops[0].op.parent_block().parent_op().get_toplevel_object()
    result = memory_over_range(module, estimate)
    if result is None:
        return []
    ranges = module.attributes[SYMBOLS_ATTR].ranges
    spans = ", ".join(
        f"{n} in [{lo}, {hi if hi is not None else 'inf'}]" for n, (lo, hi) in ranges.items()
    )
    device = _bytes(estimate.target.hardware.memory_capacity)
    if result.proved:
        text = f"fits {device} for every {spans} (proved by z3)"
    elif result.counterexample:
        at = ", ".join(f"{n}={v}" for n, v in sorted(result.counterexample.items()))
        subs = {symbol(n): v for n, v in result.counterexample.items()}
        peak = float(sympy.sympify(estimate.formulas["peak_memory"]).xreplace(subs))
        text = f"needs {_bytes(peak)} > {device} at {at} (z3, within {spans})"
    else:
        text = f"undecided by z3 within its time limit for {spans}"
    return [("memory over the range", text)]


def compression(estimate: Estimate) -> list[tuple[str, str]]:
    """Bytes and bits per weight of the quantized and sparse linears, scales,
    indices and outliers included (none if there are none)."""
    from ..ir.ops import CallOp, ParamOp
    from .op_cost import compressed_weights

    weights, stored, seen = 0, 0, set()
    for row in estimate.ops:
        count = compressed_weights(row.op) if isinstance(row.op, CallOp) else None
        if count is None:
            continue
        weights += int(count)
        for value in row.op.operands:
            if isinstance(value.owner, ParamOp) and value not in seen:
                seen.add(value)
                stored += int(value.type.nbytes)
    if not weights:
        return []
    return [
        (
            "compressed linears",
            f"{_bytes(stored)} per rank, {8 * stored / weights:.2f} bits "
            "per weight (scales, indices and outliers included)",
        )
    ]


def render(estimate: Estimate, by: str = "family") -> str:
    """The whole report as plain text."""
    step = estimate.schedule.step_time or 1.0
    lines = [
        f"{'group':<40} {'ops':>5} {'GFLOP':>10} {'moved':>10} {'time ms':>9} {'share':>6}",
    ]
    for name, count, flops, moved, seconds in grouped(estimate, by):
        lines.append(
            f"{name[:40]:<40} {count:>5} {flops / 1e9:>10.3f} {_bytes(moved):>10} "
            f"{seconds * 1e3:>9.3f} {seconds / step:>6.1%}"
        )
    lines.append("")
    lines.extend(f"{k + ':':<24} {v}" for k, v in summary(estimate))
    lines.append("")
    lines.append("formulas (seconds and bytes, in the size symbols):")
    for key, expr in estimate.formulas.items():
        text = str(_round(sympy.sympify(expr)))
        if len(text) > _LONGEST_FORMULA:  # piecewise in cache levels and thread counts
            text = (
                f"{text[: _LONGEST_FORMULA // 2]} ... ({len(text)} characters; "
                f"in full: Estimate.formulas[{key!r}] from plait's Python API)"
            )
        lines.append(f"  {key} = {text}")
    return "\n".join(lines)


_LONGEST_FORMULA = 400  # characters a report prints of one formula


def render_compare(first: Estimate, second: Estimate, names: tuple[str, str]) -> str:
    """Two estimates side by side."""
    a, b = dict(summary(first)), dict(summary(second))
    width = max(len(names[0]), 28)
    lines = [f"{'':<24} {names[0]:<{width}} {names[1]}"]
    for key in a:
        lines.append(f"{key + ':':<24} {a[key]:<{width}} {b[key]}")
    ratio = first.schedule.step_time / second.schedule.step_time if second.schedule.step_time else 0
    lines.append(f"{'speedup of the second:':<24} {ratio:.3f}x")
    return "\n".join(lines)
