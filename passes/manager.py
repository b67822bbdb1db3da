"""Runs a pipeline: verify after each pass, print or dump the IR, time each pass.

    pm = PassManager.parse("canonicalize,cse", print_ir_after_all=True, dump_ir="dumps/")
    pm.run(module, weights)
    pm.report()        # per pass: seconds and op counts before -> after

Dumps are one file per step, numbered in order (`00-input.mlir`,
`01-canonicalize.mlir`, ...); each parses back with `plait opt`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from xdsl.dialects.builtin import ModuleOp

from ..ir.errors import IRVerifyError, PlaitError
from ..ir.text import print_module, verify_module
from ..ir.weights import WeightStore
from .base import Pass, PassContext, ProgramRunner
from .pipeline import parse_pipeline, with_prerequisites


class PassFailedError(PlaitError):
    """A pass broke the IR: a bug in plait, reported with the pass's name."""


@dataclass
class PassRecord:
    name: str
    seconds: float
    ops_before: int
    ops_after: int
    needed_by: str | None = None  # added to the pipeline because this pass requires it


def count_ops(module: ModuleOp) -> int:
    return sum(1 for _ in module.walk()) - 1


@dataclass
class PassManager:
    passes: list[Pass]  # with their prerequisites (`Pass.requires`) in place
    verify_each: bool = True
    print_ir_after_all: bool = False
    print_ir_before: set[str] = field(default_factory=set)
    print_ir_after: set[str] = field(default_factory=set)
    dump_ir: str | Path | None = None
    disabled: set[str] = field(default_factory=set)
    stream: TextIO | None = None
    records: list[PassRecord] = field(default_factory=list)

    needed_by: dict[int, str] = field(default_factory=dict)  # pass index -> who added it

    @staticmethod
    def parse(pipeline: str, **options) -> PassManager:
        steps = with_prerequisites(parse_pipeline(pipeline))
        needed_by = {i: by for i, (_, by) in enumerate(steps) if by is not None}
        return PassManager([p for p, _ in steps], needed_by=needed_by, **options)

    def _emit(self, module: ModuleOp, header: str) -> None:
        out = self.stream or sys.stderr
        out.write(f"// -----// IR Dump {header} //----- //\n")
        out.write(print_module(module))

    def _dump(self, module: ModuleOp, index: int, name: str) -> None:
        if self.dump_ir is None:
            return
        directory = Path(self.dump_ir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{index:02d}-{name}.mlir").write_text(print_module(module))

    def run(
        self,
        module: ModuleOp,
        weights: WeightStore | None = None,
        sample_inputs=(),
        run_program: ProgramRunner | None = None,
    ) -> ModuleOp:
        """Run the passes on `module` in place; `sample_inputs` and `run_program`
        are for passes that run the program (see PassContext)."""
        ctx = PassContext.create(weights, sample_inputs, run_program)
        self._dump(module, 0, "input")
        step = 0
        for index, p in enumerate(self.passes):
            if p.name in self.disabled:
                continue
            step += 1
            if p.name in self.print_ir_before:
                self._emit(module, f"Before {p.name}")
            before = count_ops(module)
            start = time.perf_counter()
            p.apply(ctx, module)
            seconds = time.perf_counter() - start
            if self.verify_each:
                try:
                    verify_module(module)
                except IRVerifyError as exc:
                    raise PassFailedError(f"pass '{p.name}' produced invalid IR: {exc}") from exc
            self.records.append(
                PassRecord(p.name, seconds, before, count_ops(module), self.needed_by.get(index))
            )
            if self.print_ir_after_all or p.name in self.print_ir_after:
                self._emit(module, f"After {p.name}")
            self._dump(module, step, p.name)
        return module

    def report(self) -> str:
        """A table of pass times and op counts, as --time-passes prints it."""
        lines = [f"{'pass':<20} {'seconds':>9} {'ops before':>11} {'ops after':>10}"]
        for r in self.records:
            added = f"  (added: {r.needed_by} needs it)" if r.needed_by else ""
            lines.append(
                f"{r.name:<20} {r.seconds:>9.4f} {r.ops_before:>11} {r.ops_after:>10}{added}"
            )
        total = sum(r.seconds for r in self.records)
        lines.append(f"{'total':<20} {total:>9.4f}")
        return "\n".join(lines)
