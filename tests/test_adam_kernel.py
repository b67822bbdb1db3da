"""The torch backend runs each Adam/AdamW update as one C++ pass
(customops/adam.cpp): the same numbers, bit for bit, as the optimizer rows'
eight ATen calls, and so as torch.optim."""

from __future__ import annotations

import copy

import plait
import pytest
import torch
from plait.customops import adam


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


@pytest.mark.parametrize("numel", [1, 15, 16384, 16385, 200_003])  # (the kernel's blocks: 16384)
@pytest.mark.parametrize("weight, decay", [(0.1, 1 - 1e-5), (0.7, None)])  # lerp's two forms
def test_the_one_pass_update_is_the_eight_aten_calls_bit_for_bit(numel, weight, decay):
    assert adam.extension() is not None, "the Adam C++ kernel did not build"
    torch.manual_seed(numel)
    p, g = torch.randn(numel), torch.randn(numel) * 1e-3
    m, v = torch.randn(numel) * 1e-3, torch.rand(numel) * 1e-6
    scalars = (None if decay is None else _f32(decay), weight, 0.999, 1 - 0.999)
    tail = (_f32(0.0297), _f32(1e-8), _f32(-0.0037))
    native, rows = [t.clone() for t in (p, m, v)], [t.clone() for t in (p, m, v)]
    adam.adam_update_(*native, g, *scalars, *tail)
    adam.reference(*rows, g, *scalars, *tail)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), native, rows):
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} of {numel} values differ"


@pytest.mark.parametrize(
    "optimizer, weight_decay", [("adamw", 0.01), ("adam", 0.01), ("adam", 0.0)]
)
def test_an_nn_sequential_trains_exactly_as_torch_optim(optimizer, weight_decay):
    """Every update runs fused, and 5 steps equal eager + torch.optim bit for bit.
    (nn.Sequential's forward takes `input`, a Python builtin's name: its
    program once failed to build.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
    eager = copy.deepcopy(model)
    x, y = torch.randn(16, 24), torch.randn(16, 1)

    def loss_fn(out, x, y):
        return ((out - y) ** 2).mean()

    trainer = plait.compile_training(
        model, (x, y), loss_fn=loss_fn, optimizer=optimizer, lr=1e-2, weight_decay=weight_decay
    )
    code = trainer._program("train_step").graph_module.code
    assert code.count("adam_update_") == 4 and "lerp_" not in code
    torch_optimizer = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[optimizer]
    reference = torch_optimizer(eager.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(5):
        loss = trainer.step(x, y)
        reference.zero_grad()
        expected = loss_fn(eager(x), x, y)
        expected.backward()
        reference.step()
        assert torch.equal(loss, expected.detach())
    trained = trainer.state_dict()
    assert all(torch.equal(trained[n], t) for n, t in eager.state_dict().items())
