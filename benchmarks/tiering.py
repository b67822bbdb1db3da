"""Weight tiering: step time with half the weights streamed from the host tier
(the artifact's safetensors file, read ahead on a background thread) against
all weights resident, side by side, and against the cost model's prediction.

    python benchmarks/tiering.py                 # 8-layer 1024-wide Llama, 1x128 tokens
    python benchmarks/tiering.py --budget 0.3 --repeats 9

Both programs load from artifacts on disk; calls alternate between them
(1 compute thread, so the prefetch thread has the other core); outputs must
be identical.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    import plait
    from plait.frontend import hf
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config).eval()
    inputs = hf.example_inputs(model, 1, args.seq)
    base = "canonicalize,cse,dce,memplan"
    tiered_pipeline = f"{base},tier{{budget={args.budget}}}"
    with tempfile.TemporaryDirectory() as tmp:
        programs = {}
        for label, pipeline in (("all on device", base), ("tiered", tiered_pipeline)):
            compiled = plait.compile(hf.wrap(model), inputs, pipeline=pipeline)
            compiled.save(Path(tmp) / label.replace(" ", "-"))
            programs[label] = plait.load(Path(tmp) / label.replace(" ", "-"))
        summary = programs["tiered"].module.attributes["plait.tiering"].data
        times = {label: [] for label in programs}
        outputs = {}
        with torch.inference_mode():
            for label, program in programs.items():
                outputs[label] = program(*inputs)  # first call: loads the resident weights
            for _ in range(args.repeats):
                for label, program in programs.items():
                    start = time.perf_counter()
                    program(*inputs)
                    times[label].append(time.perf_counter() - start)
    same = torch.equal(outputs["all on device"], outputs["tiered"])
    resident = statistics.median(times["all on device"])
    tiered = statistics.median(times["tiered"])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"Llama 8x1024 ({weights / 2**20:.0f} MiB of weights), 1x{args.seq} tokens, budget "
        f"{args.budget:.0%} of the weights; outputs identical: {same}"
    )
    print(f"plan: {summary}")
    print(
        f"measured median of {args.repeats}: all on device {resident * 1e3:.1f} ms, tiered "
        f"{tiered * 1e3:.1f} ms, tiered / all on device = {tiered / resident:.3f}"
    )


if __name__ == "__main__":
    main()
