"""An artifact is data: loading one imports no module it names, not even one
shipped beside it on sys.path; custom ops load from libraries the user names
as trusted. Each load runs in a fresh process, where no custom op is
registered yet and the artifact directory is first on sys.path."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap

import plait
import pytest
import torch
from plait.cli import main
from safetensors.torch import save_file

LIBRARY = """\
import torch


@torch.library.custom_op("plait_trust_lib::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)
"""


def _python(script: str, cwd, *paths) -> str:
    """Run `script` with `python -c` in `cwd` (so cwd is first on sys.path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_module_shipped_in_the_artifact_is_never_imported(compiled, tmp_path):
    artifact = compiled("gpt2-tiny").save(tmp_path / "art")
    plan = (artifact / "plan.mlir").read_text()
    assert plan.count('"aten::new_ones"') == 1
    (artifact / "plan.mlir").write_text(plan.replace('"aten::new_ones"', '"evilmod::op"'))
    marker = tmp_path / "evilmod-ran"
    (artifact / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    out = _python(
        """
        import plait
        for trusted in ([], ["evilmod"]):
            try:
                plait.load(".", trusted_ops=trusted)
                print("LOADED")
            except plait.PlaitError as exc:
                print("REFUSED", type(exc).__name__, exc)
        """,
        artifact,
    )
    assert not marker.exists()
    untrusted, trusted = out.splitlines()
    assert untrusted.startswith("REFUSED ArtifactError")
    assert "plan.mlir:" in untrusted and "'evilmod::op'" in untrusted
    assert "trusted_ops=['evilmod']" in untrusted and "--trust-ops evilmod" in untrusted
    # naming it trusted does not help: it would come from inside the artifact
    assert trusted.startswith("REFUSED ArtifactError") and "inside the artifact" in trusted


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A user's torch.library module, importable in this process and in children."""
    folder = tmp_path_factory.mktemp("lib")
    (folder / "plait_trust_lib.py").write_text(LIBRARY)
    sys.path.insert(0, str(folder))
    try:
        importlib.import_module("plait_trust_lib")
    finally:
        sys.path.remove(str(folder))
    return folder


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.plait_trust_lib.twice(self.linear(x))


def test_a_trusted_library_loads_and_runs(library, tmp_path):
    torch.manual_seed(0)
    model, x = Twice(), torch.randn(3, 4)
    compiled = plait.compile(model, (x,))
    assert torch.equal(compiled(x), model(x))  # in-process: the op is already registered
    compiled.save(tmp_path / "art")
    with torch.no_grad():
        save_file({"x": x, "y": model(x)}, str(tmp_path / "io.safetensors"))
    out = _python(
        """
        import plait, torch
        from safetensors.torch import load_file
        try:
            plait.load("art")
        except plait.PlaitError as exc:
            print("REFUSED", exc)
        loaded = plait.load("art", trusted_ops=["plait_trust_lib"])
        io = load_file("io.safetensors")
        print("EQUAL", torch.equal(loaded(io["x"]), io["y"]))
        """,
        tmp_path,
        library,
    )
    refused, equal = out.splitlines()
    assert "'plait_trust_lib::twice'" in refused
    assert "trusted_ops=['plait_trust_lib']" in refused
    assert equal == "EQUAL True"


def test_the_cli_passes_trusted_libraries_on(compiled, tmp_path, capsys):
    artifact = compiled("gpt2-tiny").save(tmp_path / "art")
    assert main(["run", str(artifact), "--trust-ops", "no_such_plait_lib"]) == 1
    assert "trusted library 'no_such_plait_lib' is not importable" in capsys.readouterr().err
    shutil.copy(artifact / "plan.mlir", tmp_path / "plan.mlir")
    argv = ["compile", str(tmp_path / "plan.mlir"), "--emit", "ir", "--trust-ops", "no_such_lib2"]
    assert main(argv) == 1
    assert "'no_such_lib2' is not importable" in capsys.readouterr().err
