"""`plait calibrate -o FILE`: measure this machine and write a hardware file
for the cost model."""

from __future__ import annotations

import argparse

from .common import (
    make_console,
)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "calibrate", parents=[common], help="measure this machine and write a hardware file"
    )
    p.add_argument("-o", "--output", default="plait-cpu.toml")
    p.set_defaults(func=run)


def run(args) -> int:
    from plait.runtime.calibrate import write

    console = make_console()
    path = write(args.output, progress=lambda text: console.print(f"measuring {text}"))
    console.print(f"wrote {path}; use it with: plait estimate ... --hardware {path}")
    return 0
