"""Analysis: FLOPs and bytes moved by each op, as sympy formulas in the IR's dims.

Counts are per rank (an op's types are its local shapes) and follow the
usual conventions: a multiply-add is 2 FLOPs; bytes are what a kernel reads
and writes (all operands and results once), except that views move nothing
and an embedding reads only the rows it returns.

    cost = op_cost(op)                # OpCost(flops=2*batch*seq*4096*4096, bytes=..., kind="compute")
    cost = op_cost(op, context=8192)  # attention reading a KV cache of 8192 positions (decode)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import reduce

import sympy
from xdsl.ir import Operation, SSAValue

from ..ir.args import Operand
from ..ir.ops import (
    AttentionOp,
    CallOp,
    CollectiveOp,
    ElementwiseOp,
    EmbeddingOp,
    LinearOp,
    MatmulOp,
    NormOp,
    ParamOp,
    ReduceOp,
    ReshapeOp,
    SoftmaxOp,
    WaitOp,
)
from ..ir.targets import COMPRESSED_LINEARS
from ..ir.types import AsyncType, TensorType

Expr = sympy.Expr
ZERO = sympy.Integer(0)


@dataclass(frozen=True)
class OpCost:
    flops: Expr
    bytes: Expr
    kind: str  # "compute", "view" (no kernel), "collective", "none"
    # which throughput the FLOPs run at: None for the machine's matmul peak, or a
    # kernel class a hardware file may rate on its own ("attention",
    # "transcendental", "broadcast", "strided", "reduce")
    rate: str | None = None
    weight_bytes: Expr = sympy.Integer(0)  # of `bytes`, those read from parameters
    # elements of a loop ATen splits over threads in fixed-size chunks (element-wise,
    # reductions, copies); None for kernels that thread otherwise (BLAS, attention)
    elements: Expr | None = None


def _type(value: SSAValue) -> TensorType:
    t = value.type
    return t.value_type if isinstance(t, AsyncType) else t


def _numel(t: TensorType) -> Expr:
    return sympy.sympify(t.numel)


def _bytes(types) -> Expr:
    return sympy.Add(*(sympy.sympify(t.nbytes) for t in types))


def _io_bytes(op: Operation) -> Expr:
    return _bytes([_type(v) for v in op.operands]) + _bytes([_type(r) for r in op.results])


def _prod(dims) -> Expr:
    return reduce(lambda a, b: a * b, dims, sympy.Integer(1))


def _arg_type(op: CallOp, name: str) -> TensorType | None:
    value = op.arg(name)
    return _type(op.inputs[value.index]) if isinstance(value, Operand) else None


# element-wise functions evaluated by polynomial/exp approximations: counted as
# 4 FLOPs per element, at the machine's transcendental rate where it has one
_TRANSCENDENTAL = {"exp", "log", "sin", "cos", "tan", "tanh", "sigmoid", "silu", "gelu", "erf",
                   "softplus", "mish", "elu", "log1p", "expm1", "exp2", "log2", "atan",
                   "sinh", "cosh"}  # fmt: skip


def _linear(op: CallOp) -> OpCost:
    x, w = _arg_type(op, "input"), _arg_type(op, "weight")
    out = _type(op.results[0])
    out_features, in_features = w.shape[0], w.shape[-1]
    rows = _numel(x) / in_features
    flops = 2 * rows * in_features * out_features
    if _arg_type(op, "bias") is not None:
        flops += _numel(out)
    return OpCost(sympy.simplify(flops), _io_bytes(op), "compute")


def _matmul(op: CallOp) -> OpCost:
    # mm/bmm/matmul/addmm/baddbmm: out [..., m, n] from a reduction of length k
    out = _type(op.results[0])
    second = _type(op.inputs[-1])
    k = second.shape[-2] if second.rank >= 2 else second.shape[0]
    flops = 2 * _numel(out) * k
    if op.target_name in ("aten::addmm", "aten::baddbmm"):
        flops += _numel(out)
    return OpCost(flops, _io_bytes(op), "compute")


def _attention(op: CallOp, context=None) -> OpCost:
    q, k, v = (_arg_type(op, n) for n in ("query", "key", "value"))
    out = _type(op.results[0])
    batch_heads = _numel(q) / (q.shape[-2] * q.shape[-1])
    q_len, head_dim, v_dim = q.shape[-2], q.shape[-1], v.shape[-1]
    kv_len = k.shape[-2] if context is None else context
    scores = batch_heads * q_len * kv_len
    if op.arg("is_causal", False) is True and context is None:
        scores = scores / 2  # fused causal kernels skip the masked half
    flops = 2 * scores * head_dim + 2 * scores * v_dim + 5 * scores  # QK^T, PV, softmax
    kv_heads = _numel(k) / (k.shape[-2] * k.shape[-1])
    kv_bytes = kv_heads * kv_len * (head_dim + v_dim) * (sympy.sympify(k.nbytes) / _numel(k))
    mask = _arg_type(op, "attn_mask")
    mask_bytes = _bytes([mask]) if mask is not None and context is None else ZERO
    moved = _bytes([q, out]) + kv_bytes + mask_bytes
    return OpCost(flops, moved, "compute", "attention")


def _norm(op: CallOp) -> OpCost:
    return OpCost(5 * _numel(_type(op.results[0])), _io_bytes(op), "compute")


def _inner_broadcast(operand: TensorType, out: TensorType) -> bool:
    """Is `operand` repeated along the output's innermost dim? Then the kernel
    cannot run a vectorized inner loop over it (a 0-d tensor counts: unlike a
    Python number it is not a loop constant); repeats along outer dims cost
    nothing extra."""
    return operand.rank == 0 or (operand.shape[-1] == 1 and out.shape[-1] != 1)


def _elementwise(op: CallOp, strided: bool = False) -> OpCost:
    name = op.target_name.split("::", 1)[1].split(".")[0]
    out = _type(op.results[0])
    numel = _numel(out)
    if name in _TRANSCENDENTAL:
        return OpCost(4 * numel, _io_bytes(op), "compute", "transcendental", elements=numel)
    if strided:  # operands laid out differently: no contiguous inner loop
        return OpCost(numel, _io_bytes(op), "compute", "strided", elements=numel)
    if out.rank and any(_inner_broadcast(_type(v), out) for v in op.inputs):
        return OpCost(numel, _io_bytes(op), "compute", "broadcast", elements=numel)
    return OpCost(numel, _io_bytes(op), "compute", elements=numel)


def _softmax(op: CallOp) -> OpCost:
    return OpCost(5 * _numel(_type(op.results[0])), _io_bytes(op), "compute")


def _reduce(op: CallOp) -> OpCost:
    numel = _numel(_type(op.inputs[0]))
    return OpCost(numel, _io_bytes(op), "compute", "reduce", elements=numel)


_COPYING_RESHAPES = {"aten::clone", "aten::cat", "aten::stack"}


def _reshape(op: CallOp, copies: bool = False) -> OpCost:
    if copies or op.target_name in _COPYING_RESHAPES:
        return OpCost(ZERO, _io_bytes(op), "compute", elements=_numel(_type(op.results[0])))
    return OpCost(ZERO, ZERO, "view")


def _embedding(op: CallOp) -> OpCost:
    """A lookup reads only the rows it returns from the table."""
    out = _type(op.results[0])
    indices = _arg_type(op, "indices")
    rows = sympy.sympify(out.nbytes)
    return OpCost(ZERO, 2 * rows + _bytes([indices]), "compute", weight_bytes=rows)


def _index_copy(op: CallOp) -> OpCost:
    """A KV-cache update moves only the rows it writes (read once, written once)."""
    source, index = _arg_type(op, "source"), _arg_type(op, "index")
    return OpCost(ZERO, 2 * _bytes([source]) + _bytes([index]), "compute")


def _grouped_mm(op: CallOp) -> OpCost:
    """Experts' products over routed rows [N, in] (transformers' grouped_mm, or
    plait::expert_mm over the E_here of E experts a rank holds): each row goes
    through one expert; with balanced routing a rank computes E_here/E of the
    rows, and reads the weights of the experts that got rows (all, once the
    rows outnumber the experts)."""
    rows, weight, offsets = (_type(v) for v in op.inputs[:3])
    here, experts = weight.shape[0], offsets.shape[0]
    share = sympy.sympify(here) / experts
    n = rows.shape[0]
    flops = 2 * n * weight.shape[1] * weight.shape[2] * share
    touched = sympy.Min(1, n / sympy.sympify(experts))
    read = _bytes([weight]) * touched
    moved = _bytes([rows]) * share + _bytes([_type(op.results[0])]) + read
    return OpCost(flops, moved, "compute", weight_bytes=read)


def _dispatch(op: CallOp) -> OpCost:
    """The routed rows an expert-parallel all-to-all delivers (see comm_cost)."""
    return OpCost(ZERO, _bytes([_type(op.results[0])]), "collective")


_BY_TARGET = {"aten::index_copy_": _index_copy, "aten::index_copy": _index_copy,
              "transformers::grouped_mm_fallback": _grouped_mm, "aten::_grouped_mm": _grouped_mm,
              "plait::expert_mm": _grouped_mm, "plait::expert_dispatch": _dispatch}  # fmt: skip


def _generic(op: CallOp) -> OpCost:
    name = op.target_name
    if name in _BY_TARGET:
        return _BY_TARGET[name](op)
    out = _type(op.results[0]) if op.results else None
    if name.startswith("aten::conv") and len(op.inputs) >= 2 and out is not None:
        weight = _type(op.inputs[1])  # [out, in / groups, *kernel]
        return OpCost(2 * _numel(out) * _prod(weight.shape[1:]), _io_bytes(op), "compute")
    flops = _numel(out) if out is not None else ZERO
    return OpCost(flops, _io_bytes(op), "compute" if op.results else "none")


def compressed_weights(op: CallOp) -> Expr:
    """How many weights a compressed linear stands for (out x in of its dense
    weight); None for other ops."""
    if op.target_name not in COMPRESSED_LINEARS:
        return None
    out = _type(op.results[0])
    return out.shape[-1] * _type(op.inputs[0]).shape[-1]


def _compressed_linear(op: CallOp) -> OpCost:
    """Weight-only quantized or GQSA linears: the multiply-adds of the weights
    they keep (a GQSA layer keeps `values` = out x kept x G/2 bytes of them)."""
    out = _type(op.results[0])
    kept = _type(op.inputs[0]).shape[-1]
    if op.target_name == "plait::gqsa_linear":
        values = _type(op.inputs[1]).shape
        kept = values[1] * values[2] * 2
    return OpCost(2 * _numel(out) * kept, _io_bytes(op), "compute")


_BY_FAMILY = {
    LinearOp: _linear,
    MatmulOp: _matmul,
    NormOp: _norm,
    SoftmaxOp: _softmax,
    ReduceOp: _reduce,
    EmbeddingOp: _embedding,
}


def op_cost(op: Operation, context: Expr | int | None = None, strided: bool = False) -> OpCost:
    """FLOPs and bytes of one op; `context` is the KV length attention reads in
    decode; `strided` says the kernel walks memory out of order (a reshape that
    must copy, element-wise operands laid out differently; see `layout`)."""
    cost = _op_cost(op, context, strided)
    if cost.kind == "compute" and cost.weight_bytes == 0:  # unless the op says what it reads
        weights = _bytes([_type(v) for v in op.operands if isinstance(v.owner, ParamOp)])
        cost = dataclasses.replace(cost, weight_bytes=weights)
    return cost


def _op_cost(op: Operation, context, strided: bool) -> OpCost:
    if isinstance(op, AttentionOp):
        return _attention(op, context)
    if isinstance(op, ReshapeOp):
        return _reshape(op, strided)
    if isinstance(op, ElementwiseOp):
        return _elementwise(op, strided)
    for family, fn in _BY_FAMILY.items():
        if isinstance(op, family):
            return fn(op)
    if isinstance(op, CallOp):
        if op.target_name in COMPRESSED_LINEARS:
            return _compressed_linear(op)
        return _generic(op)
    if isinstance(op, CollectiveOp):
        return OpCost(ZERO, _bytes([_type(op.input)]), "collective")
    if isinstance(op, (ParamOp, WaitOp)):
        return OpCost(ZERO, ZERO, "none")
    return OpCost(ZERO, ZERO, "none")
