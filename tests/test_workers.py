"""Ranks never hang, leak or re-import the caller: the in-process worker pool
(scripts without a main guard, stdin, output structures, busy and stopped
ranks, temporary copies) and `plait run --nproc` (a stopped rank, modules in
the working directory, clean exits)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import plait
import pytest
import torch
from plait.runtime import launcher
from plait.runtime.heartbeat import INTERVAL
from plait.runtime.workers import WorkerError
from safetensors.torch import load_file, save_file

SLOW_OP = Path(__file__).parent / "slow_op"  # plaittest::nap, imported at startup from here
PLAIT = Path(sys.executable).parent / "plait"

SCRIPT = """\
import torch, plait
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
x = torch.randn(4, 16)
compiled = plait.compile(model, (x,), pipeline="shard{mesh=tp:2}")
print("max-diff", (compiled(x) - model(x)).abs().max().item())
"""

EVIL = """\
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text(__name__)
raise ImportError("the working directory's json.py was imported")
"""


def _env(tmp: Path, **extra) -> dict:
    return {**os.environ, "TMPDIR": str(tmp), **extra}


def _copies(folder: Path) -> list[Path]:
    return sorted(folder.glob("plait-ranks-*"))


def test_a_script_without_main_guard_and_stdin_call_a_sharded_model(tmp_path):
    """Workers start as plait's own processes: the caller's script is never
    re-run; their temporary copy of the weights goes at interpreter exit."""
    (tmp_path / "script").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "tmp").mkdir()
    script = tmp_path / "script" / "no_guard.py"
    script.write_text(SCRIPT)
    (tmp_path / "cwd" / "json.py").write_text(EVIL)  # workers must not import it
    env = _env(tmp_path / "tmp")
    from_file = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path / "cwd",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    from_stdin = subprocess.run(
        [sys.executable, "-"],
        input=SCRIPT,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out, err = from_file.communicate(timeout=300)
    for code, stdout, stderr in [
        (from_file.returncode, out, err),
        (from_stdin.returncode, from_stdin.stdout, from_stdin.stderr),
    ]:
        assert code == 0, stderr[-3000:]
        assert float(stdout.split("max-diff")[1]) <= 1e-5
    assert not (tmp_path / "cwd" / "IMPORTED").exists()
    assert _copies(tmp_path / "tmp") == []


@pytest.mark.skipif(not launcher.AVAILABLE, reason="the launcher forks ranks on Linux only")
def test_ranks_fork_from_one_launcher_per_environment(monkeypatch):
    """Pools fork their ranks from one launcher (a fresh Python that imported
    plait once), which reports how each exits; a caller whose environment
    changed gets a launcher started in it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16)

    def ranks_of(compiled) -> list[int]:
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), atol=1e-5)
        return [rank.process.pid for rank in compiled._pool.procs]

    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    first = plait.compile(model, (x,), pipeline="shard{mesh=tp:2}")
    second = plait.compile(model, (x,), pipeline="shard{mesh=tp:2}")
    try:
        zygote = launcher.launcher().process.pid
        assert [parent(pid) for pid in ranks_of(first) + ranks_of(second)] == [zygote] * 4
        ranks = first._pool.procs
        ranks[1].process.kill()
        assert ranks[1].wait() == -signal.SIGKILL and ranks[0].exitcode is None
        monkeypatch.setenv("PLAIT_TEST_MARK", "changed")
        third = plait.compile(model, (x,), pipeline="shard{mesh=tp:2}")
        try:
            moved = ranks_of(third)
            assert launcher.launcher().process.pid not in (zygote, os.getpid())
            assert {parent(pid) for pid in moved} == {launcher.launcher().process.pid}
            assert b"PLAIT_TEST_MARK=changed" in Path(f"/proc/{moved[0]}/environ").read_bytes()
        finally:
            third.close()
    finally:
        first.close()
        second.close()


def test_without_the_launcher_each_rank_is_a_fresh_interpreter(monkeypatch):
    """Where ranks cannot fork from the launcher (no pidfds: not Linux), each
    is a fresh `python -P` of the caller's own, and runs the same."""
    monkeypatch.setattr(launcher, "AVAILABLE", False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16)
    compiled = plait.compile(model, (x,), pipeline="shard{mesh=tp:2}")
    try:
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), atol=1e-5)
        ranks = compiled._pool.procs
        assert all(isinstance(rank.process, subprocess.Popen) for rank in ranks)
    finally:
        compiled.close()
    assert all(rank.exitcode == 0 for rank in ranks)


def test_model_outputs_keep_their_structure_on_workers_and_from_artifacts(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
        output_hidden_states=True,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
    compiled = plait.compile(model, (ids,), pipeline="shard{mesh=tp:2}")
    try:
        out = compiled(ids)  # on 2 worker ranks
        assert type(out) is CausalLMOutputWithPast and list(out) == list(expected)
        assert torch.allclose(out.logits, expected.logits, atol=1e-5)
        assert len(out.hidden_states) == len(expected.hidden_states) == 2
        for a, b in zip(out.hidden_states, expected.hidden_states):
            assert torch.allclose(a, b, atol=1e-5)
        compiled.save(tmp_path / "artifact")
    finally:
        compiled.close()
    assert _copies(tmp_path) == []  # close() removed the workers' copy
    save_file({"input_ids": ids}, tmp_path / "ids.st")
    # a fresh process has not imported transformers' output classes
    check = (
        "import sys, plait\n"
        "from safetensors.torch import load_file, save_file\n"
        "assert 'transformers.modeling_outputs' not in sys.modules\n"
        "out = plait.load(sys.argv[1])(load_file(sys.argv[2])['input_ids'])\n"
        "print(type(out).__module__ + '.' + type(out).__name__)\n"
        "save_file({'logits': out.logits, 'h1': out.hidden_states[1]}, sys.argv[3])\n"
        "from plait.cli import main\n"  # which prints and saves the outputs' leaves
        "assert main(['run', sys.argv[1], '--inputs', sys.argv[2], '--output', sys.argv[4]]) == 0\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            check,
            str(tmp_path / "artifact"),
            str(tmp_path / "ids.st"),
            str(tmp_path / "out.st"),
            str(tmp_path / "cli.st"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # (the first line; the CLI run below prints its results to stdout too)
    assert result.stdout.splitlines()[0] == "transformers.modeling_outputs.CausalLMOutputWithPast"
    loaded = load_file(tmp_path / "out.st")
    assert torch.allclose(loaded["logits"], expected.logits, atol=1e-5)
    assert torch.allclose(loaded["h1"], expected.hidden_states[1], atol=1e-5)
    leaves = load_file(tmp_path / "cli.st")
    assert list(leaves) == ["output_0", "output_1", "output_2"]
    assert torch.allclose(leaves["output_0"], expected.logits, atol=1e-5)
    assert torch.allclose(leaves["output_2"], expected.hidden_states[1], atol=1e-5)
    assert _copies(tmp_path) == []


def test_an_output_structure_loads_without_importing_what_it_names(tmp_path, monkeypatch):
    from plait.runtime.outputs import load_spec

    (tmp_path / "evil_outputs.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    leaf = {"type": None, "context": None, "children_spec": []}
    # a module off sys.path, one transformers lacks, a class that is no dataclass
    for name in [
        "evil_outputs.Out",
        "transformers.modeling_nothing.Out",
        "transformers.modeling_outputs.ModelOutput",
    ]:
        node = {"type": name, "context": json.dumps(["a", "b"]), "children_spec": [leaf, leaf]}
        spec = json.dumps([1, node])
        with pytest.warns(UserWarning, match="come back as a dict with its keys"):
            tree = load_spec(spec, tmp_path)
        assert torch.utils._pytree.tree_unflatten([1, 2], tree) == {"a": 1, "b": 2}
    assert "evil_outputs" not in sys.modules and not (tmp_path / "IMPORTED").exists()


class Nap(torch.nn.Module):
    def forward(self, x, seconds):
        return torch.ops.plaittest.nap(x, seconds)


class NapModel(torch.nn.Module):
    """A tp:2 MLP whose ranks sleep `seconds` mid-call (in module `nap`)."""

    def __init__(self):
        super().__init__()
        self.up, self.nap, self.down = torch.nn.Linear(16, 32), Nap(), torch.nn.Linear(32, 8)

    def forward(self, x, seconds):
        return self.down(self.nap(torch.relu(self.up(x)), seconds))


@pytest.fixture(scope="module")
def napper():
    if not hasattr(torch.ops.plaittest, "nap"):
        spec = importlib.util.spec_from_file_location("plaittest_nap", SLOW_OP / "sitecustomize.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    torch.manual_seed(0)
    model = NapModel().eval()
    x = torch.randn(4, 16)
    compiled = plait.compile(model, (x, torch.tensor(0.0)), pipeline="shard{mesh=tp:2}")
    with torch.no_grad():
        return compiled, x, model(x, torch.tensor(0.0))


def _stop_when_napping(folder: Path, rank: int, ranks: int = 2) -> threading.Thread:
    """SIGSTOP `rank` once every rank is inside plaittest::nap (mid-call)."""

    def stop():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            names = [folder / f"rank{r}" for r in range(ranks)]
            if all(n.exists() and n.read_text() for n in names):
                time.sleep(3 * INTERVAL)  # a beat from inside the op: where it was last seen
                os.kill(int(names[rank].read_text()), signal.SIGSTOP)
                (folder / "stopped").write_text(str(time.monotonic()))
                return
            time.sleep(0.1)

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread


def _kill_left(folder: Path) -> list[int]:
    """SIGKILL the napping ranks still alive; the ones it found."""
    left = []
    for marker in folder.glob("rank*"):
        pid = int(marker.read_text())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":  # a zombie: dead, not reaped
                continue
        left.append(pid)
        os.kill(pid, signal.SIGKILL)
    return left


def test_a_busy_rank_is_kept_and_a_stopped_rank_is_named(napper, tmp_path, monkeypatch):
    compiled, x, expected = napper
    monkeypatch.setenv("PYTHONPATH", f"{SLOW_OP}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("PLAIT_TEST_NAPS", str(tmp_path / "naps"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "naps").mkdir()
    compiled.call_timeout = 3
    try:  # a call of 6 s, twice the timeout: the ranks keep beating while busy
        assert torch.allclose(compiled(x, torch.tensor(6.0)), expected, atol=1e-6)
        pool = compiled._pool
        assert pool.alive and len(_copies(tmp_path)) == 1
        for marker in (tmp_path / "naps").iterdir():
            marker.unlink()
        _stop_when_napping(tmp_path / "naps", rank=1)
        with pytest.raises(
            WorkerError,
            match=r"rank 1 sent no heartbeat for \d+ s \(last seen "
            r"in __call__ at .*\(nap\) plait.call\)",
        ):
            compiled(x, torch.tensor(60.0))
        stopped = float((tmp_path / "naps" / "stopped").read_text())
        assert time.monotonic() - stopped < 30
        assert all(rank.exitcode is not None for rank in pool.procs)  # all killed
        assert _copies(tmp_path) == []  # the failed pool's copy is gone
    finally:
        compiled.close()
        compiled.call_timeout = None
        assert _kill_left(tmp_path / "naps") == []


def test_a_stopped_rank_under_plait_run_is_named_and_the_run_ends(napper, tmp_path):
    compiled, x, _ = napper
    compiled.save(tmp_path / "nap")
    save_file({"x": x, "seconds": torch.tensor(60.0)}, tmp_path / "inputs.st")
    (tmp_path / "naps").mkdir()
    env = _env(
        tmp_path,
        PLAIT_TEST_NAPS=str(tmp_path / "naps"),
        PYTHONPATH=f"{SLOW_OP}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    run = subprocess.Popen(
        [str(PLAIT), "run", "nap", "--nproc", "2", "--timeout", "10", "--inputs", "inputs.st"],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _stop_when_napping(tmp_path / "naps", rank=1)
        out, _ = run.communicate(timeout=400)
        stopped = float((tmp_path / "naps" / "stopped").read_text())
        assert time.monotonic() - stopped < 90
    finally:
        run.kill()
        left = _kill_left(tmp_path / "naps")
    assert run.returncode != 0 and left == []
    assert "rank 1 sent no heartbeat for 1" in out and "(nap) plait.call" in out, out[-3000:]
    assert "Traceback" not in out and "gloo" not in out.lower(), out[-3000:]


def test_ranks_import_nothing_from_the_working_directory_and_exit_cleanly(example, tmp_path):
    """The ladder plan (async all-reduces) under torchrun, from a directory
    holding a json.py: it is never imported, and the run exits with 0 after
    leaving its process group (the 50-run check is in the report)."""
    model, inputs, _ = example("llama-tiny")
    ladder = plait.compile(model, inputs, pipeline="canonicalize,cse,dce,shard{mesh=tp:2},ladder")
    ladder.save(tmp_path / "ladder")
    save_file(dict(zip(ladder.input_names, inputs)), tmp_path / "inputs.st")
    (tmp_path / "json.py").write_text(EVIL)
    result = subprocess.run(
        [
            str(PLAIT),
            "run",
            "ladder",
            "--nproc",
            "2",
            "--inputs",
            "inputs.st",
            "--output",
            "out.st",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr and not (tmp_path / "IMPORTED").exists()
    with torch.no_grad():  # the same ladder model on one device
        reference = plait.compile(model, inputs, pipeline="canonicalize,cse,dce,ladder")(*inputs)
    assert torch.allclose(load_file(tmp_path / "out.st")["output_0"], reference, atol=1e-5)


def test_a_collective_that_waits_too_long_under_plait_run_is_one_located_line(napper, tmp_path):
    """Every rank beats, but rank 1 naps past the collective limit (twice the
    timeout): rank 0's all-gather fails, in one line naming it."""
    compiled, x, _ = napper
    compiled.save(tmp_path / "nap")
    save_file({"x": x, "seconds": torch.tensor(60.0)}, tmp_path / "inputs.st")
    env = _env(
        tmp_path,
        PLAIT_TEST_LATE_RANK="1",
        PYTHONPATH=f"{SLOW_OP}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    result = subprocess.run(
        [str(PLAIT), "run", "nap", "--nproc", "2", "--timeout", "3", "--inputs", "inputs.st"],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert re.search(
        r"plait: error: rank 0: a collective failed at nap/plan.mlir:\d+:\d+ "
        r"plait.all_gather: (Timed out waiting 6000ms|Application timeout caused pair closure)",
        result.stderr,
    ), result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


USER_LIBRARY = """\
import torch


@torch.library.custom_op("userops::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@double.register_fake
def _(x):
    return torch.empty_like(x)
"""


class _WithUserOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.ops.userops.double(torch.relu(self.up(x))))


def test_worker_ranks_import_the_callers_custom_op_library(tmp_path, monkeypatch):
    """A library the caller imported from its own folder (not on the workers'
    path: they start with -P) registers its ops on every rank too."""
    (tmp_path / "userops.py").write_text(USER_LIBRARY)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("userops")
    torch.manual_seed(0)
    model, x = _WithUserOp(), torch.randn(4, 16)
    compiled = plait.compile(model, (x,), pipeline="shard{mesh=tp:2}")
    try:
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    finally:
        compiled.close()
