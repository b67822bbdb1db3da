"""Validation: the predicted share of a decode step spent in all-reduce, and
the predicted ladder speedup, for Llama-3-70B shapes at TP=8, against the
Ladder Residual paper.

    python benchmarks/allreduce_share_70b.py

Captures Llama-3-70B (bf16, on meta: no weights allocated) at batch 1, one new
token, shards it with the Megatron rules over 8 ranks, and estimates a decode
step reading a 1280-position KV cache (the paper's runs: 1024-token prompts,
512 new tokens) on H100 SXM (NVLink) and on H100 with NCCL_P2P_DISABLE=1
(collectives through host memory, the paper's "no NVLink"). All hardware
figures are public (see hardware/*.toml); nothing is fitted to the paper's
numbers.

Targets: the paper (arXiv 2501.06589) reports all-reduce at 38% of the time
for 70B at TP=8, over 50% without NVLink, and ladder speedups of about 1.31x
with NVLink and 1.59x without; the authors' own plotted data
(github.com/mayank31398/ladder-residual-inference, tools/plot-70b.py, batch 1)
gives 30% / 53% and 1.31x / 1.60x, from tokens/s of the standard, ladder and
all-reduce-free ("upper bound") models, which the script prints as ms per
token next to the predictions.
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    from llama3_70b import llama3_70b_config
    from plait.cost.estimate import Target, estimate
    from plait.frontend import hf
    from plait.frontend.capture import capture
    from plait.frontend.importer import import_program
    from plait.hardware import load
    from plait.passes.manager import PassManager
    from transformers import LlamaForCausalLM

    config = llama3_70b_config()
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
    # (hardware, paper's share, paper's speedup, authors' per-token ms: standard, ladder, bound)
    cases = (
        ("h100-sxm", "38%", 1.31, (1e3 / 77.39, 1e3 / 101.22, 1e3 / 110.59)),
        ("h100-pcie-nop2p", "> 50%", 1.59, (1e3 / 51.66, 1e3 / 82.59, 1e3 / 110.59)),
    )
    for name, paper_share, paper_speedup, measured in cases:
        standard = estimate(module, Target(load(name), context=1280)).schedule
        laddered = estimate(ladder, Target(load(name), context=1280)).schedule
        predicted = (standard.step_time, laddered.step_time, standard.compute_busy)
        rows.append((name, standard.comm_busy, paper_share, paper_speedup, predicted, measured))
    planned = time.perf_counter() - start
    print("Llama-3-70B shapes, bf16, TP=8, decode: batch 1, 1 token, KV cache of 1280")
    print(f"capture+import {captured:.1f} s; pipelines + estimates {planned:.1f} s")
    print("predicted / authors' measurements (ms per token; the 'no all-reduce' run is theirs")
    print("with NVLink, the same compute for both):")
    print(
        f"{'hardware':<16} {'standard':>13} {'ladder':>13} {'no all-reduce':>14} {'all-reduce':>10}"
    )
    for name, comm, _, _, predicted, measured in rows:
        cells = " ".join(f"{p * 1e3:>6.2f}/{m:<6.2f}" for p, m in zip(predicted, measured))
        print(f"{name:<16} {cells} {comm * 1e3:>10.2f}")
    print(
        f"\n{'hardware':<16} {'share':>6} {'paper':>6} {'authors':>8} {'speedup':>8} {'paper':>6} {'authors':>8}"
    )
    for name, _, paper_share, paper_speedup, predicted, measured in rows:
        share = 1 - predicted[2] / predicted[0]
        line = f"{name:<16} {share:>6.1%} {paper_share:>6} {1 - measured[2] / measured[0]:>8.1%}"
        speedups = f"{predicted[0] / predicted[1]:>7.2f}x {paper_speedup:>5.2f}x"
        print(f"{line} {speedups} {measured[0] / measured[1]:>7.2f}x")


if __name__ == "__main__":
    main()
