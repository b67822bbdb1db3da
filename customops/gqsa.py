"""`plait::gqsa_linear`: a linear layer with a GQSA weight (see passes/compress/gqsa.py
for the layout): 4-bit groups of G input features, most pruned away.

PyTorch has no kernel for this layout, so plait ships one in C++
(`gqsa.cpp`, AVX2 and AVX-512 where the CPU has them), compiled on first use
with torch.utils.cpp_extension into torch's extension cache. Up to
`SPARSE_MAX_TOKENS` tokens (`SPARSE_MAX_TOKENS_BF16` with bf16/fp16
activations) run it; more tokens, or a machine without a C++ compiler, rebuild the dense
weight and run a GEMM in the activations' dtype (the reference path the tests
compare against). The C++ code rebuilds it block by block of output rows into
`scratch`, one buffer per thread that every layer and call reuses (layers run
one at a time), of at most `SCRATCH_BYTES`; `plait::quant_linear`'s prefill
dequantizes into it too (`gqsa.cpp` has that loop as well).
"""

from __future__ import annotations

import functools
import threading

import torch

from . import KernelArgumentError, native

# at most this many tokens use the sparse kernel; above, densify + GEMM in the
# activations' dtype (benchmarks/quant_kernels.py: the dense path is faster
# from 128 tokens with fp32 activations, from 32 with bf16 ones)
SPARSE_MAX_TOKENS = 64
SPARSE_MAX_TOKENS_BF16 = 16  # bf16 or fp16 activations
KERNEL_GROUPS = (8, 16, 32, 64)  # the C++ kernel's
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the C++ dense rows'
_HALF_DTYPES = (torch.bfloat16, torch.float16)
SCRATCH_BYTES = 16 << 20  # a prefill's dense weight block, per thread
_scratch = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's flat buffer of `dtype`, grown to the largest request and reused."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[dtype, device] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def unpack_groups(values: torch.Tensor) -> torch.Tensor:
    """uint8 [..., G/2] -> int values in [-8, 7], [..., G]."""
    low = (values & 15).to(torch.int8) - 8
    high = (values >> 4).to(torch.int8) - 8
    return torch.cat((low, high), dim=-1)


def pack_groups(q: torch.Tensor) -> torch.Tensor:
    half = q.shape[-1] // 2
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., :half] | (u[..., half:] << 4)


def dense_weight(values, scales, blocks, group: int, in_features: int, segments: int = 1):
    """The dense [out, in] weight of a GQSA layout (float32)."""
    out, kept = scales.shape
    per_segment = kept // segments
    offset = (
        torch.arange(kept, device=blocks.device) // per_segment * (in_features // group // segments)
    )
    column = blocks.long() + offset  # global block column
    groups = unpack_groups(values).float() * scales.float().unsqueeze(-1)  # [out, kept, G]
    w = torch.zeros(out, in_features // group, group, device=values.device)
    w.scatter_(1, column.unsqueeze(-1).expand(-1, -1, group), groups)
    return w.reshape(out, in_features)


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled C++ kernel, or None (with a warning) where it cannot be built."""
    return native.build(
        "plait_gqsa",
        "gqsa.cpp",
        "GQSA layers run densified and quantized layers' prefill dequantizes with torch ops",
    )


def prepare_args(args: list) -> dict[str, torch.Tensor]:
    """Scales and blocks contiguous, as the C++ kernel reads them (after
    checking the layout in passes/compress/gqsa.py)."""
    values, scales, blocks, group = args[1], args[2], args[3], args[5]
    if not isinstance(scales, torch.Tensor) or not isinstance(blocks, torch.Tensor):
        return {}
    if isinstance(values, torch.Tensor):
        _check_layout(values, scales, blocks, group)
    return dict(zip(("kernel_scales", "kernel_blocks"), _kernel_layout(scales, blocks)))


def _kernel_layout(scales: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 scales and int16 blocks as stored (the pass's layout), or both
    widened to float32 and int32: the pairs the C++ code reads."""
    if scales.dtype == torch.float16 and blocks.dtype == torch.int16:
        return scales.contiguous(), blocks.contiguous()
    return scales.float().contiguous(), blocks.int().contiguous()


def _check_layout(values, scales, blocks, group) -> None:
    out_kept = tuple(values.shape[:2])
    if (
        values.dtype != torch.uint8
        or values.dim() != 3
        or values.shape[2] * 2 != group
        or tuple(scales.shape) != out_kept
        or tuple(blocks.shape) != out_kept
        or blocks.dtype.is_floating_point
    ):
        raise KernelArgumentError(
            f"plait::gqsa_linear needs uint8 values [out, kept, {group // 2}] and scales and "
            f"integer blocks [out, kept], not {values.dtype} {tuple(values.shape)}, "
            f"{tuple(scales.shape)} and {blocks.dtype} {tuple(blocks.shape)}; recompile the "
            "model with sparsify"
        )


@torch.library.custom_op("plait::gqsa_linear", mutates_args=())
def gqsa_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor,
    blocks: torch.Tensor,
    bias: torch.Tensor | None,
    group: int,
    kernel_scales: torch.Tensor | None = None,
    kernel_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    out, cols = scales.shape[0], x.shape[-1]
    x2 = x.reshape(-1, cols)
    limit = SPARSE_MAX_TOKENS_BF16 if x.dtype in _HALF_DTYPES else SPARSE_MAX_TOKENS
    sparse = x2.shape[0] <= limit and x.device.type == "cpu" and group in KERNEL_GROUPS
    ext = extension() if sparse else None
    if ext is not None:
        if kernel_scales is None or kernel_blocks is None:  # not prepared
            kernel_scales, kernel_blocks = _kernel_layout(scales, blocks)
        y = ext.gqsa_linear(x2.float(), values, kernel_scales, kernel_blocks, group).to(x.dtype)
    else:
        y = _dense_product(x2, values, scales, blocks, group, kernel_scales, kernel_blocks)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], out)


def _dense_product(x2, values, scales, blocks, group, kernel_scales, kernel_blocks) -> torch.Tensor:
    """x2 @ W^T from the dense weight, rebuilt in scratch by C++ where it can."""
    native = extension() if x2.device.type == "cpu" and x2.dtype in NATIVE_DTYPES else None
    if native is None:
        w = dense_weight(values, scales, blocks, group, x2.shape[1]).to(x2.dtype)
        return torch.nn.functional.linear(x2, w)
    if kernel_scales is None or kernel_blocks is None:  # not prepared
        kernel_scales, kernel_blocks = _kernel_layout(scales, blocks)
    out, cols = values.shape[0], x2.shape[1]
    rows = max(1, SCRATCH_BYTES // (cols * x2.element_size()))
    parts = []
    for begin in range(0, out, rows):
        end = min(out, begin + rows)
        w = scratch((end - begin) * cols, x2.dtype, x2.device).view(-1, cols)
        native.densify_rows(values.contiguous(), kernel_scales, kernel_blocks, group, begin, end, w)
        parts.append(torch.nn.functional.linear(x2, w))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@gqsa_linear.register_fake
def _(x, values, scales, blocks, bias, group, kernel_scales=None, kernel_blocks=None):
    return x.new_empty(*x.shape[:-1], scales.shape[0])


def reference(x, values, scales, blocks, bias, group) -> torch.Tensor:
    """The layer in float64 from the dense weight."""
    w = dense_weight(values, scales, blocks, group, x.shape[-1]).double()
    return torch.nn.functional.linear(x.double(), w, None if bias is None else bias.double())
