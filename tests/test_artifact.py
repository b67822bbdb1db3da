"""Artifacts: save and load give back the same model; incomplete, edited or
foreign directories are refused with a message that says what to do."""

from __future__ import annotations

import json
import os
import re
import stat

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


# ---- weights are checked against their recorded hashes -------------------


def _extents(path) -> dict[str, tuple[int, int]]:
    """Each tensor's absolute byte range in a safetensors file (read from its header)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    return {
        k: (8 + length + v["data_offsets"][0], 8 + length + v["data_offsets"][1])
        for k, v in header.items()
    }


def _flip_bytes(path, start: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["first", "last"])
def test_flipped_weight_bytes_are_refused_before_anything_runs(saved, tmp_path, which):
    copy = _copy(saved, tmp_path)
    weights = copy / "weights.safetensors"
    extents = sorted(_extents(weights).items(), key=lambda item: item[1])
    key, (start, end) = extents[0] if which == "first" else extents[-1]
    _flip_bytes(weights, (start + end) // 2, min(64, end - (start + end) // 2))
    with pytest.raises(WeightError) as info:
        plait.load(copy)
    message = str(info.value)
    assert str(weights) in message and f"tensor '{key}'" in message and "sha256" in message


def test_no_verify_skips_the_weight_check(saved, tmp_path, example, capsys):
    from plait.cli import main

    copy = _copy(saved, tmp_path)
    weights = copy / "weights.safetensors"
    start, end = _extents(weights)["lm_head.weight"]
    _flip_bytes(weights, start + 8, 4)  # one float of the output head
    assert main(["run", str(copy)]) == 1
    assert "does not match the sha256" in capsys.readouterr().err
    assert main(["run", str(copy), "--no-verify"]) == 0
    _, inputs, _ = example("gpt2-tiny")
    assert plait.load(copy, verify=False)(*inputs).shape == plait.load(saved)(*inputs).shape


def test_an_older_artifact_format_asks_for_a_recompile(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 1  # written before weights had hashes
    del manifest["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"\(artifact format 1\).*Recompile the model"):
        plait.load(copy)


# ---- saves are atomic and every file gets the same permissions ----------


def test_an_interrupted_save_leaves_the_previous_artifact_intact(saved, tmp_path, example):
    target = _copy(saved, tmp_path)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    # its plan and program save fine; its weights have no data, so the save stops there
    unsaveable = plait.compile(
        torch.nn.Linear(4, 4, device="meta"), (torch.empty(2, 4, device="meta"),)
    )
    with pytest.raises(WeightError, match="meta device"):
        unsaveable.save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no staging dir left
    _, inputs, _ = example("gpt2-tiny")
    assert torch.equal(plait.load(target)(*inputs), plait.load(saved)(*inputs))


def test_saving_replaces_an_artifact_but_not_other_directories(compiled, saved, tmp_path):
    target = _copy(saved, tmp_path)
    (target / "stale.txt").write_text("from the old artifact")
    compiled("gpt2-tiny").save(target)  # over an artifact: replaced whole
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in saved.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds no plait artifact"):
        compiled("gpt2-tiny").save(other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_every_artifact_file_gets_the_umask_permissions(compiled, tmp_path):
    old = os.umask(0o027)
    try:
        directory = compiled("gpt2-tiny").save(tmp_path / "art")
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    assert modes == dict.fromkeys(modes, 0o640)  # weights.safetensors included


# ---- the rank files are checked: every rank, any device index -----------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    program = plait.compile(
        model, (torch.randn(2, 8),), pipeline="canonicalize,shard{mesh=tp:2},dce"
    )
    return program.save(tmp_path_factory.mktemp("tp2"))


def test_a_device_index_is_not_an_edit(saved, compiled, example):
    _, inputs, _ = example("gpt2-tiny")
    assert "device" in (saved / "rank0.py").read_text()  # the program names its device
    loaded = plait.load(saved, device="cpu:1")  # as torchrun gives cuda:N per rank
    assert loaded.device == torch.device("cpu:1")
    assert torch.equal(loaded(*inputs), compiled("gpt2-tiny")(*inputs))


def test_every_rank_file_is_checked(sharded, tmp_path):
    plait.load(sharded)
    copy = _copy(sharded, tmp_path)
    (copy / "rank1.py").write_text((copy / "rank1.py").read_text().replace("'sum'", "'max'"))
    with pytest.raises(ArtifactError, match=r"rank1\.py does not match the program rebuilt"):
        plait.load(copy)


def test_another_torch_version_warns_instead_of_checking(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["torch_version"] = "2.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    versions = rf"torch 2\.0\.0, this is torch {re.escape(torch.__version__)}"
    with pytest.warns(UserWarning, match=versions):
        plait.load(copy)


# ---- every malformed manifest field is an ArtifactError naming it ---------


def _set(path: str, value):
    def mutate(manifest):
        *parents, last = path.split(".")
        for key in parents:
            manifest = manifest[key]
        manifest[last] = value

    return mutate


def _delete(path: str):
    def mutate(manifest):
        *parents, last = path.split(".")
        for key in parents:
            manifest = manifest[key]
        del manifest[last]

    return mutate


MALFORMED = [
    ("outputs.treespec", _set("outputs.treespec", "[1, {not json")),
    ("outputs.treespec", _set("outputs.treespec", '[1, {"type": "no.such.Type"}]')),
    ("outputs.treespec", _set("outputs.treespec", 7)),
    ("outputs.count", _set("outputs.count", "1")),
    ("outputs", _set("outputs", None)),
    ("outputs", _delete("outputs")),
    ("generation", _set("generation", [2])),
    ("generation.eos_token_id", _set("generation", {"eos_token_id": "two"})),
    ("mesh", _set("mesh", "tp:2")),
    ("mesh.world_size", _set("mesh.world_size", 0)),
    ("mesh.axes.tp", _set("mesh.axes", {"tp": "2"})),
    ("inputs", _set("inputs", {"input_ids": "i64"})),
    ("inputs[0].name", _set("inputs", [{"name": 1, "type": "tensor<[2], i64>"}])),
    ("inputs[0].type", _set("inputs", [{"name": "input_ids"}])),
    ("symbols.seq", _set("symbols.seq", [2])),
    ("symbols", _set("symbols", "seq=2..256")),
    ("device", _set("device", "gpu")),
    ("device", _set("device", "cpu:1")),
    ("device", _set("device", 0)),
    ("pipeline", _set("pipeline", None)),
    ("programs", _set("programs", ["rank0.py"])),
    ("programs.zero", _set("programs", {"zero": "rank0.py"})),
    ("programs.0", _set("programs", {"0": "sub/rank0.py"})),
    ("programs", _set("programs", {"0": "rank0.py", "1": "rank0.py"})),  # plan has one rank
    ("weights", _set("weights", 3)),
    ("plan", _delete("plan")),
    ("torch_version", _delete("torch_version")),
    ("sha256", _delete("sha256")),
    ("sha256", _set("sha256", {})),  # nothing for weights.safetensors
    (
        "sha256.weights.safetensors.lm_head.weight",
        _set("sha256", {"weights.safetensors": {"lm_head.weight": "abc"}}),
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    "field,mutate", MALFORMED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(MALFORMED)]
)
def test_a_malformed_manifest_field_is_named(saved, tmp_path, field, mutate):
    copy = _copy(saved, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    mutate(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as info:
        plait.load(copy)
    assert f"{copy / 'manifest.json'}: field '{field}'" in str(info.value)
