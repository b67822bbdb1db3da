"""Passes: each on an IR-text case, an edge case, and numerically against
eager; the pipeline parser and the pass manager's instrumentation."""

from __future__ import annotations

import io

import plait
import pytest
import torch
from helpers import max_rel_diff
from plait.backends.fx import build_program
from plait.ir.text import parse_module, print_module
from plait.passes import registry
from plait.passes.manager import PassManager
from plait.passes.pipeline import PipelineError, parse_pipeline, pipeline_text

HEADER = "builtin.module attributes {plait.symbols = #plait.symbols<n = [1, 64]>} {\n"


def _run(
    pipeline: str,
    body: str,
    inputs: str = "%x : !plait.tensor<[n, 4], f32>",
    result: str = "!plait.tensor<[n, 4], f32>",
) -> str:
    text = HEADER + f"  func.func @forward({inputs}) -> {result} {{\n{body}  }}\n}}\n"
    module = parse_module(text)
    PassManager.parse(pipeline).run(module)
    return print_module(module)


def _count(text: str, needle: str) -> int:
    return text.count(needle)


# ---- canonicalize -------------------------------------------------------------

CANONICAL_NOISE = """\
    plait.call "aten::_assert_tensor_metadata"(%x, dtype = dtype(f32)) : ()
    %a = plait.reshape "aten::alias"(%x) : !plait.tensor<[n, 4], f32>
    %d = plait.elementwise "aten::dropout"(%a, 0.1, false) : !plait.tensor<[n, 4], f32>
    %c = plait.elementwise "aten::to.dtype"(%d, dtype(f32)) : !plait.tensor<[n, 4], f32>
    %v = plait.reshape "aten::view"(%c, [sym(n), 4]) : !plait.tensor<[n, 4], f32>
    %s = plait.reshape "aten::slice.Tensor"(%v, 1, 0, 9223372036854775807) : !plait.tensor<[n, 4], f32>
    %z = plait.elementwise "aten::sub.Tensor"(%s, 0) : !plait.tensor<[n, 4], f32>
    %o = plait.elementwise "aten::mul.Tensor"(%z, 1) : !plait.tensor<[n, 4], f32>
    %r = plait.elementwise "aten::relu"(%o) : !plait.tensor<[n, 4], f32>
    func.return %r : !plait.tensor<[n, 4], f32>
"""


def test_canonicalize_drops_export_noise():
    out = _run("canonicalize", CANONICAL_NOISE)
    assert _count(out, "plait.") - _count(out, "plait.symbols") - _count(out, "plait.tensor") == 1
    assert 'plait.elementwise "aten::relu"(%x)' in out


def test_canonicalize_keeps_ops_that_change_something():
    body = """\
    %d = plait.elementwise "aten::dropout"(%x, 0.1, true) : !plait.tensor<[n, 4], f32>
    %c = plait.elementwise "aten::to.dtype"(%d, dtype(bf16)) : !plait.tensor<[n, 4], bf16>
    %k = plait.elementwise "aten::to.dtype"(%c, dtype(bf16), false, true) : !plait.tensor<[n, 4], bf16>
    %s = plait.reshape "aten::slice.Tensor"(%k, 1, 1, 3) : !plait.tensor<[n, 2], bf16>
    %f = plait.elementwise "aten::add.Tensor"(%s, 0.0) : !plait.tensor<[n, 2], bf16>
    %p = plait.elementwise "aten::mul.Tensor"(%f, 2) : !plait.tensor<[n, 2], bf16>
    func.return %p : !plait.tensor<[n, 2], bf16>
"""
    out = _run("canonicalize", body, result="!plait.tensor<[n, 2], bf16>")
    for target in ['"aten::dropout"', '"aten::slice.Tensor"', '"aten::mul.Tensor"']:
        assert target in out, target  # training dropout, a real slice, x * 2
    assert _count(out, '"aten::to.dtype"') == 2  # a real cast, and a copy (copy=true)
    assert '"aten::add.Tensor"' in out  # float x + 0.0 turns -0.0 into 0.0: kept


def test_copies_that_reach_the_result_are_kept():
    body = """\
    %w = plait.param "w" : !plait.tensor<[n, 4], f32>
    %c = plait.reshape "aten::clone"(%x) : !plait.tensor<[n, 4], f32>
    %m = plait.elementwise "aten::mul.Tensor"(%w, 1) : !plait.tensor<[n, 4], f32>
    %v = plait.reshape "aten::view"(%m, [sym(n), 4]) : !plait.tensor<[n, 4], f32>
    %i = plait.elementwise "aten::add.Tensor"(%c, 0) : !plait.tensor<[n, 4], f32>
    func.return %c, %v : !plait.tensor<[n, 4], f32>, !plait.tensor<[n, 4], f32>
"""
    out = _run(
        "canonicalize", body, result="(!plait.tensor<[n, 4], f32>, !plait.tensor<[n, 4], f32>)"
    )
    # returning x or the weight itself would let the caller write into them
    assert '"aten::clone"(%x)' in out and '"aten::mul.Tensor"(%w, 1)' in out
    assert '"aten::view"' not in out  # a same-shape view folds: it aliases in eager too


def test_integer_plus_float_zero_promotes_and_is_kept():
    body = """\
    %f = plait.elementwise "aten::add.Tensor"(%x, 0.0) : !plait.tensor<[n, 4], f32>
    func.return %f : !plait.tensor<[n, 4], f32>
"""
    out = _run("canonicalize", body, inputs="%x : !plait.tensor<[n, 4], i64>")
    assert '"aten::add.Tensor"' in out


# ---- cse and dce ------------------------------------------------------------------


def test_cse_merges_identical_pure_ops_but_not_random_ones():
    body = """\
    %w = plait.param "w" : !plait.tensor<[4], f32>
    %w2 = plait.param "w" : !plait.tensor<[4], f32>
    %a = plait.elementwise "aten::mul.Tensor"(%x, %w) : !plait.tensor<[n, 4], f32>
    %b = plait.elementwise "aten::mul.Tensor"(%x, %w2) : !plait.tensor<[n, 4], f32>
    %i = plait.elementwise "aten::add.Tensor"(%a, 1) : !plait.tensor<[n, 4], f32>
    %f = plait.elementwise "aten::add.Tensor"(%a, 1.0) : !plait.tensor<[n, 4], f32>
    %r1 = plait.call "aten::rand_like"(%x) : !plait.tensor<[n, 4], f32>
    %r2 = plait.call "aten::rand_like"(%x) : !plait.tensor<[n, 4], f32>
    %u1 = plait.call "aten::uniform"(%x) : !plait.tensor<[n, 4], f32>
    %u2 = plait.call "aten::uniform"(%x) : !plait.tensor<[n, 4], f32>
    %p = plait.elementwise "aten::mul.Tensor"(%x, 0.0) : !plait.tensor<[n, 4], f32>
    %q = plait.elementwise "aten::mul.Tensor"(%x, -0.0) : !plait.tensor<[n, 4], f32>
    %s = plait.call "aten::stack"([%b, %i, %f, %r1, %r2, %u1, %u2, %p, %q]) : !plait.tensor<[9, n, 4], f32>
    func.return %s : !plait.tensor<[9, n, 4], f32>
"""
    out = _run("cse", body, result="!plait.tensor<[9, n, 4], f32>")
    assert _count(out, "plait.param") == 1
    assert _count(out, '"aten::mul.Tensor"(%x, %w)') == 1
    assert _count(out, '"aten::add.Tensor"') == 2  # 1 and 1.0 differ
    assert _count(out, '"aten::rand_like"') == 2 and _count(out, '"aten::uniform"') == 2
    assert "(%x, 0.0)" in out and "(%x, -0.0)" in out  # 1/(x*0.0) and 1/(x*-0.0) differ


def test_dce_erases_unused_pure_ops_and_params_only():
    body = """\
    %w = plait.param "unused.weight" : !plait.tensor<[4], f32>
    %u = plait.elementwise "aten::exp"(%x) : !plait.tensor<[n, 4], f32>
    %r = plait.call "aten::rand_like"(%x) : !plait.tensor<[n, 4], f32>
    %c = plait.call "mylib::log_stats"(%x) : !plait.tensor<[n, 4], f32>
    plait.call "aten::_assert_async.msg"(%x, "check") : ()
    func.return %x : !plait.tensor<[n, 4], f32>
"""
    out = _run("dce", body)
    assert "unused.weight" not in out and '"aten::exp"' not in out
    assert '"aten::rand_like"' in out and '"aten::_assert_async.msg"' in out
    assert '"mylib::log_stats"' in out  # other libraries' ops may have effects: kept


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mixtral-tiny", "cnn-tiny"])
def test_each_pass_alone_keeps_the_model_exact(name, example):
    model, inputs, shapes = example(name)
    with torch.no_grad():
        ref = model(*inputs)
    base = plait.compile(model, inputs, dynamic_shapes=shapes, pipeline="")
    for pipeline in ["canonicalize", "cse", "dce", "canonicalize,cse,dce,canonicalize"]:
        module = parse_module(base.ir)
        PassManager.parse(pipeline).run(module)
        program = build_program(module, base.weights)
        assert max_rel_diff(program(*inputs)[0], ref) <= 1e-6, pipeline


def test_default_pipeline_shrinks_llama(compiled):
    report = compiled("llama-tiny").pass_report
    rows = {line.split()[0]: line.split() for line in report.splitlines()[1:-1]}
    assert int(rows["canonicalize"][3]) < int(rows["canonicalize"][2])
    assert int(rows["cse"][3]) < int(rows["cse"][2])


# ---- pipelines and the pass manager -------------------------------------------------


def test_registry_lists_passes_by_kebab_case_name():
    assert {"canonicalize", "cse", "dce"} <= set(registry.names())
    for name in registry.names():
        assert registry.get(name).name == name


def test_pipeline_text_roundtrips():
    passes = parse_pipeline("canonicalize, cse ,dce")
    assert [p.name for p in passes] == ["canonicalize", "cse", "dce"]
    assert pipeline_text(passes) == "canonicalize,cse,dce"


@pytest.mark.parametrize(
    "text,message,column",
    [
        ("canonicalize,bogus", "unknown pass 'bogus'", 13),
        ("cse{unknown=1}", "pass 'cse' has no option 'unknown'", 4),
        ("canonicalize,,dce", "empty pass name", 13),
        ("cse{", "unclosed '{'", 4),
        ("cse}", "unbalanced '}'", 3),
    ],
)
def test_pipeline_errors_point_at_the_column(text, message, column):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert message in str(info.value)
    assert info.value.column == column


def test_pass_manager_prints_dumps_and_times(tmp_path):
    text = (
        HEADER
        + "  func.func @forward(%x : !plait.tensor<[n, 4], f32>) -> !plait.tensor<[n, 4], f32> {\n"
        + CANONICAL_NOISE
        + "  }\n}\n"
    )
    stream = io.StringIO()
    manager = PassManager.parse(
        "canonicalize,cse,dce",
        print_ir_before={"cse"},
        print_ir_after={"dce"},
        dump_ir=tmp_path,
        stream=stream,
    )
    manager.run(parse_module(text))
    printed = stream.getvalue()
    assert printed.count("// -----// IR Dump") == 2
    assert "IR Dump Before cse" in printed and "IR Dump After dce" in printed
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-input.mlir", "01-canonicalize.mlir", "02-cse.mlir", "03-dce.mlir"]
    for f in tmp_path.iterdir():  # every dump parses back
        parse_module(f.read_text(), str(f))
    report = manager.report().splitlines()
    assert report[0].split() == ["pass", "seconds", "ops", "before", "ops", "after"]
    assert [r.split()[0] for r in report[1:]] == ["canonicalize", "cse", "dce", "total"]


def test_print_ir_after_all_and_disabled_passes():
    stream = io.StringIO()
    text = (
        HEADER
        + "  func.func @forward(%x : !plait.tensor<[n, 4], f32>) -> !plait.tensor<[n, 4], f32> {\n"
        + CANONICAL_NOISE
        + "  }\n}\n"
    )
    manager = PassManager.parse(
        "canonicalize,cse,dce", print_ir_after_all=True, disabled={"cse"}, stream=stream
    )
    manager.run(parse_module(text))
    assert stream.getvalue().count("IR Dump After") == 2
    assert [r.name for r in manager.records] == ["canonicalize", "dce"]
