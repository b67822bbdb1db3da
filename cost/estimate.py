"""Analysis: predict a plan's time, memory and communication on a target machine.

    target = Target(hardware.load("h100-sxm"), mesh={"tp": 8}, values={"batch": 1, "seq": 1},
                    context=8192)        # decode: attention reads 8192 cached positions
    result = estimate(module, target)
    result.schedule.step_time, result.comm_share, result.mfu
    result.formulas["flops"]             # sympy, in the module's size symbols
    result.peak_kinds                    # bytes at the peak: parameters, saved activations, ...
    result.phase_times                   # a training step's: forward, backward, optimizer
    memory_over_range(module, result)    # z3: does peak_memory fit the device for every size?

Each op's time is its roofline, max(FLOPs / peak FLOP/s of its dtype, bytes /
memory bandwidth), plus the machine's per-op overhead; collectives follow the
alpha-beta model (`comm_cost`). The schedule simulation (`schedule`) then
overlaps async collectives with compute. Ops with the same types cost the
same, so identical layers are costed once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import sympy
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue

from ..hardware import Hardware
from ..ir.attrs import FUSE_ATTR, FUSE_SCOPE_ATTR, MESH_ATTR, SYMBOLS_ATTR, MeshAttr
from ..ir.effects import updates_state
from ..ir.errors import PlaitError
from ..ir.memory import crosses, on_host, value_on_host
from ..ir.ops import CallOp, CollectiveOp, LocalShardOp, ParamOp, ReshapeOp, WaitOp
from ..ir.residual import BlockCuts, block_cuts
from ..ir.schema import returns_alias
from ..ir.text import module_path
from ..ir.training import (
    BACKWARD,
    FORWARD,
    MEMORY_KINDS,
    OPTIMIZER,
    TEMPORARY,
    TRAIN_STEP,
    gradients,
    step_phases,
    value_kinds,
)
from ..ir.types import AsyncType, TensorType
from .bounds import BoundResult, prove_at_most
from .comm_cost import axis_links, collective_time, comm_axis
from .fusion import fusion_groups, members
from .layout import memory_orders, strided
from .op_cost import OpCost, op_cost
from .schedule import Schedule, simulate


@dataclass
class Target:
    hardware: Hardware
    mesh: dict[str, int] = field(default_factory=dict)
    values: dict[str, int] = field(default_factory=dict)  # size symbol -> value
    context: int | None = None  # decode: KV positions attention reads


@dataclass
class OpEstimate:
    op: Operation
    family: str  # "linear", "attention", ..., "all_reduce"
    module: str  # module path, layer indices kept
    cost: OpCost
    time_formula: sympy.Expr
    time: float
    flops: float
    bytes: float


@dataclass
class Estimate:
    target: Target
    ops: list[OpEstimate]
    schedule: Schedule
    formulas: dict[str, sympy.Expr]
    # bytes alive at the peak by kind (plait.ir.training.MEMORY_KINDS), and seconds
    # of the ops of each part of a training step (none for other programs)
    peak_kinds: dict[str, float] = field(default_factory=dict)
    phase_times: dict[str, float] = field(default_factory=dict)

    @property
    def total_flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def comm_share(self) -> float:
        """Share of the step the compute lane waits on communication."""
        return (
            self.schedule.exposed_comm / self.schedule.step_time if self.schedule.step_time else 0.0
        )

    @property
    def mfu(self) -> float:
        """Model FLOPs utilization of one rank: FLOPs / (step time x peak of the main dtype)."""
        by_dtype: dict[str, float] = {}
        for o in self.ops:
            if o.op.results and isinstance(o.op.results[0].type, TensorType):
                dtype = o.op.results[0].type.dtype
                by_dtype[dtype] = by_dtype.get(dtype, 0.0) + o.flops
        if not by_dtype or not self.schedule.step_time:
            return 0.0
        main = max(by_dtype, key=by_dtype.get)
        peak = self.target.hardware.peak_flops(main)
        return self.total_flops / (self.schedule.step_time * peak)


class EstimateError(PlaitError):
    pass


# results that share their input's storage: a wait returns the buffer its
# collective filled; a local shard is a narrow view
_ALIASING = (WaitOp, LocalShardOp)


def family(op: Operation) -> str:
    if isinstance(op, (CallOp, CollectiveOp)):
        return op.name.split(".", 1)[1]
    return op.name.split(".", 1)[-1]


def _signature(op: Operation, context) -> tuple:
    """Ops with equal signatures cost the same."""
    props = tuple(sorted(op.properties.items(), key=lambda item: item[0]))  # (attrs hash)
    return (
        op.name,
        props,
        tuple(v.type for v in op.operands),
        tuple(r.type for r in op.results),
        context,
    )


def _evaluate(expr: sympy.Expr, subs: dict) -> float:
    return float(sympy.sympify(expr).xreplace(subs)) if expr != 0 else 0.0


def _value_bytes(value: SSAValue) -> sympy.Expr:
    t = value.type
    t = t.value_type if isinstance(t, AsyncType) else t
    return sympy.sympify(t.nbytes) if isinstance(t, TensorType) else sympy.Integer(0)


def estimate(module: ModuleOp, target: Target, function: str | None = None) -> Estimate:
    """Estimate `function` (default: @forward, else @train_step, else the
    module's first function)."""
    fn = _function(module, function)
    mesh = _mesh(module, target)
    # the ranks of a CPU mesh share its host's threads
    target = replace(target, hardware=target.hardware.shared_by(math.prod(mesh.values())))
    links = axis_links(mesh, target.hardware)
    _check_values(module, target)
    from ..ir import symbolic

    subs = {symbolic.symbol(n): sympy.Integer(v) for n, v in target.values.items()}
    rows, times, views = _op_estimates(fn, target, links, subs)
    sizes = _value_sizes(fn, subs)
    if FUSE_ATTR in module.attributes:  # Inductor runs chains of small ops as one kernel
        # blocks compiled apart: no group crosses a cut, what runs before them is unfused
        blocks = FUSE_SCOPE_ATTR in module.attributes
        cut = block_cuts(fn.body.blocks.first) if blocks else BlockCuts([], frozenset())
        _fuse(fn, rows, times, sizes, views, target.hardware, subs, cut.ends, cut.off_stream)
    crossed = {op: links[comm_axis(op)][1] for op in times if comm_axis(op)}
    schedule = simulate(fn, times, sizes, views, crossed)
    formulas = {
        "flops": sympy.Add(*(r.cost.flops for r in rows)),
        "bytes": sympy.Add(*(r.cost.bytes for r in rows if r.cost.kind != "collective")),
        "compute_time": sympy.Add(*(r.time_formula for r in rows if r.cost.kind != "collective")),
        "comm_time": sympy.Add(*(r.time_formula for r in rows if r.cost.kind == "collective")),
        "activation_peak": sympy.Add(*(_value_bytes(v) for v in schedule.peak_live)),
    }
    weights = (o.result for o in fn.body.blocks.first.ops if isinstance(o, ParamOp))
    formulas["peak_memory"] = sympy.Add(*map(_value_bytes, weights), formulas["activation_peak"])
    peak_kinds, phase_times = _by_kind(fn, schedule, rows, subs)
    return Estimate(target, rows, schedule, formulas, peak_kinds, phase_times)


def _by_kind(fn: func.FuncOp, schedule: Schedule, rows: list[OpEstimate], subs):
    """The peak's bytes by kind of memory, as plait.runtime.memory measures them
    (a view's kind is its base's, if the base is temporary), and a training
    step's op seconds by phase."""
    kinds = value_kinds(fn)
    for view, base in schedule.bases.items():
        if kinds[base] == TEMPORARY:
            kinds[base] = kinds[view]
    sizes = _value_sizes(fn, subs)
    peak = dict.fromkeys(MEMORY_KINDS, 0.0)
    held = [o.result for o in fn.body.blocks.first.ops if isinstance(o, ParamOp)]
    for value in [*held, *schedule.peak_live]:
        peak[kinds[value]] += sizes.get(value, 0.0)
    if not gradients(fn):
        return peak, {}
    phases = step_phases(fn)
    times = dict.fromkeys((FORWARD, BACKWARD, OPTIMIZER), 0.0)
    for row in rows:
        if row.op in phases:
            times[phases[row.op]] += row.time
    return peak, times


def _function(module: ModuleOp, function: str | None) -> func.FuncOp:
    functions = {o.sym_name.data: o for o in module.ops if isinstance(o, func.FuncOp)}
    if function is None:
        default = next((f for f in ("forward", TRAIN_STEP) if f in functions), None)
        function = default or next(iter(functions), "forward")
    fn = functions.get(function)
    if fn is None:
        raise EstimateError(f"the module has no function @{function}")
    return fn


def _mesh(module: ModuleOp, target: Target) -> dict[str, int]:
    """The mesh the plan runs on: the one it was sharded for, which the target must match."""
    mesh = dict(target.mesh)
    declared = module.attributes.get(MESH_ATTR)
    if isinstance(declared, MeshAttr):
        if mesh and mesh != declared.axes:
            raise EstimateError(
                f"the plan was made for mesh {declared.axes}, not {mesh}; recompile for {mesh}"
            )
        return declared.axes
    if math.prod(mesh.values()) > 1:
        raise EstimateError(
            f"the plan is not sharded, so it runs on one device, not mesh {mesh}; add "
            f"shard{{mesh={','.join(f'{a}:{n}' for a, n in mesh.items())}}} to the pipeline"
        )
    return mesh


def _check_values(module: ModuleOp, target: Target) -> None:
    symbols = module.attributes.get(SYMBOLS_ATTR)
    names = set(symbols.ranges) if symbols is not None else set()
    missing = names - set(target.values)
    if missing:
        raise EstimateError(
            f"give a value for size symbol(s) {', '.join(sorted(missing))} "
            "(e.g. --batch, --seq or --dim NAME=VALUE)"
        )


def _op_estimates(fn: func.FuncOp, target: Target, links, subs):
    """Each op's estimate (alike ops share one), its time, and the ops that
    make no new memory (views, aliases, in-place state updates). An op
    `offload` runs on the host is priced on the host ("cpu"); a copy between
    host and device at the hardware's host bandwidth."""
    hw = target.hardware
    context = sympy.Integer(target.context) if target.context is not None else None
    cache: dict[tuple, tuple[OpCost, sympy.Expr, float, float, float]] = {}
    rows: list[OpEstimate] = []
    times: dict[Operation, float] = {}
    views: set[Operation] = set()
    orders = memory_orders(fn.body.blocks.first)
    for op in fn.body.blocks.first.ops:
        walks_strided = strided(op, orders)
        key = (_signature(op, context), walks_strided, on_host(op), crosses(op))
        if key not in cache:
            cost = op_cost(op, context, walks_strided)
            if crosses(op):
                formula = _copy_time(op, hw)
            else:
                formula = _time_formula(op, cost, _host() if on_host(op) else hw, links)
            cache[key] = (
                cost,
                formula,
                _evaluate(formula, subs),
                _evaluate(cost.flops, subs),
                _evaluate(cost.bytes, subs),
            )
        cost, formula, time, flops, moved = cache[key]
        if (
            (cost.kind == "view" and isinstance(op, ReshapeOp))
            or isinstance(op, _ALIASING)
            or updates_state(op)  # writes the KV cache in place: no new memory
            or (isinstance(op, CallOp) and returns_alias(op.target_name))  # detach, add_
        ):
            views.add(op)
        times[op] = time
        rows.append(OpEstimate(op, family(op), module_path(op), cost, formula, time, flops, moved))
    return rows, times, views


@functools.cache
def _host() -> Hardware:
    """Where offload's update runs: the host's CPU, as `cpu.toml` describes one."""
    from ..hardware import load

    return load("cpu")


def _copy_time(op: Operation, hw: Hardware) -> sympy.Expr:
    """Seconds of a copy between host and device memory (offload's)."""
    if hw.host_bandwidth is None:
        raise EstimateError(
            f"{module_path(op) or op.name}: the step copies between host and device memory "
            f"(offload), but hardware '{hw.name}' has no [host] bandwidth to price it with"
        )
    return _value_bytes(op.results[0]) / sympy.Float(hw.host_bandwidth)


def _time_formula(op: Operation, cost: OpCost, hw, links) -> sympy.Expr:
    if cost.kind == "collective":
        return collective_time(op, links)
    if cost.kind == "compute":
        return hw.roofline(
            cost.flops,
            cost.bytes,
            op_dtype(op),
            cost.rate,
            getattr(op, "target_name", None),
            cost.weight_bytes,
            cost.elements,
        )
    if cost.kind == "view":
        return sympy.Float(hw.overhead(getattr(op, "target_name", None), view=True))
    return sympy.Integer(0)


def _fuse(
    fn: func.FuncOp, rows: list[OpEstimate], times, sizes, views, hw: Hardware, subs, cuts, unfused
):
    """Each fusion group priced as one kernel on its last op (`fusion`): the
    others take no time of their own, and what they produce stays in
    registers, except the memory the group writes (its last op's, or what
    that op is a view of)."""
    row_of = {row.op: row for row in rows}
    for end, ops in members(fusion_groups(fn.body.blocks.first, cuts, unfused)).items():
        inside = set(ops)
        written = end
        while written in views and written.operands and written.operands[0].owner in inside:
            written = written.operands[0].owner
        read = {v for op in ops for v in op.operands if v.owner not in inside}
        read -= {v for v in read if value_on_host(v)}
        weights = sympy.Add(*(_value_bytes(v) for v in read if isinstance(v.owner, ParamOp)))
        moved = sympy.Add(*map(_value_bytes, read), *map(_value_bytes, end.results))
        compute = sympy.Add(
            *(
                row_of[op].cost.flops / hw.peak_flops(op_dtype(op), row_of[op].cost.rate)
                for op in ops
                if row_of[op].cost.kind == "compute"
            )
        )
        elements = [row_of[op].cost.elements for op in ops if row_of[op].cost.elements is not None]
        formula = hw.kernel_time(
            compute, moved, weights=weights, elements=sympy.Max(*elements) if elements else None
        )
        for op in ops:
            row = row_of[op]
            row.cost = replace(row.cost, bytes=moved if op is end else sympy.Integer(0))
            row.time_formula = formula if op is end else sympy.Integer(0)
            row.time, row.bytes = _evaluate(row.time_formula, subs), _evaluate(row.cost.bytes, subs)
            times[op] = row.time
            if op is not end and op is not written:
                for result in op.results:
                    sizes[result] = 0.0


def _value_sizes(fn: func.FuncOp, subs) -> dict[SSAValue, float]:
    """The bytes of every value of the function (evaluated once per type)."""
    block = fn.body.blocks.first
    by_type: dict[object, float] = {}
    sizes: dict[SSAValue, float] = {}
    for value in [*block.args, *(r for o in block.ops for r in o.results)]:
        if value_on_host(value):  # offload's: in host memory, not the device's
            sizes[value] = 0.0
            continue
        if value.type not in by_type:
            by_type[value.type] = _evaluate(_value_bytes(value), subs)
        sizes[value] = by_type[value.type]
    return sizes


def check_ranges(module: ModuleOp, values: dict[str, int], sources: dict[str, str] | None = None):
    """Refuse sizes outside the ranges the plan was compiled for: its programs
    never run at them (the call-time checks refuse such inputs), so a cost there
    would describe no run. `sources` says where each value came from (a flag)."""
    symbols = module.attributes.get(SYMBOLS_ATTR)
    ranges = symbols.ranges if symbols is not None else {}
    for name, value in values.items():
        lo, hi = ranges.get(name, (None, None))
        if lo is not None and (value < lo or (hi is not None and value > hi)):
            source = f" (from {sources[name]})" if sources and name in sources else ""
            raise EstimateError(
                f"size symbol '{name}' = {value}{source} is outside the range "
                f"[{lo}, {hi if hi is not None else 'inf'}] the plan was compiled for; estimate "
                "a size in that range, or recompile the model for a wider one"
            )


def memory_over_range(module: ModuleOp, result: Estimate) -> BoundResult | None:
    """Does the peak memory formula stay within the device's memory for every
    value of the size symbols in the ranges the plan was compiled for? (The
    buffers alive at the peak are those found at the estimated sizes.) None
    where the formula has no size symbol."""
    symbols = module.attributes.get(SYMBOLS_ATTR)
    peak = sympy.sympify(result.formulas["peak_memory"])
    if symbols is None or not peak.free_symbols:
        return None
    return prove_at_most(peak, result.target.hardware.memory_capacity, symbols.ranges)


def op_dtype(op: Operation) -> str:
    """The floating dtype an op computes in (its first float result or operand),
    else its result's type (a mask, indices), else f32."""
    for value in list(op.results) + list(op.operands):
        t = value.type
        if isinstance(t, TensorType) and t.dtype.startswith(("f", "bf")):
            return t.dtype
    results = [r.type for r in op.results if isinstance(r.type, TensorType)]
    return results[0].dtype if results else "f32"
