"""Overhead: the compiled single-device program vs eager PyTorch, side by side.

    python benchmarks/overhead.py            # small Llama (~120M) and llama-tiny
    python benchmarks/overhead.py --repeats 50

Both run the same model on the same inputs under torch.inference_mode() with
one thread, alternating call by call so that machine noise hits both alike.
Prints the median latency of each and the ratio compiled / eager (goal <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def small_llama(layers: int = 12):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_llama():
    from plait.examples.models import llama_tiny

    return llama_tiny()[0].model


def measure(eager, compiled, inputs, repeats: int) -> tuple[float, float]:
    times = {"eager": [], "compiled": []}
    with torch.inference_mode():
        for _ in range(3):  # warm up both
            eager(*inputs)
            compiled(*inputs)
        for _ in range(repeats):
            for name, fn in (("eager", eager), ("compiled", compiled)):
                start = time.perf_counter()
                fn(*inputs)
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["eager"]), statistics.median(times["compiled"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import plait
    from plait.frontend import hf

    print(f"{'model':<22} {'tokens':>8} {'eager ms':>10} {'plait ms':>10} {'ratio':>7}")
    for name, build in (("small llama (120M)", small_llama), ("llama-tiny", tiny_llama)):
        model = build()
        wrapper = hf.wrap(model)
        compiled = plait.compile(
            wrapper, hf.example_inputs(model, 2, 16), dynamic_shapes=hf.dynamic_shapes(max_seq=2048)
        )
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for batch, seq in ((1, 128), (1, 8)):
            inputs = hf.example_inputs(model, batch, seq)
            eager_s, plait_s = measure(wrapper, compiled, inputs, args.repeats)
            label = f"{name}"
            print(
                f"{label:<22} {batch}x{seq:<6} {eager_s * 1e3:>10.3f} {plait_s * 1e3:>10.3f} {plait_s / eager_s:>7.3f}"
            )
        del params


if __name__ == "__main__":
    main()
