"""Resolve the MODEL argument of `plait compile` into a model and example inputs.

    path/to/file.py:factory   a function returning (model, example_inputs[, dynamic_shapes])
    path/to/hf_dir            a Hugging Face config or checkpoint directory (config.json,
                              optionally *.safetensors weights); a causal LM
    --example NAME            a bundled example (llama-tiny, gpt2-tiny, mixtral-tiny, cnn-tiny)

Checkpoints load through safetensors (or torch.load with weights_only=True),
never through pickle.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..ir.errors import PlaitError


class ModelSpecError(PlaitError):
    """A MODEL argument that names nothing plait can load."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example_inputs: tuple
    dynamic_shapes: object = None
    description: str = ""


def _from_factory(spec: str) -> LoadedModel:
    path_text, _, factory_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ModelSpecError(
            f"{path}: no such file (MODEL '{spec}' should be path/to/file.py:factory)"
        )
    module_name = f"_plait_model_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelSpecError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ModelSpecError(
            f"{path} has no function '{factory_name}'; functions there: {', '.join(names) or 'none'}"
        )
    try:
        result = factory()
    except Exception as exc:
        raise ModelSpecError(
            f"{spec}: calling {factory_name}() failed: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(result, torch.nn.Module):
        raise ModelSpecError(
            f"{spec} returned only a model; return (model, example_inputs) or "
            "(model, example_inputs, dynamic_shapes) so plait knows how to call it"
        )
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise ModelSpecError(
            f"{spec} must return (model, example_inputs[, dynamic_shapes]), got {type(result).__name__}"
        )
    model, inputs = result[0], tuple(result[1])
    return LoadedModel(model, inputs, result[2] if len(result) == 3 else None, spec)


def _from_hf_dir(path: Path, batch: int, seq: int, dynamic: bool, meta: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import hf

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(f"{path}: cannot read a Hugging Face config: {exc}") from exc
    safetensors = any(path.glob("*.safetensors"))
    pickled = sorted(path.glob("*.bin"))
    has_weights = safetensors or bool(pickled)
    if safetensors and not meta:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
    else:
        torch.manual_seed(0)
        with torch.device("meta") if meta else torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config)
        if pickled and not meta:
            _load_torch_checkpoint(model, pickled)
    model.eval()
    inputs = hf.example_inputs(model, batch, seq)  # on the model's device (meta or cpu)
    shapes = (
        hf.dynamic_shapes(max_seq=getattr(config, "max_position_embeddings", 4096))
        if dynamic
        else None
    )
    source = "weights" if has_weights and not meta else ("meta" if meta else "random weights")
    return LoadedModel(hf.wrap(model), inputs, shapes, f"{path} ({config.model_type}, {source})")


def _load_torch_checkpoint(model: torch.nn.Module, files: list[Path]) -> None:
    """Load *.bin state dicts with weights_only=True: tensors only, no code runs."""
    state = {}
    for file in files:
        try:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise ModelSpecError(f"{file}: not a loadable weights-only checkpoint: {exc}") from exc
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise ModelSpecError(
            f"checkpoint {files[0].parent} lacks {len(missing)} weight(s), e.g. '{missing[0]}'"
        )


def load_model(
    spec: str | None,
    example: str | None = None,
    batch: int = 2,
    seq: int = 16,
    dynamic: bool = True,
    meta: bool = False,
) -> LoadedModel:
    """Resolve a MODEL spec (or an example name) into a model and inputs."""
    if example is not None:
        from ..examples.models import EXAMPLES

        if example not in EXAMPLES:
            raise ModelSpecError(
                f"unknown example '{example}'; examples: {', '.join(sorted(EXAMPLES))}"
            )
        model, inputs, shapes = EXAMPLES[example]()
        return LoadedModel(model, tuple(inputs), shapes if dynamic else None, f"example {example}")
    if spec is None:
        raise ModelSpecError(
            "give a MODEL (file.py:factory or a Hugging Face directory) or --example NAME"
        )
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"{path}: a model directory needs a config.json (Hugging Face layout)"
            )
        return _from_hf_dir(path, batch, seq, dynamic, meta)
    if ":" in spec and not path.exists():
        return _from_factory(spec)
    if path.is_file() and path.suffix == ".py":
        raise ModelSpecError(f"name the factory function in {path}: {path}:FUNCTION")
    raise ModelSpecError(
        f"MODEL '{spec}' does not exist; expected path/to/file.py:factory, a Hugging Face "
        "checkpoint directory, an IR file (.mlir), or use --example NAME"
    )
