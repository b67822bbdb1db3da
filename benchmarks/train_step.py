"""A compiled training step vs eager torch + torch.optim.AdamW, side by side.

    python benchmarks/train_step.py                 # ~20M Llama, batch 2 x 128, 10 steps
    python benchmarks/train_step.py --steps 20 --seq 256

One thread. Prints the capture (compile_training) time, then the median time
of a step (forward, backward, AdamW update) of each, alternating step by step
so machine noise hits both alike; both start from the same weights and take
the same batches, and their losses are checked to agree.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

SMALL = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
)


def main() -> None:
    import plait
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    eager = copy.deepcopy(model).train()
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(0, SMALL["vocab_size"], (args.batch, args.seq), generator=generator)
        batches.append((ids, torch.ones_like(ids), ids.clone()))

    start = time.perf_counter()
    trainer = plait.compile_training(model, batches[0], lr=1e-3)
    capture = time.perf_counter() - start
    optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-3)

    def eager_step(ids, mask, labels):
        optimizer.zero_grad()
        loss = eager(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    times = {"eager": [], "plait": []}
    for step, batch in enumerate(batches):
        for name, run in (("eager", eager_step), ("plait", trainer.step)):
            start = time.perf_counter()
            loss = run(*batch)
            times[name].append(time.perf_counter() - start)
            if name == "eager":
                expected = loss
        assert abs(loss.item() - expected.item()) <= 1e-4 * abs(expected.item()), (step, loss)
    eager_ms = statistics.median(times["eager"][1:]) * 1e3  # the first step builds state
    plait_ms = statistics.median(times["plait"][1:]) * 1e3
    print(f"Llama {params / 1e6:.1f}M params, batch {args.batch} x {args.seq}, 1 thread")
    print(
        f"capture (compile_training): {capture:.1f} s; first plait step {times['plait'][0]:.2f} s"
    )
    print(
        f"step, median of {args.steps - 1}: eager {eager_ms:.1f} ms, plait {plait_ms:.1f} ms, "
        f"plait / eager {plait_ms / eager_ms:.3f}"
    )


if __name__ == "__main__":
    main()
