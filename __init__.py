"""plait: a compiler for PyTorch models.

    import plait
    compiled = plait.compile(model, example_inputs, pipeline="canonicalize,cse,dce")
    compiled(*inputs)            # run it
    compiled.ir, compiled.code   # inspect the plan and the program
    compiled.save("artifact/")   # and plait.load("artifact/") later

    generator = plait.compile_generation(hf_model, batch=1, max_length=256)
    generator.generate(input_ids, max_new_tokens=32)   # prefill + decode, KV cache

See README.md for the CLI (`plait compile`, `plait opt`, `plait run`).
"""

from ._version import __version__
from .ir.errors import PlaitError
from .passes.registry import DEFAULT_PIPELINE

# the rest imports torch, xDSL and every pass: loaded when first used, so that
# `plait --help` and a script's `except plait.PlaitError` do not wait for it
_LAZY = {
    "CompiledModel": "api",
    "compile": "api",
    "compile_generation": "api",
    "compile_ir": "api",
    "load": "api",
    "Trainer": "training",
    "compile_training": "training",
    "load_training": "training",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'plait' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CompiledModel",
    "DEFAULT_PIPELINE",
    "PlaitError",
    "Trainer",
    "compile",
    "compile_generation",
    "compile_ir",
    "compile_training",
    "load",
    "load_training",
    "__version__",
]
