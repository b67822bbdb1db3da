"""Analysis: the Adam/AdamW updates in a block that the torch backend runs as
one call (`customops.adam.adam_update_`) instead of eight.

The optimizer rows (frontend/optimizers.py) update a parameter so:

    %p1 = aten::mul_.Tensor(%p, %decay)              (AdamW with weight decay only)
    %m1 = aten::lerp_.Scalar(%m, %g, weight)
    %v1 = aten::mul_.Scalar(%v, beta2)
    %v2 = aten::addcmul_(%v1, %g, %g, value=1 - beta2)
    %d  = aten::sqrt(%v2)
    %d1 = aten::addcdiv(%eps, %d, %bias_correction2_sqrt)
    %s  = aten::mul.Tensor(%m1, %neg_step_size)
    %p2 = aten::addcdiv_(%p1, %s, %d1)

A chain is fused when every value it makes but the last is read only inside
it: then running it all where its last op stands computes the same (state is
read before it is updated, `ir.training.check_state_order`, so nothing
between reads the moments or the parameter half-updated).
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.ir import Block, Operation, SSAValue

from ..ir.ops import CallOp


@dataclass(frozen=True)
class AdamChain:
    members: tuple[Operation, ...]  # the chain's ops but the last, in block order
    param: SSAValue
    exp_avg: SSAValue
    exp_avg_sq: SSAValue
    grad: SSAValue
    decay: SSAValue | None
    weight: float
    beta2: float
    value: float
    bias_correction2_sqrt: SSAValue
    eps: SSAValue
    neg_step_size: SSAValue

    def call_args(self) -> tuple:
        """`adam_update_`'s arguments: IR values and numbers."""
        return (
            self.param, self.exp_avg, self.exp_avg_sq, self.grad, self.decay, self.weight,
            self.beta2, self.value, self.bias_correction2_sqrt, self.eps, self.neg_step_size,
        )  # fmt: skip


def _call(value: SSAValue | None, target: str) -> CallOp | None:
    op = value.owner if value is not None else None
    return op if isinstance(op, CallOp) and op.target_name == target else None


def _operand(op: CallOp, name: str) -> SSAValue | None:
    return op.input_of(op.arg(name))


def _number(op: CallOp, name: str, default=None) -> float | None:
    value = op.arg(name, default)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _match(last: CallOp) -> AdamChain | None:
    if _number(last, "value", 1) != 1:
        return None
    step = _call(_operand(last, "tensor1"), "aten::mul.Tensor")
    denom = _call(_operand(last, "tensor2"), "aten::addcdiv")
    m1 = _call(step and _operand(step, "self"), "aten::lerp_.Scalar")
    root = _call(denom and _operand(denom, "tensor1"), "aten::sqrt")
    v2 = _call(root and _operand(root, "self"), "aten::addcmul_")
    v1 = _call(v2 and _operand(v2, "self"), "aten::mul_.Scalar")
    if None in (step, denom, m1, root, v2, v1) or _number(denom, "value", 1) != 1:
        return None
    grad = _operand(m1, "end")
    if not (_operand(v2, "tensor1") is grad is _operand(v2, "tensor2")):
        return None
    numbers = _number(m1, "weight"), _number(v1, "other"), _number(v2, "value", 1)
    if None in numbers:
        return None
    param, decay = _operand(last, "self"), None
    p1 = _call(param, "aten::mul_.Tensor")
    members = [m1, v1, v2, root, denom, step]
    if p1 is not None:
        param, decay = _operand(p1, "self"), _operand(p1, "other")
        members.insert(0, p1)
    return AdamChain(
        tuple(members), param, _operand(m1, "self"), _operand(v1, "self"), grad, decay,
        *numbers, _operand(denom, "tensor2"), _operand(denom, "self"), _operand(step, "other"),
    )  # fmt: skip


def adam_chains(block: Block) -> dict[Operation, AdamChain]:
    """Each fusable chain, by its last op (the parameter's addcdiv_)."""
    chains = {}
    for op in block.ops:
        if not (isinstance(op, CallOp) and op.target_name == "aten::addcdiv_"):
            continue
        chain = _match(op)
        if chain is None:
            continue
        inside = set(chain.members) | {op}
        made_here = [r for member in chain.members for r in member.results]
        if all(use.operation in inside for r in made_here for use in r.uses):
            chains[op] = chain
    return chains
