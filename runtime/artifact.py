"""The artifact directory a compiled model is saved as.

    DIR/manifest.json        versions, pipeline, mesh, inputs, outputs, file names
    DIR/plan.mlir            the compiled IR (text; parses back with `plait opt`)
    DIR/rank0.py, ...        each rank's program, as readable Python
    DIR/weights.safetensors  the weights the plan uses (tied weights stored once)

Reading never executes anything from the directory: programs are rebuilt
from the plan and checked against the saved source, and weights are
safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from xdsl.dialects.builtin import ModuleOp

from ..ir.errors import PlaitError
from ..ir.ops import stored_weight_names
from ..ir.text import parse_module, read_ir_text
from ..ir.weights import WeightStore

FORMAT = "plait-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.mlir"
WEIGHTS = "weights.safetensors"


class ArtifactError(PlaitError):
    """An artifact directory that is missing, incomplete or from another plait."""


def program_file(rank: int) -> str:
    return f"rank{rank}.py"


@dataclass
class Artifact:
    """What an artifact holds, in memory."""

    plan: str
    programs: dict[int, str]
    manifest: dict = field(default_factory=dict)


def _plain_name(name: object) -> bool:
    """A file name inside the artifact: no directories, no '..'."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def _plait_version() -> str:
    from .. import __version__

    return __version__


def write(directory: str | Path, artifact: Artifact, weights: WeightStore, weight_names) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # a manifest marks a complete artifact: remove an old one before rewriting files
    (directory / MANIFEST).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plait_version": _plait_version(),
        "torch_version": torch.__version__,
        **artifact.manifest,
        "plan": PLAN,
        "programs": {str(rank): program_file(rank) for rank in sorted(artifact.programs)},
        "weights": WEIGHTS,
    }
    (directory / PLAN).write_text(artifact.plan)
    for rank, source in artifact.programs.items():
        (directory / program_file(rank)).write_text(source)
    weights.save(directory / WEIGHTS, weight_names)
    # the manifest goes last: a directory without one is an interrupted save
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def read(directory: str | Path) -> tuple[Artifact, ModuleOp, WeightStore]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(
            f"{directory}: no such artifact directory; create one with `plait compile`"
        )
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{directory}: not a plait artifact (no {MANIFEST}); the save may have been "
            "interrupted. Recompile it with `plait compile ... -o DIR`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{manifest_path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not a plait artifact manifest")
    version = str(manifest.get("plait_version", "?"))
    if (
        manifest.get("format_version") != FORMAT_VERSION
        or version.split(".")[:2] != _plait_version().split(".")[:2]
    ):
        raise ArtifactError(
            f"{directory} was written by plait {version} (artifact format "
            f"{manifest.get('format_version')}); this is plait {_plait_version()} (format "
            f"{FORMAT_VERSION}). Recompile the model with this plait: `plait compile ... -o {directory}`"
        )
    programs_entry = manifest.get("programs", {})
    files = [manifest.get("plan", PLAN), manifest.get("weights", WEIGHTS)]
    files += list(programs_entry.values()) if isinstance(programs_entry, dict) else [None]
    if not all(_plain_name(f) for f in files) or not all(str(r).isdigit() for r in programs_entry):
        raise ArtifactError(
            f"{manifest_path}: file entries must be plain file names inside the artifact "
            "and program keys rank numbers; recompile the artifact"
        )
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise ArtifactError(
            f"{directory}: incomplete artifact, missing {', '.join(missing)}; recompile it"
        )
    plan_path = directory / manifest["plan"]
    plan = read_ir_text(plan_path)
    programs = {int(r): read_ir_text(directory / f) for r, f in manifest["programs"].items()}
    weights = WeightStore()
    module = parse_module(plan, str(plan_path))
    names = stored_weight_names(module)
    weights.add_safetensors(directory / manifest["weights"], names)
    return Artifact(plan=plan, programs=programs, manifest=manifest), module, weights
