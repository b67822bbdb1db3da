"""What a training program is, in the IR.

A training step is a function `@train_step(batch..., %lr) -> loss`: the
model's forward and backward (captured by torch), then the optimizer's update
as ATen calls. Everything that outlives a step is program state
(`plait.param state`), updated in place:

- trainable parameters and buffers the model updates (BatchNorm's running
  statistics), named as in the model's state dict; their initial values are
  the model's, in the WeightStore;
- optimizer state, zero-filled: `optimizer.step` (a f64 count of steps) and
  per parameter `optimizer.<slot>.<parameter>` (slot `exp_avg`,
  `exp_avg_sq`, `momentum_buffer`), marked `{plait.state_of = "<parameter>"}`;
- with gradient accumulation over K micro-batches, `grad_accumulator.<parameter>`
  (state_of too), summed by an `@accumulate(batch...) -> loss` function that
  runs on the first K-1 micro-batches.

Gradients are ordinary values. The one the optimizer uses for a parameter is
the result of the op marked `{plait.grad_of = ["", "<parameter>", ...]}`
(one entry per result; "" for results that are no gradient): where a data-
parallel plan reduces it.

    %w = plait.param state "model.fc.weight" : !plait.tensor<[8, 4], f32>
    %m = plait.param state "optimizer.exp_avg.model.fc.weight" {plait.state_of = "model.fc.weight"} : ...
    %g = plait.matmul "aten::mm"(%t, %x) {plait.grad_of = ["model.fc.weight"]} : ...
    %m_1 = plait.call "aten::lerp_.Scalar"(%m, %g, 0.09999999999999998) : ...

State is updated in place, so block order matters: every read of a state's
value must come before the update that overwrites it (`check_state_order`).
"""

from __future__ import annotations

import math

from xdsl.dialects import func
from xdsl.dialects.builtin import ArrayAttr, ModuleOp, StringAttr
from xdsl.ir import Block, Operation, Region, SSAValue

from .args import ArgsAttr, Operand
from .attrs import PLACEMENTS_ATTR, mesh_axes
from .errors import PlaitError
from .memory import DEVICE, copy_to, on_host
from .ops import AllGatherOp, CallOp, ParamOp, call_op_class
from .schema import writes_input
from .text import where

TRAIN_STEP = "train_step"
ACCUMULATE = "accumulate"
LR_INPUT = "lr"

GRAD_OF = "plait.grad_of"
STATE_OF = "plait.state_of"

STEP_STATE = "optimizer.step"
ACCUMULATOR = "grad_accumulator"


class StateOrderError(PlaitError):
    """A program that reads program state after overwriting it."""


def slot_name(slot: str, parameter: str) -> str:
    """The state holding an optimizer's `slot` for `parameter`."""
    return f"optimizer.{slot}.{parameter}"


def accumulator_name(parameter: str) -> str:
    return f"{ACCUMULATOR}.{parameter}"


def mark_gradient(value: SSAValue, parameter: str) -> None:
    """Record that `value` (an op's result) is the gradient of `parameter`."""
    op = value.owner
    names = [a.data for a in op.attributes[GRAD_OF].data] if GRAD_OF in op.attributes else None
    names = names or [""] * len(op.results)
    names[list(op.results).index(value)] = parameter
    op.attributes[GRAD_OF] = ArrayAttr([StringAttr(n) for n in names])


def gradients(fn: func.FuncOp) -> dict[str, SSAValue]:
    """Parameter name -> its gradient in `fn`, from the `plait.grad_of` marks."""
    found = {}
    for op in fn.walk():
        if GRAD_OF in op.attributes:
            for result, name in zip(op.results, op.attributes[GRAD_OF].data):
                if name.data:
                    found[name.data] = result
    return found


def carry_gradient_mark(old: Operation, replacement: SSAValue) -> None:
    """A pass replaces `old` by `replacement` (the same tensor): keep its mark."""
    if GRAD_OF not in old.attributes or not isinstance(replacement.owner, Operation):
        return
    for result, name in zip(old.results, old.attributes[GRAD_OF].data):
        if name.data and result.type == replacement.type:
            mark_gradient(replacement, name.data)


def state_params(module: ModuleOp) -> dict[str, ParamOp]:
    """State name -> its first param op (every function reads the same state)."""
    found: dict[str, ParamOp] = {}
    for op in module.walk():
        if isinstance(op, ParamOp) and op.is_state:
            found.setdefault(op.weight_name, op)
    return found


def _update_of(value: SSAValue) -> Operation | None:
    """The in-place call that overwrites `value` (its first argument), if any."""
    updates = [
        use.operation
        for use in value.uses
        if isinstance(use.operation, CallOp)
        and use.index == 0
        and writes_input(use.operation.target_name)
    ]
    if len(updates) > 1:
        raise StateOrderError(
            f"{where(updates[1])}: a second in-place update of the same state value "
            f"(the first is at {where(updates[0])}); chain updates on each other's results"
        )
    return updates[0] if updates else None


def check_state_order(module: ModuleOp) -> None:
    """Raise unless each state value is read only before the update that
    overwrites it: passes that move ops must keep this order."""
    for fn in module.ops:
        if not isinstance(fn, func.FuncOp):
            continue
        for block in fn.body.blocks:
            position = {op: i for i, op in enumerate(block.ops)}
            for param in block.ops:
                if not (isinstance(param, ParamOp) and param.is_state):
                    continue
                value = param.result
                while (update := _update_of(value)) is not None:
                    late = [
                        u.operation
                        for u in value.uses
                        if position.get(u.operation, -1) > position[update]
                    ]
                    if late:
                        raise StateOrderError(
                            f"{where(late[0])}: reads state '{param.weight_name}' after "
                            f"{where(update)} overwrote it in place; keep reads of a state "
                            "before its update"
                        )
                    value = update.results[0]


GRADIENTS = "gradients"


def gradient_module(module: ModuleOp) -> ModuleOp:
    """A module whose one function @gradients is @train_step returning its
    marked gradients (by parameter name, sorted) with every in-place write of
    state removed: what a step would update with, updating nothing."""
    fn = next(
        op for op in module.ops if isinstance(op, func.FuncOp) and op.sym_name.data == TRAIN_STEP
    ).clone()
    block = fn.body.blocks.first
    marked = gradients(fn)
    names = sorted(marked)
    old = block.last_op
    block.insert_op_before(func.ReturnOp(*[marked[n] for n in names]), old)
    old.detach()
    old.erase()
    for op in reversed(list(block.ops)):
        if isinstance(op, CallOp) and writes_input(op.target_name):
            op.results[0].replace_all_uses_with(op.operands[0])
            op.detach()
            op.erase()
    for op in reversed(list(block.ops)):
        if op is not block.last_op and all(not r.uses for r in op.results):
            op.detach()
            op.erase()
    fn.sym_name = StringAttr(GRADIENTS)
    fn.function_type = func.FunctionType.from_lists(
        [a.type for a in block.args], [marked[n].type for n in names]
    )
    out = ModuleOp([fn])
    out.attributes.update(module.attributes)
    return out


STATE = "state"


def state_module(module: ModuleOp, names: list[str]) -> ModuleOp:
    """A module whose one function @state returns the named program state
    whole: each rank's slice all-gathered along every mesh axis that splits
    it (what a checkpoint of a sharded step holds, by name)."""
    sizes = mesh_axes(module)
    params = state_params(module)
    block = Block()
    outputs = []
    for name in names:
        param = params[name]
        clone = param.clone()
        block.add_op(clone)
        value = clone.result
        if on_host(clone):  # offload's state: gathered on the device (NCCL's)
            copy = copy_to(value, DEVICE)
            block.add_op(copy)
            value = copy.results[0]
        placed = param.attributes.get(PLACEMENTS_ATTR)
        for (axis, n), placement in zip(sizes.items(), placed.data if placed else ()):
            if placement.kind == "flat":  # first: the tensor the other axes split
                value = _unflattened(block, value, axis, n, placement.shape)
        for (axis, n), placement in zip(sizes.items(), placed.data if placed else ()):
            if placement.kind != "shard":
                continue
            shape = list(value.type.shape)
            shape[placement.dim] *= n
            gather = AllGatherOp(value, value.type.with_shape(shape), axis, placement.dim)
            block.add_op(gather)
            value = gather.results[0]
        outputs.append(value)
    block.add_op(func.ReturnOp(*outputs))
    fn = func.FuncOp(STATE, ([], [v.type for v in outputs]), Region(block))
    out = ModuleOp([fn])
    out.attributes.update(module.attributes)
    return out


def _unflattened(block: Block, piece: SSAValue, axis: str, n: int, shape) -> SSAValue:
    """A `flat` placement's pieces gathered over `axis`, unpadded and reshaped."""
    t = piece.type
    gather = AllGatherOp(piece, t.with_shape([n * t.shape[0]]), axis, 0)
    block.add_op(gather)
    numel = math.prod(shape)
    cut = call_op_class("aten::slice.Tensor")(
        "aten::slice.Tensor",
        [gather.results[0]],
        ArgsAttr((Operand(0), 0, 0, numel), ()),
        [t.with_shape([numel])],
    )
    view = call_op_class("aten::view")(
        "aten::view",
        [cut.results[0]],
        ArgsAttr((Operand(0), tuple(shape)), ()),
        [t.with_shape(shape)],
    )
    block.add_op(cut)
    block.add_op(view)
    return view.results[0]


# what a training step holds per rank, by kind (`step_memory`, `value_kinds`)
PARAMETERS = "parameters"
GRADIENT_BYTES = "gradients"
OPTIMIZER_STATE = "optimizer state"
ACCUMULATORS = "gradient accumulators"
# and what it computes on the way (`value_kinds`)
INPUTS = "inputs"
SAVED = "saved activations"
TEMPORARY = "temporary"
# in host memory (`offload`): optimizer state, and what the update on the host
# computes; no part of the device's peak
HOST_OPTIMIZER_STATE = "optimizer state (host)"
HOST_TEMPORARY = "host temporary"
HOST_KINDS = (HOST_OPTIMIZER_STATE, HOST_TEMPORARY)
# what a rank holds for a step, by kind (`step_memory`)
STATE_KINDS = (PARAMETERS, GRADIENT_BYTES, OPTIMIZER_STATE, HOST_OPTIMIZER_STATE, ACCUMULATORS)
MEMORY_KINDS = (
    PARAMETERS,
    GRADIENT_BYTES,
    OPTIMIZER_STATE,
    ACCUMULATORS,
    INPUTS,
    SAVED,
    TEMPORARY,
    *HOST_KINDS,
)


def state_kind(op: ParamOp) -> str:
    """What a parameter op holds: a gradient accumulator, optimizer state, or
    parameters (weights and buffers, trained or not)."""
    name = op.weight_name
    if op.is_state and name.startswith(ACCUMULATOR + "."):
        return ACCUMULATORS
    if op.is_state and (STATE_OF in op.attributes or name == STEP_STATE):
        return HOST_OPTIMIZER_STATE if on_host(op) else OPTIMIZER_STATE
    return PARAMETERS


def step_memory(fn: func.FuncOp) -> dict[str, int]:
    """Bytes one rank holds for a training step, from its (per-rank) types:
    parameters (and the buffers the step updates), the gradients the
    optimizer reads, the optimizer's state (on the device, and in host memory
    where `offload` keeps it) and the gradient accumulators."""
    sizes = dict.fromkeys(STATE_KINDS, 0)
    seen = set()
    for op in fn.walk():
        if not (isinstance(op, ParamOp) and op.is_state) or op.weight_name in seen:
            continue
        seen.add(op.weight_name)
        sizes[state_kind(op)] += int(op.result.type.nbytes)
    sizes[GRADIENT_BYTES] = sum(int(v.type.nbytes) for v in gradients(fn).values())
    return sizes


FORWARD, BACKWARD, OPTIMIZER = "forward", "backward", "optimizer"


def step_phases(fn: func.FuncOp) -> dict[Operation, str]:
    """Which part of the step each op is: forward (the ops the returned loss
    depends on), optimizer (the ops that read a marked gradient, the learning
    rate or optimizer state, directly or through others: clipping, the
    update, accumulating) or backward (the rest: from the loss to the
    gradients, their reductions included)."""
    block = fn.body.blocks.first
    phases: dict[Operation, str] = {}
    pending = [v.owner for v in block.last_op.operands if isinstance(v.owner, Operation)]
    while pending:
        op = pending.pop()
        if op not in phases:
            phases[op] = FORWARD
            pending.extend(v.owner for v in op.operands if isinstance(v.owner, Operation))
    updating = set(gradients(fn).values())
    updating.update(a for a in block.args if a.name_hint == LR_INPUT)
    for op in block.ops:
        if op in phases or op is block.last_op:
            continue
        if (isinstance(op, ParamOp) and state_kind(op) != PARAMETERS) or any(
            v in updating for v in op.operands
        ):
            phases[op] = OPTIMIZER
            updating.update(op.results)
        else:
            phases[op] = BACKWARD
    return phases


def value_kinds(fn: func.FuncOp) -> dict[SSAValue, str]:
    """The kind of memory each value of a step is (see MEMORY_KINDS): inputs,
    parameter ops' by `state_kind`, the marked gradients, saved activations
    (values of the forward that a later op reads: what backward keeps) and
    temporary (the rest)."""
    block = fn.body.blocks.first
    phases = step_phases(fn)
    marked = set(gradients(fn).values())
    kinds: dict[SSAValue, str] = dict.fromkeys(block.args, INPUTS)
    for op in block.ops:
        for result in op.results:
            if isinstance(op, ParamOp):
                kinds[result] = state_kind(op)
            elif on_host(op):
                kinds[result] = HOST_TEMPORARY
            elif result in marked:
                kinds[result] = GRADIENT_BYTES
            elif phases.get(op) == FORWARD and any(
                phases.get(u.operation, FORWARD) != FORWARD for u in result.uses
            ):
                kinds[result] = SAVED
            else:
                kinds[result] = TEMPORARY
    return kinds
