"""Training steps: a model's loss, gradients and optimizer update as IR functions.

    captured = capture_training(model, example_args, TrainingSpec("adamw", {...}))
    captured.module     # @train_step(batch..., %lr) -> loss  (and @accumulate)
    captured.weights    # initial values of the state, and the other weights

1. The loss: `LossModule` calls the model (a transformers model with
   input ids, attention mask and labels; any other with its own arguments,
   the loss being its output, its `.loss` or `loss_fn(output, *args)`), under
   autocast for "bf16-mixed", divided by the number of micro-batches.
2. The joint graph: torch.export (non-strict, train mode), then torch's own
   joint export (AOTAutograd) with no decompositions, so the forward's ops
   (SDPA included) stay as exported and the backward is torch's autograd
   formulas: one functional graph returning the loss and each parameter's
   gradient.
3. Import: the importer's, with trained parameters and the buffers the model
   updates as program state starting from the model's values.
4. Assembly (see `ir.training`): the buffers' updates written back, the
   gradients (summed with the accumulators' over micro-batches, clipped),
   then the optimizer's rows for every parameter.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch.export.graph_signature import InputKind, OutputKind
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, StringAttr
from xdsl.ir import Block, SSAValue

from ..ir.args import Tag
from ..ir.errors import PlaitError
from ..ir.ops import ParamOp
from ..ir.training import (
    ACCUMULATE,
    LR_INPUT,
    STATE_OF,
    STEP_STATE,
    TRAIN_STEP,
    accumulator_name,
    mark_gradient,
    slot_name,
)
from ..ir.types import TensorType
from ..ir.weights import WeightStore
from .capture import Captured
from .emit import Emitter
from .fused_backward import fuse_backward
from .importer import import_program
from .optimizers import clip_gradients, resolve
from .symbols import dim_names

HF_INPUTS = ("input_ids", "attention_mask", "labels")
PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16}
PREFIX = "model."


class TrainingError(PlaitError):
    """A model, loss or training option that plait cannot train."""


@dataclass(frozen=True)
class TrainingSpec:
    """What a step does besides forward and backward (validated on creation)."""

    optimizer: str = "adamw"
    options: dict = field(default_factory=dict)
    accumulation: int = 1
    clip_grad_norm: float | None = None
    precision: str = "fp32"

    def __post_init__(self):
        resolve(self.optimizer, self.options)
        k = self.accumulation
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise TrainingError(f"accumulation={k!r} must be an integer >= 1 (micro-batches)")
        clip = self.clip_grad_norm
        if clip is not None and (
            isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
        ):
            raise TrainingError(f"clip_grad_norm={clip!r} must be a number > 0, or None")
        if self.precision not in PRECISIONS:
            raise TrainingError(
                f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}"
            )

    def as_json(self) -> dict:
        return {
            "optimizer": self.optimizer,
            "options": self.options,
            "accumulation": self.accumulation,
            "clip_grad_norm": self.clip_grad_norm,
            "precision": self.precision,
        }


@dataclass
class CapturedTraining:
    module: ModuleOp
    weights: WeightStore
    input_names: list[str]
    # the model's state-dict names -> the program's name of the same tensor
    # (tied weights share one)
    state_dict: dict[str, str]
    trained: list[str]  # the parameters the optimizer updates, by the program's names


def is_hf_model(model: torch.nn.Module) -> bool:
    """A transformers model that computes its own loss from labels."""
    parameters = inspect.signature(model.forward).parameters
    return hasattr(model, "config") and all(name in parameters for name in HF_INPUTS)


class LossModule(torch.nn.Module):
    """(*args) -> the model's loss / micro-batches, on which the joint graph is traced."""

    plait_prefix = PREFIX

    def __init__(self, model, loss_fn, micro_batches: int, autocast: torch.dtype | None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.hf = is_hf_model(model)
        self.micro_batches = micro_batches
        self.autocast = autocast

    def forward(self, *args):
        context = contextlib.nullcontext()
        if self.autocast is not None:
            device = next(self.model.parameters()).device.type
            context = torch.autocast(device, dtype=self.autocast)
        with context:
            if self.hf:
                ids, mask, labels = args
                out = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            else:  # with loss_fn, the model takes the leading arguments its forward accepts
                out = self.model(*args[: self.model_arity(len(args))])
            loss = self.loss_fn(out, *args) if self.loss_fn is not None else _loss_of(out)
        loss = self._check(loss)
        return loss / self.micro_batches if self.micro_batches > 1 else loss

    def model_arity(self, count: int) -> int:
        """How many of `count` arguments the model takes: all, without loss_fn."""
        if self.loss_fn is None:
            return count
        parameters = inspect.signature(self.model.forward).parameters.values()
        if any(p.kind == p.VAR_POSITIONAL for p in parameters):
            return count
        return min(
            count, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
        )

    def _check(self, loss):
        name = type(self.model).__name__
        if not isinstance(loss, torch.Tensor):
            raise TrainingError(
                f"{name} returned {type(loss).__name__}, not a loss: return a scalar tensor "
                "(or an output with .loss), or pass loss_fn=lambda output, *args: ..."
            )
        if loss.numel() != 1 or not loss.is_floating_point():
            raise TrainingError(
                f"the loss of {name} is a {loss.dtype} tensor of shape {list(loss.shape)}, not "
                "a floating-point scalar; reduce it to one number (e.g. .mean()) in the model "
                "or in loss_fn"
            )
        return loss.reshape(())


def _loss_of(out):
    loss = getattr(out, "loss", out)
    if loss is None and hasattr(out, "logits"):
        raise TrainingError(
            "the model returned no loss (its output's .loss is None); pass the labels among "
            "its arguments, or pass loss_fn=lambda output, *args: ..."
        )
    return loss


# ---- capture ------------------------------------------------------------------


def _positional(dynamic_shapes, names: list[str]):
    """torch.export's spec for the loss module's *args, from a dict by name or a sequence."""
    if dynamic_shapes is None or not isinstance(dynamic_shapes, dict):
        return tuple(dynamic_shapes) if dynamic_shapes is not None else None
    unknown = sorted(set(dynamic_shapes) - set(names))
    if unknown:
        raise TrainingError(
            f"dynamic_shapes names '{unknown[0]}', which is not an input; the inputs are "
            f"{', '.join(names)}"
        )
    return tuple(dynamic_shapes.get(name) for name in names)


def input_names(model: torch.nn.Module, count: int) -> list[str]:
    if is_hf_model(model):
        return list(HF_INPUTS)
    parameters = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return [parameters[i] if i < len(parameters) else f"input_{i}" for i in range(count)]


@contextlib.contextmanager
def _quiet():
    """torch.export logs guards and warnings that users cannot act on."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _plait_error(exc: BaseException) -> PlaitError | None:
    """The PlaitError an exception from export wraps, if any."""
    while exc is not None:
        if isinstance(exc, PlaitError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _joint(wrapper: LossModule, args: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    """Export the loss in train mode, then trace its joint forward + backward."""
    # torch's joint export (torch.export.experimental._export_forward_backward)
    # without its core-ATen decomposition table: ops stay as exported
    from torch.export.exported_program import _decompose_exported_program

    name = type(wrapper.model).__name__
    modes = {m: m.training for m in wrapper.modules()}
    wrapper.train()
    try:
        with _quiet():
            program = torch.export.export(
                wrapper,
                args,
                strict=False,
                dynamic_shapes=None if dynamic_shapes is None else (dynamic_shapes,),  # *args
            )
            _no_grad_for_unused(program)
            return _decompose_exported_program(
                program,
                cia_to_decomp={},
                python_decomp_table={},
                joint_loss_index=0,
                decompose_custom_triton_ops=False,
            )
    except Exception as exc:  # torch raises many types; all are capture failures
        own = _plait_error(exc)
        if own is not None:
            raise own from None
        hint = ""
        if "does not require gradients" in str(exc):
            hint = "\nhint: no parameter the loss depends on requires grad; nothing would train"
        if "did not receive a gradient" in str(exc):
            hint = (
                "\nhint: a parameter that requires grad is used, but the loss does not depend "
                "on it differentiably (.detach(), integer ops); set requires_grad=False on it"
            )
        raise TrainingError(
            f"torch could not capture the training step of {name}: {type(exc).__name__}: "
            f"{exc}{hint}"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training


def _no_grad_for_unused(program: torch.export.ExportedProgram) -> None:
    """Parameters the graph never reads (the second name of a tied weight) get
    no gradient; the joint trace requires gradients of all that require grad."""
    kinds = {s.arg.name: s.kind for s in program.graph_signature.input_specs}
    for node in program.graph.nodes:
        if node.op == "placeholder" and not node.users and kinds[node.name] == InputKind.PARAMETER:
            node.meta["val"].requires_grad_(False)


def _compute_masked_outputs(program: torch.export.ExportedProgram) -> None:
    """Backward ops with an `output_mask` (convolution_backward, the norms')
    return None for the gradients nobody needs, such as the first layer's
    input gradient; the IR has no None values, so those are computed too."""
    from torch._guards import detect_fake_mode
    from torch.utils import _pytree as pytree

    for node in program.graph.nodes:
        fake = node.meta.get("val")
        if (
            node.op != "call_function"
            or not isinstance(fake, (list, tuple))
            or all(f is not None for f in fake)
        ):
            continue
        names = [a.name for a in node.target._schema.arguments]
        if "output_mask" not in names:
            continue
        index = names.index("output_mask")
        args = list(node.args)
        args[index] = [True] * len(args[index])
        node.args = tuple(args)
        values = pytree.tree_map(
            lambda v: v.meta["val"] if isinstance(v, torch.fx.Node) else v, node.args
        )
        with detect_fake_mode(pytree.tree_leaves(values)):
            node.meta["val"] = node.target(*values)


def capture_training(
    model: torch.nn.Module, example_args, spec: TrainingSpec, loss_fn=None, dynamic_shapes=None
) -> CapturedTraining:
    """Capture one training step of `model` on `example_args` (one micro-batch)."""
    if not isinstance(model, torch.nn.Module):
        raise TrainingError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in example_args)
    names = input_names(model, len(args))
    wrapper = LossModule(model, loss_fn, spec.accumulation, PRECISIONS[spec.precision])
    if wrapper.hf and len(args) != 3:
        raise TrainingError(
            f"{type(model).__name__} is a transformers model: its example arguments are "
            "(input_ids, attention_mask, labels)"
        )
    shapes = _positional(dynamic_shapes, names)
    program = _joint(wrapper, args, shapes)
    fuse_backward(program)
    _compute_masked_outputs(program)
    trained = _trained(model, program)
    names_of = _state_dict_names(model, trained)
    signature = program.graph_signature
    mutated = [s.target for s in signature.output_specs if s.kind == OutputKind.BUFFER_MUTATION]
    captured = Captured(program, dim_names(wrapper, args, shapes), PREFIX, names)
    module, weights = import_program(captured, [*trained, *mutated])
    module = _assemble(module, program, spec)
    for arg, name in zip(_function(module, TRAIN_STEP).body.blocks.first.args, names):
        arg.name_hint = name
    if ACCUMULATE in _functions(module):
        for arg, name in zip(_function(module, ACCUMULATE).body.blocks.first.args, names):
            arg.name_hint = name
    return CapturedTraining(
        module,
        weights,
        [*names, LR_INPUT],
        names_of,
        [name.removeprefix(PREFIX) for name in trained],
    )


def _trained(model, program) -> list[str]:
    """Export's names of the parameters that get a gradient, in the graph's
    order; warns about those that require grad and get none."""
    signature = program.graph_signature
    graded = {
        s.target for s in signature.output_specs if s.kind == OutputKind.GRADIENT_TO_PARAMETER
    }
    missing = []
    for names in _aliases(model, model.named_parameters(remove_duplicate=False)).values():
        wanted = model.get_parameter(names[0]).requires_grad
        if wanted and not any(PREFIX + name in graded for name in names):
            missing.append(names[0])
    if missing:
        warnings.warn(
            f"{len(missing)} parameter(s) of {type(model).__name__} get no gradient from the "
            f"loss and are not trained: {', '.join(missing)}. Set requires_grad=False on them "
            "(or use them in the loss) to silence this",
            stacklevel=3,
        )
    return [s.target for s in signature.input_specs if s.target in graded]


def _aliases(model, named) -> dict[int, list[str]]:
    """Names of each tensor (tied weights have several), by tensor identity."""
    groups: dict[int, list[str]] = {}
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return groups


def _state_dict_names(model, trained: list[str]) -> dict[str, str]:
    """The model's state-dict names -> the program's name of that tensor: for
    tied weights, the one that is trained (the program's state)."""
    out = {}
    for names in _aliases(model, model.state_dict(keep_vars=True).items()).values():
        kept = next((n for n in names if PREFIX + n in trained), names[0])
        out.update({name: kept for name in names})
    return {name: out[name] for name in model.state_dict(keep_vars=True)}


# ---- assembly -----------------------------------------------------------------


def _functions(module: ModuleOp) -> dict[str, func.FuncOp]:
    return {op.sym_name.data: op for op in module.ops if isinstance(op, func.FuncOp)}


def _function(module: ModuleOp, name: str) -> func.FuncOp:
    return _functions(module)[name]


@dataclass
class _Joint:
    """The imported joint graph's results, by role."""

    loss: SSAValue
    grads: dict[str, SSAValue]  # parameter -> gradient, in the model's order
    updates: dict[str, SSAValue]  # buffer -> its new value


def _roles(fn: func.FuncOp, program) -> _Joint:
    ret = fn.body.blocks.first.last_op
    loss, grads, updates = None, {}, {}
    for value, spec in zip(ret.arguments, program.graph_signature.output_specs):
        target = (spec.target or "").removeprefix(PREFIX)
        if spec.kind == OutputKind.LOSS_OUTPUT:
            loss = value
        elif spec.kind == OutputKind.GRADIENT_TO_PARAMETER:
            grads[target] = value
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            updates[target] = value
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            raise TrainingError(
                f"the model writes into its input '{target}' in place; training needs inputs "
                "it only reads"
            )
    return _Joint(loss, grads, updates)


def _state_values(block: Block) -> dict[str, SSAValue]:
    return {
        op.weight_name: op.result for op in block.ops if isinstance(op, ParamOp) and op.is_state
    }


def _add_state(block: Block, name: str, type_: TensorType, owner: str | None = None) -> SSAValue:
    """A zero-initialized state param, placed after the block's other params."""
    op = ParamOp(name, type_, "state")
    if owner is not None:
        op.attributes[STATE_OF] = StringAttr(owner)
    op.result.name_hint = name
    first = next(o for o in block.ops if not isinstance(o, ParamOp))
    block.insert_op_before(op, first)
    return op.result


def _write_back(emitter: Emitter, state: dict[str, SSAValue], joint: _Joint) -> None:
    """Buffers the model updates (running statistics) take their new values."""
    for name, value in joint.updates.items():
        emitter.call("aten::copy_", (state[name], value), name=name)


def _finish(fn: func.FuncOp, name: str, outputs: list[SSAValue]) -> None:
    """Return `outputs`; name the function and give it its final signature."""
    block = fn.body.blocks.first
    old = block.last_op
    block.insert_op_before(func.ReturnOp(*outputs), old)
    old.detach()
    old.erase()
    fn.sym_name = StringAttr(name)
    fn.function_type = func.FunctionType.from_lists(
        [a.type for a in block.args], [v.type for v in outputs]
    )


def _accumulate(fn: func.FuncOp, program) -> None:
    """@accumulate: one micro-batch's gradients added into the accumulators."""
    block = fn.body.blocks.first
    joint = _roles(fn, program)
    emitter = Emitter(block, block.last_op, "optimizer")
    state = _state_values(block)
    _write_back(emitter, state, joint)
    for name, grad in joint.grads.items():
        acc = _add_state(block, accumulator_name(name), grad.type, owner=name)
        emitter.call("aten::add_.Tensor", (acc, grad), name=accumulator_name(name))
    _finish(fn, ACCUMULATE, [joint.loss])


def _train_step(fn: func.FuncOp, program, spec: TrainingSpec) -> None:
    """@train_step: the last micro-batch, the step's gradients and the update."""
    optimizer, options = resolve(spec.optimizer, spec.options)
    block = fn.body.blocks.first
    joint = _roles(fn, program)
    emitter = Emitter(block, block.last_op, "optimizer")
    state = _state_values(block)
    _write_back(emitter, state, joint)
    grads, accumulators = {}, []
    for name, grad in joint.grads.items():
        if spec.accumulation > 1:  # earlier micro-batches' sum, then this one's: autograd's order
            acc = _add_state(block, accumulator_name(name), grad.type, owner=name)
            accumulators.append(acc)
            grad = emitter.call("aten::add.Tensor", (acc, grad), name=f"grad.{name}")
        mark_gradient(grad, name)
        grads[name] = grad
    if spec.clip_grad_norm is not None:
        grads = clip_gradients(emitter, grads, spec.clip_grad_norm)
    scalar = TensorType([], "f64")
    emitter.bind("lr", _lr_placeholder(block, scalar))
    emitter.bind("step", _add_state(block, STEP_STATE, scalar))
    scalar_rows = optimizer.scalars(options)
    emitter.rows(scalar_rows)
    scalars = {row.out: emitter.value(row.out) for row in scalar_rows}
    casts: dict[tuple[str, str], SSAValue] = {}
    slots = optimizer.slots(options)
    for name, grad in grads.items():
        compute = "f64" if state[name].type.dtype == "f64" else "f32"
        for scalar, value in scalars.items():
            if value.type.dtype != compute and value.type.dtype == "f64" and scalar != "step":
                if (scalar, compute) not in casts:
                    casts[scalar, compute] = emitter.call(
                        "aten::_to_copy", (value,), (("dtype", Tag("dtype", compute)),), scalar
                    )
                emitter.bind(scalar, casts[scalar, compute])
        emitter.bind("param", state[name])
        emitter.bind("grad", grad)
        for slot in slots:
            emitter.bind(slot, _add_state(block, slot_name(slot, name), grad.type, owner=name))
        emitter.rows(optimizer.update(options), suffix=f".{name}")
    for acc in accumulators:  # read above; zero for the next step
        emitter.call("aten::zero_", (acc,))
    _finish(fn, TRAIN_STEP, [joint.loss])


def _lr_placeholder(block: Block, type_: TensorType) -> SSAValue:
    """The learning rate: the function's last input."""
    arg = block.insert_arg(type_, len(block.args))
    arg.name_hint = LR_INPUT
    return arg


def _assemble(module: ModuleOp, program, spec: TrainingSpec) -> ModuleOp:
    (fn,) = module.ops
    functions = []
    if spec.accumulation > 1:
        accumulate = fn.clone()
        _accumulate(accumulate, program)
        functions.append(accumulate)
    _train_step(fn, program, spec)
    fn.detach()
    functions.append(fn)
    merged = ModuleOp(functions)
    merged.attributes.update(module.attributes)
    return merged
