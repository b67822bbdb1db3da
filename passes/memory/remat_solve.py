"""Which forward values to store and which to recompute in backward, at the
least recompute time, with the stored bytes within a budget: an integer
program in Checkmate's spirit (Jain et al., 2020), solved by HiGHS.

    plan = solve(graph, budget)          # graph: remat_graph.step_graph(...)
    plan.stored, plan.recomputed, plan.saved_bytes, plan.time, plan.status

Per group g of nodes (see remat_graph: repeated layers share one), binaries
S_g (stored: the forward's results live until backward last reads them)
and R_g (recomputed: the op is cloned into backward, once, before its first
reader there):

    S_g + R_g >= 1          for a node backward reads (a saved value)
    R_g <= S_h + R_h        for a node of g that reads a node of h: recomputing
                            needs its inputs, stored or recomputed themselves
    S_g <= S_h              for a view of a node of h: it keeps h's memory
    R_g = 0                 for a node that is not pure and deterministic
    S_g = 1                 for what the function returns (the loss)
    sum bytes_g S_g <= budget
    minimize sum time_g R_g (+ a tie-break toward fewer stored bytes)

Simplification against Checkmate's full schedule: each value is computed
once in the forward and at most once more in backward (no per-stage
recompute choices), and the budget bounds what the forward leaves for
backward (the saved activations), not the backward's transient peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array
from xdsl.ir import Operation

from ...ir.errors import PlaitError
from .remat_graph import StepGraph


class RematError(PlaitError):
    """No plan stores within the budget."""


@dataclass
class Plan:
    stored: set[Operation] = field(default_factory=set)
    recomputed: set[Operation] = field(default_factory=set)  # cloned into backward
    saved_bytes: int = 0  # what the forward leaves for backward
    time: float = 0.0  # seconds of the recomputed ops
    status: str = "optimal"
    groups: int = 0  # the integer program's groups (its variables are twice that)


@dataclass
class _Program:
    groups: list[tuple]
    bytes: np.ndarray
    time: np.ndarray
    rows: list[tuple[dict[int, float], float, float]]
    lower: np.ndarray
    upper: np.ndarray


def _formulate(graph: StepGraph) -> _Program:
    groups = list(dict.fromkeys(graph.group[n] for n in graph.nodes))
    index = {g: i for i, g in enumerate(groups)}
    n = len(groups)
    size, time = np.zeros(n), np.zeros(n)
    lower, upper = np.zeros(2 * n), np.ones(2 * n)  # [S_0..S_n-1, R_0..R_n-1]
    rows: dict[tuple, tuple[dict[int, float], float, float]] = {}
    for node in graph.nodes:
        g = index[graph.group[node]]
        size[g] += graph.bytes[node]
        time[g] += graph.time[node]
        if not graph.recomputable[node]:
            upper[n + g] = 0
        if node in graph.returned:
            lower[g] = 1
        if node in graph.saved:
            rows[("saved", g)] = ({g: 1.0, n + g: 1.0}, 1.0, np.inf)
        for source in graph.inputs[node]:
            h = index[graph.group[source]]
            if h != g:
                rows[("reads", g, h)] = ({n + g: 1.0, h: -1.0, n + h: -1.0}, -np.inf, 0.0)
        if node in graph.view_of:
            h = index[graph.group[graph.view_of[node]]]
            if h != g:
                rows[("view", g, h)] = ({g: 1.0, h: -1.0}, -np.inf, 0.0)
    return _Program(groups, size, time, list(rows.values()), lower, upper)


def _run(program: _Program, objective: np.ndarray, budget: float | None, timeout_s: float):
    n = len(program.groups)
    rows = list(program.rows)
    if budget is not None:
        rows.append(({g: float(program.bytes[g]) for g in range(n)}, -np.inf, float(budget)))
    entries = [(i, j, v) for i, (row, _, _) in enumerate(rows) for j, v in row.items()]
    i, j, v = zip(*entries) if entries else ((), (), ())
    constraints = (
        [LinearConstraint(coo_array((v, (i, j)), shape=(len(rows), 2 * n)), *zip(*_bounds(rows)))]
        if rows
        else []
    )
    return milp(
        objective,
        integrality=np.ones(2 * n),
        bounds=Bounds(program.lower, program.upper),
        constraints=constraints,
        options={"time_limit": timeout_s, "mip_rel_gap": 1e-9},
    )


def _bounds(rows):
    return [(low, high) for _, low, high in rows]


def solve(graph: StepGraph, budget: float, timeout_s: float = 10.0) -> Plan:
    """The plan of least recompute time that stores at most `budget` bytes;
    out of time with no plan found, the plan that stores everything (if it
    fits). A RematError states the least bytes any plan stores."""
    program = _formulate(graph)
    n = len(program.groups)
    total_time = program.time.sum() or 1.0
    total_bytes = program.bytes.sum() or 1.0
    # seconds first; among plans as fast, the one storing fewest bytes
    objective = np.concatenate([1e-7 * program.bytes / total_bytes, program.time / total_time])
    result = _run(program, objective, budget, timeout_s)
    if result.x is not None:
        status = "optimal" if result.status == 0 else "feasible (time limit)"
        return _realize(graph, _choice(program, result.x), status, n)
    if result.status != 2:  # out of time, no plan found
        plan = _realize(graph, {g: (1, 0) for g in program.groups}, "fallback (time limit)", n)
        if plan.saved_bytes <= budget:
            return plan
        raise RematError(
            f"the solver found no plan within {timeout_s:g} s and storing everything takes "
            f"{plan.saved_bytes} B, over the budget of {budget:.0f} B; give it a longer timeout"
        )
    least = least_saved(graph, timeout_s, program)
    reachable = f"{least} B" if least is not None else "unknown (out of time)"
    raise RematError(
        f"no plan keeps the saved activations within {budget:.0f} B; the least any plan "
        f"stores is {reachable} (what is not recomputable, such as random ops, and the loss "
        "must be stored); raise the budget"
    )


def least_saved(graph: StepGraph, timeout_s: float = 10.0, program=None) -> int | None:
    """The least bytes any plan stores (None: out of time)."""
    program = program or _formulate(graph)
    n = len(program.groups)
    least = _run(program, np.concatenate([program.bytes, np.zeros(n)]), None, timeout_s)
    if least.x is None:
        return None
    return _realize(graph, _choice(program, least.x), "", n).saved_bytes


def _choice(program: _Program, x: np.ndarray) -> dict[tuple, tuple[int, int]]:
    x = np.round(x).astype(int)
    n = len(program.groups)
    return {g: (x[k], x[n + k]) for k, g in enumerate(program.groups)}


def _realize(graph: StepGraph, choice: dict[tuple, tuple[int, int]], status: str, groups: int):
    """The nodes actually recomputed (those a saved, unstored value needs)
    and the bytes actually stored (nodes read after the cut, and their bases)."""
    stored = {n for n in graph.nodes if choice[graph.group[n]][0]}
    recomputed: set[Operation] = set()
    pending = [n for n in graph.saved if n not in stored]
    while pending:
        node = pending.pop()
        if node in recomputed:
            continue
        if not choice[graph.group[node]][1]:
            raise AssertionError(f"plan neither stores nor recomputes {node.name}")
        recomputed.add(node)
        pending.extend(s for s in graph.inputs[node] if s not in stored)
    read = {n for n in graph.saved if n in stored}
    read |= {s for n in recomputed for s in graph.inputs[n] if s in stored}
    held = set()
    for node in read:
        while node in graph.view_of:
            node = graph.view_of[node]
        held.add(node)
    return Plan(
        stored=read,
        recomputed=recomputed,
        saved_bytes=sum(graph.bytes[n] for n in held),
        time=sum(graph.time[n] for n in recomputed),
        status=status,
        groups=groups,
    )
