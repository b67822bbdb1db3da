"""Sharding rules: how placements flow through each op family (one mesh axis).

A rule looks at the placements its tensor inputs arrive with and returns the
placements it needs them in and the placements of its results. Where an
input arrives otherwise, the pass reshards it (all-reduce, all-gather or a
local slice). The rules follow Megatron-LM: a linear reading a replicated
activation splits its weight by rows (column-parallel, output sharded on
features); one reading feature-sharded input splits by columns (row-parallel,
partial sums). Attention is sharded by heads, element-wise ops and views carry
the sharded dim along, and everything else runs replicated.

    Placement("shard", dim=d)   this rank holds a 1/n slice along dim d
    REPLICATE                   every rank holds the whole tensor
    Placement("partial", "sum") every rank holds a term; the tensor is their sum
"""

from __future__ import annotations

import enum
import functools
import itertools
from dataclasses import dataclass, field

import sympy
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation, SSAValue

from ...ir.args import Operand
from ...ir.attrs import REPLICATE, SYMBOLS_ATTR, Placement, partial, shard
from ...ir.errors import PlaitError
from ...ir.ops import (
    AttentionOp,
    CallOp,
    ElementwiseOp,
    EmbeddingOp,
    LinearOp,
    MatmulOp,
    NormOp,
    ReduceOp,
    ReshapeOp,
    SoftmaxOp,
)
from ...ir.text import where
from ...ir.types import TensorType
from ..options import PlanStyle

R = REPLICATE
SUM = partial("sum")


class Parallel(enum.Enum):
    """How a decision splits the work of an op whose rewrite needs more than
    its placements (a row-parallel bias, a vocabulary lookup, cut sizes)."""

    COLUMN = "column"  # a weight's output features
    ROW = "row"  # a weight's input features: partial sums
    VOCAB = "vocab"  # an embedding's vocabulary rows
    BLOCKS = "blocks"  # a fused projection's output cut into its blocks
    EXPERT = "expert"  # the experts of an MoE layer
    # a training step's losses over split rows (carried out by step.py)
    SPLIT_MEAN = "split-mean"  # a mean over a split dim: the local mean / n, a partial sum
    NLL_SUM = "nll-sum"  # nll_loss's mean over split rows: sums and weights, reduced once
    SPLIT_CLASSES = "split-classes"  # log_softmax / nll_loss over split classes (vocab-parallel)
    VOCAB_GRADIENT = "vocab-gradient"  # a vocab-parallel embedding's gradient: its rows only
    # batch norm over split rows: the whole batch's statistics (SyncBatchNorm's)
    BATCH_STATS = "batch-stats"  # forward: each rank's mean and variance gathered
    BATCH_STATS_BACKWARD = "batch-stats-backward"  # the gradient's sums all-reduced
    # indexing a split dim by its positions (arange): this rank's, shifted to its rows
    POSITIONS = "positions"


@dataclass
class Decision:
    inputs: list[Placement]  # what each tensor operand must be, in op.inputs order
    outputs: list[Placement]
    parallel: Parallel | None = None
    # reshape family: output dim -> local size to write into size arguments
    sizes: dict[int, object] = field(default_factory=dict)


def divides(dim, n: int, at: Operation) -> bool:
    """Is a dim split evenly n ways, for every size in the ranges of the module
    `at` (the op the dim belongs to) is in? A symbolic dim only when z3 proves
    it (2*k over 2 ranks, not seq)."""
    if isinstance(dim, int):
        return dim % n == 0
    return _proved_divisible(dim, n, _symbol_ranges(at))


def sizes_that_split(*dims, at: Operation) -> list[int]:
    """Mesh sizes up to 64 that split every one of `dims` evenly (see `divides`)."""
    return [n for n in range(2, 65) if all(divides(d, n, at) for d in dims)]


def _symbol_ranges(at: Operation) -> tuple[tuple[str, int, int | None], ...]:
    module = at.get_toplevel_object()
    symbols = module.attributes.get(SYMBOLS_ATTR) if isinstance(module, ModuleOp) else None
    return symbols.data if symbols is not None else ()


@functools.lru_cache(maxsize=4096)
def _proved_divisible(dim, n: int, ranges: tuple) -> bool:
    from ...cost.bounds import prove_divisible

    return prove_divisible(dim, n, {name: (lo, hi) for name, lo, hi in ranges}).proved


def local_type(t: TensorType, placement: Placement, n: int) -> TensorType:
    if placement.kind != "shard":
        return t
    shape = list(t.shape)
    shape[placement.dim] = shape[placement.dim] // n
    return t.with_shape(shape)


def replicated(op: CallOp) -> Decision:
    return Decision([R] * len(op.inputs), [R] * len(op.results))


def _partial_through(op: CallOp) -> Decision:
    """A partial sum in the first input gives a partial result (a linear op)."""
    return Decision([SUM] + [R] * (len(op.inputs) - 1), [SUM])


def _operand_index(op: CallOp, name: str) -> int | None:
    value = op.arg(name)
    return value.index if isinstance(value, Operand) else None


def _dim(value, rank: int) -> int | None:
    return value % rank if isinstance(value, int) and rank else None


# ---- matrix products ------------------------------------------------------------


class PlanError(PlaitError):
    pass


def _weight_sharded(
    op: CallOp,
    x: int,
    w: int,
    bias: int | None,
    arriving,
    types,
    n: int,
    w_out: int,
    w_in: int,
    style: PlanStyle | None = None,
) -> Decision:
    """x @ W with W's output features on dim `w_out`, input features on `w_in`.

    Without a `style`, Megatron's pairing: row-parallel when x arrives split on
    features, else column-parallel; a manual plan's style overrides it."""
    weight = types[w]
    x_rank = types[x].rank
    out_rank = op.results[0].type.rank
    inputs = [R] * len(op.inputs)
    if style is PlanStyle.REPLICATE:
        return replicated(op)
    if style is not None:
        what = "input features" if style is PlanStyle.ROWWISE else "output features"
        _check_plan_split(
            op, "layer", style, what, weight.shape[w_in if style is PlanStyle.ROWWISE else w_out], n
        )
    rowwise = style is PlanStyle.ROWWISE or (style is None and arriving[x] == shard(x_rank - 1))
    if rowwise and divides(weight.shape[w_in], n, op):
        inputs[x], inputs[w] = shard(x_rank - 1), shard(w_in)  # row-parallel
        # with a bias, the partial sums are all-reduced inside the op, then it is added once
        return Decision(inputs, [SUM if bias is None else R], Parallel.ROW)
    if divides(weight.shape[w_out], n, op):
        blocks = fused_blocks(op, n)  # q, k, v of one product: each split on its own
        inputs[w] = shard(w_out, blocks)  # column-parallel
        if bias is not None:
            inputs[bias] = shard(0, blocks)
        return Decision(inputs, [shard(out_rank - 1, blocks)], Parallel.COLUMN)
    return replicated(op)


_FUSED_VIEWS = ("aten::view", "aten::_unsafe_view", "aten::reshape")
_FUSED_SPLITS = ("aten::split.Tensor", "aten::split_with_sizes", "aten::chunk")


def fused_blocks(op: CallOp, n: int) -> tuple[int, ...] | None:
    """The pieces a fused projection's output is cut into along its features
    (GPT-2's q, k and v by a split, Phi-3's by slices; Phi-3's gate and up by
    a chunk), when the output only flows, through views that keep its last
    dim, into such cuts of that dim, every piece of which n divides. Split
    plainly, a rank would hold the first pieces whole and none of the last;
    split by blocks, it holds 1/n of each."""
    value = op.results[0]
    size = value.type.shape[-1]
    while True:
        users = [use.operation for use in value.uses]
        if not users or any(not isinstance(u, CallOp) or u.inputs[0] is not value for u in users):
            return None
        last = value.type.rank - 1
        if len(users) == 1 and users[0].target_name in _FUSED_VIEWS:
            if users[0].results[0].type.shape[-1:] != (size,):
                return None
            value = users[0].results[0]
            continue
        if len(users) == 1 and users[0].target_name in _FUSED_SPLITS:
            if _dim(users[0].arg("dim", 0), last + 1) != last:
                return None
            pieces = tuple(r.type.shape[-1] for r in users[0].results)
        else:
            cuts = sorted(slice_range(u, last, size) or (-1, -1) for u in users)
            ends = [0] + [end for _, end in cuts]
            if any(start != end for (start, _), end in zip(cuts, ends)) or ends[-1] != size:
                return None  # not slices that tile the dim
            pieces = tuple(end - start for start, end in cuts)
        if len(pieces) > 1 and all(isinstance(s, int) and s > 0 and s % n == 0 for s in pieces):
            return pieces
        return None


def slice_range(op: CallOp, dim: int, size: int) -> tuple[int, int] | None:
    """[start, end) of a step-1 `aten::slice.Tensor` along `dim`, else None."""
    if op.target_name != "aten::slice.Tensor" or _dim(op.arg("dim", 0), dim + 1) != dim:
        return None
    start, end = op.arg("start", 0), op.arg("end", size)
    if op.arg("step", 1) != 1 or not isinstance(start, int) or not isinstance(end, int):
        return None
    return (
        min(start % size if start < 0 else start, size),
        min(end % size if end < 0 else end, size),
    )


def block_at(blocks: tuple[int, ...], start: int) -> int | None:
    """Which of the blocks begins at `start` along their dim, if one does."""
    starts = list(itertools.accumulate((0,) + blocks[:-1]))
    return starts.index(start) if start in starts else None


def _blocked_rule(op: CallOp, arriving, types, n: int) -> Decision:
    """A fused projection's output split by blocks (see `fused_blocks`): views
    that keep its last dim carry it; the split into its blocks leaves each
    piece split plainly, with local sizes."""
    first = arriving[0]
    rest = [R] * (len(op.inputs) - 1)
    if any(p.blocks for p in arriving[1:]) or first.dim != types[0].rank - 1:
        return replicated(op)
    blocks = first.blocks
    if op.target_name == "aten::slice.Tensor":
        at = slice_range(op, first.dim, sum(blocks))
        block = None if at is None else block_at(blocks, at[0])
        cuts_a_block = block is not None and blocks[block] == at[1] - at[0]
    else:
        cuts_a_block = tuple(r.type.shape[-1] for r in op.results) == blocks
    if op.target_name in (*_FUSED_SPLITS, "aten::slice.Tensor") and cuts_a_block:
        return Decision(
            [first] + rest, [shard(r.type.rank - 1) for r in op.results], Parallel.BLOCKS
        )
    result = op.results[0].type
    if op.target_name in _FUSED_VIEWS and result.shape[-1:] == types[0].shape[-1:]:
        if not isinstance(op.arg(SIZE_ARGS[op.target_name]), tuple):
            return replicated(op)  # a size we cannot rewrite
        last = result.rank - 1
        sizes = {last: result.shape[-1] // n}
        return Decision([first] + rest, [shard(last, first.blocks)], sizes=sizes)
    return replicated(op)


def _check_plan_split(op: CallOp, kind: str, style: PlanStyle, what: str, size, n: int) -> None:
    """A manual plan's style must split the dim it names evenly."""
    if not divides(size, n, op):
        raise PlanError(
            f"{where(op)}: the plan makes this {kind} {style.value}, but its {what} ({size}) do not "
            f"split over {n} ranks; use another style for it or a mesh size that divides "
            f"{size} ({', '.join(map(str, sizes_that_split(size, at=op))) or 'none'})"
        )


def linear_rule(op: CallOp, arriving, types, n: int, style: PlanStyle | None = None) -> Decision:
    x, w, b = (_operand_index(op, k) for k in ("input", "weight", "bias"))
    return _weight_sharded(op, x, w, b, arriving, types, n, w_out=0, w_in=1, style=style)


_PARAM_MATMULS = {
    "aten::mm": ("self", "mat2", None),
    "aten::addmm": ("mat1", "mat2", "self"),
    "aten::matmul": ("self", "other", None),
}


def matmul_rule(
    op: CallOp, arriving, types, n: int, params: set[SSAValue], style: PlanStyle | None = None
) -> Decision:
    names = _PARAM_MATMULS.get(op.target_name)
    scaled = op.arg("alpha", 1) != 1 or op.arg("beta", 1) != 1
    if names is not None and not scaled:
        x, w, b = (_operand_index(op, k) if k else None for k in names)
        if op.inputs[w] in params and types[w].rank == 2:  # x @ W, W: [in, out]
            return _weight_sharded(op, x, w, b, arriving, types, n, w_out=1, w_in=0, style=style)
    # activation x activation (e.g. attention scores): shard shared batch dims
    if op.target_name in ("aten::bmm", "aten::matmul") and len(op.inputs) == 2:
        a, b = arriving
        out_rank = op.results[0].type.rank
        if a == b and a.kind == "shard" and a.dim < min(t.rank for t in types) - 2:
            if types[0].rank == types[1].rank == out_rank:
                return Decision([a, a], [a])
    return replicated(op)


# ---- attention, norms, softmax, reductions ---------------------------------------


def attention_rule(op: CallOp, arriving, types, n: int) -> Decision:
    q, k, v = (_operand_index(op, name) for name in ("query", "key", "value"))
    mask = _operand_index(op, "attn_mask")
    heads = [types[i].shape[1] for i in (q, k, v)]
    if types[q].rank != 4 or not all(divides(h, n, op) for h in heads):
        return replicated(op)
    if arriving[q] != shard(1):
        return replicated(op)
    inputs = [R] * len(op.inputs)
    for i in (q, k, v):
        inputs[i] = shard(1)
    if mask is not None and types[mask].rank >= 3:
        heads_dim = types[mask].rank - 3  # [..., heads, q, k]
        if types[mask].shape[heads_dim] != 1:
            inputs[mask] = shard(heads_dim)
    return Decision(inputs, [shard(1)])


def _keeps_unless(op: CallOp, arriving, types, touched: set[int]) -> Decision:
    """The op works on the dims in `touched`; a shard elsewhere passes through."""
    first = arriving[0]
    if first.kind == "shard" and first.dim not in touched and len(op.results) == 1:
        if op.results[0].type.rank == types[0].rank:
            inputs = [first] + [R] * (len(op.inputs) - 1)
            return Decision(inputs, [first])
    return replicated(op)


def norm_rule(op: CallOp, arriving, types, n: int) -> Decision:
    rank = types[0].rank
    if op.target_name in ("aten::layer_norm", "aten::rms_norm"):
        normalized = len(op.arg("normalized_shape", ()))
        return _keeps_unless(op, arriving, types, set(range(rank - normalized, rank)))
    return replicated(op)


def softmax_rule(op: CallOp, arriving, types, n: int) -> Decision:
    rank = types[0].rank
    return _keeps_unless(op, arriving, types, {_dim(op.arg("dim", -1), rank)})


_SUMS = {"aten::sum.dim_IntList", "aten::mean.dim", "aten::sum"}  # linear: partials stay partial


def reduce_rule(op: CallOp, arriving, types, n: int) -> Decision:
    rank = types[0].rank
    dims = op.arg("dim")
    first = arriving[0]
    if first.kind == "partial" and op.target_name in _SUMS and len(op.results) == 1:
        return _partial_through(op)
    if dims is None or first.kind != "shard" or len(op.results) != 1:
        return replicated(op)
    dims = {_dim(d, rank) for d in (dims if isinstance(dims, tuple) else (dims,))}
    if first.dim in dims or not dims:  # an empty dim list reduces every dim
        return replicated(op)
    keepdim = op.arg("keepdim", False)
    out_dim = first.dim if keepdim else first.dim - sum(1 for d in dims if d < first.dim)
    return Decision([first] + [R] * (len(op.inputs) - 1), [shard(out_dim)])


# ---- element-wise -----------------------------------------------------------------

_LINEAR_IN_PARTIALS = {"aten::add.Tensor", "aten::sub.Tensor"}
_SCALES_PARTIALS = {"aten::mul.Tensor", "aten::div.Tensor", "aten::neg"}


def elementwise_rule(op: CallOp, arriving, types, n: int) -> Decision:
    out_rank = op.results[0].type.rank
    out_shape = op.results[0].type.shape
    # partial sums stay partial through sums of partials and scaling by replicated values
    partials = [i for i, p in enumerate(arriving) if p.kind == "partial"]
    if partials:
        alike = all(t == op.results[0].type for t in types)
        if op.target_name in _LINEAR_IN_PARTIALS and len(op.inputs) == 2 and alike:
            other = arriving[1 - partials[0]]
            if len(partials) == 2:
                return Decision([SUM, SUM], [SUM])
            if other.kind == "shard":  # e.g. a sharded residual: reduce-scatter the sum
                return Decision([other, other], [other])
        numerator_only = op.target_name.startswith("aten::div") and partials[0] != 0
        if op.target_name in _SCALES_PARTIALS and len(partials) == 1 and not numerator_only:
            inputs = [R] * len(op.inputs)
            inputs[partials[0]] = SUM
            return Decision(inputs, [SUM])
        return replicated(op)
    # a shard on an output dim: inputs sharded there, or broadcast along it
    out_dim = None
    for t, p in zip(types, arriving):
        if p.kind == "shard":
            out_dim = p.dim + out_rank - t.rank
            break
    if out_dim is None or out_dim < 0 or not divides(out_shape[out_dim], n, op):
        return replicated(op)
    inputs = []
    for t in types:
        d = out_dim - (out_rank - t.rank)
        broadcast = d < 0 or t.shape[d] == 1
        inputs.append(R if broadcast else shard(d))
    return Decision(inputs, [shard(out_dim) for _ in op.results])


# ---- the reshape family -------------------------------------------------------------


def _groups(src: list, dst: list) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims of equal product."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = sympy.Integer(1)
        while True:
            if gi and gj and sympy.simplify(pi - pj) == 0:
                break
            if i < len(src) and (not gi or _smaller(pi, pj)):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif j < len(dst):
                pj *= dst[j]
                gj.append(j)
                j += 1
            elif i < len(src):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif sympy.simplify(pi - pj) == 0 and groups:
                break  # trailing size-1 dims belong to the last group
            else:
                return None
        if gi or gj:
            groups.append((gi, gj))
    return groups


def _smaller(a, b) -> bool:
    """Is product a a proper divisor of product b (so a needs more dims)?"""
    ratio = sympy.simplify(b / a)
    return ratio != 1 and sympy.fraction(ratio)[1] == 1


def _moved_dim(op: CallOp, d: int, source: TensorType) -> int | None:
    """Where input dim d lands in the (single) output of a reshape-family op."""
    name = op.target_name
    rank_in, rank_out = source.rank, op.results[0].type.rank
    src, dst = list(source.shape), list(op.results[0].type.shape)
    if name in (
        "aten::alias",
        "aten::contiguous",
        "aten::clone",
        "aten::expand",
        "aten::expand_as",
    ):
        return d if rank_in == rank_out else None
    if name in ("aten::transpose.int", "aten::t"):
        a, b = _dim(op.arg("dim0", 0), rank_in), _dim(op.arg("dim1", 1), rank_in)
        return b if d == a else a if d == b else d
    if name == "aten::permute":
        dims = [_dim(x, rank_in) for x in op.arg("dims", ())]
        return dims.index(d) if d in dims else None
    if name == "aten::unsqueeze":
        new = _dim(op.arg("dim", 0), rank_out)
        return d + 1 if d >= new else d
    if name in ("aten::slice.Tensor", "aten::narrow", "aten::select.int"):
        cut = _dim(op.arg("dim", 0), rank_in)
        if cut == d:
            return None
        return d - 1 if name == "aten::select.int" and d > cut else d
    if name in (
        "aten::view",
        "aten::_unsafe_view",
        "aten::reshape",
        "aten::flatten.using_ints",
        "aten::squeeze",
        "aten::squeeze.dim",
        "aten::squeeze.dims",
    ):
        groups = _groups(src, dst)
        if groups is None:
            return None
        for gi, gj in groups:
            if d in gi:
                outer = [k for k in gi if src[k] != 1]
                targets = [k for k in gj if dst[k] != 1]
                return targets[0] if outer and outer[0] == d and targets else None
    return None


# targets whose size argument must be rewritten to local sizes, by argument name
SIZE_ARGS = {
    "aten::view": "size",
    "aten::_unsafe_view": "size",
    "aten::reshape": "shape",
    "aten::expand": "size",
    "aten::slice_backward": "input_sizes",
    "aten::select_backward": "input_sizes",
}


# views that keep every element once: a partial sum stays partial through them
_KEEPS_PARTIALS = {
    "aten::view",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::unsqueeze",
    "aten::squeeze.dim",
    "aten::squeeze.dims",
    "aten::transpose.int",
    "aten::permute",
    "aten::flatten.using_ints",
}


def reshape_rule(op: CallOp, arriving, types, n: int) -> Decision:
    first = arriving[0]
    name = op.target_name
    if name in ("aten::cat", "aten::stack"):
        return _concat_rule(op, arriving, n)
    if first.kind == "partial" and name in _KEEPS_PARTIALS:
        return _partial_through(op)
    if first.kind != "shard":
        return replicated(op)
    if name in ("aten::split.Tensor", "aten::split_with_sizes", "aten::chunk", "aten::unbind.int"):
        cut = _dim(op.arg("dim", 0), types[0].rank)
        if cut == first.dim:
            return replicated(op)
        out = first.dim - 1 if name == "aten::unbind.int" and first.dim > cut else first.dim
        return Decision([first], [shard(out)] * len(op.results))
    if len(op.results) != 1:
        return replicated(op)
    out_dim = _moved_dim(op, first.dim, types[0])
    if out_dim is None or not divides(op.results[0].type.shape[out_dim], n, op):
        return replicated(op)
    if name in SIZE_ARGS and not isinstance(op.arg(SIZE_ARGS[name]), tuple):
        return replicated(op)  # a size we cannot rewrite
    local = op.results[0].type.shape[out_dim] // n
    inputs = [first] + [R] * (len(op.inputs) - 1)
    return Decision(inputs, [shard(out_dim)], sizes={out_dim: local})


def _concat_rule(op: CallOp, arriving, n: int) -> Decision:
    rank = op.results[0].type.rank
    along = _dim(op.arg("dim", 0), rank)
    if not arriving or any(p != arriving[0] for p in arriving) or arriving[0].kind != "shard":
        return replicated(op)
    d = arriving[0].dim
    if op.target_name == "aten::stack":
        d = d + 1 if d >= along else d
    if d == along:
        return replicated(op)
    return Decision(list(arriving), [shard(d)])


def index_copy_rule(op: CallOp, arriving, types, n: int) -> Decision:
    """A state update (KV cache slots written with index_copy_): the state takes
    the placement its new rows arrive with, split on a dim the copy does not index."""
    target, source = _operand_index(op, "self"), _operand_index(op, "source")
    if target is None or source is None:
        return replicated(op)
    along = _dim(op.arg("dim"), types[target].rank)
    arrives = arriving[source]
    if arrives.kind != "shard" or arrives.dim == along:
        return replicated(op)
    if not divides(types[target].shape[arrives.dim], n, op):
        return replicated(op)
    inputs = [R] * len(op.inputs)
    inputs[target] = inputs[source] = arrives
    return Decision(inputs, [arrives])


def embedding_rule(op: CallOp, arriving, types, n: int, style: PlanStyle | None = None) -> Decision:
    """Looking up indices split on any dim gives rows split on that dim. As
    PyTorch's plans do for nn.Embedding, `rowwise` splits the vocabulary
    (each rank looks up the ids it holds, zeros elsewhere: partial sums;
    the pass writes that lookup) and `colwise` the embedding dim."""
    weight, indices = _operand_index(op, "weight"), _operand_index(op, "indices")
    if weight is None or indices is None:
        return replicated(op)
    inputs = [R] * len(op.inputs)
    if style is PlanStyle.REPLICATE:
        return replicated(op)
    if style is not None:
        dim = 0 if style is PlanStyle.ROWWISE else 1
        what = "vocabulary rows" if dim == 0 else "embedding columns"
        _check_plan_split(op, "embedding", style, what, types[weight].shape[dim], n)
        inputs[weight] = shard(dim)
        out = SUM if dim == 0 else shard(op.results[0].type.rank - 1)
        return Decision(inputs, [out], Parallel.VOCAB if dim == 0 else Parallel.COLUMN)
    if arriving[indices].kind != "shard":
        return replicated(op)
    inputs[indices] = arriving[indices]
    return Decision(inputs, [arriving[indices]])


def index_rule(op: CallOp, arriving, types, n: int) -> Decision:
    """Picking elements of a partial sum at replicated indices sums the picks.
    Indexing a split dim by its own positions (`x[arange(b)[:, None], j]`, as
    transformers builds a padding mask) keeps the split: each rank picks its
    rows, with the positions it holds shifted to its local rows."""
    if arriving[0].kind == "partial" and all(p == R for p in arriving[1:]):
        return _partial_through(op)
    indices = op.arg("indices")
    split = arriving[0].dim if arriving[0].kind == "shard" else None
    if split is None or not isinstance(indices, tuple) or split >= len(indices):
        return replicated(op)
    if not all(isinstance(i, Operand) for i in indices[: split + 1]):
        return replicated(op)  # a None (a whole dim) moves the picked dims
    at = indices[split].index
    along = _positions_dim(op.inputs[at], types[at], types[0].shape[split])
    out_rank, out_shape = op.results[0].type.rank, op.results[0].type.shape
    if along is None or not divides(out_shape[out_dim := along + out_rank - types[at].rank], n, op):
        return replicated(op)
    inputs = [R] * len(op.inputs)
    for i in (i.index for i in indices if isinstance(i, Operand) and i.index != at):
        d = out_dim - (out_rank - types[i].rank)
        if d >= 0 and types[i].shape[d] != 1:
            return replicated(op)  # another index varies along the picked rows
    inputs[0], inputs[at] = arriving[0], shard(along)
    return Decision(inputs, [shard(out_dim)], Parallel.POSITIONS)


_ORDER_KEEPING = {"aten::unsqueeze", "aten::view", "aten::reshape", "aten::_unsafe_view"}
_ORDER_KEEPING |= {"aten::alias", "aten::clone", "aten::contiguous"}


def _positions_dim(value: SSAValue, t: TensorType, size) -> int | None:
    """The dim along which `value` holds 0, 1, ..., size-1 (an arange, through
    views that keep its order), size 1 everywhere else; else None."""
    along = [d for d, s in enumerate(t.shape) if s != 1]
    if len(along) != 1 or t.shape[along[0]] != size:
        return None
    op = value.owner
    while isinstance(op, CallOp) and op.target_name in _ORDER_KEEPING:
        op = op.inputs[0].owner
    if not isinstance(op, CallOp) or not op.target_name.startswith("aten::arange"):
        return None
    from_zero = op.arg("start", 0) == 0 and op.arg("step", 1) == 1
    return along[0] if from_zero and op.arg("end") == size else None


_TARGET_RULES = {
    "aten::index_copy_": index_copy_rule,
    "aten::index_copy": index_copy_rule,
    "aten::index.Tensor": index_rule,
}

_RULES = {  # linear and matmul: see `decide`
    AttentionOp: attention_rule,
    ElementwiseOp: elementwise_rule,
    NormOp: norm_rule,
    SoftmaxOp: softmax_rule,
    ReduceOp: reduce_rule,
    ReshapeOp: reshape_rule,
}


def decide(
    op: CallOp,
    arriving: list[Placement],
    types: list[TensorType],
    n: int,
    params: set[SSAValue],
    style: PlanStyle | None = None,
) -> Decision:
    """The placements `op` needs and produces, given those its inputs arrive with
    and their global (unsharded) types; `style` is a manual plan's choice for a
    linear layer."""
    if any(p.blocks for p in arriving):
        decision = _blocked_rule(op, arriving, types, n)
    elif isinstance(op, MatmulOp):
        decision = matmul_rule(op, arriving, types, n, params, style)
    elif isinstance(op, LinearOp):
        decision = linear_rule(op, arriving, types, n, style)
    elif isinstance(op, EmbeddingOp):
        decision = embedding_rule(op, arriving, types, n, style)
    else:
        rule = _TARGET_RULES.get(op.target_name) or _RULES.get(type(op))
        decision = rule(op, arriving, types, n) if rule else replicated(op)
    return decision if _splits_evenly(decision, types, op, n) else replicated(op)


def _splits_evenly(decision: Decision, types: list[TensorType], op: CallOp, n: int) -> bool:
    """Every sharded dim, of inputs and results, is a static size that n divides
    (a symbolic size such as seq may not be)."""
    placed = list(zip(decision.inputs, types)) + [
        (p, r.type) for p, r in zip(decision.outputs, op.results)
    ]
    return all(p.kind != "shard" or divides(t.shape[p.dim], n, op) for p, t in placed)


# ---- data parallelism: the batch split, weights whole ------------------------------


DATA_AXES = ("dp", "ep")  # mesh axes that split the batch (the rest split tensors)
EXPERT_AXIS = "ep"  # a data axis that also splits the experts of MoE layers


def decide_data(
    op: CallOp, arriving: list[Placement], types: list[TensorType], n: int, params: set[SSAValue]
) -> Decision:
    """Along a data-parallel axis: what the rules decide when no weight is split,
    else the batch (or any leading dim) carried through the op. Program state
    (a KV cache) may split with the batch: each rank holds its sequences' rows."""
    decision = decide(op, arriving, types, n, params)
    splits_weight = any(
        p.kind == "shard" and v in params and not v.owner.is_state
        for p, v in zip(decision.inputs, op.inputs)
    )
    if splits_weight or decision.outputs == [R] * len(op.results):
        carried = _carried(op, arriving, types, params)
        if carried is not None and _splits_evenly(carried, types, op, n):
            return carried
    return replicated(op) if splits_weight else decision


def _carried(op: CallOp, arriving, types, params) -> Decision | None:
    """An activation split on a dim the op does not compute across passes through:
    a linear (or x @ W) on a leading dim, attention on the batch."""
    if isinstance(op, AttentionOp):
        q, k, v = (_operand_index(op, name) for name in ("query", "key", "value"))
        mask = _operand_index(op, "attn_mask")
        if arriving[q] != shard(0):
            return None
        inputs = [R] * len(op.inputs)
        for i in (q, k, v):
            inputs[i] = shard(0)
        if mask is not None and types[mask].rank == 4 and types[mask].shape[0] != 1:
            inputs[mask] = shard(0)
        return Decision(inputs, [shard(0)])
    if isinstance(op, (LinearOp, MatmulOp)):
        activations = [i for i, v in enumerate(op.inputs) if v not in params]
        if len(activations) != 1:  # x @ W only: another activation would need the split too
            return None
        x = activations[0]
        if arriving[x].kind != "shard":
            return None
        if arriving[x].dim >= types[x].rank - 1 or types[x].rank != op.results[0].type.rank:
            return None  # the features, or a dim that moves
        inputs = [R] * len(op.inputs)
        inputs[x] = arriving[x]
        return Decision(inputs, [arriving[x]])
    return None
