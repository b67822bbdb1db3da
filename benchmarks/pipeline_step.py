"""A pipeline-parallel training step: plait's `pipeline` pass vs
`torch.distributed.pipelining`, side by side, on 2 gloo ranks.

    python benchmarks/pipeline_step.py                          # 111M Llama, every schedule
    python benchmarks/pipeline_step.py --small --rounds 3       # a quick check

The training benchmark's `transformers` Llama (`train_step.py`), fp32, one
thread per rank, a global batch of --rows x --seq tokens in --microbatches
micro-batches, AdamW. GPipe and 1F1B cut the model in two stages,
interleaved 1F1B in four (two a rank, stage k on rank k % 2). The baseline
is PyTorch's own pipeline runtime: each rank builds its stage modules by
hand (as torchtitan does), equal runs of decoder layers (the embedding on
the first stage, the final norm, lm_head and the loss on the last),
`PipelineStage` and `ScheduleGPipe` / `Schedule1F1B` /
`ScheduleInterleaved1F1B` with the same micro-batches, and
`torch.optim.AdamW` on its stages' parameters. plait compiles
`canonicalize,cse,dce,pipeline{stages=2,microbatches=M,schedule=S}` (with
`virtual=2` for interleaved) and makes its own cut: the dynamic program
over the cost model, which balances predicted stage times rather than
counting layers.

Each round steps every variant once, in turn (the order rotating), after a
barrier; reported are the median step times and the median, quartiles and
range of the per-round ratios. The first step checks every baseline's loss
against plait's.

Then the measured bubble of each plait schedule, against the textbook
fraction (S - 1) / (V M + S - 1) (V = 1 but for interleaved), over more
steps, two ways, each the share of the step less its optimizer update (no
part of the theory) that a rank spends idle:
- from least action times: each rank times every action; an action's
  compute is the least time it took over the micro-batches (in 1F1B's
  steady state its input is already there), and idle is what the rank's M
  forwards and backwards do not fill. Any action slower than its fastest
  (a noisy neighbour, a cold cache) counts as idle.
- less waits for messages: an action's compute is its time less the time
  it blocked in torch.distributed's point-to-point calls (a recv, an
  irecv's wait), and idle is the rest of the step: the waits, the step's
  end (its sends' waits, the loss summed over the stages) and the runtime
  between actions. This is the time a profiler shows the rank not
  computing, transfers included.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import time
from collections import defaultdict

import torch
from train_step import CONFIGS, LR, build, loss_differences, make_batches, report, timed_rounds

SCHEDULES = ("gpipe", "1f1b", "interleaved")
VIRTUAL = {"interleaved": 2}  # stages per rank


class _Stage(torch.nn.Module):
    """Decoder layers `first:last` of a transformers Llama; the first stage
    also embeds the ids, the last applies the final norm and lm_head (logits)."""

    def __init__(self, model, first: int, last: int, *, embeds: bool, heads: bool):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens if embeds else None
        self.layers = torch.nn.ModuleList(model.model.layers[first:last])
        self.rotary_emb = model.model.rotary_emb
        self.norm = model.model.norm if heads else None
        self.lm_head = model.lm_head if heads else None

    def forward(self, x):
        hidden = self.embed_tokens(x) if self.embed_tokens is not None else x
        hidden = _decoder(self.layers, self.rotary_emb, hidden)
        return self.lm_head(self.norm(hidden)) if self.lm_head is not None else hidden


def _decoder(layers, rotary, hidden):
    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
    embeddings = rotary(hidden, positions)
    for layer in layers:  # no mask: causal attention (SDPA's is_causal)
        hidden = layer(hidden, position_embeddings=embeddings, position_ids=positions)
    return hidden


def _shifted_loss(logits, labels):
    """transformers' causal-LM loss: each position predicts the next label."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    )


def _torch_pipeline(model, rank: int, world: int, schedule: str, microbatches: int):
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    count = world * VIRTUAL.get(schedule, 1)  # stage k runs on rank k % world
    ends = [k * len(model.model.layers) // count for k in range(count + 1)]
    stages = [
        PipelineStage(
            _Stage(
                model,
                ends[k],
                ends[k + 1],
                embeds=k == 0,
                heads=k == count - 1,
            ),
            k,
            count,
            torch.device("cpu"),
        )
        for k in range(rank, count, world)
    ]
    if schedule == "interleaved":
        runner = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=_shifted_loss)
    else:
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        runner = kind(stages[0], microbatches, loss_fn=_shifted_loss)
    module = torch.nn.ModuleList(stage.submod for stage in stages)
    optimizer = torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=0.01)
    last = rank == world - 1

    def step(ids, mask, labels):
        optimizer.zero_grad(set_to_none=True)
        losses = [] if last else None
        if rank == 0:
            runner.step(ids)
        else:
            runner.step(target=labels, losses=losses)
        optimizer.step()
        # the loss of the whole batch, on every rank (for the check)
        loss = torch.stack(losses).mean().detach() if last else torch.zeros(())
        torch.distributed.broadcast(loss, world - 1)
        return loss

    return step


def _rank(rank, world, port, config, batches, schedules, microbatches):
    import plait
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model = build(config)
    compile_step = functools.partial(plait.compile_training, model, batches[0], lr=LR)
    variants, baselines = {}, {}
    for schedule in schedules:
        virtual = f",virtual={VIRTUAL[schedule]}" if schedule in VIRTUAL else ""
        pipeline = (
            "canonicalize,cse,dce,pipeline{"
            f"stages={world},microbatches={microbatches},schedule={schedule}{virtual}}}"
        )
        variants[f"plait {schedule}"] = compile_step(pipeline=pipeline).step
        name = f"pipelining {schedule}"
        variants[name] = _torch_pipeline(copy.deepcopy(model), rank, world, schedule, microbatches)
        baselines[f"plait {schedule}"] = name
    del model
    times, losses, _ = timed_rounds(variants, batches, dist.barrier)
    trainers = {name: step.__self__ for name, step in variants.items() if name.startswith("plait")}
    bubbles = {name: _measured_bubble(t, batches, dist.barrier) for name, t in trainers.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, bubbles)
    if rank == 0:
        for plait_name, base in baselines.items():
            differences = loss_differences(
                {plait_name: losses[plait_name], base: losses[base]}, [base]
            )
            report(
                f"pp:{world}, {plait_name.split()[-1]}, {microbatches} micro-batches",
                {plait_name: times[plait_name], base: times[base]},
                plait_name,
                [base],
                differences,
            )
        for name in trainers:
            # Megatron's interleaved bubble: (S - 1) / (V M + S - 1)
            chunks = microbatches * VIRTUAL.get(name.split()[-1], 1)
            theory = (world - 1) / (chunks + world - 1)
            print(f"{name}: textbook bubble (S-1)/(VM+S-1) = {theory:.1%}; measured")
            for way, label in enumerate(("from least action times", "less waits for messages")):
                measured = [b[name][way] for b in gathered]
                shown = ", ".join(f"rank {r} {b:.1%}" for r, b in enumerate(measured))
                mean = statistics.mean(measured)
                print(f"  {label}: {mean:.1%} ({shown}), {mean / theory - 1:+.0%} of it")
    dist.destroy_process_group()


class _TimedWork:
    """A point-to-point request whose wait adds to `idle` the time it blocked."""

    def __init__(self, work, idle: list[float]):
        self.work, self.idle = work, idle

    def wait(self, *args):
        start = time.perf_counter()
        try:
            return self.work.wait(*args)
        finally:
            self.idle[0] += time.perf_counter() - start


@contextlib.contextmanager
def _waits_timed(idle: list[float]):
    """torch.distributed's point-to-point calls (which plait's programs and
    runtime look up when they run) timed where they block: a blocking recv
    whole, an isend's or irecv's wait."""
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in ("isend", "irecv", "recv")}

    def blocking(*args, **kwargs):
        start = time.perf_counter()
        try:
            return originals["recv"](*args, **kwargs)
        finally:
            idle[0] += time.perf_counter() - start

    dist.isend = lambda *a, **k: _TimedWork(originals["isend"](*a, **k), idle)
    dist.irecv = lambda *a, **k: _TimedWork(originals["irecv"](*a, **k), idle)
    dist.recv = blocking
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def _measured_bubble(trainer, batches, barrier) -> tuple[float, float]:
    """This rank's idle share of its forwards and backwards over the steps,
    measured two ways (see the module docstring): from each action's least
    time, and from its time less the time it waited for messages."""
    calls = defaultdict(list)  # function -> seconds of each call
    computed = defaultdict(float)  # function -> seconds it did not wait, over the steps
    idle = [0.0]  # seconds blocked in point-to-point calls
    run = trainer._run

    def timed(function, inputs):
        start, waited = time.perf_counter(), idle[0]
        out = run(function, inputs)
        took = time.perf_counter() - start
        calls[function].append(took)
        computed[function] += took - (idle[0] - waited)
        return out

    trainer._run = timed
    steps = []
    try:
        with _waits_timed(idle):
            for batch in batches:
                barrier()
                start = time.perf_counter()
                trainer.step(*batch)
                steps.append(time.perf_counter() - start)
    finally:
        trainer._run = run
    count = len(batches)
    update = sum(t for f, ts in calls.items() if f.startswith("update") for t in ts) / count
    scheduled = statistics.median(steps) - update
    least = sum(min(ts) * len(ts) for f, ts in calls.items() if not f.startswith("update"))
    busy = sum(t for f, t in computed.items() if not f.startswith("update"))
    return 1 - least / count / scheduled, 1 - busy / count / scheduled


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="a ~7M Llama, for a quick check")
    parser.add_argument("--rows", type=int, default=8, help="global batch rows")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument(
        "--vocab",
        type=int,
        help="vocabulary size (a small one makes the stages balanced: the embedding "
        "and lm_head, on the first and last stage, then cost little)",
    )
    args = parser.parse_args()
    import torch.multiprocessing as mp
    from plait.runtime.workers import free_port

    config = CONFIGS["small" if args.small else "default"]
    if args.vocab:
        config = dict(config, vocab_size=args.vocab)
    batches = make_batches(config, args.rows, args.seq, args.rounds + 1)
    params = sum(p.numel() for p in build(config).parameters())
    print(
        f"Llama {params / 1e6:.0f}M parameters, global batch {args.rows} x {args.seq} in "
        f"{args.microbatches} micro-batches, fp32, 1 thread per rank, {args.rounds} rounds"
    )
    schedules = args.schedules.split(",")
    spawned = (2, free_port(), config, batches, schedules, args.microbatches)
    mp.spawn(_rank, spawned, nprocs=2)


if __name__ == "__main__":
    main()
