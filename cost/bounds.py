"""z3 proofs about formulas over size symbols, for their whole declared range.

    result = prove_at_most(activation_bytes, 80e9, {"batch": (1, 64), "seq": (2, 8192)})
    result.proved           # True: holds for every batch and seq in range
    result.counterexample   # else values where it fails, e.g. {"batch": 64, "seq": 8192}
    prove_divisible(2 * k, 2, {"k": (1, 512)}).proved   # True: seq = 2k splits in two

Every call has a time limit; when z3 cannot decide in time the result says
so (`proved` False, `unknown` True) instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import z3


@dataclass
class BoundResult:
    proved: bool
    counterexample: dict[str, int] = field(default_factory=dict)
    unknown: bool = False


def to_z3(expr: sympy.Expr, variables: dict[str, z3.ArithRef]) -> z3.ArithRef:
    """A sympy formula over integer symbols as a z3 term."""
    expr = sympy.sympify(expr)
    if expr.is_Symbol:
        return variables[expr.name]
    if expr.is_Integer:
        return z3.IntVal(int(expr))
    if expr.is_Rational:
        return z3.RealVal(f"{expr.p}/{expr.q}")
    if expr.is_Float:
        return z3.RealVal(str(sympy.Rational(expr)))
    args = [to_z3(a, variables) for a in expr.args]
    if expr.is_Add:
        return z3.Sum(*args)
    if expr.is_Mul:
        return z3.Product(*args)
    if expr.is_Pow and expr.exp.is_Integer and int(expr.exp) > 0:
        return z3.Product(*([args[0]] * int(expr.exp)))
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        n, d = to_z3(num, variables), to_z3(den, variables)
        return n / d if isinstance(expr, sympy.floor) else -((-n) / d)
    if isinstance(expr, sympy.Mod):
        return args[0] % args[1]
    if isinstance(expr, (sympy.Max, sympy.Min)):
        out = args[0]
        for a in args[1:]:
            out = z3.If(a > out, a, out) if isinstance(expr, sympy.Max) else z3.If(a < out, a, out)
        return out
    raise ValueError(f"cannot express {expr} for z3")


def _refute(expr: sympy.Expr, claim_fails, ranges, timeout_ms: int) -> BoundResult:
    """Search the symbols' ranges for values where `claim_fails(term)` holds:
    none means the claim is proved; some are its counterexample."""
    expr = sympy.sympify(expr)
    variables = {s.name: z3.Int(s.name) for s in expr.free_symbols}
    solver = z3.Solver()
    solver.set("timeout", timeout_ms)
    for name, var in variables.items():
        lo, hi = ranges.get(name, (1, None))
        solver.add(var >= lo)
        if hi is not None:
            solver.add(var <= hi)
    try:
        failure = claim_fails(to_z3(expr, variables))
    except ValueError:  # a formula z3 cannot express: not proved
        return BoundResult(False, unknown=True)
    if failure is None:
        return BoundResult(False, unknown=True)
    solver.add(failure)
    verdict = solver.check()
    if verdict == z3.unsat:
        return BoundResult(proved=True)
    if verdict == z3.sat:
        model = solver.model()
        return BoundResult(False, {k: model.eval(v).as_long() for k, v in variables.items()})
    return BoundResult(False, unknown=True)


def prove_at_most(
    expr: sympy.Expr,
    limit: float,
    ranges: dict[str, tuple[int, int | None]],
    timeout_ms: int = 5000,
) -> BoundResult:
    """Does expr <= limit hold for every value of the symbols in their ranges?"""
    bound = z3.RealVal(str(sympy.Rational(limit)))
    return _refute(expr, lambda term: term > bound, ranges, timeout_ms)


def prove_divisible(
    expr: sympy.Expr, n: int, ranges: dict[str, tuple[int, int | None]], timeout_ms: int = 2000
) -> BoundResult:
    """Is expr a multiple of n for every value of the symbols in their ranges?"""
    return _refute(expr, lambda term: term % n != 0 if term.is_int() else None, ranges, timeout_ms)
