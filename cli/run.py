"""`plait run DIR`: run an artifact on given or generated inputs (or decode
with --generate), on N ranks through torchrun with --nproc."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import (
    UsageError,
    add_trust_option,
    check_device,
    make_console,
    relaunch_on_ranks,
    status,
)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="after a warm-up run, time N runs and report the median",
    )
    p.add_argument("--device", help="device to run on (default cpu)")
    p.add_argument("--trace", help="write a measured per-op trace (Chrome trace JSON)")
    add_trust_option(p)
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking the weights against their recorded sha256",
    )
    group = p.add_argument_group("generation (an artifact compiled with --generate)")
    group.add_argument("--generate", action="store_true", help="decode new tokens")
    group.add_argument(
        "--prompt-ids", dest="prompt_ids", help="token ids, comma-separated; ';' between sequences"
    )
    group.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="prompt text (needs the artifact's tokenizer); repeatable",
    )
    group.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32)
    group.add_argument("--do-sample", dest="do_sample", action="store_true")
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--top-k", dest="top_k", type=int)
    group.add_argument("--top-p", dest="top_p", type=float)
    group.add_argument("--seed", type=int)
    group = p.add_argument_group("several ranks (through torchrun)")
    group.add_argument("--nproc", type=int, default=1, help="ranks per node")
    group.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds a rank may stay silent (stopped, hung) before the run "
        "stops, naming it (default $PLAIT_TIMEOUT or 60)",
    )
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
    p.set_defaults(func=run)


def _prompts(args, compiled):
    """(input_ids, attention_mask, tokenizer or None) from --prompt-ids or --prompt,
    left padded to the longest."""
    import plait
    import torch

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
            sequences = [
                [int(t) for t in part.split(",") if t.strip()]
                for part in args.prompt_ids.split(";")
            ]
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
    options = dict(
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
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


def run(args) -> int:
    import statistics

    import plait
    import torch
    from plait.runtime import launch

    console, out = make_console(), make_console(stderr=False)
    check_device(args.device)
    device = args.device or "cpu"
    if args.nproc > 1 and not launch.under_launcher():
        return relaunch_on_ranks(args, _launcher_args(args))
    rank = 0
    if launch.under_launcher():
        device = launch.join(device, args.timeout)
        rank = torch.distributed.get_rank()
    if rank != 0:
        console.quiet = out.quiet = True  # rank 0 reports for all
    with status(console, f"loading {args.artifact}"):
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
