"""Analysis: each op's sharding strategy chosen by one integer program (Alpa's
formulation, on one mesh axis).

Strategies come from the rules (`rules.decide`) asked with every
placement an input could arrive in (replicated, sharded on each dim, partial),
plus running replicated; each costs its per-rank compute time (roofline on the
hardware file, work split n ways when the op's result is sharded or partial)
and holds its weights (split when sharded). An edge from a producer to a
consumer costs the collective that turns the producer's placement into the
one the consumer needs (alpha-beta over the mesh axis's link); weights are
sliced at load time, for free. One choice per op, least total time, weights
and state (a KV cache) within the `memory` budget per device:

    solution = solve(blocks, n, hardware, link, values, memory=80e9)
    solution.decisions[op], solution.status, solution.objective

Alike ops of repeated transformer blocks (module path alike but for the layer
index; same target, arguments and types) share one choice, so the program's
size does not grow with depth.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import sympy
from xdsl.dialects import func
from xdsl.ir import Operation, SSAValue

from ...cost.comm_cost import all_reduce_time, ring_steps
from ...cost.estimate import op_dtype
from ...cost.op_cost import op_cost
from ...hardware import Hardware, Link
from ...ir import symbolic
from ...ir.attrs import REPLICATE, Placement, partial, shard
from ...ir.errors import PlaitError
from ...ir.ops import CallOp, EmbeddingOp, ParamOp
from ...ir.text import module_path
from ...ir.types import TensorType
from ..milp import choose_one_each
from .rules import Decision, Parallel, PlanError, PlanStyle, decide, replicated

_IMPOSSIBLE = math.inf  # no collective makes a value partial
_PER_COLLECTIVE = 1e-7  # seconds: breaks ties between plans equal in the alpha-beta model


class SolveError(PlaitError):
    pass


@dataclass
class Solution:
    decisions: dict[Operation, Decision]
    status: str  # "optimal" | "feasible" (time limit, best found)
    objective: float  # predicted seconds per step of one rank
    weight_bytes: float  # weights and state (a KV cache) per device
    groups: int  # choice variables after sharing repeated blocks
    ops: int


def _key(d: Decision) -> tuple:
    return (tuple(d.inputs), tuple(d.outputs), d.parallel, tuple(sorted(d.sizes.items())))


def strategies(op: CallOp, n: int, params: set[SSAValue], blocked=()) -> list[Decision]:
    """Every distinct decision the rules make for `op`, whatever its inputs arrive
    as; `blocked[i]`: the blocked placements (a fused projection's output) that
    input i's producer may give it."""
    types = [v.type for v in op.inputs]
    options: list[list[Placement]] = []
    for t in types:
        rank = t.rank if isinstance(t, TensorType) else 0
        options.append([shard(d) for d in range(rank)] + [partial("sum")])
    arrivals = [[REPLICATE] * len(types)]
    for i, choices in enumerate(options):
        for p in choices:
            arrivals.append([p if j == i else REPLICATE for j in range(len(types))])
    for p in {p for choices in options for p in choices}:  # all alike (bmm, add of partials)
        if all(p in choices for choices in options):
            arrivals.append([p] * len(types))
    for i, choices in enumerate(blocked):
        for p in choices:
            arrivals.append([p if j == i else REPLICATE for j in range(len(types))])
    found = {_key(replicated(op)): replicated(op)}
    for arriving in arrivals:
        d = decide(op, arriving, types, n, params)
        found.setdefault(_key(d), d)
    if isinstance(op, EmbeddingOp):  # its splits are styles (vocabulary, embedding dim)
        for style in (PlanStyle.ROWWISE, PlanStyle.COLWISE):
            try:
                d = decide(op, arrivals[0], types, n, params, style)
            except PlanError:  # that dim does not split
                continue
            found.setdefault(_key(d), d)
    return list(found.values())


def _evaluate(expr, subs) -> float:
    return float(sympy.sympify(expr).xreplace(subs))


class _Costs:
    def __init__(self, hw: Hardware, n: int, link: Link, subs: dict):
        self.hw, self.n, self.link, self.subs = hw, n, link, subs
        self._sizes: dict[TensorType, float] = {}  # bytes of each type, evaluated once

    def nbytes(self, t: TensorType) -> float:
        if t not in self._sizes:
            self._sizes[t] = _evaluate(t.nbytes, self.subs)
        return self._sizes[t]

    def compute(self, op: CallOp, d: Decision) -> float:
        """Per-rank seconds of `op`, and of the all-reduce inside a row-parallel
        layer with a bias (its result is replicated, not partial)."""
        cost = op_cost(op)
        if cost.kind != "compute":
            return 0.0
        inside = 0.0
        if d.parallel is Parallel.ROW and d.outputs == [REPLICATE]:
            inside = self.reshard(op.results[0].type, partial("sum"), REPLICATE)
        split = d.parallel is not None or any(p.kind != "replicate" for p in d.outputs)
        k = self.n if split else 1
        flops, moved, weights = (
            _evaluate(e, self.subs) / k for e in (cost.flops, cost.bytes, cost.weight_bytes)
        )
        elements = None if cost.elements is None else _evaluate(cost.elements, self.subs) / k
        time = self.hw.roofline(
            flops, moved, op_dtype(op), cost.rate, op.target_name, weights, elements
        )
        return float(time) + inside

    def weight(self, t: TensorType, p: Placement) -> float:
        """Bytes a rank holds of a weight (or state) of type `t` placed `p`."""
        return self.nbytes(t) / (self.n if p.kind == "shard" else 1)

    def load(self, t: TensorType, have: Placement, want: Placement) -> float:
        """A weight is loaded whole or as this rank's slice, never as a partial sum."""
        return _IMPOSSIBLE if want.kind == "partial" else 0.0

    def reshard(self, t: TensorType, have: Placement, want: Placement) -> float:
        """Seconds to turn a value placed `have` into `want` (global type `t`):
        the collective's alpha-beta time plus a kernel launch (at least
        `_PER_COLLECTIVE`, so that of two plans moving the same bytes, such as
        an all-reduce and two all-gathers, the one with fewer collectives wins)."""
        if have == want:
            return 0.0
        if want.kind == "partial" or have.blocks or want.blocks:
            return _IMPOSSIBLE  # blocks: only views and cuts of them carry them (see rules)
        size = sympy.Float(self.nbytes(t))
        launch = max(self.hw.overhead(None, view=False), _PER_COLLECTIVE)
        if want.kind == "replicate" and have.kind == "partial":
            return float(all_reduce_time(self.n, size, self.link)) + launch
        if have.kind == "replicate":  # a local slice
            return self.hw.overhead(None, view=True)
        # all-gather; reduce-scatter; or shard(d) -> shard(e): gather, keep a slice
        return float(ring_steps(self.n, size, self.link)) + launch


_LAYER = re.compile(r"\.(\d+)(?=\.|$)")


def _group_keys(ops: list[CallOp]) -> dict[CallOp, tuple]:
    """Ops alike at the same place of repeated blocks share a key: the module
    path with layer indices wildcarded, the op's target, arguments and types,
    and which of the alike ops in that module it is (counting only alike ops,
    so an op that CSE moved into the first layer does not shift the rest)."""
    kinds: dict[tuple, int] = {}  # alike ops -> a small number, so keys hash fast
    seen: dict[tuple, int] = defaultdict(int)
    keys = {}
    for op in ops:
        path = module_path(op)
        if not path:
            keys[op] = (id(op),)
            continue
        alike = (
            _LAYER.sub(".*", path),
            op.target_name,
            op.args,
            tuple(v.type for v in op.operands),
            tuple(r.type for r in op.results),
        )
        kind = kinds.setdefault(alike, len(kinds))
        keys[op] = (kind, seen[(path, kind)])
        seen[(path, kind)] += 1
    return keys


@dataclass
class Problem:
    """One choice per group of alike ops: `options[g][i]` costs `costs[g][i]`
    seconds and holds `memory[g][i]` weight bytes; choosing i for g and j for
    h adds `pairs[(g, h)][(i, j)]` seconds of resharding."""

    keys: dict[CallOp, tuple]
    options: dict[tuple, list[Decision]]
    costs: dict[tuple, list[float]]
    memory: dict[tuple, list[float]]
    pairs: dict[tuple, dict[tuple, float]]

    def objective(self, picks: dict[tuple, int]) -> float:
        return sum(self.costs[g][i] for g, i in picks.items()) + sum(
            table.get((picks[g], picks[h]), 0.0) for (g, h), table in self.pairs.items()
        )


def formulate(
    blocks,
    n: int,
    hw: Hardware,
    link: Link,
    values: dict[str, int],
    style_of=lambda op: None,
    fixed: dict | None = None,
) -> Problem:
    """The program for the functions' `blocks` together: functions that share
    a weight or state (@prefill and @decode) must slice it alike. `style_of(op)`
    is a manual plan's style for a layer, which then has that one option;
    `fixed[op]` a decision the pass makes regardless (expert parallelism)."""
    subs = {symbolic.symbol(k): sympy.Integer(v) for k, v in values.items()}
    costs = _Costs(hw, n, link, subs)
    params = {o.result for b in blocks for o in b.ops if isinstance(o, ParamOp)}
    ops, keys = _grouped_calls(blocks)
    groups = _Groups.choose(ops, keys, n, params, costs, style_of, fixed or {})
    group_cost = {  # ops of one group have the same types, so the same compute costs
        key: [costs.compute(alike[0], d) * len(alike) for d in groups.options[key]]
        for key, alike in groups.members.items()
    }
    pairs = _resharding(_edges(blocks, ops, keys, params), groups, costs, group_cost)
    _slice_alike(ops, keys, groups.options, params, group_cost, pairs)
    return Problem(
        keys, groups.options, group_cost, groups.memory, {k: dict(t) for k, t in pairs.items()}
    )


def _grouped_calls(blocks) -> tuple[list[CallOp], dict[CallOp, tuple]]:
    """The calls of all blocks, and each one's group key (its block's index first)."""
    ops, keys = [], {}
    for index, block in enumerate(blocks):
        calls = [o for o in block.ops if isinstance(o, CallOp)]
        ops += calls
        keys.update({op: (index, *key) for op, key in _group_keys(calls).items()})
    return ops, keys


@dataclass
class _Groups:
    """Each group's options, its ops (`members`, the first is `representative`)
    and the weight bytes each option holds."""

    options: dict[tuple, list[Decision]]
    members: dict[tuple, list[CallOp]]
    memory: dict[tuple, list[float]]
    representative: dict[tuple, CallOp]

    @classmethod
    def choose(cls, ops, keys, n: int, params, costs: _Costs, style_of, fixed) -> _Groups:
        groups = cls({}, defaultdict(list), {}, {})
        held: set[str] = set()  # weights counted: each once, at its first use in any function
        for op in ops:
            key = keys[op]
            if key not in groups.options:
                groups.representative[key] = op
                groups.options[key] = groups._options_of(op, keys, n, params, style_of, fixed)
                groups.memory[key] = [0.0] * len(groups.options[key])
            groups.members[key].append(op)
            owned = [
                i
                for i, v in enumerate(op.inputs)
                if v in params and v.owner.weight_name not in held
            ]
            held.update(op.inputs[i].owner.weight_name for i in owned)
            for j, d in enumerate(groups.options[key]):
                groups.memory[key][j] += sum(
                    costs.weight(op.inputs[i].type, d.inputs[i]) for i in owned
                )
        return groups

    def _options_of(self, op: CallOp, keys, n: int, params, style_of, fixed) -> list[Decision]:
        style = style_of(op)
        types = [v.type for v in op.inputs]
        if op in fixed:
            return [fixed[op]]
        if style:
            return [decide(op, [REPLICATE] * len(types), types, n, params, style)]
        produced = [self.options.get(keys.get(v.owner), ()) for v in op.inputs]
        blocked = [  # a fused projection's blocked output may arrive
            sorted({d.outputs[v.index] for d in ds if d.outputs[v.index].blocks}, key=str)
            for v, ds in zip(op.inputs, produced)
        ]
        return strategies(op, n, params, blocked)


def _edges(blocks, ops, keys, params) -> dict[tuple, int]:
    """(source, consumer) -> how often; a source is (group, result index), a
    weight ("weight", type) or a program input's type, a consumer (group,
    input index) or None for a program result."""
    producer = {r: (keys[o], k) for o in ops for k, r in enumerate(o.results)}
    edges: dict[tuple, int] = defaultdict(int)
    for op in ops:
        for index, value in enumerate(op.inputs):
            source = ("weight", value.type) if value in params else producer.get(value, value.type)
            edges[(source, (keys[op], index))] += 1
    for ret in (o for b in blocks for o in b.ops if isinstance(o, func.ReturnOp)):
        for value in ret.operands:
            edges[(producer.get(value, value.type), None)] += 1
    return edges


def _resharding(edges, groups: _Groups, costs: _Costs, group_cost) -> dict[tuple, dict]:
    """The cost of moving each edge's tensor from the placement its source
    gives to the one its consumer wants: into `group_cost` where one side is
    fixed (or both are one group), else per pair of choices (returned)."""
    pairs: dict[tuple, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for (source, consumer), count in edges.items():
        reshard = costs.reshard
        if isinstance(source, tuple) and source[0] == "weight":  # each rank loads its slice
            group, t, haves = None, source[1], [REPLICATE]
            reshard = costs.load
        elif isinstance(source, tuple):
            group, result = source
            t = groups.representative[group].results[result].type
            haves = [d.outputs[result] for d in groups.options[group]]
        else:  # a program input: replicated
            group, t, haves = None, source, [REPLICATE]
        if consumer is None:  # a program result: must be replicated
            target, wants = None, [REPLICATE]
        else:
            target, index = consumer
            wants = [d.inputs[index] for d in groups.options[target]]
        if group is None and target is None:
            continue  # a program input or weight returned as it is
        table = [[count * reshard(t, have, want) for want in wants] for have in haves]
        if group is None:
            for j, cost in enumerate(table[0]):
                group_cost[target][j] += cost
        elif target is None:
            for i, row in enumerate(table):
                group_cost[group][i] += row[0]
        elif group == target:  # repeated blocks feeding each other: one shared choice
            for i, row in enumerate(table):
                group_cost[group][i] += row[i]
        else:
            for i, row in enumerate(table):
                for j, cost in enumerate(row):
                    pairs[(group, target)][(i, j)] += cost
    return pairs


def _slice_alike(ops, keys, options, params, costs, pairs) -> None:
    """A weight or state that several functions read (@prefill and @decode) is
    held once per rank, so every use of it takes one slicing: each use is
    tied to the first, by forbidding pairs of choices that differ."""
    uses: dict[str, list[tuple[tuple, int]]] = defaultdict(list)
    for op in ops:
        for index, value in enumerate(op.inputs):
            if value in params:
                uses[value.owner.weight_name].append((keys[op], index))
    for found in uses.values():
        if len({g[0] for g, _ in found}) < 2:
            continue  # one function: the pass keeps a copy per slicing
        (g, a), rest = found[0], found[1:]
        for h, b in rest:
            if h == g:  # one choice for both uses: forbid the choices that differ
                for i, d in enumerate(options[g]):
                    if d.inputs[a] != d.inputs[b]:
                        costs[g][i] = _IMPOSSIBLE
                continue
            table = pairs[(g, h)]
            for i, d in enumerate(options[g]):
                for j, e in enumerate(options[h]):
                    if d.inputs[a] != e.inputs[b]:
                        table[(i, j)] = _IMPOSSIBLE


def solve(
    blocks,
    n: int,
    hw: Hardware,
    link: Link,
    values: dict[str, int],
    memory: float | None = None,
    timeout_s: float = 10.0,
    style_of=lambda op: None,
    fixed: dict | None = None,
) -> Solution:
    problem = formulate(blocks, n, hw, link, values, style_of, fixed)
    return optimize(problem, n, memory, timeout_s)


def optimize(problem: Problem, n: int, memory: float | None = None, timeout_s: float = 10.0):
    limits = []
    if memory is not None:
        least = sum(min(m) for m in problem.memory.values())
        if least > memory:
            raise SolveError(
                f"memory budget {memory:.4g} B per device is below the minimum for weights on "
                f"{n} ranks, {least:.4g} B; raise memory or use a larger mesh"
            )
        limits.append(({g: dict(enumerate(m)) for g, m in problem.memory.items()}, memory))
    picks, status = choose_one_each(
        {g: dict(enumerate(c)) for g, c in problem.costs.items()},
        problem.pairs,
        limits,
        timeout_s,
    )
    if picks is None:
        budget = f" within memory={memory:.4g} B per device" if memory is not None else ""
        raise SolveError(
            f"no sharding plan fits{budget} ({status}): a weight read by several functions "
            "must be sliced alike everywhere, which can need more than each op's smallest "
            "choice; raise memory or use a larger mesh"
        )
    return Solution(
        decisions={op: problem.options[key][picks[key]] for op, key in problem.keys.items()},
        status=status,
        objective=problem.objective(picks),
        weight_bytes=sum(problem.memory[g][i] for g, i in picks.items()),
        groups=len(problem.options),
        ops=len(problem.keys),
    )
