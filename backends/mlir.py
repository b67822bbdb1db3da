"""The MLIR backend: a collective-free plait program -> MLIR text through torch-mlir.

For inspection and interop with other MLIR compilers:

    plait compile --example llama-tiny --emit mlir --mlir-dialect stablehlo

The program is built by the torch backend, exported again with its size
symbols as dynamic dims, decomposed and lowered by torch-mlir to one of
`linalg` (linalg-on-tensors, the default), `stablehlo`, `tosa` (static shapes
only) or `torch` (torch-mlir's backend contract). Weights are elided from the
text unless asked for.
"""

from __future__ import annotations

import contextlib
import io

import sympy
import torch
from torch.export import Dim
from xdsl.dialects.builtin import ModuleOp

from ..ir import symbolic
from ..ir.errors import PlaitError
from ..ir.ops import CollectiveOp, WaitOp, stored_weight_names
from ..ir.weights import WeightStore
from .fx import build_program, torch_dtype

OUTPUT_TYPES = {
    "linalg": "linalg-on-tensors",
    "stablehlo": "stablehlo",
    "tosa": "tosa",
    "torch": "torch",
}


class MlirError(PlaitError):
    """torch-mlir is missing or cannot lower the program."""


def _example_values(symbols: dict[str, tuple[int, int | None]]) -> dict[str, int]:
    """A distinct, unremarkable size per symbol (sizes 0 and 1 would be specialized)."""
    values = {}
    for i, (name, (lo, hi)) in enumerate(sorted(symbols.items())):
        value = max(lo, 2) + 3 + 2 * i
        values[name] = value if hi is None else min(value, hi)
    return values


def to_mlir(
    module: ModuleOp, weights: WeightStore, dialect: str = "linalg", elide_weights: bool = True
) -> str:
    """MLIR text of `module`'s forward function in `dialect`."""
    if dialect not in OUTPUT_TYPES:
        raise MlirError(
            f"unknown MLIR dialect '{dialect}'; choose one of {', '.join(OUTPUT_TYPES)}"
        )
    if any(isinstance(op, (CollectiveOp, WaitOp)) for op in module.walk()):
        raise MlirError(
            "the program has collectives, which torch-mlir cannot lower; emit MLIR before "
            "sharding (or per collective-free region)"
        )
    try:
        from torch_mlir import fx as torch_mlir_fx
    except ImportError as exc:
        raise MlirError("the MLIR backend needs torch-mlir: pip install 'plait[mlir]'") from exc
    names = stored_weight_names(module)
    if any(weights.is_meta(name) for name in names):
        raise MlirError("MLIR emission needs real weights; the model's weights are on meta")
    program = build_program(module, weights, "cpu", fast=False)
    gm = program.graph_module
    # torch-mlir's decompositions may leave strides that `view` rejects; MLIR has
    # value semantics, where reshape means the same thing.
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    gm.recompile()
    values = _example_values(program.symbols)
    dims = {
        name: Dim(name, min=max(lo, 2), max=hi if hi is not None else 2**31 - 1)
        for name, (lo, hi) in program.symbols.items()
    }
    inputs, shapes = [], []
    for type_ in program.input_types:
        sizes = [symbolic.evaluate(d, values) for d in type_.shape]
        dtype = torch_dtype(type_.dtype)
        make = torch.randn if dtype.is_floating_point else torch.zeros
        inputs.append(make(sizes, dtype=dtype))
        shapes.append(
            {i: dims[d.name] for i, d in enumerate(type_.shape) if isinstance(d, sympy.Symbol)}
        )
    try:
        with contextlib.redirect_stderr(io.StringIO()) as diagnostics:
            exported = torch.export.export(
                gm, tuple(inputs), dynamic_shapes=tuple(shapes), strict=False
            )
            lowered = torch_mlir_fx.export_and_import(exported, output_type=OUTPUT_TYPES[dialect])
    except Exception as exc:
        detail = diagnostics.getvalue().strip().splitlines()
        reason = detail[0] if detail else str(exc).splitlines()[0]
        hint = (
            " (tosa needs static shapes: compile without dynamic dims)" if dialect == "tosa" else ""
        )
        raise MlirError(
            f"torch-mlir could not lower the program to {dialect}{hint}: {reason}; "
            "`--mlir-dialect torch` shows what it accepted"
        ) from exc
    limit = 16 if elide_weights else None
    return lowered.operation.get_asm(large_elements_limit=limit, large_resource_limit=limit)
