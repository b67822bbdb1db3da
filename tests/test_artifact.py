"""Artifacts: save and load give back the same model; incomplete, edited or
foreign directories are refused with a message that says what to do."""

from __future__ import annotations

import json

import plait
import pytest
import torch
from plait.ir.weights import WeightError, WeightStore
from plait.runtime.artifact import ArtifactError
from safetensors import safe_open
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    directory = tmp_path_factory.mktemp("artifact")
    compiled("gpt2-tiny").save(directory)
    return directory


def _copy(saved, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(saved, target)
    return target


def test_save_and_load_roundtrip(saved, example, compiled):
    model, inputs, _ = example("gpt2-tiny")
    loaded = plait.load(saved)
    assert sorted(p.name for p in saved.iterdir()) == [
        "manifest.json",
        "plan.mlir",
        "rank0.py",
        "weights.safetensors",
    ]
    assert loaded.ir == compiled("gpt2-tiny").ir
    assert loaded.code == (saved / "rank0.py").read_text()
    assert torch.equal(loaded(*inputs), compiled("gpt2-tiny")(*inputs))
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["plait_version"] == plait.__version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["pipeline"] == "canonicalize,cse,dce"
    assert manifest["inputs"][0] == {"name": "input_ids", "type": "tensor<[batch, seq], i64>"}
    assert manifest["symbols"]["seq"] == [2, 256]
    with safe_open(str(saved / "weights.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert stored == set(loaded.weight_names)  # only what the plan uses


def test_tied_weights_are_stored_once(tmp_path):
    store = WeightStore()
    table = torch.randn(8, 4)
    store.add("embed.weight", table)
    store.add("lm_head.weight", table)
    store.add("norm.weight", torch.ones(4))
    store.save(tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 2
    again = WeightStore()
    again.add_safetensors(tmp_path / "w.safetensors")
    assert torch.equal(again.get("lm_head.weight"), table) and torch.equal(
        again.get("embed.weight"), table
    )


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_rank_reads_its_piece_of_every_block(tmp_path, on_disk):
    # a fused q/k/v weight [8 + 4 + 4, 3] over 2 ranks: rank 1 holds q[4:8], k[2:4], v[2:4]
    weight = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    store = WeightStore()
    store.add("qkv.weight", weight)
    if on_disk:  # read slice by slice from the file
        store.save(tmp_path / "w.safetensors")
        store = WeightStore()
        store.add_safetensors(tmp_path / "w.safetensors")
    piece = store.get_shard("qkv.weight", 0, 1, 2, (8, 4, 4))
    assert torch.equal(piece, torch.cat([weight[4:8], weight[10:12], weight[14:16]]))
    with pytest.raises(WeightError, match=r"as blocks \[8, 4, 3\]"):
        store.get_shard("qkv.weight", 0, 1, 2, (8, 4, 3))


def test_missing_directory_and_missing_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        plait.load(tmp_path / "nope")
    with pytest.raises(ArtifactError, match=r"not a plait artifact \(no manifest.json\)"):
        plait.load(tmp_path)


def test_incomplete_artifact(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    (copy / "weights.safetensors").unlink()
    with pytest.raises(
        ArtifactError, match="incomplete artifact, missing weights.safetensors; recompile"
    ):
        plait.load(copy)


def test_artifact_from_another_plait_version(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["plait_version"] = "9.3.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"written by plait 9\.3\.0 .* Recompile the model"):
        plait.load(copy)


def test_malformed_manifest(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    (copy / "manifest.json").write_text('{"format": "plait-artifact",\n "x": }')
    with pytest.raises(ArtifactError, match=r"manifest.json:2:7: invalid JSON"):
        plait.load(copy)


def test_edited_program_is_refused(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    (copy / "rank0.py").write_text((copy / "rank0.py").read_text() + "\nimport os\n")
    with pytest.raises(ArtifactError, match="does not match the program rebuilt from plan.mlir"):
        plait.load(copy)


def test_malformed_plan_names_line_and_column(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    lines = (copy / "plan.mlir").read_text().splitlines()
    lines[4] = lines[4].replace("plait.param", "plait.parm")
    (copy / "plan.mlir").write_text("\n".join(lines))
    with pytest.raises(plait.PlaitError, match=r"plan\.mlir:5:\d+: error: .*plait\.parm"):
        plait.load(copy)


def test_checkpoint_missing_a_tensor(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    with safe_open(str(copy / "weights.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "lm_head.weight"}
    save_file(tensors, str(copy / "weights.safetensors"))
    with pytest.raises(
        WeightError, match="weight 'lm_head.weight' is not in .*weights.safetensors"
    ):
        plait.load(copy)


def test_manifest_file_names_must_stay_inside_the_artifact(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["plan"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="must be plain file names inside the artifact"):
        plait.load(copy)


def test_corrupt_weights_file(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    (copy / "weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightError, match="cannot read safetensors weights"):
        plait.load(copy)
