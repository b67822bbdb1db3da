"""Fused backward kernels for the joint graph, where torch's trace unfused them.

Autograd picks an op's backward formula by its inputs: for plain tensors
`silu` differentiates with the `silu_backward` kernel (which computes in f32
inside, even for bf16), but for the functional tensors AOTAutograd traces
with, it takes the twice-differentiable form, five pointwise ops that each
round to the tensor's dtype. Eager training uses the kernel, so the joint
graph gets it back: each rule is (pattern, replacement) for
torch.fx.subgraph_rewriter.
"""

from __future__ import annotations

import torch
from torch.fx import subgraph_rewriter

aten = torch.ops.aten


def _silu_decomposed(grad, x):  # infinitely_differentiable_silu_backward, as traced
    sigmoid = aten.sigmoid.default(x)
    ones = aten.fill.Scalar(
        aten.empty_like.default(sigmoid, memory_format=torch.preserve_format), 1
    )
    inner = aten.add.Scalar(aten.mul.Tensor(x, aten.sub.Tensor(ones, sigmoid)), 1)
    return aten.mul.Tensor(grad, aten.mul.Tensor(sigmoid, inner))


def _silu_backward(grad, x):
    return aten.silu_backward.default(grad, x)


RULES = [(_silu_decomposed, _silu_backward)]


def fuse_backward(program: torch.export.ExportedProgram) -> int:
    """Rewrite the joint graph's unfused backward formulas into their kernels;
    returns how many were replaced."""
    from torch._guards import detect_fake_mode
    from torch.utils import _pytree as pytree

    graph_module = program.graph_module
    count = 0
    for pattern, replacement in RULES:
        for match in subgraph_rewriter.replace_pattern_with_filters(
            graph_module, pattern, replacement, ignore_literals=False
        ):
            for node in match.replacements:  # the importer reads each node's fake value
                values = pytree.tree_map(
                    lambda v: v.meta["val"] if isinstance(v, torch.fx.Node) else v, node.args
                )
                with detect_fake_mode(pytree.tree_leaves(values)):
                    node.meta["val"] = node.target(*values)
            count += 1
    graph_module.recompile()
    return count
