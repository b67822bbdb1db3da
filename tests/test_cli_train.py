"""`plait train` end to end on the tiny Llama: its losses are exactly
plait.compile_training's on the same batches (synthetic ones by the rule its
help states, or --data's rows); --save then --resume continues as one run
would; a dp:2 run on worker ranks and the same run under torchrun (--nproc 2)
agree exactly; bad input is one error line."""

from __future__ import annotations

import contextlib
import io
import re

import plait
import pytest
import torch
from plait.cli import main
from plait.examples.models import llama_tiny
from safetensors.torch import save_file

ROWS, SEQ, STEPS = 2, 16, 3
TINY = ["train", "--example", "llama-tiny", "--batch", str(ROWS), "--seq", str(SEQ)]
DP2 = "canonicalize,cse,dce,shard{mesh=dp:2}"


def _ids(step: int, seed: int = 0) -> torch.Tensor:
    """Step `step`'s synthetic token ids, as `plait train --help` says they are made."""
    generator = torch.Generator().manual_seed(seed + step)
    return torch.randint(0, 256, (ROWS, SEQ), generator=generator)


def _losses(err: str) -> dict[int, torch.Tensor]:
    """Each logged step's loss (printed with 9 digits: the float32 exactly), by step."""
    found = re.findall(r"^step \d+/\d+ \(#(\d+)\): loss (\S+),", err, re.M)
    return {int(step): torch.tensor(float(loss), dtype=torch.float32) for step, loss in found}


def _train(*argv) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `plait *argv` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def reference() -> list[torch.Tensor]:
    """plait.compile_training's losses in Python on the synthetic batches of steps 0-2."""
    model = llama_tiny()[0].model
    trainer = plait.compile_training(model, (_ids(0), _ids(0)))  # the CLI's defaults
    return [trainer.step(_ids(step), _ids(step)) for step in range(STEPS)]


@pytest.fixture(scope="module")
def from_data(tmp_path_factory):
    """Two steps on a --data file holding steps 0 and 1's ids, then saved."""
    directory = tmp_path_factory.mktemp("train")
    data, checkpoint = directory / "batches.safetensors", directory / "ckpt"
    save_file({"input_ids": torch.cat([_ids(0), _ids(1)])}, str(data))
    return (
        checkpoint,
        *_train(*TINY, "--steps", "2", "--data", str(data), "--save", str(checkpoint)),
    )


def test_data_file_losses_equal_python(reference, from_data):
    _, code, out, err = from_data
    assert code == 0, err
    assert _losses(err) == {0: reference[0], 1: reference[1]}
    assert "trained 2 steps (to step 2)" in out


def test_resume_continues_as_one_run(reference, from_data):
    checkpoint = from_data[0]
    code, out, err = _train("train", "--resume", str(checkpoint), "--steps", "1")
    assert code == 0, err
    assert _losses(err) == {2: reference[2]}  # step 2's synthetic batch, after the file's two
    assert "trained 1 steps (to step 3)" in out
    assert re.search(r"memory per rank: parameters [\d.]+ KB, gradients [\d.]+ KB, optimizer", out)
    assert re.search(r"measured peak of step 2 \(rank 0\): [\d.]+ [KM]B", out)
    assert plait.load_training(checkpoint).steps == 2  # --resume without --save writes nothing


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> dict[int, torch.Tensor]:
    """A dp:2 run on worker ranks from this process: its losses."""
    code, _, err = _train(*TINY, "--steps", "2", "--pipeline", DP2)
    assert code == 0, err
    return _losses(err)


def test_training_starts_from_a_transformers_checkpoint_directory(tmp_path):
    """A `save_pretrained` directory's weights (not the example's: the
    embedding is doubled before saving) start the run, as they start
    compile_training on the model transformers loads from it."""
    model = llama_tiny()[0].model
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2)
    model.save_pretrained(tmp_path)
    code, _, err = _train("train", str(tmp_path), "--batch", str(ROWS), "--seq", str(SEQ),
                          "--steps", "2")  # fmt: skip
    assert code == 0, err
    trainer = plait.compile_training(model, (_ids(0), _ids(0)))
    expected = [trainer.step(_ids(step), _ids(step)) for step in range(2)]
    assert _losses(err) == dict(enumerate(expected))


def test_dp2_on_worker_ranks_matches_one_rank(pooled, reference):
    assert sorted(pooled) == [0, 1]
    for step, loss in pooled.items():  # the gradient all-reduce sums in another order
        torch.testing.assert_close(loss, reference[step], rtol=1e-5, atol=0)


def test_dp2_under_torchrun_equals_the_worker_ranks(pooled, tmp_path, capfd):
    checkpoint = tmp_path / "ckpt"
    argv = [*TINY, "--steps", "2", "--pipeline", DP2, "--nproc", "2", "--save", str(checkpoint)]
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    assert _losses(err) == pooled  # rank 0 reports; every rank ran the step
    assert "memory per rank (each of 2)" in out
    assert re.search(r"measured peak of step 0 \(rank 0\): [\d.]+ [KM]B\n", out)
    assert plait.load_training(checkpoint).steps == 2  # rank 0 wrote it


def test_a_non_finite_loss_names_its_step_and_keeps_the_checkpoint(from_data):
    from_data = from_data[0]
    before = {p.name: p.read_bytes() for p in from_data.iterdir()}
    argv = ["train", "--resume", str(from_data), "--lr", "1e38", "--steps", "3"]
    code, _, err = _train(*argv, "--save", str(from_data))
    assert code == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("plait: error:")]
    assert "step 3 (counting from 0) had a non-finite loss" in line
    assert {p.name: p.read_bytes() for p in from_data.iterdir()} == before


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--optimizer", "lion"], "optimizer 'lion' does not exist; use one of adam, adamw, sgd"),
        (["--data", "{ids}"], "has no tensor 'input_ids' (it holds ids); it needs an `input_ids`"),
        (
            ["--batch", "3", "--pipeline", DP2],
            "--batch 3 does not split over the mesh's data axes (dp:2): give --batch a multiple of 2",
        ),
        (["--resume", "{ids}"], "--resume continues the checkpoint's model and optimizer"),
    ],
)
def test_bad_input_is_one_error_line(argv, message, tmp_path):
    ids = tmp_path / "ids.safetensors"
    save_file({"ids": torch.zeros(4, SEQ, dtype=torch.long)}, str(ids))
    argv = [a.replace("{ids}", str(ids)) for a in argv]
    code, _, err = _train("train", "--example", "llama-tiny", "--seq", str(SEQ), *argv)
    assert code != 0 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("plait: error:")]
    assert message in line
