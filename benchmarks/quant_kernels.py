"""Compressed linear kernels on this CPU against the dense bf16 layer they
replace: latency per call by token count, each path forced in turn.

    python benchmarks/quant_kernels.py                 # a 4096 x 4096 layer, 1 thread
    python benchmarks/quant_kernels.py --out 4096 --in 11008 --rounds 9 --tokens 1 16 128
    python benchmarks/quant_kernels.py --dtype float32  # an fp32 model's activations

Activations are bf16 (a bf16 model; GQSA's kernel computes in fp32). Every
path runs once per round, rounds interleaved; the table gives each path's
median over rounds as a ratio to dense bf16 `F.linear` (< 1: faster), and
the widest spread (max - min over median) of any cell. Paths:

    kernel    PyTorch's weight-only kernel (decode)
    prefill   dequantize into the reused scratch buffer + bf16 GEMM (now)
    W8A8      per-token int8 activations x int8 weight, `torch._int_mm` (opt-in)
    old       dequantize into fresh memory + GEMM (the prefill before)
    GQSA      the sparse C++ kernel; `densify` rebuilds the dense weight + GEMM

`DECODE_MAX_TOKENS` (fp32 activations), `DECODE_MAX_TOKENS_BF16`
(customops/quant_linear.py), `SPARSE_MAX_TOKENS` and `SPARSE_MAX_TOKENS_BF16`
(customops/gqsa.py) are set from the crossovers printed at the end, with
--dtype float32 and without.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@contextlib.contextmanager
def forced(module, **settings):
    saved = {name: getattr(module, name) for name in settings}
    for name, value in settings.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def paths(w: torch.Tensor):
    """(column label, fn(x) -> y) for every path, on one weight."""
    from plait.customops import gqsa as sparse
    from plait.customops import quant_linear as q
    from plait.passes.compress.easyquant import rtn
    from plait.passes.compress.gqsa import gqsa

    wb = w.bfloat16()
    yield "fp32 dense", lambda x: torch.nn.functional.linear(x.float(), w)
    never, always = {8: 0, 4: 0}, {8: 10**9, 4: 10**9}
    none_idx, none_val = torch.zeros(1, 2, 0, dtype=torch.int32), torch.zeros(1, 0)
    for bits, group, w8a8 in ((8, 0, True), (4, 128, False), (4, 0, True)):
        r = rtn(w, bits, group)
        stored = q.pack_int4(r.q) if bits == 4 else r.q
        args = (stored, r.scales, None, none_idx, none_val, bits)
        prepared = q.prepare(stored, r.scales, bits)
        name = f"int{bits} " + (f"g{group}" if group else "pc")

        def op(x, limits, int8, args=args, prepared=prepared):
            with forced(
                q,
                DECODE_MAX_TOKENS=limits,
                DECODE_MAX_TOKENS_BF16=limits,
                PREFILL_INT8_ACTIVATIONS=int8,
            ):
                return torch.ops.plait.quant_linear(x, *args, **prepared)

        def old(x, stored=stored, r=r, bits=bits):
            dense = q.dequantize(stored, r.scales, none_idx, none_val, bits, x.dtype)
            return torch.nn.functional.linear(x, dense)

        yield f"{name} kernel", lambda x, op=op: op(x, always, False)
        yield f"{name} prefill", lambda x, op=op: op(x, never, False)
        if w8a8:
            yield f"{name} W8A8", lambda x, op=op: op(x, never, True)
        if bits == 8:
            yield f"{name} old", old
    s = gqsa(w, 16, 0.5)
    args = (s.values, s.scales, s.blocks, None, 16)
    prepared = sparse.prepare_args([None, *args])

    def gqsa_op(x, limit):
        with forced(sparse, SPARSE_MAX_TOKENS=limit, SPARSE_MAX_TOKENS_BF16=limit):
            return torch.ops.plait.gqsa_linear(x, *args, **prepared)

    yield "GQSA W4S50 kernel", lambda x: gqsa_op(x, 10**9)
    yield "GQSA densify", lambda x: gqsa_op(x, 0)
    yield "bf16 dense", lambda x: torch.nn.functional.linear(x.bfloat16(), wb)


def measure(fns: dict, x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    samples = {label: [] for label in fns}
    for fn in fns.values():
        fn(x)  # warm: scratch buffers, the C++ extension
    for _ in range(rounds):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn(x)
            samples[label].append(time.perf_counter() - start)
    return samples


def crossover(medians: dict[int, dict[str, float]], fast: str, slow: str) -> str:
    """From which token count `fast` beats `slow` (and stays faster)."""
    tokens = sorted(medians)
    wins = [t for t in tokens if all(medians[u][fast] < medians[u][slow] for u in tokens if u >= t)]
    return f"from {wins[0]} tokens" if wins else f"not up to {tokens[-1]} tokens"


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=int, default=4096)
    parser.add_argument("--in", dest="cols", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = torch.randn(args.out, args.cols) * 0.02
    with torch.inference_mode():
        fns = dict(paths(w))
        medians, spread = {}, 0.0
        for tokens in args.tokens:
            x = torch.randn(tokens, args.cols, dtype=getattr(torch, args.dtype))
            samples = measure(fns, x, args.rounds)
            medians[tokens] = {k: statistics.median(v) for k, v in samples.items()}
            spread = max(
                spread, *((max(v) - min(v)) / statistics.median(v) for v in samples.values())
            )
    title = (
        f"{args.out} x {args.cols} linear, 1 thread, {args.dtype} activations: median of {args.rounds} "
        "interleaved rounds as a ratio to dense bf16 (< 1: faster)"
    )
    table = Table(title=title)
    table.add_column("tokens", justify="right")
    table.add_column("bf16 dense ms", justify="right")
    labels = [label for label in fns if label != "bf16 dense"]
    for label in labels:
        table.add_column(label, justify="right")
    for tokens, m in medians.items():
        base = m["bf16 dense"]
        table.add_row(str(tokens), f"{base * 1e3:.2f}", *(f"{m[k] / base:.2f}" for k in labels))
    Console(width=250).print(table)
    print(f"widest spread of a cell over rounds: {spread:.0%} (max - min over median)")
    for name in ("int8 pc", "int4 g128", "int4 pc"):
        print(
            f"{name}: prefill faster than the kernel {crossover(medians, f'{name} prefill', f'{name} kernel')}"
        )
    print(
        f"GQSA: densify faster than its kernel {crossover(medians, 'GQSA densify', 'GQSA W4S50 kernel')}"
    )
    print("GQSA W4S50 kernel / int4 g128 kernel: " + ", ".join(
        f"{t}: {m['int4 g128 kernel'] / m['GQSA W4S50 kernel']:.2f}x faster" for t, m in medians.items()
    ))  # fmt: skip


if __name__ == "__main__":
    main()
