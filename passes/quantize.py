"""quantize{method=easyquant,bits=4,group=128,outlier-sigma=2.7,layers=GLOBS,size-budget=F}

Weight-only quantization of linear layers (the math is in `easyquant`): each
selected `aten::linear` becomes `plait::quant_linear` (see
`kernels.quant_linear`) reading new weights the pass adds to the program's
WeightStore, and carries a `quant` attribute with the scheme, the outlier
fraction and the relative reconstruction error:

    %y = plait.call "plait::quant_linear"(%x, %qweight, %scales, none, %idx, %val, 4)
           {quant = #plait.quant<method = "easyquant", bits = 4, group = 128, ...>}

`layers` are globs on module paths (`model.layers.*.mlp.*`; several separated
by commas). `size-budget=F` lets z3 pick 4 or 8 bits, or the original
precision, per layer so the layers' bytes are at most F times their original
bytes with the least total squared error (`bit_allocation`); `bits` is then
ignored.

After `shard` it quantizes the full weight and gives each rank its slice, so
the quantized model is the same at every tensor-parallel degree. A
row-parallel layer's scale groups must not straddle the shard boundaries:
its per-rank input width must be a multiple of `group` (checked, with the
groups that would work in the error).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from xdsl.context import Context
from xdsl.dialects.builtin import ArrayAttr, ModuleOp, StringAttr
from xdsl.rewriter import InsertPoint, Rewriter

from ..ir.args import ArgsAttr, Operand
from ..ir.attrs import (
    LIBRARIES_ATTR,
    MESH_ATTR,
    PLACEMENTS_ATTR,
    REPLICATE,
    Placement,
    PlacementsAttr,
    QuantAttr,
    shard,
)
from ..ir.dtypes import IR_NAMES
from ..ir.errors import PlaitError
from ..ir.ops import GenericCallOp, LinearOp, ParamOp
from ..ir.text import where
from ..ir.types import TensorType
from ..kernels import quant_linear as kernel
from .base import Pass, PassContext, function_blocks
from .bit_allocation import allocate
from .easyquant import DEFAULT_SIGMA, Quantized, easyquant, rtn
from .shard_rules import local_type

LIBRARY = kernel.__name__
TARGET = "plait::quant_linear"


class QuantizeError(PlaitError):
    pass


@dataclass
class _Layer:
    op: LinearOp
    param: ParamOp
    module: str
    placement: Placement  # of the weight on the (single) mesh axis
    parts: int  # ranks along that axis

    @property
    def weight_type(self) -> TensorType:
        return self.param.result.type


def _placement(param: ParamOp) -> Placement:
    attr = param.attributes.get(PLACEMENTS_ATTR)
    return attr.data[0] if attr is not None and attr.data else REPLICATE


def _matches(module: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(module, g) for g in globs)


def quantized_bytes(q: Quantized) -> int:
    """Bytes the layer's weights take: values, scales and outliers."""
    values = q.q.numel() * q.bits // 8
    outliers = q.outlier_value.numel() * (q.outlier_value.element_size() + 2 * 4)
    return values + q.scales.numel() * 4 + outliers


def _bucket_outliers(q: Quantized, placement: Placement, parts: int, shape):
    """Outliers as [parts, 2, k] local (row, column) and [parts, k] values, one
    bucket per rank's slice, padded with zeros (which add nothing)."""
    index, value = q.outlier_index, q.outlier_value
    if placement.kind == "shard":
        size = shape[placement.dim] // parts
        owner = index[placement.dim] // size
        local = index.clone()
        local[placement.dim] -= owner * size
    else:
        owner, local = torch.zeros(index.shape[1], dtype=torch.long), index
        parts = 1
    counts = torch.bincount(owner, minlength=parts)
    width = int(counts.max()) if counts.numel() else 0
    idx = torch.zeros(parts, 2, width, dtype=torch.int32)
    val = torch.zeros(parts, width, dtype=value.dtype)
    for rank in range(parts):
        mine = owner == rank
        n = int(mine.sum())
        idx[rank, :, :n] = local[:, mine].to(torch.int32)
        val[rank, :n] = value[mine]
    return idx, val


@dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    summary = "weight-only int8/int4 quantization of linear layers (EasyQuant or RTN)"

    method: str = "easyquant"
    bits: int = 8
    group: int = 0
    outlier_sigma: float = DEFAULT_SIGMA
    layers: str = "*"
    size_budget: float = 0.0

    def __post_init__(self):
        if self.method not in ("easyquant", "rtn"):
            raise ValueError(f"method must be easyquant or rtn, not '{self.method}'")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")
        if self.group < 0 or self.group % 2:
            raise ValueError(f"group must be 0 (per output channel) or even, not {self.group}")

    # ---- choosing --------------------------------------------------------------

    def _layers(self, module: ModuleOp) -> list[_Layer]:
        mesh = module.attributes.get(MESH_ATTR)
        parts = mesh.size if mesh is not None else 1
        globs = [g.strip() for g in self.layers.split(",") if g.strip()]
        found = []
        for block in function_blocks(module):
            for op in block.ops:
                if not isinstance(op, LinearOp) or op.target_name != "aten::linear":
                    continue
                weight = op.input_of(op.arg("weight"))
                param = weight.owner if weight is not None else None
                if not isinstance(param, ParamOp) or param.result.type.rank != 2:
                    continue
                path = param.weight_name.removesuffix(".weight")
                if _matches(path, globs):
                    found.append(_Layer(op, param, path, _placement(param), parts))
        return found

    def _quantize(self, weight: torch.Tensor, bits: int) -> Quantized:
        if self.method == "rtn":
            return rtn(weight, bits, self.group)
        return easyquant(weight, bits, self.group, self.outlier_sigma)

    def _check(self, layer: _Layer, weight: torch.Tensor) -> None:
        cols = weight.shape[1]
        if self.group and cols % self.group:
            raise QuantizeError(
                f"{where(layer.op)}: group={self.group} does not divide the {cols} input "
                f"features of {layer.module}; use a group that divides {cols}"
            )
        if layer.placement == shard(1):
            local = cols // layer.parts
            size = self.group or cols
            if local % 2 or (self.group and local % self.group):
                fits = [g for g in range(2, min(local, 257), 2) if local % g == 0][-3:]
                raise QuantizeError(
                    f"{where(layer.op)}: {layer.module} is row-parallel over {layer.parts} "
                    f"ranks ({local} input features each), so group={size} would straddle "
                    f"shard boundaries; use a group that divides {local} "
                    f"({', '.join(map(str, fits))}) or 0 (per output channel)"
                )

    # ---- rewriting -------------------------------------------------------------

    def _param(self, layer: _Layer, suffix: str, tensor, store, placement=REPLICATE):
        name = f"{layer.module}.{suffix}"
        store.add(name, tensor)
        full = TensorType(tuple(tensor.shape), IR_NAMES[str(tensor.dtype).removeprefix("torch.")])
        op = ParamOp(name, local_type(full, placement, layer.parts))
        if placement.kind == "shard":
            op.attributes[PLACEMENTS_ATTR] = PlacementsAttr((placement,))
        op.location = layer.param.location
        op.result.name_hint = name.replace(".", "_")
        Rewriter.insert_op(op, InsertPoint.before(layer.op))
        return op.result

    def _rewrite(self, layer: _Layer, q: Quantized, weight: torch.Tensor, store) -> None:
        p = layer.placement
        stored = kernel.pack_int4(q.q) if q.bits == 4 else q.q
        scales_placement = p if p == shard(0) or q.scales.shape[1] > 1 else REPLICATE
        buckets = shard(0) if p.kind == "shard" else REPLICATE  # one bucket per rank
        index, value = _bucket_outliers(q, p, layer.parts, weight.shape)
        op = layer.op
        bias = op.input_of(op.arg("bias"))
        operands = [
            op.input_of(op.arg("input")),
            self._param(layer, "qweight", stored, store, p),
            self._param(layer, "scales", q.scales, store, scales_placement),
        ]
        bias_arg = None
        if bias is not None:
            operands.append(bias)
            bias_arg = Operand(3)
        operands.append(self._param(layer, "outlier_index", index, store, buckets))
        operands.append(self._param(layer, "outlier_value", value, store, buckets))
        n = len(operands)
        args = (
            Operand(0),
            Operand(1),
            Operand(2),
            bias_arg,
            Operand(n - 2),
            Operand(n - 1),
            q.bits,
        )
        attrs = {
            "quant": QuantAttr.make(
                method=self.method,
                bits=q.bits,
                group=self.group,
                outlier_sigma=self.outlier_sigma if self.method == "easyquant" else 0.0,
                outliers=round(q.outlier_fraction, 6),
                error=round(q.relative_error(weight), 6),
            )
        }
        new = GenericCallOp(TARGET, operands, ArgsAttr(args, ()), [op.results[0].type], attrs)
        new.location = op.location
        new.results[0].name_hint = op.results[0].name_hint
        Rewriter.replace_op(op, new)
        if not layer.param.result.uses:
            Rewriter.erase_op(layer.param)

    # ---- the pass --------------------------------------------------------------

    def _bits(self, layers, weights, results) -> dict[str, int]:
        """Per layer: the bits to use (the original dtype's bits: keep it)."""
        if not self.size_budget:
            return {layer.module: self.bits for layer in layers}
        candidates, original = {}, 0
        for layer in layers:
            w = weights[layer.module]
            keep = w.numel() * w.element_size()
            original += keep
            options = {w.element_size() * 8: (keep, 0.0)}
            for bits in (4, 8):
                q = results.setdefault((layer.module, bits), self._quantize(w, bits))
                error = float(((q.dequantize() - w.float()) ** 2).sum())
                options[bits] = (quantized_bytes(q), error)
            candidates[layer.module] = options
        return allocate(candidates, int(self.size_budget * original)).bits

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        layers = self._layers(op)
        store = ctx.weights if isinstance(ctx, PassContext) else None
        weights = {}
        for layer in layers:
            if store is None or store.is_meta(layer.param.weight_name):
                raise QuantizeError(
                    f"{where(layer.op)}: quantize needs the weight of {layer.module}; compile "
                    "a model with real weights (not on meta) or load its checkpoint first"
                )
            weights[layer.module] = store.get(layer.param.weight_name)
            self._check(layer, weights[layer.module])
        results: dict[tuple[str, int], Quantized] = {}
        chosen = self._bits(layers, weights, results)
        for layer in layers:
            bits = chosen[layer.module]
            if bits not in (4, 8):
                continue  # kept in its original precision
            key = (layer.module, bits)
            q = results.get(key) or self._quantize(weights[layer.module], bits)
            self._rewrite(layer, q, weights[layer.module], store)
        if layers:
            libraries = op.attributes.get(LIBRARIES_ATTR)
            names = {a.data for a in libraries.data} if libraries is not None else set()
            op.attributes[LIBRARIES_ATTR] = ArrayAttr(
                [StringAttr(m) for m in sorted(names | {LIBRARY})]
            )
