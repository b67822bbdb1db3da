"""The Python modules that define the custom ops a program calls, recorded on
its module as `plait.libraries`:

    builtin.module attributes {plait.libraries = ["plait.customops.gqsa"]} { ... }

Capture records the libraries of the ops it saw; a pass that writes calls of
plait's own kernels adds theirs. Loading an artifact never imports them: they
tell a user which module to name as trusted (see runtime/artifact.py).
"""

from __future__ import annotations

from xdsl.dialects.builtin import ArrayAttr, ModuleOp, StringAttr

from .attrs import LIBRARIES_ATTR


def libraries(module: ModuleOp) -> list[str]:
    """The modules recorded on `module`, in their recorded order."""
    recorded = module.attributes.get(LIBRARIES_ATTR)
    return [a.data for a in recorded.data] if recorded is not None else []


def require_library(module: ModuleOp, *names: str) -> None:
    """Record that the program calls custom ops defined in the modules `names`."""
    if names:
        merged = sorted(set(libraries(module)) | set(names))
        module.attributes[LIBRARIES_ATTR] = ArrayAttr([StringAttr(m) for m in merged])
