"""The `plait` command's parser: the global flags, then one subcommand per
module of this package, each adding its own flags (`add_parser`) and the
function that runs it (`run`)."""

from __future__ import annotations

import argparse

from plait import __version__

from . import calibrate, compile, estimate, opt, run, train

COMMANDS = (compile, opt, run, train, estimate, calibrate)

EXAMPLES = """\
plait compile --example llama-tiny -o out/           # capture, run passes, save an artifact
plait compile model.py:build -o out/ --time-passes
plait compile path/to/hf_checkpoint/ -o out/ --pipeline canonicalize,cse,dce
plait compile --example llama-tiny --emit mlir --mlir-dialect stablehlo
plait opt dump.mlir --pipeline canonicalize -o clean.mlir
plait run out/                                      # run on generated inputs
plait run out/ --inputs inputs.safetensors --output outputs.safetensors
plait run out/ --repeat 10 > results.txt            # results on stdout, logs on stderr
plait train --example llama-tiny --steps 10 --save ckpt/   # compile a training step, run it
"""

DEBUG_HELP = "show the Python traceback of an error"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait",
        description="plait: compile PyTorch models into per-rank programs. Results go to "
        "stdout; logs, progress and errors to stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + EXAMPLES,
    )
    parser.add_argument("--version", action="version", version=f"plait {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # --debug after the command too; SUPPRESS keeps the value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser
