"""Compressed linear kernels on this CPU: latency per call by token count,
and the token count where dequantize + GEMM overtakes the low-bit kernel.

    python benchmarks/quant_kernels.py                 # a 4096 x 4096 layer, 1 thread
    python benchmarks/quant_kernels.py --out 4096 --in 11008 --repeats 9

For each scheme, the plait op runs with its dispatch forced to the low-bit
kernel and then to the dense path (calls alternating, median of repeats),
beside dense fp32 and bf16 `F.linear` on the same shape. `DECODE_MAX_TOKENS`
(kernels/quant_linear.py) and `SPARSE_MAX_TOKENS` (kernels/gqsa.py) are set
from these crossovers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def layers(out: int, cols: int):
    """(label, op, args, prepared kwargs, module whose threshold forces the path)."""
    from plait.customops import gqsa as gqsa_kernel
    from plait.customops import quant_linear as q
    from plait.passes.compress.easyquant import rtn
    from plait.passes.compress.gqsa import gqsa

    torch.manual_seed(0)
    w = torch.randn(out, cols) * 0.02
    none_idx, none_val = torch.zeros(1, 2, 0, dtype=torch.int32), torch.zeros(1, 0)
    for bits, group in ((8, 0), (4, 128)):
        r = rtn(w, bits, group)
        stored = q.pack_int4(r.q) if bits == 4 else r.q
        args = (stored, r.scales, None, none_idx, none_val, bits)
        label = f"int{bits} " + ("per-channel" if not group else f"g{group}")
        yield (
            label,
            torch.ops.plait.quant_linear,
            args,
            q.prepare(stored, r.scales, bits),
            (q, "DECODE_MAX_TOKENS"),
        )
    s = gqsa(w, 16, 0.5)
    args = (s.values, s.scales, s.blocks, None, 16)
    prepared = gqsa_kernel.prepare_args([None, *args])
    yield (
        "GQSA W4S50 g16",
        torch.ops.plait.gqsa_linear,
        args,
        prepared,
        (gqsa_kernel, "SPARSE_MAX_TOKENS"),
    )


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=int, default=4096)
    parser.add_argument("--in", dest="cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    w = torch.randn(args.out, args.cols) * 0.02
    table = Table(title=f"{args.out} x {args.cols} linear, 1 thread: median ms per call")
    table.add_column("tokens", justify="right")
    columns = ["fp32 dense", "bf16 dense"]
    results: dict[str, dict[int, tuple[float, float]]] = {}
    with torch.inference_mode():
        dense = {}
        for tokens in TOKENS:
            x = torch.randn(tokens, args.cols)
            xb, wb = x.bfloat16(), w.bfloat16()
            f32 = timed(lambda: torch.nn.functional.linear(x, w), args.repeats)
            b16 = timed(lambda: torch.nn.functional.linear(xb, wb), args.repeats)
            dense[tokens] = (statistics.median(f32), statistics.median(b16))
        for label, op, op_args, prepared, (module, threshold) in layers(args.out, args.cols):
            columns += [f"{label} kernel", f"{label} dense path"]
            saved = getattr(module, threshold)
            results[label] = {}
            for tokens in TOKENS:
                x = torch.randn(tokens, args.cols)
                samples = {True: [], False: []}
                for _ in range(args.repeats):  # alternate the two paths
                    for kernel in (True, False):
                        limit = 10**9 if kernel else 0
                        setattr(
                            module,
                            threshold,
                            {8: limit, 4: limit} if isinstance(saved, dict) else limit,
                        )
                        samples[kernel] += timed(lambda: op(x, *op_args, **prepared), 1)
                results[label][tokens] = (
                    statistics.median(samples[True]),
                    statistics.median(samples[False]),
                )
            setattr(module, threshold, saved)
    for c in columns:
        table.add_column(c, justify="right")
    for tokens in TOKENS:
        row = [str(tokens), *(f"{v * 1e3:.2f}" for v in dense[tokens])]
        for label in results:
            row += [f"{v * 1e3:.2f}" for v in results[label][tokens]]
        table.add_row(*row)
    Console(width=200).print(table)
    for label, by_tokens in results.items():
        faster = [t for t in TOKENS if by_tokens[t][1] < by_tokens[t][0]]
        where = f"from {faster[0]} tokens" if faster else f"not up to {TOKENS[-1]} tokens"
        kernel_1, f32_1 = by_tokens[1][0], dense[1][0]
        print(
            f"{label}: dense path faster {where}; 1 token: kernel {kernel_1 * 1e3:.2f} ms = "
            f"{f32_1 / kernel_1:.2f}x fp32 dense, {dense[1][1] / kernel_1:.2f}x bf16 dense"
        )


if __name__ == "__main__":
    main()
