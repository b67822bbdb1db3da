"""Analysis: the expert MLPs of mixture-of-experts layers, which the shard pass
splits by expert (expert parallelism).

transformers runs a layer's experts as grouped matrix products over the
routed rows, sorted by expert (`offsets[e]` ends expert e's rows):

    h = grouped_mm(rows, W1[E, in, mid], offsets)
    h = act(h)                                   row-wise: chunk, silu, mul
    y = grouped_mm(h, W2[E, mid, out], offsets)

Every row is computed by one expert. A rank holding some of the experts
computes their rows and leaves the others zero; zero rows stay zero through
the row-wise ops between (each maps 0 to 0: `ZERO_PRESERVING`), so the
ranks' `y` sum to the whole product: partial sums, reduced once after the
routing weights are applied and each token's rows are summed. With the
tokens replicated (tensor parallelism) no token moves; with the tokens split
(an `ep` axis) the rows are picked by `gather` = tokens[token_of_row], which
the shard pass replaces by an all-to-all that brings each rank the rows of
its own experts.

An MLP is recognized only when every value between the two products feeds
only ops of that table or the second product; anything else (a bias added
between, an activation with f(0) != 0) keeps the experts replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.ir import Operation, SSAValue

from ...ir.ops import CallOp, LinearOp, ParamOp, ReshapeOp

# grouped products over expert-sorted rows: target -> (rows, weight, offsets) argument names
GROUPED_MM = {
    "transformers::grouped_mm_fallback": ("input", "weight", "offs"),
    "aten::_grouped_mm": ("self", "mat2", "offs"),
}
# row-wise ops with f(0) = 0 (a product is 0 when either factor is); splits along the last dim
ZERO_PRESERVING = {
    "aten::silu", "aten::gelu", "aten::relu", "aten::mul.Tensor", "aten::neg", "aten::tanh",
    "aten::chunk", "aten::split.Tensor", "aten::split_with_sizes", "aten::slice.Tensor",
    "aten::contiguous", "aten::clone", "aten::to.dtype", "aten::_to_copy",
}  # fmt: skip
_SPLITS = {"aten::chunk", "aten::split.Tensor", "aten::split_with_sizes", "aten::slice.Tensor"}


@dataclass
class ExpertMLP:
    first: CallOp  # grouped product reading the routed rows
    last: CallOp  # grouped product whose result the ranks sum
    between: list[CallOp]  # the row-wise ops from first to last
    views: list[CallOp]  # ops from an expert weight to a product (a transpose)
    router: LinearOp | None  # the linear whose scores choose the experts
    experts: int
    # tokens[token_of_row]: the routed rows picked from the tokens [T, dim], if so made
    gather: CallOp | None = None

    @property
    def tokens(self) -> SSAValue | None:
        return self.gather.inputs[0] if self.gather else None

    @property
    def token_of_row(self) -> SSAValue | None:
        return self.gather.inputs[1] if self.gather else None


def operands(op: CallOp) -> tuple[SSAValue, SSAValue, SSAValue] | None:
    """(rows, weight, offsets) of a grouped product, or None for any other op."""
    names = GROUPED_MM.get(op.target_name) if isinstance(op, CallOp) else None
    if names is None:
        return None
    values = [op.input_of(op.arg(name)) for name in names]
    return None if any(v is None for v in values) else tuple(values)


def find_expert_mlps(block) -> list[ExpertMLP]:
    found = []
    for op in block.ops:
        grouped = operands(op)
        if grouped is None or _producer_is_grouped(grouped[0]):
            continue
        mlp = _mlp_from(op, grouped)
        if mlp is not None:
            found.append(mlp)
    return found


def _producer_is_grouped(value: SSAValue) -> bool:
    return isinstance(value.owner, CallOp) and operands(value.owner) is not None


def _weight_views(weight: SSAValue) -> tuple[list[CallOp], ParamOp] | None:
    """The views from an expert param [E, ...] to `weight`, keeping the expert
    dim first (transposes of the other dims), or None."""
    views = []
    while isinstance(weight.owner, ReshapeOp):
        view = weight.owner
        if view.target_name != "aten::transpose.int":
            return None
        rank = view.inputs[0].type.rank
        if 0 in {d % rank for d in (view.arg("dim0"), view.arg("dim1"))}:
            return None
        views.insert(0, view)
        weight = view.inputs[0]
    return (views, weight.owner) if isinstance(weight.owner, ParamOp) else None


def _mlp_from(first: CallOp, grouped) -> ExpertMLP | None:
    _, weight, offsets = grouped
    held = _weight_views(weight)
    if held is None or weight.type.rank != 3:
        return None
    views, param = held
    experts = param.result.type.shape[0]
    if offsets.type.shape != (experts,):
        return None
    between: list[CallOp] = []
    last = None
    frontier = list(first.results)
    while frontier:
        value = frontier.pop()
        for use in value.uses:
            op = use.operation
            if op in between or op is last:
                continue
            grouped = operands(op)
            if (
                grouped is not None
                and grouped[2] is offsets
                and use.index == op.inputs.index(grouped[0])
            ):
                if last is not None:
                    return None  # two products read the rows: not one MLP
                last = op
            elif _row_wise(op, use.index):
                between.append(op)
                frontier.extend(op.results)
            else:
                return None
    if last is None:
        return None
    last_held = _weight_views(operands(last)[1])
    if last_held is None or last_held[1].result.type.shape[0] != experts:
        return None
    order = {op: i for i, op in enumerate(first.parent.ops)}
    between.sort(key=order.__getitem__)
    router = _router(offsets, experts)
    gather = _gather(operands(first)[0], first)
    return ExpertMLP(first, last, between, views + last_held[0], router, experts, gather)


def _gather(rows: SSAValue, first: CallOp) -> CallOp | None:
    """The op picking the routed rows from the tokens, tokens[token_of_row], if
    nothing else reads its result."""
    op = rows.owner
    if not isinstance(op, CallOp) or op.target_name != "aten::index.Tensor":
        return None
    if len(op.inputs) != 2 or op.inputs[0].type.rank != 2 or op.inputs[1].type.rank != 1:
        return None
    return op if all(use.operation is first for use in rows.uses) else None


def _row_wise(op: Operation, index: int) -> bool:
    if isinstance(op, CallOp) and op.target_name.startswith("aten::_assert") and not op.results:
        return True  # a check (export's dtype asserts) reads the rows and makes nothing
    if not isinstance(op, CallOp) or op.target_name not in ZERO_PRESERVING:
        return False
    if op.target_name in _SPLITS:
        rank = op.inputs[0].type.rank
        return index == 0 and op.arg("dim", 0) % rank == rank - 1
    return True


def _router(offsets: SSAValue, experts: int, depth: int = 12) -> LinearOp | None:
    """The linear layer scoring the experts (the counts derive from the topk of
    its scores): searched back through the ops that made `offsets`."""
    frontier, seen = [offsets], set()
    for _ in range(depth):
        producers = []
        for value in frontier:
            op = value.owner
            if isinstance(op, LinearOp) and op.results[0].type.shape[-1] == experts:
                return op
            if isinstance(op, CallOp) and op not in seen:
                seen.add(op)
                producers.extend(op.inputs)
        frontier = producers
    return None
