"""dce: erase ops whose results are unused and that have no effect."""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.rewriter import Rewriter

from ..ir.effects import is_removable
from .base import Pass, function_blocks


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    name = "dce"
    summary = "erase unused ops without effects (parameters included)"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        for block in function_blocks(op):
            # reverse order: erasing a user can make its operands dead
            for inner in reversed(list(block.ops)):
                if is_removable(inner) and all(not r.uses for r in inner.results):
                    Rewriter.erase_op(inner)
