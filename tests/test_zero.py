"""zero{stage=1|2|3} over the data axis of a sharded step, on real gloo ranks:
every step's loss and the final parameters equal eager torch + AdamW; each
rank holds 1/N of the optimizer state (stage 1), of the gradients (2) and of
the parameters (3); checkpoints hold whole tensors and resume on one rank or
another mesh; the step's IR prints and parses back, and a dump taken after
shard replays zero."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import plait
import pytest
import torch
from plait.ir.attrs import REMAT_ATTR
from plait.ir.errors import PlaitError
from plait.ir.ops import AllGatherOp, AllReduceOp, GatherIntoOp, ReduceScatterOp, ReshapeOp
from plait.ir.text import parse_module, print_module, verify_module
from plait.ir.training import HOST_OPTIMIZER_STATE, OPTIMIZER_STATE, SAVED, check_state_order
from plait.passes.manager import PassManager
from plait.passes.memory.remat_solve import RematError
from plait.passes.pipeline import PipelineError, parse_pipeline
from plait.passes.shard.zero import Zero, ZeroError
from plait.runtime import artifact
from test_training import MLP, _check_run, _eager, _hf_model, _mlp_batches
from test_training_parallel import (
    ADAMW,
    DP_CLIP,
    SAVE_AFTER,
    SMALL_BUCKETS,
    Run,
    _check_continues_on_one_rank,
    _check_parity,
    _llama,
    _loss_position,
    _optimizer,
    _step_ops,
)
from test_training_parallel import _run as _sharded_run


def _zero(stage: int) -> str:
    return f",zero{{stage={stage},bucket_mb={SMALL_BUCKETS}}}"


def _pipeline(mesh: str, stage: int) -> str:
    return f"canonicalize,cse,dce,shard{{mesh={mesh},bucket_mb={SMALL_BUCKETS}}}{_zero(stage)}"


PARITY_STEPS = 10


def _run(mesh: str, stage: int, tmp, *, accumulation: int = 1) -> Run:
    """A zero run next to eager's (AdamW, clipped) for PARITY_STEPS steps,
    saving a checkpoint after SAVE_AFTER steps."""
    shard = f"mesh={mesh},bucket_mb={SMALL_BUCKETS}"
    return _sharded_run(
        _llama(1),
        shard,
        ADAMW,
        tmp,
        accumulation=accumulation,
        clip=DP_CLIP,
        then=_zero(stage),
        steps=PARITY_STEPS,
    )


@pytest.fixture(scope="module")
def zero1(tmp_path_factory):
    """Stage 1 with gradient accumulation over 2 micro-batches."""
    return _run("dp:2", 1, tmp_path_factory.mktemp("zero1"), accumulation=2)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    """Stage 2 with accumulation: the accumulators hold pieces too."""
    return _run("dp:2", 2, tmp_path_factory.mktemp("zero2"), accumulation=2)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return _run("dp:2", 3, tmp_path_factory.mktemp("zero3"))


@pytest.fixture(scope="module")
def zero3_tp(zero2):
    """4 ranks, the pieces of tp-local tensors: zero2's checkpoint (dp:2, after
    SAVE_AFTER steps, accumulating) resumed under zero{stage=3} on dp:2,tp:2,
    each rank reading its piece of the whole parameters and moments, for the
    remaining steps."""
    trainer = plait.load_training(zero2.checkpoint, pipeline=_pipeline("dp:2,tp:2", 3))
    batches = zero2.batches[SAVE_AFTER:]
    try:
        losses = [trainer.step(*batch) for batch in batches[:-1]]
        trainer.measure_memory = True  # the last step's
        losses.append(trainer.step(*batches[-1]))
        state = trainer.state_dict()
        measured = trainer.memory(measured=True)
    finally:
        trainer.close()
    return replace(
        zero2,
        trainer=trainer,
        losses=losses,
        state=state,
        expected=zero2.expected[SAVE_AFTER:],
        checkpoint=None,
        measured=measured,
    )


# ---- parity -------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["zero1", "zero2", "zero3", "zero3_tp"])
def test_zero_steps_match_eager(run, request):
    _check_parity(request.getfixturevalue(run))


# ---- memory per rank --------------------------------------------------------------


def _halves(model) -> int:
    """Bytes of a rank's half of every parameter (flat, padded to an even count)."""
    return sum(math.ceil(p.numel() / 2) * 4 for p in model.parameters())


STEP_COUNT = 8  # optimizer.step, an f64


@pytest.mark.parametrize("run, stage", [("zero1", 1), ("zero2", 2), ("zero3", 3)])
def test_zero_halves_what_its_stage_shards_per_rank(run, stage, request):
    run = request.getfixturevalue(run)
    memory = run.trainer.memory()
    whole = sum(p.numel() * 4 for p in run.model.parameters())
    assert memory["parameters"] == (_halves(run.model) if stage == 3 else whole)
    assert memory["optimizer state"] == 2 * _halves(run.model) + STEP_COUNT  # AdamW: 2 moments
    assert memory["gradients"] == (_halves(run.model) if stage >= 2 else whole)
    # the stage 1 and 2 runs accumulate over 2 micro-batches, stage 3's does not
    accumulators = {1: whole, 2: _halves(run.model), 3: 0}[stage]
    assert memory["gradient accumulators"] == accumulators


@pytest.mark.parametrize("run", ["zero1", "zero2", "zero3", "zero3_tp"])
def test_zero_measured_memory_is_the_predicted_memory(run, request):
    """What each rank allocated in a step holds the pieces the types say
    (parameters, optimizer state, accumulators: the halving above is what the
    ranks hold), and its peak is the estimate's within 10%."""
    from test_training_memory import predict

    run = request.getfixturevalue(run)
    assert len(run.measured) == run.trainer.world_size
    predicted = predict(run.trainer)
    state = run.trainer.memory()
    for record in run.measured:
        peak = predicted.schedule.peak_memory
        # the issue's bound; measured on gloo, stage 2's peak is 4% over the
        # estimate (its reduce-scatters' inputs live longer in @train_step)
        assert abs(peak - record["peak"]) <= 0.1 * record["peak"], (peak, record)
        for kind in ("optimizer state", "gradient accumulators"):
            assert record[kind] == state[kind], (kind, record, state)
        buffers = sum(b.nbytes for b in run.model.buffers())  # rotary's: read, not state
        assert 0 <= record["parameters"] - state["parameters"] <= buffers, (record, state)


# ---- the step's collectives and IR ---------------------------------------------------


@pytest.mark.parametrize("run", ["zero1", "zero2", "zero3", "zero3_tp"])
def test_zero_ir_round_trips(run, request):
    text = request.getfixturevalue(run).trainer.ir
    module = parse_module(text)
    assert print_module(module) == text
    check_state_order(module)
    assert "flat([176, 64])" in text or "flat([88, 64])" in text  # gate_proj's moments


def test_a_dump_after_shard_replays_zero(zero2):
    """`plait opt step.mlir --pipeline zero{...}` on the step as shard left it
    gives the step the whole pipeline gives: a dump is a reproducible case."""
    sharded = plait.compile_training(
        zero2.model,
        zero2.batches[0],
        accumulation=zero2.accumulation,
        clip_grad_norm=DP_CLIP,
        pipeline=_pipeline("dp:2", 2).rsplit(",zero", 1)[0],
        **ADAMW,
    )
    module = parse_module(sharded.ir)
    PassManager.parse(f"zero{{stage=2,bucket_mb={SMALL_BUCKETS}}}").run(module)
    assert print_module(module) == zero2.trainer.ir


def _dp(ops, kind) -> list:
    return [op for op in ops if isinstance(op, kind) and op.axis.data == "dp"]


def test_zero1_gathers_each_updated_slice_into_its_parameter(zero1):
    """One async plait.all_gather_into per parameter, into the parameter's own
    state (no gathered copy); on gloo, one in-place broadcast per rank."""
    ops = _step_ops(zero1.trainer)
    gathers = _dp(ops, GatherIntoOp)
    assert all(op.is_async is not None for op in gathers)
    names = sorted(op.dest.owner.weight_name for op in gathers)
    assert names == sorted(name for name, _ in zero1.model.named_parameters())
    params = sum(p.numel() for p in zero1.model.parameters())
    assert sum(math.prod(op.input.type.shape) for op in gathers) == params // 2
    assert _dp(ops, AllGatherOp) == [] and _dp(ops, ReduceScatterOp) == []
    assert zero1.trainer.code.count("broadcast_.default(") == 2 * len(gathers)
    # started as each slice is made, all waited for at the end (nothing to free)
    position = {op: i for i, op in enumerate(ops)}
    waits = [use.operation for op in gathers for use in op.result.uses]
    assert max(position[op] for op in gathers) < min(position[w] for w in waits)
    assert min(position[op] for op in gathers) < position[gathers[-1].input.owner]


def test_zero2_reduce_scatters_gradients(zero2):
    """In @train_step and in @accumulate (each micro-batch's gradients into
    the accumulators' pieces)."""
    module = parse_module(zero2.trainer.ir)
    accumulate = next(f for f in module.ops if f.sym_name.data == "accumulate")
    scatters = _dp(list(accumulate.body.blocks.first.ops), ReduceScatterOp)
    params = sum(p.numel() for p in zero2.model.parameters())
    assert sum(math.prod(op.input.type.shape) for op in scatters) == params
    ops = _step_ops(zero2.trainer)
    scatters = _dp(ops, ReduceScatterOp)
    assert len(scatters) >= 3 and all(op.is_async is not None for op in scatters)
    assert sum(math.prod(op.input.type.shape) for op in scatters) == params
    # no gradient is all-reduced: the loss's two scalars and the norm's square sums
    reduces = _dp(ops, AllReduceOp)
    assert [list(op.input.type.shape) for op in reduces if op.input.type.rank] == [
        [len(list(zero2.model.parameters()))]
    ]


def test_at_most_two_gradient_buckets_are_in_flight(zero2):
    """Each bucket's wait comes before the bucket two later starts (as FSDP
    bounds them), so few whole buckets are alive at once; on gloo a float
    reduce-scatter runs as an in-place all-reduce (gloo's own copies into a
    buffer of its own, which nothing counts)."""
    trainer = zero2.trainer
    ops = _step_ops(trainer)
    position = {op: i for i, op in enumerate(ops)}
    starts = [op for op in _dp(ops, ReduceScatterOp) if op.is_async is not None]
    assert len(starts) >= 3
    for start, later in zip(starts, starts[2:]):
        (wait,) = [use.operation for use in start.result.uses]
        assert position[wait] < position[later]
    assert "reduce_scatter_tensor" not in trainer.code and "all_reduce_" in trainer.code


def test_zero3_gathers_prefetch_buckets_ahead(zero3):
    """zero{prefetch=P}: each bucket's gather starts where the bucket P before
    it is first read, so P gathers are in flight while a bucket is in use."""
    sharded = plait.compile_training(
        zero3.model,
        zero3.batches[0],
        clip_grad_norm=DP_CLIP,
        pipeline=_pipeline("dp:2", 3).rsplit(",zero", 1)[0],
        **ADAMW,
    )
    for prefetch in (1, 2, 3):
        module = parse_module(sharded.ir)
        zero = f"zero{{stage=3,bucket_mb={SMALL_BUCKETS},prefetch={prefetch}}}"
        PassManager.parse(zero).run(module)
        fn = next(
            f
            for f in module.ops
            if getattr(f, "sym_name", None) and f.sym_name.data == "train_step"
        )
        in_flight, most = set(), 0
        for op in fn.body.blocks.first.ops:
            if isinstance(op, AllGatherOp) and op.axis.data == "dp" and op.is_async is not None:
                in_flight.add(op.result)
                most = max(most, len(in_flight))
            in_flight.difference_update(op.operands)
        assert most == prefetch


def _leaves(value, ops) -> list:
    """The ops that read `value`, through the reshape family (views, slices)."""
    found = []
    for use in value.uses:
        op = use.operation
        if isinstance(op, ReshapeOp):
            found += _leaves(op.results[0], ops)
        else:
            found.append(op)
    return found


def test_zero3_gathers_parameters_for_forward_and_again_for_backward(zero3):
    """Every gathered copy is read on one side of the loss only (forward's dies
    before backward, which gathers again), and each bucket's gather starts
    before the bucket ahead of it is first read (prefetch)."""
    ops = _step_ops(zero3.trainer)
    position = {op: i for i, op in enumerate(ops)}
    loss = _loss_position(ops)
    gathers = [op for op in _dp(ops, AllGatherOp) if op.is_async is not None]
    waits = [next(iter(op.result.uses)).operation for op in gathers]
    firsts = []
    for wait in waits:
        readers = [position[op] for op in _leaves(wait.results[0], ops)]
        assert max(readers) < loss or min(readers) > loss
        firsts.append(min(readers))
    assert all(position[g] < firsts[i - 1] for i, g in enumerate(gathers) if i)
    # forward reads every parameter; backward all but the embedding (a scatter-add)
    pieces = [(first < loss, math.prod(g.input.type.shape)) for g, first in zip(gathers, firsts)]
    model = zero3.model
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert sum(n for forward, n in pieces if forward) == params // 2
    assert sum(n for forward, n in pieces if not forward) == (params - embedding) // 2


# ---- checkpoints --------------------------------------------------------------------


def test_a_zero_checkpoint_holds_whole_tensors_each_rank_wrote_its_piece_of(zero1):
    """Each rank wrote its flat piece of the moments to its own file; the
    index presents them whole."""
    index = json.loads((zero1.checkpoint / "state.json").read_text())["tensors"]
    manifest = json.loads((zero1.checkpoint / "manifest.json").read_text())
    saved = artifact.read_weights(zero1.checkpoint, manifest, [])
    for name, p in zero1.model.named_parameters():
        for slot in ("exp_avg", "exp_avg_sq"):
            entry = index[f"optimizer.{slot}.{name}"]
            assert entry["shape"] == list(p.shape)
            held = sorted((piece["file"], piece["flat"]) for piece in entry["pieces"])
            assert held == [
                ("state-rank0.safetensors", [0, 2]),
                ("state-rank1.safetensors", [1, 2]),
            ]
            assert saved.get(f"optimizer.{slot}.{name}").shape == p.shape


@pytest.mark.parametrize("run", ["zero1", "zero2"])
def test_a_zero_checkpoint_continues_on_one_rank(run, request):
    """Saved after 2 steps under zero, resumed without zero on one device: the
    moments were whole, so it goes on as eager did."""
    _check_continues_on_one_rank(request.getfixturevalue(run))


RESUMED_ON = {  # pass -> the mesh it makes
    ",shard{mesh=tp:2}": {"tp": 2},
    ",pipeline{stages=2}": {"pp": 2},
    "": {},
}


@pytest.mark.parametrize("passes", RESUMED_ON)
def test_a_zero3_checkpoint_resumes_on_another_mesh(zero3, passes):
    """Saved after 2 steps on dp:2 under zero{stage=3} (each rank wrote its
    flat pieces), resumed on tp:2, on two pipeline stages and on one rank:
    the next step's loss is the one the original mesh went on with."""
    loaded = plait.load_training(zero3.checkpoint, pipeline="canonicalize,cse,dce" + passes)
    try:
        assert loaded.mesh == RESUMED_ON[passes] and loaded.steps == SAVE_AFTER
        loss = loaded.step(*zero3.batches[SAVE_AFTER])
    finally:
        loaded.close()
    expected = zero3.losses[SAVE_AFTER]
    assert abs(loss.item() - expected.item()) <= 1e-6, (loss.item(), expected.item())


def test_mixtral_at_dp2_tp2_trains_as_eager_with_remat_zero3_and_offload(tmp_path):
    """4 gloo ranks, Mixtral's experts split over tp: remat before
    zero{stage=3} (zero then gathers parameters again for what remat
    recomputes), each rank's pieces of the moments in host memory. Equal to
    eager's clipped AdamW; each rank stores at most remat's budget."""
    model = _hf_model("mixtral", num_hidden_layers=1)
    passes = ",remat{budget=0.5}" + _zero(3) + ",offload"
    run = _sharded_run(
        model,
        f"mesh=dp:2,tp:2,bucket_mb={SMALL_BUCKETS}",
        ADAMW,
        tmp_path,
        clip=DP_CLIP,
        then=passes,
        steps=PARITY_STEPS,
    )
    _check_parity(run)
    budget = int(re.search(r"budget (\d+) B", run.trainer.module.attributes[REMAT_ATTR].data)[1])
    for record in run.measured:
        assert 0 < record[SAVED] <= budget
        assert record[OPTIMIZER_STATE] == 8 and record[HOST_OPTIMIZER_STATE] > 0  # (the step count)


@pytest.mark.parametrize(
    "arch, mesh, passes",
    [
        ("mixtral", "dp:2", _zero(1)),
        ("mixtral", "dp:2", _zero(2)),
        ("mixtral", "dp:2", ",remat{budget=0.5}" + _zero(3)),
        ("llama", "dp:2,tp:2", _zero(1)),
        ("llama", "dp:2,tp:2", ",remat{budget=0.5}" + _zero(2) + ",offload"),
        ("mixtral", "dp:2,tp:2", _zero(1) + ",offload"),
        ("mixtral", "dp:2,tp:2", _zero(2)),
    ],
)
def test_stages_remat_and_offload_train_as_eager_for_ten_steps(arch, mesh, passes, tmp_path):
    """The runs above (Llama at dp:2) on the other model and mesh:
    each stage, with and without remat and offload, equals eager's clipped
    AdamW for ten steps (losses and final parameters within 1e-5)."""
    run = _sharded_run(
        _hf_model(arch, num_hidden_layers=1),
        f"mesh={mesh},bucket_mb={SMALL_BUCKETS}",
        ADAMW,
        tmp_path,
        clip=DP_CLIP,
        then=passes,
        steps=PARITY_STEPS,
    )
    assert len(run.losses) == PARITY_STEPS
    _check_parity(run)


# ---- bad input ----------------------------------------------------------------------


def test_remat_after_zero3_says_to_put_it_first():
    """zero{stage=3} gathers parameters for forward; remat after it would keep
    them alive for what it recomputes."""
    model, batches = MLP(), _mlp_batches(1)
    with pytest.raises(RematError, match=r"Put remat before zero, e\.g\. shard\{mesh=dp:2\},remat"):
        plait.compile_training(
            model,
            batches[0],
            pipeline=f"canonicalize,shard{{mesh=dp:2}}{_zero(3)},remat{{budget=0.5}}",
        )


def test_an_unknown_stage_is_an_option_error():
    with pytest.raises(PipelineError, match=r"stage is one of 1 \(optimizer state\), .*3 .*not 4"):
        parse_pipeline("shard{mesh=dp:2},zero{stage=4}")


def test_a_prefetch_below_one_is_an_option_error():
    with pytest.raises(PipelineError, match=r"prefetch is how many buckets are gathered ahead"):
        parse_pipeline("shard{mesh=dp:2},zero{stage=3,prefetch=0}")


def test_zero_without_a_data_axis_says_what_to_change():
    model, batches = MLP(), _mlp_batches(1)
    with pytest.raises(ZeroError, match=r"mesh is tp:2; shard with one first: shard\{mesh=dp:N\}"):
        plait.compile_training(
            model, batches[0], pipeline="canonicalize,shard{mesh=tp:2},zero{stage=1}"
        )


def test_zero_on_a_program_that_is_no_training_step():
    text = """builtin.module attributes {plait.mesh = #plait.mesh<dp = 2>} {
  func.func @forward(%x : !plait.tensor<[4], f32>) -> !plait.tensor<[4], f32> {
    func.return %x : !plait.tensor<[4], f32>
  }
}"""
    with pytest.raises(PlaitError, match=r"no @train_step; compile it with plait.compile_training"):
        Zero(stage=1).apply(None, parse_module(text))


class Odd(torch.nn.Module):
    """Every parameter has an odd count of elements: each rank's last piece is padded."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(5, 7)
        self.fc2 = torch.nn.Linear(7, 3)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.fc2(torch.tanh(self.fc1(x))), y)


def test_pieces_of_odd_sizes_are_padded():
    model = Odd()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 5, generator=generator), torch.randn(4, 3, generator=generator))]
    batches *= 3
    losses, _, reference = _eager(
        model, batches, lambda m, x, y: m(x, y), _optimizer(ADAMW), clip=0.1
    )
    trainer = plait.compile_training(
        model, batches[0], clip_grad_norm=0.1, pipeline=_pipeline("dp:2", 3), **ADAMW
    )
    assert "aten::constant_pad_nd" in trainer.ir
    memory = trainer.memory()
    assert memory["gradients"] == memory["parameters"] == _halves(model)
    try:
        _check_run(trainer, batches, losses, reference)
    finally:
        trainer.close()


def test_a_flat_piece_of_the_wrong_size_is_invalid_ir():
    """flat([5]) over 2 ranks holds ceil(5 / 2) = 3 elements a rank."""
    text = """builtin.module attributes {plait.mesh = #plait.mesh<dp = 2>} {
  func.func @train_step() -> !plait.tensor<[2], f32> {
    %m = plait.param state "m" {plait.placements = #plait.placements<[flat([5])]>} : !plait.tensor<[2], f32>
    func.return %m : !plait.tensor<[2], f32>
  }
}"""
    with pytest.raises(PlaitError, match=r"flat\(\[5\]\) over 2 ranks holds \[3\] elements"):
        verify_module(parse_module(text, "bad.mlir"))
    fixed = text.replace("[2], f32", "[3], f32")
    assert print_module(parse_module(fixed)).strip() == fixed
    verify_module(parse_module(fixed))
