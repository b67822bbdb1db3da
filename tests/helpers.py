"""Helpers shared by tests."""

import torch


def max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale."""
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
