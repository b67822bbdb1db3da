"""What a checkpoint save costs training: asynchronous vs synchronous vs none.

    python benchmarks/checkpoint_save.py                     # the 111M Llama
    python benchmarks/checkpoint_save.py --small --rounds 3  # a quick check

One rank, one thread, the training benchmark's Llama and batches
(`train_step.py`). Each round runs every variant once, in turn (the order
rotating), each taking `--steps` training steps:

    steps       just the steps
    async save  `trainer.save(dir, asynchronous=True)`, then the steps while
                a thread writes the checkpoint; then `wait_saved()`
    sync save   `trainer.save(dir)`, then the steps

A save's cost is its variant's time minus the plain steps' in the same round,
as a share of one plain step (the median over rounds, with the spread). The
async save's cost counts the snapshot to host memory and the slowdown of the
steps beside the writer thread; the wait after the steps is reported apart
(zero when the write finished under the steps).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from train_step import CONFIGS, LR, build, make_batches


def _quartiles(values: list[float]) -> str:
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"IQR {q[0]:.3f}-{q[2]:.3f}, range {values[0]:.3f}-{values[-1]:.3f}"


def main() -> None:
    import plait
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="a ~7M Llama, for a quick check")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="training steps per variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = CONFIGS["small" if args.small else "default"]
    batches = make_batches(config, 4, 128, args.steps)
    trainer = plait.compile_training(build(config), batches[0], lr=LR)
    root = Path(tempfile.mkdtemp(prefix="plait-save-"))
    waits: list[float] = []

    def steps() -> None:
        for batch in batches:
            trainer.step(*batch)

    def async_save() -> None:
        trainer.save(root / "async", asynchronous=True)
        steps()
        start = time.perf_counter()
        trainer.wait_saved()
        waits.append(time.perf_counter() - start)

    def sync_save() -> None:
        trainer.save(root / "sync")
        steps()

    variants = {"steps": steps, "async save": async_save, "sync save": sync_save}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for run in variants.values():  # warm-up: first steps, first writes
            run()
        waits.clear()
        for r in range(args.rounds):
            names = list(variants)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
        state = sum(t.numel() * t.element_size() for t in trainer.saved_state().values())
    finally:
        trainer.wait_saved()
        shutil.rmtree(root, ignore_errors=True)
    step = statistics.median(times["steps"]) / args.steps
    print(
        f"Llama {sum(p.numel() for p in build(config).parameters()) / 1e6:.0f}M parameters, "
        f"checkpoint {state / 1e9:.2f} GB, {args.steps} steps a variant, {args.rounds} rounds, "
        f"one step {step:.2f} s"
    )
    for name in ("async save", "sync save"):
        costs = [
            (t - plain) / (plain / args.steps) for t, plain in zip(times[name], times["steps"])
        ]
        print(
            f"  {name:<11} costs {statistics.median(costs):6.1%} of a step "
            f"({_quartiles(costs)}; variant {statistics.median(times[name]):.2f} s)"
        )
    print(f"  async save's wait after the steps: median {statistics.median(waits):.3f} s")


if __name__ == "__main__":
    main()
