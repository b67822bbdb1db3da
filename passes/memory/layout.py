"""Analysis: which values eager PyTorch may give a layout other than
contiguous, so that memplan keeps PyTorch's allocator for the ops whose
output layout follows such an input.

An op run into an arena slot (`out=`) writes a contiguous tensor, but
eager's pointwise ops (TensorIterator), softmax, attention and clone give
their output the layout of their inputs: `q * cos` on a transposed `q` is
transposed too. The captured graph was traced on eager's strides (a joint
training graph drops `.contiguous()` where eager's tensor already was, and
calls `view` where `reshape` was written), so a planned op must produce the
layout eager did: it is planned only when its output is contiguous in eager.

    strided = strided_values(fn)   # values whose eager layout may not be contiguous

Conservative: a value is strided when any view other than a reshape makes it
(transpose, permute, expand, slice, a rank's local shard, ...), or when a
layout-following op reads a strided value; inputs, weights, `contiguous` and
every other op's fresh result are contiguous.
"""

from __future__ import annotations

from xdsl.dialects import func
from xdsl.ir import SSAValue

from ...ir.ops import AttentionOp, CallOp, ElementwiseOp, LocalShardOp, SoftmaxOp, WaitOp
from ...ir.schema import returns_alias

# ops whose output takes its inputs' layout (beyond the pointwise family)
LAYOUT_FOLLOWING = (ElementwiseOp, SoftmaxOp, AttentionOp)
LAYOUT_FOLLOWING_TARGETS = frozenset(
    "aten::clone aten::_to_copy aten::empty_like aten::zeros_like aten::ones_like "
    "aten::full_like aten::rand_like aten::randn_like".split()
)
# views that keep a contiguous tensor contiguous
CONTIGUOUS_VIEWS = frozenset(
    "aten::view aten::_unsafe_view aten::reshape aten::unsqueeze aten::squeeze aten::squeeze.dim "
    "aten::squeeze.dims aten::flatten.using_ints aten::alias aten::detach "
    "aten::view.dtype".split()
)


def _follows_layout(op: CallOp) -> bool:
    return isinstance(op, LAYOUT_FOLLOWING) or op.target_name in LAYOUT_FOLLOWING_TARGETS


def strided_values(fn: func.FuncOp) -> set[SSAValue]:
    strided: set[SSAValue] = set()
    for op in fn.body.blocks.first.ops:
        reads_strided = any(v in strided for v in op.operands)
        if isinstance(op, LocalShardOp) or (isinstance(op, WaitOp) and reads_strided):
            strided.update(op.results)  # a rank's slice; what the collective was sent
        if not isinstance(op, CallOp) or op.target_name == "aten::contiguous":
            continue
        if returns_alias(op.target_name):
            if op.target_name not in CONTIGUOUS_VIEWS or reads_strided:
                strided.update(op.results)
        elif _follows_layout(op) and reads_strided:
            strided.update(op.results)
    return strided
