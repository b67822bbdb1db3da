"""cse: merge ops that compute the same thing from the same operands."""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation
from xdsl.rewriter import Rewriter

from ..ir.effects import is_mergeable
from .base import Pass, function_blocks


def _key(op: Operation):
    return (
        op.name,
        tuple(op.operands),
        tuple(sorted(op.properties.items())),
        tuple(sorted(op.attributes.items())),
        tuple(r.type for r in op.results),
    )


@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    name = "cse"
    summary = "merge identical pure ops (same op, operands, arguments and types)"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        for block in function_blocks(op):
            seen: dict[object, Operation] = {}
            for inner in list(block.ops):
                if not is_mergeable(inner):
                    continue
                first = seen.setdefault(_key(inner), inner)
                if first is not inner:
                    for old, new in zip(inner.results, first.results):
                        old.replace_all_uses_with(new)
                    Rewriter.erase_op(inner)
