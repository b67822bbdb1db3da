"""Operator targets: their schema names, and which op family calls each.

A target is named as torch names operator schemas: `namespace::name` for the
default overload, `namespace::name.overload` otherwise (`aten::linear`,
`aten::add.Tensor`, `transformers::grouped_mm_fallback`).

The table below is the whole classification: which typed op (linear, norm,
elementwise, ...) calls which ATen targets. Anything not listed is a
`plait.call`.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*::[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")

# plait's own compressed linear kernels (customops): a linear layer whose
# weight is already quantized or sparse
COMPRESSED_LINEARS = {"plait::quant_linear", "plait::gqsa_linear"}

_KINDS: dict[str, str] = {
    "linear": "linear",
    "matmul": "matmul mm bmm addmm baddbmm",
    "embedding": "embedding",
    "attention": "scaled_dot_product_attention",
    "norm": "layer_norm rms_norm group_norm batch_norm _native_batch_norm_legit_no_training",
    "softmax": "softmax.int _softmax log_softmax.int _log_softmax",
    "reduce": (
        "sum sum.dim_IntList mean mean.dim amax amin max.dim min.dim argmax argmin "
        "var.correction var_mean.correction std.correction prod.dim_int linalg_vector_norm"
    ),
    "reshape": (
        "view _unsafe_view reshape view_as reshape_as transpose.int t permute "
        "unsqueeze squeeze squeeze.dim squeeze.dims expand expand_as flatten.using_ints "
        "unflatten.int slice.Tensor select.int narrow split.Tensor split_with_sizes chunk "
        "unbind.int cat stack contiguous clone alias movedim.int"
    ),
    "elementwise": (
        # arithmetic
        "add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Tensor rsub.Scalar "
        "mul.Tensor mul.Scalar div.Tensor div.Scalar div.Tensor_mode div.Scalar_mode "
        "floor_divide floor_divide.Scalar remainder.Tensor remainder.Scalar fmod.Tensor "
        "fmod.Scalar pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar neg abs reciprocal "
        "square sqrt rsqrt exp exp2 expm1 log log2 log1p sin cos tan tanh sinh cosh atan "
        "erf sign floor ceil round trunc clamp clamp.Tensor clamp_min clamp_max "
        "maximum minimum lerp.Scalar addcmul addcdiv "
        # activations
        "relu gelu silu sigmoid softplus hardtanh leaky_relu elu mish hardswish hardsigmoid "
        "dropout "
        # comparisons, logic, selects
        "eq.Tensor eq.Scalar ne.Tensor ne.Scalar lt.Tensor lt.Scalar le.Tensor le.Scalar "
        "gt.Tensor gt.Scalar ge.Tensor ge.Scalar logical_and logical_or logical_not "
        "logical_xor bitwise_and.Tensor bitwise_or.Tensor bitwise_not __and__.Tensor "
        "__or__.Tensor isnan isinf where.self where.ScalarOther where.ScalarSelf where.Scalar "
        "masked_fill.Scalar masked_fill.Tensor "
        # casts
        "to.dtype to.dtype_layout to.device to.other _to_copy type_as"
    ),
}

# kind -> frozenset of schema names
TARGETS_BY_KIND: dict[str, frozenset[str]] = {
    kind: frozenset("aten::" + name for name in names.split()) for kind, names in _KINDS.items()
}

_KIND_OF: dict[str, str] = {
    target: kind for kind, names in TARGETS_BY_KIND.items() for target in names
}


def kind_of(target: str) -> str:
    """The op family of a target: a key of TARGETS_BY_KIND, or "call"."""
    return _KIND_OF.get(target, "call")


def is_valid_name(target: str) -> bool:
    return bool(_NAME.match(target))


def split_name(target: str) -> tuple[str, str, str]:
    """'aten::add.Tensor' -> ('aten', 'add', 'Tensor'); the default overload is 'default'."""
    namespace, rest = target.split("::", 1)
    name, _, overload = rest.partition(".")
    return namespace, name, overload or "default"


def join_name(namespace: str, name: str, overload: str) -> str:
    return f"{namespace}::{name}" + ("" if overload == "default" else f".{overload}")
