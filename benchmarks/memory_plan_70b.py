"""Scale of the memory decision (shard{solve=ilp,memory} on a training step):
Llama-3-70B layer shapes, mesh dp:8, AdamW, h100-sxm costs.

    python benchmarks/memory_plan_70b.py                 # 2 and 4 layers, batch 8 x 1024
    python benchmarks/memory_plan_70b.py --layers 2 --seq 2048

A 70B training step cannot be captured on `meta` (torch's joint trace finds
a parameter without a gradient there) and 80 layers of fake tensors take
minutes to capture here, so the step is captured on fake tensors with few
layers. For each depth it prints the time to capture, to shard over dp:8,
to price each ZeRO stage (`stage_figures`: zero on a copy, the cost model's
estimate, the remat graph), the decision itself (`decide`: the peak bound
per stage and one remat integer program each) and the whole
`shard{mesh=dp:8,solve=ilp,memory=...}` pass (the decision checked by
pricing the plan applied, then applied); then the decision on
the figures scaled to 80 layers (each array and graph of the deepest capture
repeated: the remat program shares one choice per layer position, so only
the walks over nodes and ops grow; the time of that decision is all it
measures). Goal (issue 19): the decision <= 1 s for 70B shapes on dp:8.
Pricing the stages (the cost model's estimate of the whole step, four
times) grows with depth like `plait estimate` does.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _model(layers: int):
    from llama3_70b import llama3_70b_config
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaForCausalLM

    config = llama3_70b_config(layers)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        return LlamaForCausalLM(config), mode


def run(layers: int, batch: int, seq: int, memory: float) -> dict:
    from plait.cost.estimate import Target
    from plait.frontend.training import TrainingSpec, capture_training
    from plait.hardware import load
    from plait.passes.manager import PassManager
    from plait.passes.shard.memory_plan import MemoryPlanError, decide, stage_figures

    out: dict = {}
    model, mode = _model(layers)
    with mode:
        ids = torch.zeros(batch, seq, dtype=torch.long)
    start = time.perf_counter()
    spec = TrainingSpec("adamw", {}, 1, None, "fp32")
    captured = capture_training(model, (ids, torch.ones_like(ids), ids), spec, None, None)
    out["capture"] = time.perf_counter() - start
    PassManager.parse("canonicalize,cse,dce").run(captured.module)
    source = captured.module.clone()
    start = time.perf_counter()
    PassManager.parse("shard{mesh=dp:8}").run(captured.module)
    out["shard dp:8"] = time.perf_counter() - start
    target = Target(load("h100-sxm"))
    start = time.perf_counter()
    stages = [stage_figures(captured.module, s, target, 25.0) for s in range(4)]
    out["price 4 stages"] = time.perf_counter() - start
    out["nodes"] = len(stages[0].graph.nodes)
    out["decide"], out["plan"] = _decide(decide, MemoryPlanError, stages, memory)
    start = time.perf_counter()
    try:  # the whole pass: shard, price, decide, check the plan priced, apply it
        PassManager.parse(f"shard{{mesh=dp:8,solve=ilp,memory={memory:g}}}").run(source)
    except MemoryPlanError:
        pass
    out["shard, memory"] = time.perf_counter() - start
    return out, stages


def _decide(decide, error, stages, memory):
    start = time.perf_counter()
    try:
        plan, _ = decide(stages, memory)
        text = plan.choice()
    except error as exc:
        text = str(exc)[:80]
    return time.perf_counter() - start, text


def _scaled(stages, layers: int, target: int):
    """The figures of `layers` layers repeated to `target` layers: each array's
    ops and each graph's nodes (the graph's groups do not change)."""
    from dataclasses import replace

    from plait.passes.memory.remat_graph import StepGraph

    times = -(-target // layers)
    scaled = []
    for f in stages:
        g = f.graph
        graph = StepGraph(
            nodes=g.nodes * times,
            cut=g.cut,
            saved=g.saved,
            returned=g.returned,
            inputs=g.inputs,
            view_of=g.view_of,
            bytes=g.bytes,
            time=g.time,
            recomputable=g.recomputable,
            group=g.group,
        )
        scaled.append(
            replace(
                f,
                other=np.tile(f.other, times),
                saved=np.tile(f.saved, times),
                graph=graph,
            )
        )
    return scaled


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--memory", type=float, default=60e9, help="bytes per rank")
    args = parser.parse_args()
    print(
        f"Llama-3-70B layer shapes, fake tensors, dp:8, AdamW, batch {args.batch} x {args.seq}, "
        f"memory {args.memory:.3g} B per rank, h100-sxm costs"
    )
    last = None
    for layers in args.layers:
        row, stages = run(layers, args.batch, args.seq, args.memory)
        print(f"  {layers} layers:")
        for key, value in row.items():
            text = f"{value:.3f} s" if isinstance(value, float) else str(value)
            print(f"    {key:<16} {text}")
        last = (layers, stages)
    layers, stages = last
    from plait.passes.shard.memory_plan import MemoryPlanError, decide

    scaled = _scaled(stages, layers, 80)
    seconds, _ = _decide(decide, MemoryPlanError, scaled, args.memory)
    print(
        f"  80 layers (the {layers}-layer figures repeated): decide {seconds:.3f} s "
        "(its time only: repeated figures are no model of 80 layers' memory)"
    )
    print("goal: decide <= 1 s")


if __name__ == "__main__":
    main()
