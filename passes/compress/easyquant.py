"""Weight quantization math: round-to-nearest and EasyQuant.

Symmetric, weight-only, per output channel (group=0) or per group of `group`
input features. EasyQuant ("EasyQuant: An Efficient Data-free Quantization
Algorithm for LLMs", 2023) is data-free: it keeps the weights farther than
`outlier_sigma` standard deviations from their channel's mean in full
precision (a sparse add-back, capped at 1% of the weights), quantizes the rest, and
tunes each channel's or group's scale to minimize the reconstruction error
||Q(W) - W||^2. The paper descends the gradient (rounding passed straight
through); here every group at once takes the best clipped range on a coarse
grid, then on a fine one around it, then Lloyd rounds (the best scale for
the codes in closed form, re-round) until no group improves: the same
objective, never worse than the grid point it starts from, tens of times faster.

    q = easyquant(weight, bits=4, group=128, outlier_sigma=3.0)
    q.dequantize()          # the weight the quantized layer computes with
    q.relative_error(weight)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Quantized:
    """W ~ q * scale (per group), plus full-precision outliers added back."""

    q: torch.Tensor  # int8 [out, in], values in [-2^(bits-1), 2^(bits-1) - 1]
    scales: torch.Tensor  # float32 [out, groups]
    bits: int
    group: int  # 0: one group spanning the row
    outlier_index: torch.Tensor  # int64 [2, nnz]: (row, column)
    outlier_value: torch.Tensor  # [nnz], the weight's dtype

    @property
    def outlier_fraction(self) -> float:
        return self.outlier_value.numel() / self.q.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = dequantize(self.q, self.scales, self.group).to(dtype)
        if self.outlier_value.numel():
            w[self.outlier_index[0], self.outlier_index[1]] = self.outlier_value.to(dtype)
        return w

    def relative_error(self, weight: torch.Tensor) -> float:
        w = weight.float()
        return ((self.dequantize() - w).norm() / w.norm()).item()


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in] -> [out, groups, size]."""
    out, cols = w.shape
    size = cols if group <= 0 else group
    if cols % size:
        raise ValueError(f"group size {group} does not divide the {cols} input features")
    return w.reshape(out, cols // size, size)


def dequantize(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    return (_grouped(q.float(), group) * scales.unsqueeze(-1)).reshape(q.shape)


def _quantize(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scales.unsqueeze(-1)), -qmax - 1, qmax)


def _initial_scales(grouped: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    return (grouped.abs().amax(dim=-1) / qmax).clamp_min(1e-12)


GRID = torch.linspace(0.5, 1.0, 20)  # clipped ranges tried, as shares of the absolute maximum
COARSE = torch.linspace(0.5, 1.0, 10)  # EasyQuant's first look over the same span
ZOOM = 17  # then this many points within one coarse step of each group's best (odd: it is one)
CHUNK = 1 << 22  # elements of the [rows, groups, points, size] search tensor at once
BLOCK = 1 << 17  # weights EasyQuant searches at once


def _errors(grouped: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Each group's squared reconstruction error at its scale(s): scales is
    [..., groups] (one per group) or [..., groups, points] (several each)."""
    qmax = 2 ** (bits - 1) - 1
    s = scales.unsqueeze(-1)
    w = grouped if s.dim() == grouped.dim() else grouped.unsqueeze(-2)
    q = torch.div(w, s).round_().clamp_(-qmax - 1, qmax)
    return q.mul_(s).sub_(w).square_().sum(-1)


def _best(grouped: torch.Tensor, candidates: torch.Tensor, bits: int):
    """Each group's best of its [out, groups, points] candidate scales, and its
    error there: all points at once, a block of rows at a time (the first
    best on ties)."""
    rows = max(1, CHUNK // (grouped[0].numel() * candidates.shape[-1]))
    errors = torch.cat(
        [_errors(w, s, bits) for w, s in zip(grouped.split(rows), candidates.split(rows))]
    )
    error, at = errors.min(-1, keepdim=True)
    return candidates.gather(-1, at).squeeze(-1), error.squeeze(-1)


def _search_scales(grouped: torch.Tensor, bits: int, grid: torch.Tensor = GRID) -> torch.Tensor:
    """Each group's best clipped range on the grid."""
    ratios = grid.to(grouped.device)
    return _best(grouped, _initial_scales(grouped, bits).unsqueeze(-1) * ratios, bits)[0]


STRIDES = torch.tensor([1.0, 2.0, 4.0, 8.0])  # how far along each Lloyd step to look


def _tune(grouped: torch.Tensor, bits: int, steps: int) -> torch.Tensor:
    """Each group's scale: the best on a coarse grid of clipped ranges, then on
    a fine grid around it (ZOOM points within one coarse step, the best among
    them), then Lloyd steps: fix the codes, take the scale that fits them best
    in closed form (<w, q> / <q, q>), and try 1, 2, 4 and 8 times that move
    (plain Lloyd crawls at 8 bits), re-rounding. Each group keeps its best
    scale, so the error never grows; stops once no group improves."""
    best = _search_scales(grouped, bits, COARSE)
    fine = 1 + float(COARSE[1] - COARSE[0]) * torch.linspace(-1, 1, ZOOM, device=best.device)
    strides = STRIDES.to(best.device)
    best, best_error = _best(grouped, best.unsqueeze(-1) * fine, bits)
    for _ in range(steps):
        q = _quantize(grouped, best, bits)
        qq = q.square().sum(-1)
        fitted = torch.where(qq > 0, (q * grouped).sum(-1) / qq.clamp_min(1), best)
        candidates = best.unsqueeze(-1) + (fitted - best).unsqueeze(-1) * strides
        scales, error = _best(grouped, candidates.clamp_min(1e-12), bits)
        better = error < best_error
        if not bool(better.any()):
            break
        best = torch.where(better, scales, best)
        best_error = torch.where(better, error, best_error)
    return best


def _result(grouped, scales, bits, group, index, value) -> Quantized:
    q = _quantize(grouped, scales, bits).to(torch.int8).reshape(grouped.shape[0], -1)
    return Quantized(q, scales.float(), bits, group, index, value)


def rtn(weight: torch.Tensor, bits: int, group: int = 0) -> Quantized:
    """Round to nearest with each group's absolute maximum as its range."""
    grouped = _grouped(weight.detach().float(), group)
    empty = torch.zeros(2, 0, dtype=torch.long)
    return _result(grouped, _initial_scales(grouped, bits), bits, group, empty, weight.new_zeros(0))


DEFAULT_SIGMA = 2.7
MAX_OUTLIERS = 0.01  # of the weights, at most


def split_outliers(w: torch.Tensor, sigma: float, max_outliers: float):
    """The weights with those farther than `sigma` standard deviations from
    their row's mean zeroed (0 quantizes exactly; they are added back), and
    their [2, nnz] (row, column) index; at most `max_outliers` of them."""
    index = torch.zeros(2, 0, dtype=torch.long)
    if sigma <= 0:
        return w, index
    mean = w.mean(dim=1, keepdim=True)
    std = w.std(dim=1, keepdim=True).clamp_min(1e-12)
    z = (w - mean).abs() / std
    mask = z > sigma
    budget = int(max_outliers * w.numel())
    if int(mask.sum()) > budget:  # heavy tails: keep only the most extreme
        threshold = z.flatten().kthvalue(w.numel() - budget).values
        mask = z > threshold
    return w.masked_fill(mask, 0.0), mask.nonzero().t().contiguous()


def easyquant(
    weight: torch.Tensor,
    bits: int,
    group: int = 0,
    outlier_sigma: float = DEFAULT_SIGMA,
    steps: int = 20,  # Lloyd rounds at most; they stop once no group improves
    max_outliers: float = MAX_OUTLIERS,
) -> Quantized:
    w, index = split_outliers(weight.detach().float(), outlier_sigma, max_outliers)
    grouped = _grouped(w, group)
    rows = max(1, BLOCK // grouped[0].numel())  # a block of rows at a time, in cache
    scales = torch.cat([_tune(block, bits, steps) for block in grouped.split(rows)])
    value = weight.detach()[index[0], index[1]] if index.numel() else weight.new_zeros(0)
    return _result(grouped, scales, bits, group, index, value)
