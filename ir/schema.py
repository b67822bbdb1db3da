"""Operator schemas: argument names and defaults of a target, from torch.

Used to read an argument by name whether export recorded it by position or by
keyword. torch is imported on first use, so the IR itself loads without it.
"""

from __future__ import annotations

from functools import lru_cache

from .targets import split_name

_MISSING = object()


@lru_cache(maxsize=None)
def argument_names(target: str) -> tuple[str, ...] | None:
    """Names of the target's arguments in order, or None if torch does not know it."""
    import torch

    namespace, name, overload = split_name(target)
    try:
        schema = getattr(getattr(getattr(torch.ops, namespace), name), overload)._schema
    except (AttributeError, RuntimeError):
        return None
    return tuple(a.name for a in schema.arguments)


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
