"""Analysis: which ops a fusing backend (`fuse`: Inductor) runs as one kernel.

Inductor fuses chains of element-wise ops, norms, softmaxes, reductions and
views into one loop nest: a value only the next fused op reads stays in
registers instead of going to memory and back. Modelled as vertical fusion:
a fusible op joins the group of its users when they are all fusible and in
one group. Matrix products, attention, embeddings, collectives and other
kernels end a group.

A group costs one kernel: one fixed cost, each member's FLOPs at its own
rate, and only the bytes it reads from outside the group and the bytes of
its last op's results; what stays inside allocates nothing.

    groups = fusion_groups(block)   # op -> the op whose results leave its group
"""

from __future__ import annotations

import bisect

from xdsl.ir import Block, Operation

from ..ir.ops import ElementwiseOp, NormOp, ReduceOp, ReshapeOp, SoftmaxOp

FUSIBLE = (ElementwiseOp, NormOp, SoftmaxOp, ReduceOp, ReshapeOp)


def fusion_groups(
    block: Block, cuts: list[Operation] = (), unfused: frozenset[Operation] = frozenset()
) -> dict[Operation, Operation]:
    """Each fusible op -> the last op of its group (itself if it ends one).
    No group spans one of `cuts` (the ends of graphs compiled apart: an op
    at a cut ends its graph); the ops in `unfused` run alone (what compiled
    blocks leave outside them)."""
    ops = list(block.ops)
    position = {op: i for i, op in enumerate(ops)}
    bounds = sorted(position[c] for c in cuts)
    graph = {op: bisect.bisect_left(bounds, position[op]) for op in ops}
    group: dict[Operation, Operation] = {}
    for op in reversed(ops):
        if not isinstance(op, FUSIBLE):
            continue
        if op in unfused:
            group[op] = op
            continue
        users = {use.operation for result in op.results for use in result.uses}
        ends = {group.get(user) for user in users}
        end = ends.pop() if len(ends) == 1 and None not in ends else op
        group[op] = end if graph[end] == graph[op] else op
    return group


def members(groups: dict[Operation, Operation]) -> dict[Operation, list[Operation]]:
    """The last op of each group of more than one -> its ops, in program order."""
    out: dict[Operation, list[Operation]] = {}
    for op, end in groups.items():
        out.setdefault(end, []).append(op)
    return {end: ops[::-1] for end, ops in out.items() if len(ops) > 1}
