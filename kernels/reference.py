"""Exact PyTorch implementation of CLEAR attention (any device).

Never builds an L x L tensor: image queries are processed in 2-D tiles that
gather only the keys inside their window, text queries in row chunks, and every
chunk is sized so its score tensor stays under ``CHUNK_ELEMENTS`` elements.
Arithmetic is float32 (float64 for float64 inputs); the result is cast back to
the input dtype.
"""

import math

import torch

# Upper bound on the elements of one chunk's score tensor (float32: 256 MiB).
# Tests lower it to prove the bound holds.
CHUNK_ELEMENTS = 1 << 26

# Image query tile (rows x cols of the token grid) for the torch path.
TILE = 16


def pooled_grid(grid, down_factor):
    """Shape (rows, cols) of the pooled-token grid: ceil(h/d) x ceil(w/d)."""
    h, w = grid
    return -(-h // down_factor), -(-w // down_factor)


def spatial_weight_matrix(spatial_weight, down_factor, device, dtype=torch.float32):
    """The d x d pooling weights as a matrix; None means mean pooling."""
    d = down_factor
    if spatial_weight is None:
        return torch.full((d, d), 1.0 / (d * d), dtype=dtype, device=device)
    return spatial_weight.detach().reshape(d, d).to(device=device, dtype=dtype)


def pool_image_tokens(x_img, grid, down_factor, spatial_weight=None):
    """Reduce each d x d block of the image grid to one token.

    x_img: (B, H, h*w, D) image keys or values, row-major. Returns
    (B, H, ceil(h/d)*ceil(w/d), D) in float32 (float64 for float64 input).
    A grid that is not a multiple of d is completed by repeating its last row
    and column (edge padding), so a partial block still carries the layer's
    full weight sum over real tokens; on divisible grids this is exactly the
    reference's weighted block sum.
    """
    h, w = grid
    d = down_factor
    B, H, N, D = x_img.shape
    hp, wp = pooled_grid(grid, d)
    dtype = torch.float64 if x_img.dtype == torch.float64 else torch.float32
    weights = spatial_weight_matrix(spatial_weight, d, x_img.device, dtype)
    rows = torch.arange(hp * d, device=x_img.device).clamp_(max=h - 1)
    cols = torch.arange(wp * d, device=x_img.device).clamp_(max=w - 1)
    x = x_img.reshape(B, H, h, w, D)[:, :, rows][:, :, :, cols]
    x = x.reshape(B, H, hp, d, wp, d, D).to(dtype)
    pooled = torch.einsum("bhidjek,de->bhijk", x, weights)
    return pooled.reshape(B, H, hp * wp, D)


def _local_window(tile_start, tile_len, radius, extent):
    """First key row/col and length of the window a tile's discs can reach."""
    lo = max(tile_start - (radius - 1), 0)
    hi = min(tile_start + tile_len - 1 + (radius - 1), extent - 1)
    return lo, hi - lo + 1


def _softmax_rows(parts):
    """Softmax-weighted sum over several (scores, values) key groups at once.

    parts: list of (scores (..., q, n), values (..., n, D) or broadcastable).
    Returns (..., q, D) without concatenating the groups.
    """
    row_max = None
    for s, _ in parts:
        m = s.amax(dim=-1, keepdim=True)
        row_max = m if row_max is None else torch.maximum(row_max, m)
    denom = 0
    acc = 0
    for s, vals in parts:
        p = torch.exp(s - row_max)
        denom = denom + p.sum(dim=-1, keepdim=True)
        acc = acc + p @ vals
    return acc / denom


def clear_attention_torch(q, k, v, *, text_len, grid, window, pooled_k=None, pooled_v=None, scale):
    """CLEAR attention on validated inputs; see ``comfyui_clear.kernels.clear_attention``."""
    B, H, L, D = q.shape
    T = text_len
    h, w = grid
    r = window
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)

    k_text, v_text = k[:, :, :T], v[:, :, :T]
    k_img, v_img = k[:, :, T:], v[:, :, T:]
    has_pool = pooled_k is not None
    P = pooled_k.shape[2] if has_pool else 0

    # Text queries see every text and image key (not the pooled ones): dense
    # rows, chunked over heads and rows.
    if T > 0:
        rows = max(1, CHUNK_ELEMENTS // (L * H * B))
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            qc = q[:, :, t0:t1].to(dtype)
            s = (qc @ k.to(dtype).transpose(-1, -2)) * scale
            out[:, :, t0:t1] = torch.softmax(s, dim=-1).matmul(v.to(dtype)).to(q.dtype)

    # Image queries: tiles of ty x tx tokens; each tile gathers the key
    # rectangle its discs can reach and masks it exactly.
    ty, tx = min(TILE, h), min(TILE, w)
    wy = min(ty + 2 * (r - 1), h)
    wx = min(tx + 2 * (r - 1), w)
    device = q.device
    # Tiles start on a ty/tx lattice; the last tile of a row or column is
    # shifted back inside the grid (it recomputes some queries identically).
    ys = sorted({min(y, h - ty) for y in range(0, h, ty)})
    xs = sorted({min(x, w - tx) for x in range(0, w, tx)})
    tiles = [(y, x) for y in ys for x in xs]

    per_tile = B * H * ty * tx * (wy * wx + T + P)
    tiles_per_chunk = max(1, CHUNK_ELEMENTS // per_tile)
    heads_per_chunk = H if per_tile <= CHUNK_ELEMENTS else max(1, H * CHUNK_ELEMENTS // per_tile)

    qy_off = torch.arange(ty, device=device).repeat_interleave(tx)
    qx_off = torch.arange(tx, device=device).repeat(ty)
    ky_off = torch.arange(wy, device=device).repeat_interleave(wx)
    kx_off = torch.arange(wx, device=device).repeat(wy)

    for c0 in range(0, len(tiles), tiles_per_chunk):
        chunk = tiles[c0:c0 + tiles_per_chunk]
        q_idx, k_idx, masks = [], [], []
        for y0, x0 in chunk:
            ky0, _ = _local_window(y0, ty, r, h)
            kx0, _ = _local_window(x0, tx, r, w)
            ky0, kx0 = min(ky0, h - wy), min(kx0, w - wx)
            qy, qx = y0 + qy_off, x0 + qx_off
            ky, kx = ky0 + ky_off, kx0 + kx_off
            q_idx.append(qy * w + qx)
            k_idx.append(ky * w + kx)
            dist2 = (qy[:, None] - ky[None, :]) ** 2 + (qx[:, None] - kx[None, :]) ** 2
            masks.append(dist2 < r * r)
        q_idx = torch.stack(q_idx)  # (n, tq)
        k_idx = torch.stack(k_idx)  # (n, kw)
        mask = torch.stack(masks)  # (n, tq, kw)

        for h0 in range(0, H, heads_per_chunk):
            h1 = min(H, h0 + heads_per_chunk)
            qt = q[:, h0:h1, T:][:, :, q_idx].to(dtype)  # (B, h, n, tq, D)
            kl = k_img[:, h0:h1][:, :, k_idx].to(dtype)  # (B, h, n, kw, D)
            vl = v_img[:, h0:h1][:, :, k_idx].to(dtype)
            s_local = (qt @ kl.transpose(-1, -2)) * scale
            s_local = s_local.masked_fill(~mask, float("-inf"))
            parts = [(s_local, vl)]
            if T > 0:
                kt = k_text[:, h0:h1, None].to(dtype)  # (B, h, 1, T, D)
                parts.append(((qt @ kt.transpose(-1, -2)) * scale, v_text[:, h0:h1, None].to(dtype)))
            if has_pool:
                kp = pooled_k[:, h0:h1, None].to(dtype)
                parts.append(((qt @ kp.transpose(-1, -2)) * scale, pooled_v[:, h0:h1, None].to(dtype)))
            res = _softmax_rows(parts).to(q.dtype)  # (B, h, n, tq, D)
            out_img = out[:, h0:h1, T:]
            out_img[:, :, q_idx.reshape(-1)] = res.reshape(B, h1 - h0, -1, D)
    return out
