"""Tensor-parallel forward latency: plait vs DTensor vs hand-written Megatron TP.

    python benchmarks/tp_forward.py                 # TP=2, 1x128 and 1x1 tokens
    python benchmarks/tp_forward.py --repeats 31 --tp 2
    python benchmarks/tp_forward.py --compiled      # also DTensor + torch.compile, plait + fuse

A Llama-like `transformers` model (hidden 1024, 8 layers, 16 heads, 8 kv
heads, vocab 8192: 117M parameters), fp32, one thread per rank, gloo ranks on
this machine, under torch.no_grad. Variants, each a full forward to logits:

    DTensor       `parallelize_module` on the `transformers` model with the
                  standard plan (q/k/v/gate/up colwise, o/down rowwise)
    hand-written  Megatron-style TP written directly in torch: each rank's
                  slices of the weights, F.linear, SDPA, two all-reduces a layer
    plait         plait.compile with shard{mesh=tp:2} (Megatron's rules)
    plait ilp     shard{mesh=tp:2,solve=ilp,hardware=cpu} (the solver's plan for
                  this machine's measured costs, if `plait calibrate` wrote one)

and with --compiled:

    DTensor+compile  the DTensor model through torch.compile (Inductor)
    plait fuse       plait's TP program with `fuse` (Inductor)

Each round runs every variant once, in turn, after a barrier, so that machine
noise hits them alike; reported are medians over rounds and the median of
the per-round ratios to DTensor and to hand-written. Every variant's logits
must be within 1e-5 (relative to their scale) of the unsharded model's.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

CONFIG = dict(
    vocab_size=8192,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=512,
)


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


class HandWrittenTP(torch.nn.Module):
    """Megatron-LM's layout by hand: q/k/v/gate/up split by output features,
    o/down by input features, an all-reduce after each of o and down."""

    def __init__(self, model, rank: int, world: int):
        super().__init__()
        config = model.config
        self.world = world
        self.heads = config.num_attention_heads // world
        self.kv_heads = config.num_key_value_heads // world
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.embed = model.model.embed_tokens.weight
        self.rotary = model.model.rotary_emb
        self.norm = model.model.norm.weight
        self.lm_head = model.lm_head.weight

        def rows(w):  # this rank's output features
            return w.chunk(world, 0)[rank].contiguous()

        def cols(w):  # this rank's input features
            return w.chunk(world, 1)[rank].contiguous()

        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(
                dict(
                    ln1=layer.input_layernorm.weight,
                    ln2=layer.post_attention_layernorm.weight,
                    q=rows(a.q_proj.weight),
                    k=rows(a.k_proj.weight),
                    v=rows(a.v_proj.weight),
                    o=cols(a.o_proj.weight),
                    gate=rows(m.gate_proj.weight),
                    up=rows(m.up_proj.weight),
                    down=cols(m.down_proj.weight),
                )
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        batch, seq = ids.shape
        x = F.embedding(ids, self.embed)
        positions = torch.arange(seq).unsqueeze(0)
        cos, sin = self.rotary(x, positions)
        for w in self.layers:
            h = F.rms_norm(x, (x.shape[-1],), w["ln1"], self.eps)
            q = F.linear(h, w["q"]).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
            k = F.linear(h, w["k"]).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
            v = F.linear(h, w["v"]).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, enable_gqa=True)
            a = F.linear(a.transpose(1, 2).reshape(batch, seq, -1), w["o"])
            dist.all_reduce(a)
            x = x + a
            h = F.rms_norm(x, (x.shape[-1],), w["ln2"], self.eps)
            m = F.linear(F.silu(F.linear(h, w["gate"])) * F.linear(h, w["up"]), w["down"])
            dist.all_reduce(m)
            x = x + m
        return F.linear(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps), self.lm_head)


def _rank(rank: int, world: int, port: int, seqs: list[int], repeats: int, extra: dict):
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
    dtensor = copy.deepcopy(model)
    parallelize_llama(dtensor, world)
    hand = HandWrittenTP(model, rank, world)
    wrapped = hf.wrap(model)
    pipelines = {"plait": f"canonicalize,cse,dce,shard{{mesh=tp:{world}}},dce"}
    if extra["compiled"]:
        pipelines["plait fuse"] = pipelines["plait"] + ",fuse"
        dtensor_compiled = torch.compile(dtensor)
    if extra["ilp"]:
        pipelines["plait ilp"] = (
            f"canonicalize,cse,dce,shard{{mesh=tp:{world},solve=ilp,hardware=cpu}},dce"
        )
    for seq in seqs:
        ids = torch.randint(
            0, CONFIG["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(seq)
        )
        mask = torch.ones_like(ids)
        compiled = {
            name: plait.compile(wrapped, (ids, mask), pipeline=p) for name, p in pipelines.items()
        }
        variants = {
            "DTensor": lambda: dtensor(ids, use_cache=False).logits,
            **(
                {"DTensor+compile": lambda: dtensor_compiled(ids, use_cache=False).logits}
                if extra["compiled"]
                else {}
            ),
            "hand-written": lambda: hand(ids),
            **{name: (lambda c=c: c(ids, mask)) for name, c in compiled.items()},
        }
        with torch.no_grad():
            reference = model(ids, use_cache=False).logits
            times = checked_rounds(variants, reference, repeats, dist.barrier)
        if rank == 0:
            report(seq, times, repeats, world)
    dist.destroy_process_group()


def report(seq: int, times: dict, repeats: int, world: int) -> None:
    baselines = [b for b in ("DTensor", "DTensor+compile", "hand-written") if b in times]
    print(f"\nTP={world} forward, 1x{seq} tokens, medians over {repeats} rounds")
    print(f"{'variant':<16}{'ms':>9}" + "".join(f"{'vs ' + b:>20}" for b in baselines))
    for name, runs in times.items():
        ratios = [statistics.median(r / d for r, d in zip(runs, times[b])) for b in baselines]
        print(
            f"{name:<16}{statistics.median(runs) * 1e3:>9.2f}"
            + "".join(f"{r:>19.2f}x" for r in ratios)
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--seqs", default="128,1")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--no-ilp", action="store_true", help="leave out the ILP plan")
    parser.add_argument(
        "--compiled", action="store_true", help="also DTensor + torch.compile and plait + fuse"
    )
    args = parser.parse_args()
    import torch.multiprocessing as mp
    from plait.runtime.workers import free_port

    seqs = [int(s) for s in args.seqs.split(",")]
    print(f"Llama-like, {sum(p.numel() for p in build().parameters()) / 1e6:.0f}M parameters")
    extra = {"ilp": not args.no_ilp, "compiled": args.compiled}
    mp.spawn(_rank, (args.tp, free_port(), seqs, args.repeats, extra), nprocs=args.tp)


if __name__ == "__main__":
    main()
