"""Scale of ILP sharding: Llama-3-70B shapes on `meta`, mesh tp:8, at 32 and 80 layers.

    python benchmarks/shard_solve_70b.py            # static 1x2048
    python benchmarks/shard_solve_70b.py --dynamic  # dynamic batch and sequence

For each depth prints the time to build the integer program (strategies and
their costs), to solve it, the whole shard pass (with lowering to per-rank
IR), and the whole compile (capture, import, canonicalize, cse, dce, shard,
dce). Goals (issue 4): strategies + solve <= 5 s, whole compile <= 45 s on a
2-core machine, and solve time growing <= 1.2x from 32 to 80 layers (repeated
blocks share their choices, so the program does not grow with depth).
"""

from __future__ import annotations

import argparse
import time

import torch


def run(layers: int, dynamic: bool) -> dict[str, float]:
    from llama3_70b import llama3_70b_config
    from plait.cost.comm_cost import axis_links
    from plait.frontend import hf
    from plait.frontend.capture import capture
    from plait.frontend.importer import import_program
    from plait.hardware import load
    from plait.passes.base import function_blocks
    from plait.passes.manager import PassManager
    from plait.passes.options import SizeValues
    from plait.passes.shard.ilp import formulate, optimize
    from transformers import LlamaForCausalLM

    config = llama3_70b_config(layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    times = {}
    start = time.perf_counter()
    inputs = hf.example_inputs(model, 2 if dynamic else 1, 2048)
    shapes = hf.dynamic_shapes(max_seq=8192) if dynamic else None
    module, _ = import_program(capture(hf.wrap(model), inputs, shapes))
    PassManager.parse("canonicalize,cse,dce").run(module)
    times["capture+import+cleanup"] = time.perf_counter() - start

    hw = load("h100-sxm")
    _, link = axis_links({"tp": 8}, hw)["tp"]
    values = SizeValues.parse("batch:1,seq:2048" if dynamic else "").at(module, "shard")
    blocks = list(function_blocks(module))
    t = time.perf_counter()
    problem = formulate(blocks, 8, hw, link, values)
    times["strategies"] = time.perf_counter() - t
    t = time.perf_counter()
    solution = optimize(problem, 8)
    times["solve"] = time.perf_counter() - t
    times["groups"] = len(problem.options)
    times["ops"] = len(problem.keys)
    times["status"] = solution.status

    t = time.perf_counter()
    shard = "shard{mesh=tp:8,solve=ilp" + (",values=batch:1,seq:2048}" if dynamic else "}")
    PassManager.parse(f"{shard},dce").run(module)
    times["shard pass"] = time.perf_counter() - t
    times["whole compile"] = times["capture+import+cleanup"] + times["shard pass"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dynamic", action="store_true")
    args = parser.parse_args()
    rows = {layers: run(layers, args.dynamic) for layers in (32, 80)}
    print(
        f"Llama-3-70B shapes on meta, mesh tp:8, h100-sxm costs, "
        f"{'dynamic batch/seq' if args.dynamic else 'static 1x2048'}"
    )
    keys = [
        "ops",
        "groups",
        "status",
        "capture+import+cleanup",
        "strategies",
        "solve",
        "shard pass",
        "whole compile",
    ]
    print(f"  {'':<24}" + "".join(f"{f'{n} layers':>14}" for n in rows))
    for key in keys:
        cells = [rows[n][key] for n in rows]
        text = [f"{c:>14.2f}" if isinstance(c, float) else f"{c:>14}" for c in cells]
        print(f"  {key:<24}" + "".join(text))
    a, b = (rows[n]["strategies"] + rows[n]["solve"] for n in (32, 80))
    print(f"strategies + solve: {a:.2f} s (32 layers), {b:.2f} s (80 layers); goal <= 5 s")
    growth = rows[80]["solve"] / rows[32]["solve"]
    print(
        f"solve time 32 -> 80 layers: {growth:.2f}x (goal <= 1.2x); strategies "
        f"{rows[80]['strategies'] / rows[32]['strategies']:.2f}x (a walk over the ops)"
    )
    print(f"whole compile at 80 layers: {rows[80]['whole compile']:.1f} s (goal <= 45 s)")


if __name__ == "__main__":
    main()
