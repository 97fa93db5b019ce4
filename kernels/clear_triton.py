"""Fused Triton forward kernel for CLEAR attention (image query rows).

One program per (TILE_Y x TILE_X tile of image queries, batch*head); the
tile's queries run one online softmax (fp32 statistics, exp2 with the scale
folded into ``qk_scale``) over:

1. text keys ``[0, T)``, a plain flash loop in BLOCK_T chunks;
2. local image keys in KEY_Y x KEY_X blocks aligned to the tile lattice, read
   from the tile's range of the per-radius block-offset table
   (``tiling.tile_schedule``): one flat loop, so Triton pipelines the loads
   of the next blocks under the current block's MMAs; every block gets the
   exact disc mask (and the grid edge);
3. pooled keys ``[0, P)`` (``pool_image_tokens``) when d > 1, as 1.

Text query rows (dense rows over text + image keys) go through
``scaled_dot_product_attention`` (flash attention on the GPU).

Configurations (tile and block shapes, warps, stages per head_dim, r, d and
GPU arch) live in ``tiling.kernel_config``. This kernel has run only under
Triton's CPU interpreter and been compiled ahead of time for NVIDIA
sm_80..sm_120 and AMD gfx90a, gfx942, gfx950, gfx1100 and gfx1201
(tests/test_kernel_compile.py); it has not yet run on a GPU.
"""

import contextlib
import os
import threading

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import DeviceCache
from .tiling import kernel_config, tile_schedule

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # "ieee", the one input precision every backend accepts (Triton 3.8's AMD
    # backend allows "tf32" on gfx942 only and refuses to compile it on
    # gfx90a, gfx950 and RDNA). For fp16/bf16 operands it changes nothing: the
    # products are exact and accumulate in fp32 on the tensor cores (MMA on
    # NVIDIA, MFMA/WMMA on AMD); float32 operands (the interpreter's float32
    # tests) get full fp32 products, not tf32's 10-bit mantissa.
    # Triton's CPU interpreter computes bf16 x bf16 dots wrongly (3.8); there
    # the (exact) products are formed in float32 instead, as the GPU does.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _scores(q, k, qk_scale, UPCAST: tl.constexpr):
    """Q K^T of one key block in log2 units; every (query, key) product the
    kernel issues passes here (tests count them against tiling.issued_pairs)."""
    return _dot(q, k, UPCAST) * qk_scale


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr):
    """Fold one chunk of scores (already in log2 units, -inf where masked) in."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row may have seen only masked keys so far: keep exp2 away from inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _attend_all_keys(q, k_base, v_base, skl, skd, svl, svd, n_keys, qk_scale, m_i, l_i, acc,
                     BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Fold keys [0, n_keys) of one (batch, head) into the online softmax: the
    text keys and the pooled keys, which every image query sees."""
    offs_n = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(0, n_keys, BLOCK_T):
        kn = n0 + offs_n
        k_ok = kn < n_keys
        k = tl.load(k_base + kn[None, :].to(tl.int64) * skl + offs_d[:, None] * skd, mask=k_ok[None, :], other=0.0)
        v = tl.load(v_base + kn[:, None].to(tl.int64) * svl + offs_d[None, :] * svd, mask=k_ok[:, None], other=0.0)
        s = _scores(q, k, qk_scale, UPCAST)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, UPCAST)
    return m_i, l_i, acc


# Shape ints are not specialised (the launcher would otherwise compile a new
# variant when one is 1 or a multiple of 16: a stall whenever the image size
# changes); strides stay specialised, they decide vectorised loads. There is
# no batch stride: one launch per batch element, from that element's base
# pointer, so no stride argument reaches 2**31 for FLUX shapes (the single
# block's v, a slice of linear1's output, has a batch stride of ~5.6e9 at 8K)
# and the kernel has one 32-bit-stride variant (``launch_variant``).
DO_NOT_SPECIALIZE = ("H", "T", "h", "w", "R", "P")


@triton.jit(do_not_specialize=list(DO_NOT_SPECIALIZE))
def _clear_image_rows_kernel(
    Q, K, V, KP, VP, Out, Offsets, Ranges,
    sqh, sql, sqd,
    skh, skl, skd,
    svh, svl, svd,
    sph, spl, spd,
    soh, sol, sod,
    H, T, h, w, R, P, qk_scale,
    HEAD_DIM: tl.constexpr, TILE_Y: tl.constexpr, TILE_X: tl.constexpr, KEY_Y: tl.constexpr,
    KEY_X: tl.constexpr, BLOCK_T: tl.constexpr, HAS_POOL: tl.constexpr, UPCAST: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TILE_Y * TILE_X
    BLOCK_N: tl.constexpr = KEY_Y * KEY_X
    pid_tile = tl.program_id(0)
    hd = tl.program_id(1).to(tl.int64)
    tiles_x = tl.cdiv(w, TILE_X)
    tile_y = pid_tile // tiles_x
    tile_x = pid_tile % tiles_x

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qy = tile_y * TILE_Y + offs_m // TILE_X
    qx = tile_x * TILE_X + offs_m % TILE_X
    q_valid = (qy < h) & (qx < w)
    q_rows = (T + qy * w + qx).to(tl.int64)

    q = tl.load(Q + hd * sqh + q_rows[:, None] * sql + offs_d[None, :] * sqd,
                mask=q_valid[:, None], other=0.0)
    k_base = K + hd * skh
    v_base = V + hd * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # 1. text keys
    m_i, l_i, acc = _attend_all_keys(q, k_base, v_base, skl, skd, svl, svd, T, qk_scale, m_i, l_i, acc,
                                     BLOCK_T, HEAD_DIM, UPCAST)

    # 2. local image keys: this tile's key blocks, one flat (pipelined) loop
    r2 = R * R
    first = tl.load(Ranges + 2 * pid_tile)
    last = tl.load(Ranges + 2 * pid_tile + 1)
    ky_in = offs_n // KEY_X
    kx_in = offs_n % KEY_X
    for i in range(first, last):
        ky = (tile_y * (TILE_Y // KEY_Y) + tl.load(Offsets + 2 * i)) * KEY_Y + ky_in
        kx = (tile_x * (TILE_X // KEY_X) + tl.load(Offsets + 2 * i + 1)) * KEY_X + kx_in
        k_ok = (ky < h) & (kx.to(tl.uint32) < w.to(tl.uint32))  # kx < 0 wraps past w; ky >= 0 always
        k_rows = (T + ky * w + kx).to(tl.int64)
        k = tl.load(k_base + k_rows[None, :] * skl + offs_d[:, None] * skd, mask=k_ok[None, :], other=0.0)
        v = tl.load(v_base + k_rows[:, None] * svl + offs_d[None, :] * svd, mask=k_ok[:, None], other=0.0)
        s = _scores(q, k, qk_scale, UPCAST)
        dy = qy[:, None] - ky[None, :]
        dx = qx[:, None] - kx[None, :]
        seen = (dy * dy + dx * dx < r2) & k_ok[None, :]
        s = tl.where(seen, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, UPCAST)

    # 3. pooled keys
    if HAS_POOL:
        m_i, l_i, acc = _attend_all_keys(q, KP + hd * sph, VP + hd * sph, spl, spd, spl, spd, P,
                                         qk_scale, m_i, l_i, acc, BLOCK_T, HEAD_DIM, UPCAST)

    # Rows past the grid edge (never stored) may have seen no key: avoid 0/0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + hd * soh + q_rows[:, None] * sol + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=q_valid[:, None])


def _text_rows(q, k, v, text_len, scale):
    """Text queries: dense rows over every text and image key."""
    qt = q[:, :, :text_len]
    if q.device.type != "cuda":  # Triton's CPU interpreter (tests): small shapes
        s = (qt.float() @ k.float().transpose(-1, -2)) * scale
        return torch.softmax(s, dim=-1) @ v.float()
    # Flash / memory-efficient attention: never materialises the T x L scores.
    return F.scaled_dot_product_attention(qt, k, v, scale=scale)


# A long session of many sizes keeps 64; a schedule a CUDA graph recorded is never freed.
_SCHEDULES = DeviceCache(64)


def _device_schedule(grid, window, cfg, device):
    """The tile schedule as int32 tensors on ``device``, built once per shape
    (torch allocations: 16-byte aligned, like every pointer the kernel gets)."""
    key = (tuple(grid), window, cfg["TILE_Y"], cfg["TILE_X"], cfg["KEY_Y"], cfg["KEY_X"], str(device))

    def build():
        offsets, ranges = tile_schedule(grid, window, cfg)
        return tuple(torch.from_numpy(a).to(device=device, copy=True) for a in (offsets, ranges))

    return _SCHEDULES.get(key, device, build)


def device_arch(device):
    """What the kernel configuration depends on: the compute capability as an
    int on CUDA (90 for sm_90), the gfx architecture on ROCm ("gfx942" for an
    MI300: ROCm reports capability 9.x for it, which is not a Hopper), None
    off the GPU (interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if getattr(torch.version, "hip", None):
        name = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "") or "gfx"
        return name.split(":")[0]  # "gfx942:sramecc+:xnack-" -> "gfx942"
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


_I32 = 2 ** 31


def _strides(t):
    """Strides of a per-batch (H, L, D) view as kernel arguments; a dimension of
    size 1 is never stepped over, so its stride is passed as 0 (whatever torch
    reports there: one variant, not one per accident of how the view was made)."""
    return [s if n > 1 else 0 for s, n in zip(t.stride(), t.shape)]


def is_canonical(x):
    """Whether every per-batch view of ``x`` (B, H, L, D) launches the kernel's
    one variant: base pointer 16-byte aligned, last stride 1, head and row
    strides multiples of 16 below 2**31."""
    B, H, L, D = x.shape
    sb, sh, sl, sd = x.stride()
    if D > 1 and sd != 1:
        return False
    if any(n > 1 and (s % 16 or s >= _I32) for s, n in ((sh, H), (sl, L))):
        return False
    base, size = x.data_ptr(), x.element_size()
    return all((base + b * sb * size) % 16 == 0 for b in range(B))


def canonical(x):
    """``x``, or a contiguous copy of it where its layout would compile another
    kernel variant (FLUX's q, k and v, including the single block's strided v,
    never need one)."""
    if is_canonical(x):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def prepare(q, k, v, pooled_k=None, pooled_v=None):
    """(q, k, v, kp, vp) as the kernel takes them: ``canonical`` layouts, the
    pooled tokens (or None) in q's dtype with one set of strides."""
    q, k, v = canonical(q), canonical(k), canonical(v)
    kp = vp = None
    if pooled_k is not None:
        # The kernel's dots take one dtype: round the (float32) pooled tokens
        # like any other key/value of this call. kp and vp share strides (the
        # kernel uses kp's).
        kp = canonical(pooled_k.to(q.dtype).contiguous())
        vp = canonical(pooled_v.to(q.dtype).contiguous())
        if kp.stride() != vp.stride():
            kp, vp = kp.clone(memory_format=torch.contiguous_format), vp.clone(memory_format=torch.contiguous_format)
    return q, k, v, kp, vp


def _empty_output(B, L, H, D, dtype, device):
    """(B, H, L, D) view of (B, L, H, D) memory: the override's
    ``out.transpose(1, 2).reshape(B, L, H * D)`` is then a view, not a copy."""
    return torch.empty((B, L, H, D), dtype=dtype, device=device).transpose(1, 2)


def _beyond_2gib():
    return _I32


def _full_range(t):
    """A view of ``t`` that Triton's AMD launcher compiles without buffer
    loads whatever the size of its allocation. By default it compiles a
    pointer into an allocation below 2 GiB with them ("S", 32-bit offsets)
    and any other without: two binaries, and the small first-use self-check
    would never launch the one of a large call (FLUX's single-block v lives
    in linear1's output, > 2 GiB from about 3.5K px). Triton asks
    ``ptr_range()`` before the allocation's size; NVIDIA's launcher ignores
    it. A new view, so cached and callers' tensors stay untouched."""
    t = t.view(t.shape)
    t.ptr_range = _beyond_2gib
    return t


def image_rows_launches(q, k, v, out, kp, vp, offsets, ranges, *, text_len, grid, window, scale, cfg):
    """[(kernel, launch grid, args, kwargs)], one launch per batch element
    from that element's base pointer: the one description both
    ``clear_attention_triton`` and the ahead-of-time compile test
    (tests/test_kernel_compile.py) use. Inputs as ``canonical`` leaves them."""
    B, H, _, D = q.shape
    h, w = grid
    has_pool = kp is not None
    P = kp.shape[2] if has_pool else 0
    tiles = triton.cdiv(h, cfg["TILE_Y"]) * triton.cdiv(w, cfg["TILE_X"])
    kwargs = dict(HEAD_DIM=D, TILE_Y=cfg["TILE_Y"], TILE_X=cfg["TILE_X"], KEY_Y=cfg["KEY_Y"], KEY_X=cfg["KEY_X"],
                  BLOCK_T=cfg["BLOCK_T"], HAS_POOL=has_pool,
                  UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        kwargs["maxnreg"] = cfg["maxnreg"]
    launches = []
    offsets, ranges = _full_range(offsets), _full_range(ranges)
    for b in range(B):
        qb, kb, vb, ob = (_full_range(t[b]) for t in (q, k, v, out))
        kpb, vpb = (_full_range(kp[b]), _full_range(vp[b])) if has_pool else (qb, qb)  # unused (HAS_POOL=False)
        args = (qb, kb, vb, kpb, vpb, ob, offsets, ranges,
                *_strides(qb), *_strides(kb), *_strides(vb), *_strides(kpb), *_strides(ob),
                H, text_len, h, w, window, P, scale * LOG2E)
        launches.append((_clear_image_rows_kernel, (tiles, H), args, kwargs))
    return launches


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int64: "i64", torch.float64: "fp64"}


def _buffer_ops():
    # Triton's AMD knob (on by default): pointers into allocations below 2 GiB
    # compile to buffer loads/stores with 32-bit offsets (see ``_full_range``).
    return os.environ.get("AMDGCN_USE_BUFFER_OPS", "1").lower() in ("1", "true", "on", "yes")


def _specialize_py(value, specialize, hip=False):
    """Triton's launcher specialisation of one argument (type, attribute), for
    a Triton without ``native_specialize_impl``; tests hold it against it.
    ``hip``: as the AMD backend's launcher does, which also marks ("S") a
    pointer whose ``ptr_range()``, else whole allocation, is below 2 GiB."""
    if isinstance(value, torch.Tensor):
        attr = "D" if value.data_ptr() % 16 == 0 else ""
        if hip and _buffer_ops():
            size = value.ptr_range() if hasattr(value, "ptr_range") else value.untyped_storage().nbytes()
            attr += "S" if size < _I32 else ""
        return "*" + _TRITON_TYPES[value.dtype], attr
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        kind = "i32" if -_I32 <= value < _I32 else ("u64" if value >= 2 ** 63 else "i64")
        if not specialize:
            return kind, None
        if value == 1:
            return "constexpr", 1
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no specialisation rule for {type(value).__name__}")


def _native_specialize():
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        return None
    try:
        from triton.backends.amd.compiler import HIPBackend
    except ImportError:  # a Triton without the AMD backend launches nothing on ROCm
        HIPBackend = BaseBackend

    def specialize(value, specialize, hip=False):
        return tuple(native_specialize_impl(HIPBackend if hip else BaseBackend, value, False, specialize, True))
    return specialize


_specialize = _native_specialize() or _specialize_py


_PARAMS = {}


def _param_names():
    fn = _clear_image_rows_kernel.fn
    if fn not in _PARAMS:
        import inspect
        _PARAMS[fn] = list(inspect.signature(fn).parameters)
    return _PARAMS[fn]


def launch_variant(args, kwargs, arch):
    """Everything that makes Triton compile a separate binary for one launch,
    as its launcher specialises the arguments (type: i32/i64, pointer dtype;
    attribute: equal to 1, divisible by 16, pointer 16-byte aligned), the
    constexprs and compile options, and the GPU arch. Two launches with one
    variant run the same machine code. On ROCm (``arch`` a gfx name) as the
    AMD launcher specialises (``_full_range``)."""
    hip = isinstance(arch, str)
    spec = tuple((name, *_specialize(value, name not in DO_NOT_SPECIALIZE, hip))
                 for name, value in zip(_param_names(), args))
    return arch, spec, tuple(sorted(kwargs.items()))


def describe_variant(variant):
    """A short human description of a ``launch_variant``."""
    arch, spec, options = variant
    o = dict(options)
    types = {name: kind for name, kind, _ in spec}
    ints = [(kind, attr) for name, kind, attr in spec if name.startswith("s")]
    strides = ("32-bit" if all(kind in ("i32", "constexpr") for kind, _ in ints) else "64-bit") + " strides"
    return (f"{types['Q'][1:]} head_dim {o['HEAD_DIM']}, {'with' if o['HAS_POOL'] else 'no'} pooled keys, "
            f"{o['TILE_Y']}x{o['TILE_X']} tiles, {o['KEY_Y']}x{o['KEY_X']} key blocks, {o['num_warps']} warps, "
            f"{o['num_stages']} stages, {strides}, arch {arch}")


_RECORDING = threading.local()  # per thread: the split's workers launch at the same time


def _recorders():
    if not hasattr(_RECORDING, "sets"):
        _RECORDING.sets = []
    return _RECORDING.sets


class recorded_variants:
    """Context manager: the set of ``launch_variant`` s launched inside it by
    this thread (the dispatcher trusts a variant only if its self-check
    launched it; another thread's launches must not count)."""

    def __enter__(self):
        self.seen = set()
        _recorders().append(self.seen)
        return self.seen

    def __exit__(self, *exc):
        sets = _recorders()  # by identity: list.remove would drop the first *equal* set of a nested record
        del sets[next(i for i, seen in enumerate(sets) if seen is self.seen)]


_LAUNCHED = set()  # (device, variant) launched once: Triton holds its binary


def clear_attention_triton(q, k, v, *, text_len, grid, window, pooled_k=None, pooled_v=None, scale, cfg=None,
                           down_factor=None, vet=None):
    """CLEAR attention on validated inputs; see ``comfyui_clear.kernels.clear_attention``.
    ``cfg`` overrides ``kernel_config`` (tests use small tiles). ``vet``, if
    given, gets the set of ``launch_variant`` s before anything runs and may
    raise to stop the call (the dispatcher's trust check). Returns a
    (B, H, L, D) view of (B, L, H, D) memory. Runs under the tensors' CUDA
    device (Triton launches on the current device)."""
    from . import _FIRST_USE, device_guard

    B, H, L, D = q.shape
    T = text_len
    with device_guard(q.device):
        q, k, v, kp, vp = prepare(q, k, v, pooled_k, pooled_v)
        arch = device_arch(q.device)
        if cfg is None:
            d = down_factor if down_factor is not None else (1 if kp is None else 2)
            cfg = kernel_config(D, window, d, arch)
        offsets, ranges = _device_schedule(grid, window, cfg, q.device)

        def launches_into(out):
            return image_rows_launches(q, k, v, out, kp, vp, offsets, ranges, text_len=T, grid=grid, window=window,
                                       scale=scale, cfg=cfg)

        # Variants from a meta output (allocations are aligned, as a real one
        # is): a distrusted call allocates nothing before it falls back.
        variants = {launch_variant(args, kwargs, arch)
                    for _, _, args, kwargs in launches_into(_empty_output(B, L, H, D, q.dtype, "meta"))}
        if vet is not None:
            vet(variants)
        for seen in _recorders():
            seen.update(variants)
        out = _empty_output(B, L, H, D, q.dtype, q.device)
        launches = launches_into(out)
        assert {launch_variant(args, kwargs, arch) for _, _, args, kwargs in launches} == variants
        if T > 0:
            out[:, :, :T] = _text_rows(q, k, v, T, scale).to(q.dtype)
        compiled = {(str(q.device), variant) for variant in variants}
        # A variant's first launch on a device compiles it: one thread at a time (triton-lang/triton#5933).
        # Triton's CPU interpreter patches triton.language while a kernel runs: one launch at a time there.
        serial = q.device.type == "cpu" or not compiled <= _LAUNCHED
        with _FIRST_USE if serial else contextlib.nullcontext():
            for kernel, launch_grid, args, kwargs in launches:
                kernel[launch_grid](*args, **kwargs)
            _LAUNCHED.update(compiled)
    return out
