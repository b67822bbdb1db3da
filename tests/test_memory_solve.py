"""shard{solve=ilp,memory=BYTES} on a training step: one decision picks the
ZeRO stage and what to rematerialize, at the least predicted step time with
the predicted peak per rank within the budget.

With ample memory no parameter is sharded and nothing recomputed; under a
budget below the replicated parameters + gradients + optimizer state the
plan shards (stage 3) and/or recomputes, trains as eager AdamW on 2 gloo
ranks and its measured peak stays within the budget's tolerance; the
decision is the brute-force optimum over every (stage, remat) plan of a
small step; a budget no plan fits names the least peak and its plan."""

from __future__ import annotations

import math
import re

import numpy as np
import plait
import pytest
import torch
from plait.cost.estimate import Target, estimate
from plait.cost.estimate_report import summary
from plait.frontend.training import TrainingSpec, capture_training
from plait.hardware import load
from plait.ir.attrs import MEMORY_PLAN_ATTR, PLACEMENTS_ATTR, REMAT_ATTR
from plait.ir.ops import ParamOp
from plait.ir.text import parse_module, print_module
from plait.ir.training import TRAIN_STEP, step_memory
from plait.passes.manager import PassManager
from plait.passes.memory.remat_solve import least_saved
from plait.passes.shard.memory_plan import MemoryPlanError, decide, stage_figures
from plait.runtime.memory import PEAK
from plait.training import _function
from test_remat import Branchy
from test_training import _hf_model
from test_training_parallel import ADAMW, SMALL_BUCKETS, _batches, _check_parity, _run

HARDWARE = "h100-sxm"
# the measured peak of each rank against the budget: the plan's priced peak is
# within the budget, and the measured within 10% of the priced (the issue's
# tolerance; on gloo ranks a peak moves by a buffer or two with when gloo's
# thread frees, see test_remat)
TOLERANCE = 0.10


def _shard(memory: float) -> str:
    return f"mesh=dp:2,bucket_mb={SMALL_BUCKETS},solve=ilp,hardware={HARDWARE},memory={memory:.0f}"


def _step(model, batch):
    """The captured step, cleaned up (not sharded)."""
    captured = capture_training(
        model, batch, TrainingSpec("adamw", {}, 1, None, "fp32"), None, None
    )
    PassManager.parse("canonicalize,cse,dce").run(captured.module, captured.weights)
    return captured


def _planned(captured, memory: float):
    module = captured.module.clone()
    with pytest.warns(UserWarning, match="sharded by the step rules"):
        PassManager.parse(f"shard{{{_shard(memory)}}}").run(module, captured.weights)
    return module


def _replicated(model) -> int:
    """Parameters + gradients + AdamW's two moments, whole, f32."""
    return 4 * 4 * sum(p.numel() for p in model.parameters())


def _chosen_stage(module) -> int:
    return int(re.search(r"chosen zero stage (\d)", module.attributes[MEMORY_PLAN_ATTR].data)[1])


@pytest.fixture(scope="module")
def llama():
    model = _hf_model("llama", num_hidden_layers=2)
    return model, _step(model, _batches(1)[0])


def test_ample_memory_shards_no_parameter_and_recomputes_nothing(llama):
    model, captured = llama
    module = _planned(captured, 1e12)
    record = module.attributes[MEMORY_PLAN_ATTR].data
    assert _chosen_stage(module) in (0, 1) and "no remat" in record.split("; considered")[0]
    assert REMAT_ATTR not in module.attributes
    # every stage was weighed, each with its predicted bytes and time
    assert all(f"zero stage {s}, no remat" in record for s in range(4))
    held = step_memory(_function(module, TRAIN_STEP))
    assert held["parameters"] == held["gradients"] == _replicated(model) // 4
    # it is the fastest plan: the chosen time is the least of those listed
    times = [float(t) for t in re.findall(r"B\), ([\d.e+-]+) s/step", record)]
    assert times[0] == min(times)
    text = print_module(module)  # the record prints and parses back
    assert print_module(parse_module(text)) == text


def test_plait_estimate_shows_the_plan(llama):
    _, captured = llama
    module = _planned(captured, 0.65 * _replicated(llama[0]))  # under what stages 0-2 reach
    rows = dict(summary(estimate(module, Target(load(HARDWARE)))))
    chosen, _, considered = module.attributes[MEMORY_PLAN_ATTR].data.partition("; considered: ")
    assert rows["memory plan"] == chosen and rows["plans considered"] == considered
    for stage in range(3):  # the stages that do not fit, with the least peak each reaches
        assert f"the least peak of zero stage {stage}" in considered


def test_a_stage_3_plan_chooses_its_gather_buckets_and_prefetch():
    """Parameters outweigh activations here, so a budget under stage 2's peak
    gets stage 3; its gathers (bucket size, buckets ahead) are the fastest
    pair that fits of those priced: larger buckets and gathering further
    ahead are faster on this step, and over the budget."""
    model = _hf_model("llama", num_hidden_layers=2, intermediate_size=512)
    module = _planned(_step(model, _batches(1, rows=2, seq=4)[0]), 0.4 * _replicated(model))
    record = module.attributes[MEMORY_PLAN_ATTR].data
    chosen, _, considered = record.partition("; considered: ")
    assert _chosen_stage(module) == 3
    pair = r"gathers in ([\d.e+-]+) MiB buckets (\d) ahead"
    tried = re.findall(
        pair + r": priced after applying at ([\d.e+-]+) B( over the budget)?, "
        r"([\d.e+-]+) s/step",
        considered,
    )
    assert len(tried) == 5  # 3 bucket sizes x 2 depths, less the chosen
    mine = re.search(pair + r".*priced after applying ([\d.e+-]+) s/step", chosen)
    chosen_time = float(mine[3])
    fitting = [float(t) for *_, over, t in tried if not over]
    assert all(chosen_time <= t for t in fitting)
    assert any(over and float(t) < chosen_time for *_, over, t in tried)  # faster, over budget
    gathers = (float(mine[1]), int(mine[2]))
    assert (gathers[0] / SMALL_BUCKETS, gathers[1]) in {(s, p) for s in (0.5, 1, 2) for p in (1, 2)}


def test_a_budget_below_the_replicated_state_shards_and_trains_as_eager(tmp_path):
    """2 gloo ranks: the plan shards parameters (stage 3) and/or recomputes;
    every step's loss and the final parameters equal eager AdamW's; each
    rank's measured peak is within the budget (and its tolerance)."""
    model = _hf_model("llama", num_hidden_layers=2)
    budget = 0.75 * _replicated(model)
    run = _run(model, _shard(budget), ADAMW, tmp_path)
    module = run.trainer.module
    assert _chosen_stage(module) == 3 or REMAT_ATTR in module.attributes
    _check_parity(run)
    placed = [
        op
        for op in _function(module, TRAIN_STEP).body.blocks.first.ops
        if isinstance(op, ParamOp) and "flat" in str(op.attributes.get(PLACEMENTS_ATTR))
    ]
    assert placed  # zero's pieces, as the plan says
    priced = float(
        re.search(r"chosen .*?: peak ([\d.e+]+) B", module.attributes[MEMORY_PLAN_ATTR].data)[1]
    )
    assert priced <= budget
    for record in run.measured:
        assert record[PEAK] <= budget * (1 + TOLERANCE), (record[PEAK], budget)
        assert abs(record[PEAK] - priced) <= TOLERANCE * record[PEAK]


def test_on_one_device_the_plan_recomputes_and_trains_as_eager_within_the_budget():
    """mesh=dp:1 (one rank, no ZeRO stage to choose): under 3/4 of the step's
    peak the plan recomputes; it trains as eager AdamW and the measured peak
    is within the budget (the estimate is the measured peak to 1% on one rank)."""
    from test_remat import _adamw
    from test_training import _check_run, _eager, _lm_loss

    model, batches = _hf_model("llama", num_hidden_layers=2), _batches(3, rows=8, seq=32)
    whole = _step(model, batches[0]).module
    PassManager.parse("shard{mesh=dp:1}").run(whole)
    budget = 0.75 * estimate(whole, Target(load(HARDWARE))).schedule.peak_memory
    pipeline = (
        f"canonicalize,cse,dce,shard{{mesh=dp:1,solve=ilp,hardware={HARDWARE},memory={budget:.0f}}}"
    )
    with pytest.warns(UserWarning, match="sharded by the step rules"):
        trainer = plait.compile_training(model, batches[0], lr=1e-3, pipeline=pipeline)
    record = trainer.module.attributes[MEMORY_PLAN_ATTR].data
    assert "chosen zero stage 0, remat saved <=" in record and ", offload none:" in record
    considered = record.split("considered: ")[1]  # the one other plan: offloading the optimizer
    assert considered.count("zero stage") == 1 and "offload optimizer state" in considered
    assert "recomputes" in trainer.module.attributes[REMAT_ATTR].data
    trainer.measure_memory = True
    losses, _, reference = _eager(model, batches, _lm_loss, _adamw)
    _check_run(trainer, batches, losses, reference)  # losses and final parameters, 1e-5
    measured = trainer.memory(measured=True)[PEAK]
    priced = float(re.search(r"chosen .*?: peak ([\d.e+]+) B", record)[1])
    assert priced <= budget and measured <= budget * 1.01
    assert abs(measured - priced) <= 0.01 * measured


# ---- the decision against brute force ------------------------------------------------


@pytest.fixture(scope="module")
def branchy_stages():
    """Branchy's step on dp:2, priced at each ZeRO stage."""
    batch = (torch.randn(4, 8), torch.randn(4, 4))
    module = _step(Branchy(), batch).module
    PassManager.parse("shard{mesh=dp:2}").run(module)
    target = Target(load(HARDWARE))
    return [stage_figures(module, stage, target, 25.0) for stage in range(4)]


def _plans(graph):
    """(saved bytes, recompute seconds) of every plan: each node backward
    reads, and each input of a node recomputed, is either stored or (if it
    can be) recomputed; a stored view holds its base's memory."""

    def walk(pending, stored, recomputed):
        if not pending:
            yield stored, recomputed
            return
        node, rest = pending[0], pending[1:]
        if node in stored or node in recomputed:
            yield from walk(rest, stored, recomputed)
            return
        yield from walk(rest, stored | {node}, recomputed)
        if graph.recomputable[node] and node not in graph.returned:
            yield from walk(rest + graph.inputs[node], stored, recomputed | {node})

    for stored, recomputed in walk(sorted(graph.saved, key=graph.nodes.index), set(), set()):
        held = set()
        for node in stored:
            while node in graph.view_of:
                node = graph.view_of[node]
            held.add(node)
        yield sum(graph.bytes[n] for n in held), sum(graph.time[n] for n in recomputed)


def _brute_force(stages, memory):
    """The least step + recompute time of any (stage, recompute set) within `memory`."""
    best = math.inf
    for figures in stages:
        for saved, seconds in _plans(figures.graph):
            if figures.peak(saved) <= memory:
                best = min(best, figures.step_time + seconds)
    return best


def test_the_decision_is_the_brute_force_optimum_on_a_small_step(branchy_stages):
    stages = branchy_stages
    assert all(len(f.graph.saved) >= 4 for f in stages)
    least = min(f.peak(least_saved(f.graph)) for f in stages)
    most = max(f.peak(f.everything) for f in stages)
    chosen, infeasible = set(), 0
    for memory in np.linspace(0.97 * least, 1.01 * most, 14):
        expected = _brute_force(stages, memory)
        if expected == math.inf:
            with pytest.raises(MemoryPlanError, match=f"the least peak is {least:.6g} B"):
                decide(stages, memory)
            infeasible += 1
            continue
        plan, rows = decide(stages, memory)
        assert plan.peak <= memory and plan.time == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert len(rows) == 4
        chosen.add((plan.stage, plan.saved_limit is not None))
    assert infeasible >= 1
    # the budgets ask for different stages, with and without remat
    assert len({stage for stage, _ in chosen}) >= 2 and {True, False} <= {r for _, r in chosen}


def test_a_stages_predicted_peak_is_the_cost_models(branchy_stages):
    """Without remat, peak(S) at what the forward saves is the estimate's peak
    of the step with that stage applied, which `plait estimate` reports."""
    batch = (torch.randn(4, 8), torch.randn(4, 4))
    for figures in branchy_stages[1:]:
        module = _step(Branchy(), batch).module
        PassManager.parse(f"shard{{mesh=dp:2}},zero{{stage={figures.stage}}}").run(module)
        peak = estimate(module, Target(load(HARDWARE))).schedule.peak_memory
        assert figures.peak(figures.everything) == peak
        assert figures.state == step_memory(_function(module, TRAIN_STEP))


def test_a_budget_no_plan_fits_names_the_least_peak_and_its_plan(branchy_stages):
    """The least over every plan: each stage with and without offload."""
    batch = (torch.randn(4, 8), torch.randn(4, 4))
    module = _step(Branchy(), batch).module
    PassManager.parse("shard{mesh=dp:2}").run(module)
    target = Target(load(HARDWARE))
    offloaded = [stage_figures(module, f.stage, target, 25.0, True) for f in branchy_stages]
    everything = [*branchy_stages, *offloaded]
    least = min(everything, key=lambda f: (f.peak(least_saved(f.graph)), f.key))
    reached = least.peak(least_saved(least.graph))
    assert least.offload  # (keeping the moments on the host is what reaches least)
    pipeline = f"canonicalize,cse,dce,shard{{mesh=dp:2,solve=ilp,memory={reached * 0.9:.0f}}}"
    with pytest.raises(
        plait.PlaitError,
        match=rf"the least peak is {reached:.6g} B, with zero stage {least.stage}, ",
    ):
        plait.compile_training(Branchy(), batch, pipeline=pipeline)
