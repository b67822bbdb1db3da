"""offload: optimizer state in host memory, its update run on the host
(ZeRO-Offload's split: forward and backward on the device, the optimizer on
the CPU).

Each optimizer slot (`optimizer.exp_avg.<parameter>`, ...; with `zero`, this
rank's piece of it) is marked as host state, which the runtime allocates in
host memory (pinned on CUDA):

    %m = plait.param state "optimizer.exp_avg.w" {mem = #plait.mem<tier = "host">, ...} : ...

The ops of the update that read host state, and the in-place writes of the
parameter (or its ZeRO piece) that lead to them, run on the host too (marked
the same way); a device value they read is copied to the host once (the
gradient, the step's scalars, the parameter), a host value a device op reads
(ZeRO's gathered pieces) is copied back, and a parameter updated on the host
is written back into its device state after its last update:

    %g_host = plait.elementwise "aten::_to_copy"(%g, device = device("host")) {mem = #plait.mem<tier = "host">} : ...
    %p_host = plait.elementwise "aten::_to_copy"(%w, device = device("host")) {mem = ...} : ...
    ... the update of %p_host, %m, %v ...
    %w_1 = plait.call "aten::copy_"(%w, %p_host_2) : ...

The backend runs the host's ops in order on a thread of their own
(backends/host_tasks.py), which the cost model prices as a lane beside the
device's: a device op waits only for the host values it reads. On a CPU
host and device are the same memory: the copies are real copies
between separate tensors, and the accounting (`ir.training.value_kinds`, the
cost model, `trainer.memory()`) counts host values as host memory, not the
device's. The step's scalar math and the gradients' reductions stay on the
device. plait's bf16-mixed step keeps fp32 parameters on the device (autocast
casts them per op), so there are no separate master weights to offload.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Block, Operation, SSAValue

from ...ir.args import ArgsAttr, Operand
from ...ir.errors import PlaitError
from ...ir.memory import DEVICE, HOST_DEVICE, copy_to, on_host, place_on_host, value_on_host
from ...ir.ops import CallOp, ParamOp, call_op_class
from ...ir.schema import writes_input
from ...ir.text import where
from ...ir.training import OPTIMIZER, STATE_OF, TRAIN_STEP, check_state_order, step_phases
from ..base import Pass

WRITE_BACK = "aten::copy_"


class OffloadError(PlaitError):
    """A step whose optimizer state cannot be kept in host memory."""


@dataclass(frozen=True)
class Offload(Pass):
    name = "offload"
    summary = "optimizer state in host memory, its update run on the host (ZeRO-Offload)"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        steps = [f for f in op.ops if isinstance(f, func.FuncOp) and f.sym_name.data == TRAIN_STEP]
        if not steps:
            raise OffloadError(
                "offload keeps a training step's optimizer state in host memory, but the "
                "module has no @train_step; compile it with plait.compile_training (pipeline "
                "stages are not supported with offload yet)"
            )
        offload_update(steps[0])
        check_state_order(op)


def offload_update(fn: func.FuncOp) -> None:
    """Mark `fn`'s optimizer slots and their update as host, with the copies."""
    block = fn.body.blocks.first
    slots = [
        op
        for op in block.ops
        if isinstance(op, ParamOp) and op.is_state and STATE_OF in op.attributes
    ]
    if not slots:
        raise OffloadError(
            f"@{fn.sym_name.data} keeps no optimizer state per parameter (SGD without "
            "momentum): nothing to offload; drop the offload pass"
        )
    if all(on_host(slot) for slot in slots):  # offloaded already (by the memory plan)
        return
    for slot in slots:
        place_on_host(slot)
    host = _host_ops(block, step_phases(fn))
    _place(block, host)


def _eligible(op: Operation, phases: dict) -> bool:
    """Ops that may run on the host: the update's calls (not its collectives)."""
    return isinstance(op, CallOp) and phases.get(op) == OPTIMIZER


def _next_write(value: SSAValue) -> Operation | None:
    """The in-place call that overwrites `value` (its first argument), if any."""
    return next(
        (
            use.operation
            for use in value.uses
            if isinstance(use.operation, CallOp)
            and use.index == 0
            and writes_input(use.operation.target_name)
        ),
        None,
    )


def _writes(op: Operation) -> bool:
    return isinstance(op, CallOp) and bool(writes_input(op.target_name))


def _host_ops(block: Block, phases: dict) -> set[Operation]:
    """The update's ops that read host values, and the in-place writes whose
    later writes do (a parameter's decay before its step): to a fixed point."""
    host: set[Operation] = set()

    def reads_host(op: Operation) -> bool:
        return any(value_on_host(v) or v.owner in host for v in op.operands)

    ops = list(block.ops)
    changed = True
    while changed:
        changed = False
        for op in ops:
            if op not in host and _eligible(op, phases) and reads_host(op):
                host.add(op)
                changed = True
        for op in reversed(ops):
            if op in host or not (_eligible(op, phases) and _writes(op)):
                continue
            if _next_write(op.results[0]) in host:
                host.add(op)
                changed = True
    return host


def _copy(value: SSAValue, device: str, before: Operation) -> SSAValue:
    """`value` copied to `device` (HOST_DEVICE or DEVICE), before `before`."""
    copy = copy_to(value, device)
    if value.name_hint:
        copy.results[0].name_hint = f"{value.name_hint}_{device}"
    before.parent_block().insert_op_before(copy, before)
    return copy.results[0]


def _state_root(value: SSAValue) -> ParamOp | None:
    """The program state `value` is (through in-place writes of it), if any."""
    while _writes(value.owner) and value is value.owner.results[0]:
        value = value.owner.operands[0]
    owner = value.owner
    return owner if isinstance(owner, ParamOp) and owner.is_state else None


def _place(block: Block, host: set[Operation]) -> None:
    """Mark `host` ops, and copy what crosses between host and device."""
    to_host: dict[SSAValue, SSAValue] = {}
    to_device: dict[SSAValue, SSAValue] = {}
    for op in list(block.ops):
        if op in host:
            for index, value in enumerate(op.operands):
                if value_on_host(value):  # (the host's ops before this one are marked)
                    continue
                if index == 0 and _writes(op):  # its own copy, which the host updates
                    copied = _copy(value, HOST_DEVICE, op)
                    if _state_root(value) is not None:
                        _write_back(value, op)
                else:
                    if value not in to_host:
                        to_host[value] = _copy(value, HOST_DEVICE, op)
                    copied = to_host[value]
                op.operands[index] = copied
            place_on_host(op)
        elif not on_host(op):
            for index, value in enumerate(op.operands):
                if value_on_host(value):
                    if value not in to_device:
                        to_device[value] = _copy(value, DEVICE, op)
                    op.operands[index] = to_device[value]


def _write_back(state: SSAValue, first: Operation) -> None:
    """After the last of the host's writes that start at `first`, copy the
    result into the device's `state` (its own update, in place)."""
    last = first
    while (after := _next_write(last.results[0])) is not None:
        last = after
    result = last.results[0]
    args = ArgsAttr((Operand(0), Operand(1)), ())
    back = call_op_class(WRITE_BACK)(WRITE_BACK, [state, result], args, [state.type])
    back.results[0].name_hint = f"{state.name_hint or 'state'}_written"
    last.parent_block().insert_op_after(back, last)
    readers = [u for u in result.uses if u.operation is not back]
    if readers:
        raise OffloadError(
            f"{where(readers[0].operation)}: reads a parameter the host updated; offload "
            "writes it back to the device after its last update and expects no later reader"
        )
