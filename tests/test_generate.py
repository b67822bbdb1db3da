"""Autoregressive generation: @prefill and @decode programs with a static KV
cache, checked token for token against `transformers`' own `generate`, on one
rank and on TP=2 gloo ranks, and logit for logit (teacher forced) against the
full forward compiled with the same passes."""

from __future__ import annotations

import plait
import pytest
import torch
from helpers import max_rel_diff
from plait.examples.models import causal_lm
from plait.frontend import hf
from plait.runtime.generate import Sampling

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def lms():
    """name -> the tiny `transformers` model of the example (seeded weights)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = causal_lm(name)[0].model
        return cache[name]

    return get


def _prompts(vocab: int, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _reference(model, ids, mask=None, **options) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **options
        )


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2"])
def test_greedy_generation_is_transformers_generate_on_one_and_two_ranks(lms, name):
    model = lms(name)
    ids = _prompts(model.config.vocab_size)
    expected = _reference(model, ids)
    assert expected.shape[1] > ids.shape[1] + 8  # a real continuation, not an early EOS
    one = plait.compile_generation(model, batch=2, max_length=48)
    assert torch.equal(one.generate(ids, NEW_TOKENS), expected)
    two = plait.compile_generation(model, batch=2, max_length=48, pipeline="shard{mesh=tp:2}")
    try:
        assert torch.equal(two.generate(ids, NEW_TOKENS), expected)
        with pytest.raises(plait.PlaitError, match="needs 49 cache slots"):  # checked up front
            two.generate(ids, 43)
        assert two._pool.alive  # a bad request does not stop the ranks
    finally:
        two.close()


def test_tp4_generation_with_fewer_kv_heads_than_ranks(lms):
    model = lms("qwen2")  # 4 query heads, 2 kv heads
    ids = _prompts(model.config.vocab_size)
    four = plait.compile_generation(model, batch=2, max_length=48, pipeline="shard{mesh=tp:4}")
    try:
        assert torch.equal(four.generate(ids, NEW_TOKENS), _reference(model, ids))
    finally:
        four.close()


def test_kv_cache_is_program_state_sharded_by_kv_heads(lms):
    model = lms("llama")  # 4 heads, 2 kv heads, head dim 16
    compiled = plait.compile_generation(model, batch=3, max_length=40, pipeline="shard{mesh=tp:2}")
    assert compiled.functions == ["prefill", "decode"] and compiled.cache_size == (3, 40)
    state = [line for line in compiled.ir.splitlines() if "plait.param state" in line]
    assert len(state) == 2 * 2 * 2  # keys and values, per layer, in both programs
    # this rank's kv head; one spare slot keeps every read a proper slice
    assert all("!plait.tensor<[3, 1, 41, 16], f32>" in line for line in state)
    assert "kv_cache" not in " ".join(compiled.weight_names)  # not a stored weight


def test_programs_share_weights_and_cache_and_run_outside_inference_mode(lms):
    model = lms("llama")
    compiled = plait.compile_generation(model, batch=1, max_length=16)
    ids = _prompts(model.config.vocab_size, 1, 4)
    compiled.generate(ids, 4)  # builds both programs under inference_mode
    prefill, decode = (compiled.program_of(f).graph_module for f in ("prefill", "decode"))
    for name in ("kv_cache_0_keys", "model_layers_0_mlp_up_proj_weight"):
        assert getattr(prefill, name) is getattr(decode, name)
    mask = torch.ones(1, 5, dtype=torch.long)
    (logits,) = compiled.run("decode", ids[:, :1], torch.tensor([[4]]), torch.tensor([4]), mask)
    assert logits.shape == (1, 1, model.config.vocab_size)


def test_left_padded_batch_smaller_than_compiled(lms):
    model = lms("llama")
    ids = _prompts(model.config.vocab_size, 2, 9)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second prompt is 5 tokens, left padded
    ids[1, :4] = model.generation_config.eos_token_id  # padded as transformers pads
    compiled = plait.compile_generation(model, batch=3, max_length=48)
    assert torch.equal(compiled.generate(ids, NEW_TOKENS, mask), _reference(model, ids, mask))


def test_stops_on_eos_and_pads_finished_sequences(lms):
    model = lms("qwen2")
    ids = _prompts(model.config.vocab_size)
    compiled = plait.compile_generation(model, batch=2, max_length=48)
    free = compiled.generate(ids, NEW_TOKENS, eos_token_id=-1)
    eos = int(free[0, ids.shape[1] + 3])  # the first sequence's 4th new token
    stopped = compiled.generate(ids, NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(stopped, _reference(model, ids, eos_token_id=eos, pad_token_id=0))
    assert (stopped[0, ids.shape[1] + 4 :] == 0).all()


def test_sampling_is_seeded_and_top_k_one_is_greedy(lms):
    model = lms("gpt2")
    ids = _prompts(model.config.vocab_size)
    compiled = plait.compile_generation(model, batch=2, max_length=48)
    greedy = compiled.generate(ids, 16)
    sample = dict(do_sample=True, temperature=1.5, seed=3)
    first, again = compiled.generate(ids, 16, **sample), compiled.generate(ids, 16, **sample)
    assert torch.equal(first, again) and not torch.equal(first, greedy)
    assert torch.equal(compiled.generate(ids, 16, do_sample=True, top_k=1, seed=5), greedy)
    assert torch.equal(compiled.generate(ids, 16, do_sample=True, top_p=1e-6, seed=5), greedy)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0, -3.0]]).log_softmax(-1).expand(400, 5)
    generator = torch.Generator().manual_seed(0)
    top2 = Sampling(do_sample=True, top_k=2).choose(logits, generator)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # [0.53, 0.32, 0.09, ...]: top-p 0.8 keeps two tokens
    assert probs[:2].sum() > 0.8 > probs[0]
    nucleus = Sampling(do_sample=True, top_p=0.8).choose(logits, generator)
    assert set(nucleus.tolist()) == {0, 1}
    everything = Sampling(do_sample=True).choose(logits, generator)
    assert len(set(everything.tolist())) >= 4


def _forced_logits(compiled, forward, prompt, continuation):
    """Logits of prefill and each decode step against the full forward's last position."""
    batch, max_length = compiled.cache_size
    length = prompt.shape[1]
    cache_mask = torch.zeros(batch, max_length, dtype=torch.long)
    cache_mask[:, :length] = 1
    positions = torch.arange(length)[None].expand(batch, length)
    prefill = (prompt, positions, torch.arange(length), cache_mask[:, :length])
    (got,) = compiled.run("prefill", *prefill)
    worst = max_rel_diff(got[:, -1], forward(prompt, torch.ones_like(prompt))[:, -1])
    for step in range(continuation.shape[1]):
        slot = length + step
        cache_mask[:, slot] = 1
        token = continuation[:, step : step + 1]
        position = torch.full((batch, 1), slot)
        step_inputs = (token, position, torch.tensor([slot]), cache_mask[:, : slot + 1])
        (got,) = compiled.run("decode", *step_inputs)
        seen = torch.cat([prompt, continuation[:, : step + 1]], 1)
        want = forward(seen, torch.ones_like(seen))[:, -1]
        worst = max(worst, max_rel_diff(got[:, -1], want))
    return worst


@pytest.mark.parametrize(
    "pipeline",
    ["canonicalize,quantize{bits=8},cse,dce,memplan", "canonicalize,ladder,cse,dce",
     "canonicalize,quantize{size-budget=0.4,layers=model.layers.*},cse,dce",
     "canonicalize,shard{mesh=tp:2},ladder,cse,dce,memplan"],
)  # fmt: skip
def test_decode_steps_match_the_forward_compiled_with_the_same_passes(lms, pipeline):
    model = lms("llama")
    prompt = _prompts(model.config.vocab_size, 2, 6)
    continuation = _prompts(model.config.vocab_size, 2, 4)
    compiled = plait.compile_generation(model, batch=2, max_length=16, pipeline=pipeline)
    forward = plait.compile(
        hf.wrap(model),
        hf.example_inputs(model, 2, 8),
        dynamic_shapes=hf.dynamic_shapes(max_seq=16),
        pipeline=pipeline,
    )
    try:
        assert _forced_logits(compiled, forward, prompt, continuation) <= 1e-5
    finally:
        compiled.close()
        forward.close()


def test_saved_generation_artifact_generates_the_same(lms, tmp_path):
    model = lms("gpt2")
    ids = _prompts(model.config.vocab_size)
    compiled = plait.compile_generation(model, batch=2, max_length=48)
    compiled.save(tmp_path / "gen")
    loaded = plait.load(tmp_path / "gen")
    assert loaded.generation == compiled.generation and loaded.cache_size == (2, 48)
    assert torch.equal(loaded.generate(ids, NEW_TOKENS), _reference(model, ids))
    assert "# ---- @decode ----" in (tmp_path / "gen" / "rank0.py").read_text()


def test_bad_generation_requests_fail_before_running(lms, compiled):
    model = lms("llama")
    generator = plait.compile_generation(model, batch=2, max_length=16)
    ids = _prompts(model.config.vocab_size, 2, 10)
    with pytest.raises(plait.PlaitError, match="needs 17 cache slots, but the cache holds 16"):
        generator.generate(ids, 8)
    with pytest.raises(plait.PlaitError, match="batch of 3 sequences.*compiled for at most 2"):
        generator.generate(_prompts(model.config.vocab_size, 3, 4), 4)
    with pytest.raises(plait.PlaitError, match="top_p must be in"):
        generator.generate(ids[:, :4], 4, do_sample=True, top_p=1.5)
    with pytest.raises(plait.PlaitError, match="compile it for generation"):
        compiled("llama-tiny").generate(ids, 4)
    with pytest.raises(plait.PlaitError, match="not a Hugging Face"):
        plait.compile_generation(torch.nn.Linear(4, 4))


class _ReadsBeforeUpdate(torch.nn.Module):
    def __init__(self, initial: float = 0.0):
        super().__init__()
        self.register_buffer("total", torch.full((4,), initial))

    def forward(self, x):
        before = self.total * 2
        self.total.add_(x)
        return before + self.total


def test_buffers_updated_in_place_are_state_read_only_after_the_update():
    x = torch.ones(4)
    with pytest.raises(plait.PlaitError, match="read before this in-place update"):
        plait.compile(_ReadsBeforeUpdate(), (x,))


class _Accumulates(torch.nn.Module):
    def __init__(self, initial: float = 0.0):
        super().__init__()
        self.register_buffer("total", torch.full((4,), initial))

    def forward(self, x):
        self.total.add_(x)
        return self.total * 1.0


def test_state_persists_across_calls_and_must_start_at_zero():
    x = torch.arange(4.0)
    compiled = plait.compile(_Accumulates(), (x,))
    assert "plait.param state" in compiled.ir
    compiled(x)
    assert torch.equal(compiled(x), 2 * x)  # updated in place, kept between calls
    with pytest.raises(plait.PlaitError, match="initialize it with zeros"):
        plait.compile(_Accumulates(1.0), (x,))


def test_grouped_query_attention_reads_the_cache_unrepeated(lms):
    # 4 query heads over 2 kv heads: SDPA reads each kv head for its 2 query heads,
    # instead of a copy of the cache with every kv head repeated, every step
    compiled = plait.compile_generation(lms("llama"), batch=1, max_length=16)
    code = compiled.program_of("decode").code
    assert code.count("enable_gqa = True") == 2 and ".expand(" not in code


def test_pipeline_stages_generate_transformers_tokens_each_rank_its_layers(lms):
    model = lms("llama")  # 2 layers: one per stage
    ids = _prompts(model.config.vocab_size, 3)  # in groups of 2 sequences, the second padded
    pipeline = "canonicalize,cse,dce,pipeline{stages=2,microbatches=2}"
    staged = plait.compile_generation(model, batch=4, max_length=48, pipeline=pipeline)
    assert staged.mesh == {"pp": 2} and staged.cache_size == (4, 48)
    held = [staged.rank_code(r) for r in range(2)]  # each rank's programs' weights and state
    for rank, layer in ((0, 0), (1, 1)):
        assert f"kv_cache_{layer}_keys" in held[rank] and f"layers_{layer}_mlp" in held[rank]
        assert f"kv_cache_{1 - layer}_keys" not in held[rank]
        assert f"layers_{1 - layer}_mlp" not in held[rank]
    assert "embed_tokens" in held[0] and "embed_tokens" not in held[1]
    assert "lm_head" in held[1] and "lm_head" not in held[0]
    try:  # each group of sequences has its own KV cache, on each stage
        assert torch.equal(staged.generate(ids, NEW_TOKENS), _reference(model, ids))
    finally:
        staged.close()
    with pytest.raises(plait.PlaitError, match="give a batch that 2 divides"):
        plait.compile_generation(model, batch=3, pipeline=pipeline)
    interleaved = "pipeline{stages=2,microbatches=2,schedule=interleaved,virtual=2}"
    with pytest.raises(plait.PlaitError, match="generation runs one stage per rank"):
        plait.compile_ir(staged.module.clone(), staged.weights, pipeline=interleaved)
