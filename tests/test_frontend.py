"""Capture: real, fake and meta inputs; symbolic dims with ranges; Hugging Face
names and buffers; models too big to allocate; clear errors."""

from __future__ import annotations

import plait
import pytest
import torch
from plait.frontend import hf
from plait.frontend.capture import CaptureError, capture
from plait.frontend.importer import GraphImportError, import_program
from plait.ir.attrs import SymbolsAttr
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_llama3_70b_shaped_model_captures_on_meta_without_allocating():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=2,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    )
    before = _rss_bytes()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    captured = capture(hf.wrap(model), hf.example_inputs(model, 1, 16))
    module, weights = import_program(captured)
    grown = _rss_bytes() - before
    assert grown < 1.5e9, (
        f"RSS grew by {grown / 1e9:.1f} GB; weights were allocated"
    )  # real: ~12 GB
    assert all(weights.is_meta(name) for name in weights.names())
    assert "!plait.tensor<[28672, 8192], f32>" in plait.ir.text.print_module(module)


def test_fake_tensor_inputs(example):
    model, (images,), shapes = example("cnn-tiny")
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.empty(4, 3, 32, 32)
    program = plait.compile(model, (fake,), dynamic_shapes=shapes)
    assert torch.allclose(program(images), model(images).detach(), atol=1e-6)


def test_dynamic_dims_are_named_symbols_with_ranges():
    class Scale(torch.nn.Module):
        def forward(self, x, y):
            return x.reshape(-1) * 2, torch.cat([x, y], dim=1)

    x, y = torch.randn(3, 4), torch.randn(3, 5)
    rows = Dim("rows", min=2, max=100)
    captured = capture(Scale(), (x, y), {"x": {0: rows, 1: Dim("länge")}, "y": {0: rows}})
    module, _ = import_program(captured)
    text = plait.ir.text.print_module(module)
    symbols = module.attributes["plait.symbols"]
    assert isinstance(symbols, SymbolsAttr)
    assert symbols.ranges["rows"] == (2, 100)
    assert "d0" in symbols.ranges  # the MLIR lexer takes ASCII names only
    assert "!plait.tensor<[d0*rows], f32>" in text
    assert "!plait.tensor<[rows, d0 + 5], f32>" in text


def test_hugging_face_wrapper_keeps_state_dict_names(example):
    model, inputs, _ = example("llama-tiny")
    _, weights = import_program(capture(model, inputs))
    expected = set(model.model.state_dict())
    assert {n for n in weights.names() if not n.endswith("inv_freq")} <= expected
    assert "model.rotary_emb.inv_freq" in weights.names()  # a non-persistent buffer, kept
    tensor = weights.get("model.layers.0.mlp.up_proj.weight")
    assert tensor.data_ptr() == model.model.model.layers[0].mlp.up_proj.weight.data_ptr()


def test_capture_leaves_each_submodule_in_its_own_mode(example):
    model, inputs, _ = example("gpt2-tiny")
    wrapper = hf.wrap(model.model)  # a fresh wrapper is in training mode
    capture(wrapper, inputs)
    assert wrapper.training and not model.model.training


def test_not_a_module_is_a_clear_error():
    with pytest.raises(CaptureError, match="expected a torch.nn.Module"):
        capture(lambda x: x, (torch.randn(2),))


def test_untraceable_model_names_the_export_failure():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x + 1
            return x - 1

    with pytest.raises(CaptureError, match="torch.export could not capture Branchy"):
        capture(Branchy(), (torch.randn(3),))


def test_data_dependent_shapes_name_the_op():
    class Nonzero(torch.nn.Module):
        def forward(self, x):
            return x[x > 0]

    with pytest.raises(plait.PlaitError, match="data-dependent shape"):
        import_program(capture(Nonzero(), (torch.randn(8),)))


def test_torch_cond_is_refused_naming_the_construct_and_the_source_line():
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda x: self.proj(x), lambda x: x - 1, (x,))

    line = Gate.forward.__code__.co_firstlineno + 1
    with pytest.raises(GraphImportError) as info:
        import_program(capture(Gate(), (torch.randn(2, 4),)))
    message = str(info.value)
    assert "torch.cond (torch.ops.higher_order.cond" in message and "not supported" in message
    assert f"{__file__}:{line}: return torch.cond(" in message
    assert "select with torch.where" in message


def test_in_place_write_into_a_view_is_rejected_with_its_location():
    class Scatter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.proj(x)
            y[:, 0] = 0
            return y

    with pytest.raises(GraphImportError, match="in-place aten::fill_.Tensor .* a view"):
        import_program(capture(Scatter(), (torch.randn(2, 4),)))


def test_size_one_example_for_a_dynamic_dim_is_explained():
    class Id(torch.nn.Module):
        def forward(self, tokens):
            return tokens * 2

    with pytest.raises(
        CaptureError, match="'tokens' has size 1 in dim 0, which is dynamic \\('batch'\\)"
    ):
        capture(Id(), (torch.ones(1, 4),), {"tokens": {0: Dim("batch", max=8)}})


def test_in_place_on_a_split_chunk_is_a_write_into_a_view():
    class Chunked(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            first, _ = y.split(2)
            first.add_(1)  # writes into y
            return y

    with pytest.raises(GraphImportError, match="in-place aten::add_.Tensor .* a view"):
        import_program(capture(Chunked(), (torch.ones(4),)))


def test_in_place_ops_keep_the_updated_tensors_dtype():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.linspace(0.5, 2.0, 4))  # float32

        def forward(self, x):
            y = x.exp()
            y.mul_(self.scale)  # computed in float32, stored in float16
            return y + 1

    model, x = Mixed(), torch.randn(4, dtype=torch.float16)
    program = plait.compile(model, (x,))
    out, ref = program(x), model(x).detach()
    assert out.dtype == torch.float16 and torch.equal(out, ref)


def test_an_output_that_is_not_a_tensor_is_named_by_its_position():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x * 2, 3

    with pytest.raises(GraphImportError, match=r"output 1 of the model is 3 \(int\), not a tensor"):
        import_program(capture(Pair(), (torch.randn(2),)))
