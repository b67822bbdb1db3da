"""memplan{values=batch:8,seq:2048}: place activations at offsets in one arena.

Plans the per-rank program's buffers (`liveness`) with `arena.plan_arena`
and records the result in the IR: the module gets `plait.arena` (bytes) and
each planned op a `mem` attribute with its offset:

    %h = plait.elementwise "aten::silu"(%g) {mem = #plait.mem<offset = 4096>} : ...

The backend then allocates the arena once and runs each planned op into a
view of it (its `out=` overload). Planned are the results of ops that have an
`out=` overload, are not program results (those must outlive the call) and
whose eager layout is contiguous, as an arena slot is (`layout`); the rest
stay with PyTorch's allocator. Sizes are planned at `values` (default:
the upper bounds of the size symbols); any smaller shape fits the same plan.

A program whose aliasing cannot be proven safe (an op that writes an input,
or has no torch schema) is not planned: the pass warns and leaves it as it is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import IntegerAttr, ModuleOp, i64

from ...ir.attrs import ARENA_ATTR
from ...ir.memory import plan_offset
from ...ir.ops import CallOp
from ...ir.schema import out_variant
from ..base import Pass, function_blocks
from ..options import SizeValues
from .arena import plan_arena
from .layout import strided_values
from .liveness import liveness, value_sizes


@dataclass(frozen=True)
class MemPlan(Pass):
    name = "memplan"
    summary = "activation arena: liveness, best-of greedy + exact offsets, checked"

    values: SizeValues = SizeValues()  # e.g. batch:8,seq:2048; others at their upper bounds

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        values = self.values.at(op, "memplan")
        total = 0
        for block in function_blocks(op):
            fn = block.parent.parent
            live = liveness(fn, value_sizes(fn, values))
            if live.unsafe:
                warnings.warn(
                    f"memplan: not planning @{fn.sym_name.data}, its aliasing cannot be proven "
                    f"safe ({live.unsafe[0]}); PyTorch's allocator keeps it",
                    stacklevel=2,
                )
                continue
            strided = strided_values(fn)  # eager's layout, which an arena slot is not
            plannable = [
                b
                for b in live.buffers
                if not b.returned
                and b.value not in strided
                and isinstance(b.value.owner, CallOp)
                and len(b.value.owner.results) == 1
                and out_variant(b.value.owner.target_name) is not None
            ]
            plan = plan_arena(plannable)
            for buffer, offset in zip(plannable, plan.offsets):
                plan_offset(buffer.value.owner, offset)
            total = max(total, plan.size)
        if total:
            op.attributes[ARENA_ATTR] = IntegerAttr(total, i64)
