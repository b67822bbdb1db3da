"""Symbolic dimensions: sympy expressions over named size symbols.

Dims that torch.export keeps dynamic (batch, sequence) are sympy expressions
over positive integer symbols. The IR prints them in a small grammar that the
MLIR lexer can tokenize (no `//`, which is a comment there):

    expr   ::= term (("+" | "-") term)*
    term   ::= factor ("*" factor)*
    factor ::= "-" factor | INT | NAME | NAME "(" expr ("," expr)* ")" | "(" expr ")"

with the functions `floordiv(a, b)`, `ceildiv(a, b)`, `mod(a, b)`, `max(...)`
and `min(...)`. `to_text` gives one canonical spelling per expression, so
print -> parse -> print is the identity.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import sympy

Expr = sympy.Expr


class SymbolicError(ValueError):
    """An expression outside the supported grammar."""


@lru_cache(maxsize=None)
def symbol(name: str) -> sympy.Symbol:
    """The size symbol called `name` (a positive integer)."""
    return sympy.Symbol(name, integer=True, positive=True)


def _nonzero(b: Expr) -> Expr:
    if b == 0:
        raise ZeroDivisionError("division by zero")
    return b


def _floordiv(a: Expr, b: Expr) -> Expr:
    return sympy.floor(a / _nonzero(b))


def _ceildiv(a: Expr, b: Expr) -> Expr:
    return sympy.ceiling(a / _nonzero(b))


def _mod(a: Expr, b: Expr) -> Expr:
    return sympy.Mod(a, _nonzero(b))


# name -> (arity or None for variadic, constructor)
FUNCTIONS: dict[str, tuple[int | None, Callable[..., Expr]]] = {
    "floordiv": (2, _floordiv),
    "ceildiv": (2, _ceildiv),
    "mod": (2, _mod),
    "max": (None, sympy.Max),
    "min": (None, sympy.Min),
}


def _as_div(arg: Expr) -> tuple[Expr, Expr]:
    num, den = sympy.fraction(sympy.together(arg))
    return num, den


def to_text(expr: Expr | int) -> str:
    """Canonical text of an integer-valued expression."""
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return str(int(expr))
    if expr.is_Symbol:
        return expr.name
    if expr.is_Add:
        terms = expr.as_ordered_terms()
        out = (
            to_text(terms[0]) if not _is_negative_term(terms[0]) else "-" + _factor_text(-terms[0])
        )
        for term in terms[1:]:
            if _is_negative_term(term):
                out += " - " + _factor_text(-term)
            else:
                out += " + " + to_text(term)
        return out
    if expr.is_Mul:
        factors = expr.as_ordered_factors()
        if factors[0] == -1:
            return "-" + _factor_text(sympy.Mul(*factors[1:]))
        return "*".join(_factor_text(f) for f in factors)
    if expr.is_Pow and expr.exp.is_Integer and int(expr.exp) > 1:
        return "*".join([_factor_text(expr.base)] * int(expr.exp))
    if isinstance(expr, sympy.floor):
        return "floordiv(%s, %s)" % tuple(to_text(e) for e in _as_div(expr.args[0]))
    if isinstance(expr, sympy.ceiling):
        return "ceildiv(%s, %s)" % tuple(to_text(e) for e in _as_div(expr.args[0]))
    if isinstance(expr, sympy.Mod):
        return "mod(%s, %s)" % (to_text(expr.args[0]), to_text(expr.args[1]))
    if isinstance(expr, (sympy.Max, sympy.Min)):
        name = "max" if isinstance(expr, sympy.Max) else "min"
        args = sorted((to_text(a) for a in expr.args))
        return f"{name}({', '.join(args)})"
    raise SymbolicError(f"cannot print dimension expression {expr!r}: outside plait's grammar")


def _is_negative_term(term: Expr) -> bool:
    coeff = term.as_coeff_Mul()[0]
    return bool(coeff.is_negative)


def _factor_text(expr: Expr) -> str:
    text = to_text(expr)
    return f"({text})" if sympy.sympify(expr).is_Add else text


def evaluate(expr: Expr | int, values: dict[str, int]) -> int:
    """The integer value of `expr` with symbols bound by name."""
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return int(expr)
    subs = {s: values[s.name] for s in expr.free_symbols}
    return int(expr.subs(subs))


def linear_in_one_symbol(dim: Expr | int) -> tuple[sympy.Symbol, int, int] | None:
    """(k, a, b) when dim is a*k + b with integers a > 0 and b (a size a symbol
    can be read back from), else None."""
    if isinstance(dim, int) or len(dim.free_symbols) != 1:
        return None
    (k,) = dim.free_symbols
    poly = sympy.Poly(dim, k) if dim.is_polynomial(k) else None
    if poly is None or poly.degree() != 1 or not all(c.is_integer for c in poly.all_coeffs()):
        return None
    a, b = (int(c) for c in poly.all_coeffs())
    return (k, a, b) if a > 0 else None


def free_names(expr: Expr | int) -> set[str]:
    return {s.name for s in sympy.sympify(expr).free_symbols}


# ---- parsing, on top of xDSL's parser primitives -------------------------


def parse_expr(parser) -> Expr:  # parser: xdsl BaseParser
    """Parse one expression of the grammar above from an xDSL parser."""
    out = _parse_term(parser)
    while True:
        if parser.parse_optional_punctuation("+") is not None:
            out = out + _parse_term(parser)
        elif parser.parse_optional_punctuation("-") is not None:
            out = out - _parse_term(parser)
        else:
            return out


def _parse_term(parser) -> Expr:
    out = _parse_factor(parser)
    while parser.parse_optional_punctuation("*") is not None:
        out = out * _parse_factor(parser)
    return out


def _parse_factor(parser) -> Expr:
    if parser.parse_optional_punctuation("-") is not None:
        return -_parse_factor(parser)
    if parser.parse_optional_punctuation("(") is not None:
        inner = parse_expr(parser)
        parser.parse_punctuation(")", " to close a parenthesized dimension expression")
        return inner
    value = parser.parse_optional_integer(allow_boolean=False, allow_negative=False)
    if value is not None:
        return sympy.Integer(value)
    pos = parser.pos
    name = parser.parse_optional_identifier()
    if name is None:
        parser.raise_error("expected a dimension: an integer, a symbol name or an expression")
    if parser.parse_optional_punctuation("(") is None:
        return symbol(name)
    if name not in FUNCTIONS:
        parser.raise_error(
            f"unknown function '{name}' in a dimension expression; "
            f"expected one of {', '.join(sorted(FUNCTIONS))}",
            pos,
            pos + len(name),
        )
    arity, make = FUNCTIONS[name]
    args = [parse_expr(parser)]
    while parser.parse_optional_punctuation(",") is not None:
        args.append(parse_expr(parser))
    parser.parse_punctuation(")", f" to close {name}(...)")
    if arity is not None and len(args) != arity:
        parser.raise_error(f"{name}() takes {arity} arguments, got {len(args)}", pos, parser.pos)
    try:
        return make(*args)
    except (ZeroDivisionError, TypeError, ValueError) as exc:
        parser.raise_error(f"invalid {name}(...): {exc}", pos, parser.pos)
