"""The model a command compiles or estimates: MODEL (see frontend/model_spec.py)
or a bundled example (`--example NAME`, plait.examples)."""

from __future__ import annotations

from plait.frontend.model_spec import LoadedModel, ModelSpecError, load_model


def load(
    spec: str | None,
    example: str | None,
    batch: int,
    seq: int,
    dynamic: bool = True,
    meta: bool = False,
    task: str | None = None,
    random_weights: bool = False,
) -> LoadedModel:
    """`example`, when given, else MODEL `spec` (`load_model`'s arguments)."""
    if example is None:
        return load_model(spec, batch, seq, dynamic, meta, task, random_weights)
    if task is not None:
        raise ModelSpecError("--task chooses the model class of a Hugging Face directory MODEL")
    from plait.examples.models import EXAMPLES

    if example not in EXAMPLES:
        raise ModelSpecError(
            f"unknown example '{example}'; examples: {', '.join(sorted(EXAMPLES))}"
        )
    model, inputs, shapes = EXAMPLES[example]()
    return LoadedModel(model, tuple(inputs), shapes if dynamic else None, f"example {example}")
