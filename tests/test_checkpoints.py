"""Training checkpoints as pieces the ranks write (plait.runtime.checkpoint):
the index reassembles whole tensors and slices of them; a process killed
mid-save keeps the previous checkpoint; an asynchronous save holds the state
of its step while training goes on, and its errors raise where it is waited
for. (Sharded runs' checkpoints: test_training_parallel.py and test_zero.py.)"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import plait
import pytest
import torch
from plait.ir.weights import WeightStore, flat_piece
from plait.runtime import artifact, checkpoint
from test_training import MLP, _mlp_batches

HERE = Path(__file__).parent


def _trainer():
    return plait.compile_training(MLP(), _mlp_batches(1)[0], lr=1e-2), _mlp_batches(4)


def _saved(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds, whole, by name."""
    manifest = json.loads((directory / artifact.MANIFEST).read_text())
    weights = artifact.read_weights(directory, manifest, [])
    return {name: weights.get(name) for name in weights.names()}


# ---- the index ------------------------------------------------------------------------


@pytest.fixture
def pieces(tmp_path):
    """Two ranks' pieces: `w` split on dim 0 as two blocks (fused q/k), `m`'s
    flat pieces (ZeRO, padded), `r` replicated (rank 0 alone writes it)."""
    w, m, r = torch.arange(48.0).reshape(8, 6), torch.arange(15.0).reshape(5, 3), torch.ones(4, 2)
    blocks = (4, 4)
    for rank in range(2):
        held = [
            checkpoint.Piece(
                "w",
                torch.cat([w[rank * 2 : rank * 2 + 2], w[4 + rank * 2 :][:2]]),
                (0, rank, 2, blocks),
            ),
            checkpoint.Piece("m", flat_piece(m, rank, 2), None, (rank, 2)),
        ]
        checkpoint.write_pieces(tmp_path, rank, held + [checkpoint.Piece("r", r)] * (rank == 0))
    hashes = checkpoint.write_index(tmp_path, 2, {"w": [8, 6], "m": [5, 3]})  # r: its own
    return tmp_path, set(hashes), {"w": w, "m": m, "r": r}


def test_the_index_reads_whole_tensors_and_slices(pieces):
    directory, files, expected = pieces
    weights = WeightStore()
    assert checkpoint.add_indexed(weights, directory, files) == {"w", "m", "r"}
    w = expected["w"]
    assert weights.get_shard("w", 0, 1, 2, (4, 4)).equal(torch.cat([w[2:4], w[6:8]]))  # a file's
    assert weights.get_shard("w", 1, 0, 2).equal(w[:, :3])  # across both files
    assert weights.get_shard("r", 0, 1, 2).equal(expected["r"][2:])
    assert weights.as_meta().get("m").shape == (5, 3)
    for name, tensor in expected.items():
        assert weights.get(name).equal(tensor), name


def test_a_rank_reads_only_the_file_that_holds_its_piece(pieces):
    directory, files, expected = pieces
    weights = WeightStore()
    checkpoint.add_indexed(weights, directory, files)
    (directory / "state-rank0.safetensors").unlink()
    w = expected["w"]
    assert weights.get_shard("w", 0, 1, 2, (4, 4)).equal(torch.cat([w[2:4], w[6:8]]))
    assert weights.get_piece("m", None, (1, 2)).equal(flat_piece(expected["m"], 1, 2))
    with pytest.raises(FileNotFoundError):  # where rank 0's pieces are needed
        weights.get_piece("m", (1, 0, 3, None), (1, 2))


def test_an_index_missing_a_piece_names_the_tensor(pieces):
    directory, files, _ = pieces
    index = json.loads((directory / checkpoint.INDEX).read_text())
    index["tensors"]["w"]["pieces"].pop()
    (directory / checkpoint.INDEX).write_text(json.dumps(index))
    with pytest.raises(checkpoint.CheckpointError, match="tensor 'w'.*do not cover"):
        checkpoint.add_indexed(WeightStore(), directory, files)


def test_an_index_naming_an_unhashed_file_is_refused(pieces):
    directory, files, _ = pieces
    with pytest.raises(checkpoint.CheckpointError, match="tensor '.'.*does not hash"):
        checkpoint.add_indexed(WeightStore(), directory, files - {"state-rank1.safetensors"})


# ---- a save killed midway -------------------------------------------------------------


def _save_then_die(directory: str) -> None:
    """A step, a save, another step, then a save killed once its state file
    is written (before its manifest and the rename): SIGKILL, no cleanup."""
    trainer, batches = _trainer()
    trainer.step(*batches[0])
    trainer.save(directory)
    trainer.step(*batches[1])
    write = checkpoint.write_file

    def write_then_die(path, tensors):
        write(path, tensors)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.write_file = write_then_die
    trainer.save(directory)


def test_a_save_killed_midway_keeps_the_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    paths = [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = f"import test_checkpoints as t; t._save_then_die({str(directory)!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert artifact.staging(directory).is_dir()  # the killed save's pieces, never renamed

    loaded = plait.load_training(directory)
    assert loaded.steps == 1
    straight, batches = _trainer()
    expected = [straight.step(*b) for b in batches]
    assert all(loaded.step(*b).equal(e) for b, e in zip(batches[1:], expected[1:]))
    loaded.save(directory)  # over what the killed save left
    assert not artifact.staging(directory).exists()
    assert plait.load_training(directory).steps == len(batches)


def test_a_checkpoint_saved_over_another_replaces_it_whole(tmp_path):
    """The replaced checkpoint is moved aside at once and deleted by a thread
    (its gigabytes take a while to unlink): afterwards only the new one is there."""
    trainer, batches = _trainer()
    trainer.step(*batches[0])
    trainer.save(tmp_path / "ckpt")
    trainer.step(*batches[1])
    trainer.save(tmp_path / "ckpt")
    for thread in threading.enumerate():
        if thread.name == "plait-remove-replaced":
            thread.join()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert plait.load_training(tmp_path / "ckpt").steps == 2


# ---- asynchronous saves ---------------------------------------------------------------


def test_an_asynchronous_save_holds_its_steps_state_while_training_goes_on(tmp_path, monkeypatch):
    trainer, batches = _trainer()
    trainer.step(*batches[0])
    trainer.save(tmp_path / "sync")
    release, write = threading.Event(), checkpoint.write_file

    def held(path, tensors):  # the write waits until the steps below updated the state
        assert release.wait(60)
        write(path, tensors)

    monkeypatch.setattr(checkpoint, "write_file", held)
    assert trainer.save(tmp_path / "async", asynchronous=True) == tmp_path / "async"
    later = [trainer.step(*b) for b in batches[1:]]
    assert not (tmp_path / "async").exists()
    release.set()
    assert trainer.wait_saved() == tmp_path / "async"
    assert trainer.wait_saved() is None

    synchronous, asynchronous = _saved(tmp_path / "sync"), _saved(tmp_path / "async")
    assert synchronous.keys() == asynchronous.keys()
    assert all(asynchronous[n].equal(t) for n, t in synchronous.items())
    loaded = plait.load_training(tmp_path / "async")
    assert loaded.steps == 1
    assert all(loaded.step(*b).equal(loss) for b, loss in zip(batches[1:], later))


def test_an_asynchronous_saves_error_raises_when_waited_for(tmp_path, monkeypatch):
    trainer, batches = _trainer()
    trainer.step(*batches[0])
    trainer.save(tmp_path / "ckpt")

    def full(path, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_file", full)
    trainer.save(tmp_path / "ckpt", asynchronous=True)
    trainer.step(*batches[1])
    with pytest.raises(OSError, match="No space left"):
        trainer.close()  # waits for the save
    assert not artifact.staging(tmp_path / "ckpt").exists()
    assert plait.load_training(tmp_path / "ckpt").steps == 1


# ---- initial weights from a torch Distributed Checkpoint ------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save
def test_training_starts_from_a_dcp_checkpoints_weights(tmp_path):
    import torch.distributed.checkpoint as dcp

    other = MLP()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    weights = other.state_dict()
    dcp.save(weights, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    model, batches = MLP(), _mlp_batches(2)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    trainer = plait.compile_training(model, batches[0], lr=1e-2, initial_weights=tmp_path / "dcp")
    expected = MLP()
    expected.load_state_dict(weights)
    reference = plait.compile_training(expected, batches[0], lr=1e-2)
    assert all(trainer.step(*b).equal(reference.step(*b)) for b in batches)
    assert all(model.state_dict()[n].equal(t) for n, t in before.items())  # not changed


class _Code:
    def __reduce__(self):
        return (os.getpid, ())  # harmless here; any callable would run on a plain unpickle


def test_dcp_metadata_naming_other_objects_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Code()))
    with pytest.raises(checkpoint.CheckpointError, match="'posix.getpid'.*does not unpickle"):
        plait.compile_training(MLP(), _mlp_batches(1)[0], initial_weights=tmp_path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save
def test_a_dcp_checkpoint_missing_a_tensor_names_it(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"fc1.weight": torch.zeros(16, 8)}, checkpoint_id=str(tmp_path), no_dist=True)
    with pytest.raises(checkpoint.CheckpointError, match="no tensor 'fc1.bias'"):
        plait.compile_training(MLP(), _mlp_batches(1)[0], initial_weights=tmp_path)


def test_a_single_file_checkpoint_of_earlier_plaits_still_loads(tmp_path):
    """Before the ranks wrote pieces, a checkpoint held its whole tensors in
    weights.safetensors and its manifest no state index."""
    trainer, batches = _trainer()
    trainer.step(*batches[0])
    trainer.save(tmp_path / "new")
    contents, _, _ = artifact.read(tmp_path / "new")
    manifest = {k: v for k, v in contents.manifest.items() if k != artifact.STATE}
    old = WeightStore()
    for name, tensor in _saved(tmp_path / "new").items():
        old.add(name, tensor)
    single = artifact.Artifact(contents.plan, contents.programs, manifest)
    artifact.write(tmp_path / "old", single, old, old.names())
    assert not (tmp_path / "old" / checkpoint.INDEX).exists()
    loaded, expected = plait.load_training(tmp_path / "old"), trainer.step(*batches[1])
    assert loaded.steps == 1 and loaded.step(*batches[1]).equal(expected)
