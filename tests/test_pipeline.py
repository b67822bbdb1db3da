"""Pipeline parallelism for training steps: `pipeline{stages,microbatches,schedule}`.

A 2-layer Llama on pp:2 (two real gloo ranks, from one process) with GPipe,
1F1B and interleaved 1F1B trains as eager torch with AdamW does on the whole
batch, its gradients clipped by their norm over every stage, and so on
pp:2,tp:2 with each schedule and on pp:2,dp:2 (four ranks); the cut
is the best by brute force; the schedules are the textbook ones and cannot
deadlock; bad options are clear errors.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass

import plait
import pytest
import torch
from plait.cost.estimate import Target, estimate
from plait.hardware import Link, load
from plait.ir.errors import PlaitError
from plait.ir.ops import AllReduceOp, GatherIntoOp, ParamOp, RecvOp, ReduceScatterOp, SendOp
from plait.ir.text import parse_module, print_module
from plait.ir.training import BACKWARD, FORWARD, TRAIN_STEP
from plait.passes.manager import PassManager
from plait.passes.shard.pipeline_cost import pipeline_peaks, pipeline_timeline
from plait.passes.shard.pipeline_schedule import (
    DeadlockError,
    gpipe,
    interleaved,
    one_f_one_b,
    parse_action,
    pipeline_plan,
    simulate,
)
from plait.passes.shard.stage_split import StepSplit, function_messages
from plait.passes.shard.stages import best_cuts, stage_sums
from test_training import _close, _eager, _hf_model, _lm_loss
from test_training_parallel import ADAMW, PARAM_ATOL, _batches, _optimizer
from xdsl.dialects import func

STEPS = 10
SAVE_AFTER = 6
MICRO = 4  # micro-batches of one row each
STEPS_OF = {"interleaved": 4}  # (fewer: the test's time)
MEASURED = ("gpipe", "1f1b")  # schedules whose last step's memory is measured
CLEAN = "canonicalize,cse,dce"
CLIP = 0.05  # clip_grad_norm: below these runs' gradient norms, so every step clips


def _pipeline(schedule: str, stages: int = 2, micro: int = MICRO, virtual: int = 1) -> str:
    chunks = f",virtual={virtual}" if virtual > 1 else ""
    return f"{CLEAN},pipeline{{stages={stages},microbatches={micro},schedule={schedule}{chunks}}}"


@dataclass
class Run:
    trainer: plait.Trainer
    losses: list[torch.Tensor]
    state: dict[str, torch.Tensor]
    checkpoint: object  # saved after SAVE_AFTER steps
    measured: list[dict[str, int]]  # each rank's memory in the last step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both schedules' runs from one capture (1F1B resumes GPipe's initial
    checkpoint with its own pipeline), and eager's on the same batches."""
    tmp = tmp_path_factory.mktemp("pipeline")
    model = _hf_model("llama", num_hidden_layers=2)
    batches = _batches(STEPS, rows=4)
    expected, _, reference = _eager(model, batches, _lm_loss, _optimizer(ADAMW), clip=CLIP)
    first = plait.compile_training(
        model, batches[0], pipeline=_pipeline("gpipe"), clip_grad_norm=CLIP, **ADAMW
    )
    start = first.save(tmp / "start")
    trainers = {
        "gpipe": first,
        "1f1b": plait.load_training(start, pipeline=_pipeline("1f1b")),
        "interleaved": plait.load_training(start, pipeline=_pipeline("interleaved", virtual=2)),
    }
    out = {}
    for schedule, trainer in trainers.items():
        losses = []
        try:
            for step, batch in enumerate(batches[: STEPS_OF.get(schedule, STEPS)]):
                if step == SAVE_AFTER:
                    trainer.save(tmp / schedule)
                trainer.measure_memory = schedule in MEASURED and step == STEPS - 1
                losses.append(trainer.step(*batch))
            state = trainer.state_dict()
            measured = trainer.memory(measured=True) if schedule in MEASURED else None
        finally:
            trainer.close()
        out[schedule] = Run(trainer, losses, state, tmp / schedule, measured)
    return out, batches, expected, reference, start


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_pipelined_steps_match_eager_adamw_on_the_whole_batch(runs, schedule):
    out, batches, expected, reference, _ = runs
    run = out[schedule]
    steps = STEPS_OF.get(schedule, STEPS)
    if steps != STEPS:
        model = _hf_model("llama", num_hidden_layers=2)
        expected, _, reference = _eager(
            model, batches[:steps], _lm_loss, _optimizer(ADAMW), clip=CLIP
        )
    assert run.trainer.mesh == {"pp": 2} and len(run.losses) == steps
    for step, (loss, want) in enumerate(zip(run.losses, expected)):
        _close(loss, want, f"{schedule}: loss of step {step}")
    for name, tensor in reference.state_dict().items():
        _close(run.state[name], tensor, f"{schedule}: {name} after {steps} steps")


def test_a_pipelined_checkpoint_continues_on_one_rank(runs):
    """The checkpoint gathers every stage's state whole, by the model's names."""
    out, batches, *_ = runs
    run = out["1f1b"]
    resumed = plait.load_training(run.checkpoint, pipeline=CLEAN)
    assert resumed.steps == SAVE_AFTER
    losses = [resumed.step(*batch) for batch in batches[SAVE_AFTER:]]
    for step, (loss, want) in enumerate(zip(losses, run.losses[SAVE_AFTER:]), SAVE_AFTER):
        _close(loss, want, f"resumed loss of step {step}")
    state = resumed.state_dict()
    for name, tensor in run.state.items():
        _close(state[name], tensor, f"resumed {name}")


TP_STEPS = 2


@pytest.fixture(scope="module")
def tp_eager(runs):
    """Eager AdamW's first TP_STEPS steps: losses and the model after them."""
    _, batches, *_ = runs
    model = _hf_model("llama", num_hidden_layers=2)
    expected, _, reference = _eager(
        model, batches[:TP_STEPS], _lm_loss, _optimizer(ADAMW), clip=CLIP
    )
    return expected, reference


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_pipeline_stages_of_a_tensor_parallel_step_match_eager(runs, tp_eager, schedule):
    """shard{mesh=tp:2} then pipeline: 4 ranks, each stage's tp:2 pair
    (interleaved: 4 stages, two on each pair)."""
    _, batches, _, _, start = runs
    expected, reference = tp_eager
    stages = _pipeline(schedule, virtual=2 if schedule == "interleaved" else 1)
    pipeline = f"{CLEAN},shard{{mesh=tp:2}},{stages.removeprefix(CLEAN + ',')}"
    trainer = plait.load_training(start, pipeline=pipeline)
    assert trainer.mesh == {"tp": 2, "pp": 2}
    try:
        losses = [trainer.step(*batch) for batch in batches[:TP_STEPS]]
        state = trainer.state_dict()
    finally:
        trainer.close()
    for step, (loss, want) in enumerate(zip(losses, expected)):
        _close(loss, want, f"pp:2,tp:2, {schedule}: loss of step {step}")
    _check_parameters(state, reference, f"pp:2,tp:2, {schedule}")


def _check_parameters(state: dict, reference, label: str) -> None:
    """Every parameter within PARAM_ATOL of eager's (tp's bound, as test_training_parallel)."""
    for name, tensor in reference.state_dict().items():
        error = (state[name].double() - tensor.double()).abs().max().item()
        assert error <= PARAM_ATOL, f"{label}: {name}: max error {error:.3g}"


DP_STEPS = 4


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory):
    """shard{mesh=dp:2} then 1F1B over 2 micro-batches: 4 ranks, each stage on
    a dp:2 pair, each micro-batch's rows split over the pair; saved before its
    last step."""
    model = _hf_model("llama", num_hidden_layers=2)
    batches = _batches(DP_STEPS, rows=4)
    expected, _, reference = _eager(model, batches, _lm_loss, _optimizer(ADAMW), clip=CLIP)
    stages = _pipeline("1f1b", micro=2).removeprefix(CLEAN + ",")
    pipeline = f"{CLEAN},shard{{mesh=dp:2}},{stages}"
    trainer = plait.compile_training(
        model, batches[0], pipeline=pipeline, clip_grad_norm=CLIP, **ADAMW
    )
    saved = tmp_path_factory.mktemp("pipeline_dp") / "checkpoint"
    losses = []
    try:
        for step, batch in enumerate(batches):
            if step == DP_STEPS - 1:
                trainer.save(saved)
            losses.append(trainer.step(*batch))
        state = trainer.state_dict()
    finally:
        trainer.close()
    return trainer, batches, losses, state, saved, expected, reference


def test_pipeline_stages_of_a_data_parallel_step_match_eager(data_parallel_run):
    trainer, _, losses, state, _, expected, reference = data_parallel_run
    assert trainer.mesh == {"dp": 2, "pp": 2}
    for step, (loss, want) in enumerate(zip(losses, expected)):
        _close(loss, want, f"pp:2,dp:2: loss of step {step}")
    _check_parameters(state, reference, "pp:2,dp:2")


def test_each_stage_reduces_its_own_gradients_over_dp_once_per_step(data_parallel_run):
    """No gradient crosses dp in a micro-batch's backward; each rank's update
    starts one bucket's all-reduce of exactly its stage's accumulators."""
    module = data_parallel_run[0].module
    names = _functions(module)
    for s in (0, 1):
        for o in names[f"backward_stage{s}"].walk():
            assert not isinstance(o, AllReduceOp) or o.input.type.shape == (), o
        update = list(names[f"update_stage{s}"].walk())
        (bucket,) = [o for o in update if isinstance(o, AllReduceOp) and o.axis.data == "dp"]
        assert bucket.is_async is not None
        (norm,) = [o for o in update if isinstance(o, AllReduceOp) and o.axis.data == "pp"]
        assert norm.input.type.shape == ()  # clipping's sum of squares, over every stage
        held = [
            o.result.type.nbytes
            for o in update
            if isinstance(o, ParamOp) and o.weight_name.startswith("grad_accumulator.")
        ]
        assert bucket.input.type.nbytes == sum(held) > 0


def test_small_dp_buckets_are_regrouped_by_stage(data_parallel_run):
    """shard{bucket_mb}'s buckets, each cut by stage: several per update, each
    of that rank's accumulators, every one once."""
    stages = _pipeline("1f1b", micro=2).removeprefix(CLEAN + ",")
    pipeline = f"{CLEAN},shard{{mesh=dp:2,bucket_mb=0.05}},{stages}"
    module = PassManager.parse(pipeline).run(data_parallel_run[0].source.clone())
    names = _functions(module)
    for s in (0, 1):
        update = list(names[f"update_stage{s}"].walk())
        reduces = [o for o in update if isinstance(o, AllReduceOp) and o.axis.data == "dp"]
        assert all(o.is_async is not None for o in reduces)
        buckets = [o.input.type.nbytes for o in reduces]
        held = [
            o.result.type.nbytes
            for o in update
            if isinstance(o, ParamOp) and o.weight_name.startswith("grad_accumulator.")
        ]
        assert 2 <= len(buckets) < len(held) and sum(buckets) == sum(held), (s, buckets)


def test_a_data_parallel_pipelined_checkpoint_continues_on_one_rank(data_parallel_run):
    _, batches, losses, _, saved, *_ = data_parallel_run
    resumed = plait.load_training(saved, pipeline=CLEAN)
    assert resumed.steps == DP_STEPS - 1
    _close(resumed.step(*batches[-1]), losses[-1], "resumed loss", rtol=1e-6)


def test_zero1_splits_each_stages_optimizer_state_over_its_dp_pair(data_parallel_run, tmp_path):
    """zero{stage=1} between shard and pipeline: each rank's update
    reduce-scatters its stages' accumulators (no gradient all-reduce: it
    reads only its halves), runs on its half of its stages' moments and
    gathers the updated halves into the parameters, one gather per
    parameter; the steps equal eager's (clipped, the norm from the halves),
    and a checkpoint saved before the last step continues on one rank."""
    plain, batches, _, _, _, expected, reference = data_parallel_run
    stages = _pipeline("1f1b", micro=2).removeprefix(CLEAN + ",")
    pipeline = f"{CLEAN},shard{{mesh=dp:2}},zero{{stage=1}},{stages}"
    model = _hf_model("llama", num_hidden_layers=2)
    trainer = plait.compile_training(
        model, batches[0], pipeline=pipeline, clip_grad_norm=CLIP, **ADAMW
    )
    losses = []
    try:
        for step, batch in enumerate(batches):
            if step == DP_STEPS - 1:
                saved = trainer.save(tmp_path / "zero1")
            losses.append(trainer.step(*batch))
        state = trainer.state_dict()
    finally:
        trainer.close()
    for step, (loss, want) in enumerate(zip(losses, expected)):
        _close(loss, want, f"pp:2,dp:2,zero1: loss of step {step}")
    _check_parameters(state, reference, "pp:2,dp:2,zero1")
    whole = plain.memory()["optimizer state"]
    assert trainer.memory()["optimizer state"] <= whole / 2 + 64 * len(state), whole
    names = _functions(trainer.module)
    gathers = [o for s in (0, 1) for o in names[f"update_stage{s}"].walk()]
    assert sum(isinstance(o, GatherIntoOp) for o in gathers) == len(list(model.parameters()))
    for s in (0, 1):
        update = list(names[f"update_stage{s}"].walk())
        (scatter,) = [o for o in update if isinstance(o, ReduceScatterOp)]
        held = sum(
            o.result.type.nbytes
            for o in update
            if isinstance(o, ParamOp) and o.weight_name.startswith("grad_accumulator.")
        )
        assert scatter.input.type.nbytes >= held and scatter.is_async is not None
        reduced = [o.input.type.shape for o in update if isinstance(o, AllReduceOp)]
        assert all(len(shape) <= 1 and math.prod(shape) < 64 for shape in reduced), reduced
    resumed = plait.load_training(saved, pipeline=CLEAN)
    _close(resumed.step(*batches[-1]), losses[-1], "zero1 resumed on one rank", rtol=1e-6)


def test_plait_estimate_shows_a_data_parallel_pipeline(data_parallel_run, capsys):
    from plait.cli import main

    assert main(["estimate", str(data_parallel_run[4]), "--hardware", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mesh dp:2,pp:2, training step" in out
    assert "1f1b, 2 stages x 2 micro-batches" in out
    assert "stage 1 actions:         F0 B0 F1 B1 U" in out and "pipelined step:" in out


def _functions(module) -> dict[str, func.FuncOp]:
    return {f.sym_name.data: f for f in module.ops if isinstance(f, func.FuncOp)}


def test_the_ir_shows_stages_messages_and_schedule(runs):
    out, *_ = runs
    module = out["1f1b"].trainer.module
    plan = pipeline_plan(module)
    assert (plan.stages, plan.microbatches, plan.schedule) == (2, MICRO, "1f1b")
    assert plan.actions == one_f_one_b(2, MICRO)
    names = _functions(module)
    assert set(names) == {
        f"{k}_stage{s}" for k in ("forward", "backward", "update") for s in (0, 1)
    }
    # the residual stream crosses once each way: the hidden state up, its gradient down
    for function, op, peer in [
        ("forward_stage0", SendOp, 1),
        ("forward_stage1", RecvOp, 0),
        ("backward_stage1", SendOp, 0),
        ("backward_stage0", RecvOp, 1),
    ]:
        found = [o for o in names[function].walk() if isinstance(o, (SendOp, RecvOp))]
        assert [(type(o), o.peer.value.data) for o in found] == [(op, peer)], function
        assert list(found[0].operands or found[0].results)[0].type.shape == (1, 16, 64)
    text = print_module(module)
    assert '[["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3", "U"]' in text
    assert print_module(parse_module(text)) == text


def test_interleaved_ranks_run_two_stages_each_and_wrap_around(runs):
    """Stages 0 and 2 on rank 0, 1 and 3 on rank 1: stage 1 sends its hidden
    state to stage 2, back on rank 0; each rank has one update."""
    out, *_ = runs
    module = out["interleaved"].trainer.module
    plan = pipeline_plan(module)
    assert (plan.virtual, plan.stages_of(0), plan.stages_of(1)) == (2, [0, 2], [1, 3])
    names = _functions(module)
    assert {f"update_stage{r}" for r in (0, 1)} <= set(names) and "update_stage2" not in names
    peers = {
        function: [
            (type(o).__name__, o.peer.value.data)
            for o in names[function].walk()
            if isinstance(o, (SendOp, RecvOp))
        ]
        for function in ("forward_stage1", "forward_stage2")
    }
    assert peers == {
        "forward_stage1": [("RecvOp", 0), ("SendOp", 0)],
        "forward_stage2": [("RecvOp", 1), ("SendOp", 1)],
    }
    cut = "after model.layers.0.self_attn.o_proj, after model.layers.0.mlp.down_proj, after "
    assert f'cut = "{cut}model.layers.1.self_attn.o_proj"' in print_module(module)


def test_parameters_live_on_one_stage_each(runs):
    out, *_ = runs
    module = out["gpipe"].trainer.module
    names = _functions(module)
    held = [
        {
            o.weight_name
            for f in (f"forward_stage{s}", f"update_stage{s}")
            for o in names[f].walk()
            if isinstance(o, ParamOp)
        }
        for s in (0, 1)
    ]
    assert "model.embed_tokens.weight" in held[0] - held[1]
    assert "lm_head.weight" in held[1] - held[0]
    assert "optimizer.exp_avg.lm_head.weight" in held[1] - held[0]
    assert {"model.layers.0.mlp.up_proj.weight"} <= held[0] - held[1]
    assert {"model.layers.1.mlp.up_proj.weight"} <= held[1] - held[0]


@pytest.mark.parametrize("schedule", MEASURED)
def test_each_ranks_predicted_peak_is_its_measured_peak(runs, schedule):
    """trainer.memory(measured=True) on each rank: its stages' state plus the
    action that needed the most with the kept activations it held; the cost
    model's `pipeline_peaks` predicts it within 2%. GPipe holds all four
    micro-batches' activations on stage 0, 1F1B two: the saved bytes differ."""
    out, *_ = runs
    run = out[schedule]
    measured = run.measured
    predicted = pipeline_peaks(run.trainer.module, Target(load("cpu")))
    assert len(measured) == len(predicted) == 2
    for record, peak in zip(measured, predicted):
        assert record["optimizer state"] > 0
        assert abs(peak - record["peak"]) <= 0.02 * record["peak"], (peak, record)
    if schedule == "gpipe":
        held = [out[s].measured[0]["saved activations"] for s in MEASURED]
        assert held[0] > 2 * held[1], held


def test_plait_train_resumes_the_stages_under_torchrun(runs, capfd):
    """`plait train --resume CKPT --nproc 2`: each torchrun rank runs its
    stage's actions; its loss is the same step's on one rank."""
    import re

    from plait.cli import main

    checkpoint = runs[0]["1f1b"].checkpoint  # (saved after SAVE_AFTER steps)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(SAVE_AFTER))
    one_rank = plait.load_training(checkpoint, pipeline=CLEAN)
    expected = one_rank.step(ids, torch.ones_like(ids), ids)  # (`plait train`'s step #6 batch)
    argv = ["train", "--resume", str(checkpoint), "--steps", "1", "--batch", "4", "--seq", "16"]
    assert main([*argv, "--nproc", "2"]) == 0
    err = capfd.readouterr().err
    (loss,) = re.findall(rf"^step 1/1 \(#{SAVE_AFTER}\): loss (\S+),", err, re.M)
    _close(torch.tensor(float(loss)), expected, "plait train, pp:2 under torchrun")


# ---- schedules ------------------------------------------------------------------


def test_gpipe_and_1f1b_have_the_textbook_order():
    assert gpipe(2, 3) == [["F0", "F1", "F2", "B0", "B1", "B2", "U"]] * 2
    assert one_f_one_b(4, 6) == [
        ["F0", "F1", "F2", "F3", "B0", "F4", "B1", "F5", "B2", "B3", "B4", "B5", "U"],
        ["F0", "F1", "F2", "B0", "F3", "B1", "F4", "B2", "F5", "B3", "B4", "B5", "U"],
        ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "F4", "B3", "F5", "B4", "B5", "U"],
        ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3", "F4", "B4", "F5", "B5", "U"],
    ]
    # fewer micro-batches than the warm-up: all forwards first
    assert one_f_one_b(4, 2)[0] == ["F0", "F1", "B0", "B1", "U"]
    # Megatron's interleaved order: 2 ranks x 2 chunks, micro-batches in groups of 2
    assert interleaved(2, 4, 2) == [
        ["F0.0", "F1.0", "F0.1", "F1.1", "F2.0", "B0.1", "F3.0", "B1.1", "F2.1", "B0.0"]
        + ["F3.1", "B1.0", "B2.1", "B3.1", "B2.0", "B3.0", "U"],
        ["F0.0", "F1.0", "F0.1", "B0.1", "F1.1", "B1.1", "F2.0", "B0.0", "F3.0", "B1.0"]
        + ["F2.1", "B2.1", "F3.1", "B3.1", "B2.0", "B3.0", "U"],
    ]


def _chain(stages: int) -> dict:
    """A straight pipeline's messages: activations up in F (tag s from stage s),
    gradients down in B (tag 100 + s to stage s)."""
    messages = {}
    for s in range(stages):
        up, down = s < stages - 1, s > 0
        messages["F", s] = [("recv", s - 1, 0)] * down + [("send", s, 0)] * up
        messages["B", s] = [("recv", 100 + s, 0)] * up + [("send", 99 + s, 0)] * down
    return messages


@pytest.mark.parametrize("make", [gpipe, one_f_one_b])
def test_schedules_run_to_the_end_and_1f1b_keeps_fewer_activations(make):
    times = {(k, s): 1.0 for k in "FB" for s in range(4)}
    timeline = simulate(make(4, 8), times, _chain(4))
    assert timeline.time == pytest.approx(2 * (8 + 3))  # (M + S - 1) slots of F and B
    assert timeline.bubble == pytest.approx(3 / 11)
    alive = max(  # micro-batches forwarded and not yet backwarded, on stage 0
        sum(a[0] == "F" for a in make(4, 8)[0][:i]) - sum(a[0] == "B" for a in make(4, 8)[0][:i])
        for i in range(17)
    )
    assert alive == (8 if make is gpipe else 4)


def test_interleaving_shrinks_the_bubble_as_megatron_says():
    """4 ranks x 2 chunks, 8 micro-batches, each chunk half a stage's work: the
    bubble is (S - 1) / (V M + S - 1), against 1F1B's (S - 1) / (M + S - 1)."""
    stages, virtual, micro = 4, 2, 8
    times = {(k, s): 1 / virtual for k in "FB" for s in range(stages * virtual)}
    timeline = simulate(interleaved(stages, micro, virtual), times, _chain(stages * virtual))
    assert timeline.bubble == pytest.approx(3 / (virtual * micro + 3))
    assert timeline.time == pytest.approx(2 * (micro + 3 / virtual))


def test_a_message_reaches_its_receiver_after_the_links_latency_and_bytes():
    """Two stages, one micro-batch of 1 s actions, each message 2e6 bytes on a
    link of 1 ms latency and 1e9 bytes/s: the hidden state arrives 3 ms after
    F0 ends, its gradient 3 ms after stage 1's B0."""
    link = Link("test", None, bandwidth=1e9, latency=1e-3)
    messages = {
        key: [(what, tag, 2_000_000) for what, tag, _ in talk] for key, talk in _chain(2).items()
    }
    times = {(k, s): 1.0 for k in "FB" for s in range(2)}
    timeline = simulate(gpipe(2, 1), times, messages, link)
    assert timeline.spans[1][0][1] == pytest.approx(1.003)  # stage 1's F0 starts
    assert timeline.spans[0][1][1] == pytest.approx(3.006)  # stage 0's B0 starts
    assert timeline.time == pytest.approx(4.006)
    assert simulate(gpipe(2, 1), times, messages).time == pytest.approx(4.0)


def test_a_schedule_that_waits_for_a_message_never_sent_deadlocks():
    backward_first = [["B0", "F0", "U"], ["F0", "B0", "U"]]  # each waits for the other
    with pytest.raises(DeadlockError, match="rank 0 waits in B0"):
        simulate(backward_first, {}, _chain(2))


def test_every_send_of_the_compiled_stages_has_its_recv(runs):
    out, *_ = runs
    for schedule, run in out.items():
        module = run.trainer.module
        messages = function_messages(module)
        plan = pipeline_plan(module)
        counts: dict = {}  # (tag, micro-batch) -> [sends, recvs]
        for rank, actions in enumerate(plan.actions):
            for action in actions:
                kind, index, chunk = parse_action(action)
                for what, tag, _ in messages.get((kind, plan.stage_of(rank, chunk)), []):
                    counts.setdefault((tag, index), [0, 0])[what == "recv"] += 1
        # each boundary between stages: its hidden state up, its gradient down
        tags = range(2 * (plan.stages * plan.virtual - 1))
        assert sorted(counts) == [(tag, i) for tag in tags for i in range(MICRO)], schedule
        assert all(c == [1, 1] for c in counts.values()), schedule
        simulate(plan.actions, {}, messages)  # (raises if it deadlocks)
        sizes = {  # a send and its recv carry one micro-batch's [1, seq, hidden] floats
            tag: {size for talk in messages.values() for _, t, size in talk if t == tag}
            for tag in tags
        }
        assert all(found == {_boundary_bytes(runs)} for found in sizes.values()), sizes


def _boundary_bytes(runs) -> int:
    """One micro-batch's hidden state (or its gradient): [1, seq, hidden] floats."""
    _, batches, *_ = runs
    return 4 * batches[0][0].shape[1] * _hf_model("llama").config.hidden_size


def test_the_predicted_step_waits_for_each_message_on_the_pp_link(runs):
    """GPipe on 2 stages: the step's critical path crosses the boundary twice
    per micro-batch's way up and down, so pricing messages on cpu's gloo link
    lengthens the step by at least two messages' time."""
    out, *_ = runs
    module = out["gpipe"].trainer.module
    cpu = load("cpu")
    timeline = pipeline_timeline(module, Target(cpu))
    (link,) = cpu.links
    instant = Link("instant", None, bandwidth=float("inf"), latency=0.0)
    free = pipeline_timeline(module, Target(dataclasses.replace(cpu, links=(instant,))))
    one = link.latency + _boundary_bytes(runs) / link.bandwidth
    assert timeline.time - free.time >= 2 * one - 1e-12


# ---- the cut --------------------------------------------------------------------


def test_the_cut_is_the_best_by_brute_force(runs):
    """Every way to cut the 2-layer Llama's 5 residual segments into 2 or 3
    stages, priced op by op as the stages it makes: none is better balanced
    than the dynamic program's."""
    out, *_ = runs
    module = PassManager.parse(CLEAN).run(out["gpipe"].trainer.source.clone())
    times = {r.op: r.time for r in estimate(module, Target(load("cpu")), TRAIN_STEP).ops}
    step = StepSplit(_functions(module)[TRAIN_STEP])
    costs = step.segment_costs(times)
    assert len(costs) == 5

    def stage_times(cuts):
        totals = [0.0] * len(cuts)
        for op, s in step.stage_of(list(cuts)).items():
            if step.phases.get(op) in (FORWARD, BACKWARD):
                totals[s] += times.get(op, 0.0)
        return totals

    for stages in (2, 3):
        every = [(0, *rest) for rest in itertools.combinations(range(1, 5), stages - 1)]
        brute = min(max(stage_times(c)) for c in every)
        chosen = best_cuts(costs, stages)
        assert max(stage_times(chosen)) == pytest.approx(brute, rel=1e-9)
        assert max(stage_sums(costs, chosen)) == pytest.approx(brute, rel=1e-9)
    mean = sum(costs) / 2
    best = min(max(stage_times(c)) for c in [(0, k) for k in range(1, 5)]) / mean
    assert f"imbalance {best:.3f}" in print_module(out["gpipe"].trainer.module)


def test_best_cuts_balances_uneven_segments():
    assert best_cuts([1, 1, 1, 1], 2) == [0, 2]
    assert best_cuts([5, 1, 1, 1, 1, 1], 2) == [0, 1]
    assert best_cuts([1, 2, 3, 4, 5], 3) == [0, 3, 4]


# ---- errors ---------------------------------------------------------------------


def test_more_stages_than_residual_segments_is_an_error(runs):
    with pytest.raises(PlaitError, match=r"at most 5 non-empty stages; use stages <= 5"):
        plait.load_training(
            runs[0]["1f1b"].checkpoint, pipeline=_pipeline("gpipe", stages=6, micro=MICRO)
        )


def test_microbatches_that_do_not_split_the_batch_are_an_error():
    model = _hf_model("llama", num_hidden_layers=1)
    batch = _batches(1, rows=4)[0]
    with pytest.raises(PlaitError, match=r"microbatches=3.*4 rows; give microbatches that divide"):
        plait.compile_training(model, batch, pipeline=_pipeline("1f1b", micro=3), **ADAMW)


def test_a_checkpoint_resumed_with_other_microbatches_is_an_error(runs):
    with pytest.raises(PlaitError, match=r"captured for 4 micro-batch\(es\).*use microbatches=4"):
        plait.load_training(runs[0]["1f1b"].checkpoint, pipeline=_pipeline("gpipe", micro=2))


def test_accumulation_beside_the_pipeline_is_an_error():
    model = _hf_model("llama", num_hidden_layers=1)
    batch = _batches(1, rows=4)[0]
    with pytest.raises(PlaitError, match="accumulation=2 and pipeline"):
        plait.compile_training(model, batch, pipeline=_pipeline("1f1b"), accumulation=2)
    with pytest.raises(PlaitError, match="schedule 'zb' is not one of gpipe, 1f1b"):
        plait.compile_training(model, batch, pipeline=_pipeline("zb"))


@pytest.mark.parametrize(
    "stage, why",
    [(2, "gradients are reduce-scattered"), (3, "'model.embed_tokens.weight' is split")],
)
def test_pipeline_after_zero_2_or_3_is_an_error(stage, why):
    model = _hf_model("llama", num_hidden_layers=1)
    batch = _batches(1, rows=4)[0]
    stages = _pipeline("1f1b", micro=2).removeprefix(CLEAN + ",")
    with pytest.raises(PlaitError, match=rf"after zero{{stage={stage}}} is not .*{why}.*stage=1"):
        plait.compile_training(
            model, batch, pipeline=f"{CLEAN},shard{{mesh=dp:2}},zero{{stage={stage}}},{stages}"
        )


def test_a_weight_read_on_two_stages_is_an_error():
    model = _hf_model("llama", num_hidden_layers=1, tie_word_embeddings=True)
    batch = _batches(1, rows=4)[0]
    with pytest.raises(PlaitError, match=r"read on pipeline stages 0 and 1.*untie it"):
        plait.compile_training(model, batch, pipeline=_pipeline("gpipe", micro=2), **ADAMW)


def test_plait_estimate_shows_the_schedule_and_its_bubble(runs, tmp_path, capsys):
    from plait.cli import main

    trace = tmp_path / "pipeline.json"
    checkpoint = str(runs[0]["1f1b"].checkpoint)
    assert main(["estimate", checkpoint, "--hardware", "cpu", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "1f1b, 2 stages x 4 micro-batches; cut after model.layers.0.mlp.down_proj" in out
    assert "stage 0 actions:         F0 F1 B0 F2 B1 F3 B2 B3 U" in out
    assert "stage 1 actions:         F0 B0 F1 B1 F2 B2 F3 B3 U" in out
    assert "pipelined step:" in out and "bubble" in out
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [(e["pid"], e["name"]) for e in events if e.get("ph") == "X"]
    assert len(spans) == 18 and (1, "B3") in spans
