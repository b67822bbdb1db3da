"""SSA value names made from module paths and weight names.

xDSL accepts a value name matching `[A-Za-z_$.-][\\w$.-]*`; module paths need
not (nn.Sequential's children are "0", "1", ...; nn.ModuleDict keys may hold
any character). Every place that names a value after a module or weight goes
through `value_name`.
"""

from __future__ import annotations

import re

_OTHER = re.compile(r"[^\w$.-]")
_START = re.compile(r"[A-Za-z_$.-]")


def value_name(path: str) -> str:
    """A valid name hint for `path`: other characters become '_', and a name
    that would start with a digit (or anything else xDSL refuses there) gets a
    'p' in front ("0.weight" -> "p0.weight")."""
    name = _OTHER.sub("_", path)
    return name if _START.match(name) else f"p{name}"
