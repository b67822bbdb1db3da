"""SyncBatchNorm: batch norm in a training step whose rows are split over a mesh axis.

In training, batch norm normalizes each channel (dim 1) with the mean and
variance over all the other dims of the batch. With the rows split, a
rank's own statistics are not the batch's; as torch's SyncBatchNorm does,
the ranks share theirs (`step_rules` decides where, `Parallel.BATCH_STATS`):

- forward: each rank's mean and biased variance, [2, C], are all-gathered
  (one collective) and combined exactly (Chan's: with equal counts, the mean
  of the means, and the mean of the variances plus the means' spread);
  y = x * (invstd * w) + (b - mean * invstd * w), and the running statistics
  move with the whole batch's mean and unbiased variance, the same on every
  rank;
- backward: dx = (dy - Σdy / N - (x - mean) * Σ(dy (x - mean)) invstd² / N) invstd w
  needs both sums over the whole batch: one all-reduce of [2, C]. They are
  also db = Σdy and dw = Σ(dy (x - mean)) invstd, reduced already.

The arithmetic is ATen's CPU kernels' (batch_norm_cpu_transform_input,
batch_norm_backward_cpu_template), so it rounds as eager does.
"""

from __future__ import annotations

import math

from xdsl.ir import SSAValue

from ...ir.args import Operand
from ...ir.attrs import REPLICATE, partial, shard
from ...ir.ops import CallOp
from ...ir.training import GRAD_OF, mark_gradient
from ...ir.types import TensorType
from .shard import insert_call

_BOTH = [Operand(0), Operand(1)]


class _Calls:
    """Calls inserted before one op of the step (at its location)."""

    def __init__(self, step, op: CallOp, inputs: list[SSAValue]):
        self.step, self.op, self.inputs = step, op, inputs
        x = self.operand("input")
        self.dtype, self.rank, self.channels = x.type.dtype, x.type.rank, x.type.shape[1]
        self.dims = (0, *range(2, self.rank))  # all but the channels
        # the whole batch's count per channel (the ranks' rows are equal parts)
        self.count = math.prod(x.type.shape) // self.channels * step.s.n

    def operand(self, name: str) -> SSAValue | None:
        value = self.op.arg(name)
        return self.inputs[value.index] if isinstance(value, Operand) else None

    def __call__(self, target, values, args, shape, name, kwargs=()) -> SSAValue:
        result = TensorType(list(shape), self.dtype)
        return insert_call(self.op, name, target, values, args, result, kwargs)

    def binary(self, target: str, a: SSAValue, b: SSAValue, name: str) -> SSAValue:
        shape = a.type.shape if a.type.rank >= b.type.rank else b.type.shape
        return self(target, [a, b], _BOTH, shape, name)

    def scaled(self, target: str, a: SSAValue, number: float, name: str) -> SSAValue:
        return self(target, [a], [Operand(0), number], a.type.shape, name)

    def per_channel(self, value: SSAValue) -> SSAValue:
        """[C] as [1, C, 1, ...], to broadcast over x."""
        shape = [1, self.channels] + [1] * (self.rank - 2)
        return self("aten::view", [value], [Operand(0), tuple(shape)], shape, value.name_hint)

    def pick(self, value: SSAValue, dim: int, index: int, name: str) -> SSAValue:
        shape = [s for d, s in enumerate(value.type.shape) if d != dim]
        return self("aten::select.int", [value], [Operand(0), dim, index], shape, name)

    def stack(self, values: list[SSAValue], name: str) -> SSAValue:
        args = [tuple(Operand(i) for i in range(len(values)))]
        return self("aten::stack", values, args, [len(values), self.channels], name)


def sync_batch_norm(step, op: CallOp, inputs: list[SSAValue], decision) -> None:
    at = _Calls(step, op, inputs)
    x, w, b = at.operand("input"), at.operand("weight"), at.operand("bias")
    c, eps = at.channels, op.arg("eps")
    # this rank's statistics, gathered: [ranks, 2, C]
    mean_here = at("aten::mean.dim", [x], [Operand(0), at.dims], [c], "batch_mean")
    var_here = at(
        "aten::var.correction", [x], [Operand(0), at.dims], [c], "batch_var", [("correction", 0)]
    )
    both = at.stack([mean_here, var_here], "batch_stats")
    mine = at("aten::unsqueeze", [both], [Operand(0), 0], [1, 2, c], "batch_stats")
    step.s.placement[mine] = shard(0)
    every = step.s.reshard(mine, REPLICATE, op)
    means, variances = at.pick(every, 1, 0, "batch_means"), at.pick(every, 1, 1, "batch_vars")
    mean = at("aten::mean.dim", [means], [Operand(0), (0,)], [c], "batch_mean")
    spread = at.binary("aten::sub.Tensor", means, mean, "batch_spread")
    spread = at.binary("aten::mul.Tensor", spread, spread, "batch_spread")
    var = at("aten::mean.dim", [at.binary("aten::add.Tensor", variances, spread, "batch_var")],
             [Operand(0), (0,)], [c], "batch_var")  # fmt: skip
    invstd = at("aten::rsqrt", [at.scaled("aten::add.Scalar", var, eps, "batch_var")],
                [Operand(0)], [c], "batch_invstd")  # fmt: skip
    # y = x * alpha + beta
    alpha = invstd if w is None else at.binary("aten::mul.Tensor", invstd, w, "bn_alpha")
    shift = at.binary("aten::mul.Tensor", mean, alpha, "bn_shift")
    beta = (
        at("aten::neg", [shift], [Operand(0)], [c], "bn_beta")
        if b is None
        else at.binary("aten::sub.Tensor", b, shift, "bn_beta")
    )
    y = at.binary("aten::mul.Tensor", x, at.per_channel(alpha), "bn_scaled")
    y = at.binary("aten::add.Tensor", y, at.per_channel(beta), "bn_out")
    results = [y, mean, invstd]
    running = at.operand("running_mean"), at.operand("running_var")
    if running[0] is not None:
        momentum = op.arg("momentum")
        unbiased = at.scaled("aten::mul.Scalar", var, at.count / (at.count - 1), "batch_var")
        for old, new, name in zip(running, (mean, unbiased), ("running_mean", "running_var")):
            kept = at.scaled("aten::mul.Scalar", old, 1 - momentum, name)
            moved = at.scaled("aten::mul.Scalar", new, momentum, name)
            results.append(at.binary("aten::add.Tensor", moved, kept, name))
    step._retire(op, results, decision.outputs)


def sync_batch_norm_backward(step, op: CallOp, inputs: list[SSAValue], decision) -> None:
    at = _Calls(step, op, inputs)
    dy, x, w = at.operand("grad_out"), at.operand("input"), at.operand("weight")
    mean, invstd = at.operand("save_mean"), at.operand("save_invstd")
    c = at.channels
    centered = at.binary("aten::sub.Tensor", x, at.per_channel(mean), "bn_centered")
    products = at.binary("aten::mul.Tensor", dy, centered, "bn_dy_centered")
    sums_here = [
        at("aten::sum.dim_IntList", [v], [Operand(0), at.dims], [c], name)
        for v, name in ((dy, "bn_dy_sum"), (products, "bn_dy_centered_sum"))
    ]
    both = at.stack(sums_here, "bn_grad_sums")
    step.s.placement[both] = partial("sum")
    both = step.s.reshard(both, REPLICATE, op)
    total, dot = at.pick(both, 0, 0, "bn_dy_sum"), at.pick(both, 0, 1, "bn_dy_centered_sum")
    grad_w = at.binary("aten::mul.Tensor", dot, invstd, "bn_grad_weight")
    # dx = (dy - total / N - centered * dot * invstd² / N) * invstd * w
    k = at.binary(
        "aten::mul.Tensor", dot, at.binary("aten::mul.Tensor", invstd, invstd, "bn_k"), "bn_k"
    )
    k = at.scaled("aten::div.Scalar", k, at.count, "bn_k")
    grad_mean = at.scaled("aten::div.Scalar", total, at.count, "bn_grad_mean")
    dx = at.binary("aten::sub.Tensor", dy, at.per_channel(grad_mean), "bn_grad_input")
    projected = at.binary("aten::mul.Tensor", centered, at.per_channel(k), "bn_projected")
    dx = at.binary("aten::sub.Tensor", dx, projected, "bn_grad_input")
    scale = invstd if w is None else at.binary("aten::mul.Tensor", invstd, w, "bn_scale")
    dx = at.binary("aten::mul.Tensor", dx, at.per_channel(scale), "bn_grad_input")
    results = [dx, grad_w, total]
    marks = [a.data for a in op.attributes[GRAD_OF].data] if GRAD_OF in op.attributes else []
    step._retire(op, results, decision.outputs)
    for value, name in zip(results, marks):
        if name:
            mark_gradient(value, name)
