"""ZeRO stages and rematerialization: plait's `zero` and `remat` passes vs
PyTorch's FSDP2 (`fully_shard` per decoder layer), side by side, on 2 gloo
ranks: step time and each rank's peak memory.

    python benchmarks/zero_step.py                       # 111M Llama, stages 1, 2, 3 and remat
    python benchmarks/zero_step.py --small --rounds 3    # a ~7M Llama: a quick check
    python benchmarks/zero_step.py --only 3,remat --rounds 11

The training benchmark's `transformers` Llama (`train_step.py`), fp32, one
thread per rank, a global batch of --rows x --seq tokens (each rank takes
half), AdamW. plait compiles `canonicalize,cse,dce,shard{mesh=dp:2},
zero{stage=S},overlap,dce`. The baselines, each at the same sharding:

    1       DDP + ZeroRedundancyOptimizer (PyTorch's ZeRO-1: optimizer
            state sharded, every gradient all-reduced, updated slices
            broadcast)
    2       FSDP2, reshard_after_forward=False (ZeRO-2: parameters stay
            gathered from forward to backward, gradients reduce-scattered)
    3       FSDP2, reshard_after_forward=True (ZeRO-3: parameters gathered
            again for backward)
    remat   stage 3 with activation checkpointing: FSDP2 (as 3) with
            transformers' gradient checkpointing of every decoder layer
            (torch.utils.checkpoint, non-reentrant: each layer's input is
            saved, the rest recomputed) vs plait's zero{stage=3},
            remat{budget=B}, B being the bytes the baseline's forward holds
            for backward (measured), so plait chooses what to recompute
            under the memory torch's policy reaches.

Every variant starts from the same weights and takes the same batches; the
first step checks the losses against plait's. Each round steps every
variant once, in turn (the order rotating), after a barrier; reported are
the median step time and the median, quartiles and range of the per-round
ratios. Peak memory is measured the same way for every variant, on two
more steps: the bytes of tensor storage its state holds (parameters,
gradients, optimizer state: each rank's pieces) before the second, plus
the most the process's heap grew during that step (every malloc of every
thread, counted by benchmarks/heap_peak.c, preloaded into each rank: the
collectives' own buffers, which gloo's threads allocate and free, included);
plait's own runtime measure (tensor storage its program makes) is printed
beside it.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc

import torch
from train_step import (
    CONFIGS,
    LR,
    build,
    loss_differences,
    make_batches,
    report,
    rows_of,
    timed_rounds,
    torch_step,
)

SECTIONS = ("1", "2", "3", "remat")


def plait_pipeline(world: int, stage: int, remat: int | None = None) -> str:
    remat = "" if remat is None else f",remat{{budget={remat}}}"  # (before zero: see remat)
    return f"canonicalize,cse,dce,shard{{mesh=dp:{world}}}{remat},zero{{stage={stage}}},overlap,dce"


class Heap:
    """The counters of heap_peak.c, preloaded into this process (see main)."""

    def __init__(self):
        import ctypes
        import os

        self.lib = ctypes.CDLL(os.environ["PLAIT_HEAP_PEAK"])
        self.lib.heap_current.restype = self.lib.heap_peak.restype = ctypes.c_long

    def growth(self, run) -> tuple[int, int]:
        """(the most the heap grew while `run()` ran, what it grew by at the end)."""
        self.lib.heap_reset()
        before = self.lib.heap_current()
        kept = run()
        grown = (self.lib.heap_peak() - before, self.lib.heap_current() - before)
        del kept
        return grown


def measured_peak(step, batches, state_bytes) -> int:
    """This rank's peak bytes during the second of two steps: `state_bytes()`
    (what the variant holds) before it, plus the most the heap grew during it
    (heap_peak.c: every thread's allocations, the collectives' own buffers
    included)."""
    step(*batches[0])
    held = state_bytes()
    return held + Heap().growth(lambda: step(*batches[1]))[0]


def heap_counter() -> str:
    """heap_peak.c built into a shared library, for LD_PRELOAD."""
    import subprocess
    import tempfile
    from pathlib import Path

    library = Path(tempfile.mkdtemp(prefix="plait-heap-")) / "heap_peak.so"
    source = Path(__file__).with_name("heap_peak.c")
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return str(library)


def _storage(tensor) -> torch.UntypedStorage:
    """A tensor's (a DTensor's: this rank's piece's) storage."""
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).untyped_storage()


def torch_state_bytes(model, optimizer) -> int:
    """This rank's parameters, gradients and optimizer state."""
    inner = getattr(optimizer, "optim", optimizer)  # (ZeroRedundancyOptimizer's: its rank's)
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
    storages = {s.data_ptr(): s.nbytes() for s in map(_storage, tensors)}
    return sum(storages.values())


def plait_state_bytes(trainer) -> int:
    from plait.ir.training import ACCUMULATORS, OPTIMIZER_STATE, PARAMETERS

    held = trainer.memory()
    return held[PARAMETERS] + held[OPTIMIZER_STATE] + held[ACCUMULATORS]


class TorchVariant:
    """A PyTorch training step (forward, backward, AdamW) on this rank's rows."""

    def __init__(self, model, rank, world, forward=None, optimizer=None):
        self.model, self.rank, self.world = model, rank, world
        self.optimizer = optimizer or torch.optim.AdamW(
            model.parameters(), lr=LR, weight_decay=0.01
        )
        self._step = torch_step(model, forward, optimizer=self.optimizer)

    def __call__(self, *batch):
        return self._step(*rows_of(batch, self.rank, self.world))

    def state_bytes(self) -> int:
        return torch_state_bytes(self.model, self.optimizer)

    def forward_held(self, batch) -> int:
        """Bytes the forward leaves allocated for backward (and the loss)."""
        ids, mask, labels = rows_of(batch, self.rank, self.world)
        self.optimizer.zero_grad()
        forward = functools.partial(
            self.model, input_ids=ids, attention_mask=mask, labels=labels, use_cache=False
        )
        return Heap().growth(forward)[1]


def fsdp2(model, world: int, reshard: bool, checkpointing: bool = False):
    """`fully_shard` on every decoder layer, then on the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def ddp_zero1(model):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=0.01
    )
    return ddp, optimizer


def _section(section, rank, world, config, batches, plait, dist) -> None:
    model = build(config)
    compile_step = functools.partial(plait.compile_training, model, batches[0], lr=LR)
    stage = 3 if section == "remat" else int(section)
    baseline = {
        "1": "DDP + ZeroRedundancyOptimizer",
        "2": "FSDP2 no reshard",
        "3": "FSDP2",
        "remat": "FSDP2 + checkpoint",
    }[section]
    if section == "1":
        ddp, optimizer = ddp_zero1(copy.deepcopy(model))
        torch_variant = TorchVariant(ddp.module, rank, world, ddp, optimizer)
    else:
        sharded = fsdp2(copy.deepcopy(model), world, stage == 3, section == "remat")
        torch_variant = TorchVariant(sharded, rank, world)
    budget = None
    if section == "remat":  # the bytes checkpointing's forward holds, the least over ranks
        held = torch.tensor(torch_variant.forward_held(batches[0]))
        dist.all_reduce(held, op=dist.ReduceOp.MIN)
        budget = int(held)
    trainer = compile_step(pipeline=plait_pipeline(world, stage, budget))
    del model
    name = f"plait zero{stage}" + (f" remat{{budget={budget}}}" if budget else "")
    variants = {name: trainer.step, baseline: torch_variant}
    times, losses, _ = timed_rounds(variants, batches[:-2], dist.barrier)
    local = torch.tensor(losses[baseline], dtype=torch.float64)  # (this rank's rows)
    dist.all_reduce(local)
    losses[baseline] = (local / world).tolist()

    trainer.measure_memory = True
    plait_peak = measured_peak(trainer.step, batches[-2:], lambda: plait_state_bytes(trainer))
    measured = trainer.memory(measured=True)["peak"]
    torch_peak = measured_peak(torch_variant, batches[-2:], torch_variant.state_bytes)
    plait_held, torch_held = plait_state_bytes(trainer), torch_variant.state_bytes()
    peaks = torch.tensor([plait_peak, torch_peak, measured, plait_held, torch_held])
    every = [torch.zeros_like(peaks) for _ in range(world)]
    dist.all_gather(every, peaks)
    if rank == 0:
        title = f"stage {stage}" + (" + remat" if budget else "")
        report(title, times, name, [baseline], loss_differences(losses, [baseline]))
        if budget:
            print(f"  remat budget: {budget / 1e6:.1f} MB (what {baseline}'s forward holds)")
        for r, (p, t, m, ph, th) in enumerate(t.tolist() for t in every):
            print(
                f"  rank {r} peak: plait {p / 1e6:.1f} MB (its runtime's own measure "
                f"{m / 1e6:.1f} MB), {baseline} {t / 1e6:.1f} MB: {p / t:.3f}x; "
                f"held between steps {ph / 1e6:.1f} MB vs {th / 1e6:.1f} MB"
            )


def _rank(rank, world, port, config, batches, sections):
    import plait
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    for section in SECTIONS:
        if section in sections:
            _section(section, rank, world, config, batches, plait, dist)
            gc.collect()  # (one section's models at a time)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="a ~7M Llama, for a quick check")
    parser.add_argument("--rows", type=int, default=4, help="global batch rows")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated")
    args = parser.parse_args()
    import os

    import torch.multiprocessing as mp
    from plait.runtime.workers import free_port

    torch.set_num_threads(1)
    config = CONFIGS["small" if args.small else "default"]
    batches = make_batches(config, args.rows, args.seq, args.rounds + 3)
    params = sum(p.numel() for p in build(config).parameters())
    print(
        f"Llama {params / 1e6:.0f}M parameters, global batch {args.rows} x {args.seq}, "
        f"fp32, 1 thread per rank, 2 gloo ranks, {args.rounds} rounds after a warm-up step"
    )
    sections = set(args.only.split(","))
    os.environ["PLAIT_HEAP_PEAK"] = library = heap_counter()
    os.environ["LD_PRELOAD"] = library  # (the ranks' processes start with it)
    mp.spawn(_rank, (2, free_port(), config, batches, sections), nprocs=2)


if __name__ == "__main__":
    main()
