"""fuse: each rank's program compiled through Inductor. A fused program
computes what torch.compile computes for the same model (the same fused
kernels); against eager, both differ by the same rounding (fused kernels
sum in another order), so parity is checked against torch.compile's step
at 1e-6 and against eager's losses at 1e-5. By default the program is one
graph; with `scope=blocks` each residual block is compiled once and the
layers that repeat it reuse the compiled graph. Sharded programs (tp:2,
ep:2) fused equal their unfused programs within 1e-5."""

from __future__ import annotations

import copy

import plait
import pytest
import torch
from plait.examples.models import EXAMPLES
from plait.ir.errors import PlaitError
from plait.ir.training import TRAIN_STEP
from test_training import _adamw, _hf_model, _lm_batches, _lm_loss

FUSED = "canonicalize,cse,dce,fuse"
BLOCKS = FUSED + "{scope=blocks}"
_LAYERS = {"llama": "num_hidden_layers", "gpt2": "n_layer"}


def _compiled_graphs(run) -> int:
    """How many graphs Dynamo compiled while `run()` ran (no graph break: a
    break would add graphs)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # (other tests' compiles count there too)
    run()
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_each_repeated_block_compiles_once_and_the_forward_equals_eager(name):
    layers = 3
    model = _hf_model(name, **{_LAYERS[name]: layers}).eval()  # (no dropout)
    ids = _lm_batches(1)[0][0]
    compiled = plait.compile(model, (ids,), pipeline=BLOCKS)
    assert "plait.fuse" in compiled.ir  # recorded in the plan, so artifacts and workers fuse too
    blocks = compiled.program.compiled
    calls = [n.target for n in blocks.graph.nodes if n.op == "call_module"]
    # a block per layer (its attention and MLP), then the head
    assert len(calls) == layers + 1 and len(set(calls)) == 2
    with torch.no_grad():
        expected = model(ids).logits
        graphs = _compiled_graphs(lambda: expected.sub_(compiled(ids).logits))
    assert graphs == 2  # each distinct block once, whatever the number of layers
    torch.testing.assert_close(expected, torch.zeros_like(expected), rtol=0, atol=1e-5)


def test_by_default_the_program_is_one_graph():
    model = _hf_model("llama", num_hidden_layers=2)
    ids = _lm_batches(1)[0][0]
    compiled = plait.compile(model, (ids,), pipeline=FUSED)
    with torch.no_grad():
        expected = model(ids).logits
        assert _compiled_graphs(lambda: expected.sub_(compiled(ids).logits)) == 1
    torch.testing.assert_close(expected, torch.zeros_like(expected), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "example, mesh",
    [("llama-tiny", "tp:2"), ("mixtral-tiny", "ep:2"), ("cnn-tiny", None)],
)
def test_the_fused_program_equals_the_unfused_one(example, mesh):
    """Each rank's program through Inductor gives the unfused program's
    outputs within 1e-5: over tp:2 (all-reduces), over ep:2 (MoE's custom
    expert ops and all-to-alls), and a CNN on one rank (convolutions, batch norm)."""
    model, inputs, _ = EXAMPLES[example]()
    sharded = f",shard{{mesh={mesh}}},dce" if mesh else ""
    plain = plait.compile(model, inputs, pipeline=f"canonicalize,cse,dce{sharded}")
    fused = plait.compile(model, inputs, pipeline=f"canonicalize,cse,dce{sharded},fuse")
    try:
        with torch.no_grad():
            expected, got = plain(*inputs), fused(*inputs)
    finally:
        plain.close()
        fused.close()
    expected = getattr(expected, "logits", expected)
    got = getattr(got, "logits", got)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_fused_generation_writes_the_cache_in_its_blocks_and_equals_transformers():
    model = _hf_model("llama", num_hidden_layers=2)
    ids = _lm_batches(1)[0][0][:, :6]
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
    generator = plait.compile_generation(model, batch=2, max_length=32, pipeline=BLOCKS)
    assert type(generator.program_of("decode").compiled).__name__ == "PlaitBlocks"
    assert torch.equal(generator.generate(ids, max_new_tokens=8), expected)


def _trained(model, batches, compiled: bool):
    """(losses, state) of torch AdamW steps, eager or through torch.compile."""
    reference = copy.deepcopy(model)
    optimizer = _adamw(reference.parameters())
    forward = torch.compile(reference) if compiled else reference
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = _lm_loss(forward, *batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), reference.state_dict()


def _plait_trained(model, batches, pipeline: str):
    trainer = plait.compile_training(
        copy.deepcopy(model), batches[0], optimizer="adamw", lr=1e-3, pipeline=pipeline
    )
    losses = [trainer.step(*batch) for batch in batches]
    blocks = trainer._program(TRAIN_STEP).compiled
    calls = [n.target for n in blocks.graph.nodes if n.op == "call_module"]
    return torch.stack(losses), trainer.state_dict(), calls


def test_a_fused_training_step_equals_torch_compile():
    model, batches = _hf_model("llama", num_hidden_layers=1), _lm_batches(3)
    expected, reference = _trained(model, batches, compiled=True)
    losses, trained, calls = _plait_trained(model, batches, FUSED)
    assert calls == []  # one graph
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)
    for name, tensor in reference.items():
        error = (trained[name] - tensor).abs().max().item()
        assert error <= 1e-6, f"{name}: max error {error:.3g} against torch.compile's step"


def test_a_fused_training_step_in_blocks_equals_eager_adamw():
    """Cut into blocks, Inductor fuses other kernels than torch.compile's
    whole graph, so the reference is eager's step; torch.compile's own
    parameters end 1.3e-5 from eager's after these 3 steps, the blocks'
    2.3e-5 (AdamW scales rounding up to lr where a gradient is near 0)."""
    model, batches = _hf_model("llama", num_hidden_layers=3), _lm_batches(3)
    expected, reference = _trained(model, batches, compiled=False)
    losses, trained, calls = _plait_trained(model, batches, BLOCKS)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)
    for name, tensor in reference.items():
        error = (trained[name] - tensor).abs().max().item()
        assert error <= 5e-5, f"{name}: max error {error:.3g} against eager AdamW"
    # the forward's layers share a block, and so do the backward's
    assert len(calls) == 3 + 1 + 2 + 1 and len(set(calls)) == 4


def test_fuse_after_memplan_is_refused():
    model = _hf_model("llama", num_hidden_layers=1)
    ids = _lm_batches(1)[0][0]
    with pytest.raises(PlaitError, match="drop memplan"):
        plait.compile(model, (ids,), pipeline="canonicalize,memplan,fuse")
