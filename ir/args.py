"""Arguments of an ATen call, as the IR stores and prints them.

An op that calls an ATen (or custom) operator keeps its positional and keyword
arguments exactly as torch.export recorded them, with tensors replaced by
references to the op's operands. Values:

    %x               an operand (printed inline; `operand(N)` inside an attribute)
    1  -2  0.5  1.0e-06  inf  -inf  nan  true  false  none  "text"
    [v, ...]         a list (int lists, tensor lists, ...)
    sym(2*seq)       a symbolic int, in the grammar of `symbolic`
    dtype(bf16)  device("cpu")  layout(strided)  memory_format(contiguous_format)

Scalars compare by type as well as value, so `add(x, 1)` and `add(x, 1.0)`
(which promote differently) are never merged by CSE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import sympy
from xdsl.ir import Data
from xdsl.irdl import irdl_attr_definition

from . import symbolic
from .dtypes import TORCH_NAMES


@dataclass(frozen=True)
class Operand:
    """The op's operand number `index`."""

    index: int


@dataclass(frozen=True)
class Sym:
    """A symbolic int (a SymInt in torch), over the program's size symbols."""

    expr: sympy.Expr


@dataclass(frozen=True)
class Tag:
    """A torch enum-like value: a dtype, device, layout or memory format; or
    the process group along a mesh axis (for kernels that communicate)."""

    kind: str
    value: str


# tag kind -> is the value a quoted string (else a bare identifier)
TAG_KINDS: dict[str, bool] = {
    "dtype": False,
    "device": True,
    "layout": False,
    "memory_format": False,
    "group": True,  # a mesh axis: the process group of this rank along it
}

Value = object  # int | float | bool | str | None | tuple | Operand | Sym | Tag


def typed_key(value: Value) -> object:
    """A key that is equal only for values of the same type and value."""
    if isinstance(value, tuple):
        return ("list", tuple(typed_key(v) for v in value))
    if isinstance(value, float):  # nan equals itself here; -0.0 differs from 0.0
        return (
            ("float", "nan") if math.isnan(value) else ("float", value, math.copysign(1.0, value))
        )
    return (type(value).__name__, value)


def operands_in(value: Value) -> list[int]:
    """Operand indices referenced by a value, in order of appearance."""
    if isinstance(value, Operand):
        return [value.index]
    if isinstance(value, tuple):
        return [i for v in value for i in operands_in(v)]
    return []


def map_operands(value: Value, fn: Callable[[int], Value]) -> Value:
    """Replace each operand reference by fn(index)."""
    if isinstance(value, Operand):
        return fn(value.index)
    if isinstance(value, tuple):
        return tuple(map_operands(v, fn) for v in value)
    return value


@irdl_attr_definition
class ArgsAttr(Data[tuple[tuple[Value, ...], tuple[tuple[str, Value], ...]]]):
    """Positional and keyword arguments of a call."""

    name = "plait.args"

    def __init__(
        self, args: tuple[Value, ...], kwargs: tuple[tuple[str, Value], ...] | None = None
    ):
        if kwargs is None:  # the parser passes the parsed (args, kwargs) pair
            args, kwargs = args
        super().__init__((tuple(args), tuple(kwargs)))

    @property
    def args(self) -> tuple[Value, ...]:
        return self.data[0]

    @property
    def kwargs(self) -> tuple[tuple[str, Value], ...]:
        return self.data[1]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ArgsAttr)
            and typed_key(self.args) == typed_key(other.args)
            and [(k, typed_key(v)) for k, v in self.kwargs]
            == [(k, typed_key(v)) for k, v in other.kwargs]
        )

    def __hash__(self) -> int:
        return hash((typed_key(self.args), tuple((k, typed_key(v)) for k, v in self.kwargs)))

    def operand_indices(self) -> list[int]:
        return operands_in(self.args) + operands_in(tuple(v for _, v in self.kwargs))

    @classmethod
    def parse_parameter(cls, parser):
        def operand() -> Operand:
            parser.parse_punctuation("(")
            index = parser.parse_integer(allow_boolean=False, allow_negative=False)
            parser.parse_punctuation(")")
            return Operand(index)

        parser.parse_punctuation("<")
        return parse_call_args(parser, lambda: None, ">", operand_keyword=operand)

    def print_parameter(self, printer) -> None:
        printer.print_string("<")
        print_call_args(printer, self, lambda i: printer.print_string(f"operand({i})"))
        printer.print_string(">")


# ---- text ------------------------------------------------------------------


def float_text(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(value)
    if "." not in text:  # MLIR float literals need a '.': 1e-06 -> 1.0e-06
        text = text.replace("e", ".0e") if "e" in text else text + ".0"
    return text


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\v": "\\0B", "\f": "\\0C"}


def string_literal(value: str) -> str:
    """An MLIR string literal that lexes back to `value`.

    Only what the lexer cannot take raw is escaped, and non-ASCII stays UTF-8:
    xDSL lexes a literal holding both an escape and non-ASCII text as bytes.
    """
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'


def parse_optional_text(parser) -> str | None:
    """A string literal, also when the lexer saw it as bytes (escapes + UTF-8)."""
    text = parser.parse_optional_str_literal()
    if text is not None:
        return text
    pos = parser.pos
    data = parser.parse_optional_bytes_literal()
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        parser.raise_error("string literal is not valid UTF-8", pos, parser.pos)


def print_value(printer, value: Value, print_operand: Callable[[int], None]) -> None:
    if isinstance(value, Operand):
        print_operand(value.index)
    elif isinstance(value, tuple):
        printer.print_string("[")
        for i, v in enumerate(value):
            if i:
                printer.print_string(", ")
            print_value(printer, v, print_operand)
        printer.print_string("]")
    elif value is None:
        printer.print_string("none")
    elif isinstance(value, bool):
        printer.print_string("true" if value else "false")
    elif isinstance(value, int):
        printer.print_string(str(value))
    elif isinstance(value, float):
        printer.print_string(float_text(value))
    elif isinstance(value, str):
        printer.print_string(string_literal(value))
    elif isinstance(value, Sym):
        printer.print_string(f"sym({symbolic.to_text(value.expr)})")
    elif isinstance(value, Tag):
        text = string_literal(value.value) if TAG_KINDS[value.kind] else value.value
        printer.print_string(f"{value.kind}({text})")
    else:
        raise TypeError(f"cannot print argument value {value!r}")


def print_call_args(printer, attr: ArgsAttr, print_operand: Callable[[int], None]) -> None:
    first = True
    for value in attr.args:
        if not first:
            printer.print_string(", ")
        first = False
        print_value(printer, value, print_operand)
    for key, value in attr.kwargs:
        if not first:
            printer.print_string(", ")
        first = False
        printer.print_string(f"{key} = ")
        print_value(printer, value, print_operand)


def parse_value(
    parser, parse_operand: Callable[[], Operand | None], operand_keyword=None, word=None
) -> Value:
    """Parse one value; `parse_operand` parses an inline `%x`, if present.

    `word` is an identifier the caller has already consumed.
    """
    if word is None:
        operand = parse_operand()
        if operand is not None:
            return operand
        if parser.parse_optional_punctuation("[") is not None:
            items: list[Value] = []
            if parser.parse_optional_punctuation("]") is None:
                items.append(parse_value(parser, parse_operand, operand_keyword))
                while parser.parse_optional_punctuation(",") is not None:
                    items.append(parse_value(parser, parse_operand, operand_keyword))
                parser.parse_punctuation("]", " to close a list")
            return tuple(items)
        if parser.parse_optional_punctuation("-") is not None:
            if parser.parse_optional_keyword("inf") is not None:
                return -math.inf
            number = parser.parse_optional_number()
            if number is None:
                parser.raise_error("expected a number or inf after '-'")
            return -number
        number = parser.parse_optional_number()
        if number is not None:
            return number
        text = parse_optional_text(parser)
        if text is not None:
            return text
        word = parser.parse_optional_identifier()
        if word is None:
            parser.raise_error("expected an argument: an operand, number, string, list or keyword")
    constants = {"true": True, "false": False, "none": None, "inf": math.inf, "nan": math.nan}
    if word in constants:
        return constants[word]
    if word == "sym":
        parser.parse_punctuation("(")
        expr = symbolic.parse_expr(parser)
        parser.parse_punctuation(")")
        return Sym(expr) if not expr.is_Integer else int(expr)
    if word in TAG_KINDS:
        parser.parse_punctuation("(")
        if TAG_KINDS[word]:
            inner = parser.expect(lambda: parse_optional_text(parser), "expected a string literal")
        else:
            inner_pos = parser.pos
            inner = parser.parse_identifier()
            if word == "dtype" and inner not in TORCH_NAMES:
                parser.raise_error(f"unknown dtype '{inner}'", inner_pos, parser.pos)
        parser.parse_punctuation(")")
        return Tag(word, inner)
    if word == "operand" and operand_keyword is not None:
        return operand_keyword()
    parser.raise_error(f"unknown argument keyword '{word}'")


def parse_call_args(parser, parse_operand, close: str, operand_keyword=None):
    """Parse `v, v, key = v, ...` and the closing delimiter `close`."""
    args: list[Value] = []
    kwargs: list[tuple[str, Value]] = []
    if parser.parse_optional_punctuation(close) is not None:
        return (tuple(args), tuple(kwargs))
    while True:
        pos = parser.pos
        word = parser.parse_optional_identifier()
        key = None
        if word is not None and parser.parse_optional_punctuation("=") is not None:
            key, word = word, None
        value = parse_value(parser, parse_operand, operand_keyword, word)
        if key is not None:
            if any(k == key for k, _ in kwargs):
                parser.raise_error(f"keyword argument '{key}' given twice", pos, parser.pos)
            kwargs.append((key, value))
        elif kwargs:
            parser.raise_error("positional argument after keyword arguments", pos, parser.pos)
        else:
            args.append(value)
        if parser.parse_optional_punctuation(",") is None:
            parser.parse_punctuation(close, " or ',' in an argument list")
            return (tuple(args), tuple(kwargs))
