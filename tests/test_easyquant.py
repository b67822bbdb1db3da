"""EasyQuant and round-to-nearest: ranges, outliers, and reconstruction error
against RTN at equal bits on transformer weights."""

from __future__ import annotations

import pytest
import torch
from plait.passes.compress.easyquant import (
    COARSE,
    DEFAULT_SIGMA,
    MAX_OUTLIERS,
    _errors,
    _grouped,
    _search_scales,
    easyquant,
    rtn,
    split_outliers,
)
from plait.passes.compress.quantize import quantized_bytes


@pytest.fixture(scope="module")
def weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    )
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("bits,group,bound", [(4, 0, 0.8), (4, 128, 0.8), (8, 0, 0.9)])
def test_easyquant_beats_rtn_with_few_outliers(weights, bits, group, bound):
    rtn_error = sum(rtn(w, bits, group).relative_error(w) for w in weights)
    quantized = [easyquant(w, bits, group, steps=100) for w in weights]
    eq_error = sum(q.relative_error(w) for q, w in zip(quantized, weights))
    assert eq_error <= bound * rtn_error  # int4: the goal; int8: better than RTN
    assert max(q.outlier_fraction for q in quantized) <= 0.01


@pytest.mark.parametrize("group", [128, 0])
def test_int4_beats_rtn_with_more_storage(weights, group):
    """EasyQuant's bytes (outliers included) buy less error than RTN's at
    groups of 32, which take more bytes."""
    quantized = [easyquant(w, 4, group) for w in weights]
    baseline = [rtn(w, 4, 32) for w in weights]
    assert sum(map(quantized_bytes, quantized)) <= sum(map(quantized_bytes, baseline))
    error = sum(((q.dequantize() - w) ** 2).sum() for q, w in zip(quantized, weights))
    assert error < sum(((q.dequantize() - w) ** 2).sum() for q, w in zip(baseline, weights))


@pytest.mark.parametrize("bits,group", [(4, 16), (4, 128), (4, 0), (8, 0)])
def test_search_never_ends_worse_than_its_first_grid_point(bits, group):
    """Every group's error is at most its error at the best coarse grid point,
    on heavy-tailed weights where descent from there is easy to get wrong."""
    torch.manual_seed(bits + group)
    weight = torch.distributions.StudentT(3.0).sample((96, 256)) * 0.02
    q = easyquant(weight, bits, group)
    w, _ = split_outliers(weight, DEFAULT_SIGMA, MAX_OUTLIERS)
    grouped = _grouped(w, group)
    start = _errors(grouped, _search_scales(grouped, bits, COARSE), bits)
    final = _errors(grouped, q.scales, bits)
    assert bool((final <= start * (1 + 1e-6)).all())
    assert float(final.sum()) < float(start.sum())  # and it does improve on the grid


def test_codes_scales_and_outliers():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[3, 17] = 1.5  # a planted outlier
    q = easyquant(w, bits=4, group=64, steps=20)
    assert q.q.dtype == torch.int8 and int(q.q.min()) >= -8 and int(q.q.max()) <= 7
    assert q.scales.shape == (64, 4) and bool((q.scales > 0).all())
    assert (3, 17) in set(zip(q.outlier_index[0].tolist(), q.outlier_index[1].tolist()))
    assert q.dequantize()[3, 17] == w[3, 17]  # outliers are kept exactly
    assert q.relative_error(w) < rtn(w, 4, 64).relative_error(w)


def test_groups_must_divide_the_row():
    with pytest.raises(ValueError, match="group size 100 does not divide the 256 input features"):
        rtn(torch.randn(4, 256), 4, 100)
