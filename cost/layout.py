"""Analysis: the memory order of each value, to know which reshapes copy.

A value's order lists its logical dims from outermost to innermost in memory;
a contiguous tensor's is (0, 1, ..., n-1), and None means strides no order
describes (an expand's zero strides, a slice of an inner dim). A reshape,
flatten or `contiguous` of a value that is contiguous up to size-1 dims is
free; of anything else it copies, which the cost model must count.

Transposes and permutes reorder; unsqueeze, squeeze and views keep order;
element-wise ops lay their result out like their first full-rank input (as
TensorIterator does); other computing ops return contiguous tensors, except
fused attention, whose
kernels (flash/memory-efficient, CPU and CUDA) write [batch, seq, heads, dim]
memory behind a [batch, heads, seq, dim] result: so `out.transpose(1, 2)`
is contiguous and the reshape after it is free.
"""

from __future__ import annotations

from xdsl.ir import Block, Operation, SSAValue

from ..ir.ops import AttentionOp, CallOp, ElementwiseOp, ReshapeOp

Order = tuple[int, ...] | None

COPY_IF_STRIDED = {
    "aten::reshape",
    "aten::reshape_as",
    "aten::flatten.using_ints",
    "aten::contiguous",
}
_KEEP = {"aten::alias", "aten::view", "aten::_unsafe_view", "aten::view_as"}
_CUTS = {"aten::slice.Tensor", "aten::narrow", "aten::split.Tensor", "aten::split_with_sizes",
         "aten::chunk", "aten::unbind.int", "aten::select.int"}  # fmt: skip


def _rank(value: SSAValue) -> int:
    return value.type.rank


def _shape(value: SSAValue):
    return value.type.shape


def is_contiguous(order: Order, shape) -> bool:
    """Contiguous when the non-trivial dims appear in logical order."""
    if order is None:
        return False
    significant = _significant(order, shape)
    return significant == sorted(significant)


def _identity(n: int) -> tuple[int, ...]:
    return tuple(range(n))


def _dim(value, rank: int) -> int | None:
    return value % rank if isinstance(value, int) and rank else None


def _result_order(op: CallOp, source: Order) -> list[Order]:
    name = op.target_name
    rank_in = _rank(op.inputs[0])
    out_ranks = [r.type.rank for r in op.results]
    if name in _KEEP:
        if name == "aten::alias":
            return [source]
        contiguous = is_contiguous(source, _shape(op.inputs[0]))
        return [_identity(r) if contiguous else None for r in out_ranks]
    if name in COPY_IF_STRIDED or name in ("aten::clone", "aten::cat", "aten::stack"):
        return [_identity(r) for r in out_ranks]
    if source is None:
        return [None] * len(out_ranks)
    if name in ("aten::transpose.int", "aten::t"):
        a = _dim(op.arg("dim0", 0), rank_in)
        b = _dim(op.arg("dim1", 1), rank_in)
        swap = {a: b, b: a}
        return [tuple(swap.get(d, d) for d in source)]
    if name == "aten::permute":
        dims = [_dim(d, rank_in) for d in op.arg("dims", ())]
        inverse = {old: new for new, old in enumerate(dims)}
        return [tuple(inverse[d] for d in source)]
    if name == "aten::unsqueeze":
        d = _dim(op.arg("dim", 0), rank_in + 1)
        shifted = tuple(x + 1 if x >= d else x for x in source)
        return [(d, *shifted)]  # a size-1 dim: anywhere will do
    if name.startswith("aten::squeeze"):
        shape_in, rank_out = _shape(op.inputs[0]), out_ranks[0]
        dropped = [i for i, size in enumerate(shape_in) if size == 1][: rank_in - rank_out]
        keep = [d for d in source if d not in dropped]
        renumber = {d: i for i, d in enumerate(sorted(keep))}
        return [tuple(renumber[d] for d in keep)]
    if name in ("aten::expand", "aten::expand_as"):
        grows = any(a != b for a, b in zip(_shape(op.inputs[0]), _shape(op.results[0])))
        return [None if grows else source]
    if name in _CUTS:
        d = _dim(op.arg("dim", 0), rank_in)
        outer = source[: source.index(d)] if d is not None and d in source else source
        ok = all(_shape(op.inputs[0])[x] == 1 for x in outer)
        if name == "aten::select.int":
            return [tuple(x - 1 if x > d else x for x in source if x != d) if ok else None]
        return [source if ok else None] * len(out_ranks)
    return [None] * len(out_ranks)


def memory_orders(block: Block) -> dict[SSAValue, Order]:
    orders: dict[SSAValue, Order] = {a: _identity(_rank(a)) for a in block.args}
    for op in block.ops:
        if isinstance(op, ReshapeOp) and op.inputs:
            for result, order in zip(op.results, _result_order(op, orders.get(op.inputs[0]))):
                orders[result] = order
        elif isinstance(op, AttentionOp) and op.results[0].type.rank == 4:
            orders[op.results[0]] = (0, 2, 1, 3)
        elif isinstance(op, ElementwiseOp) and op.results:
            # TensorIterator lays the result out like its first full-rank input
            rank = op.results[0].type.rank
            like = next((orders.get(v) for v in op.inputs if _rank(v) == rank), None)
            for result in op.results:
                orders[result] = like if like is not None else _identity(rank)
        else:
            for result in op.results:
                rank = getattr(result.type, "rank", 0)
                orders[result] = _identity(rank)
    return orders


def _significant(order: Order, shape) -> list[int]:
    return [d for d in order if shape[d] != 1]


def _agree(first: list[int], second: list[int]) -> bool:
    """Do two memory orders list the dims they share in the same order?"""
    shared = set(first) & set(second)
    return [d for d in first if d in shared] == [d for d in second if d in shared]


def strided(op: Operation, orders: dict[SSAValue, Order]) -> bool:
    """Does this op's kernel walk memory out of order: a reshape-family op that
    must copy its input, or an element-wise op whose operands are laid out
    differently (one read along its rows, another across them)?"""
    if isinstance(op, ElementwiseOp) and op.results:
        rank = op.results[0].type.rank
        laid_out = [
            _significant(orders[v], _shape(v))
            for v in op.inputs
            if _rank(v) == rank and orders.get(v) is not None
        ]
        return any(not _agree(laid_out[0], other) for other in laid_out[1:])
    if not isinstance(op, CallOp) or op.target_name not in COPY_IF_STRIDED or not op.inputs:
        return False
    source = op.inputs[0]
    return not is_contiguous(orders.get(source), _shape(source))
