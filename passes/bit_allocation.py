"""Bits per layer under a size budget, chosen by z3.

Each layer has candidates (bits -> bytes, error); pick one per layer so the
total bytes fit the budget and the total error is smallest:

    choice = allocate({"mlp.up": {4: (b4, e4), 8: (b8, e8), 16: (b16, 0.0)}, ...}, budget)
    choice.bits["mlp.up"], choice.status   # "optimal" or "infeasible"

Errors are squared reconstruction errors ||Q(W) - W||^2, which add over
layers. z3's optimizer is exact at the sizes this meets (a few hundred
layers); `timeout_ms` bounds it, after which every layer gets its
smallest choice (status "fallback").
"""

from __future__ import annotations

from dataclasses import dataclass

import z3

from ..ir.errors import PlaitError


class BudgetError(PlaitError):
    pass


@dataclass
class Allocation:
    bits: dict[str, int]
    status: str  # "optimal" | "fallback" (time limit hit: every layer at its fewest bytes)
    bytes: int
    error: float


_ERROR_SCALE = 1e9  # z3 optimizes integers exactly: errors in units of 1e-9 of the largest


def allocate(
    candidates: dict[str, dict[int, tuple[int, float]]], budget: int, timeout_ms: int = 10_000
) -> Allocation:
    smallest = sum(min(b for b, _ in options.values()) for options in candidates.values())
    if smallest > budget:
        raise BudgetError(
            f"size budget {budget} bytes is below the smallest choice, {smallest} bytes "
            "(every layer at its fewest bits); raise size_budget"
        )
    top = max((e for options in candidates.values() for _, e in options.values()), default=0.0)
    unit = (top or 1.0) / _ERROR_SCALE
    opt = z3.Optimize()
    opt.set(timeout=timeout_ms)
    picks: dict[tuple[str, int], z3.BoolRef] = {}
    size, error = [], []
    for layer, options in candidates.items():
        chosen = [z3.Bool(f"{layer}@{bits}") for bits in options]
        picks.update({(layer, bits): var for bits, var in zip(options, chosen)})
        opt.add(z3.PbEq([(v, 1) for v in chosen], 1))
        for (nbytes, err), var in zip(options.values(), chosen):
            size.append(z3.If(var, nbytes, 0))
            error.append(z3.If(var, round(err / unit), 0))
    opt.add(z3.Sum(size) <= budget)
    opt.minimize(z3.Sum(error))
    if opt.check() == z3.sat:
        model = opt.model()
        bits = {
            layer: next(b for b in options if z3.is_true(model.eval(picks[(layer, b)])))
            for layer, options in candidates.items()
        }
        status = "optimal"
    else:
        bits = {
            layer: min(options, key=lambda b: options[b][0])
            for layer, options in candidates.items()
        }
        status = "fallback"
    return Allocation(
        bits=bits,
        status=status,
        bytes=sum(candidates[layer][b][0] for layer, b in bits.items()),
        error=sum(candidates[layer][b][1] for layer, b in bits.items()),
    )
