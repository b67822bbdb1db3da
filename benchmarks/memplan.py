"""Memory planning: arena size against the lower bound, planning time, and
peak activation memory against PyTorch's own for the same forward.

    python benchmarks/memplan.py              # test models, their TP=2 ranks, Llama-3-70B shapes
    python benchmarks/memplan.py --no-70b     # skip the 70B capture (about 20 s)

Prints, per graph: buffers planned, lower bound (most bytes alive at once),
arena, their ratio and the winning method, and planning time; then the time
to plan a trace of 10,000+ buffers (the 70B graph's buffers, four forwards
back to back); then, for the test models at their example shapes, peak live
activation bytes of eager PyTorch and of the planned program, both measured
by the same tracking allocator (a dispatch mode that counts each storage
from its first output until its last tensor dies; the arena counts in full).
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PeakTracker(TorchDispatchMode):
    """Live bytes of storages that ops create, and their peak."""

    def __init__(self, ignore: frozenset[int] = frozenset()):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, int] = {}  # storage key -> tensors alive on it
        self.ignore = ignore  # storages counted elsewhere (the arena)

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key in self.ignore:
                    continue
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


def peak_bytes(fn, *inputs, ignore: frozenset[int] = frozenset()) -> int:
    with torch.inference_mode(), PeakTracker(ignore) as tracker:
        fn(*inputs)
    return tracker.peak


def graphs(include_70b: bool):
    """(label, func op, symbol values) of the graphs to plan."""
    import plait
    from plait.examples.models import EXAMPLES

    for name, build in EXAMPLES.items():
        model, inputs, shapes = build()
        for pipeline, label in (
            ("canonicalize,cse,dce", name),
            ("canonicalize,cse,dce,shard{mesh=tp:2},overlap", f"{name} TP=2 rank"),
        ):
            if name == "cnn-tiny" and "shard" in pipeline:
                continue
            compiled = plait.compile(model, inputs, dynamic_shapes=shapes, pipeline=pipeline)
            values = {n: high or 64 for n, (_, high) in compiled.symbols.items()}
            yield label, compiled.function, values
    if include_70b:
        yield from llama_70b()


def llama_70b():
    from llama3_70b import llama3_70b_config
    from plait.frontend import hf
    from plait.frontend.capture import capture
    from plait.frontend.importer import import_program
    from plait.passes.manager import PassManager
    from transformers import LlamaForCausalLM
    from xdsl.dialects import func

    config = llama3_70b_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    module, _ = import_program(capture(hf.wrap(model), hf.example_inputs(model, 1, 2048)))
    PassManager.parse("canonicalize,cse,dce", verify_each=False).run(module)
    yield "Llama-3-70B 1x2048", next(o for o in module.ops if isinstance(o, func.FuncOp)), {}
    PassManager.parse("shard{mesh=tp:8},overlap", verify_each=False).run(module)
    yield (
        "Llama-3-70B 1x2048 TP=8 rank",
        next(o for o in module.ops if isinstance(o, func.FuncOp)),
        {},
    )


def main() -> None:
    from plait.passes.memory.arena import plan_arena
    from plait.passes.memory.liveness import Buffer, liveness, value_sizes
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-70b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = Table(title="arena plans (sizes at the symbols' upper bounds)")
    for column in ("graph", "buffers", "lower bound", "arena", "ratio", "method", "plan s"):
        table.add_column(column, justify="left" if column in ("graph", "method") else "right")
    ratios, largest = [], []
    for label, fn, values in graphs(not args.no_70b):
        buffers = liveness(fn, value_sizes(fn, values)).buffers
        start = time.perf_counter()
        plan = plan_arena(buffers)
        seconds = time.perf_counter() - start
        ratios.append(plan.ratio)
        if len(buffers) > len(largest):
            largest = buffers
        table.add_row(
            label,
            str(len(buffers)),
            f"{plan.lower_bound / 2**20:.2f} MiB",
            f"{plan.size / 2**20:.2f} MiB",
            f"{plan.ratio:.4f}",
            plan.method,
            f"{seconds:.3f}",
        )
    console = Console(width=150)
    console.print(table)
    print(
        f"ratio arena / lower bound: mean {statistics.mean(ratios):.4f}, worst {max(ratios):.4f} "
        f"over {len(ratios)} graphs (goal <= 1.01 mean, <= 1.035 worst)"
    )

    copies = -(-10_000 // max(1, len(largest)))
    horizon = max(b.end for b in largest) + 1
    trace = [
        Buffer(b.value, b.size, b.start + k * horizon, b.end + k * horizon)
        for k in range(copies)
        for b in largest
    ]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        plan = plan_arena(trace)
        times.append(time.perf_counter() - start)
    print(
        f"planning {len(trace)} buffers ({copies} forwards of the largest graph back to back): "
        f"median {statistics.median(times):.3f} s (goal <= 1 s), ratio {plan.ratio:.4f}"
    )

    import plait
    from plait.examples.models import EXAMPLES

    peaks = Table(
        title="peak live activation bytes, same tracking allocator (LMs 8x128, CNN 32x64x64)"
    )
    for column in ("model", "eager PyTorch", "plait, arena planned", "plait / eager"):
        peaks.add_column(column, justify="left" if column == "model" else "right")
    for name, build in EXAMPLES.items():
        model, inputs, shapes = build(8, 128) if name != "cnn-tiny" else build(32, 64)
        compiled = plait.compile(model, inputs, pipeline="canonicalize,cse,dce,memplan")
        arenas = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for k, t in vars(compiled.program.graph_module).items()
            if k.startswith("arena_")
        }
        eager = peak_bytes(model, *inputs)
        planned = peak_bytes(compiled, *inputs, ignore=frozenset(arenas)) + sum(arenas.values())
        peaks.add_row(
            name, f"{eager / 2**20:.2f} MiB", f"{planned / 2**20:.2f} MiB", f"{planned / eager:.3f}"
        )
    console.print(peaks)


if __name__ == "__main__":
    main()
