"""The Python API: calling conventions, call-time input checks with clear
messages, and the CUDA path where a GPU exists."""

from __future__ import annotations

import plait
import pytest
import torch
from helpers import max_rel_diff
from plait.runtime.inputs import InputError


@pytest.fixture(scope="module")
def llama(compiled, example):
    model, inputs, _ = example("llama-tiny")
    return model, inputs, compiled("llama-tiny")


def test_positional_and_keyword_calls_agree(llama):
    _, (ids, mask), program = llama
    assert torch.equal(program(ids, mask), program(input_ids=ids, attention_mask=mask))
    assert torch.equal(program(ids, attention_mask=mask), program(ids, mask))


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda ids, mask: (ids.float(), mask),
            "input 'input_ids' has dtype float32 but the model was compiled for int64; convert it with .to(torch.int64)",
        ),
        (
            lambda ids, mask: (ids[0], mask),
            "input 'input_ids' has 1 dims (16,) but the model expects 2: [batch, seq]",
        ),
        (
            lambda ids, mask: (ids.repeat(1, 20), mask.repeat(1, 20)),
            "input 'input_ids' dim 1 (seq) is 320, outside the compiled range [2, 256]; recompile with a wider range for 'seq'",
        ),
        (
            lambda ids, mask: (ids, mask[:, :5]),
            "input 'attention_mask' dim 1 is 5 but 'seq' is 16 in another input; they must be equal",
        ),
        (
            lambda ids, mask: (ids, mask, mask),
            "the model takes 2 inputs (input_ids, attention_mask), got 3",
        ),
        (lambda ids, mask: (ids,), "missing input(s) attention_mask"),
        (lambda ids, mask: (ids, [1, 2]), "input 'attention_mask' must be a tensor, got list"),
    ],
)
def test_bad_inputs_are_refused_before_running(llama, make, message):
    _, (ids, mask), program = llama
    with pytest.raises(InputError) as info:
        program(*make(ids, mask))
    assert message in str(info.value)


def test_static_dims_name_the_fix(compiled, example):
    _, (images,), _ = example("cnn-tiny")
    program = compiled("cnn-tiny", dynamic=False)
    with pytest.raises(
        InputError,
        match=r"input 'images' dim 0 is 2 but the model was compiled for 4; recompile with a dynamic dim",
    ):
        program(images[:2])
    with pytest.raises(InputError, match="unexpected input 'pixels'"):
        program(pixels=images)


def test_meta_weights_cannot_run(example):
    model, inputs, _ = example("cnn-tiny")
    with torch.device("meta"):
        meta_model = type(model)()
    program = plait.compile(meta_model, (torch.empty(4, 3, 32, 32, device="meta"),))
    assert "features.0.weight" in program.ir and "torch.conv2d" in program.code
    with pytest.raises(plait.PlaitError, match="weights are on the meta device"):
        program(*inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(example):
    model, inputs, shapes = example("llama-tiny")
    program = plait.compile(model, inputs, dynamic_shapes=shapes, device="cuda")
    out = program(*inputs)
    assert out.device.type == "cuda"
    with torch.no_grad():
        assert max_rel_diff(out.cpu(), model(*inputs)) <= 1e-4  # TF32/kernel differences


def test_a_derived_dim_is_named_after_its_root_and_checked_at_call_time():
    from torch.export import Dim

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    k = Dim("k", min=1, max=64)
    compiled = plait.compile(model, (torch.randn(8, 16),), dynamic_shapes=((2 * k, None),))
    assert "!plait.tensor<[2*k, 16], f32>" in compiled.ir
    for rows in (4, 10, 128):  # k read back from the input as rows // 2
        x = torch.randn(rows, 16)
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    with pytest.raises(plait.PlaitError, match=r"dim 0 is 9, which is not 2\*k for any integer k"):
        compiled(torch.randn(9, 16))
    with pytest.raises(plait.PlaitError, match=r"outside the compiled range"):
        compiled(torch.randn(130, 16))


def test_meta_and_out_of_vocabulary_inputs_are_refused_naming_the_input(llama):
    _, (ids, mask), program = llama
    with pytest.raises(InputError, match="input 'input_ids' is a meta tensor"):
        program(ids.to("meta"), mask)
    bad = ids.clone()
    bad[1, 3] = 256
    with pytest.raises(InputError) as info:
        program(bad, mask)
    assert str(info.value) == (
        "input 'input_ids' holds token id 256, outside [0, 255]: it indexes the embedding "
        "table of model.embed_tokens, which has 256 rows (the model's vocabulary); give ids "
        "in that range"
    )
    with pytest.raises(InputError, match="holds token id -1, outside"):
        program(ids - 1 - ids, mask)


def test_out_of_vocabulary_ids_are_refused_when_ranks_split_the_vocabulary(example):
    model, inputs, shapes = example("llama-tiny")
    program = plait.compile(
        model,
        inputs,
        dynamic_shapes=shapes,
        pipeline="canonicalize,cse,dce,shard{mesh=tp:2,plan=model.embed_tokens:rowwise},dce",
    )
    assert "ids_held" in program.ir  # each rank looks up its half: 300 would read zeros
    bad = inputs[0].clone()
    bad[0, 0] = 300
    with pytest.raises(InputError, match=r"token id 300, outside \[0, 255\]"):
        program(bad, inputs[1])  # refused before any rank starts


@pytest.fixture(scope="module")
def transformers_models():
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    bert = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=48,
        )
    ).eval()
    return {"llama": (llama, "logits"), "bert": (bert, "last_hidden_state")}


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_transformers_model_compiles_as_it_is(name, transformers_models):
    from torch.export import Dim

    model, output = transformers_models[name]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        plain, masked = (
            getattr(model(input_ids=ids, attention_mask=m), output)
            for m in (torch.ones_like(ids), mask)
        )
    only_ids = plait.compile(model, (ids,))  # the mask defaults to ones
    assert only_ids.input_names == ["input_ids"]
    out = only_ids(ids)  # what the model returns: its ModelOutput (without a cache)
    assert type(out) is type(model(input_ids=ids))
    assert max_rel_diff(getattr(out, output), plain) <= 1e-5
    seq = Dim("seq", min=2, max=32)
    both = plait.compile(model, (ids, mask), dynamic_shapes={"input_ids": {1: seq}})
    assert max_rel_diff(getattr(both(ids, mask), output), masked) <= 1e-5
    assert getattr(both(ids[:, :5], mask[:, :5]), output).shape[1] == 5


def test_an_empty_prompt_is_one_clear_sentence():
    from plait.runtime.generate import GenerateError, Sampling, check_request

    with pytest.raises(GenerateError) as info:
        check_request(2, 16, torch.zeros(2, 0, dtype=torch.long), 4, None, Sampling())
    assert str(info.value) == "the prompt is empty; give each sequence at least one token"
