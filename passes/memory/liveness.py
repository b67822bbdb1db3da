"""Analysis: which values of a per-rank program need memory of their own, and
from which op to which op they are alive.

    buffers = liveness(fn, sizes)      # sizes: value -> bytes
    for b in buffers.buffers: b.value, b.size, b.start, b.end   # op indices, inclusive

A value needs a buffer when its op allocates: views (an operator whose schema
returns an alias of an input, `plait.wait`, `plait.local_shard`) share their
base's buffer and keep it alive until their own last use. An async
collective's input is read while it is in flight, so it stays alive until the
matching `plait.wait`. Program results stay alive to the end. Inputs and
weights are not buffers (the caller and the WeightStore own them).

Aliasing plait cannot see through (an operator that writes an input other
than program state, or one torch has no schema for) is listed in `unsafe`; a planner must not plan such a
program.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsl.dialects import func
from xdsl.ir import SSAValue

from ...ir.effects import updates_state
from ...ir.ops import CallOp, CollectiveOp, GatherIntoOp, LocalShardOp, ParamOp, WaitOp
from ...ir.schema import returns_alias, writes_input
from ...ir.text import where


@dataclass
class Buffer:
    value: SSAValue
    size: int
    start: int
    end: int
    returned: bool = False  # a program result (or a view of one) lives in it

    @property
    def lifetime(self) -> int:
        return self.end - self.start + 1


@dataclass
class Liveness:
    buffers: list[Buffer] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    steps: int = 0  # ops in the program


def _aliases(op) -> bool:
    if isinstance(op, (WaitOp, LocalShardOp, GatherIntoOp)):
        return True
    return isinstance(op, CallOp) and returns_alias(op.target_name)


def liveness(fn: func.FuncOp, sizes: dict[SSAValue, int]) -> Liveness:
    block = fn.body.blocks.first
    ops = list(block.ops)
    out = Liveness(steps=len(ops))
    base: dict[SSAValue, SSAValue] = {}  # view -> the value that owns its memory
    start: dict[SSAValue, int] = {}
    end: dict[SSAValue, int] = {}
    in_flight: dict[SSAValue, SSAValue] = {}  # async result -> the collective's input
    returned: set[SSAValue] = set()

    def use(value: SSAValue, index: int) -> None:
        root = base.get(value, value)
        if root in start:
            end[root] = max(end[root], index)

    for index, op in enumerate(ops):
        if isinstance(op, CallOp):
            writes = writes_input(op.target_name)
            if writes and updates_state(op):
                writes = False  # program state lives outside the arena, like weights
            if writes is None or writes:
                what = "writes an input" if writes else "has no torch schema"
                out.unsafe.append(f"{where(op)}: {op.target_name} {what}")
        for value in op.operands:
            use(value, index)
            if value in in_flight:  # the wait: the sent buffer may be reused now
                use(in_flight[value], index)
        if isinstance(op, func.ReturnOp):
            for value in op.operands:
                use(value, len(ops) - 1)
                returned.add(base.get(value, value))
            continue
        if isinstance(op, ParamOp):
            continue
        if isinstance(op, CollectiveOp) and op.is_async is not None:
            in_flight[op.result] = op.input
        for result in op.results:
            if _aliases(op) and op.operands:
                base[result] = base.get(op.operands[0], op.operands[0])
            else:
                start[result] = end[result] = index
    out.buffers = [Buffer(v, int(sizes.get(v, 0)), start[v], end[v], v in returned) for v in start]
    return out


def value_sizes(fn: func.FuncOp, values: dict[str, int]) -> dict[SSAValue, int]:
    """Device bytes of every tensor value (async ones: the tensor in flight),
    with the size symbols set to `values`; 0 for a value in host memory."""
    import sympy

    from ...ir import symbolic
    from ...ir.memory import value_on_host
    from ...ir.types import AsyncType, TensorType

    subs = {symbolic.symbol(n): sympy.Integer(v) for n, v in values.items()}
    cache: dict[object, int] = {}
    out: dict[SSAValue, int] = {}
    block = fn.body.blocks.first
    for value in [*block.args, *(r for op in block.ops for r in op.results)]:
        t = value.type
        if isinstance(t, AsyncType):
            t = t.value_type
        if not isinstance(t, TensorType):
            continue
        if value_on_host(value):  # offload's: in host memory, no part of the device's
            out[value] = 0
            continue
        if t not in cache:
            nbytes = sympy.sympify(t.nbytes).xreplace(subs)
            if not nbytes.is_Integer:
                raise ValueError(
                    f"size {nbytes} needs a value for {sorted(map(str, nbytes.free_symbols))}"
                )
            cache[t] = int(nbytes)
        out[value] = cache[t]
    return out
