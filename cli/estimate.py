"""`plait estimate MODEL --hardware H`: predict a plan's time, memory and
communication with the cost model."""

from __future__ import annotations

import argparse
from pathlib import Path

from plait import DEFAULT_PIPELINE, PlaitError

from .common import (
    UsageError,
    add_ir_options,
    add_trust_option,
    causal_lm,
    make_console,
    pass_manager_options,
    status,
)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from plait.frontend.hf_tasks import TASKS

    p = sub.add_parser(
        "estimate",
        parents=[common],
        help="predict time, memory and communication on target hardware",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  plait estimate --example llama-tiny --hardware h100-sxm --batch 8 --seq 2048\n"
        '  plait estimate path/to/hf_config_dir --pipeline "canonicalize,cse,dce,shard{mesh=tp:8}" '
        "--decode --context 8192\n"
        "  plait estimate out/ --hardware cpu.toml --trace sim.json\n"
        "  plait estimate ckpt/          # a training checkpoint (plait train --save): its step\n"
        "                                # on its pipeline's mesh, memory at the peak by kind",
    )
    p.add_argument(
        "model", nargs="?", metavar="MODEL", help="model spec, artifact directory or .mlir"
    )
    p.add_argument("--example", help="a bundled example")
    p.add_argument("--task", choices=list(TASKS), help="as for compile")
    p.add_argument("--hardware", default="h100-sxm", help="hardware name or .toml file")
    p.add_argument("--mesh", help="check the plan's device mesh, e.g. tp:8 (shard with --pipeline)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--seq",
        type=int,
        help="prompt length (prefill) or default context (default: 2048, or the "
        "plan's largest if smaller)",
    )
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
    add_trust_option(p)
    add_ir_options(p, f"default: {DEFAULT_PIPELINE}")
    p.set_defaults(func=run)


def _estimate_module(args, console, groups: int = 1):
    """The IR to estimate: from an artifact, an IR file, or a captured model (on
    meta); with --decode, a causal LM's @prefill and @decode programs, so that
    its KV cache is counted (for batch / `groups` sequences: a pipeline's
    groups, as plait.compile_generation captures them)."""
    from plait.frontend.capture import capture
    from plait.frontend.decoding import capture_generation
    from plait.frontend.importer import import_program
    from plait.ir.text import parse_module, read_ir_text

    from . import models

    if args.model is not None:
        path = Path(args.model)
        if (path / "manifest.json").is_file():
            return parse_module(read_ir_text(path / "plan.mlir"), str(path / "plan.mlir")), None
        if path.suffix == ".mlir":
            return parse_module(read_ir_text(path), str(path)), None
    with status(console, "capturing the model"):
        # the sizes of the example only; the plan's symbols span the model's ranges
        loaded = models.load(
            args.model, args.example, max(args.batch, 2), 16, True, meta=True, task=args.task
        )
        if args.decode:
            model = causal_lm(loaded.model, "--decode")
            longest = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            context = args.context or args.seq or min(DEFAULT_SEQ, longest or DEFAULT_SEQ)
            if args.batch % groups:
                raise UsageError(
                    f"pipeline{{microbatches={groups}}} runs groups of batch / {groups} "
                    f"sequences, but --batch is {args.batch}; give a batch that {groups} divides"
                )
            return capture_generation(model, args.batch // groups, context)
        return import_program(capture(loaded.model, loaded.example_inputs, loaded.dynamic_shapes))


DEFAULT_SEQ = 2048  # estimate's --seq, where the plan reaches it


def _default_pipeline(args) -> str:
    """A training checkpoint holds its step as captured: estimate it on the
    pipeline it was trained with; anything else on the default pipeline."""
    import json

    from plait.training import TRAINING

    manifest = Path(args.model or "") / "manifest.json"
    try:
        fields = json.loads(manifest.read_text()) if args.model is not None else {}
    except (OSError, ValueError):  # no manifest, or one that reading the plan reports
        return DEFAULT_PIPELINE
    if isinstance(fields.get(TRAINING), dict) and isinstance(fields.get("pipeline"), str):
        return fields["pipeline"]
    return DEFAULT_PIPELINE


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
    given = {
        "batch": (args.batch, "--batch"),
        "seq": (seq, "--seq"),
        "prompt": (seq, "--seq"),
        "context": (args.context, "--context") if args.context else (seq, "--seq"),
    }
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


def run(args) -> int:
    from plait.cost.estimate import Target, estimate
    from plait.cost.estimate_report import render, render_compare
    from plait.hardware import load
    from plait.ir.attrs import mesh_from_text
    from plait.ir.training import TRAIN_STEP
    from plait.passes.manager import PassManager
    from plait.runtime.artifact import import_trusted

    console = make_console()
    hardware = load(args.hardware)  # fail fast on an unknown name
    import_trusted(args.trusted_ops)
    mesh = mesh_from_text(args.mesh) if args.mesh else {}
    dims = {}
    for item in args.dim:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise UsageError(f"--dim expects NAME=SIZE, got '{item}'")
        dims[name] = int(value)
    pipelines = [args.pipeline if args.pipeline is not None else _default_pipeline(args)]
    if args.compare is not None:
        pipelines.append(args.compare)
    managers = [PassManager.parse(p, **pass_manager_options(args)) for p in pipelines]
    stages = [p for p in managers[0].passes if p.name == "pipeline"]
    groups = stages[0].microbatches if stages and args.decode else 1
    module, weights = _estimate_module(args, console, groups)
    results, meshes = [], []
    for manager in managers:
        plan = module.clone() if len(managers) > 1 else module
        manager.run(plan, weights)
        # a generation plan: @decode for --decode (its first stage's, cut into
        # pipeline stages), else @prefill of a --seq prompt
        function = None
        if args.decode:
            function = next((f for f in ("decode", "decode_stage0") if f in _functions(plan)), None)
        if args.decode and function is None:
            raise PlaitError(
                f"--decode estimates a @decode program, whose KV cache it counts, and "
                f"{args.model or args.example} has only @{', @'.join(_functions(plan))}; compile "
                "it with --generate, or estimate the Hugging Face model (directory or --example) "
                "itself"
            )
        values = _estimate_values(args, plan, dims)
        context = values.get("context", args.context or values.get("seq")) if args.decode else None
        results.append(estimate(plan, Target(hardware, mesh, values, context), function))
        meshes.append(_mesh_text(plan))
    mode = f"decode, context {context}" if args.decode else "prefill"
    if function == "decode_stage0":
        mode += ", @decode_stage0 below"
    from plait.ir.attrs import PIPELINE_ATTR

    pipelined = PIPELINE_ATTR in plan.attributes
    if (TRAIN_STEP in _functions(plan) or pipelined) and not args.decode:
        # (@train_step: forward, backward and optimizer; pipelined: the first stage's forward)
        mode = "training step" + (", @forward_stage0 below" if pipelined else "")
    mesh_text = meshes[0] if len(set(meshes)) == 1 else " vs ".join(meshes)
    print(f"{hardware.name}: {hardware.description}")
    print(f"mesh {mesh_text}, {mode}" + "".join(f", {k}={v}" for k, v in values.items()))
    print()
    if len(results) == 1:
        print(render(results[0], args.group))
    else:
        print(
            render_compare(
                results[0], results[1], (pipelines[0] or "(none)", pipelines[1] or "(none)")
            )
        )
    from plait.passes.shard.pipeline_cost import (
        estimates_of,
        generation_step,
        pipeline_peaks,
        pipeline_timeline,
    )
    from plait.passes.shard.pipeline_schedule import pipeline_plan

    step = generation_step(plan, Target(hardware, mesh, values, context)) if args.decode else None
    if step is not None:  # every group's token passes every stage
        bound = "the stages' round trip" if step.round_trip >= step.busiest else "the busiest stage"
        print(
            f"pipelined decode: {step.groups} group(s) of {args.batch // step.groups} sequences "
            f"over {len(step.stage_times)} stages; a group's program per stage "
            + ", ".join(f"{t * 1e3:.3f}" for t in step.stage_times)
            + f" ms; a token for every group {step.time * 1e3:.3f} ms (bound by {bound}), "
            f"{args.batch / step.time:,.0f} tokens/s"
        )
    timeline = None
    if pipeline_plan(plan) is not None:  # the step is every stage's actions, not one function
        target = Target(hardware, mesh, values)
        estimates = estimates_of(plan, target)  # (each stage function's, once for both)
        timeline = pipeline_timeline(plan, target, estimates)
        peaks = pipeline_peaks(plan, target, estimates)
        print(
            f"pipelined step: {timeline.time * 1e3:.3f} ms, bubble {timeline.bubble:.1%} "
            "(each stage function's estimate, run as the schedule); peak per pp rank: "
            + ", ".join(f"{p / 2**20:.1f} MiB" for p in peaks)
        )
    if args.trace and timeline is not None:
        from plait.runtime.profile import TraceEvent, write_trace

        events = [
            TraceEvent(action, "compute", start, end - start, rank=s)
            for s, spans in enumerate(timeline.spans)
            for action, start, end in spans
        ]
        write_trace(args.trace, events)
        console.print(f"wrote the simulated pipeline to {args.trace} (open it in ui.perfetto.dev)")
    elif args.trace:
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
