"""Analysis: what a training step's backward reads of its forward, as the
rematerialization integer program sees it.

    graph = step_graph(fn, times, sizes, bases)
    graph.nodes          # the ops before the loss, in block order (params excluded)
    graph.saved          # of them, those whose results an op after the loss reads
    graph.gathered       # parameters zero{stage=3} gathers (not nodes, like parameters)
    graph.group[node]    # nodes in the same position of repeated layers share a group

The step's block runs the forward up to the loss, then backward (from its
seed, torch's `ones_like(loss)`) and the optimizer; `cut` is the last op
before the seed (a sharded step may finish reducing the loss later). A node
is an op up to the cut (the forward's, and the few of backward's torch
places there, e.g. a `detach` of a forward value); each node may be stored
(kept from the forward until its last reader) or recomputed (cloned into
backward); see `remat_solve`.

Layers: a node belongs to the deepest layer (the first number in a parameter
name, `model.layers.3.` -> 3) whose parameters it reads, directly or through
other nodes. Node i of a layer's nodes, in block order, shares a group with
node i of every other layer when their ops are alike (name, target, types),
so a deep model's program has as many groups as one layer has nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from xdsl.dialects import func
from xdsl.ir import Operation, SSAValue

from ...ir.effects import is_mergeable
from ...ir.ops import CallOp, ParamOp
from ...ir.training import FORWARD, step_phases

_LAYER = re.compile(r"(?:^|\.)(\d+)\.")
_SEED = "aten::ones_like"  # AOTAutograd's tangent of a scalar loss


@dataclass
class StepGraph:
    nodes: list[Operation]
    cut: int  # index in the block of the last op before backward's seed
    saved: set[Operation]  # nodes an op after the cut reads
    returned: set[Operation]  # nodes the function returns (the loss): always stored
    inputs: dict[Operation, list[Operation]]  # node -> the nodes it reads
    view_of: dict[Operation, Operation]  # a node all of whose results are views -> its base node
    bytes: dict[Operation, int]  # memory of a node's own (non-view) results
    time: dict[Operation, float]  # the cost model's seconds to run it once
    recomputable: dict[Operation, bool]
    gathered: dict[Operation, None] = field(default_factory=dict)  # see gathered_parameters
    group: dict[Operation, tuple] = field(default_factory=dict)


# torch tags these random for their dropout; without it they are deterministic
_ATTENTION = frozenset(
    "aten::" + name
    for name in (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
)


def recomputable(op: Operation) -> bool:
    """Pure and deterministic ATen calls only: never a random op (dropout,
    attention with dropout), an in-place write, a collective or another
    library's operator."""
    if isinstance(op, CallOp) and op.target_name in _ATTENTION:
        return op.arg("dropout_p", 0.0) == 0.0
    return isinstance(op, CallOp) and is_mergeable(op)


def step_graph(
    fn: func.FuncOp,
    times: dict[Operation, float],
    sizes: dict[SSAValue, int],
    bases: dict[SSAValue, SSAValue],
) -> StepGraph:
    """`bases` maps a view to the value whose memory it shares (the cost
    model's `Schedule.bases`)."""
    block = fn.body.blocks.first
    ops = list(block.ops)
    phases = step_phases(fn)
    cut = _cut(ops, phases)
    gathered = gathered_parameters(ops[: cut + 1])
    nodes = [op for op in ops[: cut + 1] if not isinstance(op, ParamOp) and op not in gathered]
    members = set(nodes)
    late = ops[cut + 1 :]
    saved = {u.owner for op in late for u in op.operands if u.owner in members}
    returned = {v.owner for v in block.last_op.operands if v.owner in members}
    graph = StepGraph(
        nodes=nodes,
        cut=cut,
        saved=saved,
        returned=returned,
        inputs={n: _unique(v.owner for v in n.operands if v.owner in members) for n in nodes},
        view_of={},
        bytes={},
        time={n: float(times.get(n, 0.0)) for n in nodes},
        recomputable={n: recomputable(n) for n in nodes},
        gathered=gathered,
    )
    for node in nodes:
        own = [r for r in node.results if r not in bases]
        graph.bytes[node] = sum(int(sizes.get(r, 0)) for r in own)
        if node.results and not own:
            base = bases[node.results[0]].owner
            if base in members:
                graph.view_of[node] = base
    graph.group = _groups(ops[: cut + 1], members)
    return graph


def gathered_parameters(ops: list[Operation]) -> dict[Operation, None]:
    """Whole parameters `zero{stage=3}` gathers for forward: the ops computed
    from parameters alone through a collective. Backward gathers its own
    copies, so for the integer program they are like parameters, free to
    read (a recomputed op reads backward's copy when remat runs before zero)."""
    derived: set[Operation] = set()
    gathered: dict[Operation, None] = {}  # (in block order)
    for op in ops:
        owners = [v.owner for v in op.operands]
        if owners and all(isinstance(o, ParamOp) or o in derived for o in owners):
            derived.add(op)
            if not recomputable(op) or any(o in gathered for o in owners):
                gathered[op] = None
    return gathered


def _cut(ops: list[Operation], phases) -> int:
    """The index of the last op before backward's seed (else the last forward op)."""
    forward = [i for i, op in enumerate(ops) if phases.get(op) == FORWARD]
    for i, op in enumerate(ops):
        if (
            phases.get(op) != FORWARD
            and isinstance(op, CallOp)
            and op.target_name == _SEED
            and phases.get(op.operands[0].owner) == FORWARD
        ):
            return i - 1
    return forward[-1]


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _layer(op: Operation, layers: dict[Operation, int | None]) -> int | None:
    found = [layers[v.owner] for v in op.operands if layers.get(v.owner) is not None]
    for value in op.operands:
        if isinstance(value.owner, ParamOp) and (m := _LAYER.search(value.owner.weight_name)):
            found.append(int(m[1]))
    return max(found, default=None)


def _signature(op: Operation) -> tuple:
    return (
        op.name,
        tuple(sorted((k, str(v)) for k, v in op.properties.items())),
        tuple(str(v.type) for v in op.operands),
        tuple(str(r.type) for r in op.results),
    )


def _groups(ops: list[Operation], members: set[Operation]) -> dict[Operation, tuple]:
    """(every op up to the cut passes its layer on: a gathered parameter as a parameter does)"""
    layers: dict[Operation, int | None] = {}
    counts: dict[int, int] = {}
    groups = {}
    for index, node in enumerate(ops):
        layer = layers[node] = _layer(node, layers)
        if node not in members:
            continue
        if layer is None:
            groups[node] = ("node", index)
            continue
        ordinal = counts[layer] = counts.get(layer, -1) + 1
        groups[node] = ("layer", ordinal, _signature(node))
    return groups
