"""What every pass is: a frozen dataclass with a kebab-case name and typed options.

Passes are xDSL `ModulePass`es, so they run under xDSL's tools too. A pass that
needs the program's weights (quantization, sharding) finds them on the
`PassContext` it is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Block
from xdsl.passes import ModulePass

from ..ir.dialect import make_context
from ..ir.weights import WeightStore


@dataclass
class PassContext(Context):
    """An xDSL context that also carries the program's weights."""

    weights: WeightStore | None = field(default=None)
    # example inputs to run the program on, for passes that calibrate (sparsify)
    calibration: list[tuple] = field(default_factory=list)

    @staticmethod
    def create(weights: WeightStore | None = None, calibration=()) -> PassContext:
        ctx = PassContext(weights=weights, calibration=[tuple(b) for b in calibration])
        for dialect in make_context().loaded_dialects:
            ctx.load_dialect(dialect)
        return ctx


def function_blocks(module: ModuleOp) -> Iterator[Block]:
    """Every block of every function in the module: what most passes walk."""
    for fn in module.ops:
        if isinstance(fn, func.FuncOp):
            yield from fn.body.blocks


@dataclass(frozen=True)
class Pass(ModulePass):
    """Base of plait's passes. Subclasses set `name` and implement `apply`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""

    def apply(self, ctx: Context, op: ModuleOp) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
