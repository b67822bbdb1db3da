"""Where a tensor lives: the `mem` attribute the memory passes write and the
backend reads.

    %h = plait.elementwise "aten::silu"(%g) {mem = #plait.mem<offset = 4096>} : ...
    %w = plait.param "model.layers.1.mlp.up_proj.weight" {mem = #plait.mem<tier = "host", prefetch = true>} : ...

`memplan` places a result at an offset of the activation arena (the module's
`plait.arena` bytes); `tier` keeps a weight in host memory, streamed to the
device ahead of its use.
"""

from __future__ import annotations

from xdsl.ir import Operation

from .attrs import MemAttr, MemorySpace
from .ops import ParamOp

MEM = "mem"  # the op attribute holding a MemAttr


def planned_offset(op: Operation) -> int | None:
    """The byte offset in the arena that `op`'s result is planned at, or None."""
    attr = op.attributes.get(MEM)
    return None if attr is None else attr["offset"]


def plan_offset(op: Operation, offset: int) -> None:
    op.attributes[MEM] = MemAttr.make(offset=offset)


def host_tier(param: ParamOp) -> bool:
    """Is the weight kept in host memory and streamed to the device?"""
    attr = param.attributes.get(MEM)
    return attr is not None and attr["tier"] == MemorySpace.HOST.value


def stream_from_host(param: ParamOp) -> None:
    param.attributes[MEM] = MemAttr.make(tier=MemorySpace.HOST.value, prefetch=True)
