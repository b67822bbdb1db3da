"""Analysis: the residual stream of a transformer, found by dataflow.

A residual module adds a branch computed from the stream back onto it:

    r_i = r_{i-1} + f_i(r_{i-1})        (in TP programs f_i ends in an all-reduce)

`residual_chain` finds the longest sequence of such adds, each one's stream
input the previous one's result, whatever the modules are called. For each
module it records the ops of the branch that read the stream, which is what
the ladder rewrite rewires. `block_cuts` says where `fuse{scope=blocks}`
cuts a program into separately compiled blocks; the backend and the cost
model both cut there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsl.ir import Block, Operation, SSAValue

from .ops import CallOp


@dataclass
class ResidualModule:
    add: CallOp  # r_i = add(stream, branch)
    stream: SSAValue  # r_{i-1}
    branch: SSAValue  # f_i(r_{i-1})
    readers: list[tuple[Operation, int]] = field(
        default_factory=list
    )  # (op, operand #) reading r_{i-1}

    @property
    def result(self) -> SSAValue:
        return self.add.results[0]


def _is_plain_add(op: Operation) -> bool:
    return (
        isinstance(op, CallOp)
        and op.target_name == "aten::add.Tensor"
        and len(op.inputs) == 2
        and op.arg("alpha", 1) == 1
        and op.inputs[0].type == op.inputs[1].type == op.results[0].type
    )


def _branch_readers(stream: SSAValue, branch: SSAValue, position: dict) -> list | None:
    """Ops computing `branch` that read `stream` (None if the branch ignores it)."""
    start = position.get(stream.owner, -1) if isinstance(stream.owner, Operation) else -1
    seen: set[Operation] = set()
    readers = []
    stack = [branch.owner] if isinstance(branch.owner, Operation) else []
    while stack:
        op = stack.pop()
        if op in seen or position.get(op, -1) <= start:
            continue
        seen.add(op)
        for index, operand in enumerate(op.operands):
            if operand is stream:
                readers.append((op, index))
            elif isinstance(operand.owner, Operation):
                stack.append(operand.owner)
    return readers or None


def residual_modules(block: Block) -> list[ResidualModule]:
    """Every residual module, in program order, one per stream value (a
    training step's backward has them too: each add of a gradient that
    flowed around a module to the one that flowed through it)."""
    ops = list(block.ops)
    position = {op: i for i, op in enumerate(ops)}
    modules: dict[SSAValue, ResidualModule] = {}  # keyed by the stream it reads
    for op in ops:
        if not _is_plain_add(op):
            continue
        for stream, branch in ((op.inputs[0], op.inputs[1]), (op.inputs[1], op.inputs[0])):
            readers = _branch_readers(stream, branch, position)
            if readers is not None:
                modules.setdefault(stream, ResidualModule(op, stream, branch, readers))
                break
    return list(modules.values())


def residual_chain(block: Block) -> list[ResidualModule]:
    """The longest chain of residual modules in program order (may be empty)."""
    return _longest_run(residual_modules(block))


def _longest_run(found: list[ResidualModule]) -> list[ResidualModule]:
    """Of the modules `found`, the longest run in which each reads the
    previous one's result (r_{i-1} -> r_i), followed from every start."""
    modules = {m.stream: m for m in found}
    by_result = {m.result: m for m in modules.values()}
    best: list[ResidualModule] = []
    for module in modules.values():
        if module.stream in by_result:
            continue  # not the start of a run
        run, current = [], module
        while current is not None:
            run.append(current)
            current = modules.get(current.result)
        if len(run) > len(best):
            best = run
    return best


def repeat_period(codes: list, longest: int = 4) -> int:
    """The run length p (at most `longest`) for which runs of p consecutive
    `codes` take the fewest distinct values, the shortest such p: a
    transformer layer is an attention module and an MLP module, p = 2."""
    if not codes:
        return 1

    def distinct(p: int) -> int:
        return len({tuple(codes[i : i + p]) for i in range(0, len(codes), p)})

    return min(range(1, min(longest, len(codes)) + 1), key=lambda p: (distinct(p), p))


@dataclass(frozen=True)
class BlockCuts:
    """Where `fuse{scope=blocks}` cuts a program into compiled blocks."""

    values: list[SSAValue]  # the stream's start, then the last value of each block
    off_stream: frozenset[Operation]  # what runs before the blocks, unfused

    @property
    def ends(self) -> list[Operation]:
        """The ops whose results end the blocks."""
        return [v.owner for v in self.values[1:]]


def block_cuts(block: Block) -> BlockCuts:
    """Where `fuse{scope=blocks}` cuts a program into compiled blocks: the
    residual stream's start, then the last value of each block, the result
    of a residual module after the start (none without a stream). The
    modules are joined in runs of `repeat_period` of their op sequences,
    counting only ops that depend on the stream; the rest (the embedding,
    masks, rotary tables, sizes) is off the stream and runs before the
    blocks, unfused."""
    modules = residual_modules(block)
    chain = _longest_run(modules)
    if not chain:
        return BlockCuts([], frozenset())
    ops = list(block.ops)
    position = {op: i for i, op in enumerate(ops)}
    stream = chain[0].stream
    streamed = _streamed(ops, position, stream)
    adds = sorted((m.add for m in modules if m.add in streamed), key=position.get)
    bounds = [position.get(stream.owner, -1), *(position[a] for a in adds)]
    codes = [
        tuple(
            op.name + getattr(op, "target_name", "") for op in ops[a + 1 : b + 1] if op in streamed
        )
        for a, b in zip(bounds, bounds[1:])
    ]
    p = repeat_period(codes)
    ends = [adds[i] for i in range(len(adds)) if (i + 1) % p == 0 or i == len(adds) - 1]
    return BlockCuts(
        [stream, *(add.results[0] for add in ends)],
        frozenset(op for op in ops if op not in streamed),
    )


def _streamed(ops: list[Operation], position, stream: SSAValue) -> set[Operation]:
    """The ops after the stream's start that read it, directly or through others."""
    streamed: set[Operation] = set()
    for op in ops[position.get(stream.owner, -1) + 1 :]:
        if any(v is stream or v.owner in streamed for v in op.operands):
            streamed.add(op)
    return streamed
