"""fuse{mode=default}: compile each rank's program through Inductor.

plait's per-rank programs call ATen op by op. This pass records in the
module that the backend compiles every program it builds with
`torch.compile` (Inductor: fused element-wise and reduction kernels, C++ on
a CPU, Triton on CUDA; `mode=reduce-overhead` adds CUDA graphs, for decode
steps). The graph Inductor sees is the program as the passes left it:
functional collectives and their waits in the order `overlap` or `ladder`
chose. By default (`scope=whole`) Inductor gets the whole program: it
fuses across layers and plans every buffer, and compiles every layer.
`scope=blocks` compiles each residual block once and reuses it for the
layers that repeat it (backends/regions.py): a shorter compile for a
slower program (measured in the README). Nothing compiled is stored in an artifact: loading
one compiles again here (Inductor's own cache makes that fast), so an
artifact stays data.

Put it last: `canonicalize,cse,dce,shard{mesh=tp:2},overlap,fuse`. It
replaces `memplan` (Inductor plans its own buffers).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, StringAttr

from ..ir.attrs import ARENA_ATTR, FUSE_ATTR, FUSE_SCOPE_ATTR
from ..ir.errors import PlaitError
from .base import Pass


class FuseError(PlaitError):
    pass


class FuseMode(enum.Enum):
    """torch.compile's modes."""

    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"  # CUDA graphs (decode steps)
    MAX_AUTOTUNE = "max-autotune"  # search kernel configurations (slow to compile)


class FuseScope(enum.Enum):
    """What one torch.compile graph holds."""

    BLOCKS = "blocks"  # one residual block: repeated blocks share their compiled graph
    WHOLE = "whole"  # the whole program


@dataclass(frozen=True)
class Fuse(Pass):
    name = "fuse"
    summary = "compile each rank's program through Inductor (fused kernels; CUDA graphs)"

    mode: FuseMode = FuseMode.DEFAULT
    scope: FuseScope = FuseScope.WHOLE

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        if ARENA_ATTR in op.attributes:
            raise FuseError(
                "memplan planned an arena, and fuse's Inductor plans its own buffers: "
                "drop memplan from the pipeline (or fuse)"
            )
        op.attributes[FUSE_ATTR] = StringAttr(self.mode.value)
        if self.scope is FuseScope.BLOCKS:
            op.attributes[FUSE_SCOPE_ATTR] = StringAttr(self.scope.value)
