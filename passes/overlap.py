"""overlap: start every all-reduce early and wait for it late.

Each blocking all-reduce becomes an async start and a `plait.wait` just
before its result is first used, so whatever compute lies in between runs
while the collective is in flight. The start moves up, with the pure ops it
needs, past the ops it does not need (back to the previous start): in a
tensor-parallel training step an input gradient's all-reduce then runs
while the layer's weight gradients compute, as in Megatron. The program
computes the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp

from ..ir.ops import AllReduceOp
from .base import Pass, function_blocks
from .reorder import make_async, sink, start_early


@dataclass(frozen=True)
class Overlap(Pass):
    name = "overlap"
    summary = "async all-reduces: start where computed, wait where first used"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        for block in function_blocks(op):
            blocking = [o for o in block.ops if isinstance(o, AllReduceOp) and o.is_async is None]
            waits = [make_async(collective) for collective in blocking]
            start_early(block, [wait.operands[0].owner for wait in waits])
            for wait in waits:
                sink(wait, block)
