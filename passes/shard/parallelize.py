"""parallelize{devices=N,memory=BYTES,microbatches=M,schedule=auto,hardware=cpu}:
choose a training step's mesh for N devices, pipeline stages and their
schedule included.

Every way to split N devices into data, tensor and pipeline parallelism
(dp x tp x pp = N, each axis of size 1 left out) is applied to a copy of the
step and priced by the cost model on `hardware`:

- pp = 1: `shard{mesh=dp:a,tp:b}`; given `memory`, with `solve=ilp`, which
  also picks the ZeRO stage, remat and offload that fit (`memory_plan`).
  Its time is the M micro-batches' programs (@accumulate M - 1 times, then
  @train_step); its peak, the larger program's.
- pp > 1: `shard` over the rest (if any), then
  `pipeline{stages=pp,microbatches=M,schedule=S}`; given `memory` and a dp
  axis, also with `zero{stage=1}` before the pipeline (the other stages do
  not compose with it yet), as a mesh of its own. `schedule=auto` prices
  1F1B and interleaved 1F1B with V = 2, 3, ... stages per rank (while M is a
  multiple of pp, the step has the boundaries, and each V is faster than
  the last: fewer idle slots, but V times the messages); `gpipe`, `1f1b` or
  `interleaved` prices only that schedule (GPipe's bubble is 1F1B's, its
  peak higher, so auto leaves it out). Its time is the
  simulated schedule (`pipeline_cost.pipeline_timeline`: stage functions'
  estimates, messages on the pp link, the bubble); its peak, the rank that
  holds the most (`pipeline_peaks`: state, kept activations in flight).

A mesh the step cannot take (heads that do not split over tp, fewer
residual boundaries than stages) is listed as not applicable, with why; one
that no ZeRO/remat/offload plan fits, with its least peak.
The chosen mesh is the fastest whose peak fits `memory` (all fit without
one; ties go to fewer pipeline stages, then fewer tensor ranks), and it is
applied to the step; `plait.mesh_plan` records every mesh with its priced
seconds and peak. The step is captured for M micro-batches whatever is
chosen (`plait.compile_training` reads `microbatches` here as it does on
`pipeline`), so every mesh is priced on the same work.

    canonicalize,cse,dce,parallelize{devices=4,memory=2e9,microbatches=4}
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, replace

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, StringAttr

from ...ir.attrs import MESH_ATTR, MESH_PLAN_ATTR
from ...ir.errors import PlaitError
from ...ir.training import ACCUMULATE, TRAIN_STEP
from ..base import Pass
from ..options import Mesh, OptionError, check_hardware
from .memory_plan import MemoryPlanError
from .pipeline_cost import estimates_of, pipeline_peaks, pipeline_timeline
from .shard import Shard, Solver
from .stage_split import StageError
from .stages import Pipeline
from .zero import Zero

SCHEDULES = ("auto", "gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Candidate:
    """One mesh: its axes (dp, tp, pp), and its priced seconds and peak bytes
    per device, or why it does not apply."""

    dp: int
    tp: int
    pp: int
    zero1: bool = False  # a pipeline's optimizer state split over dp (zero{stage=1})
    schedule: str = ""  # a pipeline's ("" without one)
    virtual: int = 1  # stages per pp rank (interleaved)
    seconds: float = float("inf")
    peak: float = float("inf")
    note: str = ""

    @property
    def mesh(self) -> str:
        axes = (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))
        text = ",".join(f"{a}:{n}" for a, n in axes if n > 1) or "one device"
        return text + (" with zero{stage=1}" if self.zero1 else "")

    @property
    def label(self) -> str:
        """The mesh and, for a pipeline, its schedule."""
        if not self.schedule:
            return self.mesh
        chunks = f", virtual={self.virtual}" if self.virtual > 1 else ""
        return f"{self.mesh} ({self.schedule}{chunks})"

    @property
    def priced(self) -> bool:
        return not self.note

    def describe(self) -> str:
        if self.note:
            return f"{self.label}: {self.note}"
        return f"{self.label}: {self.seconds:.6g} s/step, peak {self.peak:.6g} B"


@dataclass(frozen=True)
class Parallelize(Pass):
    name = "parallelize"
    summary = "choose a training step's dp x tp x pp mesh for N devices: the fastest predicted step that fits memory"

    devices: int = 2
    memory: float | None = None  # bytes per device
    microbatches: int = 1
    schedule: str = "auto"
    hardware: str = "cpu"

    def __post_init__(self):
        super().__post_init__()
        if self.devices < 1:
            raise OptionError(f"devices must be >= 1, not {self.devices}", "devices")
        if self.microbatches < 1:
            raise OptionError(f"microbatches must be >= 1, not {self.microbatches}", "microbatches")
        if self.schedule not in SCHEDULES:
            raise OptionError(
                f"schedule '{self.schedule}' is not one of {', '.join(SCHEDULES)}", "schedule"
            )
        check_hardware(self.hardware)

    def apply(self, ctx: Context, module: ModuleOp) -> None:
        names = {f.sym_name.data for f in module.ops if isinstance(f, func.FuncOp)}
        if TRAIN_STEP not in names:
            raise StageError("parallelize chooses a training step's mesh (plait.compile_training)")
        if MESH_ATTR in module.attributes:
            raise StageError(
                "parallelize chooses the mesh itself: drop shard{mesh=...} and pipeline from "
                "the pipeline, or drop parallelize"
            )
        candidates = self.price_meshes(module)
        chosen = self.choose(candidates)
        self._apply(chosen, module)
        budget = f"memory {self.memory:.6g} B per device" if self.memory else "no memory budget"
        others = [
            c.describe() + ("" if not c.priced or self._fits(c) else ", over memory")
            for c in candidates
            if c is not chosen
        ]
        module.attributes[MESH_PLAN_ATTR] = StringAttr(
            f"{self.devices} devices, {budget}, {self.microbatches} micro-batches on "
            f"{self.hardware}: chosen {chosen.describe()}; considered: "
            f"{' | '.join(others) or 'nothing else'}"
        )

    def choose(self, candidates: list[Candidate]) -> Candidate:
        """The fastest priced mesh that fits (ties: fewer stages, fewer tensor
        ranks, no ZeRO, fewer stages per rank); an error naming the least peak
        when none fits."""
        fitting = [c for c in candidates if c.priced and self._fits(c)]
        if fitting:
            return min(fitting, key=lambda c: (c.seconds, c.pp, c.tp, c.zero1, c.virtual))
        if self.memory is None:
            raise PlaitError(
                f"parallelize: no mesh of {self.devices} devices applies to this step: "
                + " | ".join(c.describe() for c in candidates)
            )
        least = min(candidates, key=lambda c: c.peak)
        hint = (
            f"; the least peak is {least.mesh}'s, {least.peak:.6g} B"
            if least.peak < math.inf
            else ""
        )
        raise PlaitError(
            f"parallelize: no mesh of {self.devices} devices fits memory {self.memory:.6g} B "
            f"per device{hint}; raise memory or add devices"
        )

    def price_meshes(self, module: ModuleOp) -> list[Candidate]:
        """Every mesh of `devices`, priced on a copy of `module` (see the docstring)."""
        out = []
        for dp, tp, pp in meshes(self.devices):
            for zero1 in (False, True) if pp > 1 and dp > 1 and self.memory else (False,):
                out += self._price_schedules(module, Candidate(dp, tp, pp, zero1))
        return out

    def _price_schedules(self, module: ModuleOp, mesh: Candidate) -> list[Candidate]:
        """`mesh` priced with each schedule `schedule` allows: interleaved with
        one more stage per rank while that applies and is faster (a pipeline
        step's time is about convex in V: the bubble shrinks as 1/V, messages
        grow as V)."""
        if mesh.pp == 1:
            return [self._price(module, mesh)]
        out = []
        if self.schedule != "interleaved":
            plain = "1f1b" if self.schedule == "auto" else self.schedule
            out.append(self._price(module, replace(mesh, schedule=plain)))
        if self.schedule not in ("auto", "interleaved") or self.microbatches % mesh.pp:
            return out or [
                replace(mesh, note=f"interleaved needs microbatches a multiple of {mesh.pp}")
            ]
        best = min((c.seconds for c in out), default=math.inf)
        for virtual in itertools.count(2):
            priced = self._price(module, replace(mesh, schedule="interleaved", virtual=virtual))
            if not priced.priced:  # too few boundaries for V stages a rank: say why,
                return out or [priced]  # if no schedule applies
            out.append(priced)  # (the V no faster is listed too: the record shows the turn)
            if priced.seconds >= best:
                return out
            best = priced.seconds

    def _apply(self, candidate: Candidate, module: ModuleOp) -> None:
        with warnings.catch_warnings():  # (shard{solve=ilp}'s note on training steps)
            warnings.simplefilter("ignore")
            for p in self._passes(candidate):
                p.apply(None, module)

    def _fits(self, candidate: Candidate) -> bool:
        return self.memory is None or candidate.peak <= self.memory

    def _passes(self, c: Candidate) -> list[Pass]:
        out: list[Pass] = []
        if c.dp * c.tp > 1:
            axes = tuple((a, n) for a, n in (("dp", c.dp), ("tp", c.tp)) if n > 1)
            plan = self.memory is not None and c.pp == 1  # (a pipeline takes zero stage 1 only)
            priced = {"solve": Solver.ILP, "hardware": self.hardware, "memory": self.memory}
            out.append(Shard(mesh=Mesh(axes), **(priced if plan else {})))
        if c.zero1:
            out.append(Zero(stage=1))
        if c.pp > 1:
            out.append(
                Pipeline(
                    stages=c.pp,
                    microbatches=self.microbatches,
                    schedule=c.schedule,
                    virtual=c.virtual,
                    hardware=self.hardware,
                )
            )
        return out

    def _price(self, module: ModuleOp, candidate: Candidate) -> Candidate:
        from ...cost.estimate import Target, estimate
        from ...hardware import load

        trial = module.clone()
        try:
            self._apply(candidate, trial)
        except MemoryPlanError as exc:  # over the budget with any ZeRO stage, remat, offload
            note = (
                f"over memory with every ZeRO, remat and offload plan (least peak {exc.peak:.6g} B)"
            )
            return replace(candidate, peak=exc.peak, note=note)
        except PlaitError as exc:
            return replace(candidate, note=f"not applicable: {str(exc).splitlines()[0]}")
        target = Target(load(self.hardware))
        if candidate.pp > 1:
            estimates = estimates_of(trial, target)
            seconds = pipeline_timeline(trial, target, estimates).time
            peak = max(pipeline_peaks(trial, target, estimates))
            return replace(candidate, seconds=seconds, peak=peak)
        names = {f.sym_name.data for f in trial.ops if isinstance(f, func.FuncOp)}
        step = estimate(trial, target, TRAIN_STEP).schedule
        seconds, peak = step.step_time, step.peak_memory
        if ACCUMULATE in names:
            micro = estimate(trial, target, ACCUMULATE).schedule
            seconds += (self.microbatches - 1) * micro.step_time
            peak = max(peak, micro.peak_memory)
        return replace(candidate, seconds=seconds, peak=peak)


def meshes(devices: int) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) whose product is `devices`."""
    divisors = [d for d in range(1, devices + 1) if devices % d == 0]
    return [
        (dp, tp, devices // (dp * tp))
        for dp in divisors
        for tp in divisors
        if devices % (dp * tp) == 0
    ]
