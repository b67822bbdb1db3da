"""shard{mesh=tp:N}: Megatron placements on IR text, fallbacks, and numerics of
TP programs on real gloo ranks against eager."""

from __future__ import annotations

import re

import plait
import pytest
import torch
from helpers import artifact_rank, assert_ranks_match_eager, max_rel_diff, run_ranks
from plait.frontend import hf
from plait.ir.text import parse_module, print_module
from plait.passes.manager import PassManager
from plait.passes.pipeline import PipelineError
from plait.passes.shard.shard import ShardError

MLP = """\
builtin.module attributes {plait.symbols = #plait.symbols<b = [1, 64]>} {
  func.func @forward(%x : !plait.tensor<[b, 64], f32>) -> !plait.tensor<[b, 64], f32> {
    %w1 = plait.param "up.weight" : !plait.tensor<[256, 64], f32> loc("mlp.up")
    %b1 = plait.param "up.bias" : !plait.tensor<[256], f32> loc("mlp.up")
    %w2 = plait.param "down.weight" : !plait.tensor<[64, 256], f32> loc("mlp.down")
    %b2 = plait.param "down.bias" : !plait.tensor<[64], f32> loc("mlp.down")
    %h = plait.linear "aten::linear"(%x, %w1, %b1) : !plait.tensor<[b, 256], f32> loc("mlp.up")
    %a = plait.elementwise "aten::gelu"(%h) : !plait.tensor<[b, 256], f32> loc("mlp.act")
    %y = plait.linear "aten::linear"(%a, %w2, %b2) : !plait.tensor<[b, 64], f32> loc("mlp.down")
    %r = plait.elementwise "aten::add.Tensor"(%x, %y) : !plait.tensor<[b, 64], f32> loc("block")
    func.return %r : !plait.tensor<[b, 64], f32>
  }
}
"""


def _shard(text: str, mesh: str = "tp:2") -> str:
    module = parse_module(text)
    PassManager.parse(f"shard{{mesh={mesh}}},dce").run(module)
    return print_module(module)


def test_column_then_row_with_one_all_reduce():
    out = _shard(MLP)
    assert (
        'plait.param "up.weight" {plait.placements = #plait.placements<[shard(0)]>} : !plait.tensor<[128, 64], f32>'
        in out
    )
    assert (
        'plait.param "up.bias" {plait.placements = #plait.placements<[shard(0)]>} : !plait.tensor<[128], f32>'
        in out
    )
    assert (
        'plait.param "down.weight" {plait.placements = #plait.placements<[shard(1)]>} : !plait.tensor<[64, 128], f32>'
        in out
    )
    assert '"aten::gelu"(%h) : !plait.tensor<[b, 128], f32>' in out
    assert out.count("plait.all_reduce") == 1 and "all_gather" not in out
    # the row-parallel bias is added once, after the reduction
    assert '"aten::linear"(%a, %w2, none)' in out
    assert out.index("plait.all_reduce") < out.index('"aten::add.Tensor"(%y_reduced, %b2)')
    assert "plait.mesh = #plait.mesh<tp = 2>" in out


def test_dims_that_do_not_divide_stay_replicated():
    out = _shard(MLP.replace("256", "250"), "tp:4")  # 250 features over 4 ranks
    assert 'plait.param "up.weight" : !plait.tensor<[250, 64], f32>' in out  # replicated
    # down reads a replicated activation: column-parallel, then gathered for the output
    assert 'plait.param "down.weight" {plait.placements = #plait.placements<[shard(0)]>}' in out
    assert "all_reduce" not in out and out.count("plait.all_gather") == 1


def test_two_tensor_axes_and_sharding_twice_are_refused():
    # refused when the pipeline is parsed, before any IR is touched
    with pytest.raises(PipelineError, match="at most one tensor-parallel axis and one data"):
        _shard(MLP, "tp:2,cp:2")
    with pytest.raises(PipelineError, match="at most one tensor-parallel axis and one data"):
        _shard(MLP, "dp:2,ep:2")
    with pytest.raises(ShardError, match="already sharded"):
        _shard(_shard(MLP))
    with pytest.raises(ShardError, match=r"'x' has dim 0 of b, which does not split evenly"):
        _shard(MLP, "dp:2")  # b in [1, 64]


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_a_dp_tp_mesh_splits_the_batch_and_the_weights(name, example, tmp_path):
    model, inputs, _ = example(name)  # static batch 2
    program = plait.compile(
        model, inputs, pipeline="canonicalize,cse,dce,shard{mesh=dp:2,tp:2},dce"
    )
    ir = program.ir
    assert program.world_size == 4
    # Megatron over tp (an all-reduce after o_proj and down_proj); over dp only the
    # inputs' batch slices, the tiny padding mask and the outputs are moved
    assert ir.count("plait.all_reduce") == 4 and ir.count('axis = "tp"') == 5
    dp = [line for line in ir.splitlines() if 'axis = "dp"' in line]
    assert all("local_shard" in line or "all_gather" in line for line in dp) and len(dp) <= 5
    assert "#plait.placements<[replicate, shard(0)]>" in ir  # weights: whole over dp
    program.save(tmp_path)
    with torch.no_grad():
        ref = model(*inputs)
    for out, _ in run_ranks(4, artifact_rank, str(tmp_path), list(inputs)):
        assert max_rel_diff(out, ref) <= 1e-5


def test_data_parallel_batches_of_a_declared_multiple(tmp_path):
    from torch.export import Dim

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    b = Dim("b", min=1, max=32)
    program = plait.compile(
        model, (torch.randn(4, 16),), dynamic_shapes=((2 * b, None),), pipeline="shard{mesh=dp:2}"
    )
    assert "!plait.tensor<[b, 32], f32>" in program.ir  # each rank computes half the batch
    program.save(tmp_path)
    for rows in (4, 10):
        x = torch.randn(rows, 16)
        for out, _ in run_ranks(2, artifact_rank, str(tmp_path), [x]):
            assert max_rel_diff(out, model(x).detach()) <= 1e-6


def test_a_symbolic_batch_splits_by_the_ranges_of_its_own_module():
    # b in [2, 6]: not provably even; b in [4, 4]: one even value. The ranges
    # the rules prove divisibility over are those of the module being sharded
    with pytest.raises(ShardError, match="does not split evenly over 2 ranks"):
        _shard(MLP.replace("b = [1, 64]", "b = [2, 6]"), "dp:2")
    module = parse_module(MLP.replace("b = [1, 64]", "b = [4, 4]"))
    shard = next(iter(PassManager.parse("shard{mesh=dp:2}").passes))
    shard.apply(None, module)  # (the gathered result's type, 2*floordiv(b, 2), does not verify)
    assert "!plait.tensor<[floordiv(b, 2), 256], f32>" in print_module(module)


def test_llama_is_sharded_like_megatron(compiled):
    module = parse_module(compiled("llama-tiny").ir)
    PassManager.parse("shard{mesh=tp:2},dce").run(module)
    text = print_module(module)
    assert text.count("plait.all_reduce") == 4  # after o_proj and down_proj, per layer
    assert text.count("plait.all_gather") == 1  # the vocab-sharded logits
    assert "plait.local_shard" not in text
    assert '"aten::scaled_dot_product_attention"' in text and "[batch, 2, seq, 16]" in text


def _tp_outputs(model, example_inputs, shapes, n: int, tmp_path, inputs):
    program = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline=f"canonicalize,cse,dce,shard{{mesh=tp:{n}}},dce",
    )
    program.save(tmp_path)
    return program, run_ranks(n, artifact_rank, str(tmp_path), list(inputs))


@pytest.mark.parametrize(
    "name,n",
    [
        ("llama-tiny", 2),
        ("llama-tiny", 4),
        ("gpt2-tiny", 2),
        ("mixtral-tiny", 2),
        ("mixtral-tiny", 4),
        ("qwen2-tiny", 2),
        ("qwen2-tiny", 4),
    ],  # fmt: skip
)
def test_tp_programs_match_eager_on_gloo_ranks(name, n, example, tmp_path):
    model, _, shapes = example(name)
    inputs = hf.example_inputs(model.model, 3, 11)  # not the example's shapes
    with torch.no_grad():
        ref = model(*inputs)
    example_inputs = hf.example_inputs(model.model, 2, 16)
    program, outputs = _tp_outputs(model, example_inputs, shapes, n, tmp_path, inputs)
    assert program.world_size == n
    for out, _ in outputs:
        assert max_rel_diff(out, ref) <= 1e-5
    # every rank ran its own program: the saved sources differ in the weights' slices only
    assert (tmp_path / f"rank{n - 1}.py").is_file()


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return hf.wrap(Phi3ForCausalLM(config).eval()), None, hf.dynamic_shapes(max_seq=128)


@pytest.mark.parametrize("name", ["gpt2-tiny", "phi3"])
def test_fused_projections_split_by_blocks_match_eager(name, example, tmp_path):
    # GPT-2's c_attn is cut into q, k and v by a split; Phi-3's qkv_proj by three
    # slices of unequal size (grouped-query heads) and its gate_up_proj by a chunk.
    # Each rank holds half of every piece, so attention splits by heads and the MLP
    # by columns: Megatron's two all-reduces a layer and nothing else in a layer.
    model, _, shapes = _phi3() if name == "phi3" else example(name)
    inputs = hf.example_inputs(model.model, 3, 11)
    with torch.no_grad():
        ref = model(*inputs)
    example_inputs = hf.example_inputs(model.model, 2, 16)
    program, outputs = _tp_outputs(model, example_inputs, shapes, 2, tmp_path, inputs)
    for out, _ in outputs:
        assert max_rel_diff(out, ref) <= 1e-5
    collectives = re.findall(
        r"plait\.(all_reduce|all_gather|reduce_scatter|local_shard) .*"
        r'loc\("(?:transformer\.h|model\.layers)\.(\d+)[."]',
        program.ir,
    )
    assert sorted(collectives) == [("all_reduce", "0")] * 2 + [("all_reduce", "1")] * 2
    assert "blocks = [" in program.ir
    assert print_module(parse_module(program.ir)) == program.ir  # the placements round-trip


def test_a_sharded_plan_called_in_one_process_runs_on_worker_ranks(example):
    import time

    model, inputs, shapes = example("llama-tiny")
    program = plait.compile(model, inputs, dynamic_shapes=shapes, pipeline="shard{mesh=tp:2}")
    # rank 0's program: in place (through a handle of its own, backends/collective_wait.py)
    handle = re.search(r"(\w+) = torch.ops.aten.detach.default\(linear_3\)", program.code)
    assert f"all_reduce_.default({handle.group(1)}," in program.code
    other = hf.example_inputs(model.model, 3, 11)
    try:
        with torch.no_grad():
            assert max_rel_diff(program(*other), model(*other)) <= 1e-5
            pool = program._pool
            assert max_rel_diff(program(*inputs), model(*inputs)) <= 1e-5
            assert program._pool is pool  # the workers are reused
        pool.procs[1].kill()  # a rank dies: the call fails naming it, in bounded time
        start = time.monotonic()
        with pytest.raises(plait.PlaitError, match="rank 1 exited"):
            pool.call("__call__", other)
        assert time.monotonic() - start < 30 and not any(p.is_alive() for p in pool.procs)
        with torch.no_grad():  # the next call starts a fresh pool
            assert max_rel_diff(program(*other), model(*other)) <= 1e-5
    finally:
        program.close()


def test_partial_sums_divide_only_as_numerators():
    body = MLP.replace(
        '    %r = plait.elementwise "aten::add.Tensor"(%x, %y) : !plait.tensor<[b, 64], f32> loc("block")',
        '    %r = plait.elementwise "aten::div.Tensor"(%x, %y) : !plait.tensor<[b, 64], f32> loc("block")',
    ).replace("%w2, %b2", "%w2, none")
    out = _shard(body)
    # x / sum(partials) needs the sum first: the all-reduce precedes the division
    assert out.index("plait.all_reduce") < out.index('"aten::div.Tensor"')


def test_a_manual_plan_overrides_the_rules():
    out = _shard(MLP, "tp:2,plan=mlp.up:replicate")
    # up stays whole; down then reads a replicated activation: column-parallel, gathered
    assert 'plait.param "up.weight" : !plait.tensor<[256, 64], f32>' in out
    assert "plait.all_reduce" not in out and out.count("plait.all_gather") == 1
    rowwise = _shard(MLP, "tp:2,plan=mlp.up:rowwise,mlp.down:replicate")
    assert "#plait.placements<[shard(1)]>} : !plait.tensor<[256, 32], f32>" in rowwise
    with pytest.raises(plait.PlaitError, match="write MODULE-GLOB:STYLE with STYLE one of"):
        _shard(MLP, "tp:2,plan=mlp.up:sideways")
    with pytest.raises(
        plait.PlaitError,
        match=r"plan makes this layer rowwise, but its input "
        r"features \(64\) do not split over 128 ranks",
    ):
        _shard(MLP, "tp:128,plan=mlp.up:rowwise")


def test_a_manual_plan_matches_eager_on_gloo_ranks(example, tmp_path):
    model, example_inputs, shapes = example("llama-tiny")
    plan = "*.mlp.*:replicate,*.self_attn.o_proj:replicate,lm_head:colwise"
    program = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline=f"canonicalize,cse,dce,shard{{mesh=tp:2,plan={plan}}},dce",
    )
    assert program.ir.count("plait.all_reduce") == 0  # no row-parallel layer is left
    assert_ranks_match_eager(program, model, tmp_path)


def test_heads_that_do_not_split_run_replicated_with_a_warning():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=3,
    )
    model = LlamaForCausalLM(config).eval()
    inputs = hf.example_inputs(model, 2, 8)
    with pytest.warns(
        UserWarning,
        match=r"3 query and 3 kv heads do not split over 2 ranks "
        r"\(sizes that do: 3\)",
    ):
        program = plait.compile(hf.wrap(model), inputs, pipeline="shard{mesh=tp:2}")
    try:
        with torch.no_grad():
            assert max_rel_diff(program(*inputs), hf.wrap(model)(*inputs)) <= 1e-5
    finally:
        program.close()


@pytest.mark.parametrize("style,placement", [("rowwise", "shard(0)"), ("colwise", "shard(1)")])
def test_an_embedding_splits_by_vocabulary_or_by_dim(style, placement, example, tmp_path):
    model, example_inputs, shapes = example("llama-tiny")
    program = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline=f"canonicalize,cse,dce,shard{{mesh=tp:2,plan=model.embed_tokens:{style}}},dce",
    )
    ir = program.ir
    assert (
        f'"model.embed_tokens.weight" {{plait.placements = #plait.placements<[{placement}]>}}' in ir
    )
    if style == "rowwise":  # each rank looks up the ids it holds; the partial rows are summed
        assert '"aten::embedding"(%model.embed_tokens.weight, %ids_held)' in ir
        assert ir.count("plait.all_reduce") == 5  # one more than Megatron's 4
    assert_ranks_match_eager(program, model, tmp_path)


def test_the_heads_warning_counts_the_kv_heads_before_transformers_repeats_them():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    with pytest.warns(
        UserWarning,
        match=r"4 query and 2 kv heads do not split over 3 ranks "
        r"\(sizes that do: 2, 4\)",
    ):
        plait.compile(hf.wrap(model), hf.example_inputs(model, 2, 8), pipeline="shard{mesh=tp:3}")
