"""Pass options are typed and checked when the pipeline is parsed, before the
model is captured; options that would do nothing are errors; a pass that
needs another before it gets it."""

from __future__ import annotations

import plait
import pytest
import torch
from plait.passes import registry
from plait.passes.pipeline import PipelineError, parse_pipeline, pipeline_text


class NeverCaptured(torch.nn.Module):
    """Capturing it fails: an error about options must come first."""

    def forward(self, x):
        raise AssertionError("the model was captured before the options were checked")


# (pipeline, the text the caret points at, words of the message); one or more per pass
BAD_OPTIONS = [
    ("canonicalize{fold=1}", "fold=1", "has no option 'fold'"),
    ("cse{x=1}", "x=1", "has no option"),
    ("dce{x=1}", "x=1", "has no option"),
    ("overlap{x=1}", "x=1", "has no option"),
    ("offload{x=1}", "x=1", "has no option"),
    ("ladder{layers=-1}", "layers=-1", "layers counts"),
    ("ladder{layers=two}", "layers=two", "expects int"),
    ("memplan{values=seq}", "values=seq", "'seq' is not NAME:INT"),
    ("tier{budget=0}", "budget=0", "budget is a share"),
    ("tier{hardware=h900}", "hardware=h900", "unknown hardware 'h900'"),
    ("fuse{mode=fast}", "mode=fast", "one of default, reduce-overhead, max-autotune"),
    ("fuse{scope=layers}", "scope=layers", "one of blocks, whole"),
    ("remat{budget=0}", "budget=0", "budget is a share"),
    ("remat{budget=-1e6}", "budget=-1e6", "budget is a share"),
    ("remat{hardware=h900}", "hardware=h900", "unknown hardware 'h900'"),
    ("remat{timeout=0}", "timeout=0", "timeout is seconds"),
    ("quantize{bits=3}", "bits=3", "bits must be 4 or 8"),
    ("quantize{method=gptq}", "method=gptq", "one of easyquant, rtn"),
    ("quantize{size-budget=0}", "size-budget=0", "in (0, 1]"),
    ("quantize{layers=}", "layers=", "at least one module-path pattern"),
    ("sparsify{group=7}", "group=7", "group must be 8, 16, 32 or 64"),
    ("sparsify{importance=random}", "importance=random", "one of magnitude, activation"),
    ("shard{mesh=}", "mesh=", "at least one axis"),
    ("shard{mesh=tp:0}", "mesh=tp:0", "SIZE >= 1"),
    ("shard{mesh=tp:2,tp:4}", "mesh=tp:2,tp:4", "appears twice"),
    ("shard{mesh=dp:2,ep:2}", "mesh=dp:2,ep:2", "at most one tensor-parallel axis"),
    ("shard{solve=ilpp}", "solve=ilpp", "one of rules, ilp"),
    ("shard{plan=lm_head:sideways}", "plan=lm_head:sideways", "STYLE one of"),
    ("shard{plan=}", "plan=", "at least one MODULE-GLOB:STYLE"),
    ("shard{mesh=tp:2,hardware=h100-sxm}", "hardware=h100-sxm", "used only by solve=ilp"),
    ("shard{values=seq:8}", "values=seq:8", "used only by solve=ilp"),
    ("shard{solve=ilp,memory=0}", "memory=0", "memory is bytes per device"),
    ("shard{solve=ilp,hardware=h900}", "hardware=h900", "unknown hardware"),
    ("zero{stage=4}", "stage=4", "stage is one of 1 (optimizer state)"),
    ("zero{bucket-mb=0}", "bucket-mb=0", "bucket_mb is MiB per parameter bucket"),
    ("pipeline{stages=1}", "stages=1", "stages is the number of pipeline stages, >= 2"),
    ("pipeline{microbatches=0}", "microbatches=0", "microbatches must be >= 1"),
    ("pipeline{schedule=zb}", "schedule=zb", "not one of gpipe, 1f1b"),
    ("pipeline{hardware=h900}", "hardware=h900", "unknown hardware 'h900'"),
    ("pipeline{schedule=interleaved}", "schedule=interleaved", "runs virtual >= 2 stages"),
    ("pipeline{virtual=2}", "virtual=2", "gpipe and 1f1b one (virtual=1)"),
    ("parallelize{devices=0}", "devices=0", "devices must be >= 1"),
    ("parallelize{microbatches=0}", "microbatches=0", "microbatches must be >= 1"),
    ("parallelize{schedule=zb}", "schedule=zb", "not one of auto, gpipe, 1f1b, interleaved"),
    ("parallelize{hardware=h900}", "hardware=h900", "unknown hardware 'h900'"),
    ("canonicalize,shard{mesh=tp:2},nosuchpass", "nosuchpass", "unknown pass"),
]


@pytest.mark.parametrize("pipeline,at,words", BAD_OPTIONS, ids=[b[0] for b in BAD_OPTIONS])
def test_a_bad_option_is_reported_at_its_column_before_capture(pipeline, at, words):
    with pytest.raises(PipelineError) as info:
        plait.compile(NeverCaptured(), (torch.ones(2),), pipeline=pipeline)
    assert words in str(info.value)
    assert info.value.column == pipeline.index(at)
    caret_line = str(info.value).splitlines()[-1]
    assert caret_line.index("^") - 2 == pipeline.index(at)  # the caret under the option


def test_every_registered_pass_has_a_bad_option_case():
    covered = {b[0].split("{")[0].split(",")[-1] for b in BAD_OPTIONS}
    assert set(registry.names()) <= covered


@pytest.mark.parametrize(
    "pipeline",
    [
        "shard{mesh=dp:2,tp:2,plan=*.mlp.*:replicate,lm_head:colwise}",
        "shard{mesh=tp:8,solve=ilp,hardware=cpu,values=batch:1,seq:2048,memory=1e9}",
        "quantize{method=rtn,bits=4,group=32,layers=model.layers.*,size-budget=0.3}",
        "memplan{values=batch:8,seq:128},tier{budget=0.5,hardware=cpu}",
        "remat{budget=2e6,hardware=h100-sxm,values=batch:1,seq:128,timeout=5}",
        "overlap,fuse{mode=reduce-overhead}",
        "sparsify{group=16,sparsity=0.25,layers=*.mlp.*},ladder{layers=2}",
    ],
)
def test_typed_options_print_back_as_they_parse(pipeline):
    passes = parse_pipeline(pipeline)
    assert parse_pipeline(pipeline_text(passes)) == passes


def test_options_that_select_nothing_are_errors(compiled):
    llama = compiled("llama-tiny")  # canonical IR with dynamic batch and seq
    cases = [
        ("quantize{layers=model.layer.*}", "'model.layer.*' matches no linear layer"),
        ("sparsify{layers=*.mlp.up,*.mlp.down_proj}", "'*.mlp.up' matches no linear layer"),
        ("shard{plan=*.ffn.*:replicate}", "'*.ffn.*' matches no linear or embedding layer"),
        ("memplan{values=tokens:8}", "size symbol 'tokens', which the program does not have"),
        ("memplan{values=seq:100000}", "outside the range the program was compiled for"),
        # the message lists the layers there are, so the user can fix the pattern
        ("quantize{layers=nothing}", "layers here are: lm_head, model.layers.0.mlp.down_proj"),
    ]
    for pipeline, words in cases:
        with pytest.raises(plait.PlaitError, match=words.replace("*", r"\*")):
            plait.compile_ir(llama.module.clone(), llama.weights, pipeline=pipeline)


def test_a_pass_gets_the_passes_it_needs_before_it(example):
    model, inputs, shapes = example("llama-tiny")
    asked = plait.compile(model, inputs, dynamic_shapes=shapes, pipeline="ladder")
    spelled = plait.compile(
        model, inputs, dynamic_shapes=shapes, pipeline="canonicalize,cse,dce,ladder"
    )
    assert asked.ir == spelled.ir
    assert "(added: ladder needs it)" in asked.pass_report
    assert "added" not in spelled.pass_report
    torch.testing.assert_close(asked(*inputs), spelled(*inputs), rtol=0, atol=0)
