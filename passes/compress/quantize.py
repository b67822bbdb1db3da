"""quantize{method=easyquant,bits=4,group=128,outlier-sigma=2.7,layers=GLOBS,size-budget=F}

Weight-only quantization of linear layers (the math is in `easyquant`): each
selected `aten::linear` becomes `plait::quant_linear` (see
`customops.quant_linear`) reading new weights the pass adds to the program's
WeightStore, and carries a `quant` attribute with the scheme, the outlier
fraction and the relative reconstruction error:

    %y = plait.call "plait::quant_linear"(%x, %qweight, %scales, none, %idx, %val, 4)
           {quant = #plait.quant<method = "easyquant", bits = 4, group = 128, ...>}

`layers` are globs on module paths (`model.layers.*.mlp.*`; several separated
by commas). `size-budget=F` lets an integer program (HiGHS) pick 4 or 8 bits,
or the original precision, per layer so the layers' bytes are at most F times
their original bytes with the least total squared error (`bit_allocation`);
`bits` is then ignored.

After `shard` it quantizes the full weight and gives each rank its slice, so
the quantized model is the same at every tensor-parallel degree. A
row-parallel layer's scale groups must not straddle the shard boundaries:
its per-rank input width must be a multiple of `group` (checked, with the
groups that would work in the error).

A layer whose (per-rank) shape PyTorch's weight-only kernels cannot take
(`quant_linear.kernel_misfit`: int4 wants output features divisible by 16 and
scale groups of 32-256 features, int8 input features divisible by 16) runs
dequantize + GEMM on the same quantized weights; the pass warns, naming the
layers and their sizes.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp

from ...customops import quant_linear as kernel
from ...ir.attrs import REPLICATE, Placement, QuantAttr, shard
from ...ir.errors import PlaitError
from ...ir.libraries import require_library
from ...ir.text import where
from ..base import Pass, PassContext
from ..options import Globs, OptionError
from .bit_allocation import allocate
from .easyquant import DEFAULT_SIGMA, Quantized, easyquant, rtn
from .linear_rewrite import (
    Layer,
    add_param,
    find_linears,
    full_weights,
    replace_linear,
)

TARGET = "plait::quant_linear"


class QuantizeError(PlaitError):
    pass


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
        size = shape[placement.dim]
        owner_of = torch.empty(size, dtype=torch.long)  # rank and local position of each
        local_of = torch.empty(size, dtype=index.dtype)  # row (or column) along the split
        for rank in range(parts):
            at = 0
            for start, length in placement.ranges(size, parts, rank):
                owner_of[start : start + length] = rank
                local_of[start : start + length] = torch.arange(at, at + length)
                at += length
        owner = owner_of[index[placement.dim].long()]
        local = index.clone()
        local[placement.dim] = local_of[index[placement.dim].long()]
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


def _rank_shape(layer: Layer, shape) -> tuple[int, int]:
    """The [out, in] part of a layer's weight that each rank holds."""
    dims = list(shape)
    if layer.placement.kind == "shard":
        dims[layer.placement.dim] //= layer.parts
    return tuple(dims)


class QuantMethod(enum.Enum):
    EASYQUANT = "easyquant"  # outliers kept aside, the rest scaled to fit (easyquant.py)
    RTN = "rtn"  # round to nearest


@dataclass(frozen=True)
class Quantize(Pass):
    name = "quantize"
    summary = "weight-only int8/int4 quantization of linear layers (EasyQuant or RTN)"

    method: QuantMethod = QuantMethod.EASYQUANT
    bits: int = 8
    group: int = 0
    outlier_sigma: float = DEFAULT_SIGMA
    layers: Globs = Globs()
    size_budget: float | None = None  # share of the layers' bytes to keep, bits chosen by an ILP

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in (4, 8):
            raise OptionError(f"bits must be 4 or 8, not {self.bits}", "bits")
        if self.group < 0 or self.group % 2:
            raise OptionError(
                f"group must be 0 (per output channel) or even, not {self.group}", "group"
            )
        if self.size_budget is not None and not 0 < self.size_budget <= 1:
            raise OptionError(
                f"size-budget is the share of the layers' bytes to keep, in (0, 1], "
                f"not {self.size_budget:g}",
                "size_budget",
            )

    def _quantize(self, weight: torch.Tensor, bits: int) -> Quantized:
        if self.method is QuantMethod.RTN:
            return rtn(weight, bits, self.group)
        return easyquant(weight, bits, self.group, self.outlier_sigma)

    def _check(self, layer: Layer, weight: torch.Tensor) -> None:
        cols = weight.shape[1]
        if self.group and cols % self.group:
            raise QuantizeError(
                f"{where(layer.op)}: group={self.group} does not divide the {cols} input "
                f"features of {layer.module}; use a group that divides {cols}"
            )
        if layer.placement == shard(1):
            local = cols // layer.parts
            if local % 2 or (self.group and local % self.group):
                fits = [g for g in range(2, min(local, 257), 2) if local % g == 0][-3:]
                raise QuantizeError(
                    f"{where(layer.op)}: {layer.module} is row-parallel over {layer.parts} "
                    f"ranks ({local} input features each), so group={self.group or cols} would "
                    f"straddle shard boundaries; use a group that divides {local} "
                    f"({', '.join(map(str, fits))}) or 0 (per output channel)"
                )

    def _rewrite(self, layer: Layer, q: Quantized, weight: torch.Tensor, store) -> None:
        p = layer.placement
        stored = kernel.pack_int4(q.q) if q.bits == 4 else q.q
        scales_placement = p if p.dim == 0 or q.scales.shape[1] > 1 else REPLICATE
        buckets = shard(0) if p.kind == "shard" else REPLICATE  # one bucket per rank
        index, value = _bucket_outliers(q, p, layer.parts, weight.shape)
        attrs = {
            "quant": QuantAttr.make(
                method=self.method.value,
                bits=q.bits,
                group=self.group,
                outlier_sigma=self.outlier_sigma if self.method is QuantMethod.EASYQUANT else 0.0,
                outliers=round(q.outlier_fraction, 6),
                error=round(q.relative_error(weight), 6),
            )
        }
        replace_linear(
            layer,
            TARGET,
            [
                add_param(layer, "qweight", stored, store, p),
                add_param(layer, "scales", q.scales, store, scales_placement),
            ],
            [
                add_param(layer, "outlier_index", index, store, buckets),
                add_param(layer, "outlier_value", value, store, buckets),
            ],
            (q.bits,),
            attrs,
        )

    def _warn_misfits(self, layers, weights, chosen) -> None:
        """One warning naming the layers the weight-only kernels cannot take, by reason."""
        misfits: dict[str, dict[str, str]] = {}  # reason -> module -> its sizes
        for layer in layers:
            bits = chosen[layer.module]
            if bits not in (4, 8):
                continue
            out, cols = _rank_shape(layer, weights[layer.module].shape)
            reason = kernel.kernel_misfit(bits, out, cols, cols // self.group if self.group else 1)
            if reason is not None:
                rank = " per rank" if layer.placement.kind == "shard" else ""
                misfits.setdefault(reason, {})[layer.module] = (
                    f"{layer.module} ({out} x {cols}{rank})"
                )
        if misfits:
            count = sum(len(m) for m in misfits.values())
            details = "; ".join(f"{r}: {', '.join(m.values())}" for r, m in misfits.items())
            warnings.warn(
                f"quantize: {count} layer(s) run dequantize + GEMM on their quantized weights, "
                f"as the weight-only kernels cannot take their shapes ({details})",
                stacklevel=3,
            )

    def _bits(self, layers, weights, results) -> dict[str, int]:
        """Per layer: the bits to use (the original dtype's bits: keep it)."""
        if self.size_budget is None:
            return {layer.module: self.bits for layer in layers}
        candidates, original = {}, 0
        for module in dict.fromkeys(layer.module for layer in layers):  # once per weight
            w = weights[module]
            keep = w.numel() * w.element_size()
            original += keep
            options = {w.element_size() * 8: (keep, 0.0)}
            for bits in (4, 8):
                q = results.setdefault((module, bits), self._quantize(w, bits))
                error = float(((q.dequantize() - w.float()) ** 2).sum())
                options[bits] = (quantized_bytes(q), error)
            candidates[module] = options
        return allocate(candidates, int(self.size_budget * original)).bits

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        layers = find_linears(op, self.layers, "quantize")
        store = ctx.weights if isinstance(ctx, PassContext) else None
        weights = full_weights(store, layers, "quantize")
        for layer in layers:
            self._check(layer, weights[layer.module])
        results: dict[tuple[str, int], Quantized] = {}
        chosen = self._bits(layers, weights, results)
        self._warn_misfits(layers, weights, chosen)
        for layer in layers:
            bits = chosen[layer.module]
            if bits not in (4, 8):
                continue  # kept in its original precision
            key = (layer.module, bits)  # a weight several functions read is quantized once
            if key not in results:
                results[key] = self._quantize(weights[layer.module], bits)
            self._rewrite(layer, results[key], weights[layer.module], store)
        if layers:
            require_library(op, kernel.__name__)
