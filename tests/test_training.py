"""Training: a compiled step (forward, backward, optimizer) equals eager torch
+ torch.optim: the gradients of the first step, every step's loss and the
final parameters and buffers."""

from __future__ import annotations

import copy
import math

import plait
import pytest
import torch
from plait import cli
from plait.examples.models import CAUSAL_LMS, SmallCNN
from plait.frontend.optimizers import OptimizerError
from plait.frontend.training import TrainingError
from plait.ir.text import parse_module, print_module
from plait.ir.training import TRAIN_STEP, StateOrderError, check_state_order, gradients
from plait.passes.manager import PassManager
from plait.training import NonFiniteLossError, Trainer
from safetensors import safe_open
from torch.export import Dim

STEPS = 10
RTOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL):
    scale = expected.double().abs().max().item() + 1e-12
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rtol * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def _hf_model(name: str, **overrides):
    import transformers

    config_cls, model_cls, config = CAUSAL_LMS[name]
    config = getattr(transformers, config_cls)(vocab_size=256, **{**config, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config)


def _lm_batches(count: int, pad: bool = False, seed: int = 1, lengths=(16,)):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(count):
        ids = torch.randint(0, 256, (2, lengths[step % len(lengths)]), generator=generator)
        mask = torch.ones_like(ids)
        if pad:
            mask[1, -3:] = 0
        batches.append((ids, mask, ids.clone()))
    return batches


def _lm_loss(model, ids, mask, labels):
    return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss


def _cnn():
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _cnn_batches(count: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(4, 3, 16, 16, generator=generator),
            torch.randint(0, 10, (4,), generator=generator),
        )
        for _ in range(count)
    ]


def _cross_entropy(output, images, labels):
    return torch.nn.functional.cross_entropy(output, labels)


class MLP(torch.nn.Module):
    """(x, y) -> mean squared error of a two-layer net."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.fc2(torch.tanh(self.fc1(x))), y)


def _mlp_batches(count: int, batch: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 8, generator=generator), torch.randn(batch, 4, generator=generator))
        for _ in range(count)
    ]


def _eager(model, batches, loss, optimizer, *, accumulation=1, clip=None, schedule=None):
    """The eager loop plait reproduces: (losses, first step's gradients, model)."""
    model = copy.deepcopy(model).train()
    opt = optimizer(model.parameters())
    losses, first = [], None
    for step, batch in enumerate(batches):
        if schedule is not None:
            for group in opt.param_groups:
                group["lr"] = schedule(step)
        opt.zero_grad()
        total = 0.0
        for micro in zip(*(t.chunk(accumulation) for t in batch)):
            value = loss(model, *micro)
            scaled = value / accumulation if accumulation > 1 else value
            scaled.backward()
            total = total + scaled.detach()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if first is None:
            first = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        opt.step()
        losses.append(total)
    return losses, first, model


def _check_run(trainer: Trainer, batches, expected_losses, expected_model):
    for step, (batch, expected) in enumerate(zip(batches, expected_losses)):
        _close(trainer.step(*batch), expected, f"loss of step {step}")
    reference = expected_model.state_dict()
    trained = trainer.state_dict()
    assert trained.keys() == reference.keys()
    for name, tensor in reference.items():
        _close(trained[name], tensor, f"{name} after {len(batches)} steps")


# ---- models: AdamW against torch.optim.AdamW --------------------------------------


def _adamw(parameters):
    return torch.optim.AdamW(parameters, lr=1e-3)


MODELS = {
    # name -> (model, batches, eager loss, loss_fn for plait)
    # sequences of two lengths, one program (a dynamic dim)
    "llama": lambda: (_hf_model("llama"), _lm_batches(STEPS, lengths=(16, 11)), _lm_loss, None),
    "gpt2": lambda: (
        _hf_model("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        _lm_batches(STEPS),
        _lm_loss,
        None,
    ),
    # experts: transformers' grouped_mm_fallback, with its registered backward op
    "mixtral": lambda: (_hf_model("mixtral"), _lm_batches(STEPS), _lm_loss, None),
    "cnn": lambda: (
        _cnn(),
        _cnn_batches(STEPS),
        lambda m, x, y: _cross_entropy(m(x), x, y),
        _cross_entropy,
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_adamw_steps_match_eager(name, tmp_path):
    model, batches, loss, loss_fn = MODELS[name]()
    losses, first_grads, reference = _eager(model, batches, loss, _adamw)
    seq = {1: Dim("seq", min=2, max=64)}
    shapes = dict.fromkeys(["input_ids", "attention_mask", "labels"], seq)
    trainer = plait.compile_training(
        model,
        batches[0],
        loss_fn=loss_fn,
        lr=1e-3,
        dynamic_shapes=shapes if name == "llama" else None,
    )
    grads = trainer.gradients(*batches[0])  # updates nothing
    assert grads.keys() == first_grads.keys()
    for param, grad in first_grads.items():
        _close(grads[param], grad, f"gradient of {param} at step 1")
    _check_run(trainer, batches, losses, reference)
    assert trainer.steps == STEPS
    if name == "mixtral":
        assert "transformers::grouped_mm_fallback_backward" in trainer.ir
    if name == "gpt2":  # tied embedding and head: one tensor, trained once, saved once
        state = trainer.state_dict()
        assert state["lm_head.weight"] is state["transformer.wte.weight"]
        trainer.save(tmp_path / "gpt2")
        with safe_open(str(tmp_path / "gpt2" / "weights.safetensors"), "pt") as f:
            assert "transformer.wte.weight" not in f.keys()
        loaded = plait.load_training(tmp_path / "gpt2").state_dict()
        assert all(torch.equal(loaded[n], t) for n, t in state.items())


# ---- optimizer options, accumulation, clipping, schedules -------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9, weight_decay=0.01),
        dict(momentum=0.9, nesterov=True),
        dict(momentum=0.5, dampening=0.3),
    ],
)
def test_sgd_matches_torch(options):
    model, batches = MLP(), _mlp_batches(6)
    losses, _, reference = _eager(
        model, batches, lambda m, x, y: m(x, y), lambda p: torch.optim.SGD(p, lr=0.1, **options)
    )
    trainer = plait.compile_training(model, batches[0], optimizer="sgd", lr=0.1, **options)
    _check_run(trainer, batches, losses, reference)


def test_accumulation_clipping_and_schedule_match_eager():
    model, batches = MLP(), _mlp_batches(6, batch=8)

    def schedule(step):
        return 0.05 * 0.7**step

    losses, grads, reference = _eager(
        model,
        batches,
        lambda m, x, y: m(x, y),
        _adamw,
        accumulation=2,
        clip=0.05,
        schedule=schedule,
    )
    total = math.sqrt(sum(g.pow(2).sum().item() for g in grads.values()))
    assert abs(total - 0.05) < 1e-6  # clipped to max_norm: the clip is active
    trainer = plait.compile_training(
        model, batches[0], lr=schedule, accumulation=2, clip_grad_norm=0.05
    )
    assert trainer.functions == ["accumulate", "train_step"]
    _check_run(trainer, batches, losses, reference)


def test_bf16_mixed_matches_eager_autocast():
    """fp32 master weights and optimizer state, forward and backward under
    autocast(bf16). Multi-head attention and a padded mask: transformers takes
    the same attention path in eager and under export, so the steps agree to
    fp32 rounding (with grouped-query heads and no padding, eager takes SDPA's
    is_causal/GQA path, which rounds differently in bf16)."""
    model, batches = _hf_model("llama", num_key_value_heads=4), _lm_batches(4, pad=True)

    def autocast_loss(m, *batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _lm_loss(m, *batch)

    losses, _, reference = _eager(model, batches, autocast_loss, _adamw)
    trainer = plait.compile_training(model, batches[0], precision="bf16-mixed", lr=1e-3)
    assert "bf16" in trainer.ir
    assert all(
        t.dtype == torch.float32 for t in trainer.state_dict().values() if t.is_floating_point()
    )
    _check_run(trainer, batches, losses, reference)


# ---- checkpoints ----------------------------------------------------------------


def _schedule(step):
    return 1e-2 / (1 + step)


@pytest.fixture(scope="module")
def cnn_trainers():
    """Two trainers of the same CNN (BatchNorm buffers, an int64 counter)."""
    model, batches = _cnn(), _cnn_batches(STEPS)
    return [
        plait.compile_training(model, batches[0], loss_fn=_cross_entropy, lr=_schedule)
        for _ in range(2)
    ], batches


def test_save_load_resumes_exactly(cnn_trainers, tmp_path):
    (straight, resumed), batches = cnn_trainers
    expected = [straight.step(*b) for b in batches]
    losses = [resumed.step(*b) for b in batches[:5]]
    resumed.save(tmp_path / "ckpt")
    with pytest.raises(TrainingError, match="pass it again"):
        plait.load_training(tmp_path / "ckpt")  # the schedule is code: not in the checkpoint
    loaded = plait.load_training(tmp_path / "ckpt", lr=_schedule)
    assert loaded.steps == 5
    losses += [loaded.step(*b) for b in batches[5:]]
    assert all(torch.equal(a, b) for a, b in zip(losses, expected))
    final, reference = loaded.state_dict(), straight.state_dict()
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[n], reference[n]) for n in reference)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    model, batches = MLP(), _mlp_batches(2)
    trainer = plait.compile_training(model, batches[0], lr=1e-2)
    trainer.step(*batches[0])
    trainer.save(tmp_path / "good")
    saved = {n: t.clone() for n, t in trainer.state_dict().items()}
    x, y = batches[1]
    with pytest.raises(NonFiniteLossError, match="step 1 .* non-finite loss"):
        trainer.step(x * float("inf"), y)
    with pytest.raises(NonFiniteLossError, match="nothing was saved"):
        trainer.save(tmp_path / "good")
    with pytest.raises(NonFiniteLossError, match="stopped"):
        trainer.step(*batches[0])
    loaded = plait.load_training(tmp_path / "good")
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in saved.items())


# ---- the IR -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_trainer():
    model, batches = MLP(), _mlp_batches(3, batch=8)
    return plait.compile_training(
        model, batches[0], accumulation=2, clip_grad_norm=1.0, pipeline=""
    ), batches


def _state_writes(module) -> int:
    return sum(1 for op in module.walk() if getattr(op, "target_name", "").endswith("_"))


def test_ir_round_trips_and_opt_keeps_state_updates(mlp_trainer, tmp_path):
    trainer, batches = mlp_trainer
    text = trainer.ir
    assert print_module(parse_module(text)) == text
    assert 'plait.param state "optimizer.exp_avg.fc1.weight"' in text
    source = tmp_path / "train.mlir"
    source.write_text(text)
    out = tmp_path / "opt.mlir"
    assert cli.main(["opt", str(source), "--pipeline", "canonicalize,cse,dce", "-o", str(out)]) == 0
    optimized = parse_module(out.read_text())
    assert _state_writes(optimized) == _state_writes(trainer.module)
    check_state_order(optimized)
    step = next(f for f in optimized.ops if f.sym_name.data == TRAIN_STEP)
    assert sorted(gradients(step)) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    # the optimized program trains as the unoptimized one does
    again = Trainer(
        optimized,
        trainer.weights,
        trainer.spec,
        1e-3,
        pipeline="",
        input_names=trainer.input_names,
        state_dict_names=trainer.state_dict_names,
        fills_mask=False,
    )
    for batch in batches:
        assert torch.equal(again.step(*batch), trainer.step(*batch))
    assert all(torch.equal(again.state_dict()[n], t) for n, t in trainer.state_dict().items())


def test_a_read_after_a_state_update_is_rejected():
    text = """builtin.module {
  func.func @train_step(%g : !plait.tensor<[4], f32>) -> !plait.tensor<[4], f32> {
    %w = plait.param state "w" : !plait.tensor<[4], f32>
    %u = plait.call "aten::add_.Tensor"(%w, %g) : !plait.tensor<[4], f32>
    %r = plait.elementwise "aten::mul.Tensor"(%w, 2.0) : !plait.tensor<[4], f32>
    func.return %r : !plait.tensor<[4], f32>
  }
}"""
    with pytest.raises(StateOrderError, match="reads state 'w' after .* overwrote it"):
        check_state_order(parse_module(text, "bad.mlir"))


# ---- bad input --------------------------------------------------------------------


class Returns(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)
        self.make = make

    def forward(self, x):
        return self.make(self.fc(x))


X = (torch.randn(2, 4),)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda y: y, r"loss of Returns is a torch.float32 tensor of shape \[2, 4\].*\.mean\(\)"),
        (lambda y: {"out": y}, "returned dict, not a loss.*loss_fn="),
        (lambda y: y.sum().long(), "not a floating-point scalar"),
    ],
)
def test_a_model_without_a_scalar_loss_is_rejected(make, message):
    with pytest.raises(TrainingError, match=message):
        plait.compile_training(Returns(make), X)


def test_parameters_without_gradient_are_named():
    with pytest.warns(UserWarning, match=r"unused.weight, unused.bias"):
        trainer = plait.compile_training(Returns(lambda y: y.pow(2).mean()), X)
    assert "unused.weight" in trainer.state_dict()


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(optimizer="lamb"), "optimizer 'lamb' does not exist; use one of adam, adamw, sgd"),
        (dict(momentum=0.9), "adamw has no option 'momentum'; its options are betas, eps"),
        (dict(betas=(0.9, 1.5)), r"betas\[1\]=1.5 must be in \[0.0, 1.0\)"),
        (dict(optimizer="sgd", nesterov=True), "nesterov momentum needs momentum > 0"),
    ],
)
def test_bad_optimizer_options_are_rejected(options, message):
    with pytest.raises(OptimizerError, match=message):
        plait.compile_training(Returns(lambda y: y.mean()), X, **options)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(lr="fast"), "lr='fast' must be a number or a schedule"),
        (dict(accumulation=0), "accumulation=0 must be an integer >= 1"),
        (dict(precision="fp16"), "precision='fp16' is not one of fp32, bf16-mixed"),
        (dict(clip_grad_norm=-1.0), "clip_grad_norm=-1.0 must be a number > 0"),
    ],
)
def test_bad_training_options_are_rejected(options, message):
    with pytest.raises(TrainingError, match=message):
        plait.compile_training(Returns(lambda y: y.mean()), X, **options)


def test_bad_schedules_and_batches_are_rejected_at_the_step(mlp_trainer):
    model, batches = MLP(), _mlp_batches(1)
    trainer = plait.compile_training(model, batches[0], lr=lambda step: float("nan"))
    with pytest.raises(TrainingError, match=r"learning rate of step 0 \(lr\(0\)\) is nan"):
        trainer.step(*batches[0])
    accumulating, _ = mlp_trainer
    with pytest.raises(TrainingError, match="cannot be split in 2 micro-batches"):
        accumulating.step(torch.randn(3, 8), torch.randn(3, 4))


def test_canonicalize_keeps_the_gradient_mark_of_a_folded_op():
    text = """builtin.module {
  func.func @train_step(%a : !plait.tensor<[4], f32>) -> !plait.tensor<[4], f32> {
    %s = plait.elementwise "aten::mul.Tensor"(%a, 2.0) : !plait.tensor<[4], f32>
    %v = plait.reshape "aten::view"(%s, [4]) {plait.grad_of = ["w"]} : !plait.tensor<[4], f32>
    func.return %v : !plait.tensor<[4], f32>
  }
}"""
    module = parse_module(text)
    PassManager.parse("canonicalize").run(module)
    (step,) = module.ops
    assert "aten::view" not in print_module(module)
    assert gradients(step)["w"].owner.target_name == "aten::mul.Tensor"
