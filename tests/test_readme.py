"""The README runs: every command and code block in it is executed here, in
order, so the README cannot drift from the code.

- shell blocks: each `plait ...` command runs through the CLI (in this process;
  `--nproc` relaunches under torchrun), in a scratch directory holding the
  files the commands name (a model file, a Hugging Face checkpoint with a
  tokenizer, inputs); every one must exit 0. The two set-up commands run
  without their `pip install` steps (CI ran those), and the test command must
  be what `.ci/run` runs.
- python blocks run in one namespace, one after another, like a notebook; a
  block of `pipeline = ...` examples compiles each pipeline on the quick
  start's model; an excerpt (a block with `...` lines) must appear, line by
  line, in what plait prints.
- the Layout block names paths that exist.
- benchmark commands quoted in the text name scripts that exist, with flags
  their `--help` lists (they run for minutes to hours: not here).
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import plait
import pytest
import torch
from helpers import check_calibrated_hardware
from plait import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [
    (m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.M | re.S)
]


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _blocks_in(title: str, language: str) -> list[str]:
    section = _section(title)
    return [code for lang, code in BLOCKS if lang == language and code in section]


def _commands(block: str) -> list[str]:
    """Each command of a shell block: one per line, `a && b` split, comments dropped."""
    out = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            out.append(shlex.join(words[:end]))
            words = words[end + 1 :]
    return out


# ---- the files the CLI block names --------------------------------------------------

MODEL_PY = """\
import torch


def build():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model.eval(), (torch.randn(3, 16),)
"""


def _tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer built offline, saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<unk> <s> </s> once upon a time there was little model that ran".split()
    vocab = {w: i for i, w in enumerate(words)}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)


def _hf_checkpoint(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    _tokenizer(directory, config.vocab_size)


def _hf_config(directory: Path) -> None:
    """A config without weights, shaped so tp:8 divides its heads (estimates on meta)."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    ).save_pretrained(directory)


def _inputs(path: Path) -> None:
    from safetensors.torch import save_file

    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, path)


def _dump(path: Path) -> None:
    """IR text of the artifact in out/ (so its weights fit `--weights out/...`)."""
    path.write_text(plait.load("out/").ir)


# file named in the CLI block -> how to make it, before the first command naming it
FIXTURES = {
    "model.py": lambda p: p.write_text(MODEL_PY),
    "path/to/hf_checkpoint/": _hf_checkpoint,
    "path/to/hf_config_dir": _hf_config,
    "in.safetensors": _inputs,
    "dump.mlir": _dump,
}


def _run_cli(command: str, capsys) -> str:
    argv = shlex.split(command)
    assert argv[0] == "plait", f"not a plait command: {command}"
    redirect = None
    if ">" in argv:  # `plait ... > file`: stdout into the file
        argv, redirect = argv[: argv.index(">")], argv[argv.index(">") + 1]
    try:
        code = cli.main(argv[1:])
    except SystemExit as exit:  # argparse's own --help and --version
        code = exit.code or 0
    out, err = capsys.readouterr()
    assert code == 0, f"`{command}` exited {code}:\n{out}\n{err}"
    if redirect is not None:
        assert out, f"`{command}` printed no results to stdout"
        Path(redirect).write_text(out)
    return out + err


# ---- tests ---------------------------------------------------------------------------


def test_setup_commands_are_what_ci_runs(tmp_path):
    install, tests = _blocks_in("Set up", "")[:2]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests.strip(), "the README's test command must be exactly what .ci/run runs"
    steps = _commands(install)
    assert steps[:2] == ["pip install torch==2.13.0", "pip install '.[hf]'"], steps
    for command in steps[2:]:  # the installs ran when this environment was made
        argv = shlex.split(command)
        script = Path(sys.executable).parent / argv[0]
        result = subprocess.run(
            [str(script), *argv[1:]], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"`{command}`:\n{result.stdout}\n{result.stderr}"


def test_cli_block_runs(tmp_path, monkeypatch, capsys, compiled):
    (block,) = _blocks_in("Quick start: CLI", "")
    monkeypatch.chdir(tmp_path)
    made = set()
    for command in _commands(block):
        for name, make in FIXTURES.items():
            if name.rstrip("/") in command and name not in made:
                path = tmp_path / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if name.endswith("/"):
                    path.mkdir()
                make(path)
                made.add(name)
        _run_cli(command, capsys)
    assert made == set(FIXTURES), f"fixtures no command uses: {set(FIXTURES) - made}"
    # what `plait calibrate -o my-cpu.toml` wrote: this machine, read by the cost model
    check_calibrated_hardware(tmp_path / "my-cpu.toml", compiled("llama-tiny"))


def _pipelines(block: str) -> list[str] | None:
    """The values of a block that only assigns `pipeline = "..."`, else None."""
    tree = ast.parse(block)
    if not all(isinstance(s, ast.Assign) and s.targets[0].id == "pipeline" for s in tree.body):
        return None
    return [ast.literal_eval(s.value) for s in tree.body]


def _excerpt_lines(block: str) -> list[str]:
    return [line.strip() for line in block.splitlines() if line.strip() not in ("", "...")]


def test_python_blocks_run(tmp_path, monkeypatch):
    from plait.frontend import hf

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = [code for lang, code in BLOCKS if lang == "python"]
    ran = 0
    for code in blocks:
        pipelines = _pipelines(code)
        if pipelines is not None:
            # on the quick start's model and dynamic dims; a data axis splits the
            # batch, which needs a static (or declared even) batch
            model = namespace["model"]
            inputs = hf.example_inputs(model, batch=2, seq=16)
            captured = {  # each captured once; every pipeline runs on a copy
                static: plait.compile(
                    hf.wrap(model),
                    inputs,
                    pipeline="",
                    dynamic_shapes=None if static else hf.dynamic_shapes(max_batch=8, max_seq=1024),
                )
                for static in (False, True)
            }
            for pipeline in pipelines:
                base = captured["dp:" in pipeline or "ep:" in pipeline]
                compiled = plait.compile_ir(base.module.clone(), base.weights, pipeline=pipeline)
                assert compiled.world_size >= 1
            ran += 1
        elif any(line.strip() == "..." for line in code.splitlines()):
            source = namespace["compiled"].code  # an excerpt of the quick start's program
            missing = [line for line in _excerpt_lines(code) if line not in source]
            assert not missing, f"README excerpt lines not in compiled.code: {missing}"
        else:
            exec(compile(code, "README.md", "exec"), namespace)
            ran += 1
    assert ran >= 3


def test_ir_excerpts_are_real(compiled):
    """The IR excerpts appear in plait's own dumps of the models they describe."""
    from plait.examples.models import causal_lm

    llama = compiled("llama-tiny").ir
    model = causal_lm("llama")[0].model
    generation = plait.compile_generation(
        model, batch=2, max_length=48, pipeline="canonicalize,cse,dce,shard{mesh=tp:2}"
    ).ir
    for code in (c for lang, c in BLOCKS if lang == "mlir"):
        missing = [line for line in _excerpt_lines(code) if line not in llama + generation]
        assert not missing, f"README IR lines plait does not print: {missing}"


def test_layout_names_paths_that_exist():
    (block,) = _blocks_in("Layout", "")
    for line in block.splitlines():
        for word in line.split():
            if word.endswith("/") or word.endswith(".py"):
                assert (ROOT / word).exists(), f"the Layout section names {word}, which is gone"


def _flags_of(script: Path) -> set[str]:
    """The options a script's argparse parser declares (read, not run: the
    benchmarks import torch and friends, seconds each)."""
    flags = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    return flags


def test_benchmark_commands_name_real_scripts_and_flags():
    commands = re.findall(r"`(?:sudo )?(python benchmarks/[^`]+)`", README)
    assert commands
    for command in commands:
        argv = shlex.split(command.split(" && ")[0])
        script = ROOT / argv[1]
        assert script.is_file(), f"{argv[1]} does not exist"
        flags = {a.split("=")[0] for a in argv[2:] if a.startswith("--")}
        missing = flags - _flags_of(script)
        assert not missing, f"{argv[1]} does not take {sorted(missing)}"


def test_a_snippet_error_would_be_caught(tmp_path, monkeypatch, capsys):
    """The CLI runner fails on a command that fails (so the tests above can fail)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="exited"):
        _run_cli("plait run no-such-artifact/", capsys)
