"""The integer-program helper against brute force on small random problems."""

from __future__ import annotations

import itertools
import random

import pytest
from plait.passes.milp import choose_one_each


def _random_problem(rng: random.Random):
    groups = {
        f"g{i}": {c: rng.uniform(0, 10) for c in "abc"[: rng.randint(1, 3)]}
        for i in range(rng.randint(2, 7))
    }
    names = list(groups)
    pairs = {}
    for g1, g2 in itertools.combinations(names, 2):
        if rng.random() < 0.4:
            pairs[(g1, g2)] = {
                (c1, c2): rng.uniform(0, 8)
                for c1 in groups[g1]
                for c2 in groups[g2]
                if rng.random() < 0.7
            }
    memory = {g: {c: rng.randint(1, 5) for c in options} for g, options in groups.items()}
    bound = sum(min(m.values()) for m in memory.values()) + rng.randint(0, 6)
    return groups, pairs, [(memory, bound)]


def _total(groups, pairs, picks):
    return sum(groups[g][c] for g, c in picks.items()) + sum(
        table.get((picks[g1], picks[g2]), 0.0) for (g1, g2), table in pairs.items()
    )


@pytest.mark.parametrize("seed", range(40))
def test_objective_equals_brute_force(seed):
    rng = random.Random(seed)
    groups, pairs, limits = _random_problem(rng)
    (memory, bound), names = limits[0], list(groups)
    feasible = [
        dict(zip(names, combo))
        for combo in itertools.product(*(groups[g] for g in names))
        if sum(memory[g][c] for g, c in zip(names, combo)) <= bound
    ]
    picks, status = choose_one_each(groups, pairs, limits)
    assert status == "optimal"
    assert sum(memory[g][c] for g, c in picks.items()) <= bound
    best = min(_total(groups, pairs, p) for p in feasible)
    assert _total(groups, pairs, picks) == pytest.approx(best, abs=1e-6)


def test_infeasible_is_reported():
    picks, status = choose_one_each({"a": {"x": 1.0}}, limits=[({"a": {"x": 3}}, 2)])
    assert picks is None and status == "infeasible"


def test_an_infinite_cost_forbids_a_pair():
    costs = {"a": {"x": 0.0, "y": 1.0}, "b": {"x": 0.0, "y": 1.0}}
    picks, status = choose_one_each(costs, {("a", "b"): {("x", "x"): float("inf")}})
    assert status == "optimal" and picks != {"a": "x", "b": "x"}
    assert sorted(picks.values()) == ["x", "y"]
