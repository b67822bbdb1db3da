"""Call-time checks: inputs against the program's declared input types.

A program is compiled for input dtypes, ranks, static sizes and ranges of its
size symbols. Anything else is rejected before running, with a message that
names the input and dim and says how to recompile; so are meta tensors (no
data) and token ids outside the embedding table they index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import sympy
import torch
from xdsl.dialects import func
from xdsl.ir import BlockArgument, OpResult, SSAValue

from ..ir import symbolic
from ..ir.attrs import PLACEMENTS_ATTR
from ..ir.dtypes import TORCH_NAMES
from ..ir.errors import PlaitError
from ..ir.ops import EmbeddingOp, LocalShardOp, ParamOp, ReshapeOp
from ..ir.text import module_path
from ..ir.types import TensorType


class InputError(PlaitError):
    """Inputs that do not match what the program was compiled for."""


def bind_inputs(names: Sequence[str], args: tuple, kwargs: Mapping) -> list:
    """Positional and keyword arguments -> inputs in the program's order."""
    if len(args) > len(names):
        raise InputError(
            f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(args)}"
        )
    values = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise InputError(f"unexpected input '{key}'; the model takes {', '.join(names)}")
        if key in values:
            raise InputError(f"input '{key}' given twice")
        values[key] = value
    missing = [n for n in names if n not in values]
    if missing:
        raise InputError(
            f"missing input(s) {', '.join(missing)}; the model takes {', '.join(names)}"
        )
    return [values[n] for n in names]


def _recompile_hint(symbol: str | None, name: str, dim: int) -> str:
    if symbol is None:
        return (
            f"recompile with a dynamic dim, e.g. dynamic_shapes={{'{name}': {{{dim}: "
            f"Dim('d{dim}', min=..., max=...)}}}}"
        )
    return f"recompile with a wider range for '{symbol}' (Dim('{symbol}', min=..., max=...))"


def check_inputs(
    names: Sequence[str],
    types: Sequence[TensorType],
    symbols: Mapping[str, tuple[int, int | None]],
    inputs: Sequence,
) -> dict[str, int]:
    """Raise InputError unless inputs fit; return the symbol values they bind."""
    values: dict[str, int] = {}
    for name, type_, value in zip(names, types, inputs):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"input '{name}' must be a tensor, got {type(value).__name__}")
        if value.is_meta:
            raise InputError(
                f"input '{name}' is a meta tensor, which holds no data; call the model on real "
                "tensors (meta tensors serve to compile without allocating)"
            )
        expected = TORCH_NAMES[type_.dtype]
        actual = str(value.dtype).removeprefix("torch.")
        if actual != expected:
            raise InputError(
                f"input '{name}' has dtype {actual} but the model was compiled for {expected}; "
                f"convert it with .to(torch.{expected}) or recompile with {actual} example inputs"
            )
        if value.dim() != type_.rank:
            raise InputError(
                f"input '{name}' has {value.dim()} dims {tuple(value.shape)} but the model "
                f"expects {type_.rank}: [{', '.join(symbolic.to_text(d) for d in type_.shape)}]"
            )
        for d, (size, dim) in enumerate(zip(value.shape, type_.shape)):
            if isinstance(dim, int):
                if size != dim:
                    raise InputError(
                        f"input '{name}' dim {d} is {size} but the model was compiled for "
                        f"{dim}; {_recompile_hint(None, name, d)}"
                    )
            elif linear := symbolic.linear_in_one_symbol(dim):  # k, or a derived dim a*k + b
                k, a, b = linear
                symbol, (bound, rest) = k.name, divmod(int(size) - b, a)
                if rest:
                    raise InputError(
                        f"input '{name}' dim {d} is {size}, which is not "
                        f"{symbolic.to_text(dim)} for any integer {symbol}; pad it to such a size"
                    )
                # for a derived dim (2*k), the symbol's value is not the dim's size
                shown = f"{size}" if (a, b) == (1, 0) else f"{size} (so {symbol} = {bound})"
                if symbol in values and values[symbol] != bound:
                    raise InputError(
                        f"input '{name}' dim {d} is {shown} but '{symbol}' is "
                        f"{values[symbol]} in another input; they must be equal"
                    )
                lo, hi = symbols.get(symbol, (1, None))
                if bound < lo or (hi is not None and bound > hi):
                    range_ = f"[{lo}, {hi if hi is not None else 'inf'}]"
                    raise InputError(
                        f"input '{name}' dim {d} ({symbolic.to_text(dim)}) is {shown}, outside "
                        f"the compiled range {range_}; {_recompile_hint(symbol, name, d)}"
                    )
                values[symbol] = bound
    # dims that are expressions of the symbols must agree too
    for name, type_, value in zip(names, types, inputs):
        for d, (size, dim) in enumerate(zip(value.shape, type_.shape)):
            if not isinstance(dim, (int, sympy.Symbol)):
                expected = symbolic.evaluate(dim, values)
                if size != expected:
                    raise InputError(
                        f"input '{name}' dim {d} is {size} but must be "
                        f"{symbolic.to_text(dim)} = {expected}"
                    )
    return values


# a vocab-parallel lookup (shard's `vocab_parallel_lookup`) shifts the ids into
# this rank's rows, where(held, ids - start, 0): the operand that carries the ids
_VOCAB_SHIFT = {"aten::where.ScalarOther": 1, "aten::sub.Tensor": 0}


def token_id_limits(fn: func.FuncOp, mesh: Mapping[str, int]) -> dict[int, tuple[int, str]]:
    """Inputs whose values index an embedding table (directly, or through views
    and a data axis's batch slice): input position -> (the table's rows, the
    embedding's module path)."""
    block = fn.body.blocks.first
    limits: dict[int, tuple[int, str]] = {}
    for op in block.ops:
        if not isinstance(op, EmbeddingOp):
            continue
        table, ids = op.input_of(op.arg("weight")), op.input_of(op.arg("indices"))
        if table is None or ids is None or not isinstance(table.owner, ParamOp):
            continue
        rows, sharded = _table_rows(table.owner, mesh)
        source = _input_of(ids, sharded)
        if source is not None and source.block is block and isinstance(rows, int):
            if source.index not in limits or rows < limits[source.index][0]:
                limits[source.index] = (rows, module_path(op) or "the embedding")
    return limits


def _table_rows(param: ParamOp, mesh: Mapping[str, int]) -> tuple[int, bool]:
    """The whole table's rows, and whether the ranks hold slices of them."""
    rows = param.result.type.shape[0]
    placements = param.attributes.get(PLACEMENTS_ATTR)
    if placements is None:
        return rows, False
    parts = math.prod(
        n for n, p in zip(mesh.values(), placements.data) if p.kind == "shard" and p.dim == 0
    )
    return rows * parts, parts > 1


def _input_of(value: SSAValue, vocab_parallel: bool) -> BlockArgument | None:
    """The function input whose values `value` holds, else None."""
    while isinstance(value, OpResult):
        op = value.owner
        target = getattr(op, "target_name", None)
        if isinstance(op, (ReshapeOp, LocalShardOp)):
            value = op.operands[0]
        elif vocab_parallel and target in _VOCAB_SHIFT:
            value = op.operands[_VOCAB_SHIFT[target]]
        else:
            return None
    return value if isinstance(value, BlockArgument) else None


def check_token_ids(
    names: Sequence[str], limits: Mapping[int, tuple[int, str]], inputs: Sequence
) -> None:
    """Raise InputError if an input indexes an embedding table outside its rows
    (the lookup would fail inside the program, or, split over ranks, read zeros)."""
    for index, (rows, where) in limits.items():
        ids = inputs[index]
        if ids.numel() == 0 or ids.is_floating_point():
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= rows:
            raise InputError(
                f"input '{names[index]}' holds token id {low if low < 0 else high}, outside "
                f"[0, {rows - 1}]: it indexes the embedding table of {where}, which has {rows} "
                "rows (the model's vocabulary); give ids in that range"
            )
