"""The structure of a model's outputs, as an artifact records it.

The manifest holds torch's pytree TreeSpec as JSON: each container's
registered type name, its context (for dicts and `transformers`
ModelOutputs, the keys) and its children. Containers torch knows (tuple,
list, dict, ...) load as they are. Any other loads only if this process
registered it, and loading an artifact must not import code it names, so
the one kind imported here is a `transformers` ModelOutput (e.g.
CausalLMOutputWithPast): a dataclass subclass of ModelOutput from a
`modeling_*` module of the installed transformers package. Any other
container comes back as a dict with the same keys (a tuple without keys).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
import warnings
from pathlib import Path

from torch.utils import _pytree as pytree

from ..ir.errors import PlaitError

_MODEL_OUTPUT_MODULE = re.compile(r"transformers(\.[A-Za-z_]\w*)*\.modeling_\w+")


def load_spec(text: str, directory: Path | None = None) -> pytree.TreeSpec:
    """The TreeSpec that `text` (treespec_dumps) records, with containers
    this process cannot rebuild replaced by dicts; `directory` is the
    artifact's, from which nothing may be imported."""
    try:
        protocol, tree = json.loads(text)
        return pytree.treespec_loads(json.dumps([protocol, _loadable(tree, directory)]))
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as exc:
        where = f"{directory}/manifest.json" if directory is not None else "the model"
        raise PlaitError(
            f"{where}: the recorded output structure does not load ({exc}); recompile it"
        ) from None


def _loadable(node: dict, directory: Path | None) -> dict:
    name = node["type"]
    children = [_loadable(child, directory) for child in node["children_spec"]]
    if name is None or name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        return {**node, "children_spec": children}
    if _import_model_output(name, directory):
        return {**node, "children_spec": children}
    keys = json.loads(node["context"]) if isinstance(node["context"], str) else None
    if not (
        isinstance(keys, list)
        and len(keys) == len(children)
        and all(isinstance(k, str) for k in keys)
    ):
        keys = None
    warnings.warn(
        f"the model's outputs were a {name}, which plait does not import from an artifact; "
        f"they come back as a {'dict with its keys' if keys else 'tuple'}",
        stacklevel=3,
    )
    if keys is None:
        return {"type": "builtins.tuple", "context": "null", "children_spec": children}
    return {"type": "builtins.dict", "context": json.dumps(keys), "children_spec": children}


def _import_model_output(name: str, directory: Path | None) -> bool:
    """Registers the pytree node of transformers' ModelOutput class `name`
    (by importing its module from the installed transformers); whether it did."""
    module, _, class_name = name.rpartition(".")
    if not _MODEL_OUTPUT_MODULE.fullmatch(module):
        return False
    try:
        found = importlib.util.find_spec("transformers")  # (imports nothing)
        origin = Path(found.origin).resolve() if found and found.origin else None
        if origin is None or (directory and origin.is_relative_to(Path(directory).resolve())):
            return False
        from transformers.utils import ModelOutput

        cls = getattr(importlib.import_module(module), class_name, None)
    except Exception:  # no transformers, or a module this version lacks
        return False
    return (
        isinstance(cls, type)
        and issubclass(cls, ModelOutput)
        and dataclasses.is_dataclass(cls)
        and pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name) is cls
    )
