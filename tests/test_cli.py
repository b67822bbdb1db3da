"""The `plait` CLI end to end: compile, run, opt, IR dumps fed back in, and
clear errors for bad MODEL specs and bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plait.cli import main
from safetensors.torch import load_file, save_file


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "plait"  # installed beside the interpreter
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "plait compile --example llama-tiny" in result.stdout


def test_compile_run_dump_opt_and_recompile(tmp_path, capsys):
    artifact, dumps = tmp_path / "llama", tmp_path / "dumps"
    code, _, err = _run(
        capsys,
        "compile",
        "--example",
        "llama-tiny",
        "-o",
        str(artifact),
        "--time-passes",
        "--dump-ir",
        str(dumps),
    )
    assert code == 0, err
    assert "canonicalize" in err and f"-> {artifact}" in err
    assert sorted(p.name for p in dumps.iterdir())[0] == "00-input.mlir"

    code, _, err = _run(
        capsys,
        "run",
        str(artifact),
        "--dim",
        "seq=12",
        "--dim",
        "batch=3",
        "--output",
        str(tmp_path / "a.safetensors"),
    )
    assert code == 0, err
    assert "output 0: (3, 12, 256) float32" in err

    canonical = tmp_path / "canonical.mlir"
    code, _, err = _run(
        capsys,
        "opt",
        str(dumps / "00-input.mlir"),
        "--pipeline",
        "canonicalize",
        "-o",
        str(canonical),
    )
    assert code == 0, err
    code, _, err = _run(
        capsys,
        "compile",
        str(canonical),
        "--weights",
        str(artifact / "weights.safetensors"),
        "-o",
        str(tmp_path / "again"),
    )
    assert code == 0, err
    code, _, err = _run(
        capsys,
        "run",
        str(tmp_path / "again"),
        "--dim",
        "seq=12",
        "--dim",
        "batch=3",
        "--output",
        str(tmp_path / "b.safetensors"),
    )
    assert code == 0, err
    first, second = (
        load_file(str(tmp_path / "a.safetensors")),
        load_file(str(tmp_path / "b.safetensors")),
    )
    assert torch.allclose(first["output_0"], second["output_0"], rtol=0, atol=1e-6)


def test_run_with_given_inputs(compiled, example, tmp_path, capsys):
    model, inputs, _ = example("cnn-tiny")
    compiled("cnn-tiny").save(tmp_path / "cnn")
    save_file({"images": inputs[0]}, str(tmp_path / "in.safetensors"))
    code, _, err = _run(
        capsys,
        "run",
        str(tmp_path / "cnn"),
        "--inputs",
        str(tmp_path / "in.safetensors"),
        "--output",
        str(tmp_path / "out.safetensors"),
    )
    assert code == 0, err
    with torch.no_grad():
        assert torch.allclose(
            load_file(str(tmp_path / "out.safetensors"))["output_0"], model(*inputs), atol=1e-6
        )
    save_file({"pixels": inputs[0]}, str(tmp_path / "wrong.safetensors"))
    code, _, err = _run(
        capsys, "run", str(tmp_path / "cnn"), "--inputs", str(tmp_path / "wrong.safetensors")
    )
    assert code == 1 and "lacks input(s) images" in err
    code, _, err = _run(capsys, "run", str(tmp_path / "cnn"), "--dim", "batchh=3")
    assert code == 1 and "the model has no size symbol 'batchh'; symbols: batch" in err


FACTORY = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.fc(x))

def build():
    torch.manual_seed(0)
    return Net(), (torch.randn(2, 4),)

def only_model():
    return Net()
"""


def test_compile_a_factory_file(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(FACTORY)
    code, out, err = _run(capsys, "compile", f"{path}:build", "--emit", "python")
    assert code == 0, err
    assert "torch.tanh(" in out
    code, _, err = _run(capsys, "compile", f"{path}:missing")
    assert code == 1 and "has no function 'missing'; functions there: Net, build, only_model" in err
    code, _, err = _run(capsys, "compile", f"{path}:only_model")
    assert code == 1 and "return (model, example_inputs)" in err
    code, _, err = _run(capsys, "compile", str(path))
    assert code == 1 and f"name the factory function in {path}: {path}:FUNCTION" in err


def test_compile_a_hugging_face_checkpoint_directory(tmp_path, capsys):
    from plait.frontend import hf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    ).eval()
    model.save_pretrained(tmp_path / "ckpt")
    code, _, err = _run(capsys, "compile", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"))
    assert code == 0, err
    ids, mask = hf.example_inputs(model, 2, 9)
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "in.safetensors"))
    code, _, err = _run(
        capsys,
        "run",
        str(tmp_path / "out"),
        "--inputs",
        str(tmp_path / "in.safetensors"),
        "--output",
        str(tmp_path / "o.safetensors"),
    )
    assert code == 0, err
    with torch.no_grad():
        ref = hf.wrap(model)(ids, mask)
    assert torch.allclose(load_file(str(tmp_path / "o.safetensors"))["output_0"], ref, atol=1e-5)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compile", "no/such/model.py:build"], "no/such/model.py: no such file"),
        (["compile", "does-not-exist"], "MODEL 'does-not-exist' does not exist"),
        (["compile", "--example", "bert-huge"], "unknown example 'bert-huge'; examples: cnn-tiny"),
        (["compile"], "give a MODEL"),
        (["run", "/no/such/dir"], "no such artifact directory"),
        (
            ["compile", "--example", "cnn-tiny", "--pipeline", "canonicalize,fold"],
            "unknown pass 'fold'",
        ),
        (["opt", "/no/such/file.mlir"], "No such file or directory: '/no/such/file.mlir'"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    code, _, err = _run(capsys, *argv)
    assert code == 1
    assert message in err


def test_opt_reports_parse_errors_with_position(tmp_path, capsys):
    path = tmp_path / "bad.mlir"
    path.write_text(
        "builtin.module {\n  func.func @f() {\n    %x = plait.param 42 : !plait.tensor<[2], f32>\n  }\n}\n"
    )
    code, _, err = _run(capsys, "opt", str(path), "--pipeline", "cse")
    assert code == 1
    assert f"{path}:3:22: error:" in err


def test_opt_lists_passes(capsys):
    code, out, _ = _run(capsys, "opt", "--list-passes")
    assert code == 0 and "canonicalize" in out and "dce" in out


def test_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "plait.cli", "compile", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--print-ir-after-all" in result.stdout


def test_run_a_sharded_artifact_on_two_ranks_through_torchrun(tmp_path, capsys):
    single, sharded = tmp_path / "one", tmp_path / "tp2"
    assert main(["compile", "--example", "llama-tiny", "-o", str(single)]) == 0
    assert (
        main(
            [
                "compile",
                "--example",
                "llama-tiny",
                "-o",
                str(sharded),
                "--pipeline",
                "canonicalize,cse,dce,shard{mesh=tp:2},dce",
            ]
        )
        == 0
    )
    assert "--nproc 2" in capsys.readouterr().err
    assert main(["run", str(single), "--dim", "seq=9", "--output", str(tmp_path / "a.st")]) == 0
    script = Path(sys.executable).parent / "plait"
    result = subprocess.run(
        [
            str(script),
            "run",
            str(sharded),
            "--nproc",
            "2",
            "--dim",
            "seq=9",
            "--output",
            str(tmp_path / "b.st"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = (
        load_file(str(tmp_path / "a.st"))["output_0"],
        load_file(str(tmp_path / "b.st"))["output_0"],
    )
    assert torch.allclose(a, b, rtol=0, atol=1e-5)
    failing = subprocess.run(
        [
            str(script),
            "run",
            str(sharded),
            "--nproc",
            "2",
            "--inputs",
            str(tmp_path / "missing.st"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failing.returncode != 0 and "missing.st" in failing.stdout + failing.stderr


def test_compile_and_run_generation(tmp_path, capsys):
    from plait.examples.models import causal_lm

    artifact = tmp_path / "gen"
    code, _, err = _run(capsys, "compile", "--example", "llama-tiny", "--generate",
                        "--max-length", "32", "-o", str(artifact))  # fmt: skip
    assert code == 0, err
    assert "--generate" in err  # the printed run command
    code, _, err = _run(capsys, "run", str(artifact), "--generate", "--prompt-ids",
                        "5,6,7,8;9,10", "--max-new-tokens", "8")  # fmt: skip
    assert code == 0, err
    model = causal_lm("llama")[0].model
    eos = model.generation_config.eos_token_id
    ids = torch.tensor([[5, 6, 7, 8], [eos, eos, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row in range(2):
        tokens = ",".join(map(str, expected[row, 4:].tolist()))
        assert f"sequence {row}: {tokens}" in err
    assert "tokens/s" in err
    code, _, err = _run(capsys, "run", str(artifact), "--generate", "--prompt", "hello")
    assert code != 0 and "needs a tokenizer" in err
    sharded = tmp_path / "gen-tp2"  # every rank runs its own decoding loop under torchrun
    code, _, err = _run(capsys, "compile", "--example", "llama-tiny", "--generate", "--max-length",
                        "32", "--pipeline", "shard{mesh=tp:2}", "-o", str(sharded))  # fmt: skip
    assert code == 0, err
    script = Path(sys.executable).parent / "plait"
    result = subprocess.run([str(script), "run", str(sharded), "--nproc", "2", "--generate",
                             "--prompt-ids", "5,6,7,8;9,10", "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for row in range(2):
        tokens = ",".join(map(str, expected[row, 4:].tolist()))
        assert f"sequence {row}: {tokens}" in result.stdout + result.stderr


def test_generation_from_a_checkpoint_with_a_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "once upon a time there was a cat that sat on the mat".split()
    vocab = {
        "[UNK]": 0,
        "<s>": 1,
        "</s>": 2,
        **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))},
    }
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                        bos_token="<s>", eos_token="</s>")  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    code, _, err = _run(capsys, "compile", str(tmp_path / "ckpt"), "--generate", "--batch", "1",
                        "--max-length", "24", "-o", str(tmp_path / "gen"))  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "gen" / "tokenizer" / "tokenizer.json").is_file()
    code, _, err = _run(capsys, "run", str(tmp_path / "gen"), "--generate", "--prompt",
                        "once upon a time", "--max-new-tokens", "6")  # fmt: skip
    assert code == 0, err
    ids = torch.tensor([tokenizer("once upon a time")["input_ids"]])
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  do_sample=False)[0, ids.shape[1]:].tolist()  # fmt: skip
    assert f"sequence 0: {','.join(map(str, expected))}" in err
    assert tokenizer.decode(expected, skip_special_tokens=True).strip() in err
