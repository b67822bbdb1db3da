"""fuse: each rank's program compiled through Inductor. A fused program
computes what torch.compile computes for the same model (the same fused
kernels); against eager, both differ by the same rounding (fused kernels
sum in another order), so parity is checked against torch.compile's step
at 1e-6 and against eager's losses at 1e-5."""

from __future__ import annotations

import copy

import plait
import pytest
import torch
from plait.ir.errors import PlaitError
from test_training import _adamw, _hf_model, _lm_batches, _lm_loss

FUSED = "canonicalize,cse,dce,fuse"


def test_a_fused_forward_equals_eager_and_runs_compiled():
    model = _hf_model("llama", num_hidden_layers=1)
    ids = _lm_batches(1)[0][0]
    compiled = plait.compile(model, (ids,), pipeline=FUSED)
    assert "plait.fuse" in compiled.ir  # recorded in the plan, so artifacts and workers fuse too
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # (other tests' compiles count there too)
    with torch.no_grad():
        out, expected = compiled(ids).logits, model(ids).logits
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, no break
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_fused_training_step_equals_torch_compile():
    model = _hf_model("llama", num_hidden_layers=1)
    batches = _lm_batches(3)
    reference = copy.deepcopy(model)
    optimizer, forward = _adamw(reference.parameters()), torch.compile(reference)
    expected = []
    for batch in batches:
        optimizer.zero_grad()
        loss = _lm_loss(forward, *batch)
        loss.backward()
        optimizer.step()
        expected.append(loss.detach())
    trainer = plait.compile_training(model, batches[0], optimizer="adamw", lr=1e-3, pipeline=FUSED)
    losses = [trainer.step(*batch) for batch in batches]
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-5, atol=0)
    trained = trainer.state_dict()
    for name, tensor in reference.state_dict().items():
        error = (trained[name] - tensor).abs().max().item()
        assert error <= 1e-6, f"{name}: max error {error:.3g} against torch.compile's step"


def test_fuse_after_memplan_is_refused():
    model = _hf_model("llama", num_hidden_layers=1)
    ids = _lm_batches(1)[0][0]
    with pytest.raises(PlaitError, match="drop memplan"):
        plait.compile(model, (ids,), pipeline="canonicalize,memplan,fuse")
