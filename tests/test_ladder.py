"""ladder: the Ladder Residual rewrite, against an independent eager
implementation of its equations on one device, and on gloo ranks against
the one-device ladder program."""

from __future__ import annotations

import plait
import pytest
import torch
from helpers import artifact_rank, max_rel_diff, run_ranks
from plait.frontend import hf
from plait.ir.text import parse_module, print_module
from plait.passes.ladder import LadderError
from plait.passes.manager import PassManager

BASE = "canonicalize,cse,dce"


def ladder_eager(model, ids, layers: int = 0):
    """x_i = x_{i-1} + h_i(x_{i-2}) for a transformers Llama, written out by hand."""
    inner = model.model
    x0 = inner.embed_tokens(ids)
    cos_sin = inner.rotary_emb(x0, torch.arange(ids.shape[1])[None])
    modules = [(kind, layer) for layer in inner.layers for kind in ("attn", "mlp")]
    first = 0 if layers <= 0 else len(modules) - 2 * layers
    stream = [x0]
    for i, (kind, layer) in enumerate(modules):
        x = stream[i] if i < first or i == 0 else stream[i - 1]
        if kind == "attn":
            out = layer.self_attn(
                hidden_states=layer.input_layernorm(x),
                position_embeddings=cos_sin,
                attention_mask=None,
            )[0]
        else:
            out = layer.mlp(layer.post_attention_layernorm(x))
        stream.append(stream[i] + out)
    return model.lm_head(inner.norm(stream[-1]))


@pytest.mark.parametrize("layers", [0, 1])
def test_one_device_ladder_matches_the_equations(layers, example):
    wrapper, (ids, mask), shapes = example("llama-tiny")
    program = plait.compile(
        wrapper, (ids, mask), dynamic_shapes=shapes, pipeline=f"{BASE},ladder{{layers={layers}}}"
    )
    ids2, mask2 = hf.example_inputs(wrapper.model, 3, 21)
    with torch.no_grad():
        ref = ladder_eager(wrapper.model, ids2, layers)
        standard = wrapper(ids2, mask2)
    out = program(ids2, mask2)
    assert max_rel_diff(out, ref) <= 1e-6
    assert max_rel_diff(out, standard) > 1e-3  # it is a different model


def test_layers_k_leaves_the_first_layers_untouched(compiled):
    standard = compiled("llama-tiny").ir
    module = parse_module(standard)
    PassManager.parse("ladder{layers=1}").run(module)
    converted = print_module(module)

    def layer0(text):
        return [line for line in text.splitlines() if 'loc("model.layers.0' in line]

    assert layer0(converted) == layer0(standard)
    assert converted != standard


def test_tp_ladder_starts_async_and_waits_late(compiled):
    module = parse_module(compiled("llama-tiny").ir)
    PassManager.parse("shard{mesh=tp:2},ladder,dce").run(module)
    text = print_module(module)
    assert text.count("async}") == 4 and text.count("plait.wait") == 4
    assert 'reduce = "sum"} :' not in text  # no blocking all-reduce left
    # layer 0's MLP (down_proj) runs while the attention all-reduce is in flight
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if 'reduce = "sum", async' in line)
    down = next(
        i
        for i, line in enumerate(lines)
        if "plait.linear" in line and "layers.0.mlp.down_proj" in line
    )
    wait = next(i for i, line in enumerate(lines) if "plait.wait" in line)
    assert start < down < wait


def test_not_residual_is_refused(compiled):
    module = parse_module(compiled("cnn-tiny").ir)
    with pytest.raises(LadderError, match="found no residual stream .* r_i = r_\\{i-1\\} \\+ f_i"):
        PassManager.parse("ladder").run(module)


def test_a_sharded_stream_is_refused_with_the_pipeline_that_works(compiled):
    module = parse_module(compiled("gpt2-tiny").ir)
    with pytest.raises(  # attention replicated: c_proj column-parallel splits the stream
        LadderError, match="stream is sharded here.* ladder,shard\\{mesh=...\\},overlap"
    ):
        PassManager.parse("shard{mesh=tp:2,plan=*.c_attn:replicate},ladder").run(module)
    module = parse_module(compiled("llama-tiny").ir)
    with pytest.raises(LadderError, match="stream is sharded here"):  # split norms read it
        PassManager.parse("shard{mesh=tp:2,plan=*.o_proj:colwise},ladder").run(module)


@pytest.mark.parametrize(
    "name,n,pipeline",
    [
        ("llama-tiny", 2, "shard{mesh=tp:2},ladder,dce"),
        ("llama-tiny", 4, "shard{mesh=tp:4},ladder,dce"),
        ("gpt2-tiny", 2, "shard{mesh=tp:2},ladder,dce"),  # q, k, v split by blocks
        ("gpt2-tiny", 2, "ladder,shard{mesh=tp:2,plan=*.c_attn:replicate},overlap,dce"),
    ],
)
def test_tp_ladder_matches_the_one_device_ladder(name, n, pipeline, example, tmp_path):
    wrapper, inputs, shapes = example(name)
    reference = plait.compile(wrapper, inputs, dynamic_shapes=shapes, pipeline=f"{BASE},ladder")
    ids, mask = hf.example_inputs(wrapper.model, 3, 13)
    expected = reference(ids, mask)
    sharded = plait.compile(wrapper, inputs, dynamic_shapes=shapes, pipeline=f"{BASE},{pipeline}")
    # every all-reduce in flight while compute goes on (GPT-2: its bias is added after the wait)
    assert sharded.ir.count("plait.wait") == sharded.ir.count("plait.all_reduce") > 0
    sharded.save(tmp_path)
    for out, _ in run_ranks(n, artifact_rank, str(tmp_path), [ids, mask]):
        assert max_rel_diff(out, expected) <= 1e-5


def test_estimate_compares_ladder_with_standard(compiled, capsys):
    from plait.cli import main

    assert (
        main(
            [
                "estimate",
                "--example",
                "llama-tiny",
                "--hardware",
                "h100-sxm",
                "--batch",
                "1",
                "--seq",
                "64",
                "--pipeline",
                f"{BASE},shard{{mesh=tp:2}}",
                "--compare",
                f"{BASE},shard{{mesh=tp:2}},ladder",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    speedup = float(out.split("speedup of the second:")[1].split("x")[0])
    assert speedup > 1.0
