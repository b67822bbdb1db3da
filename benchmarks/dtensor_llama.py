"""The baseline the TP benchmarks compare with: a `transformers` model
parallelized by PyTorch DTensor's `parallelize_module` with the standard plan
(q/k/v/gate/up colwise, o/down rowwise) over a 1-D CPU device mesh; for
training, `vocab=True` adds torchtitan's plan for the ends of the model (the
embedding split by vocabulary rows, lm_head's logits left split by
vocabulary for a `loss_parallel()` cross-entropy)."""

from __future__ import annotations

COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
           "mlp.up_proj")  # fmt: skip
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def parallelize_llama(model, world: int, colwise=COLWISE, rowwise=ROWWISE, vocab=False):
    """The plan on every decoder layer's linears named in `colwise` and `rowwise`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {}
    if vocab:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
        plan["lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    for i in range(model.config.num_hidden_layers):
        plan.update({f"model.layers.{i}.{name}": ColwiseParallel() for name in colwise})
        plan.update({f"model.layers.{i}.{name}": RowwiseParallel() for name in rowwise})
    return parallelize_module(model, init_device_mesh("cpu", (world,)), plan)
