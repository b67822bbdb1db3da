"""The artifact directory a compiled model is saved as.

    DIR/manifest.json        versions, pipeline, mesh, inputs, outputs, file names,
                             the sha256 of every weight tensor's bytes
    DIR/plan.mlir            the compiled IR (text; parses back with `plait opt`)
    DIR/rank0.py, ...        each rank's program, as readable Python
    DIR/weights.safetensors  the weights the plan uses (tied weights stored once)

An artifact is data. Reading one parses JSON and IR text and reads
safetensors; it never unpickles and never imports a module the artifact
names: a plan's operators must be torch's, plait's own, or those of the
libraries the user names as trusted (`trusted_ops`). Programs are rebuilt
from the plan (the rank files are for reading), and weights are checked
against their recorded hashes, which catches corruption but not tampering:
the hashes live in the same directory.

A save is atomic: everything is written to a sibling directory that is
renamed into place when complete, so an interrupted save leaves the
previous artifact as it was.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from xdsl.dialects.builtin import ModuleOp

from .._version import __version__
from ..backends.bindings import resolve
from ..ir.attrs import MESH_ATTR
from ..ir.errors import PlaitError
from ..ir.libraries import libraries
from ..ir.ops import CallOp, stored_weight_names
from ..ir.targets import split_name
from ..ir.text import parse_module, read_ir_text, where
from ..ir.weights import WeightStore, check_digests, tensor_digests
from . import checkpoint
from .manifest import HASHES, problem

FORMAT = "plait-artifact"
FORMAT_VERSION = 2  # 2: per-tensor sha256 of the weights
MANIFEST = "manifest.json"
PLAN = "plan.mlir"
WEIGHTS = "weights.safetensors"
STATE = "state"  # a training checkpoint's field: its state index, written by the ranks


class ArtifactError(PlaitError):
    """An artifact directory that is missing, incomplete, malformed or from another plait."""


def program_file(rank: int) -> str:
    return f"rank{rank}.py"


@dataclass
class Artifact:
    """What an artifact holds, in memory."""

    plan: str
    programs: dict[int, str]
    manifest: dict = field(default_factory=dict)


# ---- writing -----------------------------------------------------------


def staging(directory: str | Path) -> Path:
    """The directory a save of several processes writes into before it
    becomes `directory`: one name every rank knows."""
    target = Path(os.path.realpath(directory))
    return target.with_name(f".{target.name}.saving")


def start_staging(directory: str | Path) -> Path:
    """An empty `staging(directory)`: what an interrupted save left there is removed."""
    target = Path(os.path.realpath(directory))
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = staging(directory)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def write(
    directory: str | Path,
    artifact: Artifact,
    weights: WeightStore,
    weight_names,
    *,
    written: tuple[Path, dict] | None = None,
    remove_replaced_later: bool = False,
) -> Path:
    """Save atomically: `directory` becomes the new artifact only once it is
    complete, replacing an artifact (or an empty directory) there. `written`:
    (a staging directory other files were written into, their files' tensor
    hashes), which become part of the artifact. `remove_replaced_later`: the
    replaced artifact, already moved aside, is deleted by a thread (a
    training checkpoint's gigabytes take a quarter second to unlink)."""
    target = Path(os.path.realpath(directory))
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if written is None:
        staging, hashes = target.with_name(f".{target.name}.saving-{secrets.token_hex(4)}"), {}
        staging.mkdir()  # the process umask applies, as to every file written below
    else:
        staging, hashes = written
    try:
        (staging / PLAN).write_text(artifact.plan)
        for rank, source in artifact.programs.items():
            (staging / program_file(rank)).write_text(source)
        weights.save(staging / WEIGHTS, weight_names)
        # safetensors creates its files 0600; give them the mode of the files written above
        for name in [WEIGHTS, *hashes]:
            os.chmod(staging / name, stat.S_IMODE((staging / PLAN).stat().st_mode))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "plait_version": __version__,
            "torch_version": torch.__version__,
            **artifact.manifest,
            "plan": PLAN,
            "programs": {str(rank): program_file(rank) for rank in sorted(artifact.programs)},
            "weights": WEIGHTS,
            HASHES: {WEIGHTS: tensor_digests(staging / WEIGHTS), **hashes},
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        (staging / MANIFEST).write_text(text)
        _sync(staging)
        _move_into_place(staging, target, remove_replaced_later)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(directory)


def _check_replaceable(target: Path) -> None:
    """Saving replaces the whole directory: only an artifact or nothing may be there."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a directory; choose another output")
    if any(target.iterdir()) and _manifest_format(target / MANIFEST) != FORMAT:
        raise ArtifactError(
            f"{target} is not empty and holds no plait artifact; saving replaces the whole "
            "directory, so choose a new or empty one"
        )


def _manifest_format(path: Path) -> object:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def _sync(directory: Path) -> None:
    """Flush the files and the directory to disk, so that the renamed artifact
    is complete even after a power loss."""
    for path in [*directory.iterdir(), directory]:
        checkpoint.flush(path)


def _move_into_place(staging: Path, target: Path, later: bool = False) -> None:
    try:
        staging.rename(target)  # no directory there, or an empty one
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    previous = target.with_name(f".{target.name}.previous-{secrets.token_hex(4)}")
    target.rename(previous)
    try:
        staging.rename(target)
    except BaseException:
        previous.rename(target)
        raise
    if later:  # not a daemon: the interpreter finishes it before exiting
        threading.Thread(
            target=shutil.rmtree, args=(previous, True), name="plait-remove-replaced"
        ).start()
    else:
        shutil.rmtree(previous, ignore_errors=True)


# ---- reading -----------------------------------------------------------


def read(
    directory: str | Path, trusted_ops: Iterable[str] = (), verify: bool = True
) -> tuple[Artifact, ModuleOp, WeightStore]:
    """Parse an artifact. `trusted_ops` names the Python modules that may be
    imported to register the custom ops its plan calls; `verify` checks every
    weight tensor against its recorded sha256 (reading the whole file once)."""
    directory = Path(directory)
    manifest, manifest_path = _read_manifest(directory)
    files = [manifest["plan"], manifest["weights"], *manifest["programs"].values()]
    missing = [f for f in [*files, *manifest[HASHES]] if not (directory / f).is_file()]
    if missing:
        raise ArtifactError(
            f"{directory}: incomplete artifact, missing {', '.join(sorted(set(missing)))}; "
            "recompile it"
        )
    if manifest["weights"] not in manifest[HASHES]:
        raise ArtifactError(
            f"{manifest_path}: field '{HASHES}' has no hashes for {manifest['weights']}; "
            "recompile the artifact"
        )
    plan_path = directory / manifest["plan"]
    plan = read_ir_text(plan_path)
    programs = {int(r): read_ir_text(directory / f) for r, f in manifest["programs"].items()}
    module = parse_module(plan, str(plan_path))
    _check_ranks(module, programs, manifest_path)
    _check_operators(module, trusted_ops, directory)
    weights = read_weights(directory, manifest, stored_weight_names(module))
    if verify:  # all of it, now: every rank fails alike, before any computes
        for name, digests in manifest[HASHES].items():
            check_digests(directory / name, digests)
    return Artifact(plan=plan, programs=programs, manifest=manifest), module, weights


def read_weights(directory: str | Path, manifest: dict, names) -> WeightStore:
    """The weights `names` of the artifact: from the state index a training
    checkpoint's ranks wrote (`runtime.checkpoint`), else its weights file."""
    directory = Path(directory)
    weights = WeightStore()
    indexed = set()
    if manifest.get(STATE) == checkpoint.INDEX:
        indexed = checkpoint.add_indexed(weights, directory, set(manifest[HASHES]))
    weights.add_safetensors(directory / manifest["weights"], [n for n in names if n not in indexed])
    return weights


def _read_manifest(directory: Path) -> tuple[dict, Path]:
    if not directory.is_dir():
        raise ArtifactError(
            f"{directory}: no such artifact directory; create one with `plait compile`"
        )
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{directory}: not a plait artifact (no {MANIFEST}); the save may have been "
            "interrupted. Recompile it with `plait compile ... -o DIR`"
        )
    try:
        manifest = json.loads(read_ir_text(path))  # a bad byte: its line:column
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a plait artifact manifest")
    version = str(manifest.get("plait_version", "?"))
    if (
        manifest.get("format_version") != FORMAT_VERSION
        or version.split(".")[:2] != __version__.split(".")[:2]
    ):
        raise ArtifactError(
            f"{directory} was written by plait {version} (artifact format "
            f"{manifest.get('format_version')}); this is plait {__version__} (format "
            f"{FORMAT_VERSION}). Recompile the model with this plait: `plait compile ... -o {directory}`"
        )
    malformed = problem(manifest)
    if malformed is not None:
        raise ArtifactError(f"{path}: {malformed}; recompile the artifact with `plait compile`")
    return manifest, path


def _check_ranks(module: ModuleOp, programs: dict[int, str], manifest_path: Path) -> None:
    """One program file per rank of the plan's mesh."""
    mesh = module.attributes.get(MESH_ATTR)
    ranks = list(range(mesh.size if mesh is not None else 1))
    if sorted(programs) != ranks:
        raise ArtifactError(
            f"{manifest_path}: field 'programs' lists ranks {sorted(programs)}, but the plan "
            f"runs on ranks {ranks}; recompile the artifact"
        )


# ---- operators and trusted libraries ------------------------------------

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def import_trusted(modules: Iterable[str], directory: str | Path | None = None) -> None:
    """Import the Python modules the user trusts to register custom ops. One
    that would be imported from inside the artifact `directory` is refused:
    an artifact is data, and it may not ship the code that runs it."""
    for name in modules:
        if not _MODULE_NAME.fullmatch(name):
            raise ArtifactError(f"trusted_ops: '{name}' is not a Python module name")
        spec = importlib.util.find_spec(name.split(".")[0])  # finds it, runs nothing
        if spec is None:
            raise ArtifactError(
                f"trusted library '{name}' is not importable; install it or add its folder "
                "to PYTHONPATH"
            )
        if directory is not None:
            inside = Path(directory).resolve()
            places = [spec.origin, *(spec.submodule_search_locations or [])]
            if any(p and Path(p).resolve().is_relative_to(inside) for p in places):
                raise ArtifactError(
                    f"trusted library '{name}' would be imported from inside the artifact "
                    f"{directory}; an artifact is data and may not ship code. Install the "
                    "library, or run from another directory"
                )
        importlib.import_module(name)


def _check_operators(module: ModuleOp, trusted: Iterable[str], directory: Path) -> None:
    """Every operator the plan calls must be registered with torch, after
    importing only plait's own ops and the trusted libraries."""
    import_trusted(trusted, directory)
    calls: dict[str, CallOp] = {}  # target -> its first call
    for op in module.walk():
        if isinstance(op, CallOp):
            calls.setdefault(op.target_name, op)
    recorded = libraries(module)
    for target, op in calls.items():
        if resolve(target) is not None:
            continue
        namespace = split_name(target)[0]
        library = next((m for m in recorded if m.split(".")[0] == namespace), namespace)
        raise ArtifactError(
            f"{where(op)}: this plan calls '{target}', which is not registered with torch; "
            "loading an artifact never imports the modules it names. If you trust the "
            f"library that defines it, pass trusted_ops=['{library}'] to plait.load "
            f"(plait run --trust-ops {library})"
        )
