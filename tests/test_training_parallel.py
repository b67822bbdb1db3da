"""Training over meshes (tp:2, dp:2, dp:2,tp:2) on real gloo ranks, driven
from this one process through the worker pool: every step's loss and the
final parameters equal eager torch + torch.optim on one process; the step's
collectives are Megatron's (tp) and DDP's bucketed, overlapped all-reduces
(dp); a sharded checkpoint resumes exactly, and on one rank.

AdamW runs with eps=1e-6 here: the key projection's bias (GPT-2's c_attn)
has a gradient that is zero in exact arithmetic (softmax ignores a shift of
all scores), and with eps=1e-8 Adam turns its rounding noise into lr-sized
steps, so eager fp32 and eager fp64 already differ by 2e-5 there."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import plait
import pytest
import torch
from plait.frontend.training import TrainingError
from plait.ir.errors import PlaitError
from plait.ir.ops import (
    AllGatherOp,
    AllReduceOp,
    CallOp,
    CollectiveOp,
    LocalShardOp,
    ParamOp,
    WaitOp,
)
from plait.ir.text import parse_module
from plait.ir.training import GRAD_OF, TRAIN_STEP
from test_training import (
    _check_run,
    _close,
    _cnn,
    _cnn_batches,
    _eager,
    _hf_model,
    _lm_loss,
)
from xdsl.ir import Operation

STEPS = 4
SAVE_AFTER = 2  # each run saves a checkpoint after this many steps
PARAM_ATOL = 1e-5  # final parameters: within 1e-5 (losses: 1e-5 relative)
ADAMW = dict(optimizer="adamw", lr=1e-3, eps=1e-6)
SGD = dict(optimizer="sgd", lr=0.1, momentum=0.9)


def _optimizer(options: dict):
    options = dict(options)
    kind = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[options.pop("optimizer")]
    return lambda parameters: kind(parameters, **options)


def _batches(count: int, rows: int = 4, seq: int = 16, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 256, (rows, seq), generator=generator)
        batches.append((ids, torch.ones_like(ids), ids.clone()))
    return batches


def _llama(layers: int):
    return _hf_model("llama", num_hidden_layers=layers)


def _gpt2(layers: int):
    return _hf_model("gpt2", n_layer=layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _pipeline(shard: str, then: str = "") -> str:
    return f"canonicalize,cse,dce,shard{{{shard}}}{then}"


@dataclass
class Run:
    """A sharded trainer's run next to eager's on the same batches."""

    model: torch.nn.Module
    batches: list
    options: dict
    accumulation: int
    clip: float | None
    trainer: plait.Trainer
    losses: list[torch.Tensor]  # plait's, step by step
    state: dict[str, torch.Tensor]  # plait's final trainer.state_dict()
    expected: list[torch.Tensor]  # eager's losses
    reference: torch.nn.Module  # eager's trained model
    checkpoint: object  # saved after SAVE_AFTER steps
    measured: list[dict[str, int]]  # each rank's memory in the last step (measured)


def _run(
    model,
    shard,
    options,
    tmp,
    *,
    accumulation=1,
    clip=None,
    rows=4,
    task=None,
    then="",
    save_async=False,
    steps=STEPS,
) -> Run:
    """`task`: (batches, eager loss, plait's loss_fn); a causal LM's by default.
    `then`: passes after shard. `save_async`: the checkpoint is written while
    the steps after it run."""
    batches, loss, loss_fn = task or (_batches(steps, rows), _lm_loss, None)
    expected, _, reference = _eager(
        model, batches, loss, _optimizer(options), accumulation=accumulation, clip=clip
    )
    trainer = plait.compile_training(
        model,
        batches[0],
        loss_fn=loss_fn,
        accumulation=accumulation,
        clip_grad_norm=clip,
        pipeline=_pipeline(shard, then),
        **options,
    )
    losses = []
    try:
        for step, batch in enumerate(batches):
            if step == SAVE_AFTER:
                trainer.save(tmp, asynchronous=save_async)
            trainer.measure_memory = step == len(batches) - 1  # (the results stay the same)
            losses.append(trainer.step(*batch))
        state = trainer.state_dict()
        measured = trainer.memory(measured=True)
    finally:
        trainer.close()  # (the worker ranks: their state is in `state` and the checkpoint)
    return Run(
        model,
        batches,
        options,
        accumulation,
        clip,
        trainer,
        losses,
        state,
        expected,
        reference,
        tmp,
        measured,
    )


def _check_parity(run: Run) -> None:
    for step, (loss, expected) in enumerate(zip(run.losses, run.expected)):
        _close(loss, expected, f"loss of step {step}")
    reference = run.reference.state_dict()
    assert run.state.keys() == reference.keys()
    for name, tensor in reference.items():
        error = (run.state[name].double() - tensor.double()).abs().max().item()
        assert error <= PARAM_ATOL, f"{name} after {len(run.losses)} steps: max error {error:.3g}"


# ---- runs, shared by the tests (each starts its worker ranks once) -------------------


@pytest.fixture(scope="module")
def tp_llama(tmp_path_factory):
    """With `overlap`: backward's input-gradient all-reduces start early."""
    return _run(_llama(2), "mesh=tp:2", ADAMW, tmp_path_factory.mktemp("tp_llama"), then=",overlap")


@pytest.fixture(scope="module")
def tp_gpt2(tmp_path_factory):
    return _run(_gpt2(1), "mesh=tp:2", ADAMW, tmp_path_factory.mktemp("tp_gpt2"))


DP_CLIP = 0.5
SMALL_BUCKETS = 0.05  # MiB: the tiny Llama's gradients (0.3 MiB) fill several buckets


@pytest.fixture(scope="module")
def dp_llama(tmp_path_factory):
    """dp:2 with gradient accumulation over 2 micro-batches and clipping; its
    checkpoint saved asynchronously (the ranks write while stepping on)."""
    return _run(
        _llama(1),
        f"mesh=dp:2,bucket_mb={SMALL_BUCKETS}",
        ADAMW,
        tmp_path_factory.mktemp("dp_llama"),
        accumulation=2,
        clip=DP_CLIP,
        save_async=True,
    )


@pytest.fixture(scope="module")
def dp_tp_llama(tmp_path_factory):
    """4 ranks: SGD with momentum and clipping (the global norm over tp shards)."""
    return _run(
        _llama(1), "mesh=dp:2,tp:2", SGD, tmp_path_factory.mktemp("dp_tp_llama"), clip=DP_CLIP
    )


@pytest.fixture(scope="module")
def dp_tp_mixtral(tmp_path_factory):
    """4 ranks, AdamW: the router's top-k and the experts' grouped products
    (and their backward) inside Megatron's tp layers, on dp's rows."""
    model = _hf_model("mixtral", num_hidden_layers=1)
    return _run(model, "mesh=dp:2,tp:2", ADAMW, tmp_path_factory.mktemp("mixtral"))


def _cnn_without_conv_biases():
    """test_training's CNN (batch norm in train mode) without its convolutions'
    biases: before batch norm a bias has a zero gradient in exact arithmetic
    (the norm subtracts the mean) and AdamW turns its rounding noise into
    lr-sized steps, so eager's own summation order decides it (ResNets have
    no bias there either)."""
    model = _cnn()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.bias = None
    return model


CLASS_WEIGHTS = torch.linspace(0.5, 2.0, 10)


def _weighted(output, images, labels):
    """Cross-entropy with class weights: the mean divides by the labels' total weight."""
    return torch.nn.functional.cross_entropy(output, labels, weight=CLASS_WEIGHTS)


@pytest.fixture(scope="module")
def dp_cnn(tmp_path_factory):
    """dp:2: batch norm's statistics over the whole batch (SyncBatchNorm's);
    a class-weighted loss (each rank's weights' total summed over the ranks)."""
    task = (_cnn_batches(STEPS), lambda m, x, y: _weighted(m(x), x, y), _weighted)
    return _run(
        _cnn_without_conv_biases(), "mesh=dp:2", ADAMW, tmp_path_factory.mktemp("dp_cnn"), task=task
    )


# ---- parity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "run", ["tp_llama", "tp_gpt2", "dp_llama", "dp_tp_llama", "dp_tp_mixtral", "dp_cnn"]
)
def test_sharded_steps_match_eager(run, request):
    _check_parity(request.getfixturevalue(run))


def test_clipping_is_active_in_the_clipped_runs():
    """The clipped runs clip: the first step's gradients' norm exceeds DP_CLIP."""
    model, batch = _llama(1), _batches(1)[0]
    _lm_loss(model, *batch).backward()
    norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
    assert norm > 2 * DP_CLIP


# ---- collectives --------------------------------------------------------------------


def _step_ops(trainer) -> list:
    module = parse_module(trainer.ir)
    fn = next(
        op for op in module.ops if getattr(op, "sym_name", None) and op.sym_name.data == TRAIN_STEP
    )
    return list(fn.body.blocks.first.ops)


def _loss_position(ops) -> int:
    return next(
        i
        for i, op in enumerate(ops)
        if isinstance(op, CallOp) and op.target_name == "aten::nll_loss_forward"
    )


def _loss_backward(ops) -> CallOp:
    return next(
        op for op in ops if isinstance(op, CallOp) and op.target_name == "aten::nll_loss_backward"
    )


def _bucket_starts(ops) -> list:
    """The async all-reduces of gradient buckets (flat; the loss's are scalars)."""
    return [
        op
        for op in ops
        if isinstance(op, AllReduceOp) and op.is_async is not None and op.input.type.rank == 1
    ]


def test_tp_backward_has_megatron_all_reduces(tp_llama):
    """Per layer, forward all-reduces after o_proj and down_proj (row-parallel)
    and backward after the input gradients of q/k/v and gate/up (column-
    parallel), where forward had none; plus lm_head's (column-parallel over
    the vocabulary) input gradient, and in forward the vocab-parallel
    embedding's lookup (Megatron's). The loss is vocab-parallel: no weight and
    no logits are gathered, only one log-sum-exp per row and rank, and the
    softmax's backward sums one number per row."""
    ops = _step_ops(tp_llama.trainer)
    loss = _loss_position(ops)
    rows, hidden = 4 * 16, 64

    def reduced(shape):
        return [
            i
            for i, op in enumerate(ops)
            if isinstance(op, AllReduceOp)
            and op.axis.data == "tp"
            and math.prod(op.input.type.shape) == math.prod(shape)
        ]

    layers = 2
    activations = reduced([rows, hidden])
    # forward: the vocab-parallel embedding's lookup, then two a layer
    assert len([i for i in activations if i < loss]) == 2 * layers + 1
    assert len([i for i in activations if i > loss]) == 2 * layers + 1
    assert len(reduced([rows, 1])) == 1  # log_softmax's backward
    collectives = [op for op in ops if isinstance(op, CollectiveOp)]
    assert max(math.prod(op.input.type.shape) for op in collectives) == rows * hidden
    gathers = [op for op in ops if isinstance(op, AllGatherOp)]
    assert len(gathers) == 1 and list(gathers[0].input.type.shape) == [rows, 1]
    # lm_head's and the embedding's weight gradients are computed for this
    # rank's half of the vocabulary
    for table in ("lm_head.weight", "embed_tokens.weight"):
        (grad,) = [
            op for op in ops if op.attributes.get(GRAD_OF) and table in str(op.attributes[GRAD_OF])
        ]
        assert list(grad.results[0].type.shape) == [256 // 2, hidden]


def test_tp_input_gradients_reduce_while_weight_gradients_compute(tp_llama):
    """overlap moves each backward all-reduce's start up past the weight
    gradients its layer computes first (Megatron's async input-gradient
    all-reduce): every weight gradient product runs between some start and
    its wait."""
    ops = _step_ops(tp_llama.trainer)
    position = {op: i for i, op in enumerate(ops)}
    loss = _loss_position(ops)

    def product(op):  # the matrix product a weight's gradient is a view of
        while isinstance(op, CallOp) and op.target_name in ("aten::t", "aten::view"):
            op = op.operands[0].owner
        return op if isinstance(op, CallOp) and op.target_name == "aten::mm" else None

    products = {product(op) for op in ops[loss:] if GRAD_OF in op.attributes} - {None}
    assert len(products) == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    starts = [  # of the input gradients: [rows, hidden]
        op
        for op in ops[loss:]
        if isinstance(op, AllReduceOp) and list(op.input.type.shape) == [4, 16, 64]
    ]
    assert len(starts) == 2 * 2 + 1 and all(op.is_async is not None for op in starts)
    overlapped = set()
    for start in starts:
        wait = next(op for op in ops if isinstance(op, WaitOp) and op.input is start.result)
        between = products.intersection(ops[position[start] : position[wait]])
        assert between, f"no weight gradient overlaps {start.result.name_hint}"
        overlapped |= between
    assert overlapped == products


def test_dp_gradients_reduce_in_async_buckets_that_overlap_backward(dp_llama):
    ops = _step_ops(dp_llama.trainer)
    position = {op: i for i, op in enumerate(ops)}
    starts = _bucket_starts(ops)
    assert len(starts) >= 3  # several buckets
    total = sum(math.prod(op.input.type.shape) for op in starts)
    params = sum(p.numel() for p in dp_llama.model.parameters())
    assert total == params  # every gradient once, in some bucket
    # nothing else reduces a gradient (only the loss's sum and weight, scalars)
    others = [op for op in ops if isinstance(op, AllReduceOp) and op not in starts]
    assert all(op.input.type.rank == 0 for op in others)
    # the first bucket starts while backward still has matrix products to do,
    # and is waited for only after them
    first = min(starts, key=position.__getitem__)
    wait = next(op for op in ops if isinstance(op, WaitOp) and op.input is first.result)
    between = ops[position[first] : position[wait]]
    assert sum(isinstance(op, CallOp) and op.target_name == "aten::mm" for op in between) >= 4


def test_dp_forward_has_no_collectives(dp_llama):
    """Like DDP, forward runs on this rank's rows alone: the attention mask
    (transformers picks each row's padding with mask[arange(batch), kv]) is
    built for this rank's rows, not gathered over dp for the whole batch.
    The one collective is the loss's total weight starting, async, to sum the
    ranks' counts of labels (test_dp_loss_reductions_do_not_block_backward)."""
    ops = _step_ops(dp_llama.trainer)
    forward = ops[: _loss_position(ops)]
    normalizer = _loss_backward(ops).operands[-1].owner.input.owner
    assert [op for op in forward if isinstance(op, CollectiveOp)] == [normalizer]


def test_dp_loss_reductions_do_not_block_backward(dp_llama):
    """Like DDP, nothing waits on other ranks between the loss and backward:
    the total weight (count of kept labels) is all-reduced async from the
    step's start (the labels) until backward reads it, and the loss's sum is waited for only
    at the step's output."""
    ops = _step_ops(dp_llama.trainer)
    position = {op: i for i, op in enumerate(ops)}
    loss = _loss_position(ops)
    backward = _loss_backward(ops)
    normalizer = backward.operands[-1].owner
    assert isinstance(normalizer, WaitOp)
    start = normalizer.input.owner
    assert isinstance(start, AllReduceOp) and start.is_async is not None
    first_mm = next(op for op in ops if isinstance(op, CallOp) and op.target_name == "aten::mm")
    assert position[start] < position[first_mm]  # it overlaps the whole forward
    between = ops[loss : position[backward]]
    assert [op for op in between if isinstance(op, AllReduceOp) and op.is_async is None] == []
    assert [op for op in between if isinstance(op, WaitOp)] == [normalizer]
    waits = [op for op in ops if isinstance(op, WaitOp)]
    loss_wait = next(w for w in waits if w.input.owner.input.owner is ops[loss])
    buckets = [w for w in waits if w not in (loss_wait, normalizer)]
    assert position[loss_wait] > max(map(position.__getitem__, buckets))


_EXPERT_PRODUCTS = ("plait::expert_mm", "plait::expert_mm_backward")


def test_tp_splits_the_experts_with_no_collective_inside_them(dp_tp_mixtral):
    """As in inference, each tp rank holds half of each layer's 4 experts (and
    their AdamW moments) and computes their rows alone, forward and backward;
    between a layer's two products no collective runs."""
    ops = _step_ops(dp_tp_mixtral.trainer)
    experts = [op for op in ops if isinstance(op, ParamOp) and ".experts." in op.weight_name]
    assert len(experts) == 2 * 3  # (gate_up, down) x (weight, 2 moments)
    assert all(op.result.type.shape[0] == 2 for op in experts)
    products = [
        i
        for i, op in enumerate(ops)
        if isinstance(op, CallOp) and op.target_name in _EXPERT_PRODUCTS
    ]
    assert len(products) == 2 * 2  # 2 products x (forward, backward)
    for first, last in zip(products[0::2], products[1::2]):
        assert ops[first].target_name == ops[last].target_name
        assert not [op for op in ops[first:last] if isinstance(op, CollectiveOp)]


def _calls(ops, target: str) -> list:
    return [op for op in ops if isinstance(op, CallOp) and op.target_name == target]


def test_dp_cnn_runs_on_its_rows_with_the_whole_batchs_statistics(dp_cnn):
    """DDP with SyncBatchNorm: the convolutions run on the rank's rows (the
    images are not gathered); each batch norm all-gathers the ranks' mean and
    variance [2, C] once in forward and all-reduces its gradient's two sums
    [2, C] once in backward, which give its weight's and bias's gradients
    whole; the rest of the gradients (convolutions, classifier) go in buckets."""
    ops = _step_ops(dp_cnn.trainer)
    convolutions = _calls(ops, "aten::convolution")
    assert [op.operands[0].type.shape[0] for op in convolutions] == [2, 2]  # 4 rows, 2 ranks
    loss = _loss_position(ops)
    channels = [m.num_features for m in dp_cnn.model.modules() if hasattr(m, "running_mean")]
    gathers = [op for op in ops if isinstance(op, AllGatherOp)]
    assert all(position < loss for position in map(ops.index, gathers))
    assert [tuple(op.result.type.shape) for op in gathers] == [(2, 2, c) for c in channels]
    blocking = [op for op in ops[loss:] if isinstance(op, AllReduceOp) and op.is_async is None]
    assert [tuple(op.input.type.shape) for op in blocking] == [(2, c) for c in reversed(channels)]
    bucketed = sum(math.prod(op.input.type.shape) for op in _bucket_starts(ops))
    norms = sum(
        p.numel()
        for name, p in dp_cnn.model.named_parameters()
        if name.startswith("features.") and p.ndim == 1
    )
    assert bucketed == sum(p.numel() for p in dp_cnn.model.parameters()) - norms


def _from_own_rows(value, seen=None) -> bool:
    """Does `value` depend on this rank's rows other than through a collective
    (whose result every rank of the axis shares)?"""
    seen = set() if seen is None else seen
    owner = value.owner
    if not isinstance(owner, Operation) or isinstance(owner, LocalShardOp):
        return True  # the step's inputs, or this rank's slice of them
    if isinstance(owner, (CollectiveOp, WaitOp)) or owner in seen:
        return False
    seen.add(owner)
    return any(_from_own_rows(v, seen) for v in owner.operands)


def test_dp_running_statistics_are_the_same_on_every_rank(dp_cnn):
    """Each rank writes running_mean and running_var from the gathered
    statistics alone: the same values on every rank (eager's, by the parity)."""
    ops = _step_ops(dp_cnn.trainer)
    updates = [
        op
        for op in _calls(ops, "aten::copy_")
        if isinstance(op.operands[0].owner, ParamOp)
        and op.operands[0].owner.weight_name.rsplit(".", 1)[-1] in ("running_mean", "running_var")
    ]
    assert len(updates) == 4
    assert not any(_from_own_rows(op.operands[1]) for op in updates)
    # while the normalized activations are the rank's own
    (first, _) = _calls(ops, "aten::convolution")
    assert _from_own_rows(first.results[0])


def test_dp_rows_keep_their_own_padding():
    """Rows padded differently on each rank: each rank's mask is its rows'."""
    model, batches = _llama(1), _batches(2)
    for ids, mask, _ in batches:
        for row in range(len(ids)):
            mask[row, ids.shape[1] - 3 * row :] = 0  # rows 2 and 3 (rank 1) padded most
    expected, _, reference = _eager(model, batches, _lm_loss, _optimizer(ADAMW))
    trainer = plait.compile_training(model, batches[0], pipeline=_pipeline("mesh=dp:2"), **ADAMW)
    try:
        _check_run(trainer, batches, expected, reference)
    finally:
        trainer.close()


def test_default_bucket_holds_a_small_models_gradients():
    model, batch = _llama(1), _batches(1)[0]
    trainer = plait.compile_training(model, batch, pipeline=_pipeline("mesh=dp:2"), **ADAMW)
    ops = _step_ops(trainer)
    starts = _bucket_starts(ops)
    assert len(starts) == 1  # 25 MiB, like DDP's default
    assert math.prod(starts[0].input.type.shape) == sum(p.numel() for p in model.parameters())


def test_a_batch_that_does_not_split_over_dp_is_an_error(dp_llama):
    ids = torch.zeros(6, 16, dtype=torch.long)  # 6 rows: not 2 ranks x 2 micro-batches
    with pytest.raises(
        TrainingError,
        match=r"6 rows.*2 micro-batches x 2 data-parallel ranks "
        r"\(mesh dp:2\).*multiple of 4",
    ):
        dp_llama.trainer.step(ids, torch.ones_like(ids), ids)


def test_an_example_batch_that_does_not_split_over_dp_is_refused_at_compile():
    model, batch = _llama(1), _batches(1, rows=3)[0]
    with pytest.raises(PlaitError, match=r"'input_ids' has dim 0 of 3.*2 ranks"):
        plait.compile_training(model, batch, pipeline=_pipeline("mesh=dp:2"), **ADAMW)


# ---- checkpoints ----------------------------------------------------------------------


def test_a_sharded_checkpoint_resumes_exactly(tp_llama):
    """Saved after 2 steps on tp:2, loaded (the same mesh), 2 more steps:
    bit for bit the run that went straight on."""
    index = json.loads((tp_llama.checkpoint / "state.json").read_text())["tensors"]
    files = {name: sorted(p["file"] for p in entry["pieces"]) for name, entry in index.items()}
    both = ["state-rank0.safetensors", "state-rank1.safetensors"]
    q = index["model.layers.0.self_attn.q_proj.weight"]["pieces"]
    assert sorted((p["file"], p["shard"][:3]) for p in q) == list(zip(both, ([0, 0, 2], [0, 1, 2])))
    assert all(f in ([both[0]], both) for f in files.values())  # replicated: written by rank 0
    loaded = plait.load_training(tp_llama.checkpoint)
    try:
        assert loaded.mesh == {"tp": 2} and loaded.steps == SAVE_AFTER
        losses = [loaded.step(*batch) for batch in tp_llama.batches[SAVE_AFTER:]]
        state = loaded.state_dict()
    finally:
        loaded.close()
    assert all(torch.equal(a, b) for a, b in zip(losses, tp_llama.losses[SAVE_AFTER:]))
    assert state.keys() == tp_llama.state.keys()
    assert all(torch.equal(state[n], t) for n, t in tp_llama.state.items())


@pytest.mark.parametrize("run", ["tp_llama", "dp_llama"])
def test_a_sharded_checkpoint_continues_on_one_rank(run, request):
    """A tp:2 or dp:2 checkpoint holds whole tensors: one device resumes it
    (parameters and optimizer state) and goes on as eager did."""
    _check_continues_on_one_rank(request.getfixturevalue(run))


def _check_continues_on_one_rank(run: Run) -> None:
    loaded = plait.load_training(run.checkpoint, pipeline="canonicalize,cse,dce")
    assert loaded.world_size == 1 and loaded.steps == SAVE_AFTER
    for step, batch in enumerate(run.batches[SAVE_AFTER:], SAVE_AFTER):
        _close(loaded.step(*batch), run.expected[step], f"loss of step {step} on one rank")
    state = loaded.state_dict()
    for name, tensor in run.reference.state_dict().items():
        error = (state[name].double() - tensor.double()).abs().max().item()
        assert error <= PARAM_ATOL, f"{name} resumed on one rank: max error {error:.3g}"


# ---- memory per rank ----------------------------------------------------------------

# split over tp: Megatron's linears, the head and the embedding (vocab-parallel)
_MEGATRON = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
_MEGATRON += ("embed_tokens", "wte", "wpe")


def _parameter_bytes(model, tp: int = 1) -> int:
    """A rank's parameters: Megatron's linears and the head split tp ways."""
    return sum(
        p.numel() * 4 // (tp if any(k in name for k in _MEGATRON) else 1)
        for name, p in model.named_parameters()
    )


STEP_COUNT = 8  # optimizer.step, an f64


@pytest.mark.parametrize(
    "run, tp, moments, accumulators",
    [("tp_llama", 2, 2, False), ("dp_llama", 1, 2, True), ("dp_tp_llama", 2, 1, False)],
)
def test_step_memory_per_rank(run, tp, moments, accumulators, request):
    """Parameters, optimizer state (AdamW: 2 moments, SGD: 1) and accumulators
    per rank follow the mesh: halved by tp where Megatron splits, whole on dp."""
    run = request.getfixturevalue(run)
    memory = run.trainer.memory()
    params = _parameter_bytes(run.model, tp)
    assert memory["parameters"] == params
    assert memory["optimizer state"] == moments * params + STEP_COUNT
    assert memory["gradient accumulators"] == (params if accumulators else 0)
    if tp == 1:
        assert memory["gradients"] == params


def test_step_memory_matches_the_tensors_a_rank_holds():
    """On one device: predicted state bytes = the program's state tensors,
    predicted gradient bytes = the gradients it computes."""
    model, batch = _llama(1), _batches(1)[0]
    trainer = plait.compile_training(model, batch, **ADAMW)
    gradients = trainer.gradients(*batch)
    trainer.step(*batch)
    held = {"parameters": 0, "optimizer state": 0}
    for (kind, name), tensor in trainer._shared.items():
        if kind == "state":
            held["optimizer state" if name.startswith("optimizer.") else "parameters"] += (
                tensor.nbytes
            )
    memory = trainer.memory()
    assert {k: memory[k] for k in held} == held
    assert memory["gradients"] == sum(g.nbytes for g in gradients.values())


@pytest.mark.parametrize("run", ["tp_llama", "dp_llama", "dp_tp_llama"])
def test_predicted_peak_memory_is_each_ranks_measured_peak(run, request):
    """Every rank's peak in a step, measured, is the estimate's (and so are
    its kinds: state, saved activations, temporary)."""
    from test_training_memory import check_prediction, predict

    run = request.getfixturevalue(run)
    assert len(run.measured) == run.trainer.world_size
    predicted = predict(run.trainer)
    for record in run.measured:
        check_prediction(predicted, record)


def test_estimate_of_a_checkpoint_runs_its_training_pipeline(tp_llama, capsys):
    from plait import cli

    assert cli.main(["estimate", str(tp_llama.checkpoint), "--hardware", "h100-sxm"]) == 0
    rows = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines() if ":" in line)
    assert rows["mesh tp"].startswith("2, training step")
    assert "saved activations" in rows["peak memory by kind"]
    assert all(f"{p} " in rows["step phases"] for p in ("forward", "backward", "optimizer"))


def test_estimate_reports_a_training_steps_state(tp_llama, capsys):
    from plait import cli

    code = cli.main(
        [
            "estimate",
            str(tp_llama.checkpoint),
            "--hardware",
            "h100-sxm",
            "--pipeline",
            _pipeline("mesh=tp:2"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    memory = tp_llama.trainer.memory()
    row = next(line for line in out.splitlines() if line.startswith("training state:"))
    kb = f"{memory['parameters'] / 1e3:.2f} KB"
    assert f"parameters {kb}" in row and "gradients" in row and "optimizer state" in row
