"""Gradients of CLEAR attention (docs/attention.md, "Gradients").

- ``ClearAttentionTorch``: the torch path as an autograd.Function. Its
  forward is ``clear_attention_torch`` (nothing saved but the inputs); its
  backward, ``clear_attention_backward``, recomputes each query tile's
  scores over the same key sets the forward gathers (local disc rectangle,
  text keys, pooled keys), forms that tile's probabilities exactly (every
  key of a row is in the tile, so no saved log-sum-exp is needed) and
  accumulates dq, dk, dv, d pooled_k, d pooled_v, the local keys' parts with
  ``index_add_`` at the gathered positions. Chunks are sized from the same
  ``working_set_budget`` as the forward: no L x L tensor.
- ``pool_image_tokens_differentiable``: the pooling of
  ``reference.pool_image_tokens`` (edge padding included) as a gather and one
  einsum, so gradients reach k, v and ``spatial_weight``;
  ``pool_image_tokens_backward`` is its vector-Jacobian product written out,
  for the custom op's autograd formula (traced by AOTAutograd).
- Triton has no backward kernel: ``TRITON_REFUSAL`` is the one error a
  gradient-needing call to it gets. Flex's backward runs compiled on CUDA
  (FlexAttention refuses it on the CPU): ``flex_refusal``.
"""

import torch

from . import reference
from .reference import _compute_dtype, clear_attention_torch, pooled_grid, text_row_chunks, working_set_budget

# The custom op's backend value for "auto" when the caller needs gradients:
# the same choice without the Triton kernel (it has no backward).
AUTO_DIFFERENTIABLE = "auto_differentiable"

TRITON_REFUSAL = (
    "clear_attention: backend='triton' has no backward (no gradient kernel), and gradients are needed here "
    "(an input requires grad and grad mode is on). Train with backend='flex' (CUDA) or backend='torch' "
    "(any device), or 'auto', which picks one of them; or run under torch.no_grad() for inference.")


def flex_refusal(device):
    return (f"clear_attention: backend='flex' has no backward on {device.type}: FlexAttention computes "
            "gradients only compiled on CUDA. Train with backend='torch' (exact, any device) or 'auto'.")


def grad_needed(*tensors):
    """Whether autograd will record a call on these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _pool_indices(grid, d, device):
    """Grid rows and columns of the edge-padded (hp*d, wp*d) block lattice."""
    h, w = grid
    hp, wp = pooled_grid(grid, d)
    rows = torch.arange(hp * d, device=device).clamp_(max=h - 1)
    cols = torch.arange(wp * d, device=device).clamp_(max=w - 1)
    return rows, cols


def _weight_matrix(spatial_weight, d, device, dtype):
    if spatial_weight is None:
        return torch.full((d, d), 1.0 / (d * d), dtype=dtype, device=device)
    return spatial_weight.reshape(d, d).to(device=device, dtype=dtype)


def pool_image_tokens_differentiable(x_img, grid, down_factor, spatial_weight=None):
    """``reference.pool_image_tokens`` through differentiable ops: gradients
    reach ``x_img`` and ``spatial_weight``. Holds one edge-padded copy of
    ``x_img`` in the compute dtype (O(L), never more)."""
    h, w = grid
    d = down_factor
    B, H, _, D = x_img.shape
    hp, wp = pooled_grid(grid, d)
    dtype = _compute_dtype(x_img.dtype)
    rows, cols = _pool_indices(grid, d, x_img.device)
    x = x_img.reshape(B, H, h, w, D).index_select(2, rows).index_select(3, cols).to(dtype)
    weight = _weight_matrix(spatial_weight, d, x_img.device, dtype)
    pooled = torch.einsum("bhaicjd,ij->bhacd", x.reshape(B, H, hp, d, wp, d, D), weight)
    return pooled.reshape(B, H, hp * wp, D)


def pool_image_tokens_backward(grad_pooled, x_img, grid, down_factor, spatial_weight):
    """(d x_img, d spatial_weight) of ``pool_image_tokens_differentiable``
    for an incoming ``grad_pooled`` (B, H, P, D); d spatial_weight is None
    when the weight is None (mean pooling)."""
    h, w = grid
    d = down_factor
    B, H, _, D = x_img.shape
    hp, wp = pooled_grid(grid, d)
    dtype = grad_pooled.dtype
    rows, cols = _pool_indices(grid, d, x_img.device)
    weight = _weight_matrix(spatial_weight, d, x_img.device, dtype)
    gp = grad_pooled.reshape(B, H, hp, wp, D)
    # each padded position (a*d+i, c*d+j) got weight[i, j] of its block's gradient; the padding's
    # repeated rows/columns fold back onto the grid's last row/column
    gx = torch.einsum("bhacd,ij->bhaicjd", gp, weight).reshape(B, H, hp * d, wp * d, D)
    gx = gx.new_zeros(B, H, hp * d, w, D).index_add_(3, cols, gx)
    gx = gx.new_zeros(B, H, h, w, D).index_add_(2, rows, gx)
    grad_x = gx.reshape(B, H, h * w, D).to(x_img.dtype)
    if spatial_weight is None:
        return grad_x, None
    x = x_img.reshape(B, H, h, w, D).index_select(2, rows).index_select(3, cols).to(dtype)
    grad_w = torch.einsum("bhacd,bhaicjd->ij", gp, x.reshape(B, H, hp, d, wp, d, D))
    return grad_x, grad_w.reshape(spatial_weight.shape).to(spatial_weight.dtype)


class ClearAttentionTorch(torch.autograd.Function):
    """The torch path with its memory-bounded, exact backward."""

    @staticmethod
    def forward(ctx, q, k, v, pooled_k, pooled_v, text_len, grid, window, scale):
        ctx.save_for_backward(q, k, v, pooled_k, pooled_v)
        ctx.args = (text_len, grid, window, scale)
        return clear_attention_torch(q, k, v, text_len=text_len, grid=grid, window=window, pooled_k=pooled_k,
                                     pooled_v=pooled_v, scale=scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, pooled_k, pooled_v = ctx.saved_tensors
        text_len, grid, window, scale = ctx.args
        grads = clear_attention_backward(grad_out, q, k, v, pooled_k, pooled_v, text_len=text_len, grid=grid,
                                         window=window, scale=scale)
        return (*grads, None, None, None, None)


def clear_attention_torch_autograd(q, k, v, *, text_len, grid, window, pooled_k=None, pooled_v=None, scale):
    """``clear_attention_torch``, recorded for autograd when an input needs it."""
    if grad_needed(q, k, v, pooled_k, pooled_v):
        return ClearAttentionTorch.apply(q, k, v, pooled_k, pooled_v, text_len, tuple(grid), window, scale)
    return clear_attention_torch(q, k, v, text_len=text_len, grid=grid, window=window, pooled_k=pooled_k,
                                 pooled_v=pooled_v, scale=scale)


def _softmax_rows_(groups):
    """Probabilities over several score groups of the same rows, in place:
    each (..., rows, n_g) tensor, one softmax over the union."""
    row_max = groups[0].amax(dim=-1, keepdim=True)
    for s in groups[1:]:
        row_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
    denom = None
    for s in groups:
        s.sub_(row_max).exp_()
        part = s.sum(dim=-1, keepdim=True)
        denom = part if denom is None else denom.add_(part)
    for s in groups:
        s.div_(denom)


def _text_rows_backward(grad_out, q, k, v, dq, dk, dv, T, scale, budget):
    """Text rows: dense rows over every text and image key, chunked over
    heads and rows as the forward is."""
    B, H, L, D = q.shape
    dtype = dq.dtype
    c = dq.element_size()
    g = c + (q.element_size() if q.dtype != dtype else 0)
    per_head = 2 * L * D * g + 2 * L * D * c  # keys and values in the compute dtype, their gradient products
    per_row = 2 * L * c + 2 * D * g + 3 * D * c  # probabilities and their gradient; q, dO, output, dq rows
    heads, rows = text_row_chunks(B, H, T, per_head, per_row, budget)
    for h0 in range(0, H, heads):
        h1 = min(H, h0 + heads)
        kc, vc = k[:, h0:h1].to(dtype), v[:, h0:h1].to(dtype)
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            qt, go = q[:, h0:h1, t0:t1].to(dtype), grad_out[:, h0:h1, t0:t1].to(dtype)
            p = (qt @ kc.transpose(-1, -2)).mul_(scale)
            _softmax_rows_([p])
            # delta = rowsum(P * dP) = rowsum(dO * O)
            delta = (go * (p @ vc)).sum(dim=-1, keepdim=True)
            ds = go @ vc.transpose(-1, -2)
            ds.sub_(delta).mul_(p).mul_(scale)
            dv[:, h0:h1] += p.transpose(-1, -2) @ go
            del p
            dq[:, h0:h1, t0:t1] += ds @ kc
            dk[:, h0:h1] += ds.transpose(-1, -2) @ qt
            del ds, qt, go
        del kc, vc


def clear_attention_backward(grad_out, q, k, v, pooled_k, pooled_v, *, text_len, grid, window, scale):
    """(dq, dk, dv, d pooled_k, d pooled_v) of ``clear_attention_torch`` (the
    last two None without pooled keys), each in its input's dtype. Exact:
    every tile's probabilities are recomputed from all the keys its rows see.
    Memory: the gradients (compute dtype) plus one chunk within
    ``working_set_budget(q)``."""
    B, H, L, D = q.shape
    T = text_len
    h, w = grid
    r = min(window, h + w)
    dtype = _compute_dtype(q.dtype)
    c = torch.empty((), dtype=dtype).element_size()
    g = c + (q.element_size() if q.dtype != dtype else 0)
    has_pool = pooled_k is not None
    P = pooled_k.shape[2] if has_pool else 0
    device = q.device
    zeros = {"dtype": dtype, "device": device}
    dq, dk, dv = (torch.zeros(B, H, L, D, **zeros) for _ in range(3))
    dpk = torch.zeros(B, H, P, D, **zeros) if has_pool else None
    dpv = torch.zeros(B, H, P, D, **zeros) if has_pool else None
    budget = working_set_budget(q)
    if has_pool:
        budget -= 2 * pooled_k.numel() * pooled_k.element_size()

    if T > 0:
        _text_rows_backward(grad_out, q, k, v, dq, dk, dv, T, scale, budget)

    # Image queries: the forward's tiles (ty x tx tokens on a lattice, the last
    # one of a row/column shifted back inside the grid). A shifted tile
    # repeats queries of its neighbour: those rows get a zero output gradient
    # here, so each query contributes once.
    ty, tx = min(reference.TILE, h), min(reference.TILE, w)  # the forward's tiles (tests shrink them)
    wy, wx = min(ty + 2 * (r - 1), h), min(tx + 2 * (r - 1), w)
    tq, kw = ty * tx, wy * wx
    tiles = [(min(y, h - ty), min(x, w - tx), y, x) for y in range(0, h, ty) for x in range(0, w, tx)]

    # Bytes per (batch, head, tile): probabilities of all key groups and the
    # gradient of one group; gathered keys and values with their gradient
    # products; query, dO, output, dq rows and casts; row statistics.
    per_tile = (tq * (kw + T + P) * c + tq * max(kw, T, P) * c + 2 * kw * D * (g + c)
                + tq * D * (2 * g + 3 * c) + 4 * tq * c)
    per_head = 2 * (T + P) * D * (g + c)  # text and pooled keys and values, their gradient products
    per_mask = tq * kw * 5 + (tq + kw) * 16 + tq * c  # distances, mask, indices, the owned-rows factor
    if B * H * (per_tile + per_head) + per_mask <= budget:
        heads = H
        tiles_per_chunk = max(1, (budget - B * H * per_head) // (B * H * per_tile + per_mask))
    else:
        tiles_per_chunk = 1
        heads = max(1, (budget - per_mask) // (B * (per_tile + per_head)))

    i64 = {"device": device, "dtype": torch.int64}
    ty_off, tx_off = torch.arange(ty, **i64), torch.arange(tx, **i64)
    wy_off, wx_off = torch.arange(wy, **i64), torch.arange(wx, **i64)
    q_img, k_img, v_img, g_img = q[:, :, T:], k[:, :, T:], v[:, :, T:], grad_out[:, :, T:]
    dq_img, dk_img, dv_img = dq[:, :, T:], dk[:, :, T:], dv[:, :, T:]

    for c0 in range(0, len(tiles), tiles_per_chunk):
        chunk = tiles[c0:c0 + tiles_per_chunk]
        n = len(chunk)
        y0 = torch.tensor([t[0] for t in chunk], **i64)
        x0 = torch.tensor([t[1] for t in chunk], **i64)
        ky0 = (y0 - (r - 1)).clamp_(min=0).clamp_(max=h - wy)
        kx0 = (x0 - (r - 1)).clamp_(min=0).clamp_(max=w - wx)
        qy, qx = y0[:, None] + ty_off, x0[:, None] + tx_off  # (n, ty), (n, tx)
        ky, kx = ky0[:, None] + wy_off, kx0[:, None] + wx_off  # (n, wy), (n, wx)
        dist2 = ((qy[:, :, None] - ky[:, None, :]).square_()[:, :, None, :, None]
                 + (qx[:, :, None] - kx[:, None, :]).square_()[:, None, :, None, :])
        outside = (dist2 >= r * r).reshape(n, tq, kw)
        del dist2
        # rows a tile owns: at or past its lattice origin (the shifted part repeats a neighbour's rows)
        nom_y = torch.tensor([t[2] for t in chunk], **i64)
        nom_x = torch.tensor([t[3] for t in chunk], **i64)
        owned = ((qy >= nom_y[:, None])[:, :, None] & (qx >= nom_x[:, None])[:, None, :]).reshape(n, tq, 1)
        q_sel = (qy[:, :, None] * w + qx[:, None, :]).reshape(n, tq)
        k_sel = (ky[:, :, None] * w + kx[:, None, :]).reshape(n, kw)
        del qy, qx, ky, kx

        for h0 in range(0, H, heads):
            h1 = min(H, h0 + heads)
            hc = h1 - h0
            qt = q_img[:, h0:h1][:, :, q_sel].to(dtype)  # (B, hc, n, tq, D)
            go = g_img[:, h0:h1][:, :, q_sel].to(dtype).mul_(owned.to(dtype))
            kl = k_img[:, h0:h1][:, :, k_sel].to(dtype)  # (B, hc, n, kw, D)
            vl = v_img[:, h0:h1][:, :, k_sel].to(dtype)
            p_local = (qt @ kl.transpose(-1, -2)).mul_(scale).masked_fill_(outside, float("-inf"))
            qf, gof = qt.reshape(B, hc, n * tq, D), go.reshape(B, hc, n * tq, D)
            # the key groups every image row of a head shares: (scores, keys, values, dk, dv)
            groups = []
            if T > 0:
                groups.append((k[:, h0:h1, :T].to(dtype), v[:, h0:h1, :T].to(dtype), dk[:, h0:h1, :T],
                               dv[:, h0:h1, :T]))
            if has_pool:
                groups.append((pooled_k[:, h0:h1].to(dtype), pooled_v[:, h0:h1].to(dtype), dpk[:, h0:h1],
                               dpv[:, h0:h1]))
            scores = [(qf @ kg.transpose(-1, -2)).mul_(scale) for kg, _, _, _ in groups]
            _softmax_rows_([p_local.view(B, hc, n * tq, kw)] + scores)
            out = (p_local @ vl).reshape(B, hc, n * tq, D)
            for p, (_, vg, _, _) in zip(scores, groups):
                out += p @ vg
            delta = (gof * out).sum(dim=-1, keepdim=True)  # rowsum(P * dP)
            del out
            # local keys
            ds = go @ vl.transpose(-1, -2)
            ds.sub_(delta.view(B, hc, n, tq, 1)).mul_(p_local).mul_(scale)
            dq_tile = (ds @ kl).reshape(B, hc, n * tq, D)
            dk_img[:, h0:h1].index_add_(2, k_sel.reshape(-1), (ds.transpose(-1, -2) @ qt).reshape(B, hc, n * kw, D))
            del ds, kl
            dv_img[:, h0:h1].index_add_(2, k_sel.reshape(-1),
                                        (p_local.transpose(-1, -2) @ go).reshape(B, hc, n * kw, D))
            del p_local, vl, qt, go
            # text and pooled keys
            while groups:
                kg, vg, dkg, dvg = groups.pop(0)
                p = scores.pop(0)
                ds = gof @ vg.transpose(-1, -2)
                ds.sub_(delta).mul_(p).mul_(scale)
                dvg += p.transpose(-1, -2) @ gof
                del p
                dq_tile += ds @ kg
                dkg += ds.transpose(-1, -2) @ qf
                del ds, kg, vg
            dq_img[:, h0:h1].index_add_(2, q_sel.reshape(-1), dq_tile)
            del dq_tile, qf, gof, delta

    def cast(grad, like):
        return None if grad is None else grad.to(like.dtype)

    return cast(dq, q), cast(dk, k), cast(dv, v), cast(dpk, pooled_k), cast(dpv, pooled_v)


__all__ = ["ClearAttentionTorch", "clear_attention_backward", "clear_attention_torch_autograd",
           "pool_image_tokens_differentiable", "pool_image_tokens_backward", "grad_needed", "TRITON_REFUSAL",
           "AUTO_DIFFERENTIABLE", "flex_refusal"]
