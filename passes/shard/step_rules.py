"""Sharding rules for a training step: the joint forward + backward graph and
the optimizer's update (one mesh axis), in the spirit of DTensor's propagation.

The forward rules (`rules`) see linear layers as `aten::linear`; in a
joint graph autograd has decomposed them into `t`, `mm`/`addmm` and views,
and the backward adds ops of its own. The rules here decide those; every
other op goes to the forward rules.

- Matrix products decide on both operands' placements, as DTensor's do:

      a @ b               a          b          result
      rows split          shard(0)   replicate  shard(0)
      columns split       replicate  shard(1)   shard(1)
      contraction split   shard(1)   shard(0)   partial(sum)

  An operand that is a view of a parameter not yet placed (`free`) is placed
  here, by Megatron's pairing: row-parallel when the activation arrives split
  on its features, else column-parallel. The parameter keeps that placement
  for the whole step, so the backward's products of the same weight follow
  the table: with Q/K/V and gate/up column-parallel and O and down
  row-parallel this is Megatron's backward (the input gradient of each
  column-parallel product is partial: one all-reduce per pair of layers),
  and each weight gradient comes out split like its weight.
- Reductions over a split dim give partial sums; views and element-wise
  ops carry splits and partial sums; backward ops mirror their forward ops
  (attention by heads or by batch, norms and softmax off their own dims).
- An in-place update of program state (optimizer moments, parameters) keeps
  the state's placement: the other operands come to it (a gradient's partial
  sums are all-reduced, or reduce-scattered onto a split parameter).
- Per-sample ops (convolutions, pooling and their backward) carry a split
  batch; batch norm in training over split rows normalizes with the whole
  batch's statistics, as SyncBatchNorm does (`Parallel.BATCH_STATS`, carried
  out by `step_batch_norm`).
- Losses that average over split rows: the pass rewrites them so that the
  result is the mean over the whole batch (`Parallel.SPLIT_MEAN`, `Parallel.NLL_SUM`).
"""

from __future__ import annotations

from ...ir.args import Operand
from ...ir.attrs import REPLICATE, Placement, shard
from ...ir.ops import CallOp, ReduceOp, ReshapeOp
from ...ir.schema import writes_input
from .rules import (
    SUM,
    Decision,
    Parallel,
    _splits_evenly,
    decide,
    divides,
    elementwise_rule,
    reduce_rule,
    replicated,
    softmax_rule,
)
from .split_classes import class_dim

R = REPLICATE


def _index(op: CallOp, name: str) -> int | None:
    value = op.arg(name)
    return value.index if isinstance(value, Operand) else None


def _dims(value, rank: int) -> set[int]:
    """Reduced dims: all of them when none are named."""
    if value is None or value == ():
        return set(range(rank))
    return {d % rank for d in (value if isinstance(value, (tuple, list)) else (value,))}


# ---- matrix products ------------------------------------------------------------

S0, S1 = shard(0), shard(1)

# (a, b) as they arrive -> (a, b, result); the last rows gather the operand
# whose split would leave the result split twice
_PRODUCTS = {
    (R, R): (R, R, R),
    (S0, R): (S0, R, S0),
    (R, S1): (R, S1, S1),
    (S1, S0): (S1, S0, SUM),
    (S1, R): (S1, S0, SUM),  # slicing b costs nothing; the sum is reduced where needed
    (R, S0): (S1, S0, SUM),
    (S0, S0): (S0, R, S0),
    (S0, S1): (S0, R, S0),
    (S1, S1): (R, S1, S1),
}


def _megatron(arriving_x: Placement, k, n_out, n: int, weight_first: bool, at: CallOp):
    """(x, w, result) for x @ w (or w @ x) with w free: row-parallel when x
    arrives split on the contracted dim, else column-parallel."""
    contracted = S0 if weight_first else S1  # x's contracted dim
    if arriving_x == contracted and divides(k, n, at):
        return (contracted, S1 if weight_first else S0, SUM)
    if divides(n_out, n, at):
        return (R, S0, S0) if weight_first else (R, S1, S1)
    return (R, R, R)


def matmul_rule(op: CallOp, arriving, types, n: int, free: frozenset[int]) -> Decision:
    """mm(a, b) and addmm(bias, a, b) of 2-D operands."""
    addmm = op.target_name == "aten::addmm"
    a, b = (_index(op, "mat1"), _index(op, "mat2")) if addmm else (0, 1)
    if op.arg("alpha", 1) != 1 or op.arg("beta", 1) != 1 or a is None or b is None:
        return replicated(op)
    pa, pb = arriving[a], arriving[b]
    if a not in free and b not in free and (pa.kind == "partial" or pb.kind == "partial"):
        # a partial sum times a replicated operand is a partial sum; else reduce it first
        if pa.kind == "partial" and pb == R:
            placed = (SUM, R, SUM)
        elif pb.kind == "partial" and pa == R:
            placed = (R, SUM, SUM)
        else:
            placed = _PRODUCTS[
                (R if pa.kind == "partial" else pa, R if pb.kind == "partial" else pb)
            ]
    elif b in free and a not in free:
        k, n_out = types[b].shape
        placed = _megatron(
            R if pa.kind == "partial" else pa, k, n_out, n, weight_first=False, at=op
        )
    elif a in free and b not in free:
        m, k = types[a].shape
        x, w, out = _megatron(R if pb.kind == "partial" else pb, k, m, n, weight_first=True, at=op)
        placed = (w, x, out)
    else:
        placed = _PRODUCTS.get((pa, pb), (R, R, R))
    inputs = [R] * len(op.inputs)
    inputs[a], inputs[b] = placed[0], placed[1]
    out = placed[2]
    bias = _index(op, "self") if addmm else None
    if bias is not None and out.kind == "shard":  # bias [n] or [m, n], broadcast along rows
        rank = types[bias].rank
        along = out.dim - (2 - rank)
        if along >= 0 and types[bias].shape[along] != 1:
            inputs[bias] = shard(along)
    if bias is not None and out.kind == "partial":  # added once, after the reduction
        return Decision(inputs, [R], Parallel.ROW)
    return Decision(inputs, [out])


# ---- reductions and views ---------------------------------------------------------

_SUMS = ("aten::sum", "aten::sum.dim_IntList")
_MEANS = ("aten::mean", "aten::mean.dim")


def reduce_step_rule(op: CallOp, arriving, types, n: int, free) -> Decision:
    """A sum over a split dim is a partial sum; a mean over one, the local mean / n."""
    first = arriving[0]
    name = op.target_name
    if first.kind == "shard" and (name in _SUMS or name in _MEANS) and len(op.results) == 1:
        if first.dim in _dims(op.arg("dim"), types[0].rank):
            inputs = [first] + [R] * (len(op.inputs) - 1)
            return Decision(inputs, [SUM], Parallel.SPLIT_MEAN if name in _MEANS else None)
    return reduce_rule(op, arriving, types, n)


def view_step_rule(op: CallOp, arriving, types, n: int, free) -> Decision:
    """Views, copies and concatenations are linear: partial sums stay partial
    (every input partial; a replicated one is made partial, as the global
    norm's stack of squares needs)."""
    if any(p.kind == "partial" for p in arriving) and all(p.kind != "shard" for p in arriving):
        return Decision([SUM] * len(op.inputs), [SUM] * len(op.results))
    return decide(op, arriving, types, n, set())


def _identity(op: CallOp, arriving, types, n: int, free) -> Decision:
    """detach, alias: the value itself, placed as it arrives."""
    return Decision([arriving[0]], [arriving[0]])


def _like(op: CallOp, arriving, types, n: int, free) -> Decision:
    """ones_like(x) and kin read only x's shape: split as x is, never partial."""
    first = arriving[0] if arriving[0].kind == "shard" else R
    return Decision([first] + [R] * (len(op.inputs) - 1), [first])


def _scaled(op: CallOp, arriving, types, n: int, free) -> Decision:
    """x * c and x / c for a number c: linear in x."""
    if arriving[0].kind == "partial":
        return Decision([SUM], [SUM])
    return elementwise_rule(op, arriving, types, n)


def _pointwise(op: CallOp, arriving, types, n: int, free) -> Decision:
    return elementwise_rule(op, arriving, types, n)


def _off_dims(op: CallOp, arriving, types, touched: set[int]) -> Decision:
    """Every input of the first input's shape split alike, on a dim the op
    does not work across; the results too (same rank); the rest replicated."""
    first = arriving[0]
    if first.kind != "shard" or first.dim in touched:
        return replicated(op)
    shape = types[0].shape
    inputs = [first if t.shape == shape else R for t in types]
    outputs = [first if r.type.rank == len(shape) else R for r in op.results]
    return Decision(inputs, outputs)


def _softmax_backward(op: CallOp, arriving, types, n: int, free) -> Decision:
    """_softmax_backward_data(grad, output, dim, dtype): off the softmax's dim."""
    rank = types[0].rank
    return _off_dims(op, arriving, types, {op.arg("dim") % rank})


def _log_softmax(op: CallOp, arriving, types, n: int, free) -> Decision:
    """_log_softmax(x, dim, half_to_float) over split classes: each rank's
    log-sum-exp, combined (`split_classes`); else as any softmax."""
    split = shard(op.arg("dim") % types[0].rank)
    if arriving[0] == split and not op.arg("half_to_float"):
        return Decision([split], [split], Parallel.SPLIT_CLASSES)
    return softmax_rule(op, arriving, types, n)


def _log_softmax_backward(op: CallOp, arriving, types, n: int, free) -> Decision:
    """_log_softmax_backward_data(grad, output, dim, input_dtype) over split
    classes: grad - exp(output) * (grad's sum over the classes, all-reduced)."""
    split = shard(op.arg("dim") % types[0].rank)
    dtype = op.arg("input_dtype")
    same_dtype = getattr(dtype, "value", None) == types[0].dtype == types[1].dtype
    if split in arriving[:2] and same_dtype:
        return Decision([split, split], [split], Parallel.SPLIT_CLASSES)
    return _softmax_backward(op, arriving, types, n, free)


def _padded(op: CallOp, arriving, types, n: int, free) -> Decision:
    """constant_pad_nd pads the last len(pad) / 2 dims; a split elsewhere passes."""
    rank = types[0].rank
    padded = set(range(rank - len(op.arg("pad")) // 2, rank))
    return _off_dims(op, arriving, types, padded)


def _slice_backward(op: CallOp, arriving, types, n: int, free) -> Decision:
    """slice_backward / select_backward(grad, input_sizes, dim, ...): zeros
    around the grad along `dim`; a split elsewhere passes (local sizes)."""
    first = arriving[0]
    out = op.results[0].type
    dim = op.arg("dim") % out.rank
    if first.kind == "partial":
        return Decision([SUM], [SUM])
    if first.kind != "shard":
        return replicated(op)
    along = first.dim + (1 if op.target_name == "aten::select_backward" and first.dim >= dim else 0)
    if along == dim or not divides(out.shape[along], n, op):
        return replicated(op)
    return Decision([first], [shard(along)], sizes={along: out.shape[along] // n})


# ---- norms, attention, embedding -----------------------------------------------------


def _layer_norm(op: CallOp, arriving, types, n: int, free) -> Decision:
    """native_layer_norm(x, shape, w, b, eps) -> (y, mean, rstd): off the normalized dims."""
    rank = types[0].rank
    touched = set(range(rank - len(op.arg("normalized_shape")), rank))
    return _off_dims(op, arriving, types, touched)


def _layer_norm_backward(op: CallOp, arriving, types, n: int, free) -> Decision:
    """native_layer_norm_backward(grad, x, shape, mean, rstd, w, b, mask) ->
    (grad_x, grad_w, grad_b): rows split -> grad_x split, the weights'
    gradients partial sums over the rows."""
    rank = types[0].rank
    touched = set(range(rank - len(op.arg("normalized_shape")), rank))
    first = arriving[0]
    if first.kind != "shard" or first.dim in touched:
        return replicated(op)
    stats = types[_index(op, "mean")].shape
    inputs = [first if t.shape in (types[0].shape, stats) else R for t in types]
    return Decision(inputs, [first, SUM, SUM])


# argument names of the attention ops' [batch, heads, ...] tensors, and of their masks
_ATTENTION_TENSORS = ("query", "key", "value", "out", "grad_out", "grad_out_", "logsumexp")
_ATTENTION_MASKS = ("attn_mask", "attn_bias")


def attention_step_rule(op: CallOp, arriving, types, n: int, free) -> Decision:
    """SDPA's kernels and their backward: split by heads (dim 1) or by batch
    (dim 0) as the query arrives; each result of rank >= 3 alike."""
    tensors = [i for name in _ATTENTION_TENSORS if (i := _index(op, name)) is not None]
    placed = arriving[_index(op, "query")]
    if placed.kind != "shard" or placed.dim not in (0, 1):
        return replicated(op)
    d = placed.dim
    if any(not divides(types[i].shape[d], n, op) for i in tensors):
        return replicated(op)
    inputs = [R] * len(op.inputs)
    for i in tensors:
        inputs[i] = placed
    for name in _ATTENTION_MASKS:
        i = _index(op, name)
        if i is not None and types[i].rank == 4 and types[i].shape[d] != 1:
            inputs[i] = placed
    outputs = [placed if r.type.rank >= 3 else R for r in op.results]
    if any(r.type.rank >= 3 and not divides(r.type.shape[d], n, op) for r in op.results):
        return replicated(op)
    return Decision(inputs, outputs)


def _embedding(op: CallOp, arriving, types, n: int, free) -> Decision:
    """A table the step trains, looked up at ids every rank holds, splits by
    vocabulary (Megatron's vocab-parallel embedding): each rank keeps and
    updates its rows, looks up the ids among them and gives zeros for the
    rest, a partial sum (reduced once with a position embedding added to
    it). Its backward is `_embedding_backward`'s vocabulary case."""
    weight, ids = _index(op, "weight"), _index(op, "indices")
    if weight in free and arriving[ids] == R and divides(types[weight].shape[0], n, op):
        inputs = [R] * len(op.inputs)
        inputs[weight] = shard(0)
        return Decision(inputs, [SUM], Parallel.VOCAB)
    return decide(op, arriving, types, n, set())


def _embedding_backward(op: CallOp, arriving, types, n: int, free) -> Decision:
    """embedding_dense_backward(grad, indices, rows, padding, by_freq): ids
    split -> the table's gradient is a partial sum; features split -> split;
    both whole -> split by vocabulary, as `_embedding` splits the table
    (each rank sums the gradients of the ids it holds into its rows)."""
    g, i = _index(op, "grad_output"), _index(op, "indices")
    grad, ids = arriving[g], arriving[i]
    if op.arg("scale_grad_by_freq"):
        return replicated(op)  # counts over the whole batch
    inputs = [R] * len(op.inputs)
    rows = op.arg("num_weights")
    if grad == R and ids == R and isinstance(rows, int) and divides(rows, n, op):
        return Decision(inputs, [shard(0)], Parallel.VOCAB_GRADIENT)
    if grad.kind == "shard" and grad.dim < types[i].rank and ids == grad:
        inputs[g] = inputs[i] = grad
        return Decision(inputs, [SUM])
    if grad.kind == "shard" and grad.dim == types[g].rank - 1 and ids == R:
        inputs[g] = grad
        return Decision(inputs, [shard(1)])
    return replicated(op)


# ---- per-sample ops and batch norm ------------------------------------------------------

# ops that compute each sample of the batch (dim 0) alone: target -> (the
# operands that carry the batch, each result's placement when they are split);
# what backward sums over the batch (a weight's gradient) is a partial sum
_PER_SAMPLE = {
    "aten::convolution": (("input",), (S0,)),
    "aten::convolution_backward": (("grad_output", "input"), (S0, SUM, SUM)),
    "aten::max_pool2d_with_indices": (("self",), (S0, S0)),
    "aten::max_pool2d_with_indices_backward": (("grad_output", "self", "indices"), (S0,)),
    "aten::avg_pool2d": (("self",), (S0,)),
    "aten::avg_pool2d_backward": (("grad_output", "self"), (S0,)),
    "aten::_adaptive_avg_pool2d": (("self",), (S0,)),
    "aten::_adaptive_avg_pool2d_backward": (("grad_output", "self"), (S0,)),
    # batch norm with given statistics (eval mode)
    "aten::_native_batch_norm_legit_no_training": (("input",), (S0, R, R)),
}


def _per_sample(op: CallOp, arriving, types, n: int, free) -> Decision:
    """The batch split (dim 0 of the first operand that carries it) passes
    through; a convolution only of a batched input (its weight's rank)."""
    names, outputs = _PER_SAMPLE[op.target_name]
    batched = [_index(op, name) for name in names]
    weight = _index(op, "weight")
    if arriving[batched[0]] != S0 or (
        weight is not None and types[batched[-1]].rank != types[weight].rank
    ):
        return replicated(op)
    inputs = [R] * len(op.inputs)
    for i in batched:
        inputs[i] = S0
    return Decision(inputs, list(outputs))


def _static(t) -> bool:
    return all(isinstance(d, int) for d in t.shape)


def _batch_norm(op: CallOp, arriving, types, n: int, free) -> Decision:
    """_native_batch_norm_legit_functional(x, w, b, running_mean, running_var,
    training, momentum, eps) -> (y, mean, invstd, running_mean, running_var)
    and the .no_stats form (no running statistics): in training over split
    rows, the statistics are the whole batch's, as SyncBatchNorm's (the pass
    gathers each rank's, `Parallel.BATCH_STATS`); y is split like x, the rest
    is the same on every rank."""
    x = _index(op, "input")
    if arriving[x] != S0 or not _static(types[x]) or not op.arg("training"):
        return replicated(op)
    inputs = [R] * len(op.inputs)
    inputs[x] = S0
    return Decision(inputs, [S0] + [R] * (len(op.results) - 1), Parallel.BATCH_STATS)


def _batch_norm_backward(op: CallOp, arriving, types, n: int, free) -> Decision:
    """native_batch_norm_backward(dy, x, w, running_mean, running_var, mean,
    invstd, train, eps, mask) -> (dx, dw, db) over split rows: in training, the
    whole batch's sums of dy and dy * (x - mean) are all-reduced (they make dw
    and db, and dx needs them: `Parallel.BATCH_STATS_BACKWARD`); in eval, dx
    is per sample and dw, db are partial sums."""
    dy, x = _index(op, "grad_out"), _index(op, "input")
    if arriving[dy] != S0 or not _static(types[x]):
        return replicated(op)
    inputs = [R] * len(op.inputs)
    inputs[dy] = inputs[x] = S0
    if op.arg("train"):
        return Decision(inputs, [S0, R, R], Parallel.BATCH_STATS_BACKWARD)
    return Decision(inputs, [S0, SUM, SUM])


def _new_filled(op: CallOp, arriving, types, n: int, free) -> Decision:
    """new_zeros(x, size) and kin read only x's dtype and device: x as it
    arrives (never gathered or reduced for that), the result whole."""
    return Decision([arriving[0]] + [R] * (len(op.inputs) - 1), [R])


def _index_put(op: CallOp, arriving, types, n: int, free) -> Decision:
    """index_put(x, indices, values, accumulate=True) adds the values into x:
    partial values at replicated indices make a partial result (x made partial
    too: one rank keeps it)."""
    values = _index(op, "values")
    if not op.arg("accumulate") or values is None or arriving[values].kind != "partial":
        return decide(op, arriving, types, n, set())
    inputs = [R] * len(op.inputs)
    inputs[0] = inputs[values] = SUM
    return Decision(inputs, [SUM])


# ---- losses ----------------------------------------------------------------------------

_MEAN, _SUM_REDUCTION = 1, 2  # torch's Reduction enum


def _split_classes(op: CallOp, arriving, types, outputs) -> Decision | None:
    """nll_loss (or its backward) on log-probabilities split on their class
    dim: each rank's labels in its slice (`split_classes`); class weights
    split alike."""
    logp, weight = _index(op, "self"), _index(op, "weight")
    split = shard(class_dim(types[logp].rank))
    if arriving[logp] != split or op.arg("reduction") not in (_MEAN, _SUM_REDUCTION):
        return None
    inputs = [R] * len(op.inputs)
    inputs[logp] = split
    if weight is not None:
        inputs[weight] = S0
    return Decision(inputs, [split if o == "split" else R for o in outputs], Parallel.SPLIT_CLASSES)


def _nll_loss(op: CallOp, arriving, types, n: int, free) -> Decision:
    """nll_loss_forward(logp, target, weight, reduction, ignore) over split
    rows: the pass computes the sums and the weights' total over all rows."""
    if (classes := _split_classes(op, arriving, types, ["whole", "whole"])) is not None:
        return classes
    logp, target = _index(op, "self"), _index(op, "target")
    if types[logp].rank == 1 or arriving[logp] != S0:
        return replicated(op)
    if op.arg("reduction") not in (_MEAN, _SUM_REDUCTION):
        return replicated(op)
    inputs = [R] * len(op.inputs)
    inputs[logp] = inputs[target] = S0
    return Decision(inputs, [R, R], Parallel.NLL_SUM)


def _nll_loss_backward(op: CallOp, arriving, types, n: int, free) -> Decision:
    """nll_loss_backward(grad, logp, target, weight, reduction, ignore, total):
    divided by the whole batch's total weight, the rows' gradient is local."""
    if (classes := _split_classes(op, arriving, types, ["split"])) is not None:
        return classes
    logp, target = _index(op, "self"), _index(op, "target")
    if types[logp].rank == 1 or arriving[logp] != S0:
        return replicated(op)
    if op.arg("reduction") not in (_MEAN, _SUM_REDUCTION):
        return replicated(op)
    inputs = [R] * len(op.inputs)
    inputs[logp] = inputs[target] = S0
    return Decision(inputs, [S0])


def _elementwise_loss(op: CallOp, arriving, types, n: int, free) -> Decision:
    """mse_loss(x, y, reduction) and its backward (grad, x, y, reduction):
    element-wise terms of split inputs, averaged: the local mean / n."""
    x = _index(op, "self")
    placed = arriving[x]
    if placed.kind != "shard" or op.arg("reduction", _MEAN) not in (_MEAN, _SUM_REDUCTION):
        return replicated(op)
    backward = op.target_name.endswith("_backward")
    inputs = [placed if t.shape == types[x].shape else R for t in types]
    out = placed if backward else SUM
    return Decision(
        inputs, [out], Parallel.SPLIT_MEAN if op.arg("reduction", _MEAN) == _MEAN else None
    )


# ---- in-place updates ----------------------------------------------------------------


def in_place_rule(op: CallOp, arriving, types, n: int, free) -> Decision:
    """An update of program state in place keeps the state's placement; the
    other operands come to it (split alike where not broadcast)."""
    state = arriving[0]
    if state.kind != "shard":
        return Decision(
            [state] + [state if state.kind == "partial" else R] * (len(op.inputs) - 1), [state]
        )
    rank = types[0].rank
    inputs = [state]
    for t in types[1:]:
        d = state.dim - (rank - t.rank)
        inputs.append(R if d < 0 or t.shape[d] == 1 else shard(d))
    return Decision(inputs, [state])


# target -> rule(op, arriving, types, n, free)
_POINTWISE_BACKWARD = (
    "silu_backward tanh_backward sigmoid_backward threshold_backward gelu_backward "
    "hardtanh_backward leaky_relu_backward elu_backward softplus_backward "
    "hardswish_backward hardsigmoid_backward native_dropout_backward native_dropout"
)
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention "
    "_scaled_dot_product_flash_attention"
)
STEP_RULES = {
    "aten::mm": matmul_rule,
    "aten::addmm": matmul_rule,
    "aten::detach": _identity,
    "aten::alias": _identity,
    "aten::ones_like": _like,
    "aten::zeros_like": _like,
    "aten::full_like": _like,
    "aten::empty_like": _like,
    "aten::mul.Scalar": _scaled,
    "aten::div.Scalar": _scaled,
    "aten::_softmax_backward_data": _softmax_backward,
    "aten::_log_softmax": _log_softmax,
    "aten::_log_softmax_backward_data": _log_softmax_backward,
    "aten::_safe_softmax": lambda op, arriving, types, n, free: softmax_rule(
        op, arriving, types, n
    ),
    "aten::constant_pad_nd": _padded,
    "aten::slice_backward": _slice_backward,
    "aten::select_backward": _slice_backward,
    "aten::native_layer_norm": _layer_norm,
    "aten::native_layer_norm_backward": _layer_norm_backward,
    "aten::embedding": _embedding,
    "aten::embedding_dense_backward": _embedding_backward,
    "aten::nll_loss_forward": _nll_loss,
    "aten::nll_loss_backward": _nll_loss_backward,
    "aten::mse_loss": _elementwise_loss,
    "aten::mse_loss_backward": _elementwise_loss,
    **dict.fromkeys(("aten::new_zeros", "aten::new_ones", "aten::new_empty"), _new_filled),
    "aten::index_put": _index_put,
    "aten::_native_batch_norm_legit_functional": _batch_norm,
    "aten::_native_batch_norm_legit.no_stats": _batch_norm,
    "aten::native_batch_norm_backward": _batch_norm_backward,
    **dict.fromkeys(_PER_SAMPLE, _per_sample),
    **{f"aten::{name}": _pointwise for name in _POINTWISE_BACKWARD.split()},
    **{f"aten::{name}": attention_step_rule for name in _ATTENTION_OPS.split()},
    **{f"aten::{name}_backward": attention_step_rule for name in _ATTENTION_OPS.split()},
}


def decide_step(
    op: CallOp, arriving: list[Placement], types, n: int, free: frozenset[int] = frozenset()
) -> Decision:
    """The placements `op` of a training step needs and produces; `free` are
    the operands that are views of parameters not yet placed."""
    if any(p.blocks for p in arriving):
        return replicated(op)
    if writes_input(op.target_name):
        rule = in_place_rule
    elif op.target_name in STEP_RULES:
        rule = STEP_RULES[op.target_name]
    elif isinstance(op, ReduceOp):
        rule = reduce_step_rule
    elif isinstance(op, ReshapeOp):
        rule = view_step_rule
    else:
        return decide(op, arriving, types, n, set())
    decision = rule(op, arriving, types, n, free)
    return decision if _splits_evenly(decision, types, op, n) else replicated(op)
