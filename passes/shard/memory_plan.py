"""One decision for a training step's memory: which ZeRO stage, what to
rematerialize and whether to offload the optimizer, so that a rank's
predicted peak fits a budget at the least predicted step time. `shard{solve=ilp,memory=BYTES}` makes it on a training
step, after splitting it over its mesh:

    shard{mesh=dp:8,solve=ilp,hardware=h100-sxm,memory=60e9}

For each stage the data axis allows (0 = none, 1..3 = `zero{stage}`), with
and without `offload` (optimizer state in host memory, its update on the
host), the existing `zero` (and `offload`) transforms run on a copy of the
step, and the cost model prices the copy (offload's host bytes are no part of
the device's peak; its copies cost the hardware's [host] bandwidth and its
update runs at the host's, `cpu`'s, speed): its step time (collectives and their overlap included), the
state a rank holds by kind (`ir.training.step_memory`) and every value's
lifetime. A stage's peak with saved activations cut to S bytes is then

    peak(S) = weights + inputs + max over ops t of (other_t + min(saved_t, S))

(saved_t: the bytes alive at t that the forward keeps for backward; other_t:
the rest), so the most S within `memory` follows from the lifetimes, and the
remat integer program (`remat_solve`) gives the least recompute time storing
at most that. The plan is the (stage, remat, offload) of least step time +
recompute time that fits; ties go to the lower stage, then no offload
(`decide`).

peak(S) leaves out what recomputing holds in backward (a recomputed value
lives from its clone to its last reader; remat bounds what the forward
stores, not backward's peak), so the plan is applied to a copy and priced
again: one over the budget asks its stage for fewer saved bytes by as much
as it missed (a few times), and the next plan is tried. The plan that fits
is applied by running `remat`, `zero` and `offload` on the step (remat
first: zero{stage=3} then gathers parameters again for what it recomputes,
as the price assumed: remat's graph reads gathered parameters for free).

A stage 3 plan then chooses how parameters are gathered: its buckets (half,
once and twice shard's `bucket_mb`) and how many buckets ahead each is
gathered (1 or 2), each pair applied to a copy and priced, the fastest that
fits (`zero{bucket_mb,prefetch}`).

`plait.memory_plan` records the budget, the chosen plan (its peak as priced
after applying) and every plan considered, each a row: its choices (stage,
remat limit, offload) and its predicted bytes by kind and seconds. A
budget no plan fits is an error naming the least peak any plan reaches,
and that plan. The figures are @train_step's; with gradient accumulation
@accumulate gets the same zero stage and remat limit, and the priced peak
is the larger of the two functions'. Offload's host memory is not budgeted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.ir import SSAValue

from ...ir.attrs import MEMORY_PLAN_ATTR, mesh_axes
from ...ir.training import ACCUMULATE, SAVED, STATE_KINDS, TRAIN_STEP, step_memory
from ..memory.liveness import value_sizes
from ..memory.offload import Offload, OffloadError
from ..memory.remat import Remat, priced_graph
from ..memory.remat_graph import StepGraph
from ..memory.remat_solve import RematError, least_saved, solve
from .ilp import SolveError
from .rules import DATA_AXES
from .zero import STAGES, Zero, ZeroError

PEAK = "peak"
NO_OFFLOAD = "none"
OPTIMIZER_OFFLOAD = "optimizer state"  # `offload`: kept in host memory, updated there


class MemoryPlanError(SolveError):
    """No plan fits the memory budget; `peak`: the least peak a plan reaches."""

    def __init__(self, message: str, peak: float):
        super().__init__(message)
        self.peak = peak


@dataclass
class StageFigures:
    """A ZeRO stage's step as the cost model prices it."""

    stage: int
    state: dict[str, int]  # bytes a rank holds by kind (ir.training.step_memory)
    step_time: float  # predicted seconds of the step, without remat
    fixed: float  # bytes alive throughout: weights, state and inputs
    other: np.ndarray  # per op: bytes alive that remat does not change
    saved: np.ndarray  # per op: bytes alive that the forward keeps for backward
    graph: StepGraph  # the remat integer program's graph of this step
    everything: int  # saved activations without remat
    offload: bool = False  # the optimizer's state and update on the host

    @property
    def key(self) -> tuple[int, bool]:
        return self.stage, self.offload

    def peak(self, saved_bytes: float) -> float:
        """Predicted peak with the saved activations cut to `saved_bytes`."""
        if not len(self.other):
            return self.fixed
        return self.fixed + float(np.max(self.other + np.minimum(self.saved, saved_bytes)))

    def saved_limit(self, memory: float) -> float:
        """The most saved bytes with the peak within `memory` (-inf: none)."""
        room = memory - self.fixed
        if len(self.other) and float(np.max(self.other)) > room:
            return -math.inf
        over = self.other + self.saved > room
        return float(np.min(room - self.other[over])) if over.any() else math.inf


@dataclass(frozen=True)
class PlanRow:
    """One plan: its choices (a data row) and its predicted bytes per rank by
    kind and seconds per step."""

    stage: int  # ZeRO stage, 0: none
    saved_limit: float | None  # remat: saved activations at most, None: no remat
    memory: dict[str, float] = field(default_factory=dict)  # by kind, and the peak
    seconds: dict[str, float] = field(default_factory=dict)  # step, recompute, total
    recomputed: int = 0  # ops remat recomputes
    fits: bool = True
    offload: str = NO_OFFLOAD  # what is kept in host memory
    note: str = ""  # why a stage has no plan
    gathers: tuple[float, int] | None = None  # stage 3: bucket MiB, buckets gathered ahead

    @property
    def key(self) -> tuple[int, bool]:
        return self.stage, self.offload != NO_OFFLOAD

    @property
    def time(self) -> float:
        return self.seconds.get("total", math.inf)

    @property
    def peak(self) -> float:
        return self.memory.get(PEAK, math.inf)

    def choice(self) -> str:
        if self.saved_limit is None:
            remat = "no remat"
        elif math.isfinite(self.time):
            remat = f"remat saved <= {self.saved_limit:.6g} B ({self.recomputed} ops recomputed)"
        else:
            remat = f"remat storing the least it can, {self.saved_limit:.6g} B"
        gathers = ""
        if self.gathers is not None:
            gathers = f", gathers in {self.gathers[0]:.6g} MiB buckets {self.gathers[1]} ahead"
        return f"zero stage {self.stage}, {remat}, offload {self.offload}{gathers}"

    def describe(self) -> str:
        if self.note:
            return self.note
        if not self.fits:
            offload = ", offload" if self.offload != NO_OFFLOAD else ""
            return (
                f"{self.choice()}: the least peak of zero stage {self.stage}{offload}, "
                f"{self.peak:.6g} B"
            )
        kinds = ", ".join(f"{k} {v:.6g} B" for k, v in self.memory.items() if k != PEAK)
        s = self.seconds
        priced = f", priced after applying {s['priced']:.6g} s/step" if "priced" in s else ""
        return (
            f"{self.choice()}: peak {self.peak:.6g} B ({kinds}), {self.time:.6g} s/step "
            f"(step {s['step']:.6g} s + recompute {s['recompute']:.6g} s{priced})"
        )


def stage_figures(
    module: ModuleOp, stage: int, target, bucket_mb: float, offload: bool = False
) -> StageFigures:
    """Apply `zero{stage}` (none for 0), and `offload` if asked, to a copy of
    the step and price it."""
    if stage or offload:
        module = module.clone()
    if stage:
        Zero(stage=stage, bucket_mb=bucket_mb).apply(None, module)
    if offload:
        Offload().apply(None, module)
    fn = _step(module)
    report, graph = priced_graph(module, fn, target)
    schedule = report.schedule
    sizes = value_sizes(fn, target.values)
    block = fn.body.blocks.first
    count = len(list(block.ops))
    kept = _saved_values(graph, schedule.bases)
    other, saved = np.zeros(count + 1), np.zeros(count + 1)
    for value, (first, last) in schedule.lifetimes.items():
        line = saved if value in kept else other
        line[first] += sizes.get(value, 0)
        line[last + 1] -= sizes.get(value, 0)
    inputs = sum(sizes.get(a, 0) for a in block.args)
    everything = solve(graph, math.inf).saved_bytes
    return StageFigures(
        stage,
        step_memory(fn),
        schedule.step_time,
        schedule.weight_bytes + inputs,
        np.cumsum(other)[:count],
        np.cumsum(saved)[:count],
        graph,
        everything,
        offload,
    )


def _step(module: ModuleOp) -> func.FuncOp:
    return next(
        f for f in module.ops if isinstance(f, func.FuncOp) and f.sym_name.data == TRAIN_STEP
    )


def _saved_values(graph: StepGraph, bases: dict[SSAValue, SSAValue]) -> set[SSAValue]:
    """The values holding the memory of what backward reads of the forward."""
    held = set()
    for node in graph.saved:
        while node in graph.view_of:
            node = graph.view_of[node]
        held.add(node)
    return {r for node in held for r in node.results if r not in bases}


def plan_row(figures: StageFigures, saved_bytes: float, recompute: float, memory: float, **kw):
    """The row of `figures`' stage storing `saved_bytes` and recomputing for `recompute` s."""
    peak = figures.peak(saved_bytes)
    held = {k: float(figures.state[k]) for k in STATE_KINDS if figures.state[k]}
    held[SAVED] = float(saved_bytes)
    held[PEAK] = peak
    seconds = {
        "step": figures.step_time,
        "recompute": recompute,
        "total": figures.step_time + recompute,
    }
    offload = OPTIMIZER_OFFLOAD if figures.offload else NO_OFFLOAD
    return PlanRow(
        figures.stage, memory=held, seconds=seconds, fits=peak <= memory, offload=offload, **kw
    )


def stage_row(figures: StageFigures, limit: float, memory: float, timeout_s: float):
    """The stage's plan of least recompute time storing at most `limit` saved
    bytes; where none does, its least peak (a row that does not fit)."""
    if limit >= figures.everything:
        return plan_row(figures, figures.everything, 0.0, memory, saved_limit=None)
    try:
        if limit < 0:
            raise RematError("the state and transients alone are over the budget")
        plan = solve(figures.graph, limit, timeout_s)
    except RematError:
        least = least_saved(figures.graph, timeout_s)
        least = figures.everything if least is None else least
        # (no remat where storing less would not lower the peak)
        helps = figures.peak(least) < figures.peak(figures.everything)
        row = plan_row(
            figures, least, math.inf, memory, saved_limit=float(least) if helps else None
        )
        return replace(row, fits=False)
    recomputed = len(plan.recomputed)
    return plan_row(
        figures, plan.saved_bytes, plan.time, memory, saved_limit=limit, recomputed=recomputed
    )


def _order(row: PlanRow) -> tuple:
    return (row.time, *row.key)


def decide(stages: list[StageFigures], memory: float, timeout_s: float = 10.0):
    """(the plan of least predicted time within `memory`, every plan considered);
    a MemoryPlanError names the least peak any plan reaches."""
    rows = [stage_row(f, f.saved_limit(memory), memory, timeout_s) for f in stages]
    fitting = [r for r in rows if r.fits]
    if not fitting:
        least = min(rows, key=lambda r: (r.peak, *r.key))
        raise MemoryPlanError(
            f"memory budget {memory:.6g} B per device is below what the training step's "
            f"weights and state need on this mesh under any plan: the least peak is "
            f"{least.peak:.6g} B, with {least.choice()}; raise memory or use a larger mesh",
            least.peak,
        )
    return min(fitting, key=_order), rows


REFINEMENTS = 3  # plans priced after applying, per stage, before the stage is given up


def apply_plan(module: ModuleOp, row: PlanRow, bucket_mb: float, hardware: str, values) -> None:
    """Run the existing `remat`, `zero` and `offload` transforms the plan chose
    (remat first: zero{stage=3} gathers parameters for what it recomputes)."""
    if row.saved_limit is not None:
        Remat(budget=row.saved_limit, hardware=hardware, values=values).apply(None, module)
    if row.stage:
        bucket_mb, prefetch = row.gathers or (bucket_mb, 1)
        Zero(stage=row.stage, bucket_mb=bucket_mb, prefetch=prefetch).apply(None, module)
    if row.offload != NO_OFFLOAD:
        Offload().apply(None, module)


def plan_memory(
    module: ModuleOp,
    target,
    memory: float,
    bucket_mb: float,
    hardware: str,
    values,
    timeout_s: float = 10.0,
) -> PlanRow:
    """Decide the stage and remat of the sharded step `module` for `memory`
    bytes per rank, check the plan by pricing it applied to a copy (see the
    module's docstring), apply it, and record why (`plait.memory_plan`)."""

    axes = mesh_axes(module)
    data = any(a in DATA_AXES and n > 1 for a, n in axes.items())
    stages, skipped = [], []
    for stage in (0, *STAGES) if data else (0,):
        for offload in (False, True):
            try:
                stages.append(stage_figures(module, stage, target, bucket_mb, offload))
            except (ZeroError, OffloadError) as exc:  # a step it cannot split: no plan
                what = f"zero stage {stage}{', offload' if offload else ''}"
                note = f"{what}: not applicable: {exc}"
                kind = OPTIMIZER_OFFLOAD if offload else NO_OFFLOAD
                skipped.append(PlanRow(stage, None, fits=False, offload=kind, note=note))
    _, rows = decide(stages, memory, timeout_s)
    by_stage = {f.key: f for f in stages}
    pending = sorted((r for r in rows if r.fits), key=_order)
    tries = dict.fromkeys(by_stage, 0)
    missed, chosen = [], None
    while pending and chosen is None:
        row = pending.pop(0)
        trial = module.clone()
        apply_plan(trial, row, bucket_mb, hardware, values)
        peak, seconds = _priced(trial, target)
        row = replace(
            row, memory={**row.memory, PEAK: peak}, seconds={**row.seconds, "priced": seconds}
        )
        if peak <= memory:
            chosen = row
            break
        missed.append(replace(row, fits=False, note=_missed(row)))
        tries[row.key] += 1
        figures = by_stage[row.key]
        stored = row.memory[SAVED]
        if tries[row.key] < REFINEMENTS and stored > 0:
            again = stage_row(figures, stored - (peak - memory), memory, timeout_s)
            if again.fits:
                pending = sorted([*pending, again], key=_order)
    if chosen is not None and chosen.stage == 3:
        chosen, tried = _choose_gathers(module, chosen, bucket_mb, memory, target, hardware, values)
        missed += tried
    if chosen is None:
        least = min(missed, key=lambda r: r.peak)
        raise MemoryPlanError(
            f"memory budget {memory:.6g} B per device is below what the training step's "
            "weights and state need on this mesh under any plan tried: the least priced peak "
            f"is {least.peak:.6g} B, with {least.choice()}; raise memory or use a larger mesh",
            least.peak,
        )
    apply_plan(module, chosen, bucket_mb, hardware, values)
    others = [r.describe() for r in [*rows, *missed, *skipped] if r.key != chosen.key]
    others += [r.describe() for r in missed if r.key == chosen.key]
    module.attributes[MEMORY_PLAN_ATTR] = StringAttr(
        f"memory {memory:.6g} B per rank on {target.hardware.name}: chosen {chosen.describe()}; "
        f"considered: {' | '.join(others) or 'nothing else'}"
    )
    return chosen


BUCKET_SCALES = (0.5, 1.0, 2.0)  # stage 3's gather buckets tried, times shard's bucket_mb
PREFETCHES = (1, 2)  # and buckets gathered ahead of the one in use


def _choose_gathers(module, chosen: PlanRow, bucket_mb, memory, target, hardware, values):
    """Stage 3's gather buckets and prefetch depth: each pair applied to a copy
    and priced (larger buckets pay fewer latencies and overlap less, gathering
    further ahead hides more and holds more); the fastest that fits, and the
    others (rows that are not chosen)."""
    rows = [replace(chosen, gathers=(bucket_mb, 1))]
    for scale in BUCKET_SCALES:
        for prefetch in PREFETCHES:
            if (scale, prefetch) == (1.0, 1):
                continue  # the plan as priced
            row = replace(chosen, gathers=(bucket_mb * scale, prefetch))
            trial = module.clone()
            apply_plan(trial, row, bucket_mb, hardware, values)
            peak, seconds = _priced(trial, target)
            priced = {**row.memory, PEAK: peak}
            rows.append(replace(row, memory=priced, seconds={**row.seconds, "priced": seconds}))
    fitting = [r for r in rows if r.peak <= memory]
    best = min(fitting, key=lambda r: r.seconds["priced"])
    others = [replace(r, fits=False, note=_gathers_note(r, memory)) for r in rows if r is not best]
    return best, others


def _gathers_note(row: PlanRow, memory: float) -> str:
    over = " over the budget" if row.peak > memory else ""
    seconds = row.seconds["priced"]
    return f"{row.choice()}: priced after applying at {row.peak:.6g} B{over}, {seconds:.6g} s/step"


def _priced(module: ModuleOp, target) -> tuple[float, float]:
    """The cost model's peak over the step's functions (with accumulation
    @accumulate runs too), and @train_step's time."""
    from ...cost.estimate import estimate

    names = {f.sym_name.data for f in module.ops if isinstance(f, func.FuncOp)}
    reports = {
        n: estimate(module, target, n).schedule for n in (ACCUMULATE, TRAIN_STEP) if n in names
    }
    return max(r.peak_memory for r in reports.values()), reports[TRAIN_STEP].step_time


def _missed(row: PlanRow) -> str:
    return f"{row.choice()}: priced after applying at {row.peak:.6g} B, over the budget"
