"""Analysis: which ops may be removed or merged.

An ATen call is pure unless it draws random numbers (two calls differ, and
removing one shifts the generator) or returns nothing (it exists for an effect,
such as an assert). Parameters are pure; collectives are deterministic and
issued identically by every rank, so they are removable but never merged.
"""

from __future__ import annotations

from xdsl.ir import Operation

from ..ir.ops import CallOp, CollectiveOp, ParamOp, WaitOp
from ..ir.targets import split_name

RANDOM = {
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
    "bernoulli", "bernoulli_", "normal", "normal_", "uniform_", "multinomial",
    "native_dropout", "exponential_", "geometric_", "poisson", "rrelu",
}


def is_random(op: Operation) -> bool:
    if not isinstance(op, CallOp):
        return False
    name = split_name(op.target_name)[1]
    if name == "dropout":  # random only in training mode
        return op.arg("train") is not False
    return name in RANDOM


def is_removable(op: Operation) -> bool:
    """May the op be erased when its results are unused?"""
    if isinstance(op, (ParamOp, CollectiveOp, WaitOp)):
        return True
    if isinstance(op, CallOp):
        return bool(op.results) and not is_random(op)
    return False


def is_mergeable(op: Operation) -> bool:
    """May two identical ops be merged into one?"""
    if isinstance(op, ParamOp):
        return True
    if isinstance(op, CallOp):
        return bool(op.results) and not is_random(op)
    return False
