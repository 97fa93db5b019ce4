"""Fused Triton forward kernel for CLEAR attention (image query rows).

Tiling: one program per (BLOCK_Y x BLOCK_X tile of image queries, batch*head).
The tile's queries run one online softmax (fp32 statistics, exp2 with the
scale folded into ``qk_scale``) over three key groups:

1. text keys ``[0, T)`` in chunks of BLOCK_N;
2. local image keys as per-row contiguous segments: for each key row ``ky``
   that some disc of the tile reaches, the columns any query of the tile can
   see are ``[x0 - dxm, x_last + dxm]`` with ``dxm`` the largest ``dx`` such
   that ``dy_min^2 + dx^2 < r^2`` (``dy_min`` = distance from ``ky`` to the
   tile's rows). Those keys are contiguous in memory, so every chunk is a
   coalesced load; the exact disc mask is applied per element;
3. pooled keys ``[0, P)`` (precomputed by ``pool_image_tokens``) when d > 1.

Text query rows (dense rows over text + image keys) go through
``scaled_dot_product_attention`` (flash attention on the GPU).

Left for GPU tuning (no GPU was available when this was written): tile shapes
and warps per head_dim and r, skipping the mask on segments fully inside
every disc of the tile, software pipelining (``num_stages``), and grouping
heads for L2 reuse of key rows.
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def kernel_config(head_dim, window):
    """Tile shape and launch parameters; one place to tune per GPU."""
    block_y, block_x = (4, 16) if head_dim >= 256 else (8, 16)
    block_n = 64 if window >= 12 else 32
    num_warps = 4 if head_dim <= 64 else 8
    return dict(BLOCK_Y=block_y, BLOCK_X=block_x, BLOCK_N=block_n, num_warps=num_warps, num_stages=2)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's CPU interpreter computes bf16 x bf16 dots wrongly (3.8); there
    # the (exact) products are formed in float32 instead, as the GPU does.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


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
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Fold keys [0, n_keys) of one (batch, head) into the online softmax: the
    text keys and the pooled keys, which every image query sees."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(0, n_keys, BLOCK_N):
        kn = n0 + offs_n
        k_ok = kn < n_keys
        k = tl.load(k_base + kn[None, :].to(tl.int64) * skl + offs_d[:, None] * skd, mask=k_ok[None, :], other=0.0)
        v = tl.load(v_base + kn[:, None].to(tl.int64) * svl + offs_d[None, :] * svd, mask=k_ok[:, None], other=0.0)
        s = _dot(q, k, PRECISION, UPCAST) * qk_scale
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)
    return m_i, l_i, acc


@triton.jit
def _clear_image_rows_kernel(
    Q, K, V, KP, VP, Out,
    sqb, sqh, sql, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    spb, sph, spl, spd,
    sob, soh, sol, sod,
    H, T, h, w, R, P, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_POOL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Y * BLOCK_X
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    hd = (pid_bh % H).to(tl.int64)
    tiles_x = tl.cdiv(w, BLOCK_X)
    y0 = (pid_tile // tiles_x) * BLOCK_Y
    x0 = (pid_tile % tiles_x) * BLOCK_X
    y_last = tl.minimum(y0 + BLOCK_Y - 1, h - 1)
    x_last = tl.minimum(x0 + BLOCK_X - 1, w - 1)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    qy = y0 + offs_m // BLOCK_X
    qx = x0 + offs_m % BLOCK_X
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
                                     BLOCK_N, HEAD_DIM, PRECISION, UPCAST)

    # 2. local image keys, one contiguous key-row segment at a time
    r2 = R * R
    ky_lo = tl.maximum(y0 - R + 1, 0)
    ky_hi = tl.minimum(y_last + R - 1, h - 1)
    for ky in range(ky_lo, ky_hi + 1):
        dy_min = tl.maximum(tl.maximum(y0 - ky, ky - y_last), 0)
        room = r2 - 1 - dy_min * dy_min  # >= 0: ky is within R - 1 rows of the tile
        dxm = tl.sqrt(room.to(tl.float32)).to(tl.int32)
        dxm = tl.where((dxm + 1) * (dxm + 1) <= room, dxm + 1, dxm)  # exact integer sqrt
        dxm = tl.where(dxm * dxm > room, dxm - 1, dxm)
        kx_lo = tl.maximum(x0 - dxm, 0)
        kx_hi = tl.minimum(x_last + dxm, w - 1)
        dy = qy - ky
        for kx0 in range(kx_lo, kx_hi + 1, BLOCK_N):
            kx = kx0 + offs_n
            k_ok = kx <= kx_hi
            k_rows = (T + ky * w + kx).to(tl.int64)
            k = tl.load(k_base + k_rows[None, :] * skl + offs_d[:, None] * skd, mask=k_ok[None, :], other=0.0)
            v = tl.load(v_base + k_rows[:, None] * svl + offs_d[None, :] * svd, mask=k_ok[:, None], other=0.0)
            s = _dot(q, k, PRECISION, UPCAST) * qk_scale
            dx = qx[:, None] - kx[None, :]
            seen = ((dy * dy)[:, None] + dx * dx < r2) & k_ok[None, :]
            s = tl.where(seen, s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION, UPCAST)

    # 3. pooled keys
    if HAS_POOL:
        m_i, l_i, acc = _attend_all_keys(q, KP + b * spb + hd * sph, VP + b * spb + hd * sph, spl, spd, spl, spd, P,
                                         qk_scale, m_i, l_i, acc, BLOCK_N, HEAD_DIM, PRECISION, UPCAST)

    # Rows past the grid edge (never stored) saw no key: avoid 0/0.
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


def clear_attention_triton(q, k, v, *, text_len, grid, window, pooled_k=None, pooled_v=None, scale):
    """CLEAR attention on validated inputs; see ``comfyui_clear.kernels.clear_attention``."""
    B, H, L, D = q.shape
    T = text_len
    h, w = grid
    out = torch.empty_like(q)
    if T > 0:
        out[:, :, :T] = _text_rows(q, k, v, T, scale).to(q.dtype)

    has_pool = pooled_k is not None
    if has_pool:
        # The kernel's dots take one dtype: round the (float32) pooled tokens
        # like any other key/value of this call.
        kp = pooled_k.to(q.dtype).contiguous()
        vp = pooled_v.to(q.dtype).contiguous()  # same strides as kp (the kernel uses kp's)
        P = kp.shape[2]
    else:
        kp = vp = q  # unused (HAS_POOL=False); any tensor with strides
        P = 0

    cfg = kernel_config(D, window)
    tiles = triton.cdiv(h, cfg["BLOCK_Y"]) * triton.cdiv(w, cfg["BLOCK_X"])
    _clear_image_rows_kernel[(tiles, B * H)](
        q, k, v, kp, vp, out,
        *q.stride(), *k.stride(), *v.stride(), *kp.stride(), *out.stride(),
        H, T, h, w, window, P, scale * LOG2E,
        HEAD_DIM=D, BLOCK_Y=cfg["BLOCK_Y"], BLOCK_X=cfg["BLOCK_X"], BLOCK_N=cfg["BLOCK_N"],
        HAS_POOL=has_pool, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
