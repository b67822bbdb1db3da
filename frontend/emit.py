"""Append ATen calls to a block, typed by running each on `meta` tensors.

The optimizer's update and gradient clipping are written as rows of calls
over named values (see `optimizers`); an Emitter turns each row into the IR
op of its family, with its result type from torch itself:

    emitter = Emitter(block, before=return_op, location="optimizer")
    emitter.bind("lr", lr_value)
    emitter.row(Row("neg_lr", "aten::neg", ("%lr",)))
    emitter.value("neg_lr")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from xdsl.dialects.builtin import NameLoc, NoneAttr, StringAttr
from xdsl.ir import Block, Operation, SSAValue

from ..ir import args as irargs
from ..ir.dtypes import IR_NAMES, TORCH_NAMES
from ..ir.ops import call_op_class
from ..ir.types import TensorType


@dataclass(frozen=True)
class Row:
    """`out = target(*args, **kwargs)`; "%name" in args reads a named value.
    A row rebinds `out`, so later rows read the newest value of a name (an
    in-place update's result, for state)."""

    out: str
    target: str
    args: tuple = ()
    kwargs: tuple[tuple[str, object], ...] = ()


def _meta(type_: TensorType) -> torch.Tensor:
    dtype = getattr(torch, TORCH_NAMES[type_.dtype])
    return torch.empty(type_.shape, dtype=dtype, device="meta")


class Emitter:
    def __init__(self, block: Block, before: Operation, location: str):
        self.block = block
        self.before = before
        self.location = NameLoc(StringAttr(location), NoneAttr())
        self.values: dict[str, SSAValue] = {}

    def bind(self, name: str, value: SSAValue) -> None:
        self.values[name] = value

    def value(self, name: str) -> SSAValue:
        return self.values[name]

    def call(self, target: str, args: tuple, kwargs: tuple = (), name: str | None = None):
        """Insert `target(*args, **kwargs)`, with SSA values as operands; its result."""
        operands: list[SSAValue] = []

        def convert(value):
            if isinstance(value, SSAValue):
                operands.append(value)
                return irargs.Operand(len(operands) - 1)
            if isinstance(value, (list, tuple)):
                return tuple(convert(v) for v in value)
            return value

        def meta(value):
            if isinstance(value, SSAValue):
                return _meta(value.type)
            if isinstance(value, irargs.Tag):  # dtypes; the IR's other tags name no data
                return getattr(torch, TORCH_NAMES[value.value])
            return [meta(v) for v in value] if isinstance(value, (list, tuple)) else value

        ir_args = irargs.ArgsAttr(
            tuple(convert(a) for a in args), tuple((k, convert(v)) for k, v in kwargs)
        )
        namespace, _, rest = target.partition("::")
        base, _, overload = rest.partition(".")
        callee = getattr(getattr(getattr(torch.ops, namespace), base), overload or "default")
        out = callee(*meta(args), **{k: meta(v) for k, v in kwargs})
        result = TensorType(list(out.shape), IR_NAMES[str(out.dtype).removeprefix("torch.")])
        op = call_op_class(target)(target, operands, ir_args, [result])
        op.location = self.location
        if name:
            op.results[0].name_hint = name
        self.block.insert_op_before(op, self.before)
        return op.results[0]

    def row(self, row: Row, suffix: str = "") -> SSAValue:
        def read(value):
            if isinstance(value, str) and value.startswith("%"):
                return self.values[value[1:]]
            return value

        args = tuple(read(a) for a in row.args)
        kwargs = tuple((k, read(v)) for k, v in row.kwargs)
        if not row.target:  # a plain rebinding: `grad = momentum_buffer`
            self.values[row.out] = args[0]
        else:
            self.values[row.out] = self.call(row.target, args, kwargs, row.out + suffix)
        return self.values[row.out]

    def rows(self, rows, suffix: str = "") -> None:
        """Emit `rows` in order; `suffix` ends their results' names (".<parameter>")."""
        for row in rows:
            self.row(row, suffix)
