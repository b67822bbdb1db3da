"""tier{budget=0.5,hardware=cpu,values=batch:1,seq:128}: keep weights within a
device budget by streaming the rest from the host tier.

`budget` is a fraction of the program's weight bytes (<= 1) or a number of
bytes. The cost model (`estimate`, on `hardware`, with the size symbols at
`values` or their upper bounds) gives each op's time; `tiering.plan_tiers`
picks the weights to stream. Those params are marked

    %w = plait.param "model.layers.1.mlp.up_proj.weight" {mem = #plait.mem<tier = "host", prefetch = true>} : ...

and the backend fetches them on a background thread, two ahead, in the
order of their first use (see `tiering`). A budget below the minimum is an
error that states the minimum. The predicted step times (all on device, and
with this choice) are in the module's `plait.tiering` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, StringAttr

from ...ir.attrs import TIERING_ATTR
from ...ir.memory import stream_from_host
from ...ir.ops import ParamOp
from ..base import Pass, function_blocks
from ..options import OptionError, SizeValues, check_hardware
from .liveness import value_sizes
from .tiering import TierError, Weight, plan_tiers


@dataclass(frozen=True)
class Tier(Pass):
    name = "tier"
    summary = "weights streamed from the host tier within a device budget, prefetched"

    budget: float = 0.5
    hardware: str = "cpu"
    values: SizeValues = SizeValues()  # sizes to plan for; others at their upper bounds

    def __post_init__(self):
        super().__post_init__()
        if self.budget <= 0:
            raise OptionError(
                f"budget is a share of the weight bytes (<= 1) or bytes, > 0, not {self.budget:g}",
                "budget",
            )
        check_hardware(self.hardware)

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        from ...cost.estimate import Target, estimate
        from ...hardware import load

        hw = load(self.hardware)
        if hw.host_bandwidth is None:
            raise TierError(f"hardware '{hw.name}' has no [host] bandwidth to stream weights with")
        values = self.values.at(op, "tier")
        for block in function_blocks(op):
            fn = block.parent.parent
            report = estimate(op, Target(hw, values=values), fn.sym_name.data)
            times = {row.op: row.time for row in report.ops}
            ops = list(block.ops)
            sizes = value_sizes(fn, values)
            weights, params = [], {}
            for param in (o for o in ops if isinstance(o, ParamOp) and not o.is_state):
                users = [ops.index(use.operation) for use in param.result.uses]
                if users:
                    name = param.weight_name
                    weights.append(Weight(name, sizes[param.result], min(users), max(users)))
                    params[name] = param
            total = sum(w.size for w in weights)
            budget = int(self.budget * total) if self.budget <= 1 else int(self.budget)
            plan = plan_tiers([times.get(o, 0.0) for o in ops], weights, budget, hw.host_bandwidth)
            for name in plan.streamed:
                stream_from_host(params[name])
            op.attributes[TIERING_ATTR] = StringAttr(
                f"weights {total} B, on device {plan.device_bytes} B, streamed "
                f"{len(plan.streamed)}; predicted step {plan.all_device:.6g} s all on device, "
                f"{plan.predicted:.6g} s tiered ({hw.name})"
            )
