"""`plait compile MODEL -o DIR`: capture a model (or read IR text), run a pass
pipeline, write an artifact (or the IR, the program, MLIR)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from plait import DEFAULT_PIPELINE

from .common import (
    UsageError,
    add_ir_options,
    add_trust_option,
    causal_lm,
    check_device,
    make_console,
    pass_manager_options,
    status,
    write_output,
)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from plait.frontend.hf_tasks import TASKS

    p = sub.add_parser(
        "compile",
        parents=[common],
        help="capture a model, run passes, write an artifact",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="MODEL is path/to/file.py:factory (returning (model, example_inputs[, dynamic_shapes])),\n"
        "a Hugging Face checkpoint directory, or an IR file (.mlir, with --weights).\n"
        f"The default pipeline is {DEFAULT_PIPELINE}.\n\n"
        "A Hugging Face directory compiles the model class of its task, from config.json's\n"
        "architectures or --task; the compiled model takes (input_ids, attention_mask) and returns:\n"
        + "".join(f"  {task:<24} {t.output} ({t.auto_class})\n" for task, t in TASKS.items()),
    )
    p.add_argument("model", nargs="?", metavar="MODEL")
    p.add_argument(
        "--example",
        help="a bundled example: llama-tiny, gpt2-tiny, mixtral-tiny, qwen2-tiny, cnn-tiny",
    )
    p.add_argument(
        "-o", "--output", help="artifact directory (or file, with --emit ir|python|mlir)"
    )
    p.add_argument("--emit", choices=["artifact", "ir", "python", "mlir"], default="artifact")
    p.add_argument(
        "--mlir-dialect", choices=["linalg", "stablehlo", "tosa", "torch"], default="linalg"
    )
    p.add_argument(
        "--keep-weights", action="store_true", help="with --emit mlir: print weight data"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=2,
        help="example batch for a Hugging Face MODEL (with --generate: the most "
        "sequences generated at once)",
    )
    p.add_argument(
        "--seq", type=int, default=16, help="example sequence length for a Hugging Face MODEL"
    )
    p.add_argument("--static", action="store_true", help="compile for the example shapes only")
    p.add_argument(
        "--meta", action="store_true", help="build a Hugging Face MODEL on meta (IR only)"
    )
    p.add_argument("--weights", help="safetensors weights for an IR-file MODEL")
    p.add_argument(
        "--task",
        choices=list(TASKS),
        help="the model class of a Hugging Face MODEL (default: from config.json's architectures)",
    )
    p.add_argument(
        "--random-weights",
        dest="random_weights",
        action="store_true",
        help="compile a Hugging Face config that has no weights with random ones",
    )
    p.add_argument("--device", help="device to run on (default: the weights' device)")
    add_trust_option(p)
    group = p.add_argument_group("generation (a Hugging Face causal LM)")
    group.add_argument(
        "--generate",
        action="store_true",
        help="compile @prefill and @decode programs with a KV cache of --batch sequences",
    )
    group.add_argument(
        "--max-length",
        dest="max_length",
        type=int,
        default=256,
        help="KV cache length: prompt plus new tokens",
    )
    add_ir_options(p, f"default: {DEFAULT_PIPELINE}")
    p.set_defaults(func=run)


def run(args) -> int:
    import plait
    from plait.runtime.artifact import import_trusted

    from . import models

    console = make_console()
    pipeline = args.pipeline if args.pipeline is not None else DEFAULT_PIPELINE
    check_device(args.device)
    start = time.perf_counter()
    import_trusted(args.trusted_ops)
    if args.model is not None and args.model.endswith(".mlir"):
        if args.generate:
            raise UsageError(
                "--generate captures a Hugging Face causal LM (a checkpoint "
                "directory or --example), not IR text"
            )
        compiled = _compile_ir_file(args, pipeline, console)
    else:
        with status(console, "loading the model"):
            loaded = models.load(
                args.model,
                args.example,
                args.batch,
                args.seq,
                not args.static,
                args.meta,
                args.task,
                args.random_weights,
            )
        console.print(f"loaded {loaded.description}", markup=False)
        with status(console, f"capturing and compiling {loaded.description}"):
            if args.generate:
                compiled = plait.compile_generation(
                    causal_lm(loaded.model, "--generate"),
                    batch=args.batch,
                    max_length=args.max_length,
                    pipeline=pipeline,
                    device=args.device,
                    **pass_manager_options(args),
                )
            else:
                compiled = plait.compile(
                    loaded.model,
                    loaded.example_inputs,
                    pipeline=pipeline,
                    dynamic_shapes=loaded.dynamic_shapes,
                    device=args.device,
                    **pass_manager_options(args),
                )
    if args.time_passes:
        console.print(compiled.pass_report, markup=False, highlight=False)
    out = sys.stdout
    if args.emit == "ir":
        write_output(args.output, compiled.ir)
    elif args.emit == "python":
        write_output(args.output, compiled.code)
    elif args.emit == "mlir":
        from plait.backends.mlir import to_mlir

        with status(console, f"lowering to MLIR ({args.mlir_dialect}) with torch-mlir"):
            text = to_mlir(
                compiled.module, compiled.weights, args.mlir_dialect, not args.keep_weights
            )
        write_output(args.output, text)
    else:
        if args.output is None:
            raise UsageError("--emit artifact needs -o DIR")
        with status(console, f"saving {args.output}"):
            compiled.save(args.output)
            if args.generate and args.model is not None:
                _copy_tokenizer(Path(args.model), Path(args.output))
        ranks = f" --nproc {compiled.world_size}" if compiled.world_size > 1 else ""
        how = " --generate --prompt-ids 1,2,3" if args.generate else ""
        console.print(
            f"compiled in {time.perf_counter() - start:.1f}s -> {args.output} "
            f"(run it with: plait run {args.output}{ranks}{how})",
            highlight=False,
        )
    out.flush()
    return 0


# files of a Hugging Face tokenizer, copied next to a generation artifact
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")  # fmt: skip


def _copy_tokenizer(model_dir: Path, artifact: Path) -> None:
    import shutil

    files = [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    if files:
        (artifact / "tokenizer").mkdir(exist_ok=True)
        for file in files:
            shutil.copy(file, artifact / "tokenizer" / file.name)


def _compile_ir_file(args, pipeline: str, console):
    import plait
    from plait.ir.text import parse_module, read_ir_text
    from plait.ir.weights import WeightStore

    path = Path(args.model)
    if not path.is_file():
        raise plait.PlaitError(f"{path}: no such IR file")
    module = parse_module(read_ir_text(path), str(path))
    weights = WeightStore()
    if args.weights:
        weights.add_safetensors(args.weights)
    elif args.emit in ("artifact", "python", "mlir"):
        raise plait.PlaitError(
            f"{path} holds no weights; pass --weights FILE.safetensors (e.g. an artifact's "
            "weights.safetensors) or use --emit ir"
        )
    return plait.compile_ir(
        module,
        weights,
        pipeline=pipeline,
        device=args.device or "cpu",
        **pass_manager_options(args),
    )
