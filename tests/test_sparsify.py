"""GQSA: which groups survive, the C++ block-sparse kernel and the dense path
against a float64 reference, whole models against eager with the dense GQSA
weights, and row-parallel shards on gloo ranks."""

from __future__ import annotations

import copy

import plait
import pytest
import torch
from helpers import artifact_rank, max_rel_diff, run_ranks
from plait.customops import gqsa as kernel
from plait.frontend import hf
from plait.ir.attrs import PLACEMENTS_ATTR, shard
from plait.ir.ops import ParamOp
from plait.passes.compress.gqsa import gqsa


@pytest.mark.parametrize("segments", [1, 2])
def test_the_weakest_groups_are_pruned_evenly(segments):
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    s = gqsa(w, group=16, sparsity=0.75, segments=segments)
    assert s.values.shape == (32, 4, 8) and s.blocks.shape == (32, 4)  # 16 groups, 4 kept
    norms = w.reshape(32, segments, 16 // segments, 16).norm(dim=-1)
    kept = s.blocks.long().reshape(32, segments, -1)
    for row in range(32):
        for seg in range(segments):
            mask = torch.zeros(16 // segments, dtype=torch.bool)
            mask[kept[row, seg]] = True
            assert norms[row, seg][mask].min() >= norms[row, seg][~mask].max()
    dense = s.dense()
    groups = dense.reshape(32, 16, 16)
    assert int((groups.abs().sum(-1) > 0).sum(1).max()) <= 4  # pruned groups are zero
    kept_error = (dense - w).reshape(32, 16, 16)[groups.abs().sum(-1) > 0]
    assert kept_error.abs().max() <= w.abs().max() / 7  # survivors are int4 of their group


@pytest.mark.parametrize("group", [8, 16, 32, 64])
@pytest.mark.parametrize("tokens", [1, 5, 100])
def test_kernel_matches_the_dense_reference(group, tokens):
    torch.manual_seed(group)
    s = gqsa(torch.randn(48, 256) * 0.05, group=group, sparsity=0.5)
    args = (s.values, s.scales, s.blocks, torch.randn(48), group)
    x = torch.randn(tokens, 256)
    y = torch.ops.plait.gqsa_linear(x, *args, **kernel.prepare_args([x, *args]))
    assert y.shape == (tokens, 48)
    assert max_rel_diff(y.double(), kernel.reference(x, *args)) <= 1e-5
    if tokens <= kernel.SPARSE_MAX_TOKENS:  # the C++ kernel ran, unless it could not build
        assert kernel.extension() is not None, "the GQSA C++ kernel did not build"


@pytest.mark.parametrize("widened", [False, True])  # float16/int16 as stored, or 32-bit
@pytest.mark.parametrize("tokens", [1, 2, 16, 17, 33])
def test_token_tiles_of_the_kernel_match_the_dense_reference(tokens, widened):
    # groups of 16 at 2+ tokens run in tiles of up to 16 tokens (AVX-512):
    # full tiles, a remainder, an odd kept count, on a strided input
    torch.manual_seed(tokens)
    s = gqsa(torch.randn(40, 272) * 0.05, group=16, sparsity=0.6)
    scales, blocks = (s.scales.float(), s.blocks.int()) if widened else (s.scales, s.blocks)
    args = (s.values, scales, blocks, None, 16)
    x = torch.randn(272, tokens).t()
    y = torch.ops.plait.gqsa_linear(x, *args, **kernel.prepare_args([x, *args]))
    assert s.values.shape[1] % 2 and max_rel_diff(y.double(), kernel.reference(x, *args)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rebuilds_the_dense_weight_in_one_bounded_buffer(dtype, monkeypatch):
    if kernel.extension() is None:
        pytest.skip("no C++ compiler: the prefill densifies with torch ops")
    monkeypatch.setattr(kernel, "SCRATCH_BYTES", 16 * 256 * 4)  # 48 rows in 3 blocks (fp32)
    monkeypatch.setattr(kernel._scratch, "buffers", {}, raising=False)  # as a fresh thread's
    s = gqsa(torch.randn(48, 256) * 0.05, group=16, sparsity=0.5)
    args = (s.values, s.scales, s.blocks, None, 16)
    prepared = kernel.prepare_args([None, *args])
    rows = torch.empty(20, 256, dtype=dtype)
    kernel.extension().densify_rows(s.values, *prepared.values(), 16, 10, 30, rows)
    assert torch.equal(rows, s.dense(dtype)[10:30])
    x = torch.randn(100, 256, dtype=dtype)
    y = torch.ops.plait.gqsa_linear(x, *args, **prepared)
    buffer = kernel._scratch.buffers[dtype, x.device]
    assert buffer.numel() * buffer.element_size() <= kernel.SCRATCH_BYTES
    want = torch.nn.functional.linear(x, s.dense(dtype))  # bf16: a bf16 model's layer
    assert max_rel_diff(y.double(), want.double()) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_a_layout_the_kernel_cannot_read_is_refused_when_prepared():
    s = gqsa(torch.randn(48, 256), group=16, sparsity=0.5)
    args = [None, s.values, s.scales, s.blocks, None, 16]
    prepared = kernel.prepare_args(args)
    # the stored float16 scales and int16 blocks, read as they are
    scales, blocks = prepared["kernel_scales"], prepared["kernel_blocks"]
    assert scales.dtype == torch.float16 and blocks.dtype == torch.int16 and blocks.is_contiguous()
    with pytest.raises(plait.PlaitError, match=r"needs uint8 values \[out, kept, 8\]"):
        kernel.prepare_args([None, s.values.reshape(48, -1, 4), *args[2:]])  # groups of 8


def _dense_twin(model, compiled, group: int = 16):
    """`model` with each GQSA layer's dense weight, as the program stores it."""
    twin = copy.deepcopy(model)
    params = dict(twin.model.named_parameters())
    for op in compiled.module.walk():
        if isinstance(op, ParamOp) and op.weight_name.endswith(".values"):
            base = op.weight_name.removesuffix(".values")
            placement = op.attributes.get(PLACEMENTS_ATTR)
            row_parallel = placement is not None and placement.data[0] == shard(1)
            weight = params[f"{base}.weight"]
            w = kernel.dense_weight(
                *(compiled.weights.get(f"{base}.{n}") for n in ("values", "scales", "blocks")),
                group,
                weight.shape[1],
                compiled.world_size if row_parallel else 1,
            )
            with torch.no_grad():
                weight.copy_(w)
    return twin


def test_llama_matches_eager_with_the_dense_gqsa_weights(example):
    model, example_inputs, shapes = example("llama-tiny")
    compiled = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline="sparsify{group=16,sparsity=0.5,layers=*.layers.*}",
    )
    assert compiled.ir.count('"plait::gqsa_linear"') == 14
    twin = _dense_twin(model, compiled)
    with torch.no_grad():
        for batch, seq in ((1, 5), (3, 30)):  # the sparse kernel, then densify + GEMM
            inputs = hf.example_inputs(model.model, batch, seq)
            assert max_rel_diff(compiled(*inputs), twin(*inputs)) <= 1e-5


def test_row_parallel_shards_keep_their_own_groups(example, tmp_path):
    model, example_inputs, shapes = example("llama-tiny")
    # down_proj reads 176 features, 88 per rank: groups of 8 fit each rank's slice
    compiled = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline="shard{mesh=tp:2},sparsify{group=8,layers=*.mlp.down_proj}",
    )
    assert "shard(1)" in compiled.ir and compiled.ir.count("plait::gqsa_linear") == 2
    compiled.save(tmp_path)
    twin = _dense_twin(model, compiled, group=8)
    inputs = hf.example_inputs(model.model, 2, 7)
    with torch.no_grad():
        ref = twin(*inputs)
    for out, _ in run_ranks(2, artifact_rank, str(tmp_path), list(inputs)):
        assert max_rel_diff(out, ref) <= 1e-5
    with pytest.raises(
        plait.PlaitError, match=r"down_proj per rank \(88\) do not split into groups of 16"
    ):
        plait.compile(model, example_inputs, pipeline="shard{mesh=tp:2},sparsify{group=16}")


def test_activation_aware_importance_keeps_the_groups_that_meet_large_inputs():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    norms = torch.ones(64)
    norms[:16] = 100.0  # the first group of each row sees large inputs
    w[:, :16] *= 0.05  # ... but has small weights: magnitude alone prunes it
    by_magnitude = gqsa(w, group=16, sparsity=0.75)
    by_activation = gqsa(w, group=16, sparsity=0.75, input_norms=norms)
    assert (by_magnitude.blocks != 0).all() and (by_activation.blocks == 0).all()


def test_activation_importance_needs_calibration_and_runs_it(example):
    model, example_inputs, shapes = example("llama-tiny")
    pipeline = "sparsify{layers=*.mlp.*,importance=activation}"
    with pytest.raises(
        plait.PlaitError, match=r"needs calibration inputs: plait.compile\(\.\.\., calibration"
    ):
        plait.compile(model, example_inputs, pipeline=pipeline)
    calibration = [hf.example_inputs(model.model, 4, 32)]
    compiled = plait.compile(
        model, example_inputs, dynamic_shapes=shapes, pipeline=pipeline, calibration=calibration
    )
    magnitude = plait.compile(
        model, example_inputs, dynamic_shapes=shapes, pipeline="sparsify{layers=*.mlp.*}"
    )
    blocks = "model.layers.0.mlp.down_proj.blocks"
    assert not torch.equal(compiled.weights.get(blocks), magnitude.weights.get(blocks))
    inputs = hf.example_inputs(model.model, 3, 30)
    with torch.no_grad():
        assert max_rel_diff(compiled(*inputs), _dense_twin(model, compiled)(*inputs)) <= 1e-5


def test_activation_importance_reads_conv1d_inputs(example):
    # GPT-2's addmm(bias, x, W): the activation is the second argument, not the bias
    model, example_inputs, shapes = example("gpt2-tiny")
    compiled = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline="sparsify{layers=transformer.*,importance=activation}",
        calibration=[hf.example_inputs(model.model, 4, 32)],
    )
    assert compiled.ir.count('"plait::gqsa_linear"') == 8
