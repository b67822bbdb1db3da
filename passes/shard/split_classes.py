"""A training step's cross-entropy over classes split along a tensor axis:
Megatron's vocab-parallel loss.

With lm_head column-parallel, each rank holds the logits of its slice of the
vocabulary. Gathering them costs an all-gather of batch x vocab values and a
whole-vocabulary softmax, backward and lm_head weight gradient on every
rank. Instead (`Parallel.SPLIT_CLASSES`, decided in `step_rules`):

- log_softmax: each rank's log-sum-exp over its classes, all-gathered (one
  number per row and rank) and combined: x - logsumexp(those);
- nll_loss: each rank picks the labels in its slice (the others it treats
  as ignored): its sum of terms and its count (or weight) of labels are
  partial sums over the ranks, reduced as over split rows (`nll_sum`);
- nll_loss backward: the same labels, divided by the global total: exact;
- log_softmax backward: grad - exp(out) * sum(grad), the sum over the
  classes all-reduced.

The gradient of the logits stays split, so lm_head's weight gradient is
this rank's slice only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xdsl.ir import SSAValue

from ...ir.args import Operand
from ...ir.attrs import REPLICATE, partial, shard
from ...ir.ops import CallOp
from ...ir.types import TensorType
from .rules import Decision
from .shard import insert_call

if TYPE_CHECKING:  # (step.py imports this module)
    from .step import StepSharding

R = REPLICATE


def class_dim(logp_rank: int) -> int:
    """nll_loss's class dim: [C] or [N, C, d1, ...]."""
    return 0 if logp_rank == 1 else 1


def _local_labels(step: StepSharding, op: CallOp, target: SSAValue, classes: int) -> SSAValue:
    """The labels as indices into this rank's classes; a label another rank
    holds (or an ignored one) becomes the ignore index."""
    key = (target, classes)
    if key in step.class_labels:
        return step.class_labels[key]
    s, ignore = step.s, op.arg("ignore_index", -100)
    i64, flags = target.type, TensorType(target.type.shape, "i1")
    mine = s._indices_here(op, "classes", classes)
    start = insert_call(
        op, "classes_start", "aten::select.int", [mine], [Operand(0), 0, 0], TensorType([], "i64")
    )
    local = insert_call(
        op, "labels_here", "aten::sub.Tensor", [target, start], [Operand(0), Operand(1)], i64
    )
    low = insert_call(op, "labels_from", "aten::ge.Scalar", [local], [Operand(0), 0], flags)
    per_rank = classes // s.n
    high = insert_call(
        op, "labels_below", "aten::lt.Scalar", [local], [Operand(0), per_rank], flags
    )
    kept = insert_call(
        op, "labels_kept_here", "aten::logical_and", [low, high], [Operand(0), Operand(1)], flags
    )
    labels = insert_call(
        op,
        "labels_local",
        "aten::where.ScalarOther",
        [kept, local],
        [Operand(0), Operand(1), ignore],
        i64,
    )
    step.class_labels[key] = labels
    return labels


def _with_local_labels(step: StepSharding, op: CallOp, inputs: list[SSAValue]) -> list[SSAValue]:
    logp, target = op.arg("self").index, op.arg("target").index
    classes = step.s._full_type(op.operands[logp]).shape[class_dim(op.operands[logp].type.rank)]
    inputs = list(inputs)
    inputs[target] = _local_labels(step, op, inputs[target], classes)
    return inputs


def _over_classes(step: StepSharding, op: CallOp, name: str, target: str, x: SSAValue, dim: int):
    """`target`(x, [dim], keepdim=True): one value per row, before `op`."""
    one = list(x.type.shape)
    one[dim] = 1
    args = [Operand(0), (dim,), True]
    return insert_call(op, name, target, [x], args, TensorType(one, x.type.dtype))


def log_softmax(step: StepSharding, op: CallOp, inputs: list[SSAValue], decision: Decision):
    s = step.s
    x = inputs[0]
    dim = decision.outputs[0].dim
    here = _over_classes(step, op, "logsumexp_here", "aten::logsumexp", x, dim)
    s.placement[here] = shard(dim)  # one column per rank
    every = s.reshard(here, R, op)
    total = _over_classes(step, op, "logsumexp", "aten::logsumexp", every, dim)
    out = insert_call(
        op, "log_softmax", "aten::sub.Tensor", [x, total], [Operand(0), Operand(1)], x.type
    )
    step._retire(op, [out], decision.outputs)


def log_softmax_backward(step: StepSharding, op: CallOp, inputs: list[SSAValue], decision):
    s = step.s
    grad, out = inputs[0], inputs[1]
    dim = decision.outputs[0].dim
    here = _over_classes(step, op, "grad_sum_here", "aten::sum.dim_IntList", grad, dim)
    s.placement[here] = partial("sum")
    summed = s.reshard(here, R, op)
    probs = insert_call(op, "probs", "aten::exp", [out], [Operand(0)], out.type)
    scaled = insert_call(
        op, "probs_scaled", "aten::mul.Tensor", [probs, summed], [Operand(0), Operand(1)], out.type
    )
    result = insert_call(
        op, "grad_logits", "aten::sub.Tensor", [grad, scaled], [Operand(0), Operand(1)], grad.type
    )
    step._retire(op, [result], decision.outputs)


def nll_loss(step: StepSharding, op: CallOp, inputs: list[SSAValue], decision: Decision):
    """Each rank's terms and label count are partial sums: as over split rows."""
    step.nll_sum(op, _with_local_labels(step, op, inputs), decision)


def nll_loss_backward(step: StepSharding, op: CallOp, inputs: list[SSAValue], decision):
    step.s.emit(op, _with_local_labels(step, op, inputs), decision)


REWRITES = {
    "aten::_log_softmax": log_softmax,
    "aten::_log_softmax_backward_data": log_softmax_backward,
    "aten::nll_loss_forward": nll_loss,
    "aten::nll_loss_backward": nll_loss_backward,
}


def split_classes(step: StepSharding, op: CallOp, inputs: list[SSAValue], decision: Decision):
    REWRITES[op.target_name](step, op, inputs, decision)
