"""overlap: start every all-reduce early and wait for it late.

Each blocking all-reduce becomes an async start where it was and a
`plait.wait` just before its result is first used, so whatever compute lies
in between runs while the collective is in flight. The program computes the
same values.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp

from ..ir.ops import AllReduceOp
from .base import Pass, function_blocks
from .ladder import make_async, sink


@dataclass(frozen=True)
class Overlap(Pass):
    name = "overlap"
    summary = "async all-reduces: start where computed, wait where first used"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        for block in function_blocks(op):
            blocking = [o for o in block.ops if isinstance(o, AllReduceOp) and o.is_async is None]
            for collective in blocking:
                sink(make_async(collective), block)
