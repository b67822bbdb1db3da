"""A compiled training step vs PyTorch's, side by side: 1 rank, dp:2, tp:2.

    python benchmarks/train_step.py                      # ~117M Llama, all sections
    python benchmarks/train_step.py --small --rounds 5   # a ~7M Llama: a quick check
    python benchmarks/train_step.py --only dp,overlap --rounds 15

A `transformers` Llama (hidden 1024, 8 layers, 16 heads, 8 kv heads, vocab
8192: 117M parameters; --small: hidden 256, 2 layers), fp32, one thread per
rank, gloo ranks on this machine. A step is forward, backward and an AdamW
update (lr 1e-3, weight decay 0.01) on a batch of `--rows` x `--seq` tokens
(the global batch: dp ranks take half each). Sections (--only):

    1       plait on one rank vs torch eager + torch.optim.AdamW vs
            torch.compile(model) (compiled forward and backward, same optimizer)
    dp      plait shard{mesh=dp:2} vs DistributedDataParallel, 2 processes
    tp      plait shard{mesh=tp:2} vs DTensor parallelize_module (q/k/v/gate/up
            colwise, o/down rowwise) + torch.optim.AdamW, 2 processes; and
            the same with torchtitan's ends (embedding split by vocabulary,
            lm_head's logits left split, cross-entropy under loss_parallel())
    overlap the share of the dp gradient all-reduce hidden behind backward:
            dp:2 (25 MB buckets) vs dp:2 with one bucket (reduced after the
            whole backward: nothing to overlap) vs the same program with no
            communication (one rank, the per-rank batch, on both processes):
            hidden = (one bucket - dp:2) / (one bucket - no communication)

Every variant starts from the same weights and takes the same batches; the
first step (warm-up) checks each baseline's loss against plait's, and the
largest difference over all steps is printed. Each round runs every variant
once, in turn (the order rotating), after a barrier; reported are the median
step time and the median, quartiles and range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import statistics
import time

import torch
from tp_forward import CONFIG as FORWARD_CONFIG  # the TP forward benchmark's 111M Llama

CONFIGS = {
    "default": FORWARD_CONFIG,
    "small": dict(
        FORWARD_CONFIG,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}
LR = 1e-3


def build(config: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).train()


def make_batches(config: dict, rows: int, seq: int, count: int) -> list[tuple]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, config["vocab_size"], (rows, seq), generator=generator)
        out.append((ids, torch.ones_like(ids), ids.clone()))
    return out


def torch_step(model, forward=None, context=contextlib.nullcontext, optimizer=None):
    """forward, backward, torch.optim.AdamW (or `optimizer`): a step function
    returning the loss; `context()` around forward and backward (DTensor's
    loss_parallel)."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    forward = model if forward is None else forward

    def step(ids, mask, labels):
        optimizer.zero_grad()
        with context():
            loss = forward(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
        optimizer.step()
        loss = loss.detach()
        return loss.full_tensor() if hasattr(loss, "full_tensor") else loss

    return step


def rows_of(batch: tuple, rank: int, world: int) -> tuple:
    return tuple(x.chunk(world)[rank] for x in batch)


def timed_rounds(variants: dict, batches: list, barrier=lambda: None):
    """Step every variant on batch 0 (warm-up), then once per round on the
    next batch, in turn, after `barrier()`. Returns times by name, losses by
    name (every step's) and the warm-up step's time by name."""
    names = list(variants)
    times = {name: [] for name in names}
    losses = {name: [] for name in names}
    warmup = {}
    for r, batch in enumerate(batches):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            barrier()
            start = time.perf_counter()
            loss = variants[name](*batch)
            elapsed = time.perf_counter() - start
            losses[name].append(float(loss))
            if r:
                times[name].append(elapsed)
            else:
                warmup[name] = elapsed
    return times, losses, warmup


def loss_differences(losses: dict, checked) -> dict[str, tuple[float, float]]:
    """name -> (relative difference of the first step's loss to the first
    variant's, largest over all steps)."""
    reference = next(iter(losses.values()))
    out = {}
    for name in checked:
        diffs = [abs(a - b) / abs(b) for a, b in zip(losses[name], reference)]
        out[name] = (diffs[0], max(diffs))
    return out


def report(title: str, times: dict, plait: str, baselines, differences: dict) -> None:
    rounds = len(times[plait])
    print(f"\n{title}: median step over {rounds} rounds")
    for name, runs in times.items():
        check = ""
        if name in differences:
            first, worst = differences[name]
            check = f"   loss vs plait: step 0 {first:.1e}, max {worst:.1e} (relative)"
        print(f"  {name:<28}{statistics.median(runs) * 1e3:>10.1f} ms{check}")
    for base in baselines:
        ratios = sorted(p / b for p, b in zip(times[plait], times[base]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(
            f"  {plait} / {base}: {statistics.median(ratios):.3f}x "
            f"(IQR {q[0]:.3f}-{q[2]:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f})"
        )


def _with_extra(variants: dict, name: str, compile_step, pipeline: str, extra: str | None):
    """With --extra: plait with those passes appended, as one more variant."""
    if extra:
        variants[f"{name} +{extra}"] = compile_step(f"{pipeline},{extra}").step
    return variants


def _report_extra(title, times, name, baselines, extra) -> None:
    if extra:
        report(f"{title} (+{extra})", times, f"{name} +{extra}", baselines, {})


def one_rank(config: dict, batches: list, extra: str | None) -> None:
    import plait

    model = build(config)
    start = time.perf_counter()
    trainer = plait.compile_training(model, batches[0], lr=LR)
    capture = time.perf_counter() - start
    eager = copy.deepcopy(model)
    compiled_model = copy.deepcopy(model)
    compile_step = functools.partial(plait.compile_training, model, batches[0], lr=LR)
    variants = {"plait": trainer.step, "eager": torch_step(eager)}
    _with_extra(variants, "plait", lambda p: compile_step(pipeline=p), DEFAULT, extra)
    del model
    variants["torch.compile"] = torch_step(compiled_model, torch.compile(compiled_model))
    times, losses, warmup = timed_rounds(variants, batches)
    first = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in warmup.items())
    print(f"plait capture {capture:.1f} s; first steps (with their compiles): {first}")
    differences = loss_differences(losses, ["eager", "torch.compile"])
    report("1 rank", times, "plait", ["eager", "torch.compile"], differences)
    _report_extra("1 rank", times, "plait", ["eager", "torch.compile"], extra)


def _rank(rank, world, port, config, batches, sections, bucket_mb, extra):
    import plait
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    if "dp" in sections:
        _dp(rank, world, config, batches, plait, dist, extra)
        gc.collect()  # (one section's models at a time)
    if "overlap" in sections:
        _overlap(rank, world, config, batches, plait, dist, bucket_mb)
        gc.collect()
    if "tp" in sections:
        _tp(rank, world, config, batches, plait, dist, extra)
    dist.destroy_process_group()


DEFAULT = "canonicalize,cse,dce"  # plait's default pipeline


def _pipeline(mesh: str) -> str:
    return f"canonicalize,cse,dce,shard{{{mesh}}},overlap,dce"


def _global_losses(losses: dict, names, dist, world: int) -> None:
    """Each rank's local mean losses -> the global batch's (equal rows per rank)."""
    for name in names:
        tensor = torch.tensor(losses[name], dtype=torch.float64)
        dist.all_reduce(tensor)
        losses[name] = (tensor / world).tolist()


def _dp(rank, world, config, batches, plait, dist, extra) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = build(config)
    compile_step = functools.partial(plait.compile_training, model, batches[0], lr=LR)
    pipeline = _pipeline(f"mesh=dp:{world}")
    trainer = compile_step(pipeline=pipeline)
    ddp = DistributedDataParallel(copy.deepcopy(model))
    ddp_step = torch_step(ddp.module, ddp)
    variants = {
        "plait dp": trainer.step,
        "DDP": lambda *batch: ddp_step(*rows_of(batch, rank, world)),
    }
    _with_extra(variants, "plait dp", lambda p: compile_step(pipeline=p), pipeline, extra)
    del model
    times, losses, _ = timed_rounds(variants, batches, dist.barrier)
    _global_losses(losses, ["DDP"], dist, world)
    if rank == 0:
        report(f"dp:{world}", times, "plait dp", ["DDP"], loss_differences(losses, ["DDP"]))
        _report_extra(f"dp:{world}", times, "plait dp", ["DDP"], extra)


def _overlap(rank, world, config, batches, plait, dist, bucket_mb) -> None:
    model = build(config)
    mesh = f"mesh=dp:{world}"
    trainers = {
        "dp": plait.compile_training(model, batches[0], lr=LR, pipeline=_pipeline(mesh)),
        "dp one bucket": plait.compile_training(
            model, batches[0], lr=LR, pipeline=_pipeline(f"{mesh},bucket_mb={bucket_mb}")
        ),
        "no communication": plait.compile_training(model, rows_of(batches[0], rank, world), lr=LR),
    }
    del model
    variants = {name: t.step for name, t in trainers.items()}
    alone = trainers["no communication"]
    variants["no communication"] = lambda *batch: alone.step(*rows_of(batch, rank, world))
    times, losses, _ = timed_rounds(variants, batches, dist.barrier)
    if rank == 0:
        report(
            f"dp:{world} overlap",
            times,
            "dp",
            ["dp one bucket", "no communication"],
            loss_differences(losses, ["dp one bucket"]),
        )
        one, dp, none = (times[n] for n in ("dp one bucket", "dp", "no communication"))
        hidden = sorted((o - d) / (o - n) for o, d, n in zip(one, dp, none))
        exposed = statistics.median(d - n for d, n in zip(dp, none)) * 1e3
        comm = statistics.median(o - n for o, n in zip(one, none)) * 1e3
        print(
            f"  all-reduce time (one bucket - no communication): {comm:.1f} ms; exposed in "
            f"dp:{world} (dp - no communication): {exposed:.1f} ms"
        )
        print(
            f"  hidden share, per round (one bucket - dp) / (one bucket - no communication): "
            f"median {statistics.median(hidden):.2f} (range {hidden[0]:.2f}-{hidden[-1]:.2f})"
        )


def _tp(rank, world, config, batches, plait, dist, extra) -> None:
    from dtensor_llama import parallelize_llama
    from torch.distributed.tensor.parallel import loss_parallel

    model = build(config)
    compile_step = functools.partial(plait.compile_training, model, batches[0], lr=LR)
    pipeline = _pipeline(f"mesh=tp:{world}")
    trainer = compile_step(pipeline=pipeline)

    dtensor = parallelize_llama(copy.deepcopy(model), world)
    vocab = parallelize_llama(copy.deepcopy(model), world, vocab=True)
    del model
    variants = {
        "plait tp": trainer.step,
        "DTensor": torch_step(dtensor),
        "DTensor loss_parallel": torch_step(vocab, context=loss_parallel),
    }
    _with_extra(variants, "plait tp", lambda p: compile_step(pipeline=p), pipeline, extra)
    times, losses, _ = timed_rounds(variants, batches, dist.barrier)
    if rank == 0:
        baselines = ["DTensor", "DTensor loss_parallel"]
        report(f"tp:{world}", times, "plait tp", baselines, loss_differences(losses, baselines))
        _report_extra(f"tp:{world}", times, "plait tp", baselines, extra)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="a ~7M Llama, for a quick check")
    parser.add_argument("--rows", type=int, default=4, help="global batch rows")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--only", default="1,dp,overlap,tp", help="sections, comma-separated")
    parser.add_argument("--bucket-mb", type=float, default=1e6, help="overlap's one bucket")
    parser.add_argument(
        "--extra", help="passes appended to plait's pipeline in one more variant (e.g. memplan)"
    )
    args = parser.parse_args()
    import torch.multiprocessing as mp
    from plait.runtime.workers import free_port

    torch.set_num_threads(1)
    config = CONFIGS["small" if args.small else "default"]
    sections = set(args.only.split(","))
    batches = make_batches(config, args.rows, args.seq, args.rounds + 1)
    params = sum(p.numel() for p in build(config).parameters())
    print(
        f"Llama {params / 1e6:.0f}M parameters, global batch {args.rows} x {args.seq}, "
        f"fp32, 1 thread per rank, {args.rounds} rounds after a warm-up step"
    )
    if "1" in sections:
        one_rank(config, batches, args.extra)
        gc.collect()
    if sections & {"dp", "tp", "overlap"}:
        spawned = (2, free_port(), config, batches, sections, args.bucket_mb, args.extra)
        mp.spawn(_rank, spawned, nprocs=2)


if __name__ == "__main__":
    main()
