"""Does `parallelize` choose the mesh that is fastest when run? Every mesh of
2 gloo ranks (dp:2, tp:2, pp:2 with each schedule it prices) priced by the
cost model, then each run, side by side, on the same training step.

    plait calibrate -o here.toml                      # this machine, now
    python benchmarks/mesh_choice.py --hardware here.toml   # the 111M Llama
    python benchmarks/mesh_choice.py --small --rounds 3

The training benchmark's `transformers` Llama (`train_step.py`), fp32, one
thread per rank, a global batch of --rows x --seq tokens in --microbatches
micro-batches, AdamW. `parallelize{devices=2,microbatches=M,hardware=H}`
prices each mesh and schedule (`Parallelize.price_meshes`) and names its
choice; then each is compiled as parallelize would apply it
(`shard{mesh=dp:2}`, `shard{mesh=tp:2}`, `pipeline{stages=2,microbatches=M,
schedule=S,virtual=V}`, all captured for M micro-batches), and all run in
interleaved rounds (`timed_rounds`: every variant once a round, the order
rotating). Reported: each one's predicted and measured median step, and
whether the choice is the measured fastest. Price with a file `plait
calibrate` wrote on the machine it runs on: the shipped `cpu` file is
another day's VM, whose gloo latency was a third of some others'.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from train_step import CONFIGS, LR, build, loss_differences, make_batches, timed_rounds


def _rank(rank, world, port, config, batches, microbatches, predicted, pipelines, chosen):
    import plait
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model = build(config)
    compile_step = functools.partial(
        plait.compile_training, model, batches[0], lr=LR, accumulation=microbatches
    )
    meshes = list(predicted)
    variants = {mesh: compile_step(pipeline=pipelines[mesh]).step for mesh in meshes}
    del model
    times, losses, _ = timed_rounds(variants, batches, dist.barrier)
    if rank == 0:
        differences = loss_differences(losses, meshes[1:])
        measured = {mesh: statistics.median(runs) for mesh, runs in times.items()}
        print(f"\nmedian step over {len(times[meshes[0]])} rounds, predicted and measured:")
        for mesh in sorted(meshes, key=measured.get):
            worst = differences.get(mesh, (0.0, 0.0))[1]
            print(
                f"  {mesh:<30} predicted {predicted[mesh] * 1e3:9.1f} ms, measured "
                f"{measured[mesh] * 1e3:9.1f} ms (x{measured[mesh] / predicted[mesh]:.2f}); "
                f"loss vs {meshes[0]}: max {worst:.1e}"
            )
        fastest = min(measured, key=measured.get)
        print(f"parallelize chose {chosen}; measured fastest {fastest}")
    dist.destroy_process_group()


def _pipeline(c, microbatches: int) -> str:
    """The passes parallelize applies for candidate `c` without a memory budget."""
    if c.pp > 1:
        chunks = f",virtual={c.virtual}" if c.virtual > 1 else ""
        return (
            f"canonicalize,cse,dce,pipeline{{stages={c.pp},microbatches={microbatches},"
            f"schedule={c.schedule}{chunks}}}"
        )
    return f"canonicalize,cse,dce,shard{{mesh={c.mesh}}}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="a ~7M Llama, for a quick check")
    parser.add_argument("--rows", type=int, default=8, help="global batch rows")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--hardware",
        default="cpu",
        help="what to price with: a shipped name, or a file from `plait calibrate` on this machine",
    )
    args = parser.parse_args()
    import plait
    import torch.multiprocessing as mp
    from plait.passes.shard.parallelize import Parallelize
    from plait.runtime.workers import free_port

    config = CONFIGS["small" if args.small else "default"]
    batches = make_batches(config, args.rows, args.seq, args.rounds + 1)
    model = build(config)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"Llama {params / 1e6:.0f}M parameters, global batch {args.rows} x {args.seq} in "
        f"{args.microbatches} micro-batches, fp32, 1 thread per rank, {args.rounds} rounds"
    )
    captured = plait.compile_training(
        model, batches[0], lr=LR, accumulation=args.microbatches, pipeline="canonicalize,cse,dce"
    )
    choice = Parallelize(devices=2, microbatches=args.microbatches, hardware=args.hardware)
    priced = [c for c in choice.price_meshes(captured.module) if c.priced]
    chosen = choice.choose(priced)
    print(f"predicted (cost model, hardware {args.hardware}):")
    for c in priced:
        print(f"  {c.label:<30} {c.seconds * 1e3:9.1f} ms, peak {c.peak / 2**20:.1f} MiB per rank")
    print(f"parallelize chooses {chosen.label}")
    del model, captured
    predicted = {c.label: c.seconds for c in priced}
    pipelines = {c.label: _pipeline(c, args.microbatches) for c in priced}
    spawned = (
        2,
        free_port(),
        config,
        batches,
        args.microbatches,
        predicted,
        pipelines,
        chosen.label,
    )
    mp.spawn(_rank, spawned, nprocs=2)


if __name__ == "__main__":
    main()
