"""What the commands share: errors for flags that do not go together, the
consoles (results on stdout, logs on stderr), device checks and the pass
pipeline's flags."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from plait import PlaitError


class UsageError(PlaitError):
    """Flags that do not go together: exit code 2, as for argparse's own errors."""


def make_console(stderr: bool = True):
    """stderr for logs and progress, stdout for results."""
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True, highlight=False)


def check_device(device: str | None) -> None:
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


def status(console, text: str):
    """A spinner for a long phase, when stderr is a terminal."""
    return console.status(text) if console.is_terminal else nullcontext()


def add_ir_options(parser: argparse.ArgumentParser, default: str) -> None:
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


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-ops",
        dest="trusted_ops",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this Python module to register the "
        "custom ops a plan calls (repeatable); nothing else is imported",
    )


def pass_manager_options(args) -> dict:
    return dict(
        verify_each=not args.no_verify_each,
        print_ir_after_all=args.print_ir_after_all,
        print_ir_before=set(args.print_ir_before),
        print_ir_after=set(args.print_ir_after),
        dump_ir=args.dump_ir,
    )


def write_output(path: str | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)


def causal_lm(model, flag: str):
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


def relaunch_on_ranks(args, launcher_args: list[str]) -> int:
    """This command again on --nproc ranks through torchrun, without --nproc."""
    from plait.runtime import launch

    argv = [a for a in args.argv if not a.startswith("--nproc")]
    if "--nproc" in args.argv:  # the value followed the flag
        i = args.argv.index("--nproc")
        argv = args.argv[:i] + args.argv[i + 2 :]
    return launch.relaunch(argv, args.nproc, launcher_args)
