"""IR text: every op and attribute round-trips; invalid IR is rejected with a
stated message and a position; builders and accessors work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sympy
from plait.ir import symbolic
from plait.ir.args import ArgsAttr, Operand, Sym, Tag
from plait.ir.errors import IRParseError, IRVerifyError, PlaitError
from plait.ir.ops import ElementwiseOp, LinearOp, ParamOp, call_op_class
from plait.ir.targets import kind_of
from plait.ir.text import parse_dim, parse_module, print_module
from plait.ir.types import TensorType

HERE = Path(__file__).parent / "ir"


def _cases(name: str) -> list[tuple[int, str]]:
    text = (HERE / name).read_text()
    chunks, line = [], 1
    for chunk in text.split("// -----\n"):
        chunks.append((line, chunk))
        line += chunk.count("\n") + 1
    return chunks


@pytest.mark.parametrize("line,text", _cases("roundtrip.mlir"))
def test_roundtrip(line, text):
    first = print_module(parse_module(text, f"roundtrip.mlir:{line}"))
    assert print_module(parse_module(first)) == first


@pytest.mark.parametrize("line,text", _cases("invalid.mlir"))
def test_invalid(line, text):
    expected = re.search(r"// error: (.*)", text).group(1).strip()
    with pytest.raises((IRParseError, IRVerifyError)) as info:
        parse_module(text, "invalid.mlir")
    assert expected in str(info.value)
    if isinstance(info.value, IRParseError):
        assert info.value.line >= 1 and info.value.column >= 1


def test_parse_error_points_at_line_and_column():
    text = 'builtin.module {\n  func.func @f(%x : !plait.tensor<[2], f32>) {\n    %y = plait.elementwise "aten::relu"(%x : !plait.tensor<[2], f32>\n  }\n}\n'
    with pytest.raises(IRParseError) as info:
        parse_module(text, "bad.mlir")
    assert (info.value.filename, info.value.line) == ("bad.mlir", 3)
    assert str(info.value).startswith("bad.mlir:3:")


def test_verify_error_names_file_position_and_module_path():
    text = (
        "builtin.module {\n  func.func @f(%x : !plait.tensor<[2], f32>) {\n"
        '    %y = plait.linear "aten::relu"(%x) : !plait.tensor<[2], f32> loc("model.layers.3.mlp")\n'
        "    func.return\n  }\n}\n"
    )
    with pytest.raises(IRVerifyError) as info:
        parse_module(text, "v.mlir")
    assert "v.mlir:3:5" in str(info.value) and "model.layers.3.mlp" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "batch",
        "2*batch*seq",
        "batch*seq + 1",
        "floordiv(seq, 2)",
        "seq - 1",
        "mod(seq, 4)",
        "max(batch, seq)",
        "ceildiv(seq, 128)",
        "-batch + 2*seq",
        "batch*batch",
    ],
)
def test_dim_expressions_roundtrip(text):
    expr = parse_dim(text)
    printed = symbolic.to_text(expr)
    again = parse_dim(printed)
    assert symbolic.to_text(again) == printed
    assert sympy.simplify(again - expr) == 0


def test_evaluate_dims():
    b, s = symbolic.symbol("batch"), symbolic.symbol("seq")
    assert symbolic.evaluate(2 * b * s + sympy.floor(s / 2), {"batch": 3, "seq": 5}) == 32


def test_build_ops_and_read_arguments():
    from xdsl.dialects import func
    from xdsl.dialects.builtin import ModuleOp
    from xdsl.ir import Block, Region

    b = symbolic.symbol("b")
    x_type = TensorType([b, 8], "f32")
    block = Block(arg_types=[x_type])
    w = ParamOp("fc.weight", TensorType([4, 8], "f32"))
    linear = LinearOp(
        "aten::linear",
        [block.args[0], w.result],
        ArgsAttr((Operand(0), Operand(1), None), ()),
        [TensorType([b, 4], "f32")],
    )
    act = ElementwiseOp(
        "aten::gelu",
        [linear.results[0]],
        ArgsAttr((Operand(0),), (("approximate", "tanh"),)),
        [TensorType([b, 4], "f32")],
    )
    block.add_ops([w, linear, act, func.ReturnOp(act.results[0])])
    fn = func.FuncOp("forward", ([x_type], [act.results[0].type]), Region(block))
    module = ModuleOp([fn])
    from plait.ir.attrs import SymbolsAttr

    module.attributes["plait.symbols"] = SymbolsAttr((("b", 1, 16),))
    text = print_module(module)
    assert "plait.gelu" not in text and '"aten::gelu"(%' in text and 'approximate = "tanh"' in text
    parsed = parse_module(text)
    ops = list(parsed.ops.first.body.blocks.first.ops)
    assert ops[1].arg("bias") is None and ops[2].arg("approximate") == "tanh"
    assert ops[1].input_of(ops[1].args.args[1]) is ops[0].result
    assert x_type.numel == 8 * b and TensorType([2, 3], "bf16").nbytes == 12


def test_argument_values_compare_by_type():
    assert ArgsAttr((1,), ()) != ArgsAttr((1.0,), ())
    assert ArgsAttr((True,), ()) != ArgsAttr((1,), ())
    assert ArgsAttr((Sym(symbolic.symbol("n")),), ()) == ArgsAttr((Sym(symbolic.symbol("n")),), ())
    assert ArgsAttr((Tag("dtype", "f32"),), ()) == ArgsAttr((Tag("dtype", "f32"),), ())
    assert ArgsAttr((float("nan"),), ()) == ArgsAttr((float("nan"),), ())


def test_op_families_come_from_the_target_table():
    assert kind_of("aten::linear") == "linear"
    assert kind_of("aten::add.Tensor") == "elementwise"
    assert kind_of("aten::view") == "reshape"
    assert kind_of("transformers::grouped_mm_fallback") == "call"
    assert call_op_class("aten::scaled_dot_product_attention").name == "plait.attention"


def test_errors_are_plait_errors():
    assert issubclass(IRParseError, PlaitError) and issubclass(IRVerifyError, PlaitError)
