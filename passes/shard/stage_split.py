"""The split of a training step into pipeline stages, by dataflow (see
`stages`, the pass that chooses the cut).

`StepSplit` puts every op of @train_step in a segment, the stretch of
forward between two residual boundaries with the backward and optimizer
ops that go with it; `StepSplit.build` groups segments into stages and
emits each stage's forward, backward and update functions, with the
`plait.send`/`plait.recv` ops that carry values between stages (forward
values up, gradients down, each sent right after it is made and received
in the same order, so each stage pair's messages match one for one).
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, IntegerAttr, ModuleOp, NameLoc, StringAttr, i64
from xdsl.ir import Block, BlockArgument, Operation, Region, SSAValue

from ...ir.args import ArgsAttr, Operand
from ...ir.attrs import PIPELINE_AXIS, STAGE_ATTR
from ...ir.errors import PlaitError
from ...ir.ops import (
    TAGS_PER_MICRO_BATCH,
    AllReduceOp,
    CallOp,
    ParamOp,
    RecvOp,
    SendOp,
    call_op_class,
)
from ...ir.residual import residual_chain
from ...ir.schema import writes_input
from ...ir.text import where
from ...ir.training import (
    BACKWARD,
    FORWARD,
    GRAD_OF,
    LR_INPUT,
    OPTIMIZER,
    STATE_OF,
    STEP_STATE,
    accumulator_name,
    gradients,
    mark_gradient,
    step_phases,
)
from .pipeline_schedule import KINDS, stage_function
from .shard import insert_call
from .step import squares_for_global_norms

KIND_OF_PHASE = {FORWARD: "F", BACKWARD: "B", OPTIMIZER: "U"}


class StageError(PlaitError):
    """A step the pipeline pass cannot cut, with what to change."""


class StepSplit:
    """@train_step's ops by segment (the stretch of forward between two
    residual boundaries, with the backward and optimizer ops that go with it)."""

    def __init__(self, fn: func.FuncOp):
        self.fn = fn
        self.block = fn.body.blocks.first
        squares_for_global_norms(self.block, insert_call)  # (clipping: partial sums per stage)
        self.phases = step_phases(fn)
        _state_reads_in_update(self.block, self.phases)
        self.loss = self.block.last_op.operands[0]
        _accumulate_in_backward(fn, self.phases)
        self.ops = list(self.block.ops)[:-1]
        self.position = {op: i for i, op in enumerate(self.ops)}
        forward_adds = [m for m in residual_chain(self.block) if self.phases[m.add] == FORWARD]
        self.chain = forward_adds
        self.free = free_ops(self.ops)
        self.clip = _global_norm([op for op in self.ops if self.phases.get(op) == OPTIMIZER])
        self.free |= self.clip.replicated if self.clip else set()
        self.segment = self._segments([m.result for m in self.chain] + [self.loss])

    def _segments(self, boundaries: list[SSAValue]) -> dict[Operation, int]:
        segment = boundary_segments(boundaries, self.free)
        params = {op.weight_name: op for op in self.ops if isinstance(op, ParamOp)}
        for op in self.ops:
            if op in segment or op in self.free:
                continue
            if isinstance(op, ParamOp):  # optimizer state: its parameter's stage
                owner = op.attributes.get(STATE_OF)
                if owner is None or params.get(owner.data) not in segment:
                    raise StageError(
                        f"{where(op)}: state '{op.weight_name}' belongs to no parameter the "
                        "forward reads; pipeline cannot place it on a stage"
                    )
                segment[op] = segment[params[owner.data]]
                continue
            found = [self._available(v, segment) for v in op.operands]
            found = [s for s in found if s is not None]
            if found:
                segment[op] = min(found)
            else:
                self.free.add(op)
        # a view of one gradient that only a lower segment reads moves there: the
        # stage above sends the gradient once, not each view of it
        for op in reversed(self.ops):
            if self.phases.get(op) != BACKWARD or op not in segment:
                continue
            placed = [v for v in op.operands if v.owner in segment]
            readers = {segment.get(u.operation) for r in op.results for u in r.uses}
            if (
                len(placed) == 1
                and self.phases.get(placed[0].owner) == BACKWARD
                and len(readers) == 1
                and None not in readers
                and min(readers) < segment[op]
            ):
                segment[op] = min(readers)
        return segment

    def _available(self, value: SSAValue, segment) -> int | None:
        """The segment where a backward or optimizer op finds `value`: a
        forward value at the last segment that reads it in forward."""
        op = value.owner
        if not isinstance(op, Operation) or op in self.free:
            return None
        if self.phases.get(op) != FORWARD:
            return segment[op]
        readers = [
            segment[u.operation]
            for u in value.uses
            if self.phases.get(u.operation) == FORWARD and u.operation in segment
        ]
        return max([segment[op], *readers])

    def segment_costs(self, times: dict[Operation, float]) -> list[float]:
        """Seconds of forward and backward per segment (one micro-batch)."""
        costs = [0.0] * (len(self.chain) + 1)
        for op, j in self.segment.items():
            if self.phases.get(op) in (FORWARD, BACKWARD):
                costs[j] += times.get(op, 0.0)
        return costs

    def stage_of(self, cuts: list[int]) -> dict[Operation, int]:
        """Each placed op's stage, the stages starting at segments `cuts`."""
        count = len(self.chain) + 1
        stage_of_segment = [sum(1 for c in cuts[1:] if c <= j) for j in range(count)]
        stage = {op: stage_of_segment[j] for op, j in self.segment.items()}
        return stage

    def kind(self, op: Operation) -> str:
        return KIND_OF_PHASE[self.phases.get(op, BACKWARD)]

    def build(self, cuts: list[int], stages: int, ranks: int) -> list[func.FuncOp]:
        """Each stage's forward and backward, each rank's update (of its stages:
        stage k runs on rank k % ranks)."""
        stage = self.placed = self.stage_of(cuts)
        self._check_parameters(stage)
        groups: dict[tuple[str, int], list[Operation]] = {}
        for op in self.ops:
            if op in stage and not isinstance(op, ParamOp):
                kind = self.kind(op)
                key = (kind, stage[op] % ranks if kind == "U" else stage[op])
                groups.setdefault(key, []).append(op)
        side_effects = [  # free updates no op reads: the step count's, on every stage
            op
            for op in self.ops
            if op in self.free
            and isinstance(op, CallOp)
            and writes_input(op.target_name)
            and not any(r.uses for r in op.results)
        ]
        for r in range(ranks):
            groups.setdefault(("U", r), []).extend(side_effects)

        def follows(op: Operation) -> bool:  # each stage recomputes the free ops it needs
            return op in self.free or isinstance(op, ParamOp)  # and reads its parameters

        needs = {key: closure(ops, follows) for key, ops in groups.items()}
        plan = _Messages(self, stage, needs, stages, ranks)
        built = []
        for kind, count in (("F", stages), ("B", stages), ("U", ranks)):
            for s in range(count):
                built.append(plan.function(kind, s, needs.get((kind, s), set())))
        return built

    def _check_parameters(self, stage: dict[Operation, int]) -> None:
        for op in self.ops:
            if not (isinstance(op, ParamOp) and op.is_state) or op in self.free:
                continue
            readers = {
                stage[u.operation]
                for u in op.result.uses
                if u.operation in stage and self.phases.get(u.operation) == FORWARD
            }
            if len(readers) > 1:
                first, second = sorted(readers)[:2]
                raise StageError(
                    f"{where(op)}: '{op.weight_name}' is read on pipeline stages {first} and "
                    f"{second} (a tied weight?); untie it (tie_word_embeddings=False) or choose "
                    "a cut that keeps its readers on one stage"
                )
            op.attributes[STAGE_ATTR] = IntegerAttr(stage[op], i64)


def module_of(value: SSAValue) -> str:
    """The module path of the op computing `value`, or of the nearest op before it
    that has one (a residual branch ends in an add or a collective, which has none)."""
    stack, seen = [value.owner], set()
    while stack:
        op = stack.pop(0)
        if not isinstance(op, Operation) or op in seen:
            continue
        seen.add(op)
        if isinstance(op.location, NameLoc):
            return op.location.desc.data
        stack.extend(v.owner for v in op.operands)
    return where(value.owner)


@dataclass(frozen=True)
class GlobalNorm:
    """Clipping's global norm in squares form (`squares_for_global_norms`):
    `stack` of each gradient's sum of squares, `total` the sum that reads it,
    `replicated` the scalar ops from `stack` to the clip coefficient. Every
    rank's update computes them: its stack holds its stages' sums, and an
    all-reduce over the pipeline after `total` makes it every stage's."""

    stack: CallOp
    total: CallOp
    replicated: frozenset[Operation]


def _global_norm(ops: list[Operation]) -> GlobalNorm | None:
    """The optimizer's global norm among `ops` (the update's), if it clips."""
    stacks = [
        op
        for op in ops
        if isinstance(op, CallOp)
        and op.target_name == "aten::stack"
        and any(_is_sum(u.operation) for u in op.results[0].uses)
        and all(v.type.shape == () for v in op.operands)
    ]
    if not stacks:
        return None
    if len(stacks) > 1:
        raise StageError(f"{where(stacks[1])}: pipeline can clip by one global norm, not two")
    stack = stacks[0]
    replicated, todo = {stack}, [stack]
    while todo:  # the scalar ops downstream: the norm and the clip coefficient
        for result in todo.pop().results:
            for use in result.uses:
                reader = use.operation
                if reader in replicated or not reader.results:
                    continue
                if all(r.type.shape == () for r in reader.results) and all(
                    v.type.shape == () or v is stack.results[0] for v in reader.operands
                ):
                    replicated.add(reader)
                    todo.append(reader)
    total = next(u.operation for u in stack.results[0].uses if _is_sum(u.operation))
    return GlobalNorm(stack, total, frozenset(replicated))


def _is_sum(op) -> bool:
    return isinstance(op, CallOp) and op.target_name == "aten::sum" and op.arg("dim") is None


def _stack_of(stack: CallOp, values: list[SSAValue]) -> CallOp:
    """`stack` over `values` (a rank's own stages' sums of squares)."""
    args = (tuple(Operand(i) for i in range(len(values))), *stack.args.args[1:])
    result = stack.results[0].type.with_shape((len(values),))
    new = call_op_class(stack.target_name)(
        stack.target_name, values, ArgsAttr(args, stack.args.kwargs), [result]
    )
    new.location = stack.location
    new.results[0].name_hint = stack.results[0].name_hint
    return new


def closure(roots: list[Operation], follows) -> set[Operation]:
    """`roots` and the ops they read, through operands, that `follows(op)` accepts."""
    needed, stack = set(), list(roots)
    while stack:
        op = stack.pop()
        if op in needed:
            continue
        needed.add(op)
        stack.extend(
            v.owner for v in op.operands if isinstance(v.owner, Operation) and follows(v.owner)
        )
    return needed


def boundary_segments(boundaries: list[SSAValue], free: set[Operation]) -> dict[Operation, int]:
    """Each op's segment: the first boundary whose value needs it (free ops
    belong to none)."""
    segment: dict[Operation, int] = {}
    for j, value in enumerate(boundaries):  # the ops each boundary needs, and no earlier one
        stack = [value.owner]
        while stack:
            op = stack.pop()
            if not isinstance(op, Operation) or op in segment or op in free:
                continue
            segment[op] = j
            stack.extend(v.owner for v in op.operands)
    return segment


def free_ops(ops: list[Operation]) -> set[Operation]:
    """Ops every stage can compute for itself: they read only inputs, buffers,
    weights that are not state, constants, the step count and each other
    (not program state, which one stage holds)."""
    free: set[Operation] = set()
    for op in ops:
        if isinstance(op, ParamOp):
            if not op.is_state or op.weight_name == STEP_STATE:
                free.add(op)
        elif all(isinstance(v, BlockArgument) or v.owner in free for v in op.operands):
            free.add(op)
    return free


def _state_reads_in_update(block, phases: dict[Operation, str]) -> None:
    """Ops that read only program state (a view of a parameter, this rank's
    slice of it under zero{stage=1}) and that only the optimizer reads are the
    optimizer's: `step_phases` calls them backward, since they read no
    gradient, learning rate or optimizer state themselves."""
    from_state: list[Operation] = []
    for op in block.ops:
        if (
            phases.get(op) == BACKWARD
            and op.operands
            and all(
                (isinstance(v.owner, ParamOp) and v.owner.is_state) or v.owner in from_state
                for v in op.operands
            )
        ):
            from_state.append(op)
    for op in reversed(from_state):
        readers = [u.operation for r in op.results for u in r.uses]
        if readers and all(phases.get(r) == OPTIMIZER for r in readers):
            phases[op] = OPTIMIZER


def _accumulate_in_backward(fn: func.FuncOp, phases: dict[Operation, str]) -> None:
    """Each micro-batch's backward adds its gradients into the accumulators;
    the update reads the accumulators (the gradient's mark moves to them)."""
    block = fn.body.blocks.first
    state = {op.weight_name: op for op in block.ops if isinstance(op, ParamOp) and op.is_state}
    first_op = next(op for op in block.ops if not isinstance(op, ParamOp))
    for name, grad in gradients(fn).items():
        op = grad.owner
        accumulator = state.get(accumulator_name(name))
        if (
            accumulator is not None
            and isinstance(op, CallOp)
            and op.target_name == "aten::add.Tensor"
            and op.operands[0] is accumulator.result
        ):  # earlier micro-batches' sum + this one's
            raw = op.operands[1]
            grad.replace_all_uses_with(accumulator.result)
            op.detach()
            op.erase()
        elif phases.get(op) == BACKWARD:
            raw = grad
            accumulator = ParamOp(accumulator_name(name), grad.type, "state")
            accumulator.attributes[STATE_OF] = StringAttr(name)
            accumulator.result.name_hint = accumulator_name(name)
            block.insert_op_before(accumulator, first_op)
            phases[accumulator] = OPTIMIZER
            for use in list(grad.uses):
                if phases.get(use.operation) == OPTIMIZER:
                    use.operation.operands[use.index] = accumulator.result
            zero = _call("aten::zero_", accumulator.result, accumulator.result.type)
            block.insert_op_before(zero, block.last_op)
            phases[zero] = OPTIMIZER
        else:
            raise StageError(
                f"{where(op)}: the gradient of '{name}' is computed after the backward "
                "(a pass before pipeline reduced it?); run pipeline before it"
            )
        _unmark(raw, name)
        add = _call("aten::add_.Tensor", accumulator.result, accumulator.result.type, raw)
        add.results[0].name_hint = accumulator_name(name)
        block.insert_op_after(add, raw.owner)
        phases[add] = BACKWARD


def _call(target: str, value: SSAValue, result, *more: SSAValue) -> CallOp:
    args = tuple(Operand(i) for i in range(1 + len(more)))
    return call_op_class(target)(target, [value, *more], ArgsAttr(args, ()), [result])


def _unmark(value: SSAValue, name: str) -> None:
    op = value.owner
    if GRAD_OF not in op.attributes:
        return
    names = ["" if a.data == name else a.data for a in op.attributes[GRAD_OF].data]
    if any(names):
        op.attributes[GRAD_OF] = ArrayAttr([StringAttr(n) for n in names])
    else:
        del op.attributes[GRAD_OF]


class _Messages:
    """Which values each stage's functions receive, keep and send."""

    def __init__(self, step: StepSplit, stage, needs, stages: int, ranks: int):
        self.step, self.stage, self.stages, self.ranks = step, stage, stages, ranks
        position = step.position
        self.inputs: dict[tuple[str, int], list[SSAValue]] = {}  # values from elsewhere
        for key, ops in needs.items():
            found = {
                v
                for op in ops
                for v in op.operands
                if isinstance(v.owner, Operation) and v.owner not in ops
            }
            self.inputs[key] = sorted(found, key=lambda v: position[v.owner])
        self.kept: dict[int, list[SSAValue]] = {}  # forward values each backward reads
        # (kind, stage) -> value -> [(peer rank, tag)]; (kind, stage) -> [(value, peer rank, tag)]
        self.sends: dict[tuple[str, int], dict[SSAValue, list[tuple[int, int]]]] = {}
        self.recvs: dict[tuple[str, int], list[tuple[SSAValue, int, int]]] = {}
        for s in range(stages):
            kept = []
            for v in self.inputs.get(("B", s), []):
                producer = self._producer(v)
                if producer[0] == "F":
                    if producer[1] > s:
                        self._refuse(v, "forward", producer[1], s)
                    kept.append(v)
                elif producer[0] == "B" and producer[1] > s:
                    self._message("B", producer[1], s, v)
                else:
                    self._refuse(v, "backward", producer[1], s)
            self.kept[s] = kept
        for s in range(stages):
            wanted = set(self.inputs.get(("F", s), []))
            wanted |= {v for v in self.kept[s] if self.stage[v.owner] != s}
            for v in sorted(wanted, key=lambda v: position[v.owner]):
                producer = self._producer(v)
                if producer[0] != "F" or producer[1] >= s:
                    self._refuse(v, "forward", producer[1], s)
                self._message("F", producer[1], s, v)
        partials = set(step.clip.stack.operands) if step.clip else set()
        for s in range(stages):
            for v in self.inputs.get(("U", s), []):
                if v not in partials:  # (another rank's: its all-reduce brings them)
                    self._refuse(v, "forward or backward", self.stage[v.owner], s)

    def _producer(self, value: SSAValue) -> tuple[str, int]:
        return self.step.kind(value.owner), self.stage[value.owner]

    def _message(self, kind: str, sender: int, receiver: int, value: SSAValue) -> None:
        """A send and its recv, with the module's next tag."""
        if sender % self.ranks == receiver % self.ranks:
            raise StageError(
                f"{where(value.owner)}: stages {sender} and {receiver} both run on rank "
                f"{sender % self.ranks} and this value goes from one to the other; use fewer "
                "virtual stages"
            )
        tag = sum(len(r) for r in self.recvs.values())
        if tag >= TAGS_PER_MICRO_BATCH:
            raise StageError(
                f"{where(value.owner)}: the stages exchange more than {TAGS_PER_MICRO_BATCH} "
                "values per micro-batch; use fewer stages"
            )
        peers = self.sends.setdefault((kind, sender), {}).setdefault(value, [])
        peers.append((receiver % self.ranks, tag))
        self.recvs.setdefault((kind, receiver), []).append((value, sender % self.ranks, tag))

    def _refuse(self, value: SSAValue, what: str, producer: int, reader: int) -> None:
        raise StageError(
            f"{where(value.owner)}: this {what} value of stage {producer} is read on stage "
            f"{reader}, which runs before it; pipeline cannot order that (choose other stages)"
        )

    def function(self, kind: str, s: int, ops: set[Operation]) -> func.FuncOp:
        step = self.step
        old_args = list(step.block.args)
        batch = [a for a in old_args if a.name_hint != LR_INPUT]
        args = {"F": batch, "B": batch, "U": [a for a in old_args if a.name_hint == LR_INPUT]}[kind]
        kept = self.kept[s] if kind == "B" else []
        types = [a.type for a in args] + [v.type for v in kept]
        block = Block(arg_types=types)
        mapping: dict[SSAValue, SSAValue] = {}
        names: set[str] = set()
        for new, old in zip(block.args, [*args, *kept]):
            new.name_hint = _unique(old.name_hint or "kept", names)
            mapping[old] = new
        for value, peer, tag in self.recvs.get((kind, s), []):
            if value in mapping:
                continue
            recv = RecvOp(value.type, PIPELINE_AXIS, peer, tag)
            recv.results[0].name_hint = value.name_hint
            block.add_op(recv)
            mapping[value] = recv.results[0]
        sends = self.sends.get((kind, s), {})
        for op in step.ops:
            if op not in ops:
                continue
            if step.clip and op is step.clip.stack:
                clone = _stack_of(op, [mapping[v] for v in op.operands if v in mapping])
                mapping[op.results[0]] = clone.results[0]
            else:
                missing = [v for v in op.operands if v not in mapping]
                if missing:  # (a message plan that forgot a value: a bug here)
                    raise StageError(f"{where(op)}: stage {s} has no value for an operand")
                clone = op.clone(value_mapper=mapping)
            block.add_op(clone)
            if step.clip and op is step.clip.total:  # this rank's stages' sum, over every stage
                total = AllReduceOp(clone.results[0], PIPELINE_AXIS, "sum")
                total.location = clone.location
                total.results[0].name_hint = "grad_square_sum"
                block.add_op(total)
                mapping[op.results[0]] = total.results[0]
            for result in op.results:
                for peer, tag in sends.get(result, []):
                    block.add_op(SendOp(mapping[result], PIPELINE_AXIS, peer, tag))
        outputs = []
        if kind == "F":
            if s == self.stages - 1:
                outputs.append(mapping[step.loss])
            outputs += [mapping[v] for v in self.kept[s]]
        if kind == "U":
            for op in block.ops:
                if isinstance(op, ParamOp) and STATE_OF in op.attributes:
                    if op.weight_name == accumulator_name(op.attributes[STATE_OF].data):
                        mark_gradient(op.result, op.attributes[STATE_OF].data)
        block.add_op(func.ReturnOp(*outputs))
        return func.FuncOp(
            stage_function(kind, s),
            (types, [v.type for v in outputs]),
            Region(block),
        )


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or name_kept<n>, not in `taken` (which it joins): the programs' input
    names (xDSL drops a hint's _<n> suffix)."""
    out, n = name, 0
    while out in taken:
        n += 1
        out = f"{name}_kept{n}"
    taken.add(out)
    return out


def function_messages(module: ModuleOp) -> dict[tuple[str, int], list]:
    """Each stage function's sends and receives in order: (("F"|"B", stage) ->
    [("send" | "recv", tag, bytes)]), what `simulate` runs."""
    out = {}
    for fn in module.ops:
        if not isinstance(fn, func.FuncOp):
            continue
        kind, _, stage = fn.sym_name.data.partition("_stage")
        talk = [
            (
                "send" if isinstance(op, SendOp) else "recv",
                op.tag.value.data,
                int((op.input if isinstance(op, SendOp) else op.result).type.nbytes),
            )
            for op in fn.walk()
            if isinstance(op, (SendOp, RecvOp)) and op.axis.data == PIPELINE_AXIS
        ]
        if stage.isdigit() and kind != KINDS["U"]:
            out[kind[0].upper(), int(stage)] = talk
    return out
