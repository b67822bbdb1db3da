"""The torch backend: readable per-rank programs that call ATen directly,
bind weights without copies, compute symbolic sizes, and lower collectives
(checked on real gloo process groups)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import collectives_rank, run_ranks
from plait.backends.fx import LoweringError, build_program
from plait.ir.text import parse_module
from plait.ir.weights import WeightStore


def test_program_source_is_readable_aten(compiled):
    code = compiled("llama-tiny").code
    assert "def forward(self, input_ids, attention_mask):" in code
    assert "seq = torch.ops.aten.sym_size.int(input_ids, 1)" in code
    assert "torch._C._nn.linear(" in code  # ATen's own Python bindings: no dispatch overhead
    assert "torch._C._nn.scaled_dot_product_attention(" in code
    assert "torch.ops.aten.index.Tensor(" in code  # ops without a binding keep their overload


def test_weights_are_bound_without_copies(example, compiled):
    model, _, _ = example("llama-tiny")
    program = compiled("llama-tiny").program.graph_module
    bound = program.model_layers_0_mlp_up_proj_weight  # a flat attribute
    assert bound.data_ptr() == model.model.model.layers[0].mlp.up_proj.weight.data_ptr()


def test_an_op_without_a_lowering_names_its_location_and_the_fix():
    text = """\
builtin.module {
  func.func @forward(%x : !plait.tensor<[2], f32>) -> !plait.tensor<[2], f32> {
    %y = plait.call "no_such_lib::fancy_op"(%x) : !plait.tensor<[2], f32> loc("model.block.3")
    func.return %y : !plait.tensor<[2], f32>
  }
}
"""
    with pytest.raises(LoweringError) as info:
        build_program(parse_module(text, "x.mlir"), WeightStore())
    message = str(info.value)
    assert "x.mlir:3:5" in message and "model.block.3" in message
    assert (
        "'no_such_lib::fancy_op' is not registered" in message and "import the library" in message
    )


def test_collectives_need_a_process_group():
    from helpers import COLLECTIVES_IR

    with pytest.raises(LoweringError, match="needs a process group"):
        build_program(parse_module(COLLECTIVES_IR), WeightStore())


def test_collectives_on_two_gloo_ranks():
    results = run_ranks(2, collectives_rank)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    inputs = [base, base + 100]
    for rank, (outputs, code) in enumerate(results):
        total, maximum, gathered, scattered, columns, negated, swapped, rows, row_sums = outputs
        assert torch.equal(total, inputs[0] + inputs[1])
        assert torch.equal(maximum, inputs[1])
        assert torch.allclose(gathered, torch.cat([inputs[0].exp(), inputs[1].exp()], dim=1))
        assert torch.equal(scattered, (inputs[0] + inputs[1])[2 * rank : 2 * rank + 2])
        assert torch.equal(columns, (inputs[0] + inputs[1])[:, 3 * rank : 3 * rank + 3])
        assert torch.equal(negated, -(inputs[0] + inputs[1]))
        # all-to-all: this rank's columns of every rank's x, stacked by rank
        mine = slice(3 * rank, 3 * rank + 3)
        assert torch.equal(swapped, torch.cat([inputs[0][:, mine], inputs[1][:, mine]], dim=0))
        # along dim 1 after a size-1 dim: the pieces lie as dim 0's would, views suffice
        assert torch.equal(rows, torch.cat(inputs)[None])
        assert torch.equal(row_sums, (inputs[0] + inputs[1])[None, 2 * rank : 2 * rank + 2])
        assert code.count("aten.movedim") == 4  # the [4, 6] gather and scatter, the all-to-all
        # on gloo (whose own gathers and scatters copy into buffers of their own),
        # a gather is one in-place broadcast per rank into the output, a float
        # scatter an in-place all-reduce of the input, then this rank's piece
        assert "all_gather_into_tensor" not in code and "reduce_scatter_tensor" not in code
        assert code.count("broadcast_.default") == 4 and code.count("aten.chunk") == 3
        # a fresh input nothing else reads is reduced in place (through a handle
        # of its own, backends/collective_wait.py); the program input is not
        handle = re.search(r"(\w+) = torch.ops.aten.detach.default\(n\)", code).group(1)
        assert f"all_reduce_.default({handle}," in code and "all_reduce.default(x," in code
        # the async all-reduce's wait comes after the independent exp
        assert code.index("h_pending = ") < code.index("torch.exp(x)") < code.index("(h_pending")


def _program(body: str, inputs: str = "%x : !plait.tensor<[2, 4], f32>", attrs: str = "") -> str:
    return (
        f"builtin.module{attrs} {{\n  func.func @forward({inputs}) -> !plait.tensor<[2, 4], f32> {{\n"
        f"{body}  }}\n}}\n"
    )


@pytest.mark.parametrize(
    "body,message",
    [
        (
            '    %y = plait.elementwise "aten::add.Tensor"(%x) : !plait.tensor<[2, 4], f32>\n'
            "    func.return %y : !plait.tensor<[2, 4], f32>\n",
            "the arguments of aten::add.Tensor do not fit its schema",
        ),
        (
            '    %y = plait.elementwise "aten::add.Tensor"(%x, %x, beta = 2) : !plait.tensor<[2, 4], f32>\n'
            "    func.return %y : !plait.tensor<[2, 4], f32>\n",
            "unexpected keyword argument 'beta'",
        ),
        (
            '    %y = plait.call "aten::topk"(%x, 2) : !plait.tensor<[2, 2], f32>\n'
            "    func.return %x : !plait.tensor<[2, 4], f32>\n",
            "aten::topk returns 2 value(s) but the op has 1 result(s)",
        ),
    ],
)
def test_calls_are_checked_against_their_schema(body, message):
    module = parse_module(_program(body), verify=False)  # the verifier refuses it too
    with pytest.raises(LoweringError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_program(module, WeightStore())


def test_weights_that_do_not_fit_the_program_are_named():
    body = (
        '    %w = plait.param "fc.weight" : !plait.tensor<[2, 4], f32> loc("fc")\n'
        '    %y = plait.elementwise "aten::mul.Tensor"(%x, %w) : !plait.tensor<[2, 4], f32>\n'
        "    func.return %y : !plait.tensor<[2, 4], f32>\n"
    )
    weights = WeightStore()
    weights.add("fc.weight", torch.ones(4, 2))
    with pytest.raises(
        LoweringError,
        match=r"weight 'fc.weight' is \(4, 2\) float32 but the program expects tensor<\[2, 4\], f32>",
    ):
        build_program(parse_module(_program(body)), weights)


def test_a_symbol_no_input_dim_carries_is_refused():
    dim = "floordiv(s, 2)"  # s cannot be read back from it (2*s + 1 could)
    text = (
        _program(
            "    func.return %x : !plait.tensor<[2, 4], f32>\n",
            inputs=f"%x : !plait.tensor<[{dim}, 4], f32>",
            attrs=" attributes {plait.symbols = #plait.symbols<s = [1, 8]>}",
        )
        .replace("-> !plait.tensor<[2, 4], f32>", f"-> !plait.tensor<[{dim}, 4], f32>")
        .replace(
            "func.return %x : !plait.tensor<[2, 4], f32>",
            f"func.return %x : !plait.tensor<[{dim}, 4], f32>",
        )
    )
    with pytest.raises(
        LoweringError, match="uses size symbol 's', which no input has as a dim of its own"
    ):
        build_program(parse_module(text), WeightStore())
