"""Expert parallelism over the tensor axis of a training step.

A mixture-of-experts layer runs its experts as grouped products over the
routed rows, sorted by expert (transformers' grouped_mm_fallback, whose
backward is an op of its own). As in inference, each rank of the tensor
axis holds E/n of the experts (its slice of the stacked weights, and so of
their gradients and optimizer moments) and computes their rows alone, zeros
elsewhere (`plait::expert_mm`): a partial sum whose rows are each one
rank's, "rows of experts". The ops that map a zero row to a zero row keep
them so (`ROW_WISE`: the activation, the gate times up product, and in
backward the activation's backward and the cat of the gradients), so no
collective runs between a layer's products, forward or backward
(`plait::expert_mm_backward` gives the rows' gradients and this rank's
experts' weight gradients). Any other reader sees an ordinary partial sum,
reduced where the rules need it: after the combine of a token's experts in
forward, where the tokens' gradients meet in backward.
"""

from __future__ import annotations

from xdsl.ir import SSAValue

from ...customops import experts as kernel
from ...ir.args import ArgsAttr, Operand
from ...ir.attrs import REPLICATE, partial, shard
from ...ir.ops import CallOp, call_op_class
from ...ir.schema import argument_names
from .experts import ZERO_PRESERVING
from .rules import divides

SUM = partial("sum")
# grouped products whose backward is split too: target -> (argument names of
# rows, weight, offsets[, grad]), the kernel of this rank's experts
_GROUPED = {
    "transformers::grouped_mm_fallback": (("input", "weight", "offs"), kernel.TARGET),
    "transformers::grouped_mm_fallback_backward": (
        ("input", "weight", "offs", "grad_output"),
        kernel.BACKWARD,
    ),
}

# row-wise ops that keep rows of experts -> which operands must carry them
# (the others arrive whole): "first" (an activation's backward is 0 where its
# gradient is), "any" (a product), "all" (a sum, a cat)
_BACKWARD_ACTIVATIONS = (
    "silu_backward gelu_backward threshold_backward tanh_backward sigmoid_backward"
)
ROW_WISE = {
    **dict.fromkeys(ZERO_PRESERVING, "first"),
    **dict.fromkeys(("aten::detach", "aten::alias", "aten::squeeze.dim"), "first"),
    **dict.fromkeys(("aten::mul.Scalar", "aten::div.Scalar", "aten::sum.dim_IntList"), "first"),
    **{f"aten::{name}": "first" for name in _BACKWARD_ACTIVATIONS.split()},
    "aten::mul.Tensor": "any",
    "aten::add.Tensor": "all",
    "aten::sub.Tensor": "all",
    "aten::cat": "all",
}


_REDUCING = ("aten::sum.dim_IntList", "aten::squeeze.dim")  # may drop a dim (not 0)


def _keeps_rows(op: CallOp, carried: list[SSAValue]) -> bool:
    """Rows stay on dim 0: no dim argument names it (an omitted one is dim 0,
    as split's, cat's and slice's defaults are), and no result moves it (a
    broadcast to more dims)."""
    rank = carried[0].type.rank
    dims = op.arg("dim", 0 if "dim" in (argument_names(op.target_name) or ()) else None)
    if op.target_name == "aten::sum.dim_IntList" and dims in (None, ()):
        return False  # a sum of everything
    named = dims if isinstance(dims, (tuple, list)) else () if dims is None else (dims,)
    if any(d % rank == 0 for d in named):
        return False
    return op.target_name in _REDUCING or all(r.type.rank == rank for r in op.results)


class StepExperts:
    """Experts split over a training step's tensor axis (see the module doc)."""

    def __init__(self, step):
        self.step, self.s = step, step.s
        self.rows: set[SSAValue] = set()  # values that are rows of experts

    def call(self, op: CallOp) -> bool:
        """Shard `op` if it is a grouped product or keeps rows of experts; else False."""
        if op.target_name in _GROUPED:
            return self._product(op, *_GROUPED[op.target_name])
        return self._row_wise(op)

    def _product(self, op: CallOp, names, target: str) -> bool:
        """grouped_mm(rows, W, offsets) or its backward (rows, W, offsets, grad):
        W split by expert (placed so here, if not yet placed)."""
        rows, weight, offsets, *grad = (op.input_of(op.arg(name)) for name in names)
        experts = self.s._full_type(weight).shape[0]
        split = self.s.place(weight) == shard(0) or (
            self.step._root(weight) is not None and divides(experts, self.s.n, op)
        )
        if not split:
            return False
        weight = self.s.reshard(weight, shard(0), op)
        if self.s.place(weight) != shard(0):  # the parameter could not split
            return False
        values = [self._rows(rows, op), weight, self.s.reshard(offsets, REPLICATE, op)]
        values += [self._rows(g, op) for g in grad]
        if experts not in self.s.expert_ids:
            self.s.expert_ids[experts] = self.s._indices_here(op, "experts", experts)
        values.append(self.s.expert_ids[experts])
        types = [op.results[0].type]
        if target == kernel.BACKWARD:  # the weight's gradient: this rank's experts
            types.append(weight.type)
        args = ArgsAttr(tuple(map(Operand, range(len(values)))), ())
        new = call_op_class(target)(target, values, args, types, dict(op.attributes))
        self.s._replace(op, new, [SUM, shard(0)][: len(types)])
        self.rows.add(new.results[0])
        return True

    def _rows(self, value: SSAValue, before: CallOp) -> SSAValue:
        """An operand of a product: rows of experts as they are (only this
        rank's experts' rows are read), anything else whole."""
        return value if value in self.rows else self.s.reshard(value, REPLICATE, before)

    def _row_wise(self, op: CallOp) -> bool:
        carry = ROW_WISE.get(op.target_name)
        carried = [i for i, v in enumerate(op.inputs) if v in self.rows]
        if carry is None or not carried:
            return False
        others = [i for i in range(len(op.inputs)) if i not in carried]
        if (carry == "first" and carried[0] != 0) or (carry == "all" and others):
            return False
        if not _keeps_rows(op, [op.inputs[i] for i in carried]):
            return False
        inputs = [
            v if i in carried else self.s.reshard(v, REPLICATE, op) for i, v in enumerate(op.inputs)
        ]
        new = type(op)(
            op.target_name, inputs, op.args, [r.type for r in op.results], dict(op.attributes)
        )
        self.s._replace(op, new, [SUM] * len(op.results))
        self.rows.update(new.results)
        return True
