"""Where a tensor lives: the `mem` attribute the memory passes write and the
backend reads.

    %h = plait.elementwise "aten::silu"(%g) {mem = #plait.mem<offset = 4096>} : ...
    %w = plait.param "model.layers.1.mlp.up_proj.weight" {mem = #plait.mem<tier = "host", prefetch = true>} : ...

`memplan` places a result at an offset of the activation arena (the module's
`plait.arena` bytes); `tier` keeps a weight in host memory, streamed to the
device ahead of its use; `offload` keeps optimizer state in host memory and
runs its update there (`on_host`: the state and the update's ops).
"""

from __future__ import annotations

from xdsl.ir import Operation, SSAValue

from .args import ArgsAttr, Operand, Tag
from .attrs import MemAttr, MemorySpace
from .ops import CallOp, ParamOp, call_op_class

MEM = "mem"  # the op attribute holding a MemAttr


def planned_offset(op: Operation) -> int | None:
    """The byte offset in the arena that `op`'s result is planned at, or None."""
    attr = op.attributes.get(MEM)
    return None if attr is None or attr["offset"] < 0 else attr["offset"]


def plan_offset(op: Operation, offset: int) -> None:
    op.attributes[MEM] = MemAttr.make(offset=offset)


def host_tier(param: ParamOp) -> bool:
    """Is the weight kept in host memory and streamed to the device?"""
    attr = param.attributes.get(MEM)
    return attr is not None and attr["tier"] == MemorySpace.HOST.value


def stream_from_host(param: ParamOp) -> None:
    param.attributes[MEM] = MemAttr.make(tier=MemorySpace.HOST.value, prefetch=True)


# the `device` tag value of a copy to host memory (`plait.ir.args.Tag`); the
# backend maps it to the CPU and every other device tag to the program's device
HOST_DEVICE = "host"
DEVICE = MemorySpace.DEVICE.value  # (the program's device)
COPY = "aten::_to_copy"


def on_host(op: Operation) -> bool:
    """Does `op`'s result live in host memory (state `offload` keeps there, or
    an update `offload` runs there)? Streamed weights (`tier`) are copied to
    the device before use, so their values are the device's."""
    attr = op.attributes.get(MEM)
    if attr is None or attr["tier"] != MemorySpace.HOST.value:
        return False
    return not isinstance(op, ParamOp) or op.is_state


def value_on_host(value: SSAValue) -> bool:
    return isinstance(value.owner, Operation) and on_host(value.owner)


def place_on_host(op: Operation) -> None:
    op.attributes[MEM] = MemAttr.make(tier=MemorySpace.HOST.value)


def crosses(op: Operation) -> bool:
    """Does `op` copy between host and device (one side's value, the other's result)?"""
    host = on_host(op)
    return any(value_on_host(v) != host for v in op.operands)


def copy_to(value: SSAValue, device: str) -> CallOp:
    """A copy of `value` to `device` (HOST_DEVICE: its result in host memory,
    or DEVICE), not yet in a block."""
    args = ArgsAttr((Operand(0),), (("device", Tag("device", device)),))
    copy = call_op_class(COPY)(COPY, [value], args, [value.type])
    if device == HOST_DEVICE:
        place_on_host(copy)
    return copy
