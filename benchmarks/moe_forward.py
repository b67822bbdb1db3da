"""Mixture-of-experts forward over two ranks: plait's expert parallelism vs
PyTorch DTensor.

    python benchmarks/moe_forward.py                 # 1x128 and 1x1 tokens
    python benchmarks/moe_forward.py --repeats 31

A Mixtral-like `transformers` model (hidden 512, 4 layers, 8 heads / 4 kv
heads, 8 experts of 1024, top-2, vocab 8192), fp32, one thread per rank, gloo
ranks on this machine, under torch.no_grad. Variants, each a full forward to
logits:

    DTensor     `parallelize_module` with the standard plan on attention
                (q/k/v colwise, o rowwise); PyTorch has no standard plan for
                transformers' grouped experts, so they run whole on each rank
    plait tp    shard{mesh=tp:2}: attention as Megatron, each rank holds 4 of
                the 8 experts and computes their rows; one all-reduce per MoE
    plait ep    shard{mesh=ep:2} on a batch of 2 (each rank one sequence):
                experts split, rows sent to their experts' rank by an
                all-to-all (its own row, batch 2, in the table)

Each round runs every variant once, in turn, after a barrier; medians over
rounds and the median of per-round ratios to DTensor. Every variant's logits
must be within 1e-5 (relative to their scale) of the unsharded model's.
"""

from __future__ import annotations

import argparse
import statistics

import torch

CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)


def build():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**CONFIG)).eval()


def _expert_bytes(program) -> int:
    weights = program.program.graph_module
    return sum(
        t.numel() * t.element_size()
        for n, t in vars(weights).items()
        if "experts" in n and isinstance(t, torch.Tensor)
    )


def _rank(rank: int, world: int, port: int, shapes: list[tuple[int, int]], repeats: int):
    import copy

    import plait
    import torch.distributed as dist
    from dtensor_llama import parallelize_llama
    from plait.frontend import hf
    from rounds import checked_rounds

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model = build()
    attention = tuple(f"self_attn.{p}_proj" for p in "qkv")
    dtensor = parallelize_llama(copy.deepcopy(model), world, attention, ("self_attn.o_proj",))
    wrapped = hf.wrap(model)
    for batch, seq in shapes:
        ids = torch.randint(
            0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seq)
        )
        mask = torch.ones_like(ids)
        meshes = {"plait tp": f"tp:{world}"}
        if batch % world == 0:
            meshes["plait ep"] = f"ep:{world}"
        compiled = {
            name: plait.compile(
                wrapped, (ids, mask), pipeline=f"canonicalize,cse,dce,shard{{mesh={mesh}}},dce"
            )
            for name, mesh in meshes.items()
        }
        variants = {
            "DTensor": lambda: dtensor(ids, use_cache=False).logits,
            **{name: (lambda c=c: c(ids, mask)) for name, c in compiled.items()},
        }
        with torch.no_grad():
            reference = model(ids, use_cache=False).logits
            times = checked_rounds(variants, reference, repeats, dist.barrier)
        if rank == 0:
            experts = {name: _expert_bytes(c) for name, c in compiled.items()}
            whole = sum(p.numel() * 4 for n, p in model.named_parameters() if "experts" in n)
            report(batch, seq, times, repeats, world, experts, whole)
    dist.destroy_process_group()


def report(batch, seq, times, repeats, world, experts, whole) -> None:
    print(f"\n{world} ranks, forward of {batch}x{seq} tokens, medians over {repeats} rounds")
    print(f"{'variant':<10}{'ms':>9}{'vs DTensor':>12}{'expert MB/rank':>16}")
    for name, runs in times.items():
        ratio = statistics.median(r / d for r, d in zip(runs, times["DTensor"]))
        held = experts.get(name, whole) / 1e6
        print(f"{name:<10}{statistics.median(runs) * 1e3:>9.2f}{ratio:>11.2f}x{held:>16.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="2x128,1x128,1x1", help="BATCHxSEQ,...")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    import torch.multiprocessing as mp
    from plait.runtime.workers import free_port

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"Mixtral-like, {sum(p.numel() for p in build().parameters()) / 1e6:.0f}M parameters")
    mp.spawn(_rank, (2, free_port(), shapes, args.repeats), nprocs=2)


if __name__ == "__main__":
    main()
