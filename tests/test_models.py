"""Numerical equivalence with eager PyTorch on real architectures from
`transformers` (small configs) and a CNN, static and dynamic, plus
round-tripping and determinism of the compiled artifacts."""

from __future__ import annotations

import plait
import pytest
import torch
import transformers as T
from helpers import max_rel_diff
from plait.backends.fx import build_program
from plait.frontend import hf
from plait.ir.text import parse_module, print_module

TOLERANCE = 1e-5  # of the output's scale, fp32
EXAMPLES = ["llama-tiny", "gpt2-tiny", "mixtral-tiny", "cnn-tiny"]


def _other_inputs(name: str, model):
    """Inputs at shapes other than the example's."""
    if name == "cnn-tiny":
        g = torch.Generator().manual_seed(1)
        return [
            (torch.randn(1, 3, 32, 32, generator=g),),
            (torch.randn(7, 3, 32, 32, generator=g),),
        ]
    inner = model.model
    return [hf.example_inputs(inner, 1, 5), hf.example_inputs(inner, 3, 37)]


@pytest.mark.parametrize("name", EXAMPLES)
def test_static_matches_eager(name, example, compiled):
    model, inputs, _ = example(name)
    with torch.no_grad():
        ref = model(*inputs)
    assert max_rel_diff(compiled(name, dynamic=False)(*inputs), ref) <= TOLERANCE


@pytest.mark.parametrize("name", EXAMPLES)
def test_dynamic_matches_eager_at_other_shapes(name, example, compiled):
    model, inputs, _ = example(name)
    program = compiled(name)
    for other in [inputs, *_other_inputs(name, model)]:
        with torch.no_grad():
            ref = model(*other)
        out = program(*other)
        assert out.shape == ref.shape
        assert max_rel_diff(out, ref) <= TOLERANCE


@pytest.mark.parametrize("name", EXAMPLES)
def test_ir_roundtrips_and_the_parsed_plan_runs(name, example, compiled):
    model, inputs, _ = example(name)
    program = compiled(name)
    text = program.ir
    parsed = parse_module(text)
    assert print_module(parsed) == text
    rebuilt = build_program(parsed, program.weights)
    with torch.no_grad():
        assert max_rel_diff(rebuilt(*inputs)[0], model(*inputs)) <= TOLERANCE


@pytest.mark.parametrize("name", ["llama-tiny", "mixtral-tiny", "cnn-tiny"])
def test_compiling_twice_gives_identical_ir_and_code(name, example, compiled):
    model, inputs, shapes = example(name)
    first = compiled(name)
    second = plait.compile(model, inputs, dynamic_shapes=shapes)
    assert second.ir == first.ir
    assert second.code == first.code


def test_compiled_program_keeps_symbols_and_module_paths(compiled):
    text = compiled("llama-tiny").ir
    assert "plait.symbols = #plait.symbols<batch = [1, 64], seq = [2, 256]>" in text
    assert "%input_ids: !plait.tensor<[batch, seq], i64>" in text
    assert 'loc("model.layers.1.mlp.down_proj")' in text
    assert '"model.layers.0.self_attn.q_proj.weight"' in text  # state-dict names, no wrapper prefix
    assert 'plait.param buffer "model.rotary_emb.inv_freq"' in text  # non-persistent buffer kept
    assert "transformers::grouped_mm_fallback" in compiled("mixtral-tiny").ir


def _small(cls, **extra):
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return cls(**{**base, **extra})


MORE = {
    "qwen2": lambda: T.Qwen2ForCausalLM(_small(T.Qwen2Config)),
    "phi3": lambda: T.Phi3ForCausalLM(_small(T.Phi3Config, pad_token_id=0)),
    "gpt-neox": lambda: T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
    ),
    "gemma2": lambda: T.Gemma2ForCausalLM(_small(T.Gemma2Config, head_dim=16)),
    "qwen2-moe": lambda: T.Qwen2MoeForCausalLM(
        _small(
            T.Qwen2MoeConfig,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
        )
    ),
}


@pytest.mark.parametrize("name", sorted(MORE))
def test_more_architectures_match_eager(name):
    torch.manual_seed(0)
    model = MORE[name]().eval()
    program = plait.compile(
        hf.wrap(model),
        hf.example_inputs(model, 2, 8),
        dynamic_shapes=hf.dynamic_shapes(max_seq=128),
    )
    for batch, seq in [(2, 8), (3, 13)]:
        inputs = hf.example_inputs(model, batch, seq)
        with torch.no_grad():
            assert max_rel_diff(program(*inputs), hf.wrap(model)(*inputs)) <= TOLERANCE


class _Bert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bert = T.BertModel(
            T.BertConfig(
                vocab_size=128,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
            )
        )

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state


class _InPlace(torch.nn.Module):
    """In-place ops on fresh tensors become out-of-place ops in the IR."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        alias = y.relu_()
        y += 1
        alias.mul_(2)
        return {"scaled": y * 3, "alias": alias}


def test_encoder_and_in_place_models_match_eager():
    from torch.export import Dim

    torch.manual_seed(0)
    bert = _Bert().eval()
    dims = {0: Dim("batch", max=8), 1: Dim("seq", max=64)}
    ids, mask = torch.randint(0, 128, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    program = plait.compile(bert, (ids, mask), dynamic_shapes={"ids": dims, "mask": dims})
    ids, mask = torch.randint(0, 128, (3, 11)), torch.ones(3, 11, dtype=torch.long)
    with torch.no_grad():
        assert max_rel_diff(program(ids, mask), bert(ids, mask)) <= TOLERANCE

    model, x = _InPlace(), torch.randn(4, 8)
    program = plait.compile(model, (x,))
    assert '"aten::relu"(' in program.ir and '"aten::relu_"' not in program.ir
    out, ref = program(x), model(x)
    assert set(out) == {"scaled", "alias"}
    for key in out:
        assert torch.equal(out[key], ref[key].detach())
