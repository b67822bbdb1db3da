"""Capture an nn.Module with torch.export (non-strict).

Example inputs may be real, fake or `meta` tensors; a model built on `meta`
captures without allocating its weights. `dynamic_shapes` takes torch.export's
own spec (`{"input_ids": {0: Dim("batch", min=1, max=64)}}`); the Dim names
become the IR's size symbols.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..ir.errors import PlaitError
from .symbols import dim_names


class CaptureError(PlaitError):
    """torch.export could not capture the model."""


@dataclass
class Captured:
    program: torch.export.ExportedProgram
    # per flat tensor input: dim index -> the user's Dim name
    dim_names: list[dict[int, str]]
    # prefix a wrapper adds to state-dict names and module paths ("model.")
    prefix: str = ""
    input_names: list[str] = field(default_factory=list)


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence,
    dynamic_shapes=None,
) -> Captured:
    """Export `model` called on `example_inputs` (positional)."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    example_inputs = tuple(example_inputs)
    names = dim_names(model, example_inputs, dynamic_shapes)
    _check_no_size_one_dynamic_dims(model, example_inputs, names)
    # export in eval mode (dropout off), then give every submodule its own mode back
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _quiet_export():
            program = torch.export.export(
                model, example_inputs, dynamic_shapes=dynamic_shapes, strict=False
            )
    except Exception as exc:  # torch.export raises many types; all are capture failures
        hint = ""
        if "DynamicCache" in str(exc) or "Cache" in type(exc).__name__:
            hint = (
                "\nhint: Hugging Face models return a cache by default; wrap them with "
                "plait.frontend.hf.wrap(model), which passes use_cache=False and returns logits"
            )
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training
    signature = program.graph_signature
    input_names = [
        spec.arg.name
        for spec in signature.input_specs
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    return Captured(
        program=program,
        dim_names=names,
        prefix=getattr(model, "plait_prefix", ""),
        input_names=input_names,
    )


def _check_no_size_one_dynamic_dims(model, example_inputs, names) -> None:
    """torch.export specializes sizes 0 and 1; say so before its harder message."""
    params = list(inspect.signature(model.forward).parameters)
    for index, (value, dims) in enumerate(zip(example_inputs, names)):
        for dim, symbol in dims.items():
            if isinstance(value, torch.Tensor) and dim < value.dim() and value.shape[dim] < 2:
                name = params[index] if index < len(params) else f"#{index}"
                raise CaptureError(
                    f"example input '{name}' has size {value.shape[dim]} in dim {dim}, which is "
                    f"dynamic ('{symbol}'); torch.export fixes sizes 0 and 1 as constants. "
                    "Use an example of size 2 or more for dynamic dims"
                )


@contextlib.contextmanager
def _quiet_export():
    """torch.export logs guards and warnings that users cannot act on."""
    import logging
    import warnings

    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
