"""Hugging Face `transformers` models, captured unchanged.

`wrap(model)` bakes the keyword arguments export needs into a small module:
`use_cache=False` (a DynamicCache output cannot be exported), an explicit
`attention_mask` (which keeps packed-sequence detection ops out of the graph)
and logits as the only output. State-dict names and module paths stay those of
the Hugging Face model ("model.layers.0.mlp.up_proj.weight").

    model = LlamaForCausalLM(config)
    compiled = plait.compile(hf.wrap(model), hf.example_inputs(model, batch=2, seq=16),
                             dynamic_shapes=hf.dynamic_shapes())
"""

from __future__ import annotations

import torch
from torch.export import Dim


class CausalLM(torch.nn.Module):
    """(input_ids, attention_mask) -> logits of a `*ForCausalLM` model."""

    # the wrapper's own prefix, stripped from names and locations on import
    plait_prefix = "model."

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


def wrap(model: torch.nn.Module) -> CausalLM:
    return CausalLM(model)


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 16, device=None):
    """Random token ids (seeded) and an all-ones attention mask."""
    vocab = model.config.vocab_size
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    return ids.to(device), mask.to(device)


def dynamic_shapes(max_batch: int = 64, max_seq: int = 4096, batch: bool = True, seq: bool = True):
    """Dynamic batch and sequence dims for (input_ids, attention_mask)."""
    dims = {}
    if batch:
        dims[0] = Dim("batch", min=1, max=max_batch)
    if seq:
        dims[1] = Dim("seq", min=2, max=max_seq)
    return {"input_ids": dims, "attention_mask": dims}
