"""Operator schemas: argument names and defaults of a target, from torch.

Used to read an argument by name whether export recorded it by position or by
keyword. torch is imported on first use, so the IR itself loads without it.
"""

from __future__ import annotations

from functools import lru_cache

from .targets import split_name

_MISSING = object()


def find_overload(target: str):
    """The target's torch OpOverload, or None if torch does not know it (yet:
    a custom op is known once its library is imported)."""
    import torch

    namespace, name, overload = split_name(target)
    try:
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError):
        return None


@lru_cache(maxsize=None)
def argument_names(target: str) -> tuple[str, ...] | None:
    """Names of the target's arguments in order, or None if torch does not know it."""
    overload = find_overload(target)
    return None if overload is None else tuple(a.name for a in overload._schema.arguments)


@lru_cache(maxsize=None)
def tags(target: str) -> frozenset[str] | None:
    """The operator's torch tags ('nondeterministic_seeded', ...), or None if unknown."""
    overload = find_overload(target)
    return None if overload is None else frozenset(t.name for t in overload.tags)


def get_argument(target: str, args: tuple, kwargs: tuple, name: str, default=None):
    """The value of argument `name` in a call, or `default` if not given."""
    kw = dict(kwargs)
    if name in kw:
        return kw[name]
    names = argument_names(target)
    if names is not None and name in names:
        index = names.index(name)
        if index < len(args):
            return args[index]
    return default


@lru_cache(maxsize=None)
def returns_alias(target: str) -> bool:
    """Does the op return a view of an input (e.g. view, transpose, to)?"""
    overload = find_overload(target)
    return overload is not None and any(r.alias_info is not None for r in overload._schema.returns)


@lru_cache(maxsize=None)
def writes_input(target: str) -> bool | None:
    """Does the op write one of its arguments (in-place, out=)? None if torch does not know it."""
    overload = find_overload(target)
    if overload is None:
        return None
    return any(
        a.alias_info is not None and a.alias_info.is_write for a in overload._schema.arguments
    )


@lru_cache(maxsize=None)
def out_variant(target: str) -> str | None:
    """The schema name of the target's `out=` overload (same arguments plus
    `out`), or None: `aten::add.Tensor` -> `aten::add.out`."""
    import torch

    functional = find_overload(target)
    if functional is None:
        return None
    namespace, name, overload = split_name(target)
    packet = getattr(getattr(torch.ops, namespace), name)
    names = [a.name for a in functional._schema.arguments]
    for candidate in (f"{overload}_out", "out"):
        if candidate not in packet.overloads():
            continue
        schema = getattr(packet, candidate)._schema
        writes = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        rest = [a.name for a in schema.arguments if a not in writes]
        if rest == names and [a.name for a in writes] == ["out"]:
            return f"{namespace}::{name}.{candidate}"
    return None
