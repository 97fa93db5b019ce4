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
Triton's CPU interpreter and been compiled ahead of time for sm_80..sm_120
(tests/test_kernel_compile.py); it has not yet run on a GPU.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .tiling import kernel_config, tile_schedule

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's CPU interpreter computes bf16 x bf16 dots wrongly (3.8); there
    # the (exact) products are formed in float32 instead, as the GPU does.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(q, k, qk_scale, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Q K^T of one key block in log2 units; every (query, key) product the
    kernel issues passes here (tests count them against tiling.issued_pairs)."""
    return _dot(q, k, PRECISION, UPCAST) * qk_scale


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one chunk of scores (already in log2 units, -inf where masked) in."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row may have seen only masked keys so far: keep exp2 away from inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _attend_all_keys(q, k_base, v_base, skl, skd, svl, svd, n_keys, qk_scale, m_i, l_i, acc,
                     BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold keys [0, n_keys) of one (batch, head) into the online softmax: the
    text keys and the pooled keys, which every image query sees."""
    offs_n = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(0, n_keys, BLOCK_T):
        kn = n0 + offs_n
        k_ok = kn < n_keys
        k = tl.load(k_base + kn[None, :].to(tl.int64) * skl + offs_d[:, None] * skd, mask=k_ok[None, :], other=0.0)
        v = tl.load(v_base + kn[:, None].to(tl.int64) * svl + offs_d[None, :] * svd, mask=k_ok[:, None], other=0.0)
        s = _scores(q, k, qk_scale, PRECISION, UPCAST)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)
    return m_i, l_i, acc


# Shape ints are not specialised (the launcher would otherwise compile a new
# variant when one is 1 or a multiple of 16: a stall whenever the image size
# changes); strides stay specialised, they decide vectorised loads.
@triton.jit(do_not_specialize=["H", "T", "h", "w", "R", "P"])
def _clear_image_rows_kernel(
    Q, K, V, KP, VP, Out, Offsets, Ranges,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    spb, sph, spl, spd,
    sob, soh, sol, sod,
    H, T, h, w, R, P, qk_scale,
    HEAD_DIM: tl.constexpr, TILE_Y: tl.constexpr, TILE_X: tl.constexpr, KEY_Y: tl.constexpr,
    KEY_X: tl.constexpr, BLOCK_T: tl.constexpr, HAS_POOL: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TILE_Y * TILE_X
    BLOCK_N: tl.constexpr = KEY_Y * KEY_X
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    hd = (pid_bh % H).to(tl.int64)
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

    q = tl.load(Q + b * sqb + hd * sqh + q_rows[:, None] * sql + offs_d[None, :] * sqd,
                mask=q_valid[:, None], other=0.0)
    k_base = K + b * skb + hd * skh
    v_base = V + b * svb + hd * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # 1. text keys
    m_i, l_i, acc = _attend_all_keys(q, k_base, v_base, skl, skd, svl, svd, T, qk_scale, m_i, l_i, acc,
                                     BLOCK_T, HEAD_DIM, PRECISION, UPCAST)

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
        s = _scores(q, k, qk_scale, PRECISION, UPCAST)
        dy = qy[:, None] - ky[None, :]
        dx = qx[:, None] - kx[None, :]
        seen = (dy * dy + dx * dx < r2) & k_ok[None, :]
        s = tl.where(seen, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)

    # 3. pooled keys
    if HAS_POOL:
        m_i, l_i, acc = _attend_all_keys(q, KP + b * spb + hd * sph, VP + b * spb + hd * sph, spl, spd, spl, spd, P,
                                         qk_scale, m_i, l_i, acc, BLOCK_T, HEAD_DIM, PRECISION, UPCAST)

    # Rows past the grid edge (never stored) may have seen no key: avoid 0/0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + b * sob + hd * soh + q_rows[:, None] * sol + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=q_valid[:, None])


def _text_rows(q, k, v, text_len, scale):
    """Text queries: dense rows over every text and image key."""
    qt = q[:, :, :text_len]
    if q.device.type != "cuda":  # Triton's CPU interpreter (tests): small shapes
        s = (qt.float() @ k.float().transpose(-1, -2)) * scale
        return torch.softmax(s, dim=-1) @ v.float()
    # Flash / memory-efficient attention: never materialises the T x L scores.
    return F.scaled_dot_product_attention(qt, k, v, scale=scale)


_SCHEDULES = {}


def _device_schedule(grid, window, cfg, device):
    """The tile schedule as int32 tensors on ``device``, built once per shape."""
    key = (grid, window, cfg["TILE_Y"], cfg["TILE_X"], cfg["KEY_Y"], cfg["KEY_X"], str(device))
    if key not in _SCHEDULES:
        if len(_SCHEDULES) >= 64:  # a long session of many sizes: keep the cache small
            _SCHEDULES.clear()
        offsets, ranges = tile_schedule(grid, window, cfg)
        _SCHEDULES[key] = (torch.from_numpy(offsets).to(device), torch.from_numpy(ranges).to(device))
    return _SCHEDULES[key]


def device_arch(device):
    """Compute capability as an int (90 for sm_90), None off CUDA (interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def image_rows_launch(q, k, v, out, kp, vp, offsets, ranges, *, text_len, grid, window, scale, cfg):
    """(kernel, launch grid, args, kwargs) of the image-rows launch: the one
    description both ``clear_attention_triton`` and the ahead-of-time compile
    test (tests/test_kernel_compile.py) use."""
    B, H, _, D = q.shape
    h, w = grid
    has_pool = kp is not None
    if not has_pool:
        kp = vp = q  # unused (HAS_POOL=False); any tensor with strides
    P = kp.shape[2] if has_pool else 0
    tiles = triton.cdiv(h, cfg["TILE_Y"]) * triton.cdiv(w, cfg["TILE_X"])
    args = (q, k, v, kp, vp, out, offsets, ranges,
            *q.stride(), *k.stride(), *v.stride(), *kp.stride(), *out.stride(),
            H, text_len, h, w, window, P, scale * LOG2E)
    kwargs = dict(HEAD_DIM=D, TILE_Y=cfg["TILE_Y"], TILE_X=cfg["TILE_X"], KEY_Y=cfg["KEY_Y"], KEY_X=cfg["KEY_X"],
                  BLOCK_T=cfg["BLOCK_T"], HAS_POOL=has_pool,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        kwargs["maxnreg"] = cfg["maxnreg"]
    return _clear_image_rows_kernel, (tiles, B * H), args, kwargs


def clear_attention_triton(q, k, v, *, text_len, grid, window, pooled_k=None, pooled_v=None, scale, cfg=None,
                           down_factor=None):
    """CLEAR attention on validated inputs; see ``comfyui_clear.kernels.clear_attention``.
    ``cfg`` overrides ``kernel_config`` (tests use small tiles)."""
    D = q.shape[-1]
    T = text_len
    out = torch.empty_like(q)
    if T > 0:
        out[:, :, :T] = _text_rows(q, k, v, T, scale).to(q.dtype)

    kp = vp = None
    if pooled_k is not None:
        # The kernel's dots take one dtype: round the (float32) pooled tokens
        # like any other key/value of this call.
        kp = pooled_k.to(q.dtype).contiguous()
        vp = pooled_v.to(q.dtype).contiguous()  # same strides as kp (the kernel uses kp's)

    if cfg is None:
        d = down_factor if down_factor is not None else (1 if kp is None else 2)
        cfg = kernel_config(D, window, d, device_arch(q.device))
    offsets, ranges = _device_schedule(grid, window, cfg, q.device)
    kernel, launch_grid, args, kwargs = image_rows_launch(q, k, v, out, kp, vp, offsets, ranges, text_len=T,
                                                          grid=grid, window=window, scale=scale, cfg=cfg)
    kernel[launch_grid](*args, **kwargs)
    return out
