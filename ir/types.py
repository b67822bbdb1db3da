"""plait types: tensors with symbolic dims, and in-flight async values.

    !plait.tensor<[batch, seq, 4096], bf16>
    !plait.tensor<[], f32>                       (a 0-d tensor)
    !plait.async<!plait.tensor<[batch, seq, 4096], bf16>>

A dim is an int or a sympy expression over size symbols (see `symbolic`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import sympy
from xdsl.ir import Data, ParametrizedAttribute, TypeAttribute
from xdsl.irdl import irdl_attr_definition

from . import symbolic
from .dtypes import ITEM_BYTES, TORCH_NAMES

Dim = int | sympy.Expr


def _canonical_dim(dim: Dim) -> Dim:
    if isinstance(dim, int):
        return dim
    expr = sympy.sympify(dim)
    return int(expr) if expr.is_Integer else expr


@irdl_attr_definition
class TensorType(Data[tuple[tuple[Dim, ...], str]], TypeAttribute):
    """A tensor with a (possibly symbolic) shape and an element type."""

    name = "plait.tensor"

    def __init__(
        self, shape: Sequence[Dim] | tuple[tuple[Dim, ...], str], dtype: str | None = None
    ):
        if dtype is None:  # the parser passes the parsed (shape, dtype) pair
            shape, dtype = shape
        super().__init__((tuple(_canonical_dim(d) for d in shape), dtype))

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.data[0]

    @property
    def dtype(self) -> str:
        return self.data[1]

    @property
    def rank(self) -> int:
        return len(self.data[0])

    @cached_property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @cached_property
    def numel(self) -> Dim:
        out: Dim = 1
        for d in self.shape:
            out = out * d
        return _canonical_dim(out)

    @property
    def nbytes(self) -> Dim:
        return _canonical_dim(self.numel * ITEM_BYTES[self.dtype])

    def with_shape(self, shape: Sequence[Dim]) -> TensorType:
        return TensorType(shape, self.dtype)

    @classmethod
    def parse_parameter(cls, parser) -> tuple[tuple[Dim, ...], str]:
        with parser.in_angle_brackets():
            dims = parser.parse_comma_separated_list(
                parser.Delimiter.SQUARE, lambda: _canonical_dim(symbolic.parse_expr(parser))
            )
            parser.parse_punctuation(",", " between the shape and the element type")
            pos = parser.pos
            dtype = parser.parse_identifier(context_msg=" (an element type such as f32)")
            if dtype not in TORCH_NAMES:
                parser.raise_error(
                    f"unknown element type '{dtype}'; expected one of {', '.join(TORCH_NAMES)}",
                    pos,
                    parser.pos,
                )
        return tuple(dims), dtype

    def print_parameter(self, printer) -> None:
        dims = ", ".join(symbolic.to_text(d) for d in self.shape)
        printer.print_string(f"<[{dims}], {self.dtype}>")

    def __str__(self) -> str:
        dims = ", ".join(symbolic.to_text(d) for d in self.shape)
        return f"tensor<[{dims}], {self.dtype}>"


@irdl_attr_definition
class AsyncType(ParametrizedAttribute, TypeAttribute):
    """A value being produced by an async collective; `plait.wait` yields it."""

    name = "plait.async"

    value_type: TensorType

    def __init__(self, value_type: TensorType):
        super().__init__(value_type)

    @classmethod
    def parse_parameters(cls, parser) -> tuple[TensorType]:
        with parser.in_angle_brackets():
            pos = parser.pos
            inner = parser.parse_type()
            if not isinstance(inner, TensorType):
                parser.raise_error("!plait.async carries a !plait.tensor type", pos, parser.pos)
        return (inner,)
