"""The schema of an artifact's manifest.json, checked when it is read.

A manifest is JSON a stranger may have written: every field is checked here,
so that a malformed one is reported by name (an ArtifactError, see
`runtime.artifact`), never as a traceback from deeper in plait.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class _Leaf:
    rule: str  # what the value must be, as the error says it
    test: Callable[[object], bool]


@dataclass(frozen=True)
class _Map:
    key: _Leaf
    value: object  # a spec


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain_name(v) -> bool:
    """A file name inside the artifact: no directories, no '..'."""
    return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v


def _treespec(v) -> bool:
    """JSON of torch's pytree spec, [protocol, node], each node {type, context,
    children_spec}. Its types are not looked up here: a container this process
    has not registered loads later as a dict (runtime/outputs.py)."""

    def node(n) -> bool:
        return (
            isinstance(n, dict)
            and set(n) == {"type", "context", "children_spec"}
            and (n["type"] is None or isinstance(n["type"], str))
            and isinstance(n["children_spec"], list)
            and all(node(c) for c in n["children_spec"])
        )

    try:
        protocol, root = json.loads(v)
    except (ValueError, TypeError):
        return False
    return isinstance(protocol, int) and node(root)


def _device_type(v) -> bool:
    import torch

    try:
        return torch.device(v).index is None
    except (RuntimeError, TypeError):
        return False


TEXT = _Leaf("it must be a string", lambda v: isinstance(v, str))
FILE = _Leaf("file entries must be plain file names inside the artifact", _plain_name)
RANK = _Leaf("program keys must be rank numbers", lambda v: re.fullmatch("[0-9]+", v) is not None)
COUNT = _Leaf("it must be an integer >= 0", lambda v: _int(v) and v >= 0)
SIZE = _Leaf("it must be an integer >= 1", lambda v: _int(v) and v >= 1)
RANGE = _Leaf(
    "it must be [min, max], integers (max null when unbounded)",
    lambda v: isinstance(v, list) and len(v) == 2 and _int(v[0]) and (v[1] is None or _int(v[1])),
)
TOKEN_IDS = _Leaf(
    "it must be a token id or a list of them",
    lambda v: _int(v) or (isinstance(v, list) and all(_int(x) for x in v)),
)
TREESPEC = _Leaf(
    "it must be null or a pytree spec (torch.utils._pytree.treespec_dumps)",
    lambda v: v is None or (isinstance(v, str) and _treespec(v)),
)
DEVICE = _Leaf("it must be a device type such as 'cpu' or 'cuda'", _device_type)
DIGEST = _Leaf(
    "it must be a sha256 hex digest",
    lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
)

HASHES = "sha256"  # file -> tensor -> sha256 of its bytes in the file

# every field (format and format_version are checked first) (format and format_version are checked first)
SCHEMA = {
    "plait_version": TEXT,
    "torch_version": TEXT,
    "pipeline": TEXT,
    "mesh": {"world_size": SIZE, "axes": _Map(TEXT, SIZE)},
    "inputs": [{"name": TEXT, "type": TEXT}],
    "symbols": _Map(TEXT, RANGE),
    "outputs": {"count": COUNT, "treespec": TREESPEC},
    "device": DEVICE,
    "generation": _Map(TEXT, TOKEN_IDS),
    "plan": FILE,
    "programs": _Map(RANK, FILE),
    "weights": FILE,
    HASHES: _Map(FILE, _Map(TEXT, DIGEST)),
}


class _Malformed(Exception):
    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(spec, value, path: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            keys = ", ".join(spec)
            raise _Malformed(path, f"is {_shown(value)}, but it must be an object with keys {keys}")
        for key, inner in spec.items():
            where = f"{path}.{key}" if path else key
            if key not in value:
                raise _Malformed(where, "is missing")
            _check(inner, value[key], where)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise _Malformed(path, f"is {_shown(value)}, but it must be a list")
        for i, item in enumerate(value):
            _check(spec[0], item, f"{path}[{i}]")
    elif isinstance(spec, _Map):
        if not isinstance(value, dict):
            raise _Malformed(path, f"is {_shown(value)}, but it must be an object")
        for key, item in value.items():
            if not spec.key.test(key):
                raise _Malformed(f"{path}.{key}", f"is a bad key: {spec.key.rule}")
            _check(spec.value, item, f"{path}.{key}")
    elif not spec.test(value):
        raise _Malformed(path, f"is {_shown(value)}, but {spec.rule}")


def problem(manifest: dict) -> str | None:
    """What is wrong with the first malformed field of `manifest`
    ("field 'outputs.treespec' is ..."), or None."""
    try:
        _check(SCHEMA, manifest, "")
    except _Malformed as bad:
        return f"field '{bad.path}' {bad.problem}"
    return None
