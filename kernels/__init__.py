"""CLEAR attention: one public op, an exact PyTorch path, a Triton kernel and
FlexAttention.

``clear_attention`` is the stable entry point; see docs/attention.md for what
it computes and how "auto" picks a backend (a first-use self-check per GPU
and compiled kernel variant, falling back Triton -> Flex -> torch).
``clear_attention`` validates its inputs; under torch.compile it calls the
custom op ``torch.ops.comfyui_clear.clear_attention``, one opaque op with a
fake (shape-only) implementation, so the backend choice, the self-check, the
tile schedule and the launches run in the op's eager implementation, never
in traced code (eager calls run that implementation directly).
Gradients: kernels/autograd.py (the op also carries an autograd formula).
Triton is imported only when the Triton backend is used, so this module
imports on machines without Triton or CUDA.
"""

import collections
import contextlib
import functools
import logging
import math
import os
import sys
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .autograd import (AUTO_DIFFERENTIABLE, TRITON_REFUSAL, clear_attention_backward,
                       clear_attention_torch_autograd, flex_refusal, grad_needed, pool_image_tokens_backward,
                       pool_image_tokens_differentiable)
from .reference import pool_image_tokens, pooled_grid
from .selfcheck import _reason, check_backend

__all__ = ["clear_attention", "pool_image_tokens", "pooled_grid", "triton_supported", "flex_supported",
           "backend_choices", "device_guard", "BACKEND_ENV"]

BACKENDS = ("auto", "torch", "triton", "flex")
BACKEND_ENV = "CLEAR_ATTENTION_BACKEND"  # forces a backend where callers pass "auto" (the node does)
log = logging.getLogger("comfyui_clear")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_inputs(q, k, v, text_len, grid, window, down_factor, spatial_weight, scale, backend, pooled_k=None,
                  pooled_v=None):
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
    if pooled_k is not None or pooled_v is not None:
        _check_pooled(q, pooled_k, pooled_v, down_factor, spatial_weight)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"clear_attention: scale must be a positive finite number or None, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"clear_attention: backend must be one of {BACKENDS}, got {backend!r}")


def _check_pooled(q, pooled_k, pooled_v, down_factor, spatial_weight):
    if pooled_k is None or pooled_v is None:
        raise ValueError("clear_attention: pass pooled_k and pooled_v together (or neither)")
    for name, t in (("pooled_k", pooled_k), ("pooled_v", pooled_v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"clear_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
            raise ValueError(f"clear_attention: {name} must have shape (batch, heads, pooled tokens, head_dim) = "
                             f"({q.shape[0]}, {q.shape[1]}, P, {q.shape[3]}), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES or t.device != q.device:
            raise ValueError(f"clear_attention: {name} must be a float tensor on {q.device}, "
                             f"got {t.dtype} on {t.device}")
    if pooled_k.shape != pooled_v.shape:
        raise ValueError(f"clear_attention: pooled_k and pooled_v must have one shape, got "
                         f"{tuple(pooled_k.shape)}, {tuple(pooled_v.shape)}")
    if down_factor == 1:
        raise ValueError("clear_attention: pooled_k/pooled_v are given but down_factor is 1; pass the d they were "
                         "pooled with (it selects the kernel configuration)")
    if spatial_weight is not None:
        raise ValueError("clear_attention: spatial_weight applies when clear_attention pools; with pooled_k/pooled_v "
                         "given, pool with it beforehand (pool_image_tokens) and leave it None")


def triton_supported(q):
    """Why the Triton kernel cannot run on ``q`` (a string), or None if it can."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
    if q.device.type != "cuda" and not (interpreting and q.device.type == "cpu"):
        return f"the Triton kernel needs a CUDA tensor (got device {q.device})"
    if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        # Its dots are tensor-core MMAs (tests/test_kernel_compile.py): float32 would be tf32 or slow.
        return (f"{str(q.dtype).replace('torch.', '')} on CUDA: the Triton kernel takes float16 and bfloat16 "
                "(load the model in bf16 or fp16 to use it)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernel takes float32 (interpreter), float16 and bfloat16 (got {q.dtype})"
    B, H, L, d = q.shape
    if q.device.type == "cuda" and d not in (64, 128):
        # The sizes compiled and checked ahead of time (tensor cores, no spills).
        return f"the Triton kernel is built for head_dim 64 and 128 on the GPU (got {d})"
    if d not in (16, 32, 64, 128, 256):
        return f"the Triton kernel supports head_dim 16, 32, 64, 128 or 256 (got {d})"
    if max(L, H) * d >= 2 ** 31:
        return f"sequence of {L} tokens x {H} heads is too long for the Triton kernel's 32-bit strides"
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


def device_guard(device):
    """``torch.cuda.device(device)`` on a CUDA (or ROCm) device, else nothing.
    Triton launches on the current device and its stream, not on the
    tensors' device: a model on cuda:1 would otherwise run the kernel
    against GPU 0."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _graph_recording(device):
    """Whether a CUDA graph is being recorded on ``device``'s current stream."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


class DeviceCache:
    """Tensors built once per shape on a device (tile schedules, BlockMasks).

    A CUDA graph (torch.compile ``mode="reduce-overhead"``, the cudagraphs
    backend) records these tensors' addresses and reads them on every replay,
    long after the call that looked them up; freeing one would let a replay
    read reused memory. A graph records only what a lookup hands out while it
    is recording (every call looks its tensors up again), so such entries are
    pinned for the process: there is no telling when a graph dies. The rest
    are evicted least recently used beyond ``limit``. Pinned entries are
    bounded by the shapes recorded into graphs, each of which holds a whole
    FLUX step's activations in its own memory pool, far more than its
    schedule or mask. Thread-safe (the multi-GPU split's workers share it)."""

    def __init__(self, limit):
        self.limit = limit
        self._entries = collections.OrderedDict()
        self._pinned = set()
        self._lock = threading.RLock()

    def get(self, key, device, build):
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                value = self._entries[key] = build()
                unpinned = [k for k in self._entries if k not in self._pinned]
                for old in unpinned[:max(0, len(unpinned) - self.limit)]:
                    del self._entries[old]
            self._entries.move_to_end(key)
            if key not in self._pinned and _graph_recording(device):
                self._pinned.add(key)
            return value

    def __len__(self):
        return len(self._entries)


def _fast_device(q):
    """Whether "auto" tries the compiled backends (tests widen it to the CPU
    under TRITON_INTERPRET=1)."""
    return q.device.type == "cuda"


def _device_name(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda:{device.index or 0})"
    return str(device)


_NAMES = {"triton": "the Triton kernel", "flex": "FlexAttention", "torch": "the torch path",
          "sdpa": "scaled_dot_product_attention"}
# ("triton", device, launch variant) or ("flex", device, dtype, head_dim, pooled) -> None (trusted) or why not
_TRUST = {}
_CHOICES = {}  # (device, dtype, head_dim, variant) -> (description, backend, reason)
_WARNED = set()
# One first-use check (and so one Triton/Flex compile) at a time in the
# process: the multi-GPU split's workers reach their first call together, and
# concurrent Triton compiles are not safe (triton-lang/triton#5933). A thread
# that waited reuses the verdict the other reached.
_FIRST_USE = threading.RLock()


def _run_backend(name, q, k, v, text_len, grid, window, down_factor, pooled_k, pooled_v, scale, vet=None):
    if name == "triton":
        from .clear_triton import clear_attention_triton
        return clear_attention_triton(q, k, v, text_len=text_len, grid=grid, window=window, pooled_k=pooled_k,
                                      pooled_v=pooled_v, scale=scale, down_factor=down_factor, vet=vet)
    if name == "flex":
        from .flex import clear_attention_flex
        return clear_attention_flex(q, k, v, text_len=text_len, grid=grid, window=window, pooled_k=pooled_k,
                                    pooled_v=pooled_v, scale=scale)
    return clear_attention_torch_autograd(q, k, v, text_len=text_len, grid=grid, window=window, pooled_k=pooled_k,
                                          pooled_v=pooled_v, scale=scale)


def _self_check(name, device, dtype, head_dim, window, down_factor):
    """The first-use self-check of backend ``name``: None if it passes for this
    device, dtype, head_dim, window and down factor, else why not. The one
    entry point of the check; it runs under the device's CUDA context."""
    # run(q, k, v, text_len, grid, window, down_factor, pooled_k, pooled_v, scale) -> output
    run = functools.partial(_run_backend, name)
    return check_backend(run, device=device, dtype=dtype, head_dim=head_dim, window=window, down_factor=down_factor)


class _Untrusted(Exception):
    """A backend failed (or could not run) its first-use check for this call's variant."""


def _vet_triton(device, dtype, head_dim, window, down_factor, keys, variants):
    """``vet`` of the Triton launcher: every kernel variant this call launches
    must have passed a self-check that launched that same variant."""
    from .clear_triton import describe_variant, recorded_variants

    for variant in sorted(variants, key=repr):
        key = ("triton", str(device), variant)
        keys.append(key)
        if key not in _TRUST:
            with _FIRST_USE:
                if key not in _TRUST:
                    with recorded_variants() as seen:
                        why = _self_check("triton", device, dtype, head_dim, window, down_factor)
                    if why is None and variant not in seen:
                        why = f"the self-check did not run this kernel variant ({describe_variant(variant)})"
                    _TRUST[key] = None if why is None else f"first-use check: {why}"
        if _TRUST[key] is not None:
            raise _Untrusted(_TRUST[key])


def _note_choice(q, variant, backend, reason):
    """One INFO line per (device, dtype, head_dim, variant) and backend choice."""
    key = (str(q.device), q.dtype, q.shape[-1], variant)
    if _CHOICES.get(key, (None,))[1:] != (backend, reason):
        desc = f"{_device_name(q.device)}, {str(q.dtype).replace('torch.', '')}, head_dim {q.shape[-1]}, {variant}"
        _CHOICES[key] = (desc, backend, reason)
        log.info("CLEAR attention on %s: running %s (%s)", desc, _NAMES[backend], reason)


def backend_choices():
    """What "auto" chose so far in this process: {"<device>, <dtype>, head_dim
    <n>, <variant>": (backend, reason)}, backend one of "triton", "flex",
    "torch", "sdpa" (dense shortcut)."""
    return {desc: (backend, reason) for desc, backend, reason in _CHOICES.values()}


def _warn_once(key, message, *args):
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


def _versions():
    import importlib.metadata as md
    try:
        triton_version = md.version("triton")
    except md.PackageNotFoundError:
        try:
            triton_version = md.version("triton-windows")
        except md.PackageNotFoundError:
            triton_version = "not installed"
    return f"Triton {triton_version}, torch {torch.__version__}"


def _run_auto(q, k, v, text_len, grid, window, down_factor, pooled_k, pooled_v, scale, differentiable=False):
    """Triton if every kernel variant of this call passed its first-use check
    here, else Flex if that did, else torch. A backend that fails while
    running is distrusted and the next one runs: nothing but out-of-memory
    reaches the sampler. One warning per failure set. ``differentiable``:
    gradients are needed, so Triton (no backward) is not tried."""
    variant = "local + pooled keys" if down_factor > 1 else "local keys"
    if differentiable:
        variant += ", with gradients"
    args = (q, k, v, text_len, grid, window, down_factor, pooled_k, pooled_v, scale)
    if not _fast_device(q):
        _note_choice(q, variant, "torch", f"{q.device.type} device: the compiled backends run on CUDA")
        return _run_backend("torch", *args)
    D = q.shape[-1]
    failures, unsupported = [], []
    out, chosen = None, "torch"
    for name in ("flex",) if differentiable else ("triton", "flex"):
        why = (triton_supported if name == "triton" else flex_supported)(q)
        if why is not None:
            unsupported.append((name, why))
            continue
        keys = []
        try:
            if name == "triton":
                vet = functools.partial(_vet_triton, q.device, q.dtype, D, window, down_factor, keys)
                out = _run_backend("triton", *args, vet=vet)
            else:
                key = ("flex", str(q.device), q.dtype, D, down_factor > 1)
                keys.append(key)
                if key not in _TRUST:
                    with _FIRST_USE:
                        if key not in _TRUST:
                            why = _self_check("flex", q.device, q.dtype, D, window, down_factor)
                            _TRUST[key] = None if why is None else f"first-use check: {why}"
                if _TRUST[key] is not None:
                    raise _Untrusted(_TRUST[key])
                out = _run_backend("flex", *args)
        except _Untrusted as exc:
            failures.append((name, str(exc)))
            continue
        except torch.cuda.OutOfMemoryError:
            raise  # not the backend's fault: ComfyUI handles it
        except Exception as exc:  # compile or launch error mid-sampling: distrust this variant, run the next
            why = f"failed while running: {_reason(exc)}"
            for key in keys:
                _TRUST[key] = why
            failures.append((name, why))
            continue
        chosen = name
        break
    if out is None:
        out = _run_backend("torch", *args)
    if failures:
        _warn_once(("failed", tuple(failures), str(q.device), q.dtype, D),
                   "CLEAR attention: %s failed on %s (%s, %s, head_dim %d, window %d, down_factor %d): %s. "
                   "Running %s instead. Set %s=<triton|flex|torch> to force one.",
                   " and ".join(name for name, _ in failures), _device_name(q.device), _versions(),
                   str(q.dtype).replace("torch.", ""), D, window, down_factor,
                   "; ".join(f"{name}: {why}" for name, why in failures), _NAMES[chosen], BACKEND_ENV)
    order = ("triton", "flex", "torch")
    for name, why in unsupported:
        if order.index(name) < order.index(chosen):  # a faster backend that cannot run here
            _warn_once(("unsupported", name, why, str(q.device)), "CLEAR attention on %s: %s; running %s.",
                       _device_name(q.device), why, _NAMES[chosen])
    if chosen == "triton":
        reason = "passed its first-use self-check"
    else:
        skipped = [f"{name}: {why}" for name, why in unsupported + failures if order.index(name) < order.index(chosen)]
        reason = "; ".join(skipped) + ("; FlexAttention passed its first-use self-check" if chosen == "flex" else "")
    _note_choice(q, variant, chosen, reason)
    return out


def is_dense(grid, window, down_factor):
    """Whether CLEAR's mask is exactly dense attention: no pooled keys and a
    radius past the grid's diagonal ((h-1)^2 + (w-1)^2 < r^2)."""
    h, w = grid
    return down_factor == 1 and (h - 1) ** 2 + (w - 1) ** 2 < window * window


def _output_layout(out):
    """``out`` as a (B, H, L, D) view of (B, L, H, D) memory, the layout the
    op's fake implementation promises (a copy only where a backend returned
    another one; Triton and flash SDPA already do). Eager calls skip this:
    the override's reshape makes the same copy, without an extra buffer."""
    B, H, L, D = out.shape
    want = _empty_strides(B, H, L, D)
    if tuple(out.stride()) == want:
        return out
    res = torch.empty((B, L, H, D), dtype=out.dtype, device=out.device).transpose(1, 2)
    res.copy_(out)
    return res


def _empty_strides(B, H, L, D):
    return (L * H * D, D, H * D, 1)


def _clear_attention_impl(q, k, v, text_len, grid_h, grid_w, window, down_factor, spatial_weight, scale, backend,
                          pooled_k=None, pooled_v=None):
    """The op's implementation: backend choice, self-check, pooling and the
    run. Never traced by torch.compile."""
    grid = (grid_h, grid_w)
    # Gradients: this call is recorded by autograd (eager), or it is the
    # custom op's forward under autograd (AUTO_DIFFERENTIABLE, set by clear_attention).
    train = backend == AUTO_DIFFERENTIABLE or grad_needed(q, k, v, spatial_weight, pooled_k, pooled_v)
    if backend in ("auto", AUTO_DIFFERENTIABLE):
        forced = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if forced not in BACKENDS:
            raise ValueError(f"clear_attention: environment variable {BACKEND_ENV}={forced!r} is not one of {BACKENDS}")
        backend = forced
    if train:
        _refuse_without_backward(backend, q)
    if backend == "triton" or backend == "flex":
        reason = (triton_supported if backend == "triton" else flex_supported)(q)
        if reason is not None:
            raise ValueError(f"clear_attention: backend={backend!r} cannot run here: {reason}. "
                             "Use backend='auto' or 'torch'.")
    if backend == "auto" and is_dense(grid, window, down_factor):
        _note_choice(q, "dense", "sdpa", "the window covers the grid")
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    if down_factor > 1 and pooled_k is None:
        T = text_len
        pooled_k = pool_image_tokens(k[:, :, T:], grid, down_factor, spatial_weight)
        pooled_v = pool_image_tokens(v[:, :, T:], grid, down_factor, spatial_weight)

    args = (q, k, v, text_len, grid, window, down_factor, pooled_k, pooled_v, scale)
    if backend == "auto":
        return _run_auto(*args, differentiable=train)
    return _run_backend(backend, *args)


def _refuse_without_backward(backend, q):
    """One clear error where gradients are needed from a backend without a backward."""
    if backend == "triton":
        raise ValueError(TRITON_REFUSAL)
    if backend == "flex" and q.device.type != "cuda":
        raise ValueError(flex_refusal(q.device))


def _register_op():
    """``torch.ops.comfyui_clear.clear_attention``; a re-import of this module
    (reload) finds it defined and reuses it (its implementation looks this
    module up at call time)."""
    try:
        return torch.ops.comfyui_clear.clear_attention.default
    except AttributeError:
        pass
    if not hasattr(torch.library, "custom_op"):  # torch < 2.4: no compiler-safe op, plain call
        return _clear_attention_impl
    module = __name__

    @torch.library.custom_op("comfyui_clear::clear_attention", mutates_args=())
    def clear_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, grid_h: int,
                           grid_w: int, window: int, down_factor: int, spatial_weight: Optional[torch.Tensor],
                           scale: float, backend: str, pooled_k: Optional[torch.Tensor] = None,
                           pooled_v: Optional[torch.Tensor] = None) -> torch.Tensor:
        impl = sys.modules[module]
        return impl._output_layout(impl._clear_attention_impl(q, k, v, text_len, grid_h, grid_w, window, down_factor,
                                                              spatial_weight, scale, backend, pooled_k, pooled_v))

    @clear_attention_op.register_fake
    def _(q, k, v, text_len, grid_h, grid_w, window, down_factor, spatial_weight, scale, backend, pooled_k=None,
          pooled_v=None):
        B, H, L, D = q.shape
        return q.new_empty((B, L, H, D)).transpose(1, 2)

    @torch.library.custom_op("comfyui_clear::clear_attention_backward", mutates_args=())
    def clear_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    text_len: int, grid_h: int, grid_w: int, window: int, scale: float,
                                    pooled_k: Optional[torch.Tensor] = None, pooled_v: Optional[torch.Tensor] = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv, d pooled_k, d pooled_v); the last two empty without pooled keys."""
        impl = sys.modules[module]
        with impl.device_guard(q.device):
            dq, dk, dv, dpk, dpv = impl.clear_attention_backward(grad_out, q, k, v, pooled_k, pooled_v,
                                                                 text_len=text_len, grid=(grid_h, grid_w),
                                                                 window=window, scale=scale)
        if dpk is None:
            B, H, _, D = q.shape
            dpk, dpv = q.new_zeros(B, H, 0, D), q.new_zeros(B, H, 0, D)
        return dq, dk, dv, dpk, dpv

    @clear_attention_backward_op.register_fake
    def _(grad_out, q, k, v, text_len, grid_h, grid_w, window, scale, pooled_k=None, pooled_v=None):
        B, H, _, D = q.shape
        pooled = [p.new_empty(p.shape) if p is not None else q.new_empty(B, H, 0, D) for p in (pooled_k, pooled_v)]
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *pooled)

    def setup_context(ctx, inputs, output):
        q, k, v, text_len, grid_h, grid_w, window, down_factor, spatial_weight, scale, _, pooled_k, pooled_v = inputs
        ctx.save_for_backward(q, k, v, spatial_weight, pooled_k, pooled_v)
        ctx.args = (text_len, grid_h, grid_w, window, down_factor, scale)

    def backward(ctx, grad_out):
        # The torch path's exact backward, whichever backend ran the forward.
        impl = sys.modules[module]
        q, k, v, spatial_weight, pooled_k, pooled_v = ctx.saved_tensors
        T, grid_h, grid_w, window, d, scale = ctx.args
        grid = (grid_h, grid_w)
        self_pools = d > 1 and pooled_k is None
        if self_pools:
            pooled_k = impl.pool_image_tokens_differentiable(k[:, :, T:], grid, d, spatial_weight)
            pooled_v = impl.pool_image_tokens_differentiable(v[:, :, T:], grid, d, spatial_weight)
        dq, dk, dv, dpk, dpv = torch.ops.comfyui_clear.clear_attention_backward(
            grad_out, q, k, v, T, grid_h, grid_w, window, scale, pooled_k, pooled_v)
        d_weight = None
        if self_pools:  # chain through the pooling to k, v and spatial_weight
            gk, gwk = impl.pool_image_tokens_backward(dpk, k[:, :, T:], grid, d, spatial_weight)
            gv, gwv = impl.pool_image_tokens_backward(dpv, v[:, :, T:], grid, d, spatial_weight)
            dk = torch.cat([dk[:, :, :T], dk[:, :, T:] + gk], 2)
            dv = torch.cat([dv[:, :, :T], dv[:, :, T:] + gv], 2)
            d_weight = None if spatial_weight is None else gwk + gwv
        if pooled_k is None or self_pools:
            dpk = dpv = None
        return dq, dk, dv, None, None, None, None, None, d_weight, None, None, dpk, dpv

    clear_attention_op.register_autograd(backward, setup_context=setup_context)
    return torch.ops.comfyui_clear.clear_attention.default


_OP = _register_op()


def clear_attention(q, k, v, *, text_len, grid, window, down_factor=1, spatial_weight=None, scale=None,
                    backend="auto", pooled_k=None, pooled_v=None):
    """CLEAR attention over a ``[text | image]`` sequence.

    q, k, v: (batch, heads, text_len + h*w, head_dim), text first, image row-major.
    grid: (h, w) image tokens. window: radius r; image query (y, x) sees image
    key (y', x') when (y-y')^2 + (x-x')^2 < r^2, plus every text key and, when
    down_factor d > 1, every pooled key (d x d blocks reduced by
    ``spatial_weight``, default mean; partial edge blocks are edge-padded).
    Text queries see every text and image key. pooled_k, pooled_v (B, H, P,
    D): pooled keys/values computed by the caller (e.g. of the whole image
    when q, k, v hold one band of it, kernels/band.py) instead of from k and
    v; down_factor (> 1) is then the d they were pooled with (it picks the
    kernel configuration) and spatial_weight stays None. scale defaults to
    1/sqrt(head_dim). backend: "auto" (where the mask is dense, SDPA; on
    CUDA: Triton if it passes a first-use self-check, else FlexAttention if
    that does, else torch; the environment variable CLEAR_ATTENTION_BACKEND
    overrides "auto"), "torch", "triton" or "flex" (forced: no self-check).
    Returns a tensor of q's shape and dtype; from Triton (and, under
    torch.compile, from every backend) a (B, H, L, D) view of (B, L, H, D)
    memory, so ``out.transpose(1, 2)`` is contiguous.
    Safe under torch.compile (one opaque custom op).
    Differentiable (to q, k, v, pooled_k/pooled_v and spatial_weight) on the
    torch path and on Flex on CUDA; backend="triton" refuses when gradients
    are needed, "auto" then picks Flex or torch (docs/attention.md, "Gradients").
    """
    _check_inputs(q, k, v, text_len, grid, window, down_factor, spatial_weight, scale, backend, pooled_k, pooled_v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if grad_needed(q, k, v, spatial_weight, pooled_k, pooled_v):
        # Training: a backend with a backward (Triton has none), and the
        # pooling differentiable here, so gradients reach spatial_weight.
        _refuse_without_backward(backend, q)
        if down_factor > 1 and pooled_k is None:
            pooled_k, pooled_v = (pool_image_tokens_differentiable(x[:, :, text_len:], tuple(grid), down_factor,
                                                                   spatial_weight) for x in (k, v))
            spatial_weight = None
        if backend == "auto":
            backend = AUTO_DIFFERENTIABLE
    # Traced code gets the opaque op; eager calls run its implementation
    # directly (same result, no dispatcher round trip, and dispatch modes,
    # such as the memory tests' LiveBytes, see every tensor it makes).
    run = _OP if _is_compiling() else _clear_attention_impl
    return run(q, k, v, text_len, grid[0], grid[1], window, down_factor, spatial_weight, float(scale), backend,
               pooled_k, pooled_v)


def _is_compiling():
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False
