"""Hugging Face `transformers` models, captured unchanged.

`wrap(model)` bakes the keyword arguments export needs into a small module:
`use_cache=False` where the model has a cache (a DynamicCache output cannot be
exported), an explicit `attention_mask` (all ones when only `input_ids` are
given; it keeps packed-sequence detection ops out of the graph) and one tensor
as the output, chosen by the model's task:

    causal-lm                logits             [batch, seq, vocab]
    masked-lm                logits             [batch, seq, vocab]
    sequence-classification  logits             [batch, labels]
    token-classification     logits             [batch, seq, labels]
    feature-extraction       last_hidden_state  [batch, seq, hidden]  (the base model)

State-dict names and module paths stay those of the Hugging Face model
("model.layers.0.mlp.up_proj.weight").

    model = LlamaForCausalLM(config)
    compiled = plait.compile(hf.wrap(model), hf.example_inputs(model, batch=2, seq=16),
                             dynamic_shapes=hf.dynamic_shapes())
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch.export import Dim

from ..ir.errors import PlaitError
from .hf_tasks import TASKS


class HFModelError(PlaitError):
    pass


def _class_names(task: str) -> dict[str, str]:
    """model type -> class names of `task` ("bert" -> "BertModel")."""
    from transformers.models.auto import modeling_auto

    table = getattr(modeling_auto, TASKS[task].mapping)
    return {
        kind: names if isinstance(names, str) else " ".join(names) for kind, names in table.items()
    }


def task_of(class_name: str) -> str | None:
    """The task of a transformers model class ("BertModel" -> "feature-extraction"),
    None if it is none of TASKS."""
    for task in TASKS:
        if any(class_name in names.split() for names in _class_names(task).values()):
            return task
    return None


def has_task(model_type: str, task: str) -> bool:
    """Whether transformers has a `task` class for `model_type` ("bert", "llama")."""
    return model_type in _class_names(task)


def is_transformers_model(model) -> bool:
    transformers = sys.modules.get("transformers")  # never imported just to ask
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


class TaskModel(torch.nn.Module):
    """(input_ids[, attention_mask]) -> the task's output tensor (see TASKS)."""

    # the wrapper's own prefix, stripped from names and locations on import
    plait_prefix = "model."

    def __init__(self, model: torch.nn.Module, task: str, whole_output: bool = False):
        super().__init__()
        self.model = model
        self.task = task
        # the task's tensor, or (a model given to plait.compile as it is) what the
        # model returns: its ModelOutput, without a cache
        self.output = None if whole_output else TASKS[task].output
        # encoders have no cache to turn off
        parameters = inspect.signature(model.forward).parameters
        self.options = {"use_cache": False} if "use_cache" in parameters else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self.options)
        return out if self.output is None else getattr(out, self.output)


def wrap(model: torch.nn.Module, task: str | None = None, whole_output: bool = False) -> TaskModel:
    """`model` in the wrapper of `task`, by default the task of its class;
    it returns the task's tensor, or with `whole_output` the model's ModelOutput."""
    name = type(model).__name__
    if task is None:
        task = task_of(name)
    if task not in TASKS:
        raise HFModelError(
            f"{name} is not a transformers model of a task plait compiles ("
            f"{', '.join(TASKS)}); name one with hf.wrap(model, task=...), or wrap the model "
            "in a module whose forward returns tensors"
        )
    return TaskModel(model, task, whole_output)


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 16, device=None):
    """Random token ids (seeded) and an all-ones attention mask."""
    vocab = model.config.vocab_size
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    return ids.to(device), mask.to(device)


def dynamic_shapes(max_batch: int = 64, max_seq: int = 4096, batch: bool = True, seq: bool = True):
    """Dynamic batch and sequence dims for (input_ids, attention_mask)."""
    dims = {}
    if batch:
        dims[0] = Dim("batch", min=1, max=max_batch)
    if seq:
        dims[1] = Dim("seq", min=2, max=max_seq)
    return {"input_ids": dims, "attention_mask": dims}


def prepare(model, example_inputs, dynamic_shapes):
    """A transformers model given to `plait.compile` as it is: called on
    (input_ids[, attention_mask]) without a cache, returning its ModelOutput,
    as the model itself (and torch.compile's) would."""
    example_inputs = tuple(example_inputs)
    if not 1 <= len(example_inputs) <= 2:
        raise HFModelError(
            f"plait.compile calls a transformers model on (input_ids[, attention_mask]), got "
            f"{len(example_inputs)} inputs; for others, wrap the model in a module that takes "
            "them and returns tensors"
        )
    if isinstance(dynamic_shapes, dict) and "input_ids" in dynamic_shapes:
        given = len(example_inputs) == 2
        if given and "attention_mask" not in dynamic_shapes:  # the mask has the ids' dims
            dynamic_shapes = {**dynamic_shapes, "attention_mask": dynamic_shapes["input_ids"]}
        if not given:
            dynamic_shapes = {"input_ids": dynamic_shapes["input_ids"]}
    return wrap(model, whole_output=True), example_inputs, dynamic_shapes
