"""Validation: the predicted share of a decode step spent in all-reduce, and
the predicted ladder speedup, for Llama-3-70B shapes at TP=8, against the
Ladder Residual paper.

    python benchmarks/allreduce_share_70b.py

Captures Llama-3-70B (bf16, on meta: no weights allocated) at batch 1, one new
token, shards it with the Megatron rules over 8 ranks, and estimates a decode
step reading a 1280-position KV cache (the paper's runs: 1024-token prompts,
512 new tokens) on H100 SXM (NVLink) and on H100 over PCIe (no NVLink). All
hardware figures are public (see hardware/*.toml); nothing is fitted to the
paper's numbers.

Targets: the paper (arXiv 2501.06589) reports all-reduce at 38% of the time
for 70B at TP=8, over 50% without NVLink, and ladder speedups of about 1.31x
with NVLink and 1.59x without; the authors' own plotted data
(github.com/mayank31398/ladder-residual-inference, tools/plot-70b.py, batch 1)
gives 30% / 53% and 1.31x / 1.60x.
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    from plait.frontend import hf
    from plait.frontend.capture import capture
    from plait.frontend.importer import import_program
    from plait.hardware import load
    from plait.passes.estimate import Target, estimate
    from plait.passes.manager import PassManager
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    start = time.perf_counter()
    module, weights = import_program(capture(hf.wrap(model), hf.example_inputs(model, 1, 1)))
    captured = time.perf_counter() - start
    start = time.perf_counter()
    PassManager.parse("canonicalize,cse,dce,shard{mesh=tp:8},dce").run(module, weights)
    ladder = module.clone()
    PassManager.parse("ladder").run(ladder, weights)
    rows = []
    cases = (
        ("h100-sxm", "38%", "30%", 1.31, 1.31),
        ("h100-pcie-nop2p", "> 50%", "53%", 1.59, 1.60),
    )
    for name, paper, plotted, paper_speedup, plotted_speedup in cases:
        standard = estimate(module, Target(load(name), context=1280))
        laddered = estimate(ladder, Target(load(name), context=1280))
        s = standard.schedule
        speedup = s.step_time / laddered.schedule.step_time
        rows.append((name, s.step_time, s.comm_busy, standard.comm_share, paper, plotted,
                     laddered.schedule.step_time, speedup, paper_speedup, plotted_speedup))  # fmt: skip
    planned = time.perf_counter() - start
    print("Llama-3-70B shapes, bf16, TP=8, decode: batch 1, 1 token, KV cache of 1280")
    print(f"capture+import {captured:.1f} s; pipelines + estimates {planned:.1f} s")
    header = f"{'hardware':<18} {'step ms':>8} {'all-reduce ms':>14} {'share':>7} {'paper':>7}"
    print(header + f" {'authors plot':>13}")
    for name, step, comm, share, paper, plotted, *_ in rows:
        line = f"{name:<18} {step * 1e3:>8.2f} {comm * 1e3:>14.2f} {share:>7.1%} {paper:>7}"
        print(line + f" {plotted:>13}")
    print(f"\n{'hardware':<18} {'ladder ms':>10} {'speedup':>8} {'paper':>7} {'authors plot':>13}")
    for name, *_, ladder_step, speedup, paper_speedup, plotted_speedup in rows:
        line = f"{name:<18} {ladder_step * 1e3:>10.2f} {speedup:>7.2f}x {paper_speedup:>6.2f}x"
        print(line + f" {plotted_speedup:>12.2f}x")


if __name__ == "__main__":
    main()
