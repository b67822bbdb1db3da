"""`plait train MODEL --steps N`: compile a model's training step and run it
on synthetic token batches or a safetensors file of batches, with a progress
bar, then the losses' summary and each rank's memory; --save and --resume
write and continue checkpoints (`Trainer.save`, `plait.load_training`)."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from plait import DEFAULT_PIPELINE, PlaitError

from .common import UsageError, add_trust_option, check_device, make_console, status

SYNTHETIC = (
    "Synthetic batches: step k (counting from 0, continued by --resume) trains on\n"
    "  torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed + k))\n"
    "as input ids and labels (a causal LM's loss), with an all-ones attention mask.\n"
    "--data FILE.safetensors holds an `input_ids` tensor [rows, seq]: step k reads rows\n"
    "[k * batch, (k + 1) * batch) (cycling; a last partial batch is left out). A model\n"
    "that is not a causal LM returns its loss; it trains on its example inputs, or on\n"
    "--data's tensors named by its inputs."
)

# the options a resumed run takes from its checkpoint
FROM_CHECKPOINT = ("optimizer", "weight_decay", "accumulation", "clip_grad_norm", "precision")


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from plait.frontend.hf_tasks import TASKS

    p = sub.add_parser(
        "train",
        parents=[common],
        help="compile a training step and run N steps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  plait train --example llama-tiny --steps 10 --save ckpt/\n"
        "  plait train --resume ckpt/ --steps 10 --save ckpt/\n"
        '  plait train path/to/hf_checkpoint/ --pipeline "canonicalize,cse,dce,shard{mesh=dp:2}"\n'
        "  plait train --example llama-tiny --pipeline "
        '"canonicalize,cse,dce,shard{mesh=tp:2}" --nproc 2\n\n' + SYNTHETIC,
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="as for compile (not .mlir)")
    p.add_argument("--example", help="a bundled example, e.g. llama-tiny")
    p.add_argument("--task", choices=list(TASKS), help="as for compile")
    p.add_argument(
        "--random-weights",
        dest="random_weights",
        action="store_true",
        help="train a Hugging Face config that has no weights from random ones",
    )
    p.add_argument(
        "--pipeline",
        help=f"passes to run (default {DEFAULT_PIPELINE}; add shard{{mesh=dp:2}} or "
        "shard{mesh=tp:2} for ranks: worker processes, or torchrun with --nproc)",
    )
    group = p.add_argument_group("optimizer (a resumed run keeps its checkpoint's)")
    group.add_argument("--optimizer", help="adamw (default), adam or sgd")
    group.add_argument("--lr", type=float, help="learning rate (default 1e-3, or the checkpoint's)")
    group.add_argument("--weight-decay", dest="weight_decay", type=float)
    group.add_argument(
        "--accumulation", type=int, help="micro-batches each batch is split in (default 1)"
    )
    group.add_argument("--clip-grad-norm", dest="clip_grad_norm", type=float)
    group.add_argument("--precision", help="fp32 (default) or bf16-mixed")
    group = p.add_argument_group("steps and batches")
    group.add_argument("--steps", type=int, default=10)
    group.add_argument("--batch", type=int, help="rows per step (default 4)")
    group.add_argument("--seq", type=int, help="tokens per row of a synthetic batch (default 64)")
    group.add_argument("--seed", type=int, default=0, help="of the synthetic batches")
    group.add_argument("--data", metavar="FILE", help="safetensors file of batches (see below)")
    group.add_argument("--save", metavar="DIR", help="write a checkpoint after the last step")
    group.add_argument("--resume", metavar="DIR", help="continue from a checkpoint")
    p.add_argument("--device", help="device to train on (default cpu)")
    add_trust_option(p)
    group = p.add_argument_group("several ranks (through torchrun)")
    group.add_argument("--nproc", type=int, default=1, help="ranks per node")
    group.add_argument(
        "--timeout", type=float, metavar="S", help="seconds a rank may stay silent (default 60)"
    )
    p.set_defaults(func=run)


# ---- the trainer ----------------------------------------------------------------------


def _options(args) -> dict:
    given = {k: getattr(args, k) for k in FROM_CHECKPOINT if getattr(args, k) is not None}
    if args.resume is not None:
        if given or args.model or args.example:
            what = ", ".join(f"--{k.replace('_', '-')}" for k in given) or "MODEL/--example"
            raise UsageError(
                f"--resume continues the checkpoint's model and optimizer; drop {what}"
            )
        return {}
    options = dict(
        optimizer=given.pop("optimizer", "adamw"),
        accumulation=given.pop("accumulation", 1),
        clip_grad_norm=given.pop("clip_grad_norm", None),
        precision=given.pop("precision", "fp32"),
    )
    from plait.frontend.training import TrainingSpec

    optimizer = {"weight_decay": given["weight_decay"]} if given else {}
    TrainingSpec(**options, options=optimizer)  # bad options fail before the model loads
    return {**options, **optimizer}


def _check_batch_splits(batch: int, pipeline: str, given: bool) -> None:
    """Before the capture: the batch rows must split evenly over the
    pipeline's data axes (dp, ep)."""
    from plait.passes.manager import PassManager
    from plait.passes.shard.rules import DATA_AXES

    for p in PassManager.parse(pipeline).passes:
        axes = p.mesh.as_dict() if getattr(p, "mesh", None) is not None else {}
        split = math.prod(n for axis, n in axes.items() if axis in DATA_AXES)
        if batch % split:
            what = f"--batch {batch}" if given else f"the default --batch {batch}"
            raise UsageError(
                f"{what} does not split over the mesh's data axes "
                f"({', '.join(f'{a}:{n}' for a, n in axes.items() if a in DATA_AXES)}): "
                f"give --batch a multiple of {split}"
            )


def _trainer(args, options: dict, data: dict | None, console):
    """A new trainer for MODEL (and its example inputs), or the checkpoint's
    (and None). A causal LM's example is a batch of token ids."""
    import plait
    import torch
    from plait.frontend import hf

    from . import models

    device = args.device or "cpu"
    if args.resume is not None:
        with status(console, f"loading {args.resume}"):
            return plait.load_training(
                args.resume,
                lr=args.lr,
                pipeline=args.pipeline,
                device=device,
                trusted_ops=args.trusted_ops,
            ), None
    batch, seq = _shape(args, data)
    pipeline = args.pipeline if args.pipeline is not None else DEFAULT_PIPELINE
    _check_batch_splits(batch, pipeline, given=args.batch is not None)
    with status(console, "loading the model"):
        loaded = models.load(
            args.model, args.example, batch, seq, False, False, args.task, args.random_weights
        )
    model, inputs = loaded.model, loaded.example_inputs
    if isinstance(model, hf.TaskModel):
        if model.task != "causal-lm":
            raise UsageError(
                f"plait train takes a causal LM (its loss from labels = input ids), and this "
                f"model is a {type(model.model).__name__} ({model.task})"
            )
        model = model.model
        if data is not None:  # before the capture, which takes seconds
            _check_data(args.data, data, True, [])
        ids = torch.zeros(batch, seq, dtype=torch.long)
        inputs = (ids, ids)  # (input_ids, labels): the mask is all ones
    console.print(f"loaded {loaded.description}", markup=False)
    with status(console, f"capturing the training step of {loaded.description}"):
        trainer = plait.compile_training(
            model.to(device),
            inputs,
            lr=1e-3 if args.lr is None else args.lr,
            pipeline=pipeline,
            **options,
        )
    return trainer, inputs


# ---- the batches ------------------------------------------------------------------------


def _step_function(trainer):
    """The captured @train_step (before the pipeline: one device's shapes)."""
    from plait.ir.training import TRAIN_STEP

    return next(
        op
        for op in trainer.source.ops
        if getattr(op, "sym_name", None) and op.sym_name.data == TRAIN_STEP
    )


def _vocab_size(trainer) -> int | None:
    """The rows of the embedding table the step's input ids index."""
    from plait.ir.ops import EmbeddingOp

    fn = _step_function(trainer)
    ids = fn.body.blocks.first.args[0]
    for use in ids.uses:
        if isinstance(use.operation, EmbeddingOp) and use.operation.operands[1] is ids:
            return int(use.operation.operands[0].type.shape[0])
    return None


def _is_causal_lm(trainer) -> bool:
    from plait.frontend.training import HF_INPUTS

    return tuple(trainer.input_names[:-1]) == HF_INPUTS


def _load_data(path: str) -> dict:
    from plait.ir.weights import WeightStore

    if not Path(path).is_file():
        raise PlaitError(f"--data {path}: no such file")
    store = WeightStore()
    store.add_safetensors(path)
    return {name: store.get(name) for name in store.names()}


def _check_data(path: str, tensors: dict, causal_lm: bool, names: list[str]) -> None:
    """--data holds what a step reads: input ids, or each of the model's inputs."""
    wanted = ["input_ids"] if causal_lm else names
    missing = [n for n in wanted if n not in tensors]
    if missing:
        needs = (
            "an `input_ids` tensor [rows, seq] of token ids"
            if causal_lm
            else f"one tensor per input: {', '.join(names)}"
        )
        raise PlaitError(
            f"--data {path} has no tensor '{missing[0]}' (it holds "
            f"{', '.join(tensors) or 'nothing'}); it needs {needs}"
        )
    ids = tensors.get("input_ids")
    if causal_lm and (ids.dim() != 2 or ids.dtype.is_floating_point):
        raise PlaitError(
            f"--data {path}: input_ids is {str(ids.dtype).removeprefix('torch.')} "
            f"{list(ids.shape)}; it must hold integer token ids [rows, seq]"
        )


class Batches:
    """Step k's batch: synthetic token ids, the rows of --data, or the example inputs."""

    def __init__(self, args, trainer, data: dict | None, example):
        self.causal_lm = _is_causal_lm(trainer)
        self.seed = args.seed
        self.rows, self.seq = (
            _shape(args, data) if args.resume is None else _resumed_shape(args, data, trainer)
        )
        self.example = example
        self.data = None
        if data is not None:
            _check_data(args.data, data, self.causal_lm, trainer.input_names[:-1])
            wanted = ["input_ids"] if self.causal_lm else trainer.input_names[:-1]
            self.data = {n: data[n] for n in wanted}
            rows = data[wanted[0]].shape[0]
            self.count = rows // self.rows
            if self.count == 0:
                raise PlaitError(
                    f"--data {args.data} has {rows} rows, fewer than one batch (--batch {self.rows})"
                )
        elif self.causal_lm:
            self.vocab = _vocab_size(trainer)
            if self.vocab is None:
                raise PlaitError(
                    "the step looks up its input ids in no embedding table, so plait cannot "
                    "make token ids for it; give --data FILE.safetensors"
                )
        elif example is None:
            raise PlaitError(
                "this checkpoint's model is not a causal LM: give its batches with --data"
            )

    def __call__(self, step: int) -> tuple:
        import torch

        if self.data is not None:
            start = (step % self.count) * self.rows
            parts = [t[start : start + self.rows] for t in self.data.values()]
            if not self.causal_lm:
                return tuple(parts)
            ids = parts[0].long()
        elif self.causal_lm:
            generator = torch.Generator().manual_seed(self.seed + step)
            ids = torch.randint(0, self.vocab, (self.rows, self.seq), generator=generator)
        else:
            return tuple(self.example)
        return ids, torch.ones_like(ids), ids

    def tokens(self, batch: tuple) -> int:
        return batch[0].numel() if self.causal_lm else batch[0].shape[0]


DEFAULT_BATCH, DEFAULT_SEQ = 4, 64


def _shape(args, data: dict | None) -> tuple[int, int]:
    """(rows, seq) of a new step's batch: --batch, and --data's or --seq's length."""
    if data is not None and "input_ids" in data and data["input_ids"].dim() == 2:
        return args.batch or DEFAULT_BATCH, data["input_ids"].shape[1]
    return args.batch or DEFAULT_BATCH, args.seq or DEFAULT_SEQ


def _resumed_shape(args, data: dict | None, trainer) -> tuple[int, int]:
    """A resumed step's (rows, seq): as given, else its input ids' static shape."""
    fn = _step_function(trainer)
    static = [d if isinstance(d, int) else None for d in fn.function_type.inputs.data[0].shape]
    rows, seq = _shape(args, data)
    return (
        args.batch or static[0] or rows,
        seq if data is not None or args.seq else (static[1:] or [None])[0] or seq,
    )


# ---- running ------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def run(args) -> int:
    import torch
    from plait.runtime import launch

    from .common import relaunch_on_ranks

    if args.nproc > 1 and not launch.under_launcher():
        return relaunch_on_ranks(args, [])
    console, out = make_console(), make_console(stderr=False)
    check_device(args.device)
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: train at least one step")
    if args.model is not None and args.model.endswith(".mlir"):
        raise UsageError("plait train captures a model (MODEL or --example), not IR text")
    options = _options(args)
    data = _load_data(args.data) if args.data is not None else None
    if launch.under_launcher():
        args.device = launch.join(args.device or "cpu", args.timeout)
        if torch.distributed.get_rank() != 0:
            console.quiet = out.quiet = True  # rank 0 reports for all
    trainer, example = _trainer(args, options, data, console)
    try:
        trainer.call_timeout = args.timeout  # (a sharded step run here runs on worker ranks)
        batches = Batches(args, trainer, data, example)
        times, losses = _train(args, trainer, batches, console)
        if args.save is not None:
            with status(console, f"saving {args.save}"):
                trainer.save(args.save)
            console.print(f"saved step {trainer.steps} to {args.save}", highlight=False)
        steps, memory, ranks = trainer.steps, trainer.memory(), trainer.world_size
        measured = trainer.memory(measured=True)
    finally:
        trainer.close()
    seconds = statistics.median(times)
    unit = "tokens" if batches.causal_lm else "samples"
    out.print(
        f"trained {len(losses)} steps (to step {steps}): final loss {losses[-1]:.6g}, "
        f"median step {seconds * 1e3:.1f} ms, {batches.tokens(batches(0)) / seconds:.0f} {unit}/s",
        highlight=False,
    )
    of = f" (each of {ranks})" if ranks > 1 else ""
    parts = ", ".join(f"{kind} {_size(n)}" for kind, n in memory.items())
    out.print(f"memory per rank{of}: {parts}", highlight=False)
    peaks = measured if isinstance(measured, list) else [measured]
    whose = (
        "rank 0" if launch.under_launcher() else ", ".join(f"rank {r}" for r in range(len(peaks)))
    )
    out.print(
        f"measured peak of step {steps - len(losses)} ({whose}): "
        + ", ".join(_size(p["peak"]) for p in peaks),
        highlight=False,
    )
    return 0


def _train(args, trainer, batches: Batches, console) -> tuple[list[float], list[float]]:
    """Run --steps steps; each step's time and loss. A step's loss is printed
    exactly (9 digits: a float32 read back) on a log line when stderr is no
    terminal, else shown on the progress bar."""
    from plait.training import NonFiniteLossError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    first = trainer.steps
    times, losses = [], []
    progress = Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task("train", total=args.steps, stats="")
        for i in range(args.steps):
            step = first + i
            batch = batches(step)
            trainer.measure_memory = i == 0  # the first step's allocations, by kind
            start = time.perf_counter()
            try:
                loss = trainer.step(*batch).item()
            except NonFiniteLossError:
                kept = f" ({args.save} keeps what it held)" if args.save else ""
                raise PlaitError(
                    f"step {step} (counting from 0) had a non-finite loss; training stopped "
                    f"and nothing was saved{kept}; try a smaller --lr or --clip-grad-norm"
                ) from None
            seconds = time.perf_counter() - start
            times.append(seconds)
            losses.append(loss)
            stats = (
                f"loss {loss:.9g}, {batches.tokens(batch) / seconds:.0f} "
                f"{'tokens' if batches.causal_lm else 'samples'}/s, {seconds * 1e3:.1f} ms"
            )
            progress.update(task, advance=1, stats=stats)
            if not console.is_terminal:
                console.print(f"step {i + 1}/{args.steps} (#{step}): {stats}", highlight=False)
    return times, losses
