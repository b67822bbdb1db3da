"""offload: optimizer state in host memory, its update run on the host (on a
thread of its own, overlapping the device's write-backs).

On one rank and on 2 gloo ranks under zero{stage=2} the step trains as eager
AdamW (losses and parameters to 1e-5); the moments are counted as host memory
(trainer.memory(), measured and from the IR), not the device's, whose
measured peak drops by them and is the cost model's; under a budget no ZeRO
stage with remat meets, `shard{solve=ilp,memory}` picks offload and `plait
estimate` shows it (and a budget nothing meets names the least peak, with
offload: tests/test_memory_solve.py)."""

from __future__ import annotations

import re

import plait
import pytest
import torch
from plait.cost.estimate import Target, estimate
from plait.cost.estimate_report import summary
from plait.hardware import load
from plait.ir.attrs import MEMORY_PLAN_ATTR
from plait.ir.text import parse_module, print_module
from plait.ir.training import HOST_OPTIMIZER_STATE, OPTIMIZER_STATE, PARAMETERS
from plait.passes.manager import PassManager
from plait.passes.memory.remat_solve import least_saved
from plait.passes.shard.memory_plan import stage_figures
from plait.runtime.memory import PEAK
from test_memory_solve import HARDWARE, TOLERANCE, _step
from test_remat import Branchy, _adamw
from test_training import _check_run, _eager, _hf_model, _lm_loss
from test_training_parallel import (
    ADAMW,
    DP_CLIP,
    SMALL_BUCKETS,
    _batches,
    _check_parity,
    _run,
)

STEP_COUNT = 8  # bytes: the optimizer's f64 step count stays on the device


def _peak(module) -> float:
    return estimate(module, Target(load(HARDWARE))).schedule.peak_memory


def test_one_rank_trains_as_eager_with_the_moments_in_host_memory():
    model, batches = _hf_model("llama", num_hidden_layers=1), _batches(3)
    base = "canonicalize,cse,dce"
    trainer = plait.compile_training(model, batches[0], lr=1e-3, pipeline=f"{base},offload")
    trainer.measure_memory = True
    losses, _, reference = _eager(model, batches, _lm_loss, _adamw)
    _check_run(trainer, batches, losses, reference)  # losses and final parameters, 1e-5
    held, measured = trainer.memory(), trainer.memory(measured=True)
    moments = 2 * held[PARAMETERS]  # AdamW's two, f32 like the parameters
    assert held[OPTIMIZER_STATE] == measured[OPTIMIZER_STATE] == STEP_COUNT
    assert held[HOST_OPTIMIZER_STATE] == measured[HOST_OPTIMIZER_STATE] == moments
    # the device's peak is the cost model's, and lower by the moments than without offload
    assert measured[PEAK] == _peak(trainer.module)
    # the update runs on the host's thread, one fused call per parameter (a CPU
    # Adam, as DeepSpeed's), which the cost model gives a lane of its own
    assert "self.host('submit', 'plait::adam_update_', " in trainer.code
    assert "lerp_" not in trainer.code
    lanes = {e.lane for e in estimate(trainer.module, Target(load(HARDWARE))).schedule.events}
    assert lanes == {"compute", "host"}
    on_device = trainer.source.clone()
    PassManager.parse(base).run(on_device)
    assert measured[PEAK] <= _peak(on_device) - moments


def test_dp2_zero2_trains_as_eager_with_each_ranks_piece_in_host_memory(tmp_path):
    """2 gloo ranks, ZeRO stage 2 (with clipping): each rank's half of the
    moments is in host memory; its device peak is the cost model's (10%)."""
    model = _hf_model("llama", num_hidden_layers=1)
    shard = f"mesh=dp:2,bucket_mb={SMALL_BUCKETS}"
    then = f",zero{{stage=2,bucket_mb={SMALL_BUCKETS}}},offload"
    run = _run(model, shard, ADAMW, tmp_path, clip=DP_CLIP, then=then)
    _check_parity(run)  # every step's loss and the final parameters, 1e-5
    moments = 2 * 4 * sum(p.numel() for p in model.parameters())
    priced = _peak(run.trainer.module)
    for record in run.measured:
        assert record[OPTIMIZER_STATE] == STEP_COUNT
        assert abs(record[HOST_OPTIMIZER_STATE] - moments / 2) <= 64  # (a piece's padding)
        assert abs(record[PEAK] - priced) <= TOLERANCE * record[PEAK]


# ---- the memory plan ------------------------------------------------------------


@pytest.fixture(scope="module")
def branchy_plans():
    """Branchy's step on dp:2 and the least peak each (stage, offload) reaches."""
    batch = (torch.randn(4, 8), torch.randn(4, 4))
    module = _step(Branchy(), batch).module
    PassManager.parse("shard{mesh=dp:2}").run(module)
    target = Target(load(HARDWARE))
    least = {}
    for stage in range(4):
        for offload in (False, True):
            figures = stage_figures(module, stage, target, 25.0, offload)
            least[stage, offload] = figures.peak(least_saved(figures.graph))
    return batch, least


def _plan(batch, memory: float) -> str:
    pipeline = (
        f"canonicalize,cse,dce,shard{{mesh=dp:2,solve=ilp,hardware={HARDWARE},memory={memory:.0f}}}"
    )
    with pytest.warns(UserWarning, match="sharded by the step rules"):
        trainer = plait.compile_training(Branchy(), batch, pipeline=pipeline)
    rows = dict(summary(estimate(trainer.module, Target(load(HARDWARE)))))
    assert (
        rows["memory plan"]
        == trainer.module.attributes[MEMORY_PLAN_ATTR].data.partition("; considered")[0]
    )
    return rows["memory plan"]


def test_a_budget_zero_and_remat_cannot_meet_picks_offload(branchy_plans):
    batch, least = branchy_plans
    without = min(v for (_, offload), v in least.items() if not offload)
    offloaded = min(v for (_, offload), v in least.items() if offload)
    assert offloaded < without
    chosen = _plan(batch, without - 1)
    assert re.search(r"chosen zero stage \d, .*, offload optimizer state: peak", chosen)
    peak = float(re.search(r": peak ([\d.e+]+) B", chosen)[1])
    assert peak < without and "optimizer state (host)" in chosen
    # with room for the moments on the device, no plan offloads (it is slower)
    assert "offload none" in _plan(batch, 1e12)


def test_offload_twice_is_once_and_what_it_cannot_do_is_refused():
    batch = (torch.randn(4, 8), torch.randn(4, 4))
    captured = _step(Branchy(), batch).module

    def passes(pipeline: str) -> str:
        module = captured.clone()
        PassManager.parse(pipeline).run(module)
        return print_module(module)

    once = passes("offload")
    assert 'tier = "host"' in once and passes("offload,offload") == once
    assert print_module(parse_module(once)) == once  # the dump parses back
    with pytest.raises(plait.PlaitError, match="put zero before offload"):
        passes("shard{mesh=dp:2},offload,zero{stage=1}")
    with pytest.raises(plait.PlaitError, match="SGD without momentum.*drop the offload pass"):
        plait.compile_training(Branchy(), batch, optimizer="sgd", pipeline="offload")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_moments_are_pinned_host_memory_and_the_step_is_eagers():
    model = Branchy().cuda()
    batches = [(torch.randn(4, 8).cuda(), torch.randn(4, 4).cuda()) for _ in range(3)]
    trainer = plait.compile_training(model, batches[0], lr=1e-3, pipeline="canonicalize,offload")
    trainer.measure_memory = True
    losses, _, reference = _eager(model, batches, lambda m, x, y: m(x, y), _adamw)
    _check_run(trainer, batches, losses, reference)
    state = [(key, t) for key, t in trainer._shared.items() if key[0] == "state"]
    moments = [t for (_, name), t in state if name.startswith("optimizer.exp_avg")]
    assert moments and all(t.device.type == "cpu" and t.is_pinned() for t in moments)
    measured = trainer.memory(measured=True)
    assert measured[OPTIMIZER_STATE] == STEP_COUNT and measured[HOST_OPTIMIZER_STATE] > 0
