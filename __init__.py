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
from .api import (
    DEFAULT_PIPELINE,
    CompiledModel,
    compile,
    compile_generation,
    compile_ir,
    load,
)
from .ir.errors import PlaitError
from .training import Trainer, compile_training, load_training

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
