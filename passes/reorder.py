"""Moving ops within a block without changing what any op computes: the
scheduling half of the passes that overlap communication with compute.

A move keeps every op after its operands; ops with effects (in-place
updates of program state, random draws, waits) keep their order relative to
each other and everything else, so a program that was SPMD stays SPMD and
draws the same random numbers.
"""

from __future__ import annotations

from xdsl.ir import Block, Operation, SSAValue
from xdsl.rewriter import InsertPoint, Rewriter

from ..ir.effects import is_mergeable
from ..ir.ops import AllReduceOp, CallOp, CollectiveOp, GatherIntoOp, LocalShardOp, WaitOp
from ..ir.schema import writes_input


def _first_user(value, block: Block, position: dict[Operation, int]) -> Operation | None:
    users = [use.operation for use in value.uses if use.operation.parent is block]
    return min(users, key=position.__getitem__, default=None)


def sink(op: Operation, block: Block) -> None:
    """Move `op` down to just before the first op that uses its results."""
    position = {o: i for i, o in enumerate(block.ops)}
    firsts = [u for r in op.results if (u := _first_user(r, block, position)) is not None]
    if not firsts:
        return
    target = min(firsts, key=position.__getitem__)
    if position[target] > position[op] + 1:
        op.detach()
        Rewriter.insert_op(op, InsertPoint.before(target))


def make_async(blocking: AllReduceOp) -> WaitOp:
    """A blocking all-reduce -> an async start where it was and a wait after it."""
    start = AllReduceOp(blocking.input, blocking.axis.data, blocking.reduce.data, is_async=True)
    start.location = blocking.location
    start.result.name_hint = blocking.result.name_hint
    wait = WaitOp(start.result)
    wait.location = blocking.location
    wait.result.name_hint = blocking.result.name_hint
    Rewriter.insert_op(start, InsertPoint.before(blocking))
    Rewriter.insert_op(wait, InsertPoint.before(blocking))
    blocking.result.replace_all_uses_with(wait.result)
    Rewriter.erase_op(blocking)
    return wait


def _movable(op: Operation) -> bool:
    """Pure computations (a rank's slice of a value too) and collective
    starts; not waits, in-place updates or random draws (their order is part
    of what the program means)."""
    if isinstance(op, GatherIntoOp):  # writes state in place
        return False
    if isinstance(op, CollectiveOp):
        return op.is_async is not None
    return is_mergeable(op) or isinstance(op, LocalShardOp)


def start_early(block: Block, starts: list[CollectiveOp]) -> None:
    """Move each collective start in `starts`, and the pure ops it needs, up
    to just after the previous start (or as far as their operands allow), so
    that the ops it does not need run while it is in flight: in backward,
    an input gradient's all-reduce starts before the weight gradients that
    used to come first. Bounding each move by the previous start keeps values
    from being made long before they are read (no forward value is
    computed early for backward's sake). One stable sort: O(n log n)."""
    ops = list(block.ops)
    position = {o: i for i, o in enumerate(ops)}
    ordered = sorted(starts, key=position.__getitem__)
    floor = {}  # a start -> the position of the start before it (or -1)
    for before, start in zip([None, *ordered], ordered):
        floor[start] = -1 if before is None else position[before]
    # the start each op in its window is needed by first (ops before a
    # window stay where they are: they are no later than its floor)
    needed_by: dict[Operation, Operation] = {}
    for start in reversed(ordered):  # the earliest start wins
        todo = [start]
        while todo:
            op = todo.pop()
            if needed_by.get(op) is start or position[op] <= floor[start] or not _movable(op):
                continue
            needed_by[op] = start
            todo.extend(
                v.owner
                for v in op.operands
                if isinstance(v.owner, Operation) and v.owner.parent is block
            )
    key: dict[Operation, float] = {}
    for op in ops:
        own = float(position[op])
        if op in needed_by:
            operands = [key[v.owner] for v in op.operands if v.owner in key]
            own = min(own, max([floor[needed_by[op]] + 0.5, *operands]))
        key[op] = own
    # equal keys keep their original order (operands first: they came first)
    new_order = sorted(ops, key=lambda o: (key[o], position[o]))
    if new_order == ops:
        return
    for op in new_order:
        op.detach()
    for op in new_order:
        block.add_op(op)


def hoist(op: Operation, position: dict[Operation, int], block: Block) -> None:
    """Move a pure call up to just after its last operand (as soon as it can
    run), but not past an update of state (its reads must stay before it)."""
    if not isinstance(op, CallOp) or writes_input(op.target_name) or op.parent is not block:
        return
    owners = [v.owner for v in op.operands if isinstance(v.owner, Operation)]
    if any(o.parent is not block for o in owners):
        return
    last = max(owners, key=position.__getitem__, default=None)
    if last is None or position[last] + 1 >= position[op]:
        return
    # reads of state must stay before its update: only hoist past ops that write nothing
    between = list(block.ops)[position[last] + 1 : position[op]]
    if any(isinstance(o, CallOp) and writes_input(o.target_name) for o in between):
        return
    op.detach()
    Rewriter.insert_op(op, InsertPoint.after(last))


def hoist_chain(value: SSAValue, block) -> None:
    """Move the pure calls that make `value` up to just after their operands,
    the first ones first, so `value` is ready as early as its inputs are."""
    chain, todo = [], [value]
    while todo:
        owner = todo.pop().owner
        if isinstance(owner, CallOp) and owner.parent is block and owner not in chain:
            chain.append(owner)
            todo.extend(owner.operands)
    position = {o: i for i, o in enumerate(block.ops)}
    for op in sorted(chain, key=position.__getitem__):
        hoist(op, position, block)
        position = {o: i for i, o in enumerate(block.ops)}


def sink_all(ops: list[Operation], block) -> None:
    """Move each op down to just before its first reader, the last ones first."""
    position = {o: i for i, o in enumerate(block.ops)}
    for o in sorted(ops, key=position.__getitem__, reverse=True):
        readers = [u.operation for r in o.results for u in r.uses]
        position = {x: i for i, x in enumerate(block.ops)}
        first = min(readers, key=position.__getitem__, default=None)
        if first is not None and position[first] > position[o] + 1:
            o.detach()
            Rewriter.insert_op(o, InsertPoint.before(first))
