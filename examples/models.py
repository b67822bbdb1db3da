"""Small runnable models for the README, the CLI (`--example NAME`) and tests.

Each factory returns (model, example_inputs, dynamic_shapes). The transformer
configs are tiny versions of real architectures from `transformers`, with
seeded random weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.export import Dim

from ..frontend import hf


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build().eval()


# name -> (transformers config class, model class, config): tiny, seeded, 256-token vocab
CAUSAL_LMS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)),
}  # fmt: skip


def causal_lm(name: str, batch: int = 2, seq: int = 16):
    """A tiny `transformers` causal LM, wrapped, with inputs and dynamic batch/seq."""
    import transformers

    config_cls, model_cls, config = CAUSAL_LMS[name]
    config = getattr(transformers, config_cls)(vocab_size=256, **config)
    model = _seeded(lambda: getattr(transformers, model_cls)(config))
    return hf.wrap(model), hf.example_inputs(model, batch, seq), hf.dynamic_shapes(max_seq=256)


def llama_tiny(batch: int = 2, seq: int = 16):
    return causal_lm("llama", batch, seq)


def gpt2_tiny(batch: int = 2, seq: int = 16):
    return causal_lm("gpt2", batch, seq)


def mixtral_tiny(batch: int = 2, seq: int = 16):
    return causal_lm("mixtral", batch, seq)


def qwen2_tiny(batch: int = 2, seq: int = 16):
    return causal_lm("qwen2", batch, seq)


class SmallCNN(torch.nn.Module):
    """conv-bn-relu-pool twice, then global pooling and a classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = torch.nn.Linear(32, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(images), 1))


def cnn_tiny(batch: int = 4, size: int = 32):
    model = _seeded(SmallCNN)
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, (images,), {"images": {0: Dim("batch", min=1, max=256)}}


EXAMPLES: dict[str, Callable] = {
    "llama-tiny": llama_tiny,
    "gpt2-tiny": gpt2_tiny,
    "mixtral-tiny": mixtral_tiny,
    "qwen2-tiny": qwen2_tiny,
    "cnn-tiny": cnn_tiny,
}
