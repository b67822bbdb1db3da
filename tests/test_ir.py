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


LINEAR_IR = """\
builtin.module attributes {plait.symbols = #plait.symbols<batch = [1, 64], seq = [2, 256]>} {
  func.func @forward(%x : !plait.tensor<[batch, seq, 64], f32>) {
    %w = plait.param "model.fc.weight" : !plait.tensor<[176, 64], f32> loc("model.fc")
    %y = plait.linear "aten::linear"(%x, %w) : !plait.tensor<[batch, seq, 176], f32> loc("model.fc")
    func.return
  }
}
"""


@pytest.mark.parametrize(
    "declared,computed",
    [
        ("[batch, seq, 177], f32", "[batch, seq, 176], f32"),
        ("[batch, seq, 176], f16", "[batch, seq, 176], f32"),
        ("[seq, batch, 176], f32", "[batch, seq, 176], f32"),
    ],
)
def test_a_wrong_result_type_is_refused_at_its_op(declared, computed):
    text = LINEAR_IR.replace(
        "%w) : !plait.tensor<[batch, seq, 176], f32>", f"%w) : !plait.tensor<{declared}>"
    )
    with pytest.raises(IRVerifyError) as info:
        parse_module(text, "x.mlir")
    assert str(info.value) == (
        f"x.mlir:4:5 (model.fc): error: plait.linear: result is declared tensor<{declared}>, "
        f"but aten::linear computes tensor<{computed}>; declare that type"
    )


def test_every_pass_output_is_type_checked():
    from plait.passes.base import Pass
    from plait.passes.manager import PassFailedError, PassManager

    module = parse_module(LINEAR_IR)

    class Widen(Pass):  # a broken pass: declares a linear's result one wider
        name = "widen-for-test"

        def apply(self, ctx, module):
            from xdsl.rewriter import Rewriter

            old = list(module.ops.first.body.blocks.first.ops)[1]
            wide = TensorType([symbolic.symbol("batch"), symbolic.symbol("seq"), 177], "f32")
            Rewriter.replace_op(old, LinearOp(old.target_name, old.inputs, old.args, [wide]))

    with pytest.raises(
        PassFailedError,
        match=r"pass 'widen-for-test' produced invalid IR: .*"
        r"declared tensor<\[batch, seq, 177\], f32>, but aten::linear computes",
    ):
        PassManager([Widen()]).run(module)


def test_a_view_of_the_wrong_size_is_refused_before_it_runs():
    text = LINEAR_IR.replace(
        "    func.return\n",
        '    %v = plait.reshape "aten::view"(%y, [sym(batch), sym(seq), 3, -1]) : '
        "!plait.tensor<[batch, seq, 3, 58], f32>\n    func.return\n",
    )
    with pytest.raises(
        IRVerifyError,
        match=r"x\.mlir:5:5: error: plait\.reshape: aten::view rejects "
        r"its arguments: shape '\[\d+, \d+, 3, -1\]' is invalid",
    ):
        parse_module(text, "x.mlir")


def test_unregistered_operators_are_taken_as_declared():
    text = LINEAR_IR.replace('"aten::linear"(%x, %w)', '"no_such_lib::fancy_linear"(%x, %w)')
    text = text.replace("plait.linear", "plait.call")
    assert "no_such_lib" in print_module(parse_module(text))


# ---- reading IR files --------------------------------------------------------------

BAD_BYTES = LINEAR_IR.encode().replace(b'"model.fc.weight"', b'"model.\xc3\xa9\xff.weight"')


def test_a_byte_that_is_not_utf8_is_located():
    from plait.ir.text import decode_ir_text

    with pytest.raises(IRParseError) as info:
        decode_ir_text(BAD_BYTES, "x.mlir")
    # line 3; column 30: 29 characters before it, é counting as one
    assert (info.value.line, info.value.column) == (3, 30)
    assert str(info.value) == (
        "x.mlir:3:30: error: byte 0xff is not valid UTF-8; the file must be UTF-8 text"
    )
    assert decode_ir_text(b"a\r\nb\rc", "x.mlir") == "a\nb\nc"  # newlines as read_text gives


@pytest.mark.parametrize(
    "argv",
    [["opt", "{}"], ["compile", "{}", "--emit", "ir"], ["estimate", "{}", "--hardware", "cpu"]],
)
def test_the_cli_reports_a_bad_byte_without_a_traceback(tmp_path, capsys, argv):
    from plait.cli import main

    path = tmp_path / "bad.mlir"
    path.write_bytes(BAD_BYTES)
    code = main([a.format(path) for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and f"{path}:3:30: error: byte 0xff is not valid UTF-8" in err, err
    assert "Traceback" not in err


def test_loading_an_artifact_with_a_bad_byte_names_the_file(tmp_path):
    import shutil

    import plait
    import torch

    saved = tmp_path / "saved"
    plait.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).save(saved)
    for name in ("plan.mlir", "rank0.py"):
        copy = tmp_path / name
        shutil.copytree(saved, copy)
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data[:10] + b"\x80" + data[10:])
        with pytest.raises(IRParseError, match=rf"{name}:\d+:\d+: error: byte 0x80 is not valid"):
            plait.load(copy)
