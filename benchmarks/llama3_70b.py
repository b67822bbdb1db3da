"""Llama-3-70B's shapes, for the benchmarks that build it on meta or fake tensors."""

from __future__ import annotations


def llama3_70b_config(layers: int = 80):
    """transformers' LlamaConfig of Llama-3-70B (`layers` decoder layers)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=layers,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
