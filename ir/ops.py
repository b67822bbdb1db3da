"""plait operations.

Weights enter a program as named parameters:

    %w = plait.param "model.layers.0.mlp.up_proj.weight" : !plait.tensor<[128, 64], f32>

Every ATen (or custom) operator call keeps its target and its arguments as
torch.export recorded them (see `args`). Calls that passes reason about have
typed ops, one per family; everything else is `plait.call`:

    %y = plait.linear "aten::linear"(%x, %w, none) : !plait.tensor<[batch, seq, 128], f32>
    %v, %i = plait.call "aten::topk"(%y, 2) : (!plait.tensor<...>, !plait.tensor<...>)

Collectives are first-class. `async` ones yield an `!plait.async` value that
`plait.wait` turns back into a tensor, so a schedule can overlap them:

    %s = plait.all_reduce %y {axis = "tp", reduce = "sum", async} : ... -> !plait.async<...>
    %r = plait.wait %s : !plait.async<...> -> !plait.tensor<...>
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from xdsl.dialects.builtin import IntegerAttr, StringAttr, UnitAttr, i64
from xdsl.ir import Attribute, Operation, SSAValue
from xdsl.irdl import (
    IRDLOperation,
    ParsePropInAttrDict,
    irdl_op_definition,
    operand_def,
    opt_prop_def,
    prop_def,
    result_def,
    var_operand_def,
    var_result_def,
)
from xdsl.utils.exceptions import VerifyException

from . import targets
from .args import ArgsAttr, Operand, parse_call_args, parse_optional_text, print_call_args
from .attrs import REDUCE_OPS
from .schema import get_argument
from .types import AsyncType, TensorType

# ---- parameters -------------------------------------------------------------

# "state": a buffer the program updates in place (a KV cache); it holds no
# data in the WeightStore: the runtime allocates it, zero-filled, per rank
PARAM_KINDS = ("parameter", "buffer", "constant", "state")


@irdl_op_definition
class ParamOp(IRDLOperation):
    """A named weight: a parameter, buffer or constant of the captured model.

    The IR holds no data; the name is the key in the program's `WeightStore`
    (the model's state-dict name).
    """

    name = "plait.param"

    param_name = prop_def(StringAttr, prop_name="name")
    kind = prop_def(StringAttr)
    result = result_def(TensorType)

    def __init__(self, name: str, type: TensorType, kind: str = "parameter"):
        super().__init__(
            properties={"name": StringAttr(name), "kind": StringAttr(kind)},
            result_types=[type],
        )

    @property
    def weight_name(self) -> str:
        return self.param_name.data

    @property
    def is_state(self) -> bool:
        return self.kind.data == "state"

    def verify_(self) -> None:
        if self.kind.data not in PARAM_KINDS:
            raise VerifyException(
                f"param kind '{self.kind.data}' is not one of {', '.join(PARAM_KINDS)}"
            )

    @classmethod
    def parse(cls, parser) -> ParamOp:
        kind = parser.parse_optional_keyword_in(PARAM_KINDS[1:]) or "parameter"
        name = parser.expect(
            lambda: parse_optional_text(parser), "expected a string literal (the weight's name)"
        )
        attrs = parser.parse_optional_attr_dict()
        parser.parse_punctuation(":")
        type = parser.parse_type()
        op = cls(name, type, kind)
        op.attributes.update(attrs)
        return op

    def print(self, printer) -> None:
        printer.print_string(" ")
        if self.kind.data != "parameter":
            printer.print_string(self.kind.data + " ")
        printer.print_string_literal(self.weight_name)
        printer.print_op_attributes(self.attributes)
        printer.print_string(" : ")
        printer.print_attribute(self.result.type)


def stored_weight_names(module) -> list[str]:
    """Names of the weights a module's params read from its WeightStore (state excluded)."""
    return sorted(
        {op.weight_name for op in module.walk() if isinstance(op, ParamOp) and not op.is_state}
    )


# ---- ATen calls -------------------------------------------------------------


def _parse_defined_operand(parser) -> SSAValue | None:
    unresolved = parser.parse_optional_unresolved_operand()
    if unresolved is None:
        return None
    values = parser.ssa_values.get(unresolved.operand_name)
    if values is None:
        parser.raise_error(
            f"value %{unresolved.operand_name} is used before it is defined", unresolved.span
        )
    if unresolved.index >= len(values):
        parser.raise_error(
            f"%{unresolved.operand_name} has {len(values)} results, "
            f"#{unresolved.index} does not exist",
            unresolved.span,
        )
    return values[unresolved.index]


def _parse_result_types(parser) -> list[Attribute]:
    parser.parse_punctuation(":")
    if parser.parse_optional_punctuation("(") is not None:
        if parser.parse_optional_punctuation(")") is not None:
            return []
        types = [parser.parse_type()]
        while parser.parse_optional_punctuation(",") is not None:
            types.append(parser.parse_type())
        parser.parse_punctuation(")")
        return types
    return [parser.parse_type()]


def _print_result_types(printer, types: Sequence[Attribute]) -> None:
    printer.print_string(" : ")
    if len(types) == 1:
        printer.print_attribute(types[0])
        return
    printer.print_string("(")
    for i, t in enumerate(types):
        if i:
            printer.print_string(", ")
        printer.print_attribute(t)
    printer.print_string(")")


class CallOp(IRDLOperation):
    """Base of ops that call an ATen or custom operator by its schema name."""

    # schema names this op family may call; None: any
    TARGETS: ClassVar[frozenset[str] | None] = None

    target = prop_def(StringAttr)
    call_args = prop_def(ArgsAttr, prop_name="args")
    inputs = var_operand_def(TensorType)
    outs = var_result_def(TensorType)

    def __init__(
        self,
        target: str,
        inputs: Sequence[SSAValue],
        args: ArgsAttr,
        result_types: Sequence[Attribute],
        attributes: dict[str, Attribute] | None = None,
    ):
        super().__init__(
            operands=[list(inputs)],
            result_types=[list(result_types)],
            properties={"target": StringAttr(target), "args": args},
            attributes=attributes or {},
        )

    @property
    def target_name(self) -> str:
        return self.target.data

    @property
    def args(self) -> ArgsAttr:
        return self.call_args

    def arg(self, name: str, default=None):
        """The argument called `name` in the target's schema, or `default`."""
        return get_argument(self.target_name, self.args.args, self.args.kwargs, name, default)

    def input_of(self, value: object) -> SSAValue | None:
        """The operand an argument value refers to, if it is an operand."""
        return self.inputs[value.index] if isinstance(value, Operand) else None

    def verify_(self) -> None:
        if self.TARGETS is not None and self.target_name not in self.TARGETS:
            raise VerifyException(
                f"{self.name} cannot call '{self.target_name}'; "
                f"use plait.{targets.kind_of(self.target_name)} for it"
            )
        if not targets.is_valid_name(self.target_name):
            raise VerifyException(
                f"'{self.target_name}' is not an operator schema name like 'aten::add.Tensor'"
            )
        refs = self.args.operand_indices()
        if refs != list(range(len(self.inputs))):
            raise VerifyException(
                f"arguments must refer to each of the {len(self.inputs)} operands once, "
                f"in order; they refer to {refs}"
            )

    @classmethod
    def parse(cls, parser):
        target = parser.expect(
            lambda: parse_optional_text(parser), 'expected the operator, e.g. "aten::add.Tensor"'
        )
        inputs: list[SSAValue] = []

        def operand() -> Operand | None:
            value = _parse_defined_operand(parser)
            if value is None:
                return None
            inputs.append(value)
            return Operand(len(inputs) - 1)

        parser.parse_punctuation("(")
        args, kwargs = parse_call_args(parser, operand, ")")
        attrs = parser.parse_optional_attr_dict()
        result_types = _parse_result_types(parser)
        return cls(target, inputs, ArgsAttr(args, kwargs), result_types, attrs)

    def print(self, printer) -> None:
        printer.print_string(" ")
        printer.print_string_literal(self.target_name)
        printer.print_string("(")
        print_call_args(printer, self.args, lambda i: printer.print_operand(self.inputs[i]))
        printer.print_string(")")
        printer.print_op_attributes(self.attributes)
        _print_result_types(printer, [r.type for r in self.results])


def _call_op(class_name: str, op_name: str, kind: str | None, doc: str) -> type[CallOp]:
    cls = type(
        class_name,
        (CallOp,),
        {
            "name": op_name,
            "TARGETS": None if kind is None else targets.TARGETS_BY_KIND[kind],
            "__doc__": doc,
            "__module__": __name__,
            "__annotations__": {"TARGETS": ClassVar[frozenset[str] | None]},
        },
    )
    return irdl_op_definition(cls)


LinearOp = _call_op(
    "LinearOp", "plait.linear", "linear", "y = x W^T + b with W of shape [out, in]."
)
MatmulOp = _call_op(
    "MatmulOp", "plait.matmul", "matmul", "Matrix products: mm, bmm, matmul, addmm, baddbmm."
)
EmbeddingOp = _call_op(
    "EmbeddingOp", "plait.embedding", "embedding", "Row lookup in a [vocab, dim] table."
)
AttentionOp = _call_op(
    "AttentionOp", "plait.attention", "attention", "Scaled dot-product attention."
)
NormOp = _call_op("NormOp", "plait.norm", "norm", "Layer, RMS, group and batch normalization.")
ElementwiseOp = _call_op(
    "ElementwiseOp",
    "plait.elementwise",
    "elementwise",
    "Pointwise math, comparisons, selects and casts.",
)
SoftmaxOp = _call_op(
    "SoftmaxOp", "plait.softmax", "softmax", "Softmax and log-softmax along one dim."
)
ReduceOp = _call_op(
    "ReduceOp", "plait.reduce", "reduce", "Reductions over dims (sum, mean, max, ...)."
)
ReshapeOp = _call_op(
    "ReshapeOp",
    "plait.reshape",
    "reshape",
    "The reshape family: views, transposes, slices, splits, concat.",
)
GenericCallOp = _call_op(
    "GenericCallOp", "plait.call", None, "Any other operator, called by its schema name."
)

CALL_OPS: dict[str, type[CallOp]] = {
    "linear": LinearOp,
    "matmul": MatmulOp,
    "embedding": EmbeddingOp,
    "attention": AttentionOp,
    "norm": NormOp,
    "elementwise": ElementwiseOp,
    "softmax": SoftmaxOp,
    "reduce": ReduceOp,
    "reshape": ReshapeOp,
    "call": GenericCallOp,
}


def call_op_class(target: str) -> type[CallOp]:
    """The op family that calls `target`."""
    return CALL_OPS[targets.kind_of(target)]


# ---- collectives ------------------------------------------------------------


class CollectiveOp(IRDLOperation):
    """Base of collectives over one mesh axis; `async` ones need a `plait.wait`."""

    input = operand_def(TensorType)
    result = result_def(TensorType | AsyncType)
    axis = prop_def(StringAttr)
    is_async = opt_prop_def(UnitAttr, prop_name="async")

    assembly_format = "$input attr-dict `:` type($input) `->` type($result)"
    irdl_options = (ParsePropInAttrDict(),)

    def _init(self, input: SSAValue, result_type: TensorType, axis: str, is_async: bool, **props):
        properties: dict[str, Attribute] = {"axis": StringAttr(axis), **props}
        if is_async:
            properties["async"] = UnitAttr()
            result_type = AsyncType(result_type)
        IRDLOperation.__init__(
            self, operands=[input], result_types=[result_type], properties=properties
        )

    @property
    def value_type(self) -> TensorType:
        t = self.result.type
        return t.value_type if isinstance(t, AsyncType) else t

    def verify_(self) -> None:
        if (self.is_async is not None) != isinstance(self.result.type, AsyncType):
            raise VerifyException(
                f"{self.name}: an async collective yields !plait.async and a blocking one a "
                "tensor; the result type does not match the `async` flag"
            )
        if self.value_type.dtype != self.input.type.dtype:
            raise VerifyException(f"{self.name} cannot change the element type")


def _verify_reduce(op) -> None:
    if op.reduce.data not in REDUCE_OPS:
        raise VerifyException(f"unknown reduction '{op.reduce.data}'; use one of {REDUCE_OPS}")


@irdl_op_definition
class AllReduceOp(CollectiveOp):
    """Reduce a tensor over the ranks of a mesh axis; every rank gets the result."""

    name = "plait.all_reduce"
    reduce = prop_def(StringAttr)

    def __init__(self, input: SSAValue, axis: str, reduce: str = "sum", is_async: bool = False):
        self._init(input, input.type, axis, is_async, reduce=StringAttr(reduce))

    def verify_(self) -> None:
        super().verify_()
        _verify_reduce(self)


@irdl_op_definition
class AllGatherOp(CollectiveOp):
    """Concatenate each rank's tensor along `dim`."""

    name = "plait.all_gather"
    dim = prop_def(IntegerAttr)

    def __init__(
        self, input: SSAValue, result_type: TensorType, axis: str, dim: int, is_async: bool = False
    ):
        self._init(input, result_type, axis, is_async, dim=IntegerAttr(dim, i64))


@irdl_op_definition
class GatherIntoOp(CollectiveOp):
    """All-gather each rank's flat piece into `dest`, in place: rank r's piece
    fills dest's flat elements [r * piece, (r + 1) * piece), what lies past
    dest's end (padding) is dropped; the result is `dest`, written. A
    parameter updated slice by slice (ZeRO-1) is made whole this way without
    a gathered copy; like an update of state, it is never moved or removed."""

    name = "plait.all_gather_into"
    dest = operand_def(TensorType)

    assembly_format = (
        "$input `into` $dest attr-dict `:` type($input) `,` type($dest) `->` type($result)"
    )

    def __init__(self, input: SSAValue, dest: SSAValue, axis: str, is_async: bool = False):
        properties: dict[str, Attribute] = {"axis": StringAttr(axis)}
        result_type = dest.type
        if is_async:
            properties["async"] = UnitAttr()
            result_type = AsyncType(result_type)
        # (IRDL orders a subclass's operands first: the destination, whose
        # memory the result is, leads, as a view's source does)
        IRDLOperation.__init__(
            self, operands=[dest, input], result_types=[result_type], properties=properties
        )

    def verify_(self) -> None:
        super().verify_()
        if self.value_type != self.dest.type:
            raise VerifyException("plait.all_gather_into yields its destination's type")
        if self.input.type.rank != 1:
            raise VerifyException("plait.all_gather_into gathers flat (1-d) pieces")


@irdl_op_definition
class ReduceScatterOp(CollectiveOp):
    """Reduce over the ranks, each rank keeping its slice along `dim`."""

    name = "plait.reduce_scatter"
    dim = prop_def(IntegerAttr)
    reduce = prop_def(StringAttr)

    def __init__(
        self,
        input: SSAValue,
        result_type: TensorType,
        axis: str,
        dim: int,
        reduce: str = "sum",
        is_async: bool = False,
    ):
        self._init(
            input, result_type, axis, is_async, dim=IntegerAttr(dim, i64), reduce=StringAttr(reduce)
        )

    def verify_(self) -> None:
        super().verify_()
        _verify_reduce(self)


@irdl_op_definition
class AllToAllOp(CollectiveOp):
    """Split along `split_dim`, exchange the pieces, concatenate along `concat_dim`."""

    name = "plait.all_to_all"
    split_dim = prop_def(IntegerAttr)
    concat_dim = prop_def(IntegerAttr)

    def __init__(
        self,
        input: SSAValue,
        result_type: TensorType,
        axis: str,
        split_dim: int,
        concat_dim: int,
        is_async: bool = False,
    ):
        self._init(
            input,
            result_type,
            axis,
            is_async,
            split_dim=IntegerAttr(split_dim, i64),
            concat_dim=IntegerAttr(concat_dim, i64),
        )


@irdl_op_definition
class WaitOp(IRDLOperation):
    """Wait for an async collective; its result is the collective's tensor."""

    name = "plait.wait"

    input = operand_def(AsyncType)
    result = result_def(TensorType)

    assembly_format = "$input attr-dict `:` type($input) `->` type($result)"

    def __init__(self, input: SSAValue):
        super().__init__(operands=[input], result_types=[input.type.value_type])

    def verify_(self) -> None:
        if self.input.type.value_type != self.result.type:
            raise VerifyException("plait.wait must yield the type its async value carries")
        producer = self.input.owner
        if not isinstance(producer, CollectiveOp):
            raise VerifyException("plait.wait must wait on an async collective")
        if self.input.uses.get_length() != 1:
            raise VerifyException("an async value must be waited on exactly once")


# ---- point to point (pipeline stages) --------------------------------------

# a message's tag on the wire: its op's tag + the micro-batch's index times this
# (so a module has fewer tags than this)
TAGS_PER_MICRO_BATCH = 1 << 12


@irdl_op_definition
class SendOp(IRDLOperation):
    """Send a tensor to the rank at coordinate `peer` of mesh axis `axis` (the
    others the same); the `plait.recv` with the same `tag` receives it (the
    runtime adds the micro-batch to the tag). It returns at once: the runtime
    waits for a step's sends at its end, so a stage never blocks on a peer
    that is still computing.

        plait.send %h {axis = "pp", peer = 1 : i64, tag = 0 : i64} : !plait.tensor<[2, 16, 64], f32>
    """

    name = "plait.send"

    input = operand_def(TensorType)
    axis = prop_def(StringAttr)
    peer = prop_def(IntegerAttr)
    tag = prop_def(IntegerAttr)

    assembly_format = "$input attr-dict `:` type($input)"
    irdl_options = (ParsePropInAttrDict(),)

    def __init__(self, input: SSAValue, axis: str, peer: int, tag: int):
        super().__init__(operands=[input], properties=_peer_properties(axis, peer, tag))


@irdl_op_definition
class RecvOp(IRDLOperation):
    """The tensor the rank at coordinate `peer` of `axis` sends with this `tag`.

    %h = plait.recv {axis = "pp", peer = 0 : i64, tag = 0 : i64} : !plait.tensor<[2, 16, 64], f32>
    """

    name = "plait.recv"

    result = result_def(TensorType)
    axis = prop_def(StringAttr)
    peer = prop_def(IntegerAttr)
    tag = prop_def(IntegerAttr)

    assembly_format = "attr-dict `:` type($result)"
    irdl_options = (ParsePropInAttrDict(),)

    def __init__(self, result_type: TensorType, axis: str, peer: int, tag: int):
        super().__init__(result_types=[result_type], properties=_peer_properties(axis, peer, tag))


def _peer_properties(axis: str, peer: int, tag: int) -> dict:
    """A send's or recv's: along `axis`, the rank at coordinate `peer`, the message's `tag`."""
    return {"axis": StringAttr(axis), "peer": IntegerAttr(peer, i64), "tag": IntegerAttr(tag, i64)}


@irdl_op_definition
class LocalShardOp(IRDLOperation):
    """This rank's slice along `dim` of a tensor every rank of `axis` holds whole.

    No communication: each rank keeps its 1/n of the tensor. It turns a
    replicated value into a sharded one where a sharded op needs it.
    """

    name = "plait.local_shard"

    input = operand_def(TensorType)
    result = result_def(TensorType)
    axis = prop_def(StringAttr)
    dim = prop_def(IntegerAttr)

    assembly_format = "$input attr-dict `:` type($input) `->` type($result)"
    irdl_options = (ParsePropInAttrDict(),)

    def __init__(self, input: SSAValue, result_type: TensorType, axis: str, dim: int):
        super().__init__(
            operands=[input],
            result_types=[result_type],
            properties={"axis": StringAttr(axis), "dim": IntegerAttr(dim, i64)},
        )

    def verify_(self) -> None:
        if self.input.type.dtype != self.result.type.dtype:
            raise VerifyException("plait.local_shard cannot change the element type")


COLLECTIVE_OPS = (AllReduceOp, AllGatherOp, GatherIntoOp, ReduceScatterOp, AllToAllOp)


def is_call(op: Operation) -> bool:
    return isinstance(op, CallOp)
