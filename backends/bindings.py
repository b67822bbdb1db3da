"""Which Python callable a program uses for an ATen overload.

`torch.ops.aten.add.Tensor(...)` goes through Python dispatch and costs 2-3 us
more per call than ATen's generated C++ binding `torch.add(...)`. A binding
picks its overload from the arguments' types at run time, so it is used only
for the overloads listed here: ones whose binding takes the schema's
arguments positionally in the same order, with no deprecated signature that
such arguments could match, and that create no tensors (factories would
follow an ambient `torch.device(...)` context). Everything else is called
through its OpOverload. The model tests check each listed overload against
eager, exactly.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

import torch

from ..ir.targets import split_name

FAST_OVERLOADS = frozenset(
    "aten::" + name
    for name in """
    linear matmul mm bmm embedding scaled_dot_product_attention layer_norm rms_norm
    group_norm batch_norm conv1d conv2d max_pool2d adaptive_avg_pool2d
    add.Tensor sub.Tensor mul.Tensor div.Tensor pow.Tensor_Scalar pow.Tensor_Tensor
    neg exp log sqrt rsqrt reciprocal sin cos tanh sigmoid relu silu gelu abs
    eq.Tensor ne.Tensor lt.Tensor le.Tensor gt.Tensor ge.Tensor eq.Scalar ne.Scalar
    lt.Scalar le.Scalar gt.Scalar ge.Scalar where.self masked_fill.Scalar
    logical_not logical_and logical_or
    mean.dim sum.dim_IntList amax softmax.int log_softmax.int cumsum topk sort
    transpose.int permute unsqueeze squeeze.dim reshape flatten.using_ints cat stack
    split.Tensor split_with_sizes chunk unbind.int index_select gather select.int
    view expand contiguous
    """.split()
)

_MODULES = ("_VariableFunctions", "_nn", "_special", "_linalg", "_fft")
_METHODS = {"view", "expand", "contiguous"}  # Tensor methods, no function form


def _nameable(fn) -> bool:
    """Can fx write a call to `fn` in generated code?"""
    try:
        torch.fx.node._get_qualified_name(fn)
    except RuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def fast_call(target: torch._ops.OpOverload, schema_name: str) -> tuple[str, object]:
    """(fx node kind, callee) for calling `target` (named `schema_name`)."""
    if schema_name in FAST_OVERLOADS:
        name = split_name(schema_name)[1]
        if name in _METHODS:
            return "call_method", name
        for module in _MODULES:
            binding = getattr(getattr(torch._C, module), name, None)
            if type(binding).__name__ == "builtin_function_or_method" and _nameable(binding):
                return "call_function", binding
    return "call_function", target


# the torch.library namespace of plait's own custom ops (defined in plait.customops)
OWN_NAMESPACE = "plait"


def resolve(target: str) -> torch._ops.OpOverload | None:
    """Schema name -> OpOverload of an operator registered with torch, or None.

    Nothing a program names is imported: an artifact is data. Operators come
    from torch (aten, prims, _c10d_functional), from plait's own customops
    (registered here on first use), or from libraries the user imported
    (`plait.load(..., trusted_ops=[...])`)."""
    namespace, name, overload = split_name(target)
    found = _registered(namespace, name, overload)
    if found is None and namespace == OWN_NAMESPACE:
        _register_own_ops()
        found = _registered(namespace, name, overload)
    return found


def _registered(namespace: str, name: str, overload: str) -> torch._ops.OpOverload | None:
    try:
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _register_own_ops() -> None:
    """Import every module of plait's customops package (its files, not names
    from a program): each registers its `plait::` ops with torch."""
    from .. import customops

    for info in pkgutil.iter_modules(customops.__path__):
        importlib.import_module(f"{customops.__name__}.{info.name}")
