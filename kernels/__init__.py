"""CLEAR attention: one public op, an exact PyTorch path and a Triton kernel.

``clear_attention`` is the stable entry point; see docs/attention.md for what
it computes. Triton is imported only when the Triton backend is used, so this
module imports on machines without Triton or CUDA.
"""

import math
import os

import torch

from .reference import clear_attention_torch, pool_image_tokens, pooled_grid

__all__ = ["clear_attention", "pool_image_tokens", "pooled_grid", "triton_supported"]

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_inputs(q, k, v, text_len, grid, window, down_factor, spatial_weight, scale, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"clear_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"clear_attention: {name} must have shape (batch, heads, seq, head_dim), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"clear_attention: {name} has dtype {t.dtype}; use float32, float16, bfloat16 or float64")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"clear_attention: q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"clear_attention: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"clear_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 0:
        raise ValueError(f"clear_attention: text_len must be an int >= 0, got {text_len!r}")
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"clear_attention: grid must be (h, w) with ints >= 1, got {grid!r}")
    h, w = grid
    if text_len + h * w != q.shape[2]:
        raise ValueError(
            f"clear_attention: text_len + h*w = {text_len} + {h}*{w} = {text_len + h * w} "
            f"does not match the sequence length {q.shape[2]} (grid or text_len is wrong)")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"clear_attention: window must be an int >= 1 (a radius in tokens), got {window!r}")
    if not isinstance(down_factor, int) or isinstance(down_factor, bool) or down_factor < 1:
        raise ValueError(f"clear_attention: down_factor must be an int >= 1, got {down_factor!r}")
    if spatial_weight is not None:
        if down_factor == 1:
            raise ValueError("clear_attention: spatial_weight is given but down_factor is 1 (no pooled keys)")
        if not isinstance(spatial_weight, torch.Tensor) or spatial_weight.numel() != down_factor ** 2:
            raise ValueError(
                f"clear_attention: spatial_weight must be a tensor of d*d = {down_factor ** 2} numbers "
                f"(shape (d, d) or (1, 1, 1, d, 1, d, 1)), got "
                f"{tuple(spatial_weight.shape) if isinstance(spatial_weight, torch.Tensor) else type(spatial_weight).__name__}")
        shape = tuple(spatial_weight.shape)
        d = down_factor
        if shape not in ((d, d), (1, 1, 1, d, 1, d, 1), (d * d,)):
            raise ValueError(f"clear_attention: spatial_weight shape {shape} is not (d, d) or (1, 1, 1, d, 1, d, 1) for d={d}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"clear_attention: scale must be a positive finite number or None, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"clear_attention: backend must be one of {BACKENDS}, got {backend!r}")


def triton_supported(q):
    """Why the Triton kernel cannot run on ``q`` (a string), or None if it can."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
    if q.device.type != "cuda" and not (interpreting and q.device.type == "cpu"):
        return f"Triton backend needs a CUDA tensor (got device {q.device})"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"Triton backend supports float32, float16 and bfloat16 (got {q.dtype})"
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        return f"Triton backend supports head_dim 16, 32, 64, 128 or 256 (got {d})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton; on Windows triton-windows)"
    return None


def clear_attention(q, k, v, *, text_len, grid, window, down_factor=1, spatial_weight=None, scale=None,
                    backend="auto"):
    """CLEAR attention over a ``[text | image]`` sequence.

    q, k, v: (batch, heads, text_len + h*w, head_dim), text first, image row-major.
    grid: (h, w) image tokens. window: radius r; image query (y, x) sees image
    key (y', x') when (y-y')^2 + (x-x')^2 < r^2, plus every text key and, when
    down_factor d > 1, every pooled key (d x d blocks reduced by
    ``spatial_weight``, default mean; partial edge blocks are edge-padded).
    Text queries see every text and image key. scale defaults to
    1/sqrt(head_dim). backend: "auto" (Triton on CUDA when supported, else
    torch), "torch" or "triton". Returns a tensor of q's shape and dtype.
    """
    _check_inputs(q, k, v, text_len, grid, window, down_factor, spatial_weight, scale, backend)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    grid = (int(grid[0]), int(grid[1]))

    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" and triton_supported(q) is None else "torch"
    elif backend == "triton":
        reason = triton_supported(q)
        if reason is not None:
            raise ValueError(f"clear_attention: backend='triton' cannot run here: {reason}. Use backend='auto' or 'torch'.")

    pooled_k = pooled_v = None
    if down_factor > 1:
        T = text_len
        pooled_k = pool_image_tokens(k[:, :, T:], grid, down_factor, spatial_weight)
        pooled_v = pool_image_tokens(v[:, :, T:], grid, down_factor, spatial_weight)

    if backend == "triton":
        from .clear_triton import clear_attention_triton
        return clear_attention_triton(q, k, v, text_len=text_len, grid=grid, window=window,
                                      pooled_k=pooled_k, pooled_v=pooled_v, scale=scale, down_factor=down_factor)
    return clear_attention_torch(q, k, v, text_len=text_len, grid=grid, window=window,
                                 pooled_k=pooled_k, pooled_v=pooled_v, scale=scale)
