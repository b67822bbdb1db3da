"""Expert parallelism: MoE experts split over the tensor axis or an `ep` axis
(passes/shard/experts.py, customops/experts.py), checked against transformers' grouped
product, eager and transformers' generate."""

from __future__ import annotations

import plait
import pytest
import torch
import transformers
from helpers import max_rel_diff
from plait.customops.experts import expert_mm, expert_mm_backward
from plait.frontend import hf
from plait.ir.text import parse_module, print_module
from plait.passes.manager import PassManager
from plait.passes.shard.experts import find_expert_mlps
from transformers.integrations.moe import _grouped_mm_fallback as grouped_mm


def test_the_ranks_expert_products_sum_to_the_grouped_product():
    g = torch.Generator().manual_seed(0)
    experts, rows, n = 6, 40, 3
    counts = torch.tensor([9, 0, 13, 7, 0, 11])  # two experts get no rows
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(rows, 16, generator=g)
    w = torch.randn(experts, 16, 24, generator=g)
    whole = grouped_mm(x, w, offsets)
    held = torch.arange(experts).chunk(n)
    parts = [expert_mm(x, w[ids], offsets, ids) for ids in held]
    assert torch.equal(sum(parts), whole)
    # a rank's rows of other experts are zero; its own are the grouped product's, bit for bit
    mine = slice(int(offsets[1]), int(offsets[3]))  # experts 2 and 3
    assert torch.equal(parts[1][mine], whole[mine])
    assert (
        parts[1][: int(offsets[1])].abs().sum() == 0
        and parts[1][int(offsets[3]) :].abs().sum() == 0
    )


def test_the_ranks_expert_backward_sums_to_the_grouped_backward():
    """expert_mm_backward (a training step's): the ranks' row gradients sum to
    the grouped product's, and each rank's weight gradient is its experts'
    slice of the whole one, bit for bit."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([9, 0, 13, 7, 0, 11])
    offsets = counts.cumsum(0).to(torch.int32)
    x, grad = torch.randn(40, 16, generator=g), torch.randn(40, 24, generator=g)
    w = torch.randn(6, 16, 24, generator=g)
    whole_rows, whole_weight = torch.ops.transformers.grouped_mm_fallback_backward(
        x, w, offsets, grad
    )
    held = torch.arange(6).chunk(3)
    parts = [expert_mm_backward(x, w[ids], offsets, grad, ids) for ids in held]
    assert torch.equal(sum(rows for rows, _ in parts), whole_rows)
    assert torch.equal(torch.cat([weight for _, weight in parts]), whole_weight)


def _mixtral(experts: int = 4):
    config = transformers.MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


def test_mixtral_experts_split_with_one_all_reduce_per_moe_layer(compiled):
    module = parse_module(compiled("mixtral-tiny").ir)
    assert [m.experts for m in find_expert_mlps(module.body.block.ops.first.body.block)] == [4, 4]
    PassManager.parse("shard{mesh=tp:2},dce").run(module)
    text = print_module(module)
    for layer in (0, 1):
        for weight, shape in (("gate_up_proj", "[2, 256, 64]"), ("down_proj", "[2, 64, 128]")):
            assert (
                f'"model.layers.{layer}.mlp.experts.{weight}" {{plait.placements = '
                f"#plait.placements<[shard(0)]>}} : !plait.tensor<{shape}, f32>"
            ) in text
    assert text.count('"plait::expert_mm"') == 4
    # attention's and the experts' partial sums: 2 all-reduces per layer, none inside the MoE
    assert text.count("plait.all_reduce") == 4
    assert text.count("plait.all_gather") == 1  # the vocab-split logits; the router stays whole
    assert '"model.layers.0.mlp.gate.weight" :' in text  # not sliced


def test_experts_that_do_not_split_run_replicated_with_a_warning():
    model = _mixtral(experts=3)
    inputs = hf.example_inputs(model, 2, 8)
    with pytest.warns(
        UserWarning,
        match=r"the 3 experts of model.layers.0.mlp.experts do not "
        r"split over 2 ranks and run replicated \(sizes that do: 3\)",
    ):
        program = plait.compile(hf.wrap(model), inputs, pipeline="shard{mesh=tp:2}")
    try:
        assert "plait::expert_mm" not in program.ir
        with torch.no_grad():
            assert max_rel_diff(program(*inputs), hf.wrap(model)(*inputs)) <= 1e-5
    finally:
        program.close()


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(config).eval()


@pytest.mark.parametrize("build,n", [(_mixtral, 4), (_qwen3_moe, 2)])
def test_expert_parallel_programs_match_eager(build, n):
    model = build()
    inputs = hf.example_inputs(model, 3, 11)
    program = plait.compile(
        hf.wrap(model),
        hf.example_inputs(model, 2, 16),
        dynamic_shapes=hf.dynamic_shapes(max_seq=256),
        pipeline=f"canonicalize,cse,dce,shard{{mesh=tp:{n}}},dce",
    )
    try:
        assert program.ir.count('"plait::expert_mm"') == 4
        with torch.no_grad():
            assert max_rel_diff(program(*inputs), hf.wrap(model)(*inputs)) <= 1e-5
    finally:
        program.close()


MOE_IR = """\
builtin.module {
  func.func @forward(%rows : !plait.tensor<[12, 8], f32>, %offs : !plait.tensor<[4], i32>) -> !plait.tensor<[12, 8], f32> {
    %w1 = plait.param "experts.up" : !plait.tensor<[4, 32, 8], f32> loc("moe.experts")
    %w2 = plait.param "experts.down" : !plait.tensor<[4, 8, 16], f32> loc("moe.experts")
    %t1 = plait.reshape "aten::transpose.int"(%w1, -2, -1) : !plait.tensor<[4, 8, 32], f32>
    %h = plait.call "transformers::grouped_mm_fallback"(%rows, %t1, %offs) : !plait.tensor<[12, 32], f32>
    %a, %b = plait.reshape "aten::chunk"(%h, 2, -1) : (!plait.tensor<[12, 16], f32>, !plait.tensor<[12, 16], f32>)
    %s = plait.elementwise "aten::silu"(%a) : !plait.tensor<[12, 16], f32>
    %g = plait.elementwise "aten::mul.Tensor"(%s, %b) : !plait.tensor<[12, 16], f32>
    %t2 = plait.reshape "aten::transpose.int"(%w2, -2, -1) : !plait.tensor<[4, 16, 8], f32>
    %y = plait.call "transformers::grouped_mm_fallback"(%g, %t2, %offs) : !plait.tensor<[12, 8], f32>
    func.return %y : !plait.tensor<[12, 8], f32>
  }
}
"""


def _found(text: str, verify: bool = True):
    return find_expert_mlps(parse_module(text, verify=verify).body.block.ops.first.body.block)


def test_only_row_wise_zero_preserving_ops_may_sit_between_the_products():
    (mlp,) = _found(MOE_IR)
    assert [op.target_name for op in mlp.between] == [
        "aten::chunk",
        "aten::silu",
        "aten::mul.Tensor",
    ]
    assert (mlp.experts, len(mlp.views), mlp.router) == (4, 2, None)
    # 1 + silu(a) is not 0 on the rows of other experts: they would leak into the sum
    shifted = MOE_IR.replace('"aten::silu"(%a)', '"aten::add.Scalar"(%a, 1.0)')
    assert _found(shifted) == []
    # a chunk across rows would mix the experts' rows
    across = MOE_IR.replace(
        '"aten::chunk"(%h, 2, -1) : (!plait.tensor<[12, 16], f32>, !plait.tensor<[12, 16], f32>)',
        '"aten::chunk"(%h, 2, 0) : (!plait.tensor<[6, 32], f32>, !plait.tensor<[6, 32], f32>)',
    )
    assert _found(across, verify=False) == []  # ill-typed after the chunk: only its dim matters


def test_a_rank_is_charged_its_share_of_the_experts_work():
    from plait.cost.op_cost import op_cost

    module = parse_module(MOE_IR)
    whole = [op_cost(op) for op in module.walk() if "grouped_mm" in getattr(op, "target_name", "")]
    # 12 rows, each through one expert: 2 * rows * in * out
    assert [c.flops for c in whole] == [2 * 12 * 8 * 32, 2 * 12 * 16 * 8]
    # 12 rows outnumber the 4 experts: every expert's weight is read once
    assert whole[0].bytes == 4 * (12 * 8 + 12 * 32 + 4 * 8 * 32)
    PassManager.parse("shard{mesh=tp:2}").run(module)
    split = [
        op_cost(op) for op in module.walk() if getattr(op, "target_name", "") == "plait::expert_mm"
    ]
    assert [c.flops for c in split] == [c.flops / 2 for c in whole]
    assert split[0].bytes == 4 * (12 * 8 // 2 + 12 * 32 + 2 * 8 * 32)


@pytest.mark.parametrize("mesh,split,cache", [("tp:2", 8, "[2, 1, 41, 16]"),
                                               ("ep:2", 8, "[1, 2, 41, 16]"),
                                               ("dp:2", 0, "[1, 2, 41, 16]")])  # fmt: skip
def test_generation_with_split_experts_is_transformers_generate(mesh, split, cache):
    from plait.examples.models import causal_lm

    model = causal_lm("mixtral")[0].model
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
        )
    two = plait.compile_generation(model, batch=2, max_length=40, pipeline=f"shard{{mesh={mesh}}}")
    try:  # 2 layers in @prefill and @decode; dp keeps the experts whole
        assert two.ir.count('"plait::expert_mm"') == split
        # the KV cache is split by kv heads over tp and by sequences over a data axis
        assert f"!plait.tensor<{cache}, f32>" in two.ir
        assert torch.equal(two.generate(ids, 24), expected)
    finally:
        two.close()


def test_the_dispatch_brings_each_rank_the_rows_of_its_experts():
    from helpers import dispatch_rank, run_ranks

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 5, generator=g)  # 3 tokens on each of 2 ranks
    # 4 experts (2 per rank), top-2 of each token; rank 1's experts get one row, rank 0's the rest
    chosen = torch.tensor([[0, 1], [1, 0], [0, 3], [1, 0], [0, 1], [1, 0]])
    experts, rows = chosen.reshape(-1).sort(stable=True)
    token_of_row = rows // 2
    offsets = torch.bincount(experts, minlength=4).cumsum(0).to(torch.int32)
    routed = tokens[token_of_row]
    for rank, got in enumerate(run_ranks(2, dispatch_rank, tokens, token_of_row, offsets)):
        start, end = int(offsets[2 * rank - 1]) if rank else 0, int(offsets[2 * rank + 1])
        expected = torch.zeros_like(routed)
        expected[start:end] = routed[start:end]
        assert torch.equal(got, expected)


def test_an_ep_mesh_splits_tokens_and_experts_with_an_all_to_all(tmp_path):
    from helpers import artifact_rank, run_ranks
    from plait.examples.models import mixtral_tiny

    model, inputs, _ = mixtral_tiny(batch=4, seq=8)
    program = plait.compile(model, inputs, pipeline="canonicalize,cse,dce,shard{mesh=ep:2},dce")
    ir = program.ir
    assert (
        '"model.layers.0.mlp.experts.down_proj" {plait.placements = '
        "#plait.placements<[shard(0)]>} : !plait.tensor<[2, 64, 128], f32>"
    ) in ir
    # per MoE layer: the router's scores gathered (every rank routes every token), the
    # rows sent to their experts' ranks, the tokens' sums reduce-scattered back
    assert ir.count('"plait::expert_dispatch"') == 2 and ir.count('group("ep")') == 2
    assert ir.count("plait.reduce_scatter") == 2 and "plait.all_reduce" not in ir
    assert "%softmax_gathered = plait.all_gather %softmax" in ir
    program.save(tmp_path)
    with torch.no_grad():
        ref = model(*inputs)
    for out, _ in run_ranks(2, artifact_rank, str(tmp_path), list(inputs)):
        assert max_rel_diff(out, ref) <= 1e-5


def test_experts_over_ep_and_dense_layers_over_tp():
    from plait.examples.models import mixtral_tiny

    model, inputs, _ = mixtral_tiny(batch=4, seq=8)
    program = plait.compile(
        model, inputs, pipeline="canonicalize,cse,dce,shard{mesh=ep:2,tp:2},dce"
    )
    try:
        ir = program.ir
        assert "#plait.placements<[shard(0), replicate]>} : !plait.tensor<[2, 256, 64], f32>" in ir
        assert '"model.layers.0.mlp.gate.weight" :' in ir  # the router whole on both axes
        assert ir.count("plait.all_reduce") == 2  # attention's, over tp
        with torch.no_grad():
            assert max_rel_diff(program(*inputs), model(*inputs)) <= 1e-5
    finally:
        program.close()


def test_the_ilp_counts_each_rank_its_share_of_the_experts(example):
    model, inputs, shapes = example("mixtral-tiny")
    weights = sum(p.numel() * 4 for p in model.parameters())  # 1.02 MB, 0.79 MB of experts
    # half the weights and a little: reachable only with the experts split
    budget = weights // 2 + 16_000
    program = plait.compile(
        model,
        inputs,
        dynamic_shapes=shapes,
        pipeline=f"canonicalize,cse,dce,shard{{mesh=tp:2,solve=ilp,hardware=cpu,"
        f"values=batch:1,seq:16,memory={budget}}},dce",
    )
    try:
        assert program.ir.count('"plait::expert_mm"') == 4
        with torch.no_grad():
            assert max_rel_diff(program(*inputs), model(*inputs)) <= 1e-5
    finally:
        program.close()


def test_the_estimate_charges_the_dispatch_to_the_link():
    from plait.cost.comm_cost import ring_steps
    from plait.examples.models import mixtral_tiny
    from plait.hardware import load

    model, inputs, _ = mixtral_tiny(batch=4, seq=8)
    program = plait.compile(model, inputs, pipeline="canonicalize,cse,dce,shard{mesh=ep:2},dce")
    estimate = program.estimate(hardware="h100-sxm")
    sent = [
        e
        for e in estimate.schedule.events
        if getattr(e.op, "target_name", "") == "plait::expert_dispatch"
    ]
    # each rank sends its half of the 64 routed rows of 64 floats, over NVLink
    link = load("h100-sxm").link_for(2)
    assert [e.lane for e in sent] == ["comm", "comm"]
    assert sent[0].duration == pytest.approx(float(ring_steps(2, 64 * 64 * 4 / 2, link)))


def test_a_manual_plan_decides_the_router():
    model = _mixtral()
    inputs = hf.example_inputs(model, 2, 8)
    ir = plait.compile(
        hf.wrap(model), inputs, pipeline="shard{mesh=tp:2,plan=*.mlp.gate:colwise}"
    ).ir
    assert (
        '"model.layers.0.mlp.gate.weight" {plait.placements = #plait.placements<[shard(0)]>}' in ir
    )
    assert ir.count('"plait::expert_mm"') == 4  # the experts still split
