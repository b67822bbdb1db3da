"""One choice per group, at the least total cost, as a mixed-integer program.

    picks, status = choose_one_each(
        {"a": {"x": 1.0, "y": 2.0}, "b": {"x": 0.0, "y": 5.0}},   # cost of each choice
        pairs={("a", "b"): {("x", "y"): 3.0}},                   # extra cost of a choice pair
        limits=[({"a": {"x": 4}, "b": {"y": 4}}, 6)],            # sum of amounts <= bound
    )

Each choice is a binary variable, one per group; a pair cost is linearised
the way Alpa does its resharding edges (a variable per choice pair whose row
and column sums equal the two groups' choices, so it is 0/1 whenever they
are); an infinite cost forbids a choice or pair. Solved by HiGHS through
scipy.optimize.milp: exact, deterministic and fast at the sizes plait meets.
Returns (picks, status) with status "optimal" or "feasible" (time limit hit
with a solution), or (None, "infeasible" | "timeout").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

Costs = Mapping[Hashable, Mapping[Hashable, float]]


def choose_one_each(
    costs: Costs,
    pairs: Mapping[tuple[Hashable, Hashable], Mapping[tuple[Hashable, Hashable], float]]
    | None = None,
    limits: Sequence[tuple[Costs, float]] = (),
    timeout_s: float = 10.0,
) -> tuple[dict | None, str]:
    if not costs:
        return {}, "optimal"
    column: dict[tuple[Hashable, Hashable], int] = {}
    for group, options in costs.items():
        for choice in options:
            column[(group, choice)] = len(column)
    objective = [costs[g][c] for g, c in column]
    rows: list[tuple[dict[int, float], float, float]] = [
        ({column[(g, c)]: 1.0 for c in options}, 1.0, 1.0) for g, options in costs.items()
    ]
    for (g1, g2), table in (pairs or {}).items():
        edge = {}
        for c1 in costs[g1]:
            for c2 in costs[g2]:
                edge[(c1, c2)] = len(objective)
                objective.append(table.get((c1, c2), 0.0))
        for c1 in costs[g1]:  # the pair's row sums are g1's choice...
            row = {edge[(c1, c2)]: 1.0 for c2 in costs[g2]}
            row[column[(g1, c1)]] = -1.0
            rows.append((row, 0.0, 0.0))
        for c2 in costs[g2]:  # ...and its column sums g2's
            row = {edge[(c1, c2)]: 1.0 for c1 in costs[g1]}
            row[column[(g2, c2)]] = -1.0
            rows.append((row, 0.0, 0.0))
    for amounts, bound in limits:
        row = {
            column[(g, c)]: float(a) for g, options in amounts.items() for c, a in options.items()
        }
        rows.append((row, -np.inf, float(bound)))
    n = len(objective)
    entries = [(i, j, v) for i, (row, _, _) in enumerate(rows) for j, v in row.items()]
    i, j, v = zip(*entries) if entries else ((), (), ())
    matrix = coo_array((v, (i, j)), shape=(len(rows), n))
    integral = np.zeros(n)
    integral[: len(column)] = 1  # pair variables follow from the choices
    # an infinite cost forbids the choice (pair); the rest are scaled so the
    # largest is 1e6: HiGHS stops within an absolute gap of 1e-6, which is
    # larger than differences in seconds between plans
    objective = np.asarray(objective, dtype=float)
    allowed = np.isfinite(objective)
    objective[~allowed] = 0.0
    top = np.abs(objective).max(initial=0.0)
    if top > 0:
        objective *= 1e6 / top
    result = milp(
        objective,
        integrality=integral,
        bounds=Bounds(0, allowed.astype(float)),
        constraints=[LinearConstraint(matrix, [r[1] for r in rows], [r[2] for r in rows])],
        options={"time_limit": timeout_s, "mip_rel_gap": 1e-7},  # tie-breakers are small
    )
    if result.x is None:
        return None, "infeasible" if result.status == 2 else "timeout"
    picks = {g: c for (g, c), k in column.items() if result.x[k] > 0.5}
    return picks, "optimal" if result.status == 0 else "feasible"
