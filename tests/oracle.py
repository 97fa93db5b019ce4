"""Dense float64 oracle for CLEAR attention, written independently of the
package: build the full (L + pooled) key set and the boolean mask, then one
masked softmax. Only for small shapes."""

import math

import torch


def pooled_tokens(x_img, h, w, d, weight):
    """Weighted d x d block sums; partial edge blocks repeat the last row/col."""
    B, H, N, D = x_img.shape
    grid = x_img.reshape(B, H, h, w, D).double()
    hp, wp = math.ceil(h / d), math.ceil(w / d)
    out = torch.zeros(B, H, hp, wp, D, dtype=torch.float64)
    for bi in range(hp):
        for bj in range(wp):
            for i in range(d):
                for j in range(d):
                    y = min(bi * d + i, h - 1)
                    x = min(bj * d + j, w - 1)
                    out[:, :, bi, bj] += weight[i, j] * grid[:, :, y, x]
    return out.reshape(B, H, hp * wp, D)


def clear_oracle(q, k, v, text_len, grid, window, down_factor=1, spatial_weight=None, scale=None, pooled_k=None,
                 pooled_v=None):
    """pooled_k/pooled_v: pooled keys given by the caller (then not pooled here)."""
    B, H, L, D = q.shape
    T = text_len
    h, w = grid
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    keys, vals = k, v
    P = 0
    if pooled_k is not None:
        P = pooled_k.shape[2]
        keys, vals = torch.cat([k, pooled_k.double()], 2), torch.cat([v, pooled_v.double()], 2)
    elif down_factor > 1:
        d = down_factor
        weight = (torch.full((d, d), 1.0 / d / d, dtype=torch.float64) if spatial_weight is None
                  else spatial_weight.reshape(d, d).double())
        kp = pooled_tokens(k[:, :, T:], h, w, d, weight)
        vp = pooled_tokens(v[:, :, T:], h, w, d, weight)
        P = kp.shape[2]
        keys, vals = torch.cat([k, kp], 2), torch.cat([v, vp], 2)
    allowed = torch.zeros(L, L + P, dtype=torch.bool)
    allowed[:T, :L] = True  # text rows: all text and image keys, no pooled keys
    allowed[T:, :T] = True  # image rows: all text keys
    allowed[T:, L:] = True  # ... and all pooled keys
    for qi in range(h * w):
        qy, qx = divmod(qi, w)
        for ki in range(h * w):
            ky, kx = divmod(ki, w)
            if (qy - ky) ** 2 + (qx - kx) ** 2 < window ** 2:
                allowed[T + qi, T + ki] = True
    s = (q @ keys.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ vals


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
