"""`plait opt FILE --pipeline ...`: passes on IR text, like mlir-opt."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from plait import DEFAULT_PIPELINE

from .common import (
    UsageError,
    add_ir_options,
    pass_manager_options,
    write_output,
)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("opt", parents=[common], help="run passes on IR text, like mlir-opt")
    p.add_argument("file", nargs="?", metavar="FILE", help="IR file, or - for stdin")
    p.add_argument("-o", "--output", help="output file (default stdout)")
    p.add_argument(
        "--list-passes",
        action="store_true",
        help="list the registered passes with their options and defaults",
    )
    add_ir_options(p, f"default: none; compile and estimate run {DEFAULT_PIPELINE}")
    p.set_defaults(func=run)


def run(args) -> int:
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
    manager = PassManager.parse(args.pipeline or "", **pass_manager_options(args))
    text = (
        decode_ir_text(sys.stdin.buffer.read(), "<stdin>")
        if args.file == "-"
        else read_ir_text(args.file)
    )
    module = parse_module(text, "<stdin>" if args.file == "-" else args.file)
    manager.run(module)
    if args.time_passes:
        print(manager.report(), file=sys.stderr)
    write_output(args.output, print_module(module))
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
