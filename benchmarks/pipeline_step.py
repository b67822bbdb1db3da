"""A pipeline-parallel training step: plait's `pipeline` pass vs
`torch.distributed.pipelining`, side by side, on 2 gloo ranks.

    python benchmarks/pipeline_step.py                          # 111M Llama, GPipe and 1F1B
    python benchmarks/pipeline_step.py --small --rounds 3       # a quick check

The training benchmark's `transformers` Llama (`train_step.py`), fp32, one
thread per rank, a global batch of --rows x --seq tokens in --microbatches
micro-batches, AdamW. Both cut the model in two stages at the same layer
(half the decoder layers each; the embedding on the first, the final norm,
lm_head and the loss on the last). The baseline is PyTorch's own pipeline
runtime: each rank builds its stage module by hand (as torchtitan does),
`PipelineStage` and `ScheduleGPipe` / `Schedule1F1B` with the same
micro-batches, and `torch.optim.AdamW` on its stage's parameters. plait
compiles `canonicalize,cse,dce,pipeline{stages=2,microbatches=M,schedule=S}`
(its own cut: the dynamic program over the cost model, which on equal layers
is the same cut).

Each round steps every variant once, in turn (the order rotating), after a
barrier; reported are the median step times and the median, quartiles and
range of the per-round ratios. The first step checks every baseline's loss
against plait's.

Then the measured bubble of each plait schedule, against the textbook
fraction (S - 1) / (M + S - 1): each rank times every action of more steps;
an action's compute is the least time it took over the micro-batches (in
1F1B's steady state its input is already there), and the bubble is the
share of the step, less the optimizer update (no part of the theory), that
the rank's M forwards and backwards do not fill.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections import defaultdict

import torch
from train_step import CONFIGS, LR, build, loss_differences, make_batches, report, timed_rounds

SCHEDULES = ("gpipe", "1f1b")


class _FirstStage(torch.nn.Module):
    """Embedding and the first decoder layers of a transformers Llama."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.embed_tokens = model.model.embed_tokens
        self.layers = torch.nn.ModuleList(model.model.layers[:layers])
        self.rotary_emb = model.model.rotary_emb

    def forward(self, ids):
        hidden = self.embed_tokens(ids)
        return _decoder(self.layers, self.rotary_emb, hidden)


class _LastStage(torch.nn.Module):
    """The other decoder layers, the final norm and lm_head: logits."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(model.model.layers[layers:])
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.rotary_emb = model.model.rotary_emb

    def forward(self, hidden):
        return self.lm_head(self.norm(_decoder(self.layers, self.rotary_emb, hidden)))


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
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    half = len(model.model.layers) // world
    module = _FirstStage(model, half) if rank == 0 else _LastStage(model, half)
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    runner = kind(stage, microbatches, loss_fn=_shifted_loss)
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
        pipeline = (
            "canonicalize,cse,dce,"
            f"pipeline{{stages={world},microbatches={microbatches},schedule={schedule}}}"
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
        theory = (world - 1) / (microbatches + world - 1)
        for name in trainers:
            measured = [b[name] for b in gathered]
            shown = ", ".join(f"rank {r} {b:.1%}" for r, b in enumerate(measured))
            mean = statistics.mean(measured)
            print(
                f"{name}: measured bubble {mean:.1%} ({shown}); textbook "
                f"(S-1)/(M+S-1) = {theory:.1%}; {mean / theory - 1:+.0%} of it"
            )
    dist.destroy_process_group()


def _measured_bubble(trainer, batches, barrier) -> float:
    """This rank's idle share of its forwards and backwards over the steps
    (see the module docstring)."""
    calls = defaultdict(list)  # function -> seconds of each call
    run = trainer._run

    def timed(function, inputs):
        start = time.perf_counter()
        out = run(function, inputs)
        calls[function].append(time.perf_counter() - start)
        return out

    trainer._run = timed
    steps = []
    try:
        for batch in batches:
            barrier()
            start = time.perf_counter()
            trainer.step(*batch)
            steps.append(time.perf_counter() - start)
    finally:
        trainer._run = run
    count = len(batches)
    update = sum(t for f, ts in calls.items() if f.startswith("update") for t in ts) / count
    busy = sum(min(ts) * len(ts) / count for f, ts in calls.items() if not f.startswith("update"))
    return 1 - busy / (statistics.median(steps) - update)


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
