"""Analysis: time of a collective by the alpha-beta model, over the link its
mesh axis maps to.

For p ranks, a link of latency alpha (per step) and bandwidth beta (bytes/s
per rank and direction), and n bytes:

    all_reduce   ring: 2(p-1)(alpha + n/(p beta))     tree: 2 ceil(log2 p) alpha + 2 n / beta
    all_gather   ring: (p-1)(alpha + n_out/(p beta))
    reduce_scatter    (p-1)(alpha + n_in/(p beta))
    all_to_all        (p-1)(alpha + n_in/(p beta))
    send (one message to one peer)    alpha + n/beta

An all-reduce takes the faster of ring and tree, as NCCL does. Mesh axes are
listed outermost first; an axis spans the devices of itself and every axis
inside it, and uses the innermost link that joins that many devices.
"""

from __future__ import annotations

import math

import sympy

from ..hardware import Hardware, Link
from ..ir.args import Tag
from ..ir.dtypes import is_floating
from ..ir.ops import (
    AllGatherOp,
    AllReduceOp,
    AllToAllOp,
    CallOp,
    CollectiveOp,
    GatherIntoOp,
    ReduceScatterOp,
)
from .op_cost import Expr, _type


def axis_links(mesh: dict[str, int], hardware: Hardware) -> dict[str, tuple[int, Link]]:
    """Mesh axis -> (its size, the link it runs over)."""
    out, span = {}, 1
    for name, size in reversed(list(mesh.items())):
        span *= size
        out[name] = (size, hardware.link_for(span))
    return out


def ring_steps(p: int, n: Expr, link: Link) -> Expr:
    return (p - 1) * (link.latency + n / (p * link.bandwidth))


def message_time(n: float, link: Link) -> float:
    """Seconds from a send's start until its receiver holds the n bytes."""
    return link.latency + n / link.bandwidth


def all_reduce_time(p: int, n: Expr, link: Link) -> Expr:
    if p == 1:
        return sympy.Integer(0)
    ring = 2 * ring_steps(p, n, link)
    tree = 2 * math.ceil(math.log2(p)) * link.latency + 2 * n / link.bandwidth
    return sympy.Min(ring, tree)


def comm_axis(op) -> str | None:
    """The mesh axis an op communicates over: a collective's, or that of a
    kernel taking a process group (`group("ep")`, as plait::expert_dispatch)."""
    if isinstance(op, CollectiveOp):
        return op.axis.data
    if isinstance(op, CallOp):
        return next(
            (a.value for a in op.args.args if isinstance(a, Tag) and a.kind == "group"), None
        )
    return None


def collective_time(op, links: dict[str, tuple[int, Link]]) -> Expr:
    p, link = links[comm_axis(op)]
    if isinstance(op, CallOp):  # a routed all-to-all: each rank sends its 1/p of the rows
        return ring_steps(p, sympy.sympify(_type(op.results[0]).nbytes) / p, link)
    n_in = sympy.sympify(_type(op.input).nbytes)
    if isinstance(op, AllReduceOp):
        return all_reduce_time(p, n_in, link)
    if p == 1:
        return sympy.Integer(0)
    if isinstance(op, AllGatherOp):
        return ring_steps(p, sympy.sympify(_type(op.result).nbytes), link)
    if isinstance(op, GatherIntoOp):  # every piece, padding and all
        return ring_steps(p, p * n_in, link)
    if (
        isinstance(op, ReduceScatterOp)
        and link.scatter_as_all_reduce
        and is_floating(_type(op.input).dtype)
    ):
        return all_reduce_time(p, n_in, link)  # as plait runs it there (see Link)
    if isinstance(op, (ReduceScatterOp, AllToAllOp)):
        return ring_steps(p, n_in, link)
    raise TypeError(f"no cost model for {op.name}")
