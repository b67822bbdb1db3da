"""GQSA weight math: group sparsity with group quantization.

GQSA ("Group Quantization and Sparsity for Accelerating LLM Inference", 2024)
prunes whole 1 x G groups of consecutive input features and quantizes the
groups that survive to int4, one scale per group. Importance is data-free, a
group's L2 norm, or, given the norms of the layer's input features over
sample inputs (activation statistics), the L2 norm of |W_ij| * ||x_j|| over
the group (the activation-aware score of Wanda, per group). Every output row
keeps the same number of groups (in each of `segments` equal column ranges,
so a row-parallel shard holds whole rows of work), which makes the storage a
fixed-width block-sparse (ELL) layout:

    values  uint8 [out, kept, G/2]  4-bit values + 8; byte i of a group holds
                                    feature i (low nibble) and i + G/2 (high)
    scales  float16 [out, kept]
    blocks  int16 [out, kept]       block column, within its segment

    s = gqsa(weight, group=16, sparsity=0.5)
    s.dense()                       # the weight the layer computes with
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...customops.gqsa import dense_weight, pack_groups
from .easyquant import _search_scales


@dataclass
class GroupSparse:
    values: torch.Tensor
    scales: torch.Tensor
    blocks: torch.Tensor
    group: int
    in_features: int
    segments: int = 1

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dense_weight(
            self.values, self.scales, self.blocks, self.group, self.in_features, self.segments
        ).to(dtype)

    def relative_error(self, weight: torch.Tensor) -> float:
        w = weight.float()
        return ((self.dense() - w).norm() / w.norm()).item()


def gqsa(
    weight: torch.Tensor,
    group: int = 16,
    sparsity: float = 0.5,
    bits: int = 4,
    segments: int = 1,
    input_norms: torch.Tensor | None = None,
) -> GroupSparse:
    if bits != 4:
        raise ValueError(f"GQSA stores 4-bit groups; bits={bits} is not supported")
    w = weight.detach().float()
    out, cols = w.shape
    if cols % (group * segments):
        raise ValueError(
            f"{cols} input features do not split into groups of {group} in {segments} segment(s)"
        )
    per_segment = cols // group // segments
    keep = max(1, round((1 - sparsity) * per_segment))
    grouped = w.reshape(out, segments, per_segment, group)
    scores = (
        grouped
        if input_norms is None
        else grouped * input_norms.float().reshape(1, segments, per_segment, group)
    )
    importance = scores.norm(dim=-1)  # [out, segments, per_segment]
    chosen = importance.topk(keep, dim=-1).indices.sort(dim=-1).values  # [out, segments, keep]
    kept = grouped.gather(2, chosen.unsqueeze(-1).expand(-1, -1, -1, group))
    kept = kept.reshape(out, segments * keep, group)
    scales = _search_scales(kept, bits).half().float()  # the stored precision
    q = torch.clamp(torch.round(kept / scales.unsqueeze(-1)), -8, 7)
    return GroupSparse(
        values=pack_groups(q),
        scales=scales.half(),
        blocks=chosen.reshape(out, segments * keep).to(torch.int16),
        group=group,
        in_features=cols,
        segments=segments,
    )
