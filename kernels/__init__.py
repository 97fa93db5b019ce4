"""CLEAR attention: one public op, an exact PyTorch path, a Triton kernel and
FlexAttention.

``clear_attention`` is the stable entry point; see docs/attention.md for what
it computes and how "auto" picks a backend (a first-use self-check per GPU,
dtype, head_dim and kernel config, falling back Triton -> Flex -> torch).
Triton is imported only when the Triton backend is used, so this module
imports on machines without Triton or CUDA.
"""

import logging
import math
import os

import torch

from .reference import clear_attention_torch, pool_image_tokens, pooled_grid

__all__ = ["clear_attention", "pool_image_tokens", "pooled_grid", "triton_supported", "BACKEND_ENV"]

BACKENDS = ("auto", "torch", "triton", "flex")
BACKEND_ENV = "CLEAR_ATTENTION_BACKEND"  # forces a backend where callers pass "auto" (the node does)
log = logging.getLogger("comfyui_clear")
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
    if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        # Its dots are tensor-core MMAs (tests/test_kernel_compile.py): float32 would be tf32 or slow.
        return f"Triton backend on CUDA takes float16 and bfloat16 (got {q.dtype}; float32 runs on flex or torch)"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"Triton backend supports float32 (interpreter), float16 and bfloat16 (got {q.dtype})"
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        return f"Triton backend supports head_dim 16, 32, 64, 128 or 256 (got {d})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton; on Windows triton-windows)"
    return None


def flex_supported(q):
    """Why FlexAttention cannot run on ``q`` (a string), or None if it can."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"FlexAttention backend supports float32, float16 and bfloat16 (got {q.dtype})"
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        return f"FlexAttention backend needs a power-of-two head_dim >= 16 (got {d})"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return "this torch has no FlexAttention (torch >= 2.5)"
    return None


def _fast_device(q):
    """Whether "auto" tries the compiled backends (tests widen it to the CPU
    under TRITON_INTERPRET=1)."""
    return q.device.type == "cuda"


def _device_name(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda:{device.index or 0})"
    return str(device)


_TRUST = {}  # (backend, device, dtype, head_dim, config) -> None if it passed its check, else why not


def _run_backend(name, q, k, v, text_len, grid, window, down_factor, pooled_k, pooled_v, scale):
    if name == "triton":
        from .clear_triton import clear_attention_triton
        return clear_attention_triton(q, k, v, text_len=text_len, grid=grid, window=window, pooled_k=pooled_k,
                                      pooled_v=pooled_v, scale=scale, down_factor=down_factor)
    if name == "flex":
        from .flex import clear_attention_flex
        return clear_attention_flex(q, k, v, text_len=text_len, grid=grid, window=window, pooled_k=pooled_k,
                                    pooled_v=pooled_v, scale=scale)
    return clear_attention_torch(q, k, v, text_len=text_len, grid=grid, window=window, pooled_k=pooled_k,
                                 pooled_v=pooled_v, scale=scale)


# The self-check problem: several tiles with borders and an interior, text
# keys, odd sizes; small enough to cost milliseconds on a GPU.
_CHECK_SHAPE = dict(batch=1, heads=2, text_len=7, grid=(19, 21))
_CHECK_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _self_check(name, dtype, device, head_dim, window, down_factor):
    """None if backend ``name`` matches the torch path on a small random
    problem with this dtype, head_dim, window and down factor, else why not."""
    B, H, T, (h, w) = (_CHECK_SHAPE[key] for key in ("batch", "heads", "text_len", "grid"))
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, T + h * w, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    pooled_k = pooled_v = None
    if down_factor > 1:
        pooled_k = pool_image_tokens(k[:, :, T:], (h, w), down_factor)
        pooled_v = pool_image_tokens(v[:, :, T:], (h, w), down_factor)
    scale = head_dim ** -0.5
    try:
        out = _run_backend(name, q, k, v, T, (h, w), window, down_factor, pooled_k, pooled_v, scale)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a launch error surfaces here, not later in the user's step
    except Exception as exc:  # compile or launch failure: anything the backend raised
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    ref = clear_attention_torch(q, k, v, text_len=T, grid=(h, w), window=window, pooled_k=pooled_k,
                                pooled_v=pooled_v, scale=scale).double()
    if out.shape != q.shape or not torch.isfinite(out).all():
        return "non-finite or misshapen output"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    if not err < _CHECK_TOL[dtype]:
        return f"wrong result (relative error {err:.2e} vs the torch path)"
    return None


def _trusted(name, q, window, down_factor, config):
    key = (name, str(q.device), q.dtype, q.shape[-1], config)
    if key not in _TRUST:
        _TRUST[key] = _self_check(name, q.dtype, q.device, q.shape[-1], window, down_factor)
    return _TRUST[key] is None, _TRUST[key]


def _triton_config(q, window, down_factor):
    from .clear_triton import device_arch
    from .tiling import kernel_config
    return tuple(sorted(kernel_config(q.shape[-1], window, down_factor, device_arch(q.device)).items()))


_WARNED = set()


def _auto_backend(q, window, down_factor):
    """Triton if it passed its first-use check here, else Flex if that did,
    else torch; one warning per failing (GPU, dtype, head_dim, config)."""
    if not _fast_device(q):
        return "torch"
    failures = []
    if triton_supported(q) is None:
        config = _triton_config(q, window, down_factor)
        ok, why = _trusted("triton", q, window, down_factor, config)
        if ok:
            return "triton"
        failures.append(("triton", config, why))
    chosen = "torch"
    if flex_supported(q) is None:
        ok, why = _trusted("flex", q, window, down_factor, down_factor > 1)
        if ok:
            chosen = "flex"
        else:
            failures.append(("flex", None, why))
    warn_key = tuple((name, config) for name, config, _ in failures) + (str(q.device), q.dtype, q.shape[-1])
    if failures and warn_key not in _WARNED:
        _WARNED.add(warn_key)
        import importlib.metadata as md
        try:
            triton_version = md.version("triton")
        except md.PackageNotFoundError:
            triton_version = "not installed"
        reasons = "; ".join(f"{name}: {why}" for name, _, why in failures)
        log.warning("CLEAR attention: %s failed the first-use check on %s (Triton %s, torch %s, %s, head_dim %d, "
                    "window %d, down_factor %d): %s. Running %s instead. Set %s=<triton|flex|torch> to force one.",
                    " and ".join(name for name, _, _ in failures), _device_name(q.device), triton_version,
                    torch.__version__, str(q.dtype).replace("torch.", ""), q.shape[-1], window, down_factor,
                    reasons, "FlexAttention" if chosen == "flex" else "the torch path", BACKEND_ENV)
    return chosen


def clear_attention(q, k, v, *, text_len, grid, window, down_factor=1, spatial_weight=None, scale=None,
                    backend="auto"):
    """CLEAR attention over a ``[text | image]`` sequence.

    q, k, v: (batch, heads, text_len + h*w, head_dim), text first, image row-major.
    grid: (h, w) image tokens. window: radius r; image query (y, x) sees image
    key (y', x') when (y-y')^2 + (x-x')^2 < r^2, plus every text key and, when
    down_factor d > 1, every pooled key (d x d blocks reduced by
    ``spatial_weight``, default mean; partial edge blocks are edge-padded).
    Text queries see every text and image key. scale defaults to
    1/sqrt(head_dim). backend: "auto" (on CUDA: Triton if it passes a
    first-use self-check, else FlexAttention if that does, else torch; the
    environment variable CLEAR_ATTENTION_BACKEND overrides "auto"), "torch",
    "triton" or "flex" (forced: no self-check). Returns a tensor of q's shape
    and dtype.
    """
    _check_inputs(q, k, v, text_len, grid, window, down_factor, spatial_weight, scale, backend)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scale = float(scale)
    grid = (int(grid[0]), int(grid[1]))

    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if forced not in BACKENDS:
            raise ValueError(f"clear_attention: environment variable {BACKEND_ENV}={forced!r} is not one of {BACKENDS}")
        backend = forced
    if backend == "triton" or backend == "flex":
        reason = (triton_supported if backend == "triton" else flex_supported)(q)
        if reason is not None:
            raise ValueError(f"clear_attention: backend={backend!r} cannot run here: {reason}. "
                             "Use backend='auto' or 'torch'.")

    pooled_k = pooled_v = None
    if down_factor > 1:
        T = text_len
        pooled_k = pool_image_tokens(k[:, :, T:], grid, down_factor, spatial_weight)
        pooled_v = pool_image_tokens(v[:, :, T:], grid, down_factor, spatial_weight)

    if backend == "auto":
        backend = _auto_backend(q, window, down_factor)
    return _run_backend(backend, q, k, v, text_len, grid, window, down_factor, pooled_k, pooled_v, scale)
