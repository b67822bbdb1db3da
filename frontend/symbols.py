"""Size symbols: from torch.export's shape environment to plait's names.

torch.export names dynamic dims `s43`, `s53`, ... and those numbers change
between runs. plait names them after the user's `Dim`s ("batch", "seq"), or
`d0`, `d1`, ... in order of first appearance among the inputs, so the same
model always gives the same IR text. Expressions are rewritten from torch's
sympy functions (FloorDiv, PythonMod, ...) into plain sympy over those names.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import sympy
import torch

from ..ir import symbolic
from ..ir.errors import PlaitError

RESERVED = {"true", "false", "none", "inf", "nan", "sym", "operand"} | set(symbolic.FUNCTIONS)


class SymbolError(PlaitError):
    """A shape expression plait cannot express."""


def dim_names(
    model: torch.nn.Module, example_inputs: Sequence, dynamic_shapes
) -> list[dict[int, str]]:
    """For each flat tensor input, the user's Dim name of each dynamic dim."""
    if dynamic_shapes is None:
        return [{} for _ in example_inputs]
    if isinstance(dynamic_shapes, dict):
        params = list(inspect.signature(model.forward).parameters)
        specs = [dynamic_shapes.get(name) for name in params[: len(example_inputs)]]
    else:
        specs = list(dynamic_shapes)
    out: list[dict[int, str]] = []
    for spec in specs:
        names: dict[int, str] = {}
        items = spec.items() if isinstance(spec, dict) else enumerate(spec or ())
        for index, dim in items:
            dim = getattr(dim, "root", dim)  # a derived dim (2 * Dim("k")) names its root
            name = getattr(dim, "__name__", None)
            usable = name and name.isascii() and name.isidentifier() and not name.startswith("_")
            if usable and name not in RESERVED:
                names[index] = name
        out.append(names)
    return out


class SymbolMap:
    """Maps shape-environment symbols to plait names and converts expressions."""

    def __init__(self) -> None:
        self.names: dict[sympy.Symbol, str] = {}
        self.ranges: dict[str, tuple[int, int | None]] = {}

    def bind(self, torch_symbol: sympy.Symbol, preferred: str | None, value_range) -> None:
        if torch_symbol in self.names:
            return
        taken = set(self.names.values())
        name = preferred if preferred and preferred not in taken else None
        if name is None:
            name = next(f"d{i}" for i in range(len(taken) + 1) if f"d{i}" not in taken)
        self.names[torch_symbol] = name
        lo = int(value_range.lower) if value_range is not None else 1
        upper = value_range.upper if value_range is not None else None
        hi = None if upper is None or not upper.is_finite or upper > 2**62 else int(upper)
        self.ranges[name] = (max(lo, 1), hi)

    def convert(self, expr, where: str = "") -> sympy.Expr:
        """torch sympy expression -> plain sympy over plait's symbols."""
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return expr
        if expr.is_Symbol:
            if expr not in self.names:
                raise SymbolError(
                    f"{where}: the shape depends on '{expr}', a size that is not a dim of any "
                    "input (a data-dependent shape); plait cannot compile it yet. Make the size "
                    "static, or compute it from input shapes"
                )
            return symbolic.symbol(self.names[expr])
        args = [self.convert(a, where) for a in expr.args]
        if expr.is_Add:
            return sympy.Add(*args)
        if expr.is_Mul:
            return sympy.Mul(*args)
        if expr.is_Pow and expr.exp.is_Integer and int(expr.exp) > 0:
            return args[0] ** int(expr.exp)
        kind = type(expr).__name__
        if kind in ("FloorDiv", "CleanDiv"):
            return sympy.floor(args[0] / args[1])
        if kind == "CeilDiv":
            return sympy.ceiling(args[0] / args[1])
        if kind in ("Mod", "PythonMod"):
            return sympy.Mod(args[0], args[1])
        if kind == "Max":
            return sympy.Max(*args)
        if kind == "Min":
            return sympy.Min(*args)
        if kind in ("PowByNatural",):
            return args[0] ** args[1]
        raise SymbolError(f"{where}: shape expression {expr} ({kind}) is not supported by plait")
