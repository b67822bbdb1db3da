"""Kernels of expert parallelism (see passes/shard/experts.py).

`plait::expert_mm`: the grouped matrix product of the experts one rank holds.

    out[rows of expert e] = rows[rows of expert e] @ weight[j]   for e = experts[j]
    out[other rows] = 0

`rows` are a mixture-of-experts layer's routed rows sorted by expert, with
`offsets[e]` the end of expert e's rows (the layout transformers'
`grouped_mm` takes); `weight` holds only this rank's experts, whose global
ids are `experts`. With the experts split over ranks, the ranks' results
sum to the product over all experts.

`plait::expert_mm_backward`: its backward (a training step's), the same
rows: the gradients of this rank's experts' rows (zero elsewhere) and of its
slice of the weight.

    grad_rows[rows of e] = grad[rows of e] @ weight[j].T
    grad_weight[j] = rows[rows of e].T @ grad[rows of e]

`plait::expert_dispatch`: the same routed rows built from tokens split over
the ranks of a process group, by one all-to-all: every rank knows the whole
routing (`token_of_row`, `offsets`), holds `tokens` [T / n, dim] (rank r
the r-th block) and the experts [r E/n, (r+1) E/n). Each token row travels
once to each rank whose experts it was routed to; a rank gets the rows of
its own experts in their place and zeros elsewhere, ready for expert_mm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

TARGET = "plait::expert_mm"
BACKWARD = "plait::expert_mm_backward"
DISPATCH = "plait::expert_dispatch"


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


@torch.library.custom_op(BACKWARD, mutates_args=())
def expert_mm_backward(
    rows: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    grad: torch.Tensor,
    experts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_rows, grad_weight = torch.zeros_like(rows), torch.zeros_like(weight)
    ends = offsets.tolist()
    for j, expert in enumerate(experts.tolist()):
        start, end = (ends[expert - 1] if expert else 0), ends[expert]
        if end > start:  # the products of transformers' grouped_mm_fallback_backward
            torch.mm(grad[start:end], weight[j].T, out=grad_rows[start:end])
            torch.mm(rows[start:end].T, grad[start:end], out=grad_weight[j])
    return grad_rows, grad_weight


@expert_mm_backward.register_fake
def _(rows, weight, offsets, grad, experts):
    return torch.empty_like(rows), torch.empty_like(weight)


@torch.library.custom_op(DISPATCH, mutates_args=())
def expert_dispatch(
    tokens: torch.Tensor, token_of_row: torch.Tensor, offsets: torch.Tensor, group: str
) -> torch.Tensor:
    pg = _resolve_process_group(group)
    n, me = pg.size(), pg.rank()
    held, count = tokens.shape[0], token_of_row.shape[0]
    row = torch.arange(count, device=offsets.device, dtype=offsets.dtype)
    expert = torch.searchsorted(offsets, row, right=True)
    to_rank = expert // (offsets.shape[0] // n)  # whose experts compute the row
    from_rank = token_of_row // held  # whose token the row is
    sending = _grouped_by(torch.nonzero(from_rank == me).squeeze(1), to_rank, n)
    receiving = _grouped_by(torch.nonzero(to_rank == me).squeeze(1), from_rank, n)
    send = tokens[token_of_row[sending[0]] - me * held]
    received = tokens.new_empty(receiving[0].shape[0], tokens.shape[1])
    dist.all_to_all_single(received, send, receiving[1], sending[1], group=pg)
    out = tokens.new_zeros(count, tokens.shape[1])
    out[receiving[0]] = received
    return out


def _grouped_by(rows: torch.Tensor, rank: torch.Tensor, n: int) -> tuple[torch.Tensor, list[int]]:
    """`rows` ordered by rank[row] (in row order within a rank), and how many per rank."""
    rows = rows[torch.argsort(rank[rows], stable=True)]
    return rows, torch.bincount(rank[rows], minlength=n).tolist()


@expert_dispatch.register_fake
def _(tokens, token_of_row, offsets, group):
    return tokens.new_empty(token_of_row.shape[0], tokens.shape[1])
