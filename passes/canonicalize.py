"""canonicalize: remove what torch.export leaves behind that computes nothing.

The rules are a table from target to a fold that returns the value the op can
be replaced by (or None to keep it):

- metadata asserts (`_assert_tensor_metadata`, ...) are erased;
- `alias`, eval-mode `dropout`, and casts, copies, views, expands and full
  slices whose result type equals their input's type become their input;
- `x + 0`, `x - 0`, `x * 1`, `x / 1` with a scalar become `x` when the type is
  unchanged (no promotion, no broadcast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import SSAValue
from xdsl.rewriter import Rewriter

from ..ir.args import Operand
from ..ir.ops import CallOp
from .base import Pass, function_blocks

Fold = Callable[[CallOp], SSAValue | None]

ERASED_ASSERTS = {
    "aten::_assert_tensor_metadata",
    "aten::_assert_scalar",
    "aten::_assert_async",
    "aten::_assert_async.msg",
    "aten::_functional_assert_async.msg",
}


def _first_input(op: CallOp) -> SSAValue | None:
    """The op's tensor input if its result has exactly that input's type."""
    first = op.args.args[0] if op.args.args else None
    if not isinstance(first, Operand) or len(op.results) != 1:
        return None
    value = op.inputs[first.index]
    return value if value.type == op.results[0].type else None


def _identity(op: CallOp) -> SSAValue | None:
    return _first_input(op)


def _eval_dropout(op: CallOp) -> SSAValue | None:
    train, p = op.arg("train", True), op.arg("p", 0.5)
    return _first_input(op) if train is False or p == 0 else None


def _cast(op: CallOp) -> SSAValue | None:
    copy, memory_format = op.arg("copy", False), op.arg("memory_format")
    if copy is True or (memory_format is not None and memory_format.value != "preserve_format"):
        return None
    return _first_input(op)


def _clone(op: CallOp) -> SSAValue | None:
    memory_format = op.arg("memory_format")
    if memory_format is not None and memory_format.value != "preserve_format":
        return None
    return _first_input(op)


def _full_slice(op: CallOp) -> SSAValue | None:
    start, step = op.arg("start"), op.arg("step", 1)
    return _first_input(op) if start in (None, 0) and step == 1 else None


def _scalar_identity(neutral: int) -> Fold:
    def fold(op: CallOp) -> SSAValue | None:
        other, alpha = op.arg("other"), op.arg("alpha", 1)
        is_neutral = type(other) in (int, float) and other == neutral and alpha == 1
        return _first_input(op) if is_neutral else None

    return fold


FOLDS: dict[str, Fold] = {
    "aten::alias": _identity,
    "aten::dropout": _eval_dropout,
    "aten::to.dtype": _cast,
    "aten::to.device": _cast,
    "aten::to.dtype_layout": _cast,
    "aten::to.other": _cast,
    "aten::_to_copy": _cast,
    "aten::type_as": _identity,
    "aten::clone": _clone,
    "aten::view": _identity,
    "aten::_unsafe_view": _identity,
    "aten::reshape": _identity,
    "aten::view_as": _identity,
    "aten::reshape_as": _identity,
    "aten::expand": _identity,
    "aten::expand_as": _identity,
    "aten::slice.Tensor": _full_slice,
    "aten::add.Tensor": _scalar_identity(0),
    "aten::add.Scalar": _scalar_identity(0),
    "aten::sub.Tensor": _scalar_identity(0),
    "aten::sub.Scalar": _scalar_identity(0),
    "aten::mul.Tensor": _scalar_identity(1),
    "aten::mul.Scalar": _scalar_identity(1),
    "aten::div.Tensor": _scalar_identity(1),
    "aten::div.Scalar": _scalar_identity(1),
}


def canonicalize_block(block) -> int:
    """Apply the table once, in order (chains fold in one sweep). Returns the change count."""
    changed = 0
    for op in list(block.ops):
        if not isinstance(op, CallOp):
            continue
        if op.target_name in ERASED_ASSERTS and not op.results:
            Rewriter.erase_op(op)
            changed += 1
            continue
        fold = FOLDS.get(op.target_name)
        replacement = fold(op) if fold is not None else None
        if replacement is not None:
            op.results[0].replace_all_uses_with(replacement)
            Rewriter.erase_op(op)
            changed += 1
    return changed


@dataclass(frozen=True)
class Canonicalize(Pass):
    name = "canonicalize"
    summary = "drop export noise: asserts, aliases, eval dropout, no-op casts, views and arithmetic"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        for block in function_blocks(op):
            canonicalize_block(block)
