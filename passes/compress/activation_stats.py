"""Analysis: statistics of the activations that reach each linear layer, from
running the program on calibration inputs (the weight-compression passes
weigh weights by them).

    norms = input_norms(module, weights, [(ids, mask), ...], {op: 0})  # op -> its input's position
    norms[op]      # float64 [in_features]: sqrt(sum over tokens of x_j^2)

Runs the unsharded program with torch.fx's Interpreter, reading the input of
each asked-for op as it executes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation

from ...ir.attrs import MESH_ATTR
from ...ir.errors import PlaitError
from ...ir.weights import WeightStore


class CalibrationError(PlaitError):
    pass


def input_norms(
    module: ModuleOp, weights: WeightStore, batches: list[tuple], ops: dict[Operation, int]
) -> dict[Operation, torch.Tensor]:
    from ...backends.fx import OP_META, build_program

    if MESH_ATTR in module.attributes:
        raise CalibrationError(
            "calibration runs the unsharded program: put the pass that uses it before shard"
        )
    program = build_program(module, weights, fast=False)
    sums: dict[Operation, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            op = node.meta.get(OP_META)
            if op in ops and node.op == "call_function" and node.target is not operator.getitem:
                arg = node.args[ops[op]]
                x = self.env[arg] if isinstance(arg, torch.fx.Node) else None
                if isinstance(x, torch.Tensor):
                    squares = x.detach().double().reshape(-1, x.shape[-1]).pow(2).sum(0)
                    sums[op] = sums.get(op, 0) + squares
            return super().run_node(node)

    with torch.inference_mode():
        for batch in batches:
            Recorder(program.graph_module).run(*batch)
    return {op: total.sqrt() for op, total in sums.items()}
