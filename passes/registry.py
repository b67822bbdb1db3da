"""The registry of passes: name -> class, imported only when used."""

from __future__ import annotations

import importlib

from ..ir.errors import PlaitError

# what `plait.compile` and the CLI run when no pipeline is given
DEFAULT_PIPELINE = "canonicalize,cse,dce"

# name -> "module:Class", relative to plait.passes
_PASSES: dict[str, str] = {
    "canonicalize": "canonicalize:Canonicalize",
    "cse": "cse:CommonSubexpressionElimination",
    "dce": "dce:DeadCodeElimination",
    "fuse": "fuse:Fuse",
    "ladder": "ladder:Ladder",
    "memplan": "memory.memplan:MemPlan",
    "offload": "memory.offload:Offload",
    "overlap": "overlap:Overlap",
    "parallelize": "shard.parallelize:Parallelize",
    "pipeline": "shard.stages:Pipeline",
    "quantize": "compress.quantize:Quantize",
    "remat": "memory.remat:Remat",
    "sparsify": "compress.sparsify:Sparsify",
    "shard": "shard.shard:Shard",
    "tier": "memory.tier:Tier",
    "zero": "shard.zero:Zero",
}


class UnknownPassError(PlaitError):
    pass


def names() -> list[str]:
    return sorted(_PASSES)


def get(name: str):
    """The pass class registered as `name`."""
    if name not in _PASSES:
        raise UnknownPassError(f"unknown pass '{name}'; available: {', '.join(names())}")
    module, cls = _PASSES[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)
