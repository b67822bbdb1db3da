"""remat{budget=0.5,hardware=cpu,values=batch:1,seq:128}: activation
rematerialization. Recompute some of what backward reads of the forward,
instead of storing it, so a training step's saved activations fit `budget`.

`budget` is a share of the step's saved activations (<= 1: of what the
forward stores without remat) or a number of bytes (> 1, e.g. 2e6). The cost
model (`estimate` on `hardware`, size symbols at `values` or their upper
bounds) prices each op; `remat_solve.solve` picks what to store and what to
recompute at the least recompute time (an integer program; repeated layers
share one choice). Each recomputed op is cloned just before its first reader
in backward, reading stored values, parameters and inputs, or other clones:

    %silu_1 = plait.elementwise "aten::silu"(%_unsafe_view_15) : ...       (forward)
    ...
    %mm_19 = plait.matmul "aten::mm"(%view_26, %t_11) : ...                 (backward:
    %_unsafe_view_21 = plait.reshape "aten::_unsafe_view"(%mm_19, ...) : ...  the same,
    %silu_2 = plait.elementwise "aten::silu"(%_unsafe_view_21) : ...         recomputed)

A budget no plan meets is an error that states the least reachable bytes.
What was chosen is in the module's `plait.remat` attribute, per function:
the budget, the saved bytes before and after, the ops recomputed and their
predicted seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.ir import Operation, SSAValue

from ...ir.attrs import REMAT_ATTR
from ...ir.effects import is_removable
from ...ir.errors import PlaitError
from ...ir.training import ACCUMULATE, TRAIN_STEP, check_state_order
from ..base import Pass
from ..options import OptionError, SizeValues, check_hardware
from .liveness import value_sizes
from .remat_graph import StepGraph, step_graph
from .remat_solve import Plan, RematError, solve

STEPS = (ACCUMULATE, TRAIN_STEP)  # the functions with a backward


@dataclass(frozen=True)
class Remat(Pass):
    name = "remat"
    summary = "recompute saved activations in backward to fit a budget (an integer program)"

    budget: float = 0.5
    hardware: str = "cpu"
    values: SizeValues = SizeValues()  # sizes to plan for; others at their upper bounds
    timeout: float = 10.0  # seconds the solver may take per function

    def __post_init__(self):
        super().__post_init__()
        if not self.budget > 0:
            raise OptionError(
                f"budget is a share of the saved activations (<= 1) or bytes, > 0, "
                f"not {self.budget:g}",
                "budget",
            )
        if not self.timeout > 0:
            raise OptionError(f"timeout is seconds, > 0, not {self.timeout:g}", "timeout")
        check_hardware(self.hardware)

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        from ...cost.estimate import Target
        from ...hardware import load

        hw = load(self.hardware)
        values = self.values.at(op, "remat")
        steps = [f for f in op.ops if isinstance(f, func.FuncOp) and f.sym_name.data in STEPS]
        if not steps:
            raise PlaitError("remat applies to a training step (plait.compile_training)")
        records = []
        for fn in steps:
            name = fn.sym_name.data
            _, graph = priced_graph(op, fn, Target(hw, values=values))
            if graph.gathered:
                raise RematError(
                    f"remat on @{name}: the step gathers whole parameters for its forward "
                    "(zero{stage=3}); a recomputed op would keep them alive into backward. "
                    "Put remat before zero, e.g. shard{mesh=dp:2},remat{...},zero{stage=3}: "
                    "zero then gathers parameters again for what remat recomputes"
                )
            everything = solve(graph, float("inf"), self.timeout).saved_bytes
            budget = self.budget * everything if self.budget <= 1 else self.budget
            try:
                plan = solve(graph, budget, self.timeout)
            except RematError as exc:
                raise RematError(f"remat{{budget={self.budget:g}}} on @{name}: {exc}") from None
            rematerialize(fn, graph, plan)
            records.append(
                f"@{name}: budget {budget:.0f} B, saved {everything} B -> {plan.saved_bytes} B, "
                f"recomputes {len(plan.recomputed)} ops (+{plan.time:.6g} s on {hw.name}), "
                f"{plan.groups} groups, {plan.status}"
            )
        check_state_order(op)
        op.attributes[REMAT_ATTR] = StringAttr("; ".join(records))


def priced_graph(module: ModuleOp, fn: func.FuncOp, target) -> tuple:
    """The cost model's estimate of `fn` on `target` (a cost.estimate.Target),
    and the step's graph for the integer program, each op priced by it."""
    from ...cost.estimate import estimate

    report = estimate(module, target, fn.sym_name.data)
    times = {row.op: row.time for row in report.ops}
    sizes = value_sizes(fn, target.values)
    return report, step_graph(fn, times, sizes, report.schedule.bases)


def rematerialize(fn: func.FuncOp, graph: StepGraph, plan: Plan) -> None:
    """Clone each recomputed node before its first reader after the cut, and
    make the readers after the cut read the clones."""
    block = fn.body.blocks.first
    ops = list(block.ops)
    position = {o: i for i, o in enumerate(ops)}
    late = ops[graph.cut + 1 :]
    readers: dict[Operation, list[Operation]] = {n: [] for n in plan.recomputed}
    for reader in [*late, *plan.recomputed]:
        for source in dict.fromkeys(v.owner for v in reader.operands):
            if source in readers and source is not reader:
                readers[source].append(reader)
    at: dict[Operation, int] = {}  # node -> the index of the op its clone goes before
    for node in sorted(plan.recomputed, key=position.get, reverse=True):
        at[node] = min(at[r] if r in plan.recomputed else position[r] for r in readers[node])
    clones: dict[SSAValue, SSAValue] = {}
    for node in sorted(plan.recomputed, key=lambda n: (at[n], position[n])):
        clone = node.clone(value_mapper=clones)
        block.insert_op_before(clone, ops[at[node]])
    for reader in late:
        if any(value in clones for value in reader.operands):
            reader.operands = tuple(clones.get(value, value) for value in reader.operands)
    for node in reversed(graph.nodes):  # forward ops only backward read (a `detach`)
        if is_removable(node) and not any(r.uses for r in node.results):
            node.detach()
            node.erase()
