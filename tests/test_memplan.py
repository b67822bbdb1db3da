"""memplan: liveness (views, async windows), arena planners against the lower
bound and an overlap checker, and programs running in the arena against eager
(bit-exact), on gloo ranks with async collectives, and from an artifact."""

from __future__ import annotations

import random
import re
import warnings

import plait
import pytest
import torch
from helpers import artifact_rank, max_rel_diff, run_ranks
from plait.frontend import hf
from plait.ir.errors import PlaitError
from plait.ir.text import parse_module
from plait.passes.manager import PassManager
from plait.passes.memory.arena import (
    ALIGN,
    ORDERS,
    PlanError,
    _aligned,
    _best_fit,
    check,
    lower_bound,
    plan_arena,
)
from plait.passes.memory.liveness import Buffer, liveness, value_sizes


def _buffers(spec):
    """(size, start, end) triples -> Buffers (values are not needed to plan)."""
    return [Buffer(None, size, start, end) for size, start, end in spec]


def _random_buffers(seed: int, n: int):
    rng = random.Random(seed)
    spec = []
    for _ in range(n):
        start = rng.randrange(0, 3 * n)
        spec.append((ALIGN * rng.randint(1, 64), start, start + rng.randrange(0, n // 2 + 1)))
    return _buffers(spec)


@pytest.mark.parametrize("seed", range(6))
def test_plans_are_valid_and_never_below_the_bound(seed):
    buffers = _random_buffers(seed, 300)
    plan = plan_arena(buffers)
    check(buffers, plan.offsets)
    assert lower_bound(buffers) == plan.lower_bound <= plan.size
    assert plan.ratio <= 1.15  # random lifetimes are harder than a program's


def test_exact_search_runs_where_every_greedy_order_misses_the_bound():
    # six buffers that none of the best-fit orders packs into the peak of live bytes
    buffers = _buffers(
        [(192, 5, 7), (192, 2, 4), (192, 4, 5), (192, 0, 0), (192, 4, 5), (256, 1, 3)]
    )
    greedy = min(
        max(o + _aligned(b.size) for o, b in zip(_best_fit(buffers, order), buffers))
        for key in ORDERS.values()
        for order in [sorted(range(len(buffers)), key=lambda i: key(buffers[i]))]
    )
    plan = plan_arena(buffers)
    assert plan.method == "exact (z3)"
    check(buffers, plan.offsets)
    assert plan.size == plan.lower_bound == 576 < greedy == 640


def test_the_checker_finds_overlaps():
    buffers = _buffers([(128, 0, 2), (128, 1, 3), (128, 3, 4)])
    check(buffers, [0, 128, 0])  # the third reuses the first's bytes after it dies
    with pytest.raises(PlanError, match="alive together"):
        check(buffers, [0, 64, 256])


ASYNC = """\
builtin.module {
  func.func @forward(%x : !plait.tensor<[4, 8], f32>) -> !plait.tensor<[4, 8], f32> {
    %a = plait.elementwise "aten::exp"(%x) : !plait.tensor<[4, 8], f32>
    %s = plait.all_reduce %a {axis = "tp", reduce = "sum", async} : !plait.tensor<[4, 8], f32> -> !plait.async<!plait.tensor<[4, 8], f32>>
    %v = plait.reshape "aten::view"(%x, [8, 4]) : !plait.tensor<[8, 4], f32>
    %b = plait.elementwise "aten::neg"(%v) : !plait.tensor<[8, 4], f32>
    %t = plait.reshape "aten::view"(%b, [4, 8]) : !plait.tensor<[4, 8], f32>
    %c = plait.elementwise "aten::sin"(%x) : !plait.tensor<[4, 8], f32>
    %r = plait.wait %s : !plait.async<!plait.tensor<[4, 8], f32>> -> !plait.tensor<[4, 8], f32>
    %y = plait.elementwise "aten::add.Tensor"(%r, %t) : !plait.tensor<[4, 8], f32>
    func.return %y : !plait.tensor<[4, 8], f32>
  }
}
"""


def test_liveness_follows_views_and_async_windows():
    fn = parse_module(ASYNC).ops.first
    live = {b.value.name_hint: b for b in liveness(fn, value_sizes(fn, {})).buffers}
    assert set(live) == {"a", "s", "b", "c", "y"}  # views and the wait own no memory
    assert (live["a"].start, live["a"].end) == (0, 6)  # sent while in flight: until the wait
    assert (live["b"].start, live["b"].end) == (3, 7)  # through its view %t
    assert live["y"].returned and not live["c"].returned


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mixtral-tiny"])
def test_programs_in_the_arena_match_eager_exactly(example, name):
    model, example_inputs, shapes = example(name)
    compiled = plait.compile(
        model, example_inputs, dynamic_shapes=shapes, pipeline="canonicalize,cse,dce,memplan"
    )
    assert "plait.arena = " in compiled.ir and "as_strided" in compiled.code
    for batch, seq in ((3, 11), (64, 256)):  # any shape up to the planned maximum
        inputs = hf.example_inputs(model.model, batch, seq)
        with torch.no_grad():
            ref = model(*inputs)
            assert torch.equal(compiled(*inputs), ref)
            assert torch.equal(compiled(*inputs), ref)  # the arena is reused


def test_ladder_in_the_arena_with_streamed_weights_on_gloo_ranks(example, tmp_path):
    model, example_inputs, shapes = example("llama-tiny")
    reference = plait.compile(
        model, example_inputs, dynamic_shapes=shapes, pipeline="canonicalize,cse,dce,ladder"
    )
    planned = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline="canonicalize,cse,dce,shard{mesh=tp:2},ladder,memplan{values=batch:4,seq:32},"
        "tier{budget=0.5,values=batch:4,seq:32}",
    )
    assert "async" in planned.ir and "plait.arena" in planned.ir and 'tier = "host"' in planned.ir
    planned.save(tmp_path)
    inputs = hf.example_inputs(model.model, 3, 11)
    with torch.no_grad():
        ref = reference(*inputs)
    for out, _ in run_ranks(2, artifact_rank, str(tmp_path), list(inputs)):
        assert max_rel_diff(out, ref) <= 1e-5


def test_unprovable_aliasing_is_left_to_pytorch():
    text = ASYNC.replace(
        'plait.elementwise "aten::sin"(%x) : !plait.tensor<[4, 8], f32>',
        'plait.call "aten::sin_"(%b) : !plait.tensor<[8, 4], f32>',
    )
    module = parse_module(text)
    with pytest.warns(UserWarning, match=r"not planning @forward.*aten::sin_ writes an input"):
        PassManager.parse("memplan").run(module)
    assert "plait.arena" not in module.attributes


def test_unbounded_sizes_need_values():
    from torch.export import Dim

    model = torch.nn.Linear(8, 8)
    shapes = {"input": {0: Dim("rows", min=2)}}
    with pytest.raises(
        PlaitError, match=r"'rows' has no upper bound; give memplan\{values=rows:N\}"
    ):
        plait.compile(model, (torch.randn(4, 8),), dynamic_shapes=shapes, pipeline="memplan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = plait.compile(
            model, (torch.randn(4, 8),), dynamic_shapes=shapes, pipeline="memplan{values=rows:16}"
        )
    x = torch.randn(16, 8)
    assert torch.equal(compiled(x), model(x))


def test_streaming_schedule_by_hand():
    from plait.passes.memory.tiering import Weight, simulate, staging_bytes

    times = [1.0, 1.0, 1.0, 1.0]
    a, b, c = Weight("a", 10, 0, 0), Weight("b", 10, 1, 1), Weight("c", 30, 3, 3)
    assert simulate(times, [], 10.0) == 4.0
    # copies: a 0-1, b 1-2; c needs a's slot, free when op 0 ends (at 2, after waiting
    # for a), so c copies 2-5; ops: 0 at 1-2, 1 at 2-3, 2 at 3-4, 3 waits for c: 5-6
    assert simulate(times, [a, b, c], 10.0) == pytest.approx(6.0)
    assert staging_bytes([a, b, c]) == 40


def test_tiered_weights_give_identical_outputs(example, tmp_path):
    model, example_inputs, shapes = example("llama-tiny")
    compiled = plait.compile(
        model,
        example_inputs,
        dynamic_shapes=shapes,
        pipeline="canonicalize,cse,dce,memplan,tier{budget=0.5,values=batch:2,seq:16}",
    )
    from plait.cost.estimate_report import memory_plan

    rows = dict(memory_plan(compiled.estimate("cpu", values={"batch": 2, "seq": 16})))
    assert "MB" in rows["activation arena"] and "streamed" in rows["weight tiering"]
    streamed = compiled.ir.count('tier = "host"')
    assert streamed >= 4 and "self.prefetch('take', 0)" in compiled.code
    summary = compiled.module.attributes["plait.tiering"].data
    total, on_device = (int(x) for x in re.findall(r"(\d+) B", summary))
    assert on_device <= 0.5 * total
    compiled.save(tmp_path)
    again = plait.load(tmp_path)  # streamed from weights.safetensors
    inputs = hf.example_inputs(model.model, 3, 11)
    with torch.no_grad():
        ref = model(*inputs)
        assert torch.equal(compiled(*inputs), ref)
        assert torch.equal(again(*inputs), ref) and torch.equal(again(*inputs), ref)


def test_a_budget_below_the_minimum_says_the_minimum(example):
    model, example_inputs, _ = example("llama-tiny")
    with pytest.raises(
        plait.PlaitError, match=r"below the minimum that fits, \d+ bytes .* at least"
    ):
        plait.compile(model, example_inputs, pipeline="tier{budget=0.05}")


def test_a_training_step_in_the_arena_equals_one_without():
    """A Llama training step planned by memplan: the joint graph calls `view`
    on attention's transposed output, which is contiguous only in the layout
    eager gives it (from the rotary's transposed `q * cos`), so ops whose
    output follows a strided input's layout keep PyTorch's allocator."""
    from plait.examples.models import llama_tiny

    model = llama_tiny()[0].model
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    planned = plait.compile_training(model, (ids, ids), pipeline="canonicalize,cse,dce,memplan")
    plain = plait.compile_training(model, (ids, ids), pipeline="canonicalize,cse,dce")
    assert "arena" in planned.code and planned.code.count("out = ") > 100
    for step in range(2):
        assert torch.equal(planned.step(ids, ids), plain.step(ids, ids)), f"step {step}"
    for name, tensor in plain.state_dict().items():
        assert torch.equal(planned.state_dict()[name], tensor), name
