"""Resolve the MODEL argument of `plait compile` into a model and example inputs.

    path/to/file.py:factory   a function returning (model, example_inputs[, dynamic_shapes])
    path/to/hf_dir            a Hugging Face checkpoint directory (config.json and
                              *.safetensors weights); the model class of its task, from
                              config.json's `architectures` or `task` (see hf.TASKS)

Checkpoints load through safetensors (or torch.load with weights_only=True),
never through pickle. A weight the checkpoint lacks is an error, never a random
initialisation; a config without weights loads on meta, or with random
weights only when asked (`random_weights`, the CLI's --random-weights).
"""

from __future__ import annotations

import contextlib
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


def _from_hf_dir(
    path: Path,
    batch: int,
    seq: int,
    dynamic: bool,
    meta: bool,
    task: str | None = None,
    random_weights: bool = False,
) -> LoadedModel:
    import transformers
    from transformers import AutoConfig

    from . import hf

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(f"{path}: cannot read a Hugging Face config: {exc}") from exc
    max_seq = getattr(config, "max_position_embeddings", 4096)
    if seq > max_seq:
        raise ModelSpecError(
            f"{path}: an example of {seq} tokens is longer than the {max_seq} positions the "
            "model has (max_position_embeddings); give a shorter --seq"
        )
    task, why = (task, "--task") if task is not None else _task_of_config(config, path)
    auto = getattr(transformers, hf.TASKS[task].auto_class)
    safetensors = any(path.glob("*.safetensors"))
    pickled = sorted(path.glob("*.bin"))
    if not (meta or safetensors or pickled or random_weights):
        raise ModelSpecError(
            f"{path} holds a config but no weights (*.safetensors or *.bin); pass "
            "--random-weights to compile it with random weights, or --meta for the IR only"
        )
    with _quiet_transformers():
        if meta:
            with torch.device("meta"):
                model = auto.from_config(config)
        elif safetensors:
            model = _from_pretrained(auto, path, config, task)
        else:
            torch.manual_seed(0)
            model = auto.from_config(config)
            if pickled:
                _load_torch_checkpoint(model, pickled)
    model.eval()
    inputs = hf.example_inputs(model, batch, seq)  # on the model's device (meta or cpu)
    shapes = hf.dynamic_shapes(max(64, batch), max_seq) if dynamic else None
    source = "meta" if meta else "weights" if safetensors or pickled else "random weights"
    output = hf.TASKS[task].output
    return LoadedModel(
        hf.wrap(model, task),
        inputs,
        shapes,
        f"{path} ({type(model).__name__}: {task} from {why}, returns {output}; {source})",
    )


def _task_of_config(config, path: Path) -> tuple[str, str]:
    """The task of a checkpoint, from its config's `architectures` (the class
    that wrote it), and where that came from."""
    from . import hf

    architectures = list(getattr(config, "architectures", None) or [])
    for name in architectures:
        if (task := hf.task_of(name)) is not None:
            return task, f"architectures {name}"
    if architectures:
        raise ModelSpecError(
            f"{path}: config.json names architectures {', '.join(architectures)}, which is none "
            f"of the tasks plait compiles; pass --task ({', '.join(hf.TASKS)})"
        )
    # a config written by hand: a causal LM where the model type has one
    task = "causal-lm" if hf.has_task(config.model_type, "causal-lm") else "feature-extraction"
    return task, f"model type {config.model_type}, no architectures"


def _from_pretrained(auto, path: Path, config, task: str):
    """A model of `task` with every weight from the checkpoint: one it lacks is an
    error, never a random initialisation."""
    from . import hf

    try:  # mismatched shapes are reported below, by name (transformers points to its log)
        model, info = auto.from_pretrained(
            str(path),
            config=config,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelSpecError(f"{path}: loading the checkpoint failed: {exc}") from exc
    mismatched = sorted(info["mismatched_keys"])
    if mismatched:
        name, stored, expected = mismatched[0]
        raise ModelSpecError(
            f"{path}: the checkpoint's {name} has shape {list(stored)}, but "
            f"{type(model).__name__} built from config.json needs {list(expected)}; the "
            "config and the weights disagree"
        )
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        written = [(a, hf.task_of(a)) for a in getattr(config, "architectures", None) or []]
        hint = next(
            (
                f"; it holds a {a}: compile it with --task {t}"
                for a, t in written
                if t not in (None, task)
            ),
            "; check that the checkpoint is complete",
        )
        raise ModelSpecError(
            f"{path}: the checkpoint lacks {len(missing)} weight(s) that {type(model).__name__} "
            f"({task}) needs: {shown}; plait does not initialise weights randomly{hint}"
        )
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load reports and progress bars: plait reports what matters."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


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
    batch: int = 2,
    seq: int = 16,
    dynamic: bool = True,
    meta: bool = False,
    task: str | None = None,
    random_weights: bool = False,
) -> LoadedModel:
    """Resolve a MODEL spec into a model and inputs. `task` and `random_weights`
    apply to a Hugging Face directory (see `_from_hf_dir`)."""
    path = Path(spec) if spec is not None else None
    if task is not None and not (path is not None and path.is_dir()):
        raise ModelSpecError("--task chooses the model class of a Hugging Face directory MODEL")
    if spec is None:
        raise ModelSpecError(
            "give a MODEL (file.py:factory or a Hugging Face directory) or --example NAME"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"{path}: a model directory needs a config.json (Hugging Face layout)"
            )
        return _from_hf_dir(path, batch, seq, dynamic, meta, task, random_weights)
    if ":" in spec and not path.exists():
        return _from_factory(spec)
    if path.is_file() and path.suffix == ".py":
        raise ModelSpecError(f"name the factory function in {path}: {path}:FUNCTION")
    raise ModelSpecError(
        f"MODEL '{spec}' does not exist; expected path/to/file.py:factory, a Hugging Face "
        "checkpoint directory, an IR file (.mlir), or use --example NAME"
    )
