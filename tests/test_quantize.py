"""quantize pass and plait::quant_linear: kernels against a float64 dense
reference, whole models against eager with the dequantized weights, TP=2 on
gloo ranks against TP=1, the size budget chosen by z3, and bad input."""

from __future__ import annotations

import itertools

import plait
import pytest
import torch
from helpers import artifact_rank, max_rel_diff, run_ranks
from plait.customops import quant_linear as kernel
from plait.frontend import hf
from plait.passes.compress.bit_allocation import BudgetError, allocate
from plait.passes.compress.easyquant import easyquant
from plait.passes.compress.quantize import QuantizeError

PREFILL = (3, 100)  # 300 tokens: above DECODE_MAX_TOKENS, dequantize + GEMM in fp32


def _layer(bits: int, group: int, out: int = 96, cols: int = 256, bias: bool = True):
    torch.manual_seed(bits + group)
    w = torch.randn(out, cols) * 0.05
    q = easyquant(w, bits, group, steps=20)
    stored = kernel.pack_int4(q.q) if bits == 4 else q.q
    index, value = q.outlier_index.to(torch.int32)[None], q.outlier_value[None]
    b = torch.randn(out) if bias else None
    return (stored, q.scales, b, index, value, bits), q


@pytest.mark.parametrize("bits,group", [(8, 0), (8, 64), (4, 0), (4, 64), (4, 128)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_kernel_matches_the_dense_reference(bits, group, tokens):
    args, q = _layer(bits, group)
    assert q.outlier_value.numel() > 0  # the sparse add-back is exercised
    x = torch.randn(tokens, 256)
    ref = kernel.reference(x, *args)
    y = torch.ops.plait.quant_linear(x, *args, **kernel.prepare(*args[:2], bits, *args[3:5]))
    assert y.dtype == x.dtype and y.shape == (tokens, 96)
    uses_kernel = tokens <= kernel.DECODE_MAX_TOKENS[bits] and (bits == 4 or group == 0)
    # the weight-only kernels compute in bf16; dequantize + GEMM in the input's dtype
    assert max_rel_diff(y.double(), ref) <= (2e-2 if uses_kernel else 1e-5)
    assert (kernel.int_values(args[0], bits) == q.q).all()


def test_kernel_on_bf16_activations_and_3d_inputs():
    args, _ = _layer(4, 128)
    args = (*args[:4], args[4].bfloat16(), *args[5:])  # a bf16 model's outliers
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    y = torch.ops.plait.quant_linear(x, *args, **kernel.prepare(*args[:2], 4, *args[3:5]))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 96)
    assert max_rel_diff(y.double(), kernel.reference(x, *args)) <= 2e-2


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_native_dequantize_is_the_dense_weight_exactly(bits, group, dtype):
    from plait.customops.gqsa import extension

    if extension() is None:
        pytest.skip("no C++ compiler: the prefill dequantizes with torch ops")
    args, q = _layer(bits, group)
    out = torch.empty(40, 256, dtype=dtype)
    extension().dequantize_rows(args[0], args[1].float(), bits, 30, 70, out)
    none = torch.zeros(2, 0, dtype=torch.int32)
    want = q.q[30:70] if dtype == torch.int8 else kernel.dequantize(
        args[0][30:70], args[1][30:70], none, none[0].to(dtype), bits, dtype
    )  # fmt: skip
    assert torch.equal(out, want)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_dequantizes_into_one_bounded_reused_buffer(bits, group, dtype, monkeypatch):
    from plait.customops import gqsa

    monkeypatch.setattr(gqsa, "SCRATCH_BYTES", 40 * 256 * 4)  # 96 rows in 3 blocks (fp32)
    monkeypatch.setattr(gqsa._scratch, "buffers", {}, raising=False)  # as a fresh thread's
    args, _ = _layer(bits, group)
    prepared = kernel.prepare(*args[:2], bits, *args[3:5])
    x = torch.randn(2, 150, 256, dtype=dtype)
    y = torch.ops.plait.quant_linear(x, *args, **prepared)
    buffers = gqsa._scratch.buffers
    buffer = buffers[dtype, x.device]
    assert buffer.numel() * buffer.element_size() <= gqsa.SCRATCH_BYTES
    # another layer reuses it (grown to the largest block, here the same size)
    other, _ = _layer(bits, group, out=48)
    torch.ops.plait.quant_linear(x, *other, **kernel.prepare(*other[:2], bits, *other[3:5]))
    assert buffers[dtype, x.device] is buffer
    # fp32 keeps fp32 accuracy; bf16 is what a bf16 model's GEMM gives
    assert max_rel_diff(y.double(), kernel.reference(x, *args)) <= (
        1e-5 if dtype == torch.float32 else 2e-2
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_w8a8_prefill_multiplies_per_token_int8_activations(bits, monkeypatch):
    monkeypatch.setattr(kernel, "PREFILL_INT8_ACTIVATIONS", True)
    args, _ = _layer(bits, 0)
    none = torch.zeros(1, 2, 0, dtype=torch.int32)
    args = (*args[:3], none, none[0].float(), bits)  # the outliers see unrounded activations
    x = torch.randn(300, 256)
    y = torch.ops.plait.quant_linear(x, *args, **kernel.prepare(*args[:2], bits))
    step = x.abs().amax(-1, keepdim=True) / 127
    rounded = (x / step).round() * step
    # int32 products, exact: the dense layer on the rounded activations
    assert max_rel_diff(y.double(), kernel.reference(rounded, *args)) <= 1e-5
    # what rounding the activations costs on top of the weights' error (measured 4e-3)
    assert 1e-3 < max_rel_diff(y.double(), kernel.reference(x, *args)) <= 1e-2


def test_w8a8_leaves_grouped_layers_to_the_dequantized_prefill(monkeypatch):
    monkeypatch.setattr(kernel, "PREFILL_INT8_ACTIVATIONS", True)
    args, _ = _layer(4, 64)  # one scale per 64 inputs: no per-channel int8 product
    x = torch.randn(300, 256)
    y = torch.ops.plait.quant_linear(x, *args, **kernel.prepare(*args[:2], 4, *args[3:5]))
    assert max_rel_diff(y.double(), kernel.reference(x, *args)) <= 1e-5


def _unaligned(t: torch.Tensor, offset: int = 8) -> torch.Tensor:
    """A copy of `t` at `offset` bytes past an allocation, as safetensors maps
    a tensor at its offset in the file (8-byte aligned)."""
    buffer = torch.empty(t.numel() * t.element_size() + offset, dtype=torch.uint8)
    view = buffer[offset:].view(t.dtype).view(t.shape)
    view.copy_(t)
    return view


def test_int8_kernel_gets_aligned_operands():
    # _weight_int8pack_mm reads with aligned loads: at 8 bytes off it crashed the process
    args, _ = _layer(8, 0)
    weight = _unaligned(args[0])
    assert weight.data_ptr() % 16 and torch.equal(weight, args[0])
    prepared = kernel.prepare(weight, args[1], 8, *args[3:5])
    assert prepared["packed"].data_ptr() % 64 == 0 and torch.equal(prepared["packed"], args[0])
    x = torch.randn(kernel.DECODE_MAX_TOKENS_BF16[8], 256, dtype=torch.bfloat16)  # the kernel's
    y = torch.ops.plait.quant_linear(_unaligned(x), weight, *args[1:], **prepared)
    aligned = torch.ops.plait.quant_linear(x, *args, **kernel.prepare(*args[:2], 8, *args[3:5]))
    assert torch.equal(y, aligned)


# (bits, out, in, group, does the kernel take it): as PyTorch 2.13's CPU kernels do
# (probed: int4 raises on out % 16 and on groups other than 32-256; int8 with in % 16
# read past its rows, returning inf or crashing)
KERNEL_SHAPES = [(8, 96, 64, 0, True), (8, 96, 88, 0, False), (8, 96, 64, 32, False),
                 (4, 96, 64, 0, True), (4, 96, 256, 128, True), (4, 88, 64, 0, False),
                 (4, 96, 88, 0, False), (4, 96, 64, 16, False)]  # fmt: skip


@pytest.mark.parametrize("bits,out,cols,group,fits", KERNEL_SHAPES)
def test_shapes_the_kernels_cannot_take_run_dequantize_gemm(bits, out, cols, group, fits):
    args, _ = _layer(bits, group, out, cols)
    groups = cols // group if group else 1
    assert (kernel.kernel_misfit(bits, out, cols, groups) is None) == fits
    prepared = kernel.prepare(*args[:2], bits, *args[3:5])
    assert ("packed" in prepared) == fits
    x = torch.randn(5, cols)
    y = torch.ops.plait.quant_linear(x, *args, **prepared)
    # the kernels compute in bf16; dequantize + GEMM in the input's dtype
    assert max_rel_diff(y.double(), kernel.reference(x, *args)) <= (2e-2 if fits else 1e-5)


def test_weights_a_kernel_cannot_take_are_a_located_error():
    from plait.ir.text import parse_module
    from plait.ir.weights import WeightStore

    text = """builtin.module attributes {plait.libraries = ["plait.customops.quant_linear"]} {
  func.func @forward(%x: !plait.tensor<[4, 64], f32>) -> !plait.tensor<[4, 8], f32> {
    %q = plait.param "l.qweight" : !plait.tensor<[8, 64], f32> loc("model.l")
    %s = plait.param "l.scales" : !plait.tensor<[8, 1], f32> loc("model.l")
    %i = plait.param "l.outlier_index" : !plait.tensor<[1, 2, 0], i32> loc("model.l")
    %v = plait.param "l.outlier_value" : !plait.tensor<[1, 0], f32> loc("model.l")
    %y = plait.call "plait::quant_linear"(%x, %q, %s, none, %i, %v, 8) : !plait.tensor<[4, 8], f32> loc("model.l")
    func.return %y : !plait.tensor<[4, 8], f32>
  }
}
"""
    weights = WeightStore()
    weights.add("l.qweight", torch.randn(8, 64))  # float32 where int8 belongs
    weights.add("l.scales", torch.rand(8, 1))
    weights.add("l.outlier_index", torch.zeros(1, 2, 0, dtype=torch.int32))
    weights.add("l.outlier_value", torch.zeros(1, 0))
    program = plait.compile_ir(parse_module(text), weights, pipeline="dce")
    message = (
        r"<ir>:7:5 \(model.l\): plait::quant_linear with bits=8 needs a 2-D torch.int8 qweight"
    )
    with pytest.raises(plait.PlaitError, match=message):
        program(torch.randn(4, 64))


def _dequantized_model(model, compiled):
    """A copy of `model` whose quantized linears hold the weights the program computes with."""
    import copy

    twin = copy.deepcopy(model)
    params = dict(twin.model.named_parameters())  # the IR's names: the HF model's
    names = set(compiled.weight_names)
    for name in names:
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            get = lambda s: compiled.weights.get(f"{base}.{s}")  # noqa: E731
            bits = 4 if get("qweight").dtype == torch.uint8 else 8
            w = kernel.dequantize(
                get("qweight"),
                get("scales"),
                get("outlier_index"),
                get("outlier_value"),
                bits,
                torch.float32,
            )
            conv1d = type(twin.model.get_submodule(base)).__name__ == "Conv1D"
            with torch.no_grad():  # GPT-2's Conv1D keeps its weight as [in, out]
                params[f"{base}.weight"].copy_(w.t() if conv1d else w)
    return twin


@pytest.mark.parametrize("pipeline", [
    "quantize{bits=8}",
    "quantize{bits=4,method=rtn}",
    "quantize{bits=4,group=32,layers=*.self_attn.*}",
])  # fmt: skip
def test_llama_matches_eager_with_the_dequantized_weights(example, pipeline):
    model, example_inputs, shapes = example("llama-tiny")
    compiled = plait.compile(model, example_inputs, dynamic_shapes=shapes, pipeline=pipeline)
    twin = _dequantized_model(model, compiled)
    inputs = hf.example_inputs(model.model, *PREFILL)
    with torch.no_grad():
        assert max_rel_diff(compiled(*inputs), twin(*inputs)) <= 1e-5
        assert max_rel_diff(compiled(*inputs), model(*inputs)) > 1e-4  # it did quantize
        decode = hf.example_inputs(model.model, 1, 5)  # the weight-only kernels, bf16
        assert max_rel_diff(compiled(*decode), twin(*decode)) <= 3e-2
    quantized = compiled.ir.count('"plait::quant_linear"')
    assert quantized == (8 if "self_attn" in pipeline else 15)  # 7 per layer, and lm_head
    assert "#plait.quant<" in compiled.ir and "error = " in compiled.ir


def test_gpt2_conv1d_layers_are_quantized(example):
    model, example_inputs, shapes = example("gpt2-tiny")
    compiled = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline="canonicalize,cse,dce,quantize{bits=4,group=16,layers=transformer.*}",
    )
    # (lm_head shares its weight with the embedding; it stays out of the eager twin)
    assert "aten::addmm" not in compiled.ir and compiled.ir.count('"plait::quant_linear"') == 8
    inputs = hf.example_inputs(model.model, *PREFILL)
    with torch.no_grad():
        assert max_rel_diff(compiled(*inputs), _dequantized_model(model, compiled)(*inputs)) <= 1e-5


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_tensor_parallel_quantization_is_the_same_model(example, tmp_path, name):
    model, example_inputs, shapes = example(name)
    pipeline = "canonicalize,cse,dce,{}quantize{{bits=4,group=8}}"
    single = plait.compile(
        model, example_inputs, dynamic_shapes=shapes, pipeline=pipeline.format("")
    )
    sharded = plait.compile(
        model, example_inputs, dynamic_shapes=shapes, pipeline=pipeline.format("shard{mesh=tp:2},")
    )
    assert "plait::quant_linear" in sharded.ir and "shard(1)" in sharded.ir
    sharded.save(tmp_path)
    inputs = hf.example_inputs(model.model, *PREFILL)
    with torch.no_grad():
        ref = single(*inputs)
    for out, _ in run_ranks(2, artifact_rank, str(tmp_path), list(inputs)):
        assert max_rel_diff(out, ref) <= 1e-5


def test_row_parallel_groups_must_not_straddle_shards(example):
    model, example_inputs, _ = example("llama-tiny")
    # down_proj reads 176 features, 88 per rank: groups of 16 divide 176 but not 88
    message = (
        r"down_proj is row-parallel over 2 ranks \(88 input .* group that divides 88 \(8, 22, 44\)"
    )
    with pytest.raises(QuantizeError, match=message):
        plait.compile(model, example_inputs, pipeline="shard{mesh=tp:2},quantize{group=16}")


def test_sharding_after_compression_is_refused(example):
    model, example_inputs, _ = example("llama-tiny")
    with pytest.raises(plait.PlaitError, match="put shard before quantize and sparsify"):
        plait.compile(model, example_inputs, pipeline="quantize,shard{mesh=tp:2}")


def test_artifact_holds_packed_weights_and_runs_the_same(example, tmp_path):
    from safetensors import safe_open

    model, example_inputs, shapes = example("llama-tiny")
    compiled = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline="quantize{bits=4,group=32,layers=*.mlp.up_proj}",
    )
    compiled.save(tmp_path)
    with safe_open(str(tmp_path / "weights.safetensors"), framework="pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.up_proj.qweight")
        assert "model.layers.0.mlp.up_proj.weight" not in f.keys()
    assert packed.dtype == torch.uint8 and packed.shape == (176, 32)  # two 4-bit values a byte
    again = plait.load(tmp_path)
    inputs = hf.example_inputs(model.model, 1, 3)
    assert torch.equal(again(*inputs), compiled(*inputs))


def test_size_budget_is_met_with_the_least_error(example):
    model, example_inputs, _ = example("llama-tiny")
    dense = sum(p.numel() * 4 for n, p in model.named_parameters() if "proj" in n)
    compiled = plait.compile(
        model, example_inputs, pipeline="quantize{size-budget=0.2,layers=*proj}"
    )
    used = sum(
        compiled.weights.get(n).numel() * compiled.weights.get(n).element_size()
        for n in compiled.weight_names
        if "proj" in n
    )
    assert used <= 0.2 * dense
    dtypes = {compiled.weights.get(n).dtype for n in compiled.weight_names if "qweight" in n}
    assert dtypes == {torch.uint8, torch.int8}  # a mix of 4 and 8 bits fits best


def test_allocation_is_optimal_against_brute_force():
    torch.manual_seed(0)
    candidates = {
        f"l{i}": {4: (100 + 7 * i, 5.0 + i), 8: (200 + 9 * i, 1.0 + i / 3), 32: (800, 0.0)}
        for i in range(6)
    }
    budget = 1900
    best = min(
        (sum(candidates[f"l{i}"][b][1] for i, b in enumerate(combo)), combo)
        for combo in itertools.product((4, 8, 32), repeat=6)
        if sum(candidates[f"l{i}"][b][0] for i, b in enumerate(combo)) <= budget
    )
    result = allocate(candidates, budget)
    assert result.status == "optimal" and result.bytes <= budget
    assert result.error == pytest.approx(best[0])
    with pytest.raises(BudgetError, match="below the smallest choice, 705 bytes"):
        allocate(candidates, 700)


def test_quantize_needs_real_weights():
    from plait.frontend.hf import wrap
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = wrap(
            LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=64,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                )
            )
        )
    inputs = hf.example_inputs(model.model, 1, 4)
    with pytest.raises(plait.PlaitError, match="quantize needs the weight of model.layers.0"):
        plait.compile(model, inputs, pipeline="quantize")


def test_bad_options_name_what_to_change():
    with pytest.raises(plait.PlaitError, match="bits must be 4 or 8, not 3"):
        plait.compile(torch.nn.Linear(4, 4), (torch.randn(1, 4),), pipeline="quantize{bits=3}")


def test_estimate_reports_bits_per_weight_with_metadata(example):
    from plait.cost.estimate_report import compression

    model, example_inputs, _ = example("llama-tiny")
    compiled = plait.compile(
        model, example_inputs, pipeline="quantize{bits=8,method=rtn,layers=*.mlp.*}"
    )
    # int8 values, one float32 scale per output channel, no outliers
    mlp = [m for n, m in model.model.named_modules() if ".mlp." in n and hasattr(m, "weight")]
    weights = sum(m.weight.numel() for m in mlp)
    stored = weights + sum(m.weight.shape[0] * 4 for m in mlp)
    ((label, text),) = compression(compiled.estimate("cpu"))
    assert label == "compressed linears"
    assert f"{8 * stored / weights:.2f} bits per weight" in text
