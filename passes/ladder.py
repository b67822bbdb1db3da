"""ladder{layers=K}: Ladder Residual (Zhang, Mishra et al., 2025).

A tensor-parallel transformer computes, per module (attention or MLP),

    x_i = x_{i-1} + AllReduce(h_i(x_{i-1}))         standard
    x_i = x_{i-1} + AllReduce(h_i(x_{i-2}))         ladder

so that the all-reduce of h_i runs while h_{i+1} computes. The pass finds
the residual stream by dataflow (`residual`), rewires each converted module's
branch to read the stream from two modules back (the first module reads the
embeddings, as does the second), turns the all-reduce ending each branch into
an async start with a `plait.wait`, and moves each wait and residual add down
to where their results are first needed. `layers=K` converts only the last K
decoder layers (2K modules); `layers=0`, the default, converts all.

After `shard` it needs a replicated stream (Megatron's layout: Llama, Qwen,
Mixtral, GPT-2, Phi-3); where a plan leaves the stream split (GPT-2 with
`plan=*.c_attn:replicate`), run it before: `ladder,shard{mesh=tp:2},overlap`,
the same model.

It changes the model's function: the reference for a ladder program is the
same pass on one device (no collectives), not the original model.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Block, Operation, SSAValue

from ..ir.attrs import MESH_ATTR
from ..ir.errors import PlaitError
from ..ir.ops import AllReduceOp, CallOp, ParamOp
from ..ir.residual import ResidualModule, residual_chain
from ..ir.text import where
from .base import Pass, function_blocks
from .options import OptionError
from .reorder import make_async, sink
from .whole import whole_values


class LadderError(PlaitError):
    pass


def _check_replicated(block: Block, chain: list[ResidualModule], axes) -> None:
    """In a sharded program the stream must be whole on every rank."""
    whole = whole_values(block, axes)
    for module in chain:
        if module.stream not in whole or module.result not in whole:
            raise LadderError(
                f"{where(module.add)}: the residual stream is sharded here, so ladder cannot "
                "rewire it after sharding; run ladder before shard and overlap after it: "
                "ladder,shard{mesh=...},overlap"
            )


def convert(block: Block, layers: int, axes: tuple[str, ...] = ()) -> int:
    """Rewrite the block's residual stream; returns the number of modules converted."""
    chain = residual_chain(block)
    if len(chain) < 2:
        raise LadderError(
            "ladder found no residual stream to convert: it looks for a chain of adds "
            "r_i = r_{i-1} + f_i(r_{i-1}) (each branch f_i computed from the stream, in TP "
            "programs ending in an all-reduce); this model's blocks are not residual"
        )
    _check_replicated(block, chain, axes)
    first = 0 if layers <= 0 else max(0, len(chain) - 2 * layers)
    converted = chain[first:]
    for i, module in enumerate(chain):
        if i < first or i == 0:
            continue  # the first module already reads the embeddings
        two_back = chain[i - 1].stream
        for op, index in module.readers:
            op.operands[index] = two_back
    for module in converted:
        blocking, epilogue = _ending_all_reduce(module.branch)
        wait = make_async(blocking) if blocking is not None else None
        sink(module.add, block)
        for op in reversed(epilogue):  # a bias added after the all-reduce, views
            sink(op, block)
        if wait is not None:
            sink(wait, block)
    return len(converted)


def _ending_all_reduce(branch: SSAValue) -> tuple[AllReduceOp | None, list[Operation]]:
    """The blocking all-reduce a branch ends in, and the ops after it that only
    add weights or reshape (GPT-2's row-parallel bias, views), in order."""
    epilogue: list[Operation] = []
    value = branch
    while isinstance(op := value.owner, Operation):
        if isinstance(op, AllReduceOp):
            return (op if op.is_async is None else None), epilogue[::-1]
        computed = [v for v in op.operands if not isinstance(v.owner, ParamOp)]
        if not isinstance(op, CallOp) or len(computed) != 1:
            break
        epilogue.append(op)
        value = computed[0]
    return None, []


@dataclass(frozen=True)
class Ladder(Pass):
    name = "ladder"
    summary = (
        "Ladder Residual: each module reads the stream from two modules back; async all-reduces"
    )

    requires = ("canonicalize", "cse", "dce")  # the residual stream is found in canonical form
    layers: int = 0  # ladder only the last K modules (0: all)

    def __post_init__(self):
        super().__post_init__()
        if self.layers < 0:
            message = f"layers counts the last modules to convert, >= 0, not {self.layers}"
            raise OptionError(message, "layers")

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        mesh = op.attributes.get(MESH_ATTR)
        axes = tuple(mesh.axes) if mesh is not None else ()
        for block in function_blocks(op):
            convert(block, self.layers, axes)
