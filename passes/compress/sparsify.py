"""sparsify{method=gqsa,group=16,sparsity=0.5,bits=4,layers=GLOBS,importance=magnitude}

GQSA group sparsity (the math is in `gqsa`): each selected `aten::linear`
becomes `plait::gqsa_linear` (see `customops.gqsa`) reading the block-sparse
int4 weight the pass adds to the WeightStore, with a `sparsity` attribute:

    %y = plait.call "plait::gqsa_linear"(%x, %values, %scales, %blocks, none, 16)
           {sparsity = #plait.sparsity<group = 16, sparsity = 0.5, error = 0.43>}

`importance=activation` weighs each weight by the norm of its input feature
(`activation_stats`) over the sample inputs given to
`plait.compile(..., calibration=[...])` (it runs the program, so it goes
before `shard`).

After `shard`, a column-parallel layer's rows split across ranks as they are;
a row-parallel layer keeps the same number of groups in each rank's columns
(block columns stored relative to the rank's slice), so every rank does the
same work. The rank's slice must hold whole groups (checked).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp

from ...customops import gqsa as kernel
from ...ir.attrs import SparsityAttr, shard
from ...ir.errors import PlaitError
from ...ir.libraries import require_library
from ...ir.text import where
from ..base import Pass, PassContext
from ..options import Globs, OptionError
from .activation_stats import input_norms
from .gqsa import gqsa
from .linear_rewrite import add_param, find_linears, full_weights, replace_linear

TARGET = "plait::gqsa_linear"


class SparsifyError(PlaitError):
    pass


class SparseMethod(enum.Enum):
    GQSA = "gqsa"  # groups of G weights pruned whole, survivors int4 (gqsa.py)


class Importance(enum.Enum):
    MAGNITUDE = "magnitude"  # a group's weights' squared sum
    ACTIVATION = "activation"  # each weight times its input feature's norm (calibration)


@dataclass(frozen=True)
class Sparsify(Pass):
    name = "sparsify"
    summary = "GQSA: prune 1xG weight groups, int4 survivors, block-sparse kernel"

    method: SparseMethod = SparseMethod.GQSA
    group: int = 16
    sparsity: float = 0.5
    bits: int = 4
    layers: Globs = Globs()
    importance: Importance = Importance.MAGNITUDE

    def __post_init__(self):
        super().__post_init__()
        checks = [
            ("bits", self.bits == 4, "GQSA stores 4-bit groups; bits must be 4"),
            ("group", self.group in (8, 16, 32, 64), "group must be 8, 16, 32 or 64"),
            ("sparsity", 0.0 <= self.sparsity < 1.0, "sparsity is the pruned fraction, in [0, 1)"),
        ]
        for option, ok, rule in checks:
            if not ok:
                raise OptionError(f"{rule}, not {getattr(self, option)!r}", option)

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        layers = find_linears(op, self.layers, "sparsify")
        store = ctx.weights if isinstance(ctx, PassContext) else None
        weights = full_weights(store, layers, "sparsify")
        norms = {}
        if self.importance is Importance.ACTIVATION and layers:
            samples = ctx.sample_inputs if isinstance(ctx, PassContext) else []
            if not samples or ctx.run_program is None:
                raise SparsifyError(
                    "sparsify{importance=activation} needs calibration inputs: "
                    "plait.compile(..., calibration=[inputs, ...])"
                )
            inputs = {layer.op: layer.input_position for layer in layers}
            norms = input_norms(op, store, samples, inputs, ctx.run_program)
        pruned = {}
        for layer in layers:
            weight = weights[layer.module]
            row_parallel = layer.placement == shard(1)
            segments = layer.parts if row_parallel else 1
            if weight.shape[1] % (self.group * segments):
                where_ = f" per rank ({weight.shape[1] // segments})" if row_parallel else ""
                raise SparsifyError(
                    f"{where(layer.op)}: the input features of {layer.module}{where_} do not "
                    f"split into groups of {self.group}; use a group that divides them"
                )
            if layer.module not in pruned:  # a weight several functions read is pruned once
                importance = norms.get(layer.op)
                pruned[layer.module] = gqsa(
                    weight, self.group, self.sparsity, self.bits, segments, importance
                )
            s = pruned[layer.module]
            placement = layer.placement  # rows, or each rank's kept groups
            attrs = {
                "sparsity": SparsityAttr.make(
                    group=self.group,
                    sparsity=self.sparsity,
                    bits=self.bits,
                    error=round(s.relative_error(weight), 6),
                )
            }
            replace_linear(
                layer,
                TARGET,
                [
                    add_param(layer, "values", s.values, store, placement),
                    add_param(layer, "scales", s.scales, store, placement),
                    add_param(layer, "blocks", s.blocks, store, placement),
                ],
                [],
                (self.group,),
                attrs,
            )
        if layers:
            require_library(op, kernel.__name__)
