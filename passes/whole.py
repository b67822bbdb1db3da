"""Analysis: the values every rank of a sharded program holds whole.

Ladder may rewire a residual stream only where every rank holds all of it;
a value split by a tensor axis (a weight slice, a local shard, a partial sum
before its all-reduce) is not whole, a batch split over a data axis is (each
sequence is whole on its rank).
"""

from __future__ import annotations

from xdsl.ir import Block, SSAValue

from ..ir.attrs import PLACEMENTS_ATTR
from ..ir.ops import AllGatherOp, AllReduceOp, CollectiveOp, LocalShardOp, ParamOp, WaitOp
from .shard.rules import DATA_AXES


def whole_values(block: Block, axes: tuple[str, ...]) -> set[SSAValue]:
    """Values every rank holds whole along the tensor axes (a batch split over a
    data axis keeps each sequence whole): program inputs, weights not split,
    the results of all-reduces and all-gathers, and what ops compute from whole
    values only (a split weight, a local slice or a partial sum is not)."""
    whole: set[SSAValue] = set(block.args)
    for op in block.ops:
        if isinstance(op, ParamOp):
            placements = op.attributes.get(PLACEMENTS_ATTR)
            placed = zip(axes, placements.data) if placements is not None else ()
            ok = all(p.kind == "replicate" or axis in DATA_AXES for axis, p in placed)
        elif isinstance(op, WaitOp):
            ok = op.input in whole
        elif isinstance(op, (CollectiveOp, LocalShardOp)) and op.axis.data in DATA_AXES:
            ok = all(v in whole for v in op.operands)
        elif isinstance(op, (AllReduceOp, AllGatherOp)):
            ok = True  # whole once waited for, if async
        elif isinstance(op, (CollectiveOp, LocalShardOp)):
            ok = False
        else:
            ok = all(v in whole for v in op.operands)
        if ok:
            whole.update(op.results)
    return whole
