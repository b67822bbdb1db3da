"""Kernels plait's programs call that PyTorch does not have, as torch.library
custom ops (`torch.ops.plait.*`), each with a dense reference path the tests
compare against.

Some kernels want their weights in a device-specific layout. `preparer(target)`
gives the function that computes it once, when a program is built: it gets
the call's arguments (weights as tensors, activations as None) and returns
extra keyword arguments, so the IR and the artifact stay device-independent.
It also checks what the kernel needs of the weights (dtype, shape,
contiguity, alignment): it makes them conform, or raises
`KernelArgumentError`, which the program builder locates at the op.
"""

from __future__ import annotations

import importlib

from ..ir.errors import PlaitError


class KernelArgumentError(PlaitError):
    """Weights a kernel cannot take."""


# target -> "module:function", relative to this package
_PREPARE = {
    "plait::quant_linear": "quant_linear:prepare_args",
    "plait::gqsa_linear": "gqsa:prepare_args",
}


def preparer(target: str):
    entry = _PREPARE.get(target)
    if entry is None:
        return None
    module, function = entry.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)
