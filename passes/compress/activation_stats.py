"""Activation statistics: the norms of the inputs that reach each linear layer,
over sample inputs (the weight-compression passes weigh weights by them).

    norms = input_norms(module, weights, [(ids, mask), ...], {op: 0}, run_program)
    norms[op]      # float64 [in_features]: sqrt(sum over tokens of x_j^2)

`run_program` builds and runs the unsharded program, showing each asked-for
op's arguments as it executes (the PassContext's, from `plait.compile`).
"""

from __future__ import annotations

import torch
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation

from ...ir.attrs import MESH_ATTR
from ...ir.errors import PlaitError
from ...ir.weights import WeightStore
from ..base import ProgramRunner


class ActivationStatsError(PlaitError):
    pass


def input_norms(
    module: ModuleOp,
    weights: WeightStore,
    batches: list[tuple],
    ops: dict[Operation, int],
    run_program: ProgramRunner,
) -> dict[Operation, torch.Tensor]:
    """op -> the norm of each feature of its input at `ops[op]`, over all tokens of `batches`."""
    if MESH_ATTR in module.attributes:
        raise ActivationStatsError(
            "activation statistics run the unsharded program: put the pass that uses them "
            "before shard"
        )
    sums: dict[Operation, torch.Tensor] = {}

    def squares_of(op: Operation, position: int):
        def observe(args: tuple) -> None:
            x = args[position]
            if isinstance(x, torch.Tensor):
                squares = x.detach().double().reshape(-1, x.shape[-1]).pow(2).sum(0)
                sums[op] = sums.get(op, 0) + squares

        return observe

    run_program(module, weights, batches, {op: squares_of(op, i) for op, i in ops.items()})
    return {op: total.sqrt() for op, total in sums.items()}
