"""Exact PyTorch implementation of CLEAR attention (any device).

Never builds an L x L tensor: image queries are processed in 2-D tiles that
gather only the keys inside their window, text queries in row chunks. Chunks
are sized so that everything one chunk holds at once (scores, gathered keys
and values, masks, partial outputs) stays under a byte budget taken from the
problem and the device's free memory (``working_set_budget``). Arithmetic is
float32 (float64 for float64 inputs); the result is cast back to the input
dtype.
"""

import os

import torch

# Image query tile (rows x cols of the token grid) for the torch path.
TILE = 16

# One chunk may use at most this share of the device's free memory...
FREE_MEMORY_FRACTION = 1 / 8
# ... and at most one compute-dtype copy of q, but never less than this floor,
# so mid-sized problems run in few chunks (small chunks are slow on busy CPUs
# and on GPUs). Also never more than half a dense L x L score matrix: a dense
# attention builds that matrix (ComfyUI's sub-quadratic one, min(L, 4096)
# query rows of it at a time, plus an exp copy), so ours stays below it.
MIN_BUDGET_BYTES = 64 << 20


def _system_available_memory():
    """Bytes of RAM the OS can still give (None if unknown)."""
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device):
    """Bytes still allocatable on ``device``, or None when it cannot be told.

    CUDA: free device memory plus what torch's caching allocator holds unused
    (as ComfyUI's model_management.get_free_memory counts it). CPU and MPS
    (unified memory): available system RAM, on MPS also capped by Metal's
    recommended working set.
    """
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            stats = torch.cuda.memory_stats(device)
            return free + stats.get("reserved_bytes.all.current", 0) - stats.get("active_bytes.all.current", 0)
        backend = getattr(torch, device.type, None)
        if device.type not in ("cpu", "mps") and hasattr(backend, "mem_get_info"):  # xpu, npu, ...
            return backend.mem_get_info(device)[0]
    except (RuntimeError, AssertionError):  # backend present but not initialised/usable
        return None
    free = _system_available_memory()
    if device.type == "mps":
        try:
            metal = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
            free = metal if free is None else min(free, metal)
        except (AttributeError, RuntimeError):
            pass
    return free


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def working_set_budget(q):
    """Bytes one chunk of the torch path may hold at once, for attention on ``q``.

    min(max(one compute-dtype copy of q, MIN_BUDGET_BYTES), half a dense
    B*H*L*L score matrix, FREE_MEMORY_FRACTION of the device's free memory).
    A chunk never goes below one tile (or one text row) of one head, so a tiny
    budget means many small chunks, never a failure.
    """
    B, H, L, _ = q.shape
    c = torch.empty((), dtype=_compute_dtype(q.dtype)).element_size()
    budget = min(max(q.numel() * c, MIN_BUDGET_BYTES), B * H * L * L * c // 2)
    # Reading free memory under torch.compile would break the graph; the
    # problem-sized caps alone are used there.
    if not torch.compiler.is_compiling():
        free = free_memory(q.device)
        if free is not None:
            budget = min(budget, int(free * FREE_MEMORY_FRACTION))
    return max(budget, 0)


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


def _pooling_weights(spatial_weight, d, device, dtype):
    """The d x d pooling weights, indexable as [i][j]. From a CPU weight tensor
    (the layer weights' home) as Python floats, read on every call: they reach
    the kernels with no host-to-device copy, and d*d values cost ~10 us against
    a pooling pass of milliseconds. Not cached per tensor: neither an in-place
    write through ``.data`` nor one to an inference tensor (what ComfyUI's
    executor makes, under torch.inference_mode) moves a version counter, so a
    cache could serve stale weights, i.e. a silently different image. A
    weight on another device, or a traced call (reading values would break
    the graph), gives a tensor on ``device`` instead: no host sync."""
    if spatial_weight is None:
        return [[1.0 / (d * d)] * d for _ in range(d)]
    if spatial_weight.device.type == "cpu" and not torch.compiler.is_compiling():
        return spatial_weight.detach().reshape(d, d).double().tolist()
    return spatial_weight_matrix(spatial_weight, d, device, dtype)


def pooling_bytes(batch, heads, grid, head_dim, down_factor, itemsize):
    """Bytes ``pool_image_tokens`` allocates for one input of ``itemsize``-byte
    elements: its result, plus (only where the input dtype is not the compute
    dtype and the device is the CPU, which casts operands of mixed-dtype ops
    into a temporary) one head's pooled slice. The token-chunking memory model
    counts two of these (pooled keys and values) during attention."""
    hp, wp = pooled_grid(grid, down_factor)
    c = 8 if itemsize == 8 else 4
    return batch * heads * hp * wp * head_dim * c + (batch * hp * wp * head_dim * c if itemsize != c else 0)


def pool_image_tokens(x_img, grid, down_factor, spatial_weight=None):
    """Reduce each d x d block of the image grid to one token.

    x_img: (B, H, h*w, D) image keys or values, row-major. Returns
    (B, H, ceil(h/d)*ceil(w/d), D) in float32 (float64 for float64 input).
    A grid that is not a multiple of d is completed by repeating its last row
    and column (edge padding), so a partial block still carries the layer's
    full weight sum over real tokens; on divisible grids this is exactly the
    reference's weighted block sum.

    Each block offset (i, j) is a strided view of x (no gather, no copy):
    the interior blocks, the last block row and column (whose rows/columns
    past the grid repeat its last one) and the corner, each accumulated with
    its weight, a Python float for a CPU weight tensor (no weight tensor on
    the device; ``_pooling_weights``). Memory: the result
    (``pooling_bytes``); mixed-dtype adds on the CPU cast one head at a time.
    """
    h, w = grid
    d = down_factor
    B, H, N, D = x_img.shape
    hp, wp = pooled_grid(grid, d)
    dtype = _compute_dtype(x_img.dtype)
    weights = _pooling_weights(spatial_weight, d, x_img.device, dtype)
    x = x_img.reshape(B, H, h, w, D)
    out = torch.zeros(B, H, hp * wp, D, dtype=dtype, device=x_img.device)
    pooled = out.view(B, H, hp, wp, D)
    a, b = hp - 1, wp - 1  # complete-or-not: the last block row/column may be partial
    # CPU casts the bf16/fp16 operand of a mixed-dtype add into a temporary: one head at a time
    step = 1 if x_img.device.type == "cpu" and x_img.dtype != dtype else H
    for h0 in range(0, H, step):
        xs, ps = x[:, h0:h0 + step], pooled[:, h0:h0 + step]
        inner = xs[:, :, :a * d, :b * d].unflatten(3, (b, d)).unflatten(2, (a, d))  # (B, s, a, d, b, d, D)
        for i in range(d):
            y = min(a * d + i, h - 1)  # the last block row's row i (repeats the grid's last row)
            for j in range(d):
                xj = min(b * d + j, w - 1)
                wij = weights[i][j]
                for dst, src in ((ps[:, :, :a, :b], inner[:, :, :, i, :, j]),
                                 (ps[:, :, a, :b], xs[:, :, y, :b * d].unflatten(2, (b, d))[:, :, :, j]),
                                 (ps[:, :, :a, b], xs[:, :, :a * d, xj].unflatten(2, (a, d))[:, :, :, i]),
                                 (ps[:, :, a, b], xs[:, :, y, xj])):
                    if isinstance(wij, float):
                        dst.add_(src, alpha=wij)
                    else:
                        dst.addcmul_(src, wij)
    return out


def _local_window(tile_start, tile_len, radius, extent):
    """First key row/col and length of the window a tile's discs can reach."""
    lo = max(tile_start - (radius - 1), 0)
    hi = min(tile_start + tile_len - 1 + (radius - 1), extent - 1)
    return lo, hi - lo + 1


def _select(x, sel):
    """Tokens of x (B, H, N, D) as (B, H, n, m, D): a slice gives n = 1 (a view)."""
    return x[:, :, sel].unsqueeze(2) if isinstance(sel, slice) else x[:, :, sel]


def text_row_chunks(B, H, T, per_head, per_row, budget):
    """(heads, rows) per chunk of the dense text rows: whole heads while they fit
    ``budget`` (``per_head`` bytes each plus ``per_row`` per text row), else one
    head and as many rows as fit (at least one)."""
    heads = min(H, budget // max(1, B * (per_head + T * per_row)))
    if heads >= 1:
        return heads, T
    return 1, max(1, (budget // B - per_head) // per_row)


def _attend_text_queries(q, k, v, out, T, scale, budget):
    """Text rows see every text and image key: dense rows, chunked over heads and rows."""
    B, H, L, D = q.shape
    dtype = _compute_dtype(q.dtype)
    c = torch.empty((), dtype=dtype).element_size()
    g = c + (q.element_size() if q.dtype != dtype else 0)  # a converted copy and its source
    per_head = 2 * L * D * g  # this head's keys and values in the compute dtype
    per_row = D * g + L * c + 2 * D * c  # query, score row, output row (+ its sum)
    heads, rows = text_row_chunks(B, H, T, per_head, per_row, budget)
    for h0 in range(0, H, heads):
        h1 = min(H, h0 + heads)
        kc = k[:, h0:h1].to(dtype)
        vc = v[:, h0:h1].to(dtype)
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            s = q[:, h0:h1, t0:t1].to(dtype) @ kc.transpose(-1, -2)
            s.mul_(scale)
            s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
            o = s @ vc
            o.div_(s.sum(dim=-1, keepdim=True))
            del s
            out[:, h0:h1, t0:t1] = o
            del o
        del kc, vc


def clear_attention_torch(q, k, v, *, text_len, grid, window, pooled_k=None, pooled_v=None, scale):
    """CLEAR attention on validated inputs; see ``comfyui_clear.kernels.clear_attention``."""
    B, H, L, D = q.shape
    T = text_len
    h, w = grid
    # Any radius past the grid's diagonal sees the whole grid; clamping keeps
    # the integer arithmetic small for huge windows.
    r = min(window, h + w)
    dtype = _compute_dtype(q.dtype)
    c = torch.empty((), dtype=dtype).element_size()
    e = q.element_size()
    g = c + (e if q.dtype != dtype else 0)  # a gathered copy in the compute dtype, and its source
    budget = working_set_budget(q)
    if pooled_k is not None:  # held all along, so they count against the budget
        budget -= pooled_k.numel() * pooled_k.element_size() + pooled_v.numel() * pooled_v.element_size()
    # (B, L, H, D) storage: the caller's out.transpose(1, 2).reshape(B, L, H * D) is a view
    out = q.new_empty(B, L, H, D).transpose(1, 2)

    if T > 0:
        _attend_text_queries(q, k, v, out, T, scale, budget)

    k_text, v_text = k[:, :, :T], v[:, :, :T]
    k_img, v_img = k[:, :, T:], v[:, :, T:]
    has_pool = pooled_k is not None
    P = pooled_k.shape[2] if has_pool else 0

    # Image queries: tiles of ty x tx tokens; each tile gathers the key
    # rectangle its discs can reach and masks it exactly.
    ty, tx = min(TILE, h), min(TILE, w)
    wy = min(ty + 2 * (r - 1), h)
    wx = min(tx + 2 * (r - 1), w)
    tq, kw = ty * tx, wy * wx
    device = q.device
    # Tiles start on a ty/tx lattice; the last tile of a row or column is
    # shifted back inside the grid (it recomputes some queries identically).
    ys = sorted({min(y, h - ty) for y in range(0, h, ty)})
    xs = sorted({min(x, w - tx) for x in range(0, w, tx)})
    tiles = [(y, x) for y in ys for x in xs]
    # The same tile origins and key-window origins as device tensors, made on
    # the device (arange, no host-to-device copy per chunk).
    i32 = {"device": device, "dtype": torch.int32}
    ys_d = torch.arange(0, h, ty, **i32).clamp_(max=h - ty)
    xs_d = torch.arange(0, w, tx, **i32).clamp_(max=w - tx)
    tile_y0 = ys_d.repeat_interleave(len(xs))
    tile_x0 = xs_d.repeat(len(ys))
    tile_ky0 = (tile_y0 - (r - 1)).clamp_(min=0).clamp_(max=h - wy)
    tile_kx0 = (tile_x0 - (r - 1)).clamp_(min=0).clamp_(max=w - wx)

    # Bytes held at once, counted per (batch, head, tile): the scores of all
    # key groups (softmax runs in place); the gathered keys, then values (keys
    # are freed once scored); queries, the output accumulator, one matmul
    # product and the cast result.
    per_tile = tq * (kw + T + P) * c + kw * D * g + tq * D * (g + 2 * c + e) + 4 * tq * c
    # per (batch, head): text and pooled keys and values in the compute dtype
    per_head = 2 * (T + P) * D * g
    # per tile, shared by heads: int32 distances while building, the bool mask, indices
    per_mask = tq * kw * 5 + (tq + kw) * 8
    all_heads = B * H * (per_tile + per_head) + per_mask
    if all_heads <= budget:
        heads = H
        tiles_per_chunk = max(1, (budget - B * H * per_head) // (B * H * per_tile + per_mask))
    else:
        tiles_per_chunk = 1
        heads = max(1, (budget - per_mask) // (B * (per_tile + per_head)))

    ty_off = torch.arange(ty, device=device, dtype=torch.int32)
    tx_off = torch.arange(tx, device=device, dtype=torch.int32)
    wy_off = torch.arange(wy, device=device, dtype=torch.int32)
    wx_off = torch.arange(wx, device=device, dtype=torch.int32)

    for c0 in range(0, len(tiles), tiles_per_chunk):
        chunk = tiles[c0:c0 + tiles_per_chunk]
        n = len(chunk)
        y0, x0 = tile_y0[c0:c0 + n], tile_x0[c0:c0 + n]
        ky0, kx0 = tile_ky0[c0:c0 + n], tile_kx0[c0:c0 + n]
        key_rows = [min(_local_window(y, ty, r, h)[0], h - wy) for y, _ in chunk[:1]]
        qy, qx = y0[:, None] + ty_off, x0[:, None] + tx_off  # (n, ty), (n, tx)
        ky, kx = ky0[:, None] + wy_off, kx0[:, None] + wx_off  # (n, wy), (n, wx)
        dy2 = (qy[:, :, None] - ky[:, None, :]).square_()  # (n, ty, wy)
        dx2 = (qx[:, :, None] - kx[:, None, :]).square_()  # (n, tx, wx)
        # outside[t, i*tx + j, a*wx + b]: key (a, b) is not within r of query (i, j)
        dist2 = dy2[:, :, None, :, None] + dx2[:, None, :, None, :]
        outside = (dist2 >= r * r).reshape(n, tq, kw)
        del dy2, dx2, dist2
        # A single tile spanning whole grid rows reads a contiguous token
        # range: a slice (a view, no copy) instead of a gather.
        if n == 1 and tx == w:
            q_sel = slice(chunk[0][0] * w, chunk[0][0] * w + tq)
        else:
            q_sel = (qy[:, :, None].long() * w + qx[:, None, :]).reshape(n, tq)
        if n == 1 and wx == w:
            k_sel = slice(key_rows[0] * w, key_rows[0] * w + kw)
        else:
            k_sel = (ky[:, :, None].long() * w + kx[:, None, :]).reshape(n, kw)
        del qy, qx, ky, kx

        for h0 in range(0, H, heads):
            h1 = min(H, h0 + heads)
            hc = h1 - h0
            qt = _select(q[:, h0:h1, T:], q_sel).to(dtype)  # (B, hc, n, tq, D)
            kl = _select(k_img[:, h0:h1], k_sel).to(dtype)  # (B, hc, n, kw, D)
            s_local = qt @ kl.transpose(-1, -2)  # (B, hc, n, tq, kw)
            del kl
            s_local.mul_(scale).masked_fill_(outside, float("-inf"))
            # Text and pooled keys are shared by every query of a head: one
            # (n*tq, D) x (D, T) product per head, no per-tile copies of them.
            qt = qt.reshape(B, hc, n * tq, D)
            groups = []
            if T > 0:
                kt = k_text[:, h0:h1].to(dtype)
                groups.append(((qt @ kt.transpose(-1, -2)).mul_(scale), v_text[:, h0:h1]))
                del kt
            if has_pool:
                kp = pooled_k[:, h0:h1].to(dtype)
                groups.append(((qt @ kp.transpose(-1, -2)).mul_(scale), pooled_v[:, h0:h1]))
                del kp
            del qt
            # One softmax over all key groups, in place, without concatenating them.
            row_max = s_local.amax(dim=-1).reshape(B, hc, n * tq, 1)
            for s, _ in groups:
                torch.maximum(row_max, s.amax(dim=-1, keepdim=True), out=row_max)
            s_local.sub_(row_max.reshape(B, hc, n, tq, 1)).exp_()
            denom = s_local.sum(dim=-1).reshape(B, hc, n * tq, 1)
            vl = _select(v_img[:, h0:h1], k_sel).to(dtype)
            acc = (s_local @ vl).reshape(B, hc, n * tq, D)
            del s_local, vl
            while groups:
                s, vals = groups.pop(0)
                s.sub_(row_max).exp_()
                denom.add_(s.sum(dim=-1, keepdim=True))
                acc.add_(s @ vals.to(dtype))
                del s, vals
            acc.div_(denom)
            out_img = out[:, h0:h1, T:]
            if isinstance(q_sel, slice):
                out_img[:, :, q_sel] = acc
            else:
                out_img[:, :, q_sel.reshape(-1)] = acc.to(q.dtype)
            del acc
    return out
