"""Decoding: plait's @prefill/@decode programs vs `transformers` generate,
eager and compiled (static cache + torch.compile).

    python benchmarks/decode.py                   # one rank, three Llama sizes
    python benchmarks/decode.py --tp 2            # also TP=2 on gloo vs DTensor
    python benchmarks/decode.py --sizes tiny --repeats 9
    python benchmarks/decode.py --fuse --threads 2 # also plait with `fuse`; 2 threads
    python benchmarks/decode.py --sizes 120M --pp 2 --batch 4  # pipelined throughput

Greedy decoding of --new tokens after a --prompt-token prompt, batch 1, one
thread per rank, fp32. Each round runs every variant once, in turn, so that
machine noise hits them alike; reported are the medians over the rounds and
the paired per-round ratios. Every variant must produce the same tokens as
`transformers` (checked). "decode" is the per-token latency after the
prompt: (time for N new tokens - time for 1) / (N - 1).

TP=2: both ranks run plait (`shard{mesh=tp:2}`) and the same `transformers`
model parallelized with DTensor (`parallelize_module`, q/k/v/gate/up
colwise, o/down rowwise), each decoding with its own generate loop.

--pp S: throughput of a batch of --batch sequences (tokens/s over the
batch) through plait's generation programs cut in S pipeline stages
(`pipeline{stages=S,microbatches=M}`, worker ranks of one thread each), with
M = 1 (one group: a stage waits while the others run) and M = S groups of
sequences in flight, against plait on one rank with S threads: the same
cores. Their tokens must equal the one rank's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

SIZES = {  # name -> LlamaConfig fields (vocab 32000 except tiny)
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=256, intermediate_size=688,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    "120M": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
}  # fmt: skip


def build(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=512, **SIZES[size])
    return LlamaForCausalLM(config).eval()


def hf_generate(model, ids, new: int, **options) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        **options,
    )


def compiled_hf_generate(model, ids, new: int) -> torch.Tensor:
    """transformers' own fast path: a static cache and its decode step
    compiled by torch.compile (what gpt-fast popularized). transformers
    compiles only on accelerators unless told to (`_compile_all_devices`)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    return hf_generate(model, ids, new, cache_implementation="static", compile_config=config)


def plait_generate(compiled, ids, new: int) -> torch.Tensor:
    return compiled.generate(ids, new, eos_token_id=-1)


def rounds(variants: dict, ids, new: int, repeats: int, barrier=lambda: None, unchecked=()) -> dict:
    """Per variant: list of (seconds for `new` tokens, seconds for 1 token) per round."""
    out = {name: [] for name in variants}
    with torch.inference_mode():
        reference = None
        for name, fn in variants.items():  # warm up (compile both lengths); all but
            fn(ids, 1)  # `unchecked` must agree
            tokens = fn(ids, new)
            reference = tokens if reference is None else reference
            if name not in unchecked and not torch.equal(tokens, reference):
                raise SystemExit(f"{name} generated other tokens than {next(iter(variants))}")
        for _ in range(repeats):
            for name, fn in variants.items():
                times = []
                for count in (new, 1):
                    barrier()
                    start = time.perf_counter()
                    fn(ids, count)
                    times.append(time.perf_counter() - start)
                out[name].append(tuple(times))
    return out


def report(title: str, results: dict, new: int, baseline: str, batch: int = 1) -> None:
    """tokens/s counts every sequence's tokens; decode ms/token is a step's."""
    print(f"\n{title} — {new} new tokens, medians over {len(results[baseline])} rounds")
    print(f"{'variant':<28}{'tokens/s':>10}{'decode ms/token':>17}{'speed-up':>10}")
    base = results[baseline]
    for name, runs in results.items():
        rate = statistics.median(batch * new / full for full, _ in runs)
        decode = statistics.median((full - one) / (new - 1) for full, one in runs)
        ratios = [(b[0] - b[1]) / (r[0] - r[1]) for r, b in zip(runs, base)]
        print(f"{name:<28}{rate:>10.1f}{decode * 1e3:>17.3f}{statistics.median(ratios):>9.2f}x")


def single_rank(size: str, prompt: int, new: int, repeats: int, quantized: bool, fuse: bool):
    import plait

    model = build(size)
    ids = torch.randint(
        3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)
    )
    compiled = plait.compile_generation(model, max_length=prompt + new)
    variants = {
        "transformers eager": lambda x, n: hf_generate(model, x, n),
        "transformers static+compile": lambda x, n: compiled_hf_generate(model, x, n),
        "plait": lambda x, n: plait_generate(compiled, x, n),
    }
    if fuse:  # through Inductor
        fused = plait.compile_generation(
            model, max_length=prompt + new, pipeline="canonicalize,cse,dce,fuse"
        )
        variants["plait fuse"] = lambda x, n: plait_generate(fused, x, n)
    unchecked = ()
    if quantized:  # other numerics: not checked against transformers' tokens
        int8 = plait.compile_generation(
            model,
            max_length=prompt + new,
            pipeline="canonicalize,quantize{method=rtn,bits=8},cse,dce",
        )
        variants["plait int8 weights (RTN)"] = lambda x, n: plait_generate(int8, x, n)
        unchecked = ("plait int8 weights (RTN)",)
    results = rounds(variants, ids, new, repeats, unchecked=unchecked)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    title = f"Llama {size} ({params:.1f}M parameters), 1 rank, {torch.get_num_threads()} thread(s)"
    report(title, results, new, "transformers eager")


def pipelined(size: str, prompt: int, new: int, repeats: int, stages: int, batch: int):
    import plait

    model = build(size)
    ids = torch.randint(
        3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)
    )
    torch.set_num_threads(stages)  # one rank on the cores the stages share
    length = prompt + new
    variants = {
        f"plait 1 rank, {stages} threads": plait.compile_generation(
            model, batch=batch, max_length=length
        )
    }
    for groups in (1, stages):
        stage_pass = f"pipeline{{stages={stages},microbatches={groups}}}"
        variants[f"plait pp:{stages}, {groups} group(s)"] = plait.compile_generation(
            model, batch=batch, max_length=length, pipeline=f"canonicalize,cse,dce,{stage_pass}"
        )
    try:
        calls = {
            name: lambda x, n, c=compiled: plait_generate(c, x, n)
            for name, compiled in variants.items()
        }
        results = rounds(calls, ids, new, repeats)
    finally:
        for compiled in variants.values():
            compiled.close()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    title = f"Llama {size} ({params:.1f}M parameters), batch {batch}, pipelined over {stages} ranks"
    report(title, results, new, next(iter(variants)), batch)


def _tp_rank(rank: int, world: int, port: int, size: str, prompt: int, new: int, repeats: int):
    import plait
    import torch.distributed as dist
    from dtensor_llama import parallelize_llama

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model = build(size)
    ids = torch.randint(
        3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)
    )
    compiled = plait.compile_generation(
        model, max_length=prompt + new, pipeline=f"shard{{mesh=tp:{world}}}"
    )
    dtensor = copy.deepcopy(model)
    parallelize_llama(dtensor, world)
    variants = {
        "DTensor transformers": lambda x, n: hf_generate(dtensor, x, n),
        "plait": lambda x, n: plait_generate(compiled, x, n),
    }
    results = rounds(variants, ids, new, repeats, barrier=dist.barrier)
    if rank == 0:
        report(f"Llama {size}, TP={world} on gloo", results, new, "DTensor transformers")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="tiny,small,120M")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tp", type=int, default=0, help="also run TP=N on gloo")
    parser.add_argument("--int8", action="store_true", help="also plait with int8 weights")
    parser.add_argument("--fuse", action="store_true", help="also plait with `fuse` (Inductor)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the one-rank runs")
    parser.add_argument("--pp", type=int, default=0, help="only pipelined throughput, S stages")
    parser.add_argument("--batch", type=int, default=4, help="sequences (with --pp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",")]
    if args.pp > 1:
        for size in sizes:
            pipelined(size, args.prompt, args.new, args.repeats, args.pp, args.batch)
        return
    for size in sizes:
        single_rank(size, args.prompt, args.new, args.repeats, args.int8, args.fuse)
    if args.tp > 1:
        import torch.multiprocessing as mp
        from plait.runtime.workers import free_port

        for size in sizes:
            mp.spawn(
                _tp_rank,
                (args.tp, free_port(), size, args.prompt, args.new, args.repeats),
                nprocs=args.tp,
            )


if __name__ == "__main__":
    main()
