"""torch.optim's Adam/AdamW update of one parameter in one pass (`adam.cpp`).

The optimizer rows (frontend/optimizers.py) update a parameter with eight
ATen calls, each a pass over the parameter's memory; the torch backend finds
those chains (backends/adam_chains.py) and calls `adam_update_` instead. It
computes the same numbers, bit for bit, in one pass over float32 tensors on a
CPU; other tensors (bf16 on a GPU, non-contiguous slices) and a machine with
no C++ compiler run the eight calls.
"""

from __future__ import annotations

import functools

import torch

from . import native

aten = torch.ops.aten


@functools.lru_cache(maxsize=None)
def extension():
    return native.build(
        "plait_adam", "adam.cpp", "Adam runs its update as ATen calls", ("-ffp-contract=off",)
    )


def _native(tensors) -> bool:
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and all(
            t.dtype == torch.float32 and t.is_contiguous() and t.shape == first.shape
            for t in tensors
        )
        and extension() is not None
    )


def adam_update_(param, exp_avg, exp_avg_sq, grad, decay, weight, beta2, value,
                 bias_correction2_sqrt, eps, neg_step_size):  # fmt: skip
    """The rows' update in place; returns `param`. `decay`, `eps`,
    `bias_correction2_sqrt` and `neg_step_size` are 0-d tensors of the
    parameter's dtype (`decay` None without decoupled weight decay); `weight`
    (1 - beta1), `beta2` and `value` (1 - beta2) are numbers."""
    if _native((param, exp_avg, exp_avg_sq, grad)):
        scalars = (decay, bias_correction2_sqrt, eps, neg_step_size)
        d, bc, e, nss = (1.0 if s is None else s.item() for s in scalars)
        extension().adam_update(
            param, exp_avg, exp_avg_sq, grad, d, weight, beta2, value, bc, e, nss
        )
        return param
    return reference(param, exp_avg, exp_avg_sq, grad, decay, weight, beta2, value,
                     bias_correction2_sqrt, eps, neg_step_size)  # fmt: skip


def reference(param, exp_avg, exp_avg_sq, grad, decay, weight, beta2, value,
              bias_correction2_sqrt, eps, neg_step_size):  # fmt: skip
    """The optimizer rows' eight calls."""
    if decay is not None:
        aten.mul_.Tensor(param, decay)
    aten.lerp_.Scalar(exp_avg, grad, weight)
    aten.mul_.Scalar(exp_avg_sq, beta2)
    aten.addcmul_(exp_avg_sq, grad, grad, value=value)
    denom = aten.addcdiv(eps, aten.sqrt(exp_avg_sq), bias_correction2_sqrt)
    return aten.addcdiv_(param, aten.mul.Tensor(exp_avg, neg_step_size), denom)
