"""Data-parallel gradient reduction in buckets, overlapped with backward (DDP's).

After the shard pass, a training step over a data axis reduces each
parameter's gradient with its own blocking all-reduce just before the
optimizer reads it. Here they are grouped, in the order backward finishes
them, into buckets of about `bucket_bytes` (DDP's 25 MB), each one flat
tensor (`cat` of the flattened gradients): its async all-reduce starts right
after the bucket's last gradient is made, so it runs while backward goes on,
and its `plait.wait` sits before the first op that reads a reduced gradient
(the ladder/overlap passes' start-early, wait-late, with the same ops).

A pass that moves gradients apart (pipeline's split by stage) undoes the
buckets first (`unbucket`: one blocking all-reduce per gradient again) and
rebuilds them where the gradients went (`bucket_by`: each old bucket's
members that one function holds, as one bucket there).
"""

from __future__ import annotations

import math

from xdsl.ir import Block, Operation, SSAValue
from xdsl.rewriter import InsertPoint, Rewriter

from ...ir.args import ArgsAttr, Operand
from ...ir.ops import AllReduceOp, CallOp, LocalShardOp, WaitOp, call_op_class
from ...ir.training import GRAD_OF, gradients
from ...ir.types import TensorType
from ..reorder import hoist

BUCKET_MB = 25.0  # DDP's default bucket_cap_mb

# single-operand ops between a marked gradient and its reduction (views, a tp slice)
_THROUGH = (CallOp, LocalShardOp)


def _is_gradient(value: SSAValue, hops: int = 4) -> bool:
    """`value` is a marked gradient, or a view of one."""
    for _ in range(hops):
        op = value.owner
        if not isinstance(op, Operation):
            return False
        if GRAD_OF in op.attributes:
            return True
        if not isinstance(op, _THROUGH) or len(op.operands) != 1:
            return False
        value = op.operands[0]
    return False


def _gradient_name(value: SSAValue, marks: dict[SSAValue, str], hops: int = 4) -> str | None:
    """The parameter whose marked gradient `value` is (or is a view of)."""
    for _ in range(hops):
        if value in marks:
            return marks[value]
        op = value.owner
        if not isinstance(op, _THROUGH) or len(op.operands) != 1:
            return None
        value = op.operands[0]
    return None


def _marks(block: Block) -> dict[SSAValue, str]:
    return {v: name for name, v in gradients(block.parent.parent).items()}


def _static(t: TensorType) -> bool:
    return all(isinstance(d, int) for d in t.shape)


def _call(before: Operation, target: str, values, args, result: TensorType, name: str):
    new = call_op_class(target)(target, values, ArgsAttr(tuple(args), ()), [result])
    new.location = before.location
    new.results[0].name_hint = name
    Rewriter.insert_op(new, InsertPoint.before(before))
    return new.results[0]


def _first_user(values, position) -> Operation | None:
    users = (u.operation for v in values for u in v.uses)
    return min(users, key=position.__getitem__, default=None)


def bucket_gradients(block: Block, axis: str, bucket_bytes: float) -> int:
    """Reduce the gradients of `block` along `axis` in async buckets; returns
    how many buckets."""
    reduces = [
        op
        for op in block.ops
        if isinstance(op, AllReduceOp)
        and op.is_async is None
        and op.axis.data == axis
        and op.reduce.data == "sum"
        and _static(op.input.type)
        and _is_gradient(op.input)
    ]
    if not reduces:
        return 0
    position = {op: i for i, op in enumerate(block.ops)}
    for op in reduces:
        hoist(op.input.owner, position, block)
        position = {op: i for i, op in enumerate(block.ops)}
    reduces.sort(key=lambda op: position[op.input.owner])
    buckets: list[list[AllReduceOp]] = []
    size, needed = 0.0, 0  # the bucket's bytes; where its first reduced gradient is read
    for op in reduces:
        t = op.input.type
        reader = _first_user([op.result], position)
        read = position[reader] if reader is not None else len(position)
        if (
            not buckets
            or size >= bucket_bytes
            or buckets[-1][0].input.type.dtype != t.dtype
            or position[op.input.owner] >= needed  # the bucket is read before this is made
        ):
            buckets.append([])
            size, needed = 0.0, read
        buckets[-1].append(op)
        size += t.nbytes
        needed = min(needed, read)
    for bucket in buckets:
        _reduce_bucket(block, bucket, axis)
    return len(buckets)


def _reduce_bucket(block: Block, bucket: list[AllReduceOp], axis: str) -> None:
    position = {op: i for i, op in enumerate(block.ops)}
    ready = max((op.input.owner for op in bucket), key=position.__getitem__)
    start_at = ready.next_op  # insert after the bucket's last gradient
    dtype = bucket[0].input.type.dtype
    counts = [math.prod(op.input.type.shape) for op in bucket]
    flats = [
        _call(
            start_at,
            "aten::reshape",
            [op.input],
            [Operand(0), (-1,)],
            TensorType([count], dtype),
            "grad_flat",
        )
        for op, count in zip(bucket, counts)
    ]
    total = sum(counts)
    flat = _call(
        start_at,
        "aten::cat",
        flats,
        [tuple(Operand(i) for i in range(len(flats))), 0],
        TensorType([total], dtype),
        "grad_bucket",
    )
    start = AllReduceOp(flat, axis, "sum", is_async=True)
    start.location = start_at.location
    start.result.name_hint = "grad_bucket"
    Rewriter.insert_op(start, InsertPoint.before(start_at))
    # wait where the first reduced gradient is read
    position = {op: i for i, op in enumerate(block.ops)}
    first = _first_user([op.result for op in bucket], position) or block.last_op
    wait = WaitOp(start.result)
    wait.location = first.location
    wait.result.name_hint = "grad_bucket_reduced"
    Rewriter.insert_op(wait, InsertPoint.before(first))
    offset = 0
    for op, count in zip(bucket, counts):
        t = op.result.type
        piece = _call(
            first,
            "aten::slice.Tensor",
            [wait.result],
            [Operand(0), 0, offset, offset + count],
            TensorType([count], dtype),
            "grad_piece",
        )
        whole = _call(
            first,
            "aten::view",
            [piece],
            [Operand(0), tuple(t.shape)],
            t,
            op.result.name_hint or "grad_reduced",
        )
        op.result.replace_all_uses_with(whole)
        Rewriter.erase_op(op)
        offset += count


def unbucket(block: Block, axis: str) -> list[list[str]]:
    """Undo `bucket_gradients` along `axis`: each bucket's gradients reduced
    by a blocking all-reduce each, where the bucket was waited for; returns
    each bucket's parameter names, in order (for `bucket_by`)."""
    marks = _marks(block)
    buckets = []
    for start in [op for op in block.ops if isinstance(op, AllReduceOp)]:
        found = bucket_parts(start, axis)
        if found is None:
            continue
        flats, wait, cuts = found
        names = []
        for flat, cut in zip(flats, cuts):
            gradient = flat.owner.operands[0]
            whole = next(iter(cut.results[0].uses)).operation
            reduce = AllReduceOp(gradient, axis, "sum")
            reduce.location = whole.location
            reduce.result.name_hint = whole.results[0].name_hint
            Rewriter.insert_op(reduce, InsertPoint.before(wait))
            whole.results[0].replace_all_uses_with(reduce.result)
            Rewriter.erase_op(whole)
            Rewriter.erase_op(cut)
            names.append(_gradient_name(gradient, marks) or "")
        cat = start.input.owner
        for op in (wait, start, cat, *(f.owner for f in flats)):
            Rewriter.erase_op(op)
        buckets.append(names)
    return buckets


def bucket_parts(start: AllReduceOp, axis: str):
    """A bucket `_reduce_bucket` made: (its flat gradients, its wait, the
    slices of the reduced bucket, in the same order), or None for another
    all-reduce."""
    cat = start.input.owner
    if not (
        start.is_async is not None
        and start.axis.data == axis
        and isinstance(cat, CallOp)
        and cat.target_name == "aten::cat"
        and len(list(start.result.uses)) == 1
    ):
        return None
    wait = next(iter(start.result.uses)).operation
    cuts = sorted((u.operation for u in wait.result.uses), key=lambda op: op.arg("start"))
    if len(cuts) != len(cat.operands):
        return None
    return list(cat.operands), wait, cuts


def bucket_by(block: Block, axis: str, buckets: list[list[str]]) -> int:
    """Reduce the blocking all-reduces along `axis` of the gradients each of
    `buckets` names (`unbucket`'s) as one async bucket, of those `block`
    has; returns how many buckets."""
    marks = _marks(block)
    reduces = {}
    for op in block.ops:
        if isinstance(op, AllReduceOp) and op.is_async is None and op.axis.data == axis:
            name = _gradient_name(op.input, marks)
            if name is not None and op.reduce.data == "sum" and _static(op.input.type):
                reduces[name] = op
    count = 0
    for names in buckets:
        bucket = [reduces[n] for n in names if n in reduces]
        if bucket:
            _reduce_bucket(block, bucket, axis)
            count += 1
    return count
