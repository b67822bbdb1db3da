"""Analysis: which ops may be removed or merged.

An ATen call is pure unless torch tags it as drawing random numbers (two calls
differ, and removing one shifts the generator), writes an argument (an
update of program state, such as a KV cache) or returns nothing (it exists
for an effect, such as an assert). Calls to other libraries' operators
are kept as they are: their effects are unknown. Parameters are pure;
collectives are deterministic and issued identically by every rank, so they
are removable (but a gather into state) and never merged.
"""

from __future__ import annotations

from xdsl.ir import Operation

from .ops import CallOp, CollectiveOp, GatherIntoOp, LocalShardOp, ParamOp, WaitOp
from .schema import returns_alias, tags, writes_input


def _pure_call(op: CallOp) -> bool:
    if not op.results or not op.target_name.startswith("aten::"):
        return False
    if writes_input(op.target_name):
        return False
    known = tags(op.target_name)
    if known is None or "nondeterministic_seeded" not in known:
        return known is not None
    # dropout draws random numbers only while training
    return op.target_name == "aten::dropout" and op.arg("train") is False


def is_removable(op: Operation) -> bool:
    """May the op be erased when its results are unused? Not a gather into
    program state (it writes the state), nor the wait that completes it."""
    if isinstance(op, WaitOp):
        return is_removable(op.input.owner)
    if isinstance(op, GatherIntoOp):
        return False
    if isinstance(op, (ParamOp, CollectiveOp)):
        return True
    return isinstance(op, CallOp) and _pure_call(op)


def is_mergeable(op: Operation) -> bool:
    """May two identical ops be merged into one?"""
    return isinstance(op, ParamOp) or (isinstance(op, CallOp) and _pure_call(op))


def updates_state(op: Operation) -> bool:
    """An in-place call on program state or a view of it (a KV cache update,
    an optimizer's update of this rank's slice), or a gather into it: it
    writes the state's memory, so its result is a view of the state, not a
    new buffer."""
    if isinstance(op, GatherIntoOp):
        return isinstance(op.dest.owner, ParamOp) and op.dest.owner.is_state
    if not isinstance(op, CallOp) or not op.operands or not writes_input(op.target_name):
        return False
    owner = op.operands[0].owner
    while isinstance(owner, LocalShardOp) or (
        isinstance(owner, CallOp)
        and owner.operands
        and (writes_input(owner.target_name) or returns_alias(owner.target_name))
    ):
        owner = owner.operands[0].owner  # an earlier update of the same state, or a view
    return isinstance(owner, ParamOp) and owner.is_state
