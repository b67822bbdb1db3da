"""Shared by the weight-compression passes: find the linear layers a glob
selects, add the compressed weights as new params, and replace each with a
call to a compressed kernel.

A linear layer is `aten::linear` with a [out, in] weight, or `aten::addmm` /
`aten::mm` with a [in, out] weight (GPT-2's Conv1D, and row-parallel layers
after `shard` split off their bias); the passes see every weight as [out, in].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Attribute, SSAValue
from xdsl.rewriter import InsertPoint, Rewriter

from ...ir.args import ArgsAttr, Operand
from ...ir.attrs import (
    MESH_ATTR,
    PLACEMENTS_ATTR,
    REPLICATE,
    Placement,
    PlacementsAttr,
    shard,
)
from ...ir.dtypes import IR_NAMES
from ...ir.errors import PlaitError
from ...ir.names import value_name
from ...ir.ops import CallOp, GenericCallOp, ParamOp
from ...ir.schema import argument_names
from ...ir.text import where
from ...ir.types import TensorType
from ...ir.weights import WeightStore
from ..base import function_blocks
from ..options import Globs, check_all_match
from ..shard.rules import local_type


@dataclass(frozen=True)
class Form:
    """Where a linear-like call keeps its input, weight and bias."""

    input: str
    weight: str
    bias: str | None
    transposed: bool  # the weight is [in, out]


FORMS = {
    "aten::linear": Form("input", "weight", "bias", transposed=False),
    "aten::addmm": Form("mat1", "mat2", "self", transposed=True),
    "aten::mm": Form("self", "mat2", None, transposed=True),
}


@dataclass
class Layer:
    op: CallOp
    param: ParamOp
    module: str  # the module path, e.g. model.layers.0.mlp.up_proj
    placement: Placement  # of the [out, in] weight on the (single) mesh axis
    parts: int  # ranks along that axis
    form: Form

    @property
    def input_position(self) -> int:
        """Where the activation is among the call's arguments."""
        return argument_names(self.op.target_name).index(self.form.input)


def _placement(param: ParamOp, transposed: bool) -> Placement:
    attr = param.attributes.get(PLACEMENTS_ATTR)
    placement = attr.data[0] if attr is not None and attr.data else REPLICATE
    if transposed and placement.kind == "shard":
        return shard(1 - placement.dim, placement.blocks)
    return placement


def _plain(op: CallOp) -> bool:
    """addmm with beta = alpha = 1: x @ W + b."""
    return op.arg("beta", 1) == 1 and op.arg("alpha", 1) == 1


def find_linears(module: ModuleOp, layers: Globs, pass_name: str) -> list[Layer]:
    """Linear-like calls (`FORMS`) whose weight is a 2-D param of a module
    matching one of the patterns in `layers`; a pattern matching no such layer
    is an error (a typo would otherwise compress nothing)."""
    mesh = module.attributes.get(MESH_ATTR)
    parts = mesh.size if mesh is not None else 1
    found, paths = [], set()
    for block in function_blocks(module):
        for op in block.ops:
            form = FORMS.get(op.target_name) if isinstance(op, CallOp) else None
            if form is None or not _plain(op):
                continue
            weight = op.input_of(op.arg(form.weight))
            param = weight.owner if weight is not None else None
            if not isinstance(param, ParamOp) or param.result.type.rank != 2:
                continue
            path = param.weight_name.removesuffix(".weight")
            paths.add(path)
            if layers.match(path):
                placement = _placement(param, form.transposed)
                found.append(Layer(op, param, path, placement, parts, form))
    check_all_match(layers, paths, "linear layer", f"{pass_name}{{layers={layers}}}")
    return found


def full_weights(store: WeightStore | None, layers: list[Layer], pass_name: str):
    """Each layer's whole (unsharded) weight as [out, in], or an error naming the layer."""
    out = {}
    for layer in layers:
        if store is None or store.is_meta(layer.param.weight_name):
            raise PlaitError(
                f"{where(layer.op)}: {pass_name} needs the weight of {layer.module}; compile "
                "a model with real weights (not on meta) or load its checkpoint first"
            )
        weight = store.get(layer.param.weight_name)
        out[layer.module] = weight.t() if layer.form.transposed else weight
    return out


def add_param(
    layer: Layer, suffix: str, tensor: torch.Tensor, store: WeightStore, placement=REPLICATE
) -> SSAValue:
    """A new weight `<module>.<suffix>` in the store and the program; a sharded
    placement gives each rank its slice."""
    name = f"{layer.module}.{suffix}"
    store.add(name, tensor)
    full = TensorType(tuple(tensor.shape), IR_NAMES[str(tensor.dtype).removeprefix("torch.")])
    op = ParamOp(name, local_type(full, placement, layer.parts))
    if placement.kind == "shard":
        op.attributes[PLACEMENTS_ATTR] = PlacementsAttr((placement,))
    op.location = layer.param.location
    op.result.name_hint = value_name(name.replace(".", "_"))
    Rewriter.insert_op(op, InsertPoint.before(layer.op))
    return op.result


def replace_linear(
    layer: Layer,
    target: str,
    before_bias: list[SSAValue],
    after_bias: list[SSAValue],
    constants: tuple,
    attributes: dict[str, Attribute],
) -> None:
    """linear(x, W, b) -> target(x, *before_bias, b, *after_bias, *constants)."""
    op, form = layer.op, layer.form
    bias = op.input_of(op.arg(form.bias)) if form.bias is not None else None
    operands = [op.input_of(op.arg(form.input)), *before_bias]
    args = [Operand(i) for i in range(len(operands))]
    if bias is not None:
        operands.append(bias)
    args.append(Operand(len(operands) - 1) if bias is not None else None)
    for value in after_bias:
        operands.append(value)
        args.append(Operand(len(operands) - 1))
    new = GenericCallOp(
        target, operands, ArgsAttr((*args, *constants), ()), [op.results[0].type], attributes
    )
    new.location = op.location
    new.results[0].name_hint = op.results[0].name_hint
    Rewriter.replace_op(op, new)
    if not layer.param.result.uses:
        Rewriter.erase_op(layer.param)
