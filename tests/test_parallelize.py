"""parallelize{devices,memory,microbatches}: the training step's dp x tp x pp
mesh chosen by the cost model, the fastest that fits the memory budget."""

from __future__ import annotations

import math

import plait
import pytest
from plait.cost.estimate import Target, estimate
from plait.cost.estimate_report import memory_plan
from plait.hardware import load
from plait.ir.attrs import MESH_PLAN_ATTR
from plait.ir.errors import PlaitError
from plait.passes.options import OptionError
from plait.passes.shard.parallelize import Candidate, Parallelize, meshes
from plait.passes.shard.pipeline_schedule import pipeline_plan
from plait.passes.shard.shard import Shard
from test_training import _check_run, _eager, _hf_model, _lm_loss
from test_training_parallel import ADAMW, _batches, _optimizer

MICRO = 4
ROWS = 8  # 2 rows a micro-batch: dp:2 splits them


@pytest.fixture(scope="module")
def step():
    """A 2-layer Llama step captured for 4 micro-batches, and its batches."""
    model = _hf_model("llama", num_hidden_layers=2)
    batches = _batches(2, rows=ROWS)
    trainer = plait.compile_training(
        model, batches[0], pipeline="canonicalize,cse,dce", accumulation=MICRO, **ADAMW
    )
    return model, batches, trainer.module


@pytest.fixture(scope="module")
def four(step):
    """Every mesh of 4 devices, priced without a budget."""
    return Parallelize(microbatches=MICRO, devices=4).price_meshes(step[2].clone())


def test_the_meshes_of_n_devices_are_every_factorization():
    assert sorted(meshes(4)) == [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)]
    assert meshes(1) == [(1, 1, 1)]


def test_without_a_budget_the_fastest_priced_mesh_is_chosen(step, four):
    priced = four
    assert {(c.dp, c.tp, c.pp) for c in priced} == set(meshes(4)) and all(
        c.seconds > 0 and c.peak > 0 for c in priced if c.priced
    )
    assert any(c.pp > 1 for c in priced if c.priced) and any(c.pp == 1 for c in priced)
    fastest = min((c for c in priced if c.priced), key=lambda c: c.seconds)
    plan = step[2].clone()
    Parallelize(microbatches=MICRO, devices=4).apply(None, plan)
    record = plan.attributes[MESH_PLAN_ATTR].data
    assert record.startswith(f"4 devices, no memory budget, {MICRO} micro-batches on cpu: ")
    assert f"chosen {fastest.label}: " in record
    assert record.count(" | ") == len(priced) - 2  # every other mesh, listed
    rows = dict(memory_plan(estimate(plan, Target(load("cpu")), _first_function(plan))))
    assert rows["mesh plan"].endswith(f"chosen {fastest.describe()}")  # as plait estimate shows it
    assert rows["meshes considered"].count(" | ") == len(priced) - 2


def _first_function(module) -> str:
    return next(iter(module.ops)).sym_name.data


def test_auto_prices_1f1b_and_interleaved_while_more_stages_per_rank_pay(step, four):
    """schedule=auto: each pipeline mesh priced with 1F1B and with interleaved
    V = 2, 3, ... stages per rank, stopping at the first V no faster than the
    best before it (or that the step's boundaries cannot take)."""
    pipelines = {(c.dp, c.tp, c.pp) for c in four if c.pp > 1}
    assert pipelines == {(1, 1, 4), (2, 1, 2), (1, 2, 2)}
    for mesh in pipelines:
        runs = [c for c in four if (c.dp, c.tp, c.pp) == mesh]
        assert all(c.priced for c in runs) and (runs[0].schedule, runs[0].virtual) == ("1f1b", 1)
        assert [(c.schedule, c.virtual) for c in runs[1:]] == [
            ("interleaved", v) for v in range(2, len(runs) + 1)
        ]
        for before, after in zip(runs, runs[1:-1]):  # each V kept going was faster
            assert after.seconds < before.seconds
    # the 2-layer step has 4 residual boundaries: pp:4 cannot take 8 stages
    assert len([c for c in four if c.pp == 4]) == 1
    assert all(
        len([c for c in four if (c.dp, c.tp, c.pp) == m]) > 1 for m in pipelines - {(1, 1, 4)}
    )
    chosen = Parallelize(microbatches=MICRO, devices=4).choose(four)
    plan = step[2].clone()
    Parallelize(microbatches=MICRO, devices=4).apply(None, plan)
    assert f"chosen {chosen.label}: " in plan.attributes[MESH_PLAN_ATTR].data
    if chosen.pp > 1:  # the step runs the chosen schedule
        applied = pipeline_plan(plan)
        assert (applied.schedule, applied.virtual) == (chosen.schedule, chosen.virtual)


def test_a_named_schedule_is_the_only_one_priced(step):
    for schedule in ("gpipe", "interleaved"):
        priced = Parallelize(devices=2, microbatches=MICRO, schedule=schedule).price_meshes(
            step[2].clone()
        )
        pipelined = [c for c in priced if c.pp > 1]
        assert pipelined and {c.schedule for c in pipelined} == {schedule}
    with pytest.raises(OptionError, match=r"schedule .zb. is not one of auto, gpipe"):
        Parallelize(devices=2, schedule="zb")


def test_a_budget_below_the_fastest_mesh_chooses_the_fastest_that_fits(step, four):
    """The budget is just under the fastest mesh's peak: a slower mesh that
    fits is chosen. (A choice that ignored the budget would pick the faster.)"""
    _, _, module = step
    fastest = min((c for c in four if c.priced), key=lambda c: c.seconds)
    budget = fastest.peak - 1
    choice = Parallelize(microbatches=MICRO, devices=4, memory=budget)
    priced = choice.price_meshes(module.clone())
    chosen = choice.choose(priced)
    assert chosen.peak <= budget
    assert chosen.seconds == min(c.seconds for c in priced if c.priced and c.peak <= budget)
    assert any(c.seconds < chosen.seconds and c.peak > budget for c in priced if c.priced)
    # under a budget, a pipeline over dp is priced with zero{stage=1} too: less memory, slower
    (plain,), (split,) = (
        [c for c in priced if (c.dp, c.pp, c.zero1, c.virtual) == (2, 2, z, 1)] for z in (0, 1)
    )
    assert split.peak < plain.peak and split.seconds > plain.seconds


def test_a_budget_no_mesh_fits_names_the_least_peak():
    """Meshes priced over the budget (and one the memory plan could not fit,
    with its least peak): the error names the mesh of the least peak."""
    priced = [
        Candidate(1, 1, 2, seconds=1.0, peak=3000.0),
        Candidate(2, 1, 1, peak=2000.0, note="over memory with every ZeRO, remat and offload plan"),
        Candidate(1, 2, 1, note="not applicable: heads do not split"),
    ]
    with pytest.raises(
        PlaitError, match=r"no mesh of 2 devices fits memory 1000 B.*dp:2's, 2000 B"
    ):
        Parallelize(devices=2, memory=1000).choose(priced)
    assert Parallelize(devices=2, memory=3000).choose(priced) is priced[0]


def test_the_chosen_mesh_trains_as_eager(step):
    """compile_training captures the step for parallelize's micro-batches and
    runs the chosen mesh on its worker ranks: losses and parameters equal
    eager AdamW on the whole batch."""
    model, batches, _ = step
    pipeline = f"canonicalize,cse,dce,parallelize{{devices=2,microbatches={MICRO}}}"
    trainer = plait.compile_training(model, batches[0], pipeline=pipeline, **ADAMW)
    try:
        assert math.prod(trainer.mesh.values()) == 2
        expected, _, reference = _eager(
            model, batches, _lm_loss, _optimizer(ADAMW), accumulation=MICRO
        )
        _check_run(trainer, batches, expected, reference)
    finally:
        trainer.close()


def test_parallelize_after_shard_says_what_to_drop(step):
    _, _, module = step
    plan = module.clone()
    Shard(mesh="tp:2").apply(None, plan)
    with pytest.raises(PlaitError, match=r"chooses the mesh itself: drop shard"):
        Parallelize(devices=2).apply(None, plan)
