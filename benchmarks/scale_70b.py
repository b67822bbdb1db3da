"""Scale: capture + import + canonicalize + verify of Llama-3-70B shapes on `meta`.

    python benchmarks/scale_70b.py            # static shapes (batch 1, seq 2048)
    python benchmarks/scale_70b.py --dynamic  # dynamic batch and sequence (example 2x2048)

Prints the wall time of each phase and the process's peak RSS. Goal (issue 2):
<= 30 s wall and <= 2 GB peak RSS on a 2-core machine. Run it in a fresh
process: peak RSS is per process.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dynamic", action="store_true")
    parser.add_argument("--layers", type=int, default=80)
    args = parser.parse_args()

    from llama3_70b import llama3_70b_config
    from plait.frontend import hf
    from plait.frontend.capture import capture
    from plait.frontend.importer import import_program
    from plait.ir.text import verify_module
    from plait.passes.manager import PassManager, count_ops
    from transformers import LlamaForCausalLM

    config = llama3_70b_config(args.layers)
    phases = {}
    start = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    phases["build on meta"] = time.perf_counter() - start

    t = time.perf_counter()
    inputs = hf.example_inputs(model, 2 if args.dynamic else 1, 2048)  # size 1 would specialize
    shapes = hf.dynamic_shapes(max_seq=8192) if args.dynamic else None
    captured = capture(hf.wrap(model), inputs, shapes)
    phases["capture (torch.export)"] = time.perf_counter() - t

    t = time.perf_counter()
    module, _ = import_program(captured)
    phases["import"] = time.perf_counter() - t
    ops_imported = count_ops(module)

    t = time.perf_counter()
    PassManager.parse("canonicalize", verify_each=False).run(module)
    phases["canonicalize"] = time.perf_counter() - t

    t = time.perf_counter()
    verify_module(module)
    phases["verify"] = time.perf_counter() - t
    total = time.perf_counter() - start - phases["build on meta"]

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    shape = "dynamic batch/seq" if args.dynamic else "static 1x2048"
    print(f"Llama-3-70B shapes ({params / 1e9:.1f}B params, {args.layers} layers, {shape}) on meta")
    for name, seconds in phases.items():
        print(f"  {name:<24} {seconds:7.2f} s")
    print(f"  ops: {ops_imported} imported, {count_ops(module)} after canonicalize")
    print(f"capture+import+canonicalize+verify: {total:.1f} s wall (goal <= 30 s)")
    print(f"peak RSS: {peak_gb:.2f} GB (goal <= 2 GB)")


if __name__ == "__main__":
    main()
