"""canonicalize: remove what torch.export leaves behind that computes nothing.

The rules are a table from target to a fold that returns the value the op can
be replaced by (or None to keep it):

- metadata asserts (`_assert_tensor_metadata`) are erased;
- `alias`, eval-mode `dropout`, and casts, copies, views, expands and full
  slices whose result type equals their input's type become their input;
- `x - 0`, `x * 1`, `x / 1` with a scalar become `x` when the type is
  unchanged (no promotion, no broadcast), and `x + 0` too for integers (for
  floats it turns -0.0 into 0.0).

A fold that removes a copy (`clone`, `x * 1`, ...) is skipped where the
result is returned: the caller must not get back its own input or a weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import SSAValue
from xdsl.rewriter import Rewriter

from ..ir.args import Operand
from ..ir.dtypes import is_floating
from ..ir.ops import CallOp
from ..ir.schema import returns_alias
from ..ir.training import carry_gradient_mark
from .base import Pass, function_blocks

Fold = Callable[[CallOp], SSAValue | None]

# checks of dtype/device metadata that export already verified (user assertions
# on data, such as torch._assert_async, are kept)
ERASED_ASSERTS = {"aten::_assert_tensor_metadata"}


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


def _scalar_identity(neutral: int, floats: bool = True) -> Fold:
    def fold(op: CallOp) -> SSAValue | None:
        other, alpha = op.arg("other"), op.arg("alpha", 1)
        is_neutral = type(other) in (int, float) and other == neutral and alpha == 1
        if not floats and is_floating(op.results[0].type.dtype):
            return None
        return _first_input(op) if is_neutral else None

    return fold


# target -> (fold, does the op copy: is its result a new tensor in eager?)
FOLDS: dict[str, tuple[Fold, bool]] = {
    "aten::alias": (_identity, False),
    "aten::dropout": (_eval_dropout, False),
    "aten::to.dtype": (_cast, False),
    "aten::to.device": (_cast, False),
    "aten::to.dtype_layout": (_cast, False),
    "aten::to.other": (_cast, False),
    "aten::_to_copy": (_cast, True),
    "aten::type_as": (_identity, False),
    "aten::clone": (_clone, True),
    "aten::view": (_identity, False),
    "aten::_unsafe_view": (_identity, False),
    "aten::reshape": (_identity, False),
    "aten::view_as": (_identity, False),
    "aten::reshape_as": (_identity, False),
    "aten::expand": (_identity, False),
    "aten::expand_as": (_identity, False),
    "aten::slice.Tensor": (_full_slice, False),
    "aten::add.Tensor": (_scalar_identity(0, floats=False), True),
    "aten::add.Scalar": (_scalar_identity(0, floats=False), True),
    "aten::sub.Tensor": (_scalar_identity(0), True),
    "aten::sub.Scalar": (_scalar_identity(0), True),
    "aten::mul.Tensor": (_scalar_identity(1), True),
    "aten::mul.Scalar": (_scalar_identity(1), True),
    "aten::div.Tensor": (_scalar_identity(1), True),
    "aten::div.Scalar": (_scalar_identity(1), True),
}


def _escapes(value: SSAValue) -> bool:
    """Is the value returned, itself or through views of it?"""
    for use in value.uses:
        user = use.operation
        if isinstance(user, func.ReturnOp):
            return True
        if isinstance(user, CallOp) and returns_alias(user.target_name):
            if any(_escapes(result) for result in user.results):
                return True
    return False


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
        if op.target_name not in FOLDS:
            continue
        fold, copies = FOLDS[op.target_name]
        replacement = None if copies and _escapes(op.results[0]) else fold(op)
        if replacement is not None:
            carry_gradient_mark(op, replacement)
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
