"""Measured overlap: ladder vs standard tensor parallelism on a link-bound network.

    sudo python benchmarks/ladder_overlap.py [--rate 200mbit] [--repeats 15]

On 2 cores, gloo all-reduces over loopback are CPU-bound and barely overlap
with compute. Here the two ranks live in two network namespaces joined by a
veth pair rate-limited with `tc ... tbf`, so a collective waits on the link
and leaves the CPU free. The namespaces (plait-a/plait-b, 10.200.0.1/2) are
created for the run and removed after it.

Three programs of the same Llama-like model (TP=2), timed alternately step by
step in one run (median over repeats, 1 thread per rank):

    standard   shard{mesh=tp:2}           all-reduce after o_proj and down_proj
    ladder     shard{mesh=tp:2},ladder    each all-reduce overlaps the next module
    no comm    the standard program with its all-reduces removed: the upper bound

Prints the ladder speedup over standard (goal >= 1.2x) and the share of the
communication-free upper bound it recovers, (standard - ladder) / (standard -
no comm) (goal >= 60%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMESPACES = ("plait-a", "plait-b")
ADDRESSES = ("10.200.0.1", "10.200.0.2")
DEVICES = ("veth-plait-a", "veth-plait-b")
PROGRAMS = ("standard", "ladder", "no comm")


def sh(command: str, check: bool = True) -> None:
    subprocess.run(command, shell=True, check=check, capture_output=True)


def network_up(rate: str) -> None:
    network_down()
    sh(f"ip netns add {NAMESPACES[0]} && ip netns add {NAMESPACES[1]}")
    sh(f"ip link add {DEVICES[0]} type veth peer name {DEVICES[1]}")
    for ns, dev, addr in zip(NAMESPACES, DEVICES, ADDRESSES):
        sh(f"ip link set {dev} netns {ns}")
        sh(f"ip -n {ns} addr add {addr}/24 dev {dev}")
        sh(f"ip -n {ns} link set {dev} up && ip -n {ns} link set lo up")
        sh(
            f"ip netns exec {ns} tc qdisc add dev {dev} root tbf rate {rate} burst 64kb latency 100ms"
        )


def network_down() -> None:
    for ns in NAMESPACES:
        sh(f"ip netns del {ns}", check=False)


def build(directory: Path, hidden: int, layers: int) -> None:
    import plait
    import torch
    from plait.frontend import hf
    from plait.ir.ops import AllReduceOp
    from plait.passes.base import function_blocks
    from transformers import LlamaConfig, LlamaForCausalLM
    from xdsl.rewriter import Rewriter

    config = LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
        max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    inputs = hf.example_inputs(model, 2, 16)
    shapes = hf.dynamic_shapes(max_seq=512)
    base = "canonicalize,cse,dce,shard{mesh=tp:2}"
    for name, pipeline in (("standard", base), ("ladder", base + ",ladder"), ("no comm", base)):
        program = plait.compile(hf.wrap(model), inputs, dynamic_shapes=shapes, pipeline=pipeline)
        if name == "no comm":  # drop every all-reduce: each rank keeps its partial sums
            for block in function_blocks(program.module):
                for op in [o for o in block.ops if isinstance(o, AllReduceOp)]:
                    op.result.replace_all_uses_with(op.input)
                    Rewriter.erase_op(op)
        program.save(directory / name.replace(" ", "_"))


def worker(args) -> None:
    """One rank: time each program step by step, alternating between them."""
    import plait
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{ADDRESSES[0]}:29531",
                            rank=args.rank, world_size=2)  # fmt: skip
    programs = {n: plait.load(Path(args.dir) / n.replace(" ", "_")) for n in PROGRAMS}
    ids = torch.ones(1, args.seq, dtype=torch.long)
    mask = torch.ones(1, args.seq, dtype=torch.long)
    times = {n: [] for n in PROGRAMS}
    with torch.inference_mode():
        for i in range(args.repeats + 2):
            for name, program in programs.items():
                dist.barrier()
                start = time.perf_counter()
                program(ids, mask)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
    if args.rank == 0:
        print(json.dumps({n: statistics.median(t) for n, t in times.items()}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        return worker(args)
    if os.geteuid() != 0:
        sys.exit("network namespaces need root; run with sudo")
    directory = Path(tempfile.mkdtemp(prefix="plait-ladder-"))
    print(f"building programs (hidden {args.hidden}, {args.layers} layers, TP=2) in {directory}")
    build(directory, args.hidden, args.layers)
    network_up(args.rate)
    try:
        procs = []
        for rank, (ns, dev) in enumerate(zip(NAMESPACES, DEVICES)):
            env = dict(os.environ, GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1")
            command = ["ip", "netns", "exec", ns, sys.executable, __file__, "--rank", str(rank),
                       "--dir", str(directory), "--seq", str(args.seq), "--repeats", str(args.repeats)]  # fmt: skip
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
        out = [p.communicate(timeout=1800)[0] for p in procs]
    finally:
        network_down()
    medians = json.loads(out[0].strip().splitlines()[-1])
    standard, ladder, free = (medians[n] for n in PROGRAMS)
    print(
        f"link: veth in 2 namespaces, tbf {args.rate}; batch 1, {args.seq} tokens, 1 thread per rank"
    )
    for name in PROGRAMS:
        print(f"  {name:<9} {medians[name] * 1e3:8.2f} ms per step (median of {args.repeats})")
    print(f"ladder speedup over standard: {standard / ladder:.2f}x (goal >= 1.2x)")
    recovered = (standard - ladder) / (standard - free) if standard > free else float("nan")
    print(f"share of the communication-free bound recovered: {recovered:.0%} (goal >= 60%)")


if __name__ == "__main__":
    main()
