"""Autoregressive decoding: a `*ForCausalLM` model with a static KV cache,
captured as two programs that share its weights and cache.

    @prefill(input_ids, position_ids, slots, cache_mask)   a prompt of S tokens
    @decode(input_ids, position_ids, slots, cache_mask)    one token per sequence

Both write the new keys and values into cache `slots` (one index per token)
and return the logits of the last position. The cache is one zero-filled
tensor per layer and per keys/values, batch x kv-heads x max-length x
head-dim, registered as buffers and updated with `index_copy_`, so it imports
as program state (`plait.param state`), which sharding splits by kv heads.
`cache_mask` (batch x context) marks which of the first `context` slots hold
real tokens (sequences of different lengths share a batch by left padding);
attention reads only those `context` slots, so a step costs what the tokens
so far cost, not the whole cache.

    model = LlamaForCausalLM(config)
    module, weights = capture_generation(model, batch=4, max_length=256)
"""

from __future__ import annotations

import inspect

import torch
from torch.export import Dim
from xdsl.dialects import func
from xdsl.dialects.builtin import ModuleOp, StringAttr

from ..ir.attrs import SYMBOLS_ATTR, SymbolsAttr
from ..ir.errors import PlaitError
from ..ir.libraries import libraries, require_library
from ..ir.weights import WeightStore
from .capture import capture
from .importer import import_program

FUNCTIONS = ("prefill", "decode")


class GenerationError(PlaitError):
    pass


def cache_shape(config, batch: int, max_length: int) -> tuple[int, int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return batch, kv_heads, max_length, head_dim


class _LayerCache(torch.nn.Module):
    def __init__(self, shape, dtype, device):
        super().__init__()
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device))


class _SlotCache:
    """The cache object Hugging Face attention layers call `update` on: writes
    the step's keys and values into their slots and returns the whole layer."""

    is_compileable = True

    def __init__(self, layers: torch.nn.ModuleList):
        self.layers = layers
        self.slots: torch.Tensor | None = None
        self.context = 0  # slots attention reads: the first `context`

    def update(self, keys, values, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.keys.index_copy_(2, self.slots, keys)
        layer.values.index_copy_(2, self.slots, values)
        return layer.keys[:, :, : self.context], layer.values[:, :, : self.context]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise GenerationError("the cached model passes position_ids; nothing asks for a length")


class CachedCausalLM(torch.nn.Module):
    """(input_ids, position_ids, slots, cache_mask) -> last-position logits,
    with the KV cache as buffers `kv_cache.{layer}.keys/values`."""

    plait_prefix = "model."

    def __init__(self, model: torch.nn.Module, batch: int, max_length: int):
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_hidden_layers"):
            raise GenerationError(
                f"{type(model).__name__} is not a Hugging Face *ForCausalLM model; generation "
                "compiles transformers decoder models (Llama, GPT-2, Qwen2, ...)"
            )
        self.model = model
        parameter = next(model.parameters())
        # one slot more than is ever read: export specializes a slice that spans a
        # whole dim, so `context` stays below the cache's length
        shape = cache_shape(config, batch, max_length + 1)
        self.kv_cache = torch.nn.ModuleList(
            _LayerCache(shape, parameter.dtype, parameter.device)
            for _ in range(config.num_hidden_layers)
        )
        self.cache = _SlotCache(self.kv_cache)
        self.keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, position_ids, slots, cache_mask):
        self.cache.slots, self.cache.context = slots, cache_mask.shape[1]
        # query q (written at slots[q]) sees slot k if k <= slots[q] and slot k
        # holds a real token; always itself, so padding rows stay finite
        k = torch.arange(cache_mask.shape[1], device=input_ids.device)
        causal = k[None, :] <= slots[:, None]
        visible = cache_mask[:, None, :].bool() | (k[None, :] == slots[:, None])[None]
        mask = (causal[None] & visible)[:, None]
        extra = {"logits_to_keep": 1} if self.keep_last else {}
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            **extra,
        )
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1:]


def example_inputs(batch: int, seq: int, context: int, device=None):
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=device)[None].expand(batch, seq).contiguous()
    slots = torch.arange(seq, device=device)
    cache_mask = torch.zeros(batch, context, dtype=torch.long, device=device)
    return ids, positions, slots, cache_mask


def capture_generation(
    model: torch.nn.Module, batch: int, max_length: int
) -> tuple[ModuleOp, WeightStore]:
    """One IR module with @prefill (`prompt` tokens) and @decode (one token),
    both reading `context` cache slots (sizes in [1, max_length]), sharing
    weight and state names."""
    if max_length < 3 or batch < 1:
        raise GenerationError("generation needs batch >= 1 and max_length >= 3")
    wrapper = CachedCausalLM(model, batch, max_length)
    device = wrapper.kv_cache[0].keys.device
    prompt = Dim("prompt", min=1, max=max_length)
    context = {0: None, 1: Dim("context", min=1, max=max_length)}
    prefill_dims = {
        "input_ids": {1: prompt},
        "position_ids": {1: prompt},
        "slots": {0: prompt},
        "cache_mask": context,
    }
    decode_dims = {"input_ids": None, "position_ids": None, "slots": None, "cache_mask": context}
    # example sizes differ, or export would take prompt and context for one symbol
    prefill = example_inputs(batch, 2, 3, device)
    decode = example_inputs(batch, 1, 3, device)
    parts = {
        "prefill": import_program(capture(wrapper, prefill, prefill_dims)),
        "decode": import_program(capture(wrapper, decode, decode_dims)),
    }
    return merge_functions(parts)


def merge_functions(parts: dict[str, tuple[ModuleOp, WeightStore]]):
    """Modules of one @forward each -> one module with a function per name."""
    functions, library_names, symbols = [], set(), {}
    weights = WeightStore()
    for name, (module, store) in parts.items():
        fn = next(op for op in module.ops if isinstance(op, func.FuncOp))
        fn.sym_name = StringAttr(name)
        fn.detach()
        functions.append(fn)
        library_names.update(libraries(module))
        if SYMBOLS_ATTR in module.attributes:
            symbols.update(module.attributes[SYMBOLS_ATTR].ranges)
        for weight in store.names():
            if weight not in weights:  # both programs read the same model's weights
                weights.add(weight, store.get(weight))
    merged = ModuleOp(functions)
    require_library(merged, *library_names)
    if symbols:
        merged.attributes[SYMBOLS_ATTR] = SymbolsAttr(
            tuple((n, lo, hi) for n, (lo, hi) in symbols.items())
        )
    return merged, weights
