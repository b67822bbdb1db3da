"""The MLIR backend: plait programs lowered by torch-mlir, dynamic dims kept."""

from __future__ import annotations

import pytest

pytest.importorskip("torch_mlir")

from plait.backends.mlir import MlirError, to_mlir  # noqa: E402
from plait.cli import main  # noqa: E402
from plait.ir.text import parse_module  # noqa: E402
from plait.ir.weights import WeightStore  # noqa: E402


def test_llama_to_linalg_keeps_dynamic_batch_and_sequence(compiled):
    program = compiled("llama-tiny")
    text = to_mlir(program.module, program.weights, "linalg")
    assert (
        "func.func @main(%arg0: tensor<?x?xi64>, %arg1: tensor<?x?xi64>) -> tensor<?x?x256xf32>"
        in text
    )
    assert "linalg.generic" in text or "linalg.matmul" in text
    assert "torch.aten" not in text and "!torch." not in text  # fully lowered


def test_cli_emits_stablehlo(tmp_path, capsys):
    out = tmp_path / "cnn.mlir"
    assert (
        main(
            [
                "compile",
                "--example",
                "cnn-tiny",
                "--emit",
                "mlir",
                "--mlir-dialect",
                "stablehlo",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    assert "stablehlo.convolution" in text and "tensor<?x3x32x32xf32>" in text


def test_collectives_and_meta_weights_are_refused():
    from helpers import COLLECTIVES_IR

    with pytest.raises(MlirError, match="collectives, which torch-mlir cannot lower"):
        to_mlir(parse_module(COLLECTIVES_IR), WeightStore())
    import torch

    text = """\
builtin.module {
  func.func @forward(%x : !plait.tensor<[2, 4], f32>) -> !plait.tensor<[2, 3], f32> {
    %w = plait.param "w" : !plait.tensor<[3, 4], f32>
    %y = plait.linear "aten::linear"(%x, %w) : !plait.tensor<[2, 3], f32>
    func.return %y : !plait.tensor<[2, 3], f32>
  }
}
"""
    weights = WeightStore()
    weights.add("w", torch.empty(3, 4, device="meta"))
    with pytest.raises(MlirError, match="needs real weights"):
        to_mlir(parse_module(text), weights)
