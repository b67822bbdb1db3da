"""Analysis: a pipelined training step as the cost model sees it: each rank's
timeline (its stage functions' estimated times run as the schedule's action
lists, messages crossing the pp axis's link) and each rank's peak memory;
and a pipelined generation's token step (`generation_step`).

A rank's peak: the state of its stages (parameters, optimizer state,
gradient accumulators) plus, at each action in its list, the activations the
forwards it ran keep for backwards it has not run yet (a forward's returned
values), plus what the action itself allocates at its own peak
(`estimate`'s activation peak: its temporaries, and a forward's kept values).
GPipe keeps all M micro-batches' activations before the first backward,
1F1B at most S - s on stage s.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import OpResult

from ...cost.comm_cost import axis_links
from ...hardware import Link
from ...ir.attrs import PIPELINE_AXIS, mesh_axes
from ...ir.ops import ParamOp, SendOp
from ...ir.training import GRADIENT_BYTES, HOST_OPTIMIZER_STATE, step_memory
from .decode_stages import sequence_groups, stage_function_name
from .pipeline_schedule import (
    BACKWARD,
    FORWARD,
    UPDATE,
    Timeline,
    parse_action,
    pipeline_plan,
    simulate,
    stage_function,
)
from .stage_split import function_messages

# left out of a rank's state: gradients (the accumulators hold them), host memory
NOT_HELD = (GRADIENT_BYTES, HOST_OPTIMIZER_STATE)


def pipeline_link(module: ModuleOp, hardware) -> Link:
    """The link the pp axis's messages cross on `hardware`."""
    return axis_links(mesh_axes(module), hardware)[PIPELINE_AXIS][1]


def estimates_of(module: ModuleOp, target) -> dict:
    """Each stage function's estimate: (kind, stage) -> Estimate (the update's by rank)."""
    from ...cost.estimate import estimate

    plan = pipeline_plan(module)
    count = plan.stages * plan.virtual
    return {
        (kind, s): estimate(module, target, stage_function(kind, s))
        for kind, n in ((FORWARD, count), (BACKWARD, count), (UPDATE, plan.stages))
        for s in range(n)
    }


def pipeline_timeline(module: ModuleOp, target, estimates: dict | None = None) -> Timeline | None:
    """A pipelined step's simulated timeline on `target` (a cost.estimate
    Target); None when not pipelined."""
    plan = pipeline_plan(module)
    if plan is None:
        return None
    estimates = estimates or estimates_of(module, target)
    times = {key: e.schedule.step_time for key, e in estimates.items()}
    return simulate(
        plan.actions, times, function_messages(module), pipeline_link(module, target.hardware)
    )


def pipeline_peaks(module: ModuleOp, target, estimates: dict | None = None) -> list[float]:
    """Each pp rank's predicted peak bytes over a step (see the docstring)."""
    plan = pipeline_plan(module)
    estimates = estimates or estimates_of(module, target)
    functions = {f.sym_name.data: f for f in module.ops if isinstance(f, func.FuncOp)}
    kept = {
        s: _kept_bytes(functions[stage_function(FORWARD, s)], estimates[FORWARD, s].schedule)
        for s in range(plan.stages * plan.virtual)
    }
    peaks = []
    for rank, actions in enumerate(plan.actions):
        held = step_memory(functions[stage_function(UPDATE, rank)])
        state = sum(b for kind, b in held.items() if kind not in NOT_HELD)
        alive, peak = 0, 0.0
        for action in actions:
            kind, _, chunk = parse_action(action)
            stage = rank if kind == UPDATE else plan.stage_of(rank, chunk)
            own = estimates[kind, stage].schedule.activation_peak
            if kind == BACKWARD:  # (its inputs, its kept values among them, are in `alive`)
                own -= sum(int(a.type.nbytes) for a in functions[stage_function(kind, stage)].args)
            peak = max(peak, alive + own)
            alive += {FORWARD: kept[stage], BACKWARD: -kept[stage]}.get(kind, 0)
        peaks.append(state + peak)
    return peaks


def _kept_bytes(forward: func.FuncOp, schedule) -> int:
    """The new memory a forward's returned values hold: each base once, none
    of a parameter (the transposed weights it hands to backward) or input."""
    bases = {schedule.bases.get(v, v) for v in forward.get_return_op().operands}
    return sum(
        int(b.type.nbytes)
        for b in bases
        if isinstance(b, OpResult) and not isinstance(b.owner, ParamOp)
    )


@dataclass(frozen=True)
class GenerationStep:
    """A pipelined generation's token step for every group of sequences:
    each group passes the stages in turn (a stage's program, then its
    message to the next; the last sends the logits back), and each stage
    runs every group's program once a token."""

    stage_times: list[float]  # seconds of each stage's program, one group
    message_times: list[float]  # seconds of each stage's messages (the last's: the logits)
    groups: int

    @property
    def round_trip(self) -> float:
        """One group's token: every stage and every message in turn."""
        return sum(self.stage_times) + sum(self.message_times)

    @property
    def busiest(self) -> float:
        """The busiest stage's programs for every group."""
        return self.groups * max(self.stage_times)

    @property
    def time(self) -> float:
        """Seconds a token takes every group, in the steady state."""
        return max(self.round_trip, self.busiest)


def generation_step(module: ModuleOp, target, function: str = "decode") -> GenerationStep | None:
    """The token step of `function` (decode: its messages' sizes are fixed) of
    generation programs cut into pipeline stages, as the cost model sees it
    on `target`; None when not cut."""
    from ...cost.estimate import estimate

    functions = {f.sym_name.data: f for f in module.ops if isinstance(f, func.FuncOp)}
    stages = []
    while stage_function_name(function, len(stages)) in functions:
        stages.append(functions[stage_function_name(function, len(stages))])
    if not stages:
        return None
    link = pipeline_link(module, target.hardware)
    times, messages = [], []
    for fn in stages:
        times.append(estimate(module, target, fn.sym_name.data).schedule.step_time)
        sends = [op for op in fn.walk() if isinstance(op, SendOp)]
        # a stage's messages go out together (async): the largest arrives last
        messages.append(
            max(
                (link.latency + int(op.input.type.nbytes) / link.bandwidth for op in sends),
                default=0.0,
            )
        )
    return GenerationStep(times, messages, sequence_groups(module))
