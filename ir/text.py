"""The IR's text form: print, parse (with file:line:column errors) and verify.

Printing always includes locations (`loc("model.layers.0.mlp")`), so a dump is
a complete, reproducible test case: print -> parse -> print is the identity.
"""

from __future__ import annotations

import io
import re
import weakref
from pathlib import Path

from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, NameLoc, UnknownLoc
from xdsl.ir import Operation
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.utils.exceptions import ParseError, VerifyException
from xdsl.utils.mlir_lexer import MLIRLexer

from . import symbolic
from .args import string_literal
from .attrs import SYMBOLS_ATTR, SymbolsAttr
from .dialect import make_context
from .errors import IRParseError, IRVerifyError
from .types import AsyncType, TensorType

# xDSL 0.75 lexes string literals with a nested quantifier, `(?:[^"...]+|...)*"`,
# which backtracks exponentially on an unterminated string (a hang on a
# truncated file). This regex accepts exactly the same literals in linear time.
MLIRLexer._unescaped_characters_regex = re.compile(
    r'"(?:[^"\\\n\v\f]|\\(?:["nt\\]|[0-9A-Fa-f]{2}))*"'
)

# op -> (filename, line, column) for ops that came from text, for error messages
_positions: weakref.WeakKeyDictionary[Operation, tuple[str, int, int]] = weakref.WeakKeyDictionary()


class _PositionRecordingParser(Parser):
    def parse_operation(self) -> Operation:
        location = self._current_token.span.get_location()
        op = super().parse_operation()
        _positions[op] = tuple(location)
        return op


class _LocationPrinter(Printer):
    """Prints known locations and leaves out `loc(unknown)`; keeps non-ASCII
    text in string literals as UTF-8 (xDSL's byte escapes do not parse back
    where a string is expected, e.g. in a location)."""

    def print_string_literal(self, string: str) -> None:
        self.print_string(string_literal(string))

    def print_op(self, op: Operation) -> None:
        saved, self.print_debuginfo = self.print_debuginfo, not isinstance(op.location, UnknownLoc)
        try:
            super().print_op(op)
        finally:
            self.print_debuginfo = saved

    def print_block_argument(self, arg, print_type: bool = True) -> None:
        saved, self.print_debuginfo = self.print_debuginfo, not isinstance(arg.location, UnknownLoc)
        try:
            super().print_block_argument(arg, print_type)
        finally:
            self.print_debuginfo = saved


def print_module(module: ModuleOp) -> str:
    out = io.StringIO()
    _LocationPrinter(stream=out).print_op(module)
    out.write("\n")
    return out.getvalue()


def decode_ir_text(data: bytes, filename: str) -> str:
    """Text of an IR (or program) file from its bytes, with newlines as
    `read_text` gives them; a byte that is not UTF-8 is an IRParseError at its
    line and column."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = _universal_newlines(data[: exc.start].decode("utf-8"))
        line = before.count("\n") + 1
        column = len(before) - before.rfind("\n")
        raise IRParseError(
            f"byte 0x{data[exc.start]:02x} is not valid UTF-8; the file must be UTF-8 text",
            filename,
            line,
            column,
        ) from None
    return _universal_newlines(text)


def _universal_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_ir_text(path: str | Path) -> str:
    """Read an IR (or program) text file; see `decode_ir_text`."""
    return decode_ir_text(Path(path).read_bytes(), str(path))


def parse_module(text: str, filename: str = "<ir>", verify: bool = True) -> ModuleOp:
    """Parse IR text; every rejection is an IRParseError with a line and column."""
    parser = None
    try:
        parser = _PositionRecordingParser(make_context(), text, filename)
        module = parser.parse_module()
    except ParseError as exc:
        location = exc.span.get_location()
        raise IRParseError(
            exc.msg, filename, location.line, location.col, exc.span.print_with_context(exc.msg)
        ) from None
    except (VerifyException, ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        # Raised while building an op from well-formed tokens (e.g. a bad
        # attribute value): report it at the token the parser stopped on.
        line, column = (1, 1)
        if parser is not None:
            line, column = parser._current_token.span.get_location()[1:]
        raise IRParseError(f"invalid IR: {exc}", filename, line, column) from None
    if verify:
        verify_module(module)
    return module


def module_path(op: Operation) -> str:
    """The module an op comes from (its location), or ""."""
    return op.location.desc.data if isinstance(op.location, NameLoc) else ""


def where(op: Operation) -> str:
    """Where an op comes from: file:line:column if parsed, and its module path."""
    parts = []
    if op in _positions:
        filename, line, column = _positions[op]
        parts.append(f"{filename}:{line}:{column}")
    if isinstance(op.location, NameLoc):
        parts.append(f"({op.location.desc.data})")
    return " ".join(parts) or op.name


def verify_module(module: ModuleOp) -> None:
    """Check every op, dominance in straight-line bodies, declared symbols, and
    that every op's result types are what it computes (see `typecheck`)."""
    symbols = module.attributes.get(SYMBOLS_ATTR)
    if symbols is not None and not isinstance(symbols, SymbolsAttr):
        raise IRVerifyError(f"'{SYMBOLS_ATTR}' must be a #plait.symbols attribute", "module")
    declared = set(symbols.ranges) if symbols is not None else set()
    for op in module.walk():
        try:
            op.verify(verify_nested_ops=False)
        except VerifyException as exc:
            raise IRVerifyError(f"{op.name}: {exc}", where(op)) from None
        for result in op.results:
            _check_symbols(result.type, declared, op)
    for fn in module.ops:
        if isinstance(fn, func.FuncOp):
            for arg_type in fn.function_type.inputs:
                _check_symbols(arg_type, declared, fn)
            _check_dominance(fn)
    from .typecheck import OpTypeError, check_types  # torch, loaded when first verifying

    try:
        check_types(module)
    except OpTypeError as exc:
        raise IRVerifyError(f"{exc.op.name}: {exc.message}", where(exc.op)) from None


def _check_symbols(type_, declared: set[str], op: Operation) -> None:
    if isinstance(type_, AsyncType):
        type_ = type_.value_type
    if isinstance(type_, TensorType) and not type_.is_static:
        for dim in type_.shape:
            missing = symbolic.free_names(dim) - declared
            if missing:
                raise IRVerifyError(
                    f"size symbol '{sorted(missing)[0]}' is not declared; add it to the "
                    f"module's {SYMBOLS_ATTR} attribute with its range",
                    where(op),
                )


def _check_dominance(fn: func.FuncOp) -> None:
    if len(fn.body.blocks) != 1:
        return
    block = fn.body.blocks.first
    defined = set(block.args)
    for op in block.ops:
        for operand in op.operands:
            if operand not in defined:
                raise IRVerifyError(f"{op.name} uses a value before it is defined", where(op))
        defined.update(op.results)


def parse_dim(text: str) -> symbolic.Expr:
    """Parse a standalone dimension expression such as '2*batch*seq'."""
    parser = Parser(make_context(), text, "<dim>")
    try:
        expr = symbolic.parse_expr(parser)
        if parser.parse_optional_punctuation(",") is not None or parser.pos < len(text.rstrip()):
            parser.raise_error("unexpected text after the expression")
    except ParseError as exc:
        location = exc.span.get_location()
        raise IRParseError(exc.msg, "<dim>", location.line, location.col) from None
    return expr
