"""`plait::expert_mm`: the grouped matrix product of the experts one rank holds.

    out[rows of expert e] = rows[rows of expert e] @ weight[j]   for e = experts[j]
    out[other rows] = 0

`rows` are a mixture-of-experts layer's routed rows sorted by expert, with
`offsets[e]` the end of expert e's rows (the layout transformers'
`grouped_mm` takes); `weight` holds only this rank's experts, whose global
ids are `experts`. With the experts split over ranks, the ranks' results
sum to the product over all experts (see passes/experts.py).
"""

from __future__ import annotations

import torch

TARGET = "plait::expert_mm"


@torch.library.custom_op(TARGET, mutates_args=())
def expert_mm(
    rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    out = rows.new_zeros(rows.shape[0], weight.shape[2])
    ends = offsets.tolist()  # one device sync per call, not one per expert
    for j, expert in enumerate(experts.tolist()):
        start, end = (ends[expert - 1] if expert else 0), ends[expert]
        if end > start:
            torch.mm(rows[start:end], weight[j], out=out[start:end])
    return out


@expert_mm.register_fake
def _(rows, weight, offsets, experts):
    return rows.new_empty(rows.shape[0], weight.shape[2])
