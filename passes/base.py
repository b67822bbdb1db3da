"""What every pass is: a frozen dataclass with a kebab-case name and typed options.

Passes are xDSL `ModulePass`es, so they run under xDSL's tools too. A pass that
needs the program's weights (quantization, sharding), or to run the program on
sample inputs (activation statistics), finds them on the `PassContext` it is
given.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Block, Operation
from xdsl.passes import ModulePass

from ..ir.dialect import make_context
from ..ir.weights import WeightStore

# Builds `module`'s program on `weights` and runs it on each batch, calling
# observers[op](args) with the arguments each listed op runs with: how a pass
# runs the model (backends.fx.run_observed, given by plait.compile).
ProgramRunner = Callable[
    [ModuleOp, WeightStore, list[tuple], dict[Operation, Callable[[tuple], None]]], None
]


@dataclass
class PassContext(Context):
    """An xDSL context that also carries the program's weights, and sample
    inputs with a way to run the program on them."""

    weights: WeightStore | None = field(default=None)
    # inputs to run the program on, for activation statistics (sparsify)
    sample_inputs: list[tuple] = field(default_factory=list)
    run_program: ProgramRunner | None = None

    @staticmethod
    def create(
        weights: WeightStore | None = None,
        sample_inputs=(),
        run_program: ProgramRunner | None = None,
    ) -> PassContext:
        ctx = PassContext(
            weights=weights,
            sample_inputs=[tuple(b) for b in sample_inputs],
            run_program=run_program,
        )
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
    # passes whose output this one expects; the pass manager runs any of them
    # the pipeline does not run before it
    requires: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        """Typed options given as text (`Shard(mesh="tp:2")`) are parsed here too."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                continue
            hint = hints[f.name]
            for kind in typing.get_args(hint) or (hint,):
                if isinstance(kind, type) and issubclass(kind, enum.Enum):
                    object.__setattr__(self, f.name, kind(value))
                elif hasattr(kind, "parse"):
                    object.__setattr__(self, f.name, kind.parse(value))

    def apply(self, ctx: Context, op: ModuleOp) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
