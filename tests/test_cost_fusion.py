"""The cost model of a fused program (`fuse`: Inductor): chains of
element-wise ops, norms, reductions and views priced as one kernel each."""

from __future__ import annotations

import pytest
import sympy
from plait.cost.estimate import Target, estimate
from plait.cost.fusion import fusion_groups
from plait.hardware import load
from plait.ir.text import parse_module
from plait.passes.fuse import Fuse

T = "!plait.tensor<[64, 256], f32>"
CHAINS = f"""\
    %w = plait.param "w" : !plait.tensor<[256, 256], f32>
    %a = plait.elementwise "aten::mul.Tensor"(%x, %x) : {T}
    %b = plait.elementwise "aten::add.Tensor"(%a, %x) : {T}
    %y = plait.linear "aten::linear"(%b, %w) : {T}
    %c = plait.elementwise "aten::silu"(%y) : {T}
    %d = plait.elementwise "aten::mul.Tensor"(%c, %y) : {T}
"""
BYTES = 64 * 256 * 4


def _module(body: str, fused: bool):
    text = (
        f"builtin.module {{\n  func.func @forward(%x : {T}) {{\n{body}    func.return\n  }}\n}}\n"
    )
    module = parse_module(text)
    if fused:
        Fuse().apply(None, module)
    return module, {o.results[0].name_hint: o for o in module.ops.first.body.walk() if o.results}


def test_chains_of_small_ops_fuse_up_to_the_kernels_that_end_them():
    module, ops = _module(CHAINS, fused=True)
    groups = fusion_groups(module.ops.first.body.blocks.first)
    assert groups[ops["a"]] is ops["b"] and groups[ops["b"]] is ops["b"]
    assert groups[ops["c"]] is ops["d"] and groups[ops["d"]] is ops["d"]
    assert ops["y"] not in groups and ops["w"] not in groups
    # a value a linear reads too must be written out: its op ends a group
    branching, ops = _module(CHAINS.replace('linear"(%b, %w)', 'linear"(%a, %w)'), True)
    assert fusion_groups(branching.ops.first.body.blocks.first)[ops["a"]] is ops["a"]


def test_a_fused_group_is_one_kernel_reading_its_inputs_once():
    hw = load("a100-80gb")
    plain, fused = (estimate(_module(CHAINS, f)[0], Target(hw)) for f in (False, True))
    rows = {r.op.results[0].name_hint: r for r in fused.ops if r.op.results}
    before = {r.op.results[0].name_hint: r for r in plain.ops if r.op.results}
    assert rows["a"].time == 0 and rows["c"].time == 0
    assert rows["y"].time == before["y"].time  # the linear is its own kernel still
    # x once (it is read twice by a and once by b) and b's result: not a's
    assert rows["b"].bytes == 2 * BYTES
    compute = sum(before[n].flops for n in "ab") / hw.peak_flops("f32")
    assert rows["b"].time == pytest.approx(float(hw.kernel_time(compute, 2 * BYTES)))
    assert rows["d"].bytes == 2 * BYTES  # y once, d's result
    assert rows["b"].time < before["a"].time + before["b"].time
    assert fused.schedule.step_time < plain.schedule.step_time
    # a and c stay in registers: less memory at the peak, never more
    assert fused.schedule.activation_peak <= plain.schedule.activation_peak
    assert sympy.sympify(fused.formulas["bytes"]) < sympy.sympify(plain.formulas["bytes"])


def test_a_group_ending_in_a_view_writes_the_memory_it_views():
    """mul then a view of it: one kernel, and the mul's result is what it
    writes (the view owns no memory), so the peak still holds those bytes."""
    body = (
        f'    %a = plait.elementwise "aten::mul.Tensor"(%x, %x) : {T}\n'
        '    %v = plait.reshape "aten::view"(%a, [16384]) : !plait.tensor<[16384], f32>\n'
    )
    module, ops = _module(body, fused=True)
    assert fusion_groups(module.ops.first.body.blocks.first)[ops["a"]] is ops["v"]
    schedule = estimate(module, Target(load("a100-80gb"))).schedule
    assert schedule.activation_peak >= 2 * BYTES  # x, and a (seen through v)
    assert [e.op for e in schedule.events if e.lane == "compute"] == [ops["v"]]


def test_fused_blocks_are_priced_as_the_backend_compiles_them():
    """With `fuse{scope=blocks}` the backend compiles each block apart: its
    cuts are the IR's `block_cuts`, no fusion group spans one, what runs
    before the blocks is priced unfused, and the forward costs no less than
    fused whole."""
    import plait
    from plait.ir.residual import block_cuts
    from test_training import _hf_model, _lm_batches

    model = _hf_model("llama", num_hidden_layers=3)
    ids = _lm_batches(1)[0][0]
    blocks = plait.compile(model, (ids,), pipeline="canonicalize,cse,dce,fuse{scope=blocks}")
    whole = plait.compile(model, (ids,), pipeline="canonicalize,cse,dce,fuse")
    program = blocks.program.compiled
    calls = [n for n in program.graph.nodes if n.op == "call_module"]
    block = blocks.function.body.blocks.first
    cut = block_cuts(block)
    ends = cut.ends  # the ends of the blocks
    assert len(ends) == 3 and len(calls) == len(ends) + 1  # a block per layer, then the head
    ops = list(block.ops)
    graph = {op: sum(ops.index(e) < i for e in ends) for i, op in enumerate(ops)}
    groups = fusion_groups(block, ends)
    assert any(end is not op for op, end in groups.items())  # it still fuses inside blocks
    assert all(graph[op] == graph[end] for op, end in groups.items())
    crossing = fusion_groups(block)  # whole: some group spans a layer's end
    assert any(graph[op] != graph[end] for op, end in crossing.items())
    target = Target(load("cpu"))
    reports = {m: estimate(m.module, target) for m in (blocks, whole)}
    assert reports[blocks].schedule.step_time > reports[whole].schedule.step_time
    # what does not depend on the stream (rotary tables, masks) runs before
    # the blocks, unfused: inside a fused group whole (no time of its own),
    # priced alone in blocks
    times = {}
    for m, report in reports.items():
        row = {r.op: r.time for r in report.ops}
        times[m] = [row.get(op) for op in m.function.body.blocks.first.ops]
    before = [
        i for i, op in enumerate(ops) if op in cut.off_stream and crossing.get(op, op) is not op
    ]
    assert before and all(times[whole][i] == 0 < times[blocks][i] for i in before), before
