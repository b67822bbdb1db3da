"""pipeline{stages=S,microbatches=M,schedule=gpipe|1f1b|interleaved,virtual=V,hardware=cpu}:
pipeline parallelism for a training step.

The step's forward is cut into S stages at residual-stream boundaries
(`ir.residual`), the cut chosen by dynamic programming over the cost
model's op times (`estimate` on `hardware`) so the stages' predicted
forward + backward times balance. Every op then belongs to one stage, by
dataflow:
- a forward op to the first stage whose boundary value it computes;
- a backward op to the lowest stage among its operands' (a forward value
  counts at the last stage that reads it: the receiving stage keeps it);
- a parameter to the stage of its forward uses (one stage: a weight used on
  two, such as tied embeddings, is an error), its optimizer state with it;
- ops that read only inputs, buffers and constants (masks, rotary tables,
  the learning-rate schedule's scalars) are recomputed where needed.

With `virtual=V` (schedule=interleaved) the cut makes S x V stages and
stage k runs on rank k % S. Each stage k gets a forward and a backward
function, each rank r one update, on a new mesh axis `pp:S`:

    @forward_stage<k>(batch...) -> (loss on the last stage, values kept for backward...)
    @backward_stage<k>(batch..., kept...)     the gradients added into the accumulators
    @update_stage<r>(%lr)                     the optimizer on r's stages, accumulators zeroed

Values crossing stages are `plait.send`/`plait.recv` ops (forward values up,
their gradients down), each pair with its own tag. The step must be captured
for M micro-batches (`plait.compile_training` does it: the loss of each is
divided by M as gradient accumulation divides it), so the M backwards sum to
the whole batch's gradient. The schedule (`pipeline_schedule`) is recorded
on the module as each rank's list of actions:

    canonicalize,cse,dce,pipeline{stages=2,microbatches=4,schedule=1f1b}

After `shard` over a data axis (dp:N, or dp:N,tp:M), each stage runs on
its dp group: the micro-batches' gradients add up in the accumulators
unreduced, and each rank's update reduces its stages' accumulators over
its dp group once per step, in async buckets (shard's buckets, regrouped
by stage: `grad_buckets.unbucket` / `bucket_by`). After `zero{stage=1}`
each rank's update reduce-scatters its stages' accumulators (it reads only
its slices: half an all-reduce's bytes), runs on its slices of the
optimizer state and gathers the slices into the parameters; stages 2 and 3
are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp

from ...ir.attrs import MESH_ATTR, PIPELINE_AXIS, PLACEMENTS_ATTR, MeshAttr, mesh_axes
from ...ir.ops import ParamOp, ReduceScatterOp
from ...ir.training import ACCUMULATE, STATE_OF, TRAIN_STEP
from ..base import Pass
from ..options import OptionError, check_hardware
from .decode_stages import is_generation, pipeline_generation
from .grad_buckets import bucket_by, unbucket
from .pipeline_cost import pipeline_link
from .pipeline_schedule import SCHEDULES, PipelinePlan, record, simulate, stage_function
from .rules import DATA_AXES
from .stage_split import StageError, StepSplit, function_messages, module_of
from .zero import scatter_reduced_gradients


@dataclass(frozen=True)
class Pipeline(Pass):
    name = "pipeline"
    summary = "pipeline stages of a training step (GPipe, 1F1B, interleaved) or of generation, on a pp mesh axis"

    stages: int = 2
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual: int = 1  # stages per rank (interleaved)
    hardware: str = "cpu"

    def __post_init__(self):
        super().__post_init__()
        if self.stages < 2:
            raise OptionError(
                f"stages is the number of pipeline stages, >= 2, not {self.stages}", "stages"
            )
        if self.microbatches < 1:
            raise OptionError(f"microbatches must be >= 1, not {self.microbatches}", "microbatches")
        if self.schedule not in SCHEDULES:
            raise OptionError(
                f"schedule '{self.schedule}' is not one of {', '.join(SCHEDULES)}", "schedule"
            )
        if (self.schedule == "interleaved") != (self.virtual > 1):
            raise OptionError(
                f"virtual={self.virtual}: schedule=interleaved runs virtual >= 2 stages per "
                "rank, gpipe and 1f1b one (virtual=1)",
                "virtual" if self.virtual > 1 else "schedule",
            )
        if self.virtual > 1 and self.microbatches % self.stages:
            raise OptionError(
                f"interleaved needs microbatches a multiple of stages ({self.stages}), not "
                f"{self.microbatches}",
                "microbatches",
            )
        check_hardware(self.hardware)

    def apply(self, ctx: Context, module: ModuleOp) -> None:
        from ...cost.estimate import Target, estimate
        from ...hardware import load

        functions = {f.sym_name.data: f for f in module.ops if isinstance(f, func.FuncOp)}
        if is_generation(module):  # @prefill and @decode (plait.compile_generation)
            pipeline_generation(module, self.stages, self.microbatches, self.virtual, self.hardware)
            return
        if TRAIN_STEP not in functions:
            raise StageError(
                "pipeline applies to a training step (plait.compile_training, plait train) or "
                "to generation programs (plait.compile_generation, plait compile --generate, "
                "plait estimate --decode), not to a forward"
            )
        if PIPELINE_AXIS in mesh_axes(module):
            raise StageError(f"the step is already pipelined (mesh axis '{PIPELINE_AXIS}')")
        data = [a for a, n in mesh_axes(module).items() if a in DATA_AXES and n > 1]
        if self.microbatches > 1 and ACCUMULATE not in functions:
            raise StageError(
                f"pipeline{{microbatches={self.microbatches}}} needs the step captured for "
                f"{self.microbatches} micro-batches: plait.compile_training(..., accumulation="
                f"{self.microbatches}) (it sets this itself from the pipeline string)"
            )
        fn = functions[TRAIN_STEP]
        for arg in fn.body.blocks.first.args:
            if not all(isinstance(d, int) for d in arg.type.shape):
                raise StageError(
                    f"pipeline stages exchange tensors of fixed shapes, but input "
                    f"'{arg.name_hint}' is {arg.type}; compile without dynamic_shapes"
                )
        axes = mesh_axes(module)
        buckets, sliced = _unbucket(fn, data[0], list(axes).index(data[0])) if data else ([], False)
        hardware = load(self.hardware)
        report = estimate(module, Target(hardware), TRAIN_STEP)
        times = {row.op: row.time for row in report.ops}
        step = StepSplit(fn)
        costs = step.segment_costs(times)
        count = self.stages * self.virtual
        if len(costs) < count:
            virtual = f" x virtual={self.virtual}" if self.virtual > 1 else ""
            raise StageError(
                f"pipeline{{stages={self.stages}}}{virtual}: the step has {len(costs) - 1} "
                f"residual boundaries, so at most {len(costs)} non-empty stages; use stages "
                f"<= {len(costs)} (or a model with more layers)"
            )
        cuts = best_cuts(costs, count)
        stage_times = stage_sums(costs, cuts)
        built = step.build(cuts, count, self.stages)
        updates = {stage_function("U", r) for r in range(self.stages)} if data else set()
        for f in built:  # each rank reduces its stages' gradients over its data group
            if f.sym_name.data in updates:
                bucket_by(f.body.blocks.first, data[0], buckets)
                if sliced:  # zero{stage=1}: into this rank's slices only
                    scatter_reduced_gradients(f, data[0], axes[data[0]], tuple(axes))
        for f in functions.values():
            f.detach()
        for f in built:
            module.body.blocks.first.add_op(f)
        axes = {**axes, PIPELINE_AXIS: self.stages}
        module.attributes[MESH_ATTR] = MeshAttr(tuple(axes.items()))
        actions = SCHEDULES[self.schedule](self.stages, self.microbatches, self.virtual)
        timeline = simulate(
            actions,
            _action_times(step, times, self.stages),
            function_messages(module),
            pipeline_link(module, hardware),
        )
        mean = sum(stage_times) / len(stage_times)
        notes = {
            "cut": ", ".join(f"after {module_of(step.chain[c - 1].branch)}" for c in cuts[1:]),
            "predicted": (
                "stage seconds per micro-batch "
                + " ".join(f"{t:.3g}" for t in stage_times)
                + f"; imbalance {max(stage_times) / mean:.3f}; step {timeline.time:.3g} s, "
                f"bubble {timeline.bubble:.0%} on {self.hardware}"
            ),
        }
        plan = PipelinePlan(self.stages, self.microbatches, self.schedule, actions, self.virtual)
        record(module, plan, notes)


def _unbucket(fn: func.FuncOp, axis: str, index: int) -> tuple[list[list[str]], bool]:
    """The data axis's gradient buckets mix the stages' parameters: undone
    here (and rebuilt in each rank's update, `bucket_by`), so that each
    stage's gradients are reduced over its data-parallel group, once per
    step, after its last micro-batch's backward. Also whether zero{stage=1}
    split the optimizer state over the data axis (mesh axis `index`): each
    rank's update then reduce-scatters, runs on its slices and gathers them
    into the parameters. Stages 2 and 3 are refused."""
    block = fn.body.blocks.first
    sliced = False
    for op in block.ops:
        if isinstance(op, ReduceScatterOp) and op.axis.data == axis:
            _refuse_zero(2, f"gradients are reduce-scattered over the data axis '{axis}'")
        if not (isinstance(op, ParamOp) and op.is_state and PLACEMENTS_ATTR in op.attributes):
            continue
        split = op.attributes[PLACEMENTS_ATTR].data[index].kind not in ("replicate", "partial")
        if split and STATE_OF not in op.attributes:  # a parameter, not its optimizer state
            _refuse_zero(3, f"'{op.weight_name}' is split over the data axis '{axis}'")
        sliced = sliced or split
    return unbucket(block, axis), sliced


def _refuse_zero(stage: int, why: str) -> None:
    raise StageError(
        f"pipeline after zero{{stage={stage}}} is not supported yet ({why}); zero{{stage=1}} "
        "composes with the pipeline, or drop zero (and shard{memory=...}, which may choose "
        "it) or the pipeline"
    )


# ---- the cut --------------------------------------------------------------------


def best_cuts(costs: list[float], stages: int) -> list[int]:
    """Where stages start (segment indices, the first 0) so that the
    costliest stage is as cheap as it can be: dynamic programming over
    contiguous groups of the segments, each non-empty."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the least max-stage cost of the first i segments in k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    start = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], start[k][i] = value, j
    cuts, i = [], n
    for k in range(stages, 0, -1):
        i = start[k][i]
        cuts.append(i)
    return cuts[::-1]


def stage_sums(costs: list[float], cuts: list[int]) -> list[float]:
    """Each stage's cost, the stages starting at `cuts`."""
    ends = [*cuts[1:], len(costs)]
    return [sum(costs[a:b]) for a, b in zip(cuts, ends)]


def _action_times(step: StepSplit, times, ranks: int) -> dict[tuple[str, int], float]:
    """Predicted seconds of each stage function (a rank's, for the update): its
    original ops' times."""
    out: dict[tuple[str, int], float] = {}
    for op, s in step.placed.items():
        kind = step.kind(op)
        key = (kind, s % ranks if kind == "U" else s)
        out[key] = out.get(key, 0.0) + times.get(op, 0.0)
    return out
