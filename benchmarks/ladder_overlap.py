"""Measured overlap: ladder vs standard tensor parallelism on a slow network.

    sudo python benchmarks/ladder_overlap.py [--delay 0.5ms] [--seq 32] [--repeats 21]
    sudo python benchmarks/ladder_overlap.py --link tbf --rate 200mbit

On 2 cores, gloo all-reduces over loopback are CPU-bound and barely overlap
with compute. Here the two ranks live in two network namespaces (plait-a,
plait-b), created for the run and removed after it, joined by one of:

    delay   two TUN devices and a delay line between them (delay_line.c,
            compiled for the run, at real-time priority): every packet
            arrives `--delay` after it was sent, at no bandwidth limit. A
            collective then waits on latency, as across nodes, and leaves
            the CPU free.
    tbf     a veth pair rate-limited with `tc ... tbf` (this kernel has no
            netem): a collective waits on bandwidth.

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
import fcntl
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMESPACES = ("plait-a", "plait-b")
ADDRESSES = ("10.200.0.1", "10.200.0.2")
DEVICES = ("plait-link-a", "plait-link-b")
PROGRAMS = ("standard", "ladder", "no comm")


def sh(command: str, check: bool = True) -> None:
    subprocess.run(command, shell=True, check=check, capture_output=True)


def namespaces_up() -> None:
    network_down()
    sh(f"ip netns add {NAMESPACES[0]} && ip netns add {NAMESPACES[1]}")


def veth_up(rate: str) -> None:
    namespaces_up()
    sh(f"ip link add {DEVICES[0]} type veth peer name {DEVICES[1]}")
    for ns, dev, addr in zip(NAMESPACES, DEVICES, ADDRESSES):
        sh(f"ip link set {dev} netns {ns}")
        sh(f"ip -n {ns} addr add {addr}/24 dev {dev}")
        sh(f"ip -n {ns} link set {dev} up && ip -n {ns} link set lo up")
        sh(
            f"ip netns exec {ns} tc qdisc add dev {dev} root tbf rate {rate} burst 64kb latency 100ms"
        )


class DelayLine:
    """The network between two TUN devices: benchmarks/delay_line.c, compiled
    for the run, writes each packet read from one device to the other
    `delay` seconds later."""

    def __init__(self, delay: float, build_dir: Path):
        binary = build_dir / "delay_line"
        sh(f"cc -O2 -o {binary} {Path(__file__).with_name('delay_line.c')}")
        self.fds = []
        for dev, ns in zip(DEVICES, NAMESPACES):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            tunsetiff, tun_no_pi = 0x400454CA, 0x0001 | 0x1000  # IFF_TUN | IFF_NO_PI
            fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", dev.encode(), tun_no_pi))
            sh(f"ip link set {dev} netns {ns}")  # the open device moves with its fd
            self.fds.append(fd)
        command = [str(binary), *map(str, self.fds), str(round(delay * 1e6))]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, pass_fds=self.fds)

    def close(self) -> None:
        self.process.stdin.close()  # the line stops when its stdin closes
        self.process.wait(timeout=10)
        for fd in self.fds:
            os.close(fd)


def delay_up(delay: float, build_dir: Path) -> DelayLine:
    namespaces_up()
    line = DelayLine(delay, build_dir)
    for ns, dev, addr, peer in zip(NAMESPACES, DEVICES, ADDRESSES, reversed(ADDRESSES)):
        sh(f"ip -n {ns} addr add {addr} peer {peer} dev {dev}")
        sh(f"ip -n {ns} link set {dev} mtu 65000 up && ip -n {ns} link set lo up")
    return line


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
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=512,
    )
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
    dist.init_process_group(
        "gloo", init_method=f"tcp://{ADDRESSES[0]}:29531", rank=args.rank, world_size=2
    )
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
        print(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--link", choices=("delay", "tbf"), default="delay")
    parser.add_argument("--delay", default="0.5ms", help="one-way delay (--link delay)")
    parser.add_argument("--rate", default="200mbit", help="bandwidth (--link tbf)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=21)
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
    line = None
    if args.link == "delay":
        line = delay_up(float(args.delay.removesuffix("ms")) / 1e3, directory)
        link = f"2 TUN devices, {args.delay} one-way delay, no bandwidth limit"
    else:
        veth_up(args.rate)
        link = f"veth, tbf {args.rate}"
    try:
        procs = []
        for rank, (ns, dev) in enumerate(zip(NAMESPACES, DEVICES)):
            env = dict(os.environ, GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1")
            command = [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                __file__,
                "--rank",
                str(rank),
                "--dir",
                str(directory),
                "--seq",
                str(args.seq),
                "--repeats",
                str(args.repeats),
            ]
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
        out = [p.communicate(timeout=1800)[0] for p in procs]
    finally:
        if line is not None:
            line.close()
        network_down()
        shutil.rmtree(directory)  # three saved programs, ~0.6 GB
    times = json.loads(out[0].strip().splitlines()[-1])
    print(f"link: {link}, between 2 namespaces; batch 1, {args.seq} tokens, 1 thread per rank")
    for name in PROGRAMS:
        median = statistics.median(times[name])
        print(f"  {name:<9} {median * 1e3:8.2f} ms per step (median of {args.repeats})")
    # paired within each round, where the three ran back to back under the same noise
    rounds = list(zip(*(times[n] for n in PROGRAMS)))
    speedup = statistics.median(s / lad for s, lad, _ in rounds)
    recovered = statistics.median((s - lad) / (s - free) for s, lad, free in rounds if s > free)
    print(f"ladder speedup over standard: {speedup:.2f}x (goal >= 1.2x)")
    print(f"share of the communication-free bound recovered: {recovered:.0%} (goal >= 60%)")
    print("(medians of the per-round ratios)")


if __name__ == "__main__":
    main()
