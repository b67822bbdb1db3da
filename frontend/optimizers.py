"""Optimizers as rows of ATen calls: torch.optim's single-tensor updates.

An optimizer is torch.optim's defaults, the per-parameter state it keeps
(zero-filled slots), the scalar math it does once a step and the update of one
parameter, written in the order and with the formulas of torch.optim's
`_single_tensor_adam` / `_single_tensor_sgd`, so that a plait step computes
what an eager one does. Scalars that torch.optim computes as Python floats
(bias corrections, step sizes) are f64 0-d tensors here, because the
learning rate is a program input (a schedule needs no recompile); where an
ATen call takes such a scalar only as a number (`addcdiv_`'s `value`,
`add_`'s `alpha`), the rows use the calls that give the same result with a
tensor (see the comments).

Rows read: `lr` (the step's learning rate, f64), `step` (the count of steps,
state), `param`, `grad` and the optimizer's slots. The scalar rows' results
reach the parameter rows cast to the parameters' compute type (f32 for f32,
bf16 and f16), as a Python float is when an ATen call takes it: the same
rounding, and kernels that stay vectorized (mixed dtypes are not).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from xdsl.ir import SSAValue

from ..ir.errors import PlaitError
from .emit import Emitter, Row


class OptimizerError(PlaitError):
    """An optimizer or option that does not exist, or a value torch.optim would refuse."""


@dataclass(frozen=True)
class Optimizer:
    name: str
    torch_name: str  # the torch.optim class it reproduces
    defaults: dict[str, object]
    slots: Callable[[dict], tuple[str, ...]]
    scalars: Callable[[dict], list[Row]]
    update: Callable[[dict], list[Row]]


def _kw(**kwargs) -> tuple[tuple[str, object], ...]:
    return tuple(kwargs.items())


# ---- Adam, AdamW ------------------------------------------------------------


def _adam_scalars(decoupled: bool) -> Callable[[dict], list[Row]]:
    def scalars(o: dict) -> list[Row]:
        beta1, beta2 = o["betas"]
        rows = [
            Row("step", "aten::add_.Scalar", ("%step", 1)),
            Row("bias_correction1", "aten::pow.Scalar", (beta1, "%step")),
            Row("bias_correction1", "aten::rsub.Scalar", ("%bias_correction1", 1)),
            Row("bias_correction2", "aten::pow.Scalar", (beta2, "%step")),
            Row("bias_correction2", "aten::rsub.Scalar", ("%bias_correction2", 1)),
            Row("neg_step_size", "aten::div.Tensor", ("%lr", "%bias_correction1")),
            Row("neg_step_size", "aten::neg", ("%neg_step_size",)),
            Row("bias_correction2_sqrt", "aten::sqrt", ("%bias_correction2",)),
            Row("eps", "aten::full_like", ("%lr", o["eps"])),
        ]
        if decoupled and o["weight_decay"]:  # 1 - lr * weight_decay
            rows += [
                Row("decay", "aten::mul.Tensor", ("%lr", o["weight_decay"])),
                Row("decay", "aten::rsub.Scalar", ("%decay", 1)),
            ]
        return rows

    return scalars


def _adam_update(decoupled: bool) -> Callable[[dict], list[Row]]:
    def update(o: dict) -> list[Row]:
        beta1, beta2 = o["betas"]
        rows = []
        if o["weight_decay"]:
            rows.append(
                Row("param", "aten::mul_.Tensor", ("%param", "%decay"))
                if decoupled
                else Row(
                    "grad", "aten::add.Tensor", ("%grad", "%param"), _kw(alpha=o["weight_decay"])
                )
            )
        return rows + [
            Row("exp_avg", "aten::lerp_.Scalar", ("%exp_avg", "%grad", 1 - beta1)),
            Row("exp_avg_sq", "aten::mul_.Scalar", ("%exp_avg_sq", beta2)),
            Row(
                "exp_avg_sq",
                "aten::addcmul_",
                ("%exp_avg_sq", "%grad", "%grad"),
                _kw(value=1 - beta2),
            ),
            # (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps), in one pass
            Row("denom", "aten::sqrt", ("%exp_avg_sq",)),
            Row("denom", "aten::addcdiv", ("%eps", "%denom", "%bias_correction2_sqrt")),
            # param.addcdiv_(exp_avg, denom, value=-step_size): its kernel computes
            # param + (value * exp_avg) / denom, which value=1 and a scaled exp_avg equal
            Row("delta", "aten::mul.Tensor", ("%exp_avg", "%neg_step_size")),
            Row("param", "aten::addcdiv_", ("%param", "%delta", "%denom")),
        ]

    return update


# ---- SGD --------------------------------------------------------------------


def _sgd_scalars(o: dict) -> list[Row]:
    rows = [Row("step", "aten::add_.Scalar", ("%step", 1)), Row("neg_lr", "aten::neg", ("%lr",))]
    if o["momentum"] and o["dampening"]:
        rows.append(Row("first", "aten::eq.Scalar", ("%step", 1)))
    return rows


def _sgd_update(o: dict) -> list[Row]:
    momentum, dampening = o["momentum"], o["dampening"]
    rows = []
    if o["weight_decay"]:
        rows.append(
            Row("grad", "aten::add.Tensor", ("%grad", "%param"), _kw(alpha=o["weight_decay"]))
        )
    if momentum:
        if dampening:  # the first step's buffer is the gradient itself
            rows += [
                Row("buffer", "aten::mul.Tensor", ("%momentum_buffer", momentum)),
                Row("buffer", "aten::add.Tensor", ("%buffer", "%grad"), _kw(alpha=1 - dampening)),
                Row("buffer", "aten::where.self", ("%first", "%grad", "%buffer")),
                Row("momentum_buffer", "aten::copy_", ("%momentum_buffer", "%buffer")),
            ]
        else:  # from a zero buffer, momentum * 0 + grad is the gradient exactly
            rows += [
                Row("momentum_buffer", "aten::mul_.Scalar", ("%momentum_buffer", momentum)),
                Row(
                    "momentum_buffer",
                    "aten::add_.Tensor",
                    ("%momentum_buffer", "%grad"),
                    _kw(alpha=1 - dampening),
                ),
            ]
        rows.append(
            Row("grad", "aten::add.Tensor", ("%grad", "%momentum_buffer"), _kw(alpha=momentum))
            if o["nesterov"]
            else Row("grad", "", ("%momentum_buffer",))
        )
    # param.add_(grad, alpha=-lr) with lr a tensor: addcmul_ rounds as add_ does
    return rows + [Row("param", "aten::addcmul_", ("%param", "%grad", "%neg_lr"))]


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer(
        "adamw",
        "torch.optim.AdamW",
        {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
        lambda o: ("exp_avg", "exp_avg_sq"),
        _adam_scalars(True),
        _adam_update(True),
    ),
    "adam": Optimizer(
        "adam",
        "torch.optim.Adam",
        {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
        lambda o: ("exp_avg", "exp_avg_sq"),
        _adam_scalars(False),
        _adam_update(False),
    ),
    "sgd": Optimizer(
        "sgd",
        "torch.optim.SGD",
        {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
        lambda o: ("momentum_buffer",) if o["momentum"] else (),
        _sgd_scalars,
        _sgd_update,
    ),
}


def _number(name: str, value, low: float = 0.0, below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptimizerError(f"optimizer option {name}={value!r} must be a finite number")
    if value < low or (below is not None and value >= below):
        bound = f"in [{low}, {below})" if below is not None else f">= {low}"
        raise OptimizerError(f"optimizer option {name}={value!r} must be {bound}")
    return float(value)


def resolve(name: str, options: dict) -> tuple[Optimizer, dict]:
    """The optimizer called `name` and its full options (torch.optim's defaults
    for those not given), checked as torch.optim checks them."""
    optimizer = OPTIMIZERS.get(name) if isinstance(name, str) else None
    if optimizer is None:
        raise OptimizerError(
            f"optimizer {name!r} does not exist; use one of {', '.join(sorted(OPTIMIZERS))}"
        )
    unknown = sorted(set(options) - set(optimizer.defaults))
    if unknown:
        raise OptimizerError(
            f"{name} has no option '{unknown[0]}'; its options are "
            f"{', '.join(optimizer.defaults)} (as {optimizer.torch_name})"
        )
    o = {**optimizer.defaults, **options}
    if "betas" in o:
        betas = o["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise OptimizerError(f"optimizer option betas={betas!r} must be a pair of numbers")
        o["betas"] = tuple(_number(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
    for key in ("eps", "weight_decay", "momentum", "dampening"):
        if key in o:
            o[key] = _number(key, o[key])
    if "nesterov" in o:
        if not isinstance(o["nesterov"], bool):
            raise OptimizerError(
                f"optimizer option nesterov={o['nesterov']!r} must be True or False"
            )
        if o["nesterov"] and (o["momentum"] <= 0 or o["dampening"] != 0):
            raise OptimizerError("nesterov momentum needs momentum > 0 and dampening=0")
    return optimizer, o


def clip_gradients(emitter: Emitter, grads: dict[str, SSAValue], max_norm: float):
    """torch.nn.utils.clip_grad_norm_(parameters, max_norm): the gradients
    scaled by min(max_norm / (total norm + 1e-6), 1), in its order of calls."""
    norms = [emitter.call("aten::linalg_vector_norm", (g, 2.0)) for g in grads.values()]
    total = emitter.call("aten::stack", (norms,))
    total = emitter.call("aten::linalg_vector_norm", (total, 2.0), name="grad_norm")
    coef = emitter.call("aten::add.Tensor", (total, 1e-6))
    coef = emitter.call("aten::reciprocal", (coef,))  # max_norm / x is x.reciprocal() * max_norm
    coef = emitter.call("aten::mul.Tensor", (coef, float(max_norm)))
    coef = emitter.call("aten::clamp", (coef, None, 1.0), name="clip_coef")
    return {
        name: emitter.call("aten::mul.Tensor", (g, coef), name=f"clipped.{name}")
        for name, g in grads.items()
    }
