"""The cost model: FLOP and byte counts against hand-computed values, the
alpha-beta collectives, the schedule simulation, z3 bounds, hardware files,
and `plait estimate` / `plait calibrate`."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import sympy
from plait import hardware
from plait.cost.bounds import prove_at_most
from plait.cost.comm_cost import all_reduce_time, axis_links, collective_time
from plait.cost.estimate import Target, estimate
from plait.cost.op_cost import op_cost
from plait.hardware import HardwareError, Link, load
from plait.ir import symbolic
from plait.ir.text import parse_module

B, S = symbolic.symbol("b"), symbolic.symbol("s")


def _ops(body: str, inputs: str, symbols: str = "b = [1, 64], s = [1, 4096]", mesh: str = ""):
    attrs = f"plait.symbols = #plait.symbols<{symbols}>" + (
        f", plait.mesh = #plait.mesh<{mesh}>" if mesh else ""
    )
    text = f"builtin.module attributes {{{attrs}}} {{\n  func.func @forward({inputs}) {{\n{body}    func.return\n  }}\n}}\n"
    module = parse_module(text)
    return module, list(module.ops.first.body.blocks.first.ops)[:-1]


def test_linear_flops_and_bytes():
    _, (w, b, y) = _ops(
        '    %w = plait.param "w" : !plait.tensor<[256, 64], bf16>\n'
        '    %bias = plait.param "bias" : !plait.tensor<[256], bf16>\n'
        '    %y = plait.linear "aten::linear"(%x, %w, %bias) : !plait.tensor<[b, s, 256], bf16>\n',
        "%x : !plait.tensor<[b, s, 64], bf16>",
    )
    cost = op_cost(y)
    assert sympy.simplify(cost.flops - (2 * B * S * 64 * 256 + B * S * 256)) == 0
    # x + W + bias + y, 2 bytes each
    assert sympy.simplify(cost.bytes - 2 * (B * S * 64 + 256 * 64 + 256 + B * S * 256)) == 0
    assert op_cost(w).flops == 0 and op_cost(w).kind == "none"


def test_attention_flops_and_bytes_prefill_and_decode():
    _, ops = _ops(
        '    %o = plait.attention "aten::scaled_dot_product_attention"(%q, %k, %v, is_causal = true, enable_gqa = true) : !plait.tensor<[b, 8, s, 64], f32>\n',
        "%q : !plait.tensor<[b, 8, s, 64], f32>, %k : !plait.tensor<[b, 2, s, 64], f32>, %v : !plait.tensor<[b, 2, s, 64], f32>",
    )
    (attention,) = ops
    prefill = op_cost(attention)
    scores = B * 8 * S * S / 2  # is_causal: fused kernels skip the masked half
    assert sympy.simplify(prefill.flops - (2 * scores * 64 + 2 * scores * 64 + 5 * scores)) == 0
    # q and out (8 heads), k and v (2 heads), fp32
    assert sympy.simplify(prefill.bytes - 4 * (2 * B * 8 * S * 64 + 2 * B * 2 * S * 64)) == 0
    decode = op_cost(attention, context=1000)
    assert sympy.simplify(decode.flops - (4 * B * 8 * S * 1000 * 64 + 5 * B * 8 * S * 1000)) == 0
    assert sympy.simplify(decode.bytes - 4 * (2 * B * 8 * S * 64 + 2 * B * 2 * 1000 * 64)) == 0


def test_norm_elementwise_embedding_and_views():
    _, (norm, act, emb, view, cat) = _ops(
        '    %n = plait.norm "aten::layer_norm"(%x, [64]) : !plait.tensor<[b, 64], f32>\n'
        '    %a = plait.elementwise "aten::silu"(%n) : !plait.tensor<[b, 64], f32>\n'
        '    %e = plait.embedding "aten::embedding"(%t, %i) : !plait.tensor<[b, 64], f32>\n'
        '    %v = plait.reshape "aten::view"(%a, [sym(b), 8, 8]) : !plait.tensor<[b, 8, 8], f32>\n'
        '    %c = plait.reshape "aten::cat"([%a, %e], 1) : !plait.tensor<[b, 128], f32>\n',
        "%x : !plait.tensor<[b, 64], f32>, %t : !plait.tensor<[1000, 64], f32>, %i : !plait.tensor<[b], i64>",
    )
    assert sympy.simplify(op_cost(norm).flops - 5 * B * 64) == 0
    assert sympy.simplify(op_cost(norm).bytes - 2 * 4 * B * 64) == 0
    assert sympy.simplify(op_cost(act).flops - 4 * B * 64) == 0  # a transcendental
    # an embedding reads the rows it returns, not the table
    assert sympy.simplify(op_cost(emb).bytes - (2 * 4 * B * 64 + 8 * B)) == 0
    assert op_cost(view).kind == "view" and op_cost(view).bytes == 0
    assert sympy.simplify(op_cost(cat).bytes - 4 * (B * 64 * 2 + B * 128)) == 0


def test_a_lookup_reads_its_rows_of_the_table_not_the_table():
    _, (_, emb) = _ops(
        '    %t = plait.param "embed" : !plait.tensor<[128256, 8192], bf16>\n'
        '    %e = plait.embedding "aten::embedding"(%t, %i) : !plait.tensor<[b, 8192], bf16>\n',
        "%i : !plait.tensor<[b], i64>",
    )
    # the rows it returns stream from memory; the 2.1 GB table does not
    assert sympy.simplify(op_cost(emb).weight_bytes - 2 * B * 8192) == 0
    time = load("h100-sxm").roofline(
        op_cost(emb).flops, op_cost(emb).bytes, "bf16", weights=op_cost(emb).weight_bytes
    )
    assert float(time.subs(B, 1)) < 1e-6


def test_element_wise_kernel_classes_from_shapes_and_layouts():
    from plait.cost.layout import memory_orders, strided

    module, ops = _ops(
        '    %t = plait.reshape "aten::transpose.int"(%x, 1, 2) : !plait.tensor<[b, 8, s, 64], f32>\n'
        '    %mixed = plait.elementwise "aten::add.Tensor"(%t, %y) : !plait.tensor<[b, 8, s, 64], f32>\n'
        '    %inner = plait.elementwise "aten::mul.Tensor"(%y, %col) : !plait.tensor<[b, 8, s, 64], f32>\n'
        '    %outer = plait.elementwise "aten::mul.Tensor"(%y, %row) : !plait.tensor<[b, 8, s, 64], f32>\n'
        '    %mask = plait.elementwise "aten::__and__.Tensor"(%one, %m) : !plait.tensor<[s, s], i1>\n'
        '    %mean = plait.reduce "aten::mean.dim"(%y, [-1], true) : !plait.tensor<[b, 8, s, 1], f32>\n',
        "%x : !plait.tensor<[b, s, 8, 64], f32>, %y : !plait.tensor<[b, 8, s, 64], f32>, "
        "%col : !plait.tensor<[b, 8, s, 1], f32>, %row : !plait.tensor<[64], f32>, "
        "%one : !plait.tensor<[], i1>, %m : !plait.tensor<[s, s], i1>",
    )
    _, mixed, inner, outer, mask, mean = ops
    orders = memory_orders(module.ops.first.body.blocks.first)
    walks = {op: strided(op, orders) for op in ops}
    # a transposed operand with a contiguous one: no contiguous inner loop
    assert walks[mixed] and op_cost(mixed, strided=True).rate == "strided"
    assert not any(walks[op] for op in (inner, outer, mask))
    # repeated along the innermost dim (or a 0-d tensor): the broadcast kernel
    assert op_cost(inner).rate == "broadcast" and op_cost(mask).rate == "broadcast"
    assert op_cost(outer).rate is None  # repeated along outer dims only
    assert op_cost(mean).rate == "reduce"
    assert all(
        sympy.simplify(op_cost(op).elements - op_cost(op).flops) == 0
        for op in (inner, outer, mask, mean)
    )


def test_small_element_wise_kernels_run_on_one_thread(tmp_path):
    path = tmp_path / "cpu.toml"
    path.write_text(
        "[compute]\nf32 = 1e11\n[compute.broadcast]\nf32 = 1e9\ni1 = 1e8\n"
        "[memory]\nbandwidth = 1e10\ncapacity = 1e9\n[threads]\ncount = 2\ngrain = 32768\n"
    )
    hw = load(path)
    one, two = (float(hw.roofline(n, 0, "f32", "broadcast", elements=n)) for n in (32768, 65536))
    assert one == pytest.approx(2 * 32768 / 1e9) and two == pytest.approx(65536 / 1e9)
    # a kernel that threads otherwise (BLAS) is not held to the grain
    assert float(hw.roofline(32768, 0, "f32", "broadcast")) == pytest.approx(32768 / 1e9)
    # masks at their own rate; integer kernels of a rated class at its float rate
    assert hw.peak_flops("i1", "broadcast") == 1e8 and hw.peak_flops("i64", "broadcast") == 1e9


def test_mask_ops_are_costed_in_their_own_type():
    from plait.cost.estimate import op_dtype

    _, (le,) = _ops(
        '    %le = plait.elementwise "aten::le.Tensor"(%r, %c) : !plait.tensor<[1, 1, s, s], i1>\n',
        "%r : !plait.tensor<[1, 1, 1, s], i64>, %c : !plait.tensor<[1, 1, s, 1], i64>",
    )
    assert op_dtype(le) == "i1" and op_cost(le).rate == "broadcast"


LINK = Link("test", 8, bandwidth=100e9, latency=2e-6)


@pytest.mark.parametrize("p,n", [(8, 16384), (8, 64e6), (2, 1e6), (4, 1e9)])
def test_all_reduce_is_the_faster_of_ring_and_tree(p, n):
    ring = 2 * (p - 1) * (2e-6 + n / (p * 100e9))
    tree = 2 * math.ceil(math.log2(p)) * 2e-6 + 2 * n / 100e9
    assert float(all_reduce_time(p, sympy.Float(n), LINK)) == pytest.approx(min(ring, tree))


def test_each_collective_by_alpha_beta():
    _, (ar, ag, rs, a2a) = _ops(
        '    %r = plait.all_reduce %x {axis = "tp", reduce = "sum"} : !plait.tensor<[1024], bf16> -> !plait.tensor<[1024], bf16>\n'
        '    %g = plait.all_gather %x {axis = "tp", dim = 0 : i64} : !plait.tensor<[1024], bf16> -> !plait.tensor<[4096], bf16>\n'
        '    %s = plait.reduce_scatter %x {axis = "tp", dim = 0 : i64, reduce = "sum"} : !plait.tensor<[1024], bf16> -> !plait.tensor<[256], bf16>\n'
        '    %a = plait.all_to_all %x {axis = "tp", split_dim = 0 : i64, concat_dim = 0 : i64} : !plait.tensor<[1024], bf16> -> !plait.tensor<[1024], bf16>\n',
        "%x : !plait.tensor<[1024], bf16>",
    )
    links = {"tp": (4, LINK)}
    alpha, beta, n = 2e-6, 100e9, 2048.0  # 1024 bf16
    assert float(collective_time(ar, links)) == pytest.approx(
        min(6 * (alpha + n / (4 * beta)), 4 * alpha + 2 * n / beta)
    )
    assert float(collective_time(ag, links)) == pytest.approx(3 * (alpha + 4 * n / (4 * beta)))
    assert float(collective_time(rs, links)) == pytest.approx(3 * (alpha + n / (4 * beta)))
    assert float(collective_time(a2a, links)) == pytest.approx(3 * (alpha + n / (4 * beta)))


def test_a_reduce_scatter_plait_runs_as_an_all_reduce_is_priced_as_one():
    """On a link whose programs run a float reduce-scatter as an all-reduce
    (gloo: `cpu`'s link says so), it costs that all-reduce; an integer one
    stays a ring reduce-scatter, as it does on every other link."""
    _, (floats, ints) = _ops(
        '    %s = plait.reduce_scatter %x {axis = "tp", dim = 0 : i64, reduce = "sum"} : !plait.tensor<[1024], bf16> -> !plait.tensor<[512], bf16>\n'
        '    %c = plait.reduce_scatter %i {axis = "tp", dim = 0 : i64, reduce = "sum"} : !plait.tensor<[1024], i64> -> !plait.tensor<[512], i64>\n',
        "%x : !plait.tensor<[1024], bf16>, %i : !plait.tensor<[1024], i64>",
    )
    gloo = load("cpu").links[0]
    assert gloo.scatter_as_all_reduce and not LINK.scatter_as_all_reduce
    links = {"tp": (2, gloo)}
    assert float(collective_time(floats, links)) == pytest.approx(
        float(all_reduce_time(2, sympy.Float(2048), gloo))
    )
    assert float(collective_time(ints, links)) == pytest.approx(
        gloo.latency + 8192 / (2 * gloo.bandwidth)
    )
    assert float(collective_time(floats, {"tp": (2, LINK)})) == pytest.approx(2e-6 + 2048 / 200e9)


def test_mesh_axes_map_to_links():
    h100 = load("h100-sxm")
    links = axis_links({"dp": 2, "tp": 8}, h100)
    assert links["tp"][1].name.startswith("NVLink") and links["dp"][1].name.startswith("InfiniBand")
    with pytest.raises(
        HardwareError, match="larger than one node .* describes no link between nodes"
    ):
        axis_links({"tp": 16}, load("h100-pcie-nop2p"))


def test_unknown_hardware_lists_the_known_ones(tmp_path):
    with pytest.raises(
        HardwareError,
        match="unknown hardware 'tpu-v9'; known: a100-80gb, cpu, h100-pcie-nop2p, h100-sxm, h200",
    ):
        load("tpu-v9")
    bad = tmp_path / "bad.toml"
    bad.write_text("[compute]\nf32 = 1e12\n")
    with pytest.raises(HardwareError, match="missing 'memory'"):
        load(bad)


SCHEDULE_IR = """\
    %w = plait.param "w" : !plait.tensor<[1024, 1024], f32>
    %y = plait.linear "aten::linear"(%x, %w) : !plait.tensor<[1024, 1024], f32>
    %h = plait.all_reduce %y {{axis = "tp", reduce = "sum"{flag}}} : !plait.tensor<[1024, 1024], f32> -> {type}
    %z = plait.linear "aten::linear"(%x, %w) : !plait.tensor<[1024, 1024], f32>
{wait}    %s = plait.elementwise "aten::add.Tensor"(%z, %r) : !plait.tensor<[1024, 1024], f32>
"""


def _schedule(async_: bool, hardware=None):
    body = SCHEDULE_IR.format(
        flag=", async" if async_ else "",
        type="!plait.async<!plait.tensor<[1024, 1024], f32>>"
        if async_
        else "!plait.tensor<[1024, 1024], f32>",
        wait="    %r = plait.wait %h : !plait.async<!plait.tensor<[1024, 1024], f32>> -> !plait.tensor<[1024, 1024], f32>\n"
        if async_
        else "",
    )
    if not async_:
        body = body.replace("%h = plait.all_reduce", "%r = plait.all_reduce")
    module, _ = _ops(body, "%x : !plait.tensor<[1024, 1024], f32>", symbols="", mesh="tp = 2")
    return estimate(module, Target(hardware or load("a100-80gb"))).schedule


def test_async_collectives_overlap_the_compute_before_their_wait():
    blocking, overlapped = _schedule(False), _schedule(True)
    assert blocking.compute_busy == pytest.approx(overlapped.compute_busy)
    assert blocking.step_time == pytest.approx(blocking.compute_busy + blocking.comm_busy)
    # the second linear runs while the all-reduce is in flight
    assert overlapped.step_time < blocking.step_time
    assert overlapped.exposed_comm == pytest.approx(
        blocking.exposed_comm - min(blocking.comm_busy, blocking.compute_busy / 3), rel=0.05
    )


@pytest.mark.parametrize("share", [0.0, 0.4, 1.0])
def test_a_collective_that_contends_takes_its_share_of_the_compute_it_overlaps(share):
    """A link whose collectives run on the compute's cores (gloo on a CPU):
    the linear in flight with the all-reduce is longer by `share` of their
    overlap; at 1, overlapping gains nothing over the blocking all-reduce."""
    a100 = load("a100-80gb")
    links = tuple(replace(link, contention=share) for link in a100.links)
    blocking, overlapped = _schedule(False), _schedule(True, replace(a100, links=links))
    linear = [e.duration for e in blocking.events if e.lane == "compute"][1]
    reduce = next(e for e in overlapped.events if e.lane == "comm")
    second = [e for e in overlapped.events if e.lane == "compute"][1]
    assert second.start == pytest.approx(reduce.start)
    assert second.duration == pytest.approx(linear + share * min(linear, reduce.duration))
    if share == 1.0:
        assert overlapped.step_time == pytest.approx(blocking.step_time)
    else:
        assert overlapped.step_time < blocking.step_time


SKEW_IR = """\
    %w = plait.param "w" : !plait.tensor<[1024, 1024], f32>
    %y = plait.linear "aten::linear"(%x, %w) : !plait.tensor<[1024, 1024], f32>
    %a = plait.all_reduce %y {axis = "tp", reduce = "sum"} : !plait.tensor<[1024, 1024], f32> -> !plait.tensor<[1024, 1024], f32>
    %b = plait.all_reduce %a {axis = "tp", reduce = "sum"} : !plait.tensor<[1024, 1024], f32> -> !plait.tensor<[1024, 1024], f32>
"""


@pytest.mark.parametrize("skew", [0.0, 0.05])
def test_a_collective_waits_for_ranks_by_the_compute_since_the_last_one(skew):
    """Ranks drift apart while they compute: a collective after a linear
    waits `skew` of the linear's time more; the one right after it, nothing."""
    a100 = load("a100-80gb")
    skewed = replace(a100, links=tuple(replace(k, skew=skew) for k in a100.links))
    module, _ = _ops(SKEW_IR, "%x : !plait.tensor<[1024, 1024], f32>", symbols="", mesh="tp = 2")
    plain, schedule = (estimate(module, Target(h)).schedule for h in (a100, skewed))
    (linear,) = [e.duration for e in schedule.events if e.lane == "compute"]
    first, second = ([e.duration for e in s.events if e.lane == "comm"] for s in (plain, schedule))
    assert second[0] == pytest.approx(first[0] + skew * linear)
    assert second[1] == pytest.approx(first[1])
    assert schedule.step_time == pytest.approx(plain.step_time + skew * linear)


def test_link_figures_out_of_their_range_are_refused(tmp_path):
    cpu = (Path(hardware.__file__).parent / "cpu.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(cpu.replace("contention = ", "contention = 1", 1))
    with pytest.raises(HardwareError, match=r"contention: 1[\d.]+ is not a share between 0 and 1"):
        load(bad)
    bad.write_text(cpu.replace("skew = ", "skew = -", 1))
    with pytest.raises(HardwareError, match=r"skew: -[\d.]+ is not a share between 0 and 1"):
        load(bad)
    bad.write_text(cpu.replace("scatter_as_all_reduce = true", "scatter_as_all_reduce = 1", 1))
    with pytest.raises(HardwareError, match="scatter_as_all_reduce: 1 is not true or false"):
        load(bad)


def test_calibrated_collective_times_are_what_many_calls_cost_on_average():
    """gloo's all-reduce times on a shared VM are bimodal (a peer thread
    awake or not): calibrate prices the mean a step pays, not whichever mode
    the median lands in, and leaves out a rare stall at either end."""
    from plait.runtime.calibrate import _trimmed_mean

    fast, slow, stall = 0.8e-3, 3.4e-3, 50e-3
    samples = [fast] * 9 + [slow] * 10 + [stall]
    assert statistics.median(samples) == slow
    assert _trimmed_mean(samples) == pytest.approx((7 * fast + 9 * slow) / 16)


def test_ranks_on_one_cpu_host_share_its_threads():
    """cpu.toml measured its rates with 2 threads: each of 2 ranks gets one,
    and half the rates; 4 ranks still get one thread each. A GPU is one device per rank."""
    cpu, a100 = load("cpu"), load("a100-80gb")
    assert cpu.threads == 2 and cpu.shared_by(1) is cpu and a100.shared_by(8) is a100
    for ranks in (2, 4):
        rank = cpu.shared_by(ranks)
        assert rank.threads == 1 and rank.peak_flops("f32") == cpu.peak_flops("f32") / 2
        assert rank.peak_flops("f32", "attention") == cpu.peak_flops("f32", "attention") / 2
        assert rank.memory_bandwidth == cpu.memory_bandwidth / 2
    body = '    %y = plait.linear "aten::linear"(%x, %w) : !plait.tensor<[1024, 1024], f32>\n'
    weight = '    %w = plait.param "w" : !plait.tensor<[1024, 1024], f32>\n'
    arg = "%x : !plait.tensor<[1024, 1024], f32>"
    alone, _ = _ops(weight + body, arg, symbols="", mesh="")
    shared, _ = _ops(weight + body, arg, symbols="", mesh="tp = 2")
    one, two = (estimate(m, Target(cpu)).schedule.compute_busy for m in (alone, shared))
    fixed = cpu.op_overhead + cpu.sequence_overhead  # (a CPU's per-op cost is not shared)
    assert two - fixed == pytest.approx(2 * (one - fixed))


def test_peak_memory_counts_live_activations_and_weights():
    module, _ = _ops(
        '    %w = plait.param "w" : !plait.tensor<[256, 64], f32>\n'
        '    %a = plait.linear "aten::linear"(%x, %w) : !plait.tensor<[b, 256], f32>\n'
        '    %v = plait.reshape "aten::view"(%a, [sym(b), 16, 16]) : !plait.tensor<[b, 16, 16], f32>\n'
        '    %e = plait.elementwise "aten::exp"(%v) : !plait.tensor<[b, 16, 16], f32>\n',
        "%x : !plait.tensor<[b, 64], f32>",
    )
    result = estimate(module, Target(load("h100-sxm"), values={"b": 10, "s": 1}))
    assert result.schedule.weight_bytes == 256 * 64 * 4
    # x, a (viewed as v) and e are alive together at the exp: 64 + 256 + 256 floats per row
    assert result.schedule.activation_peak == 10 * (64 + 256 + 256) * 4
    assert sympy.simplify(result.formulas["activation_peak"] - 4 * (64 + 256 + 256) * B) == 0


def test_estimate_proves_the_peak_fits_over_the_compiled_range_or_names_where_not():
    import dataclasses

    from plait.cost.estimate import memory_over_range
    from plait.cost.estimate_report import summary

    module, _ = _ops(
        '    %w = plait.param "w" : !plait.tensor<[256, 64], f32>\n'
        '    %a = plait.linear "aten::linear"(%x, %w) : !plait.tensor<[b, 256], f32>\n',
        "%x : !plait.tensor<[b, 64], f32>",
        symbols="b = [1, 64]",
    )
    h100 = load("h100-sxm")
    result = estimate(module, Target(h100, values={"b": 1}))
    # weights plus x and a alive together: 65536 + 1280 b bytes, 147456 at b = 64
    assert sympy.simplify(result.formulas["peak_memory"] - (256 * 64 * 4 + 4 * 320 * B)) == 0
    assert memory_over_range(module, result).proved
    assert "fits 80.00 GB for every b in [1, 64] (proved by z3)" in dict(summary(result)).values()
    small = dataclasses.replace(h100, memory_capacity=140000)
    result = estimate(module, Target(small, values={"b": 1}))
    where = memory_over_range(module, result).counterexample["b"]
    assert 65536 + 1280 * where > 140000 and where <= 64  # b >= 58 needs more
    row = dict(summary(result))["memory over the range"]
    assert row.startswith("needs ") and f"b={where}" in row


def test_z3_proves_bounds_for_the_whole_range_or_finds_a_counterexample():
    memory = 4 * B * S * S + 1000 * B * S
    assert prove_at_most(memory, 2e9, {"b": (1, 8), "s": (1, 8192)}).proved is False
    result = prove_at_most(memory, 2e9, {"b": (1, 8), "s": (1, 8192)})
    b, s = result.counterexample["b"], result.counterexample["s"]
    assert 4 * b * s * s + 1000 * b * s > 2e9
    assert prove_at_most(memory, 2e9, {"b": (1, 8), "s": (1, 2048)}).proved


def test_formulas_evaluate_to_the_simulated_numbers(compiled):
    result = compiled("llama-tiny").estimate("h100-sxm", values={"batch": 4, "seq": 100})
    flops = result.formulas["flops"].subs(
        {symbolic.symbol("batch"): 4, symbolic.symbol("seq"): 100}
    )
    assert float(flops) == pytest.approx(result.total_flops)
    assert result.schedule.step_time == pytest.approx(result.schedule.compute_busy)
    assert 0 < result.mfu < 1


def test_cli_estimate_compare_and_trace(tmp_path, capsys):
    from plait.cli import main

    trace = tmp_path / "sim.json"
    assert (
        main(
            [
                "estimate",
                "--example",
                "llama-tiny",
                "--batch",
                "2",
                "--seq",
                "64",
                "--hardware",
                "a100-80gb",
                "--trace",
                str(trace),
                "--group",
                "module",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "model.layers.*.mlp.down_proj" in out and "step time:" in out and "flops = " in out
    assert max(len(line) for line in out.splitlines()) < 500  # long formulas are cut
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("ph") == "X" and e["tid"] == 0 for e in events)
    assert (
        main(["estimate", "--example", "llama-tiny", "--compare", "canonicalize", "--pipeline", ""])
        == 0
    )
    assert "speedup of the second:" in capsys.readouterr().out
    assert main(["estimate", "--example", "llama-tiny", "--hardware", "tpu-v9"]) == 1
    assert "known: a100-80gb" in capsys.readouterr().err


def test_measured_trace_and_per_op_profile(compiled, example, tmp_path):
    from plait.runtime.profile import measured_events, profile_ops, write_trace

    _, inputs, _ = example("cnn-tiny")
    program = compiled("cnn-tiny").program
    times = profile_ops(program, list(inputs), repeats=3)
    # arguments reach the op as the generated program passes them: plain lists
    from plait.runtime.profile import _plain
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    plain = _plain((immutable_list([1, immutable_list([2])]), immutable_dict(a=immutable_list())))
    assert type(plain[0]) is list and type(plain[0][1]) is list and type(plain[1]["a"]) is list
    convs = [op for op in times if getattr(op, "target_name", "") == "aten::conv2d"]
    assert len(convs) == 2 and all(times[op] > 0 for op in convs)
    write_trace(tmp_path / "m.json", measured_events(program, list(inputs)))
    events = [
        e for e in json.loads((tmp_path / "m.json").read_text())["traceEvents"] if e["ph"] == "X"
    ]
    assert len(events) >= 10 and all(e["dur"] >= 0 for e in events)
