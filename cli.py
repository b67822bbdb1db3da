"""The `plait` command line: compile, opt, run, estimate.

plait compile --example llama-tiny -o out/           # capture, run passes, save an artifact
plait compile model.py:build -o out/ --time-passes
plait compile path/to/hf_checkpoint/ -o out/ --pipeline canonicalize,cse,dce
plait compile --example llama-tiny --emit mlir --mlir-dialect stablehlo
plait opt dump.mlir --pipeline canonicalize -o clean.mlir
plait run out/                                      # run on generated inputs
plait run out/ --inputs inputs.safetensors --output outputs.safetensors
plait run out/ --repeat 10 > results.txt            # results on stdout, logs on stderr
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
import warnings
from contextlib import nullcontext
from pathlib import Path

from plait import DEFAULT_PIPELINE, PlaitError, __version__

EXAMPLES_TEXT = __doc__.split("\n\n", 1)[1]


class UsageError(PlaitError):
    """Flags that do not go together: exit code 2, as for argparse's own errors."""


def _console(stderr: bool = True):
    """stderr for logs and progress, stdout for results."""
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True, highlight=False)


def _check_device(device: str | None) -> None:
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(
            f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise PlaitError(
            f"--device {device}: CUDA is not available in this torch build ({torch.__version__})"
            if torch.version.cuda is None
            else f"--device {device}: this machine has no CUDA device that torch can see"
        )


def _status(console, text: str):
    """A spinner for a long phase, when stderr is a terminal."""
    return console.status(text) if console.is_terminal else nullcontext()


def _add_ir_options(parser: argparse.ArgumentParser, default: str) -> None:
    group = parser.add_argument_group("pass pipeline")
    group.add_argument(
        "--pipeline", default=None, help=f"passes to run, e.g. 'canonicalize,cse,dce' ({default})"
    )
    group.add_argument(
        "--print-ir-after-all", action="store_true", help="print the IR after each pass (stderr)"
    )
    group.add_argument(
        "--print-ir-before",
        action="append",
        default=[],
        metavar="PASS",
        help="print the IR before PASS",
    )
    group.add_argument(
        "--print-ir-after",
        action="append",
        default=[],
        metavar="PASS",
        help="print the IR after PASS",
    )
    group.add_argument(
        "--dump-ir",
        metavar="DIR",
        help="write the IR before the first pass and after each pass to DIR",
    )
    group.add_argument(
        "--time-passes", action="store_true", help="print each pass's time and op counts"
    )
    group.add_argument(
        "--no-verify-each", action="store_true", help="do not verify the IR after each pass"
    )


def _add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-ops", dest="trusted_ops", action="append", default=[],
                        metavar="MODULE", help="import this Python module to register the "
                        "custom ops a plan calls (repeatable); nothing else is imported")  # fmt: skip


def _pm_options(args) -> dict:
    return dict(
        verify_each=not args.no_verify_each,
        print_ir_after_all=args.print_ir_after_all,
        print_ir_before=set(args.print_ir_before),
        print_ir_after=set(args.print_ir_after),
        dump_ir=args.dump_ir,
    )


def cmd_compile(args) -> int:
    import plait
    from plait.frontend.model_spec import load_model
    from plait.runtime.artifact import import_trusted

    console = _console()
    pipeline = args.pipeline if args.pipeline is not None else DEFAULT_PIPELINE
    _check_device(args.device)
    start = time.perf_counter()
    import_trusted(args.trusted_ops)
    if args.model is not None and args.model.endswith(".mlir"):
        if args.generate:
            raise UsageError("--generate captures a Hugging Face causal LM (a checkpoint "
                             "directory or --example), not IR text")  # fmt: skip
        compiled = _compile_ir_file(args, pipeline, console)
    else:
        with _status(console, "loading the model"):
            loaded = load_model(args.model, args.example, args.batch, args.seq, not args.static,
                                args.meta, args.task, args.random_weights)  # fmt: skip
        console.print(f"loaded {loaded.description}", markup=False)
        with _status(console, f"capturing and compiling {loaded.description}"):
            if args.generate:
                compiled = plait.compile_generation(
                    _causal_lm(loaded.model, "--generate"),
                    batch=args.batch,
                    max_length=args.max_length,
                    pipeline=pipeline,
                    device=args.device,
                    **_pm_options(args),
                )
            else:
                compiled = plait.compile(
                    loaded.model,
                    loaded.example_inputs,
                    pipeline=pipeline,
                    dynamic_shapes=loaded.dynamic_shapes,
                    device=args.device,
                    **_pm_options(args),
                )
    if args.time_passes:
        console.print(compiled.pass_report, markup=False, highlight=False)
    out = sys.stdout
    if args.emit == "ir":
        _write(args.output, compiled.ir)
    elif args.emit == "python":
        _write(args.output, compiled.code)
    elif args.emit == "mlir":
        from plait.backends.mlir import to_mlir

        with _status(console, f"lowering to MLIR ({args.mlir_dialect}) with torch-mlir"):
            text = to_mlir(
                compiled.module, compiled.weights, args.mlir_dialect, not args.keep_weights
            )
        _write(args.output, text)
    else:
        if args.output is None:
            raise UsageError("--emit artifact needs -o DIR")
        with _status(console, f"saving {args.output}"):
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


def _causal_lm(model, flag: str):
    """The `transformers` causal LM inside plait's task wrapper."""
    from plait.frontend import hf

    if not isinstance(model, hf.TaskModel):
        return model
    if model.task != "causal-lm":
        raise UsageError(
            f"{flag} decodes a causal LM, and this model is a {type(model.model).__name__} "
            f"({model.task}), not a causal LM"
        )
    return model.model


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


def _prompts(args, compiled):
    """(input_ids, attention_mask, tokenizer or None) from --prompt-ids or --prompt,
    left padded to the longest."""
    import torch

    import plait

    tokenizer = None
    if args.prompt:
        directory = Path(args.artifact) / "tokenizer"
        if not directory.is_dir():
            raise plait.PlaitError(
                f"--prompt needs a tokenizer, and {args.artifact} has none (it is copied there "
                "when compiling a Hugging Face directory that has one); give --prompt-ids instead"
            )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        sequences = [tokenizer(p)["input_ids"] for p in args.prompt]
    else:
        try:
            sequences = [[int(t) for t in part.split(",") if t.strip()]
                         for part in args.prompt_ids.split(";")]  # fmt: skip
        except ValueError:
            raise plait.PlaitError(
                f"--prompt-ids '{args.prompt_ids}': write comma-separated token ids, and ';' "
                "between sequences (e.g. 1,2,3;4,5)"
            ) from None
    if not sequences or not all(sequences):
        raise plait.PlaitError("each prompt needs at least one token")
    width = max(len(x) for x in sequences)
    pad = compiled.generation.get("pad_token_id") or 0
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    return ids, mask, tokenizer


def _run_generate(args, compiled, out) -> int:
    import statistics

    if not args.prompt and not args.prompt_ids:
        raise UsageError("--generate needs --prompt-ids IDS or --prompt TEXT")
    ids, mask, tokenizer = _prompts(args, compiled)
    options = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)  # fmt: skip
    # a warm-up (prefill and one decode step) first: the timed runs are warm
    compiled.generate(ids, min(2, args.max_new_tokens), mask, **options)
    times = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        tokens = compiled.generate(ids, args.max_new_tokens, mask, **options)
        times.append(time.perf_counter() - start)
    new = tokens[:, ids.shape[1] :]
    for row in range(len(ids)):
        sequence = new[row].tolist()
        out.print(f"sequence {row}: {','.join(map(str, sequence))}")
        if tokenizer is not None:
            out.print(f"  {tokenizer.decode(sequence, skip_special_tokens=True)}", markup=False)
    seconds = statistics.median(times)
    out.print(
        f"generated {new.numel()} tokens in {seconds * 1e3:.1f} ms (median of {len(times)} "
        f"after a warm-up): {new.numel() / seconds:.1f} tokens/s"
    )
    return 0


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
        module, weights, pipeline=pipeline, device=args.device or "cpu", **_pm_options(args)
    )


def _write(path: str | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)


def cmd_opt(args) -> int:
    from plait.ir.text import decode_ir_text, parse_module, print_module, read_ir_text
    from plait.passes import registry
    from plait.passes.manager import PassManager

    if args.list_passes:
        for name in registry.names():
            cls = registry.get(name)
            print(f"{name:<16} {cls.summary}")
            hints = typing.get_type_hints(cls)
            options = ", ".join(_option_text(f, hints[f.name]) for f in dataclasses.fields(cls))
            if options:
                print(f"{'':<16} options: {options}")
        return 0
    if args.file is None:
        raise UsageError("plait opt needs an IR FILE (or - for stdin)")
    manager = PassManager.parse(args.pipeline or "", **_pm_options(args))
    text = (
        decode_ir_text(sys.stdin.buffer.read(), "<stdin>")
        if args.file == "-"
        else read_ir_text(args.file)
    )
    module = parse_module(text, "<stdin>" if args.file == "-" else args.file)
    manager.run(module)
    if args.time_passes:
        print(manager.report(), file=sys.stderr)
    _write(args.output, print_module(module))
    return 0


def _option_text(field, hint) -> str:
    """A pass option as the pipeline text spells it, with its default (`group=0`,
    `plan=(none)`) and, for a closed vocabulary, the choices (`solve=rules|ilp`)."""
    import enum

    from plait.passes.pipeline import option_text

    name, default = field.name.replace("_", "-"), field.default
    kinds = typing.get_args(hint) or (hint,)
    choices = next((k for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum)), None)
    if choices is not None:
        rest = [str(m.value) for m in choices if m is not default]
        return f"{name}={'|'.join([option_text(default), *rest])}"
    return f"{name}={option_text(default) or '(none)'}"


def _generated_inputs(compiled, dims: dict[str, int]):
    import torch

    from plait.backends.fx import torch_dtype
    from plait.ir import symbolic

    program = compiled.program
    values = {}
    for name, (lo, hi) in program.symbols.items():
        default = max(lo, min(8, hi if hi is not None else 8))
        values[name] = dims.get(name, default)
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for type_ in program.input_types:
        shape = [symbolic.evaluate(d, values) for d in type_.shape]
        dtype = torch_dtype(type_.dtype)
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:  # token ids and masks: ones are valid for both
            inputs.append(torch.ones(shape, dtype=dtype))
    return inputs


def _launcher_args(args) -> list[str]:
    out = []
    for flag in ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "rdzv_backend", "local_addr"):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"--{flag.replace('_', '-')}={value}")
    return out


def cmd_run(args) -> int:
    import statistics

    import torch

    import plait
    from plait.runtime import launch

    console, out = _console(), _console(stderr=False)
    _check_device(args.device)
    device = args.device or "cpu"
    if args.nproc > 1 and not launch.under_launcher():
        argv = [a for a in args.argv if not a.startswith("--nproc")]
        if "--nproc" in args.argv:  # the value followed the flag
            i = args.argv.index("--nproc")
            argv = args.argv[:i] + args.argv[i + 2 :]
        return launch.relaunch(argv, args.nproc, _launcher_args(args))
    rank = 0
    if launch.under_launcher():
        device = launch.join(device, args.timeout)
        rank = torch.distributed.get_rank()
    if rank != 0:
        console.quiet = out.quiet = True  # rank 0 reports for all
    with _status(console, f"loading {args.artifact}"):
        compiled = plait.load(
            args.artifact, device=device, trusted_ops=args.trusted_ops, verify=args.verify
        )
    compiled.call_timeout = args.timeout  # (a sharded plan run here runs on worker ranks)
    if args.generate:
        if args.trace:
            raise UsageError("--trace times one call of the model's program, not --generate")
        return _run_generate(args, compiled, out)
    if args.inputs:
        from plait.ir.weights import WeightStore

        store = WeightStore()
        store.add_safetensors(args.inputs)
        tensors = {name: store.get(name) for name in store.names()}
        missing = [n for n in compiled.input_names if n not in tensors]
        if missing:
            raise plait.PlaitError(
                f"{args.inputs} lacks input(s) {', '.join(missing)}; it must hold tensors named "
                f"{', '.join(compiled.input_names)}"
            )
        inputs = [tensors[n] for n in compiled.input_names]
    else:
        dims = {}
        symbols = compiled.symbols
        for item in args.dim:
            name, _, value = item.partition("=")
            if not value.isdigit():
                raise plait.PlaitError(f"--dim expects NAME=SIZE, got '{item}'")
            if name not in symbols:
                known = ", ".join(symbols) or "none (the model has static shapes)"
                raise plait.PlaitError(
                    f"--dim {item}: the model has no size symbol '{name}'; symbols: {known}"
                )
            dims[name] = int(value)
        inputs = _generated_inputs(compiled, dims)
    if args.trace and compiled.world_size > 1 and not launch.under_launcher():
        raise UsageError(
            f"--trace times each rank's program; run the {compiled.world_size} ranks of this "
            f"plan under torchrun: add --nproc {compiled.world_size}"
        )
    times = []
    with torch.inference_mode():
        compiled(*inputs)  # a warm-up: the timed runs are warm
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            outputs = compiled(*inputs)
            times.append(time.perf_counter() - start)
    flat = torch.utils._pytree.tree_leaves(outputs)  # a tuple, a dict, a ModelOutput, ...
    for name, x in zip(compiled.input_names, inputs):
        out.print(f"input  {name}: {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}")
    for i, y in enumerate(flat):
        summary = f"output {i}: {tuple(y.shape)} {str(y.dtype).removeprefix('torch.')}"
        if y.is_floating_point():
            summary += f" mean={y.float().mean().item():.6g} std={y.float().std().item():.6g}"
        out.print(summary)
    out.print(
        f"time: median {statistics.median(times) * 1e3:.3f} ms over {len(times)} run(s) "
        "after a warm-up"
    )
    if args.trace:
        _write_measured_trace(args.trace, compiled, inputs, rank, console)
    if args.output and rank == 0:
        from safetensors.torch import save_file

        save_file({f"output_{i}": y.contiguous().cpu() for i, y in enumerate(flat)}, args.output)
    return 0


def _write_measured_trace(path: str, compiled, inputs, rank: int, console) -> None:
    """One more run, timed op by op, as a Chrome trace: every rank's under torchrun."""
    import torch

    from plait.runtime.profile import op_events, write_trace

    events = op_events(compiled.program, [x.to(compiled.device) for x in inputs], rank)
    if torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size() if rank == 0 else None
        torch.distributed.gather_object(events, gathered, dst=0)
        events = [e for part in gathered or [] for e in part]
    if rank == 0:
        write_trace(path, events)
        console.print(f"wrote the measured per-op trace to {path} (open it in ui.perfetto.dev)")


def _estimate_module(args, console):
    """The IR to estimate: from an artifact, an IR file, or a captured model (on
    meta); with --decode, a causal LM's @prefill and @decode programs, so that
    its KV cache is counted."""
    from plait.frontend.capture import capture
    from plait.frontend.decoding import capture_generation
    from plait.frontend.importer import import_program
    from plait.frontend.model_spec import load_model
    from plait.ir.text import parse_module, read_ir_text

    if args.model is not None:
        path = Path(args.model)
        if (path / "manifest.json").is_file():
            return parse_module(read_ir_text(path / "plan.mlir"), str(path / "plan.mlir")), None
        if path.suffix == ".mlir":
            return parse_module(read_ir_text(path), str(path)), None
    with _status(console, "capturing the model"):
        # the sizes of the example only; the plan's symbols span the model's ranges
        loaded = load_model(args.model, args.example, max(args.batch, 2), 16, True, meta=True,
                            task=args.task)  # fmt: skip
        if args.decode:
            model = _causal_lm(loaded.model, "--decode")
            longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            context = args.context or args.seq or min(DEFAULT_SEQ, longest or DEFAULT_SEQ)
            return capture_generation(model, args.batch, context)
        return import_program(capture(loaded.model, loaded.example_inputs, loaded.dynamic_shapes))


DEFAULT_SEQ = 2048  # estimate's --seq, where the plan reaches it


def _functions(plan) -> list[str]:
    return [op.sym_name.data for op in plan.ops if getattr(op, "sym_name", None)]


def _estimate_values(args, plan, dims: dict[str, int]) -> dict[str, int]:
    """The size symbols' values, from the flags; refused outside the plan's ranges."""
    from plait.cost.estimate import check_ranges

    symbols = plan.attributes.get("plait.symbols")
    ranges = symbols.ranges if symbols is not None else {}
    # the sequence symbol: a forward's seq, a generation plan's prompt and context
    longest = next((ranges[n][1] for n in ("seq", "prompt", "context") if n in ranges), None)
    seq = args.seq if args.seq is not None else min(DEFAULT_SEQ, longest or DEFAULT_SEQ)
    given = {"batch": (args.batch, "--batch"), "seq": (seq, "--seq"), "prompt": (seq, "--seq"),
             "context": (args.context, "--context") if args.context else (seq, "--seq")}  # fmt: skip
    values = {k: v for k, (v, _) in given.items() if k in ranges}
    flags = {k: flag for k, (_, flag) in given.items()}
    values.update(dims)
    flags.update({name: "--dim" for name in dims})
    check_ranges(plan, values, flags)
    return values


def _mesh_text(plan) -> str:
    from plait.ir.attrs import MESH_ATTR

    attr = plan.attributes.get(MESH_ATTR)
    return ",".join(f"{a}:{n}" for a, n in attr.axes.items()) if attr else "none (one device)"


def cmd_estimate(args) -> int:
    from plait.cost.estimate import Target, estimate
    from plait.cost.estimate_report import render, render_compare
    from plait.hardware import load
    from plait.ir.attrs import mesh_from_text
    from plait.passes.manager import PassManager
    from plait.runtime.artifact import import_trusted

    console = _console()
    hardware = load(args.hardware)  # fail fast on an unknown name
    import_trusted(args.trusted_ops)
    mesh = mesh_from_text(args.mesh) if args.mesh else {}
    dims = {}
    for item in args.dim:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise UsageError(f"--dim expects NAME=SIZE, got '{item}'")
        dims[name] = int(value)
    pipelines = [args.pipeline if args.pipeline is not None else DEFAULT_PIPELINE]
    if args.compare is not None:
        pipelines.append(args.compare)
    managers = [PassManager.parse(p, **_pm_options(args)) for p in pipelines]
    module, weights = _estimate_module(args, console)
    results, meshes = [], []
    for manager in managers:
        plan = module.clone() if len(managers) > 1 else module
        manager.run(plan, weights)
        # a generation plan: @decode for --decode, else @prefill of a --seq prompt
        if args.decode and "decode" not in _functions(plan):
            raise PlaitError(
                f"--decode estimates a @decode program, whose KV cache it counts, and "
                f"{args.model} has only @{', @'.join(_functions(plan))}; compile it with "
                "--generate, or estimate the Hugging Face model (directory or --example) itself"
            )
        values = _estimate_values(args, plan, dims)
        context = values.get("context", args.context or values.get("seq")) if args.decode else None
        function = "decode" if args.decode else None
        results.append(estimate(plan, Target(hardware, mesh, values, context), function))
        meshes.append(_mesh_text(plan))
    mode = f"decode, context {context}" if args.decode else "prefill"
    mesh_text = meshes[0] if len(set(meshes)) == 1 else " vs ".join(meshes)
    print(f"{hardware.name}: {hardware.description}")
    print(f"mesh {mesh_text}, {mode}, " + ", ".join(f"{k}={v}" for k, v in values.items()))
    print()
    if len(results) == 1:
        print(render(results[0], args.group))
    else:
        print(
            render_compare(
                results[0], results[1], (pipelines[0] or "(none)", pipelines[1] or "(none)")
            )
        )
    if args.trace:
        from plait.cost.estimate import family
        from plait.ir.text import module_path
        from plait.runtime.profile import TraceEvent, write_trace

        events = [
            TraceEvent(f"{family(e.op)} {module_path(e.op)}".strip(), e.lane, e.start, e.duration)
            for e in results[-1].schedule.events
        ]
        write_trace(args.trace, events)
        console.print(f"wrote the simulated schedule to {args.trace} (open it in ui.perfetto.dev)")
    return 0


def cmd_calibrate(args) -> int:
    from plait.runtime.calibrate import write

    console = _console()
    path = write(args.output, progress=lambda text: console.print(f"measuring {text}"))
    console.print(f"wrote {path}; use it with: plait estimate ... --hardware {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from plait.frontend.hf import TASKS

    parser = argparse.ArgumentParser(
        prog="plait",
        description="plait: compile PyTorch models into per-rank programs. Results go to "
        "stdout; logs, progress and errors to stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + EXAMPLES_TEXT,
    )
    parser.add_argument("--version", action="version", version=f"plait {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # --debug after the command too; SUPPRESS keeps the value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=DEBUG_HELP)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    default = f"default: {DEFAULT_PIPELINE}"

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
    p.add_argument("--batch", type=int, default=2,
                   help="example batch for a Hugging Face MODEL (with --generate: the most "
                        "sequences generated at once)")  # fmt: skip
    p.add_argument(
        "--seq", type=int, default=16, help="example sequence length for a Hugging Face MODEL"
    )
    p.add_argument("--static", action="store_true", help="compile for the example shapes only")
    p.add_argument(
        "--meta", action="store_true", help="build a Hugging Face MODEL on meta (IR only)"
    )
    p.add_argument("--weights", help="safetensors weights for an IR-file MODEL")
    p.add_argument("--task", choices=list(TASKS),
                   help="the model class of a Hugging Face MODEL (default: from config.json's "
                        "architectures)")  # fmt: skip
    p.add_argument("--random-weights", dest="random_weights", action="store_true",
                   help="compile a Hugging Face config that has no weights with random ones")  # fmt: skip
    p.add_argument("--device", help="device to run on (default: the weights' device)")
    _add_trust_option(p)
    group = p.add_argument_group("generation (a Hugging Face causal LM)")
    group.add_argument("--generate", action="store_true",
                       help="compile @prefill and @decode programs with a KV cache of --batch "
                            "sequences")  # fmt: skip
    group.add_argument("--max-length", dest="max_length", type=int, default=256,
                       help="KV cache length: prompt plus new tokens")  # fmt: skip
    _add_ir_options(p, default)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("opt", parents=[common], help="run passes on IR text, like mlir-opt")
    p.add_argument("file", nargs="?", metavar="FILE", help="IR file, or - for stdin")
    p.add_argument("-o", "--output", help="output file (default stdout)")
    p.add_argument("--list-passes", action="store_true",
                   help="list the registered passes with their options and defaults")  # fmt: skip
    _add_ir_options(p, f"default: none; compile and estimate run {DEFAULT_PIPELINE}")
    p.set_defaults(func=cmd_opt)

    p = sub.add_parser("run", parents=[common], help="run an artifact on given or generated inputs")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--inputs", help="safetensors file with one tensor per input name")
    p.add_argument(
        "--dim",
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="size symbol for generated inputs, e.g. seq=32",
    )
    p.add_argument("--output", help="write outputs to this safetensors file")
    p.add_argument("--repeat", type=int, default=1,
                   help="after a warm-up run, time N runs and report the median")  # fmt: skip
    p.add_argument("--device", help="device to run on (default cpu)")
    p.add_argument("--trace", help="write a measured per-op trace (Chrome trace JSON)")
    _add_trust_option(p)
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the weights against their recorded sha256")  # fmt: skip
    group = p.add_argument_group("generation (an artifact compiled with --generate)")
    group.add_argument("--generate", action="store_true", help="decode new tokens")
    group.add_argument("--prompt-ids", dest="prompt_ids",
                       help="token ids, comma-separated; ';' between sequences")  # fmt: skip
    group.add_argument("--prompt", action="append", default=[],
                       help="prompt text (needs the artifact's tokenizer); repeatable")  # fmt: skip
    group.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32)
    group.add_argument("--do-sample", dest="do_sample", action="store_true")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--top-k", dest="top_k", type=int)
    group.add_argument("--top-p", dest="top_p", type=float)
    group.add_argument("--seed", type=int)
    group = p.add_argument_group("several ranks (through torchrun)")
    group.add_argument("--nproc", type=int, default=1, help="ranks per node")
    group.add_argument("--timeout", type=float, metavar="S",
                       help="seconds a rank may stay silent (stopped, hung) before the run "
                            "stops, naming it (default $PLAIT_TIMEOUT or 60)")  # fmt: skip
    group.add_argument("--nnodes", help="nodes, or MIN:MAX")
    group.add_argument(
        "--node-rank", dest="node_rank", help="this node's index (static rendezvous)"
    )
    group.add_argument("--rdzv-endpoint", dest="rdzv_endpoint", help="host:port of the rendezvous")
    group.add_argument("--rdzv-id", dest="rdzv_id", help="job id shared by all nodes")
    group.add_argument("--rdzv-backend", dest="rdzv_backend", help="c10d (default) or static")
    group.add_argument(
        "--local-addr", dest="local_addr", help="this node's address (multi-node c10d)"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "estimate",
        parents=[common],
        help="predict time, memory and communication on target hardware",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  plait estimate --example llama-tiny --hardware h100-sxm --batch 8 --seq 2048\n"
        '  plait estimate path/to/hf_config_dir --pipeline "canonicalize,cse,dce,shard{mesh=tp:8}" '
        "--decode --context 8192\n"
        "  plait estimate out/ --hardware cpu.toml --trace sim.json",
    )
    p.add_argument(
        "model", nargs="?", metavar="MODEL", help="model spec, artifact directory or .mlir"
    )
    p.add_argument("--example", help="a bundled example")
    p.add_argument("--task", choices=list(TASKS), help="as for compile")
    p.add_argument("--hardware", default="h100-sxm", help="hardware name or .toml file")
    p.add_argument("--mesh", help="check the plan's device mesh, e.g. tp:8 (shard with --pipeline)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int,
                   help="prompt length (prefill) or default context (default: 2048, or the "
                        "plan's largest if smaller)")  # fmt: skip
    p.add_argument(
        "--dim", action="append", default=[], metavar="NAME=SIZE", help="other size symbols"
    )
    p.add_argument("--decode", action="store_true", help="one new token per sequence")
    p.add_argument(
        "--context", type=int, help="KV positions attention reads in decode (default --seq)"
    )
    p.add_argument("--compare", metavar="PIPELINE", help="a second pipeline to put side by side")
    p.add_argument("--group", choices=["family", "module"], default="family")
    p.add_argument("--trace", help="write the simulated schedule (Chrome trace JSON)")
    _add_trust_option(p)
    _add_ir_options(p, default)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("calibrate", parents=[common],
                       help="measure this machine and write a hardware file")  # fmt: skip
    p.add_argument("-o", "--output", default="plait-cpu.toml")
    p.set_defaults(func=cmd_calibrate)
    return parser


DEBUG_HELP = "show the Python traceback of an error"


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings are messages to the user, not pointers into plait's source."""
    return f"plait: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what the ranks of `plait run --nproc` are started with
    if not args.debug:
        warnings.formatwarning = _warning_line
    try:
        return args.func(args)
    except (PlaitError, OSError) as exc:  # OSError: a file named on the command line
        if args.debug:
            raise
        print(f"plait: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except Exception as exc:  # a bug in plait (or a library) that no check caught
        if args.debug:
            raise
        from plait.runtime.launch import collective_failure

        failed = collective_failure(exc)  # a rank whose peer failed or went silent
        if failed is not None:
            print(f"plait: error: {failed}", file=sys.stderr)
            return 1
        print(f"plait: internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
              "the traceback)", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
