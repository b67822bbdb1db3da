"""Weight quantization math: round-to-nearest and EasyQuant.

Symmetric, weight-only, per output channel (group=0) or per group of `group`
input features. EasyQuant ("EasyQuant: An Efficient Data-free Quantization
Algorithm for LLMs", 2023) is data-free: it keeps the weights farther than
`outlier_sigma` standard deviations from their channel's mean in full
precision (a sparse add-back, capped at 1% of the weights), quantizes the rest, and
tunes each channel's or group's scale by gradient descent on the
reconstruction error ||Q(W) - W||^2 (rounding passed straight through),
starting from the best clipped range on a grid.

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


def _search_scales(grouped: torch.Tensor, bits: int, points: int = 20) -> torch.Tensor:
    """Each group's best clipped range on a grid (a start for gradient descent)."""
    full = _initial_scales(grouped, bits)
    best, best_error = full, None
    for ratio in torch.linspace(0.5, 1.0, points):
        scales = full * ratio
        error = ((_quantize(grouped, scales, bits) * scales.unsqueeze(-1) - grouped) ** 2).sum(-1)
        if best_error is None:
            best, best_error = scales, error
        else:
            better = error < best_error
            best, best_error = (
                torch.where(better, scales, best),
                torch.where(better, error, best_error),
            )
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


def easyquant(
    weight: torch.Tensor,
    bits: int,
    group: int = 0,
    outlier_sigma: float = DEFAULT_SIGMA,
    steps: int = 200,
    lr: float = 2e-3,
    max_outliers: float = MAX_OUTLIERS,
) -> Quantized:
    w = weight.detach().float()
    index = torch.zeros(2, 0, dtype=torch.long)
    if outlier_sigma > 0:
        mean = w.mean(dim=1, keepdim=True)
        std = w.std(dim=1, keepdim=True).clamp_min(1e-12)
        z = (w - mean).abs() / std
        mask = z > outlier_sigma
        budget = int(max_outliers * w.numel())
        if int(mask.sum()) > budget:  # heavy tails: keep only the most extreme
            threshold = z.flatten().kthvalue(w.numel() - budget).values
            mask = z > threshold
        index = mask.nonzero().t().contiguous()
        w = w.masked_fill(mask, 0.0)  # 0 quantizes exactly; the value is added back
    grouped = _grouped(w, group)
    scales = _search_scales(grouped, bits)
    log_scale = scales.log().clone().requires_grad_(True)  # stays positive
    optimizer = torch.optim.Adam([log_scale], lr=lr)
    qmax = 2 ** (bits - 1) - 1
    best = scales.clone()
    best_loss = torch.full_like(scales, float("inf"))
    with torch.enable_grad():
        for _ in range(steps):
            s = log_scale.exp().unsqueeze(-1)
            x = grouped / s
            q = torch.clamp(x + (torch.round(x) - x).detach(), -qmax - 1, qmax)  # straight through
            per_group = ((q * s - grouped) ** 2).sum(dim=-1)
            better = per_group.detach() < best_loss  # keep each group's best scale
            best = torch.where(better, log_scale.detach().exp(), best)
            best_loss = torch.where(better, per_group.detach(), best_loss)
            optimizer.zero_grad()
            per_group.sum().backward()
            optimizer.step()
    value = weight.detach()[index[0], index[1]] if index.numel() else weight.new_zeros(0)
    return _result(grouped, best, bits, group, index, value)
