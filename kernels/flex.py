"""CLEAR through FlexAttention: the fallback when the Triton kernel cannot run.

- The BlockMask is built analytically from the grid (``clear_block_mask``):
  for each 128-query block, the key blocks its image rows' discs reach (grid
  rows the block spans +- the radius, columns per key row) and every text
  key block; O(number of blocks) work and memory, never an L x L mask. Blocks
  are marked "full" only where every pair is provably visible (text key
  blocks, blocks of text rows, the dense case); the rest are exact through
  ``mask_mod``.
- One compiled function serves every image size: ``torch.compile(...,
  dynamic=True)``, and the mask's sizes (text length, grid width, r^2) are
  captured tensors, not Python constants, so a new size is not a new Dynamo
  entry. The attention scale (proportional attention changes it with the
  image size) is a 0-d tensor too, applied by a ``score_mod`` (``_scaled``).
  A recompile limit hit raises instead of silently running eagerly.
- Pooled keys are not concatenated to K/V: a second, unmasked Flex call over
  the pooled keys returns its log-sum-exp, and the two partial softmaxes are
  merged exactly (image rows only; text rows never see pooled keys).
- The output is laid out (batch, seq, heads, head_dim): ``out.transpose(1, 2)``
  is contiguous, so the caller's reshape to (B, L, H*D) is a view.

On CUDA Flex only runs compiled: where compiling is unavailable or fails,
``FlexUnavailable`` is raised with a one-line reason (the dispatcher falls
back to the torch path). Off CUDA it runs eagerly, which materialises the
score matrix, so only up to ``EAGER_MAX_SCORE_BYTES`` (tests, small shapes).
"""

import math

import torch

from . import DeviceCache

# FlexAttention's sparse block (query and key), the default of create_block_mask.
BLOCK = 128
# Eager Flex (off CUDA) materialises B*H*L*(L+P) float32 scores: refuse beyond this.
EAGER_MAX_SCORE_BYTES = 256 << 20
# torch.compile backend and the device types that run compiled (tests point
# these at a counting backend and the CPU).
COMPILE_BACKEND = "inductor"
COMPILE_DEVICES = ("cuda",)

_MASKS = DeviceCache(8)  # never frees a BlockMask a CUDA graph recorded; an 8K mask holds ~70 MB
_COMPILED = {}


class FlexUnavailable(RuntimeError):
    """FlexAttention cannot run this call safely; the message (one line) says why.
    The dispatcher falls back to the torch path."""


def clear_mask_mod(text_len, grid, window, seq_len):
    """mask_mod over keys ``[text | image | pooled]`` (pooled from ``seq_len`` on),
    the CLEAR authors' layout (bench/attention.py runs it as the reference):
    text rows see text and image keys, image rows see text keys, their disc
    and every pooled key."""
    T, (_, w), r = text_len, grid, window

    def mask_mod(b, hh, q_idx, kv_idx):
        qi, ki = q_idx - T, kv_idx - T
        local = (qi // w - ki // w) ** 2 + (qi % w - ki % w) ** 2 < r * r
        text_row = (q_idx < T) & (kv_idx < seq_len)
        image_row = (q_idx >= T) & ((kv_idx < T) | (kv_idx >= seq_len) | local)
        return text_row | image_row

    return mask_mod


def _sized_mask_mod(T, w, r2):
    """mask_mod over keys ``[text | image]`` reading T, w and r^2 from 0-d int32
    tensors: traced once, it serves every size (the values are graph inputs,
    not constants Dynamo would guard on; 0-d, so no shape to specialise)."""

    def mask_mod(b, hh, q_idx, kv_idx):
        qi, ki = q_idx - T, kv_idx - T
        dy, dx = qi // w - ki // w, qi % w - ki % w
        return (q_idx < T) | (kv_idx < T) | (dy * dy + dx * dx < r2)

    return mask_mod


def _effective_radius(grid, window):
    # A radius past the grid's diagonal sees the whole grid; clamping keeps int32 r^2 small.
    return min(window, grid[0] + grid[1])


def block_layout(text_len, grid, window, block=BLOCK):
    """(partial, full): bool (n_blocks, n_blocks) tables over [text | image]
    query x key blocks of ``block`` tokens, computed from the geometry alone.
    ``partial | full`` covers every visible pair; ``full`` blocks have every
    pair visible (and lie wholly inside the sequence)."""
    T, (h, w) = text_len, grid
    r = _effective_radius(grid, window)
    L = T + h * w
    n = -(-L // block)
    i64 = {"dtype": torch.int64}
    starts = torch.arange(n, **i64) * block
    ends = torch.clamp(starts + block, max=L)  # exclusive
    complete = (starts + block) <= L
    kv_blocks = torch.arange(n, **i64)
    visible = torch.zeros(n, n, dtype=torch.bool)
    text_key_blocks = -(-T // block)
    visible[:, :text_key_blocks] = True  # every row sees the text keys
    visible[starts < T] = True  # text rows see everything
    # Image rows of each query block: positions p0..p1 (inclusive), grid rows y0..y1.
    img = ends > T
    p0 = torch.clamp(starts, min=T) - T
    p1 = ends - 1 - T
    y0, y1 = p0 // w, p1 // w
    dense = (h - 1) ** 2 + (w - 1) ** 2 < r * r
    if dense:
        visible[img] = True
    elif w <= block:
        # A grid row is at most one key block: take whole key rows y0-(r-1) .. y1+(r-1).
        ky0 = torch.clamp(y0 - (r - 1), min=0)
        ky1 = torch.clamp(y1 + (r - 1), max=h - 1)
        lo = (T + ky0 * w) // block
        hi = (T + ky1 * w + w - 1) // block
        visible |= img[:, None] & (kv_blocks >= lo[:, None]) & (kv_blocks <= hi[:, None])
    else:
        # A query block spans at most two grid rows (block < w): row y0 from
        # column x0, row y1 up to column x1. For each key row y' within r-1
        # rows, the columns the discs of those queries reach, as key blocks.
        x0, x1 = p0 % w, p1 % w
        dys = torch.arange(-(r - 1), r, **i64)  # key row = query row + dy
        dxm = torch.tensor([math.isqrt(r * r - 1 - int(d) * int(d)) for d in dys], **i64)
        spans = []  # (query rows, first col, last col) of the block's one or two row segments
        two_rows = y1 > y0
        spans.append((y0, x0, torch.where(two_rows, torch.full_like(x1, w - 1), x1)))
        spans.append((y1, torch.where(two_rows, torch.zeros_like(x0), x0), x1))
        lo_all, hi_all = [], []
        for qy, c0, c1 in spans:
            ky = qy[:, None] + dys  # (n, R)
            ok = img[:, None] & (ky >= 0) & (ky < h)
            klo = T + ky * w + torch.clamp(c0[:, None] - dxm, min=0)
            khi = T + ky * w + torch.clamp(c1[:, None] + dxm, max=w - 1)
            lo_all.append(torch.where(ok, klo // block, n))  # empty ranges: lo > hi
            hi_all.append(torch.where(ok, khi // block, -1))
        lo, hi = torch.cat(lo_all, 1), torch.cat(hi_all, 1)  # (n, 2R) key-block ranges
        # Mark the ranges with a difference array along the key-block axis.
        diff = torch.zeros(n, n + 1, dtype=torch.int32)
        valid = lo <= hi
        rows = torch.arange(n, **i64)[:, None].expand_as(lo)
        one = torch.ones_like(lo, dtype=torch.int32)
        diff.index_put_((rows[valid], lo[valid]), one[valid], accumulate=True)
        diff.index_put_((rows[valid], hi[valid] + 1), -one[valid], accumulate=True)
        visible |= diff.cumsum(1)[:, :n] > 0
    both_complete = complete[:, None] & complete[None, :]
    full = torch.zeros(n, n, dtype=torch.bool)
    full[:, :T // block] = True  # key blocks of text only: every row sees them
    full[ends <= T] = True  # query blocks of text rows only: they see every key
    if dense:
        full[:] = True
    full &= both_complete
    return visible & ~full, full


def _indices(table):
    """(num_blocks (1, 1, n) int32, indices (1, 1, n, n) int32): the True
    columns of each row first, in ascending order."""
    num = table.sum(-1, dtype=torch.int32)
    idx = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None], idx[None, None]


def clear_block_mask(text_len, grid, window, device):
    """The BlockMask of CLEAR's local pattern over keys ``[text | image]``,
    built from ``block_layout`` (no mask_mod evaluation, no L x L tensor),
    cached per (shape, device): FLUX reuses one shape in all 57 layers."""
    device = torch.device(device)
    grid = (int(grid[0]), int(grid[1]))
    key = (int(text_len), grid, int(window), str(device))
    return _MASKS.get(key, device, lambda: _build_block_mask(text_len, grid, window, device))


def _build_block_mask(text_len, grid, window, device):
    from torch.nn.attention.flex_attention import BlockMask

    L = text_len + grid[0] * grid[1]
    partial, full = block_layout(text_len, grid, window)
    (num, idx), (fnum, fidx) = _indices(partial), _indices(full)
    r = _effective_radius(grid, window)
    T_t, w_t, r2_t = (torch.tensor(x, dtype=torch.int32, device=device) for x in (text_len, grid[1], r * r))
    try:
        mask = BlockMask.from_kv_blocks(num.to(device), idx.to(device), fnum.to(device), fidx.to(device),
                                        BLOCK_SIZE=BLOCK, mask_mod=_sized_mask_mod(T_t, w_t, r2_t),
                                        seq_lengths=(L, L))
    except TypeError as exc:  # torch 2.5's from_kv_blocks takes no seq_lengths
        raise FlexUnavailable(f"this torch's BlockMask.from_kv_blocks is too old ({exc}); torch >= 2.6 "
                              "runs the Flex backend") from exc
    return mask


def _scaled(scale):
    """score_mod multiplying the (float32) scores by the 0-d tensor ``scale``:
    Flex's ``scale`` argument is a Python float that Inductor bakes into the
    kernel (a new graph per value; proportional attention makes one per image
    size, and the recompile limit then distrusts Flex). As a tensor it is a
    graph input. Exact: ``(q.k * 1.0) * scale`` is the one float32 rounding
    ``scale=`` makes (bitwise equal in eager Flex); folding the scale into q
    would round q to its dtype again (bf16: +20% error vs the float64 oracle)."""

    def score_mod(score, b, hh, q_idx, kv_idx):
        return score * scale

    return score_mod


def _flex_local(q, k, v, block_mask, scale):
    """Masked Flex over [text | image] keys; output laid out (B, L, H, D).
    ``scale``: 0-d float32 tensor (``_scaled``)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, H, L, D = q.shape
    out = q.new_empty(B, L, H, D).transpose(1, 2)
    out.copy_(flex_attention(q, k, v, score_mod=_scaled(scale), block_mask=block_mask, scale=1.0))
    return out


def _flex_pooled(q, k, v, block_mask, pooled_k, pooled_v, text_len, scale):
    """``_flex_local`` merged with an unmasked Flex of the image rows over the
    pooled keys, by log-sum-exp (exact: one softmax over both key sets)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, H, L, D = q.shape
    T = text_len
    out = q.new_empty(B, L, H, D).transpose(1, 2)
    o1, lse1 = _flex_lse(flex_attention, q, k, v, block_mask, scale)
    o2, lse2 = _flex_lse(flex_attention, q[:, :, T:], pooled_k, pooled_v, None, scale)
    # softmax over both key sets = a * o1 + (1 - a) * o2 with a = sigmoid(lse1 - lse2)
    a = torch.sigmoid(lse1[:, :, T:] - lse2).unsqueeze(-1)
    out[:, :, :T] = o1[:, :, :T]
    out[:, :, T:] = torch.lerp(o2.float(), o1[:, :, T:].float(), a).to(q.dtype)
    return out


def _flex_lse(flex_attention, q, k, v, block_mask, scale):
    kwargs = dict(score_mod=_scaled(scale), block_mask=block_mask, scale=1.0)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return flex_attention(q, k, v, return_lse=True, **kwargs)
    o, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
    return o, aux.lse


def _compiled(fn):
    """``fn`` compiled with dynamic shapes, once per backend (one Dynamo cache
    per function: with and without pooled keys do not share entries)."""
    key = (fn.__name__, COMPILE_BACKEND if isinstance(COMPILE_BACKEND, str) else id(COMPILE_BACKEND))
    if key not in _COMPILED:
        import torch._dynamo
        if not torch._dynamo.is_dynamo_supported():
            raise FlexUnavailable("FlexAttention needs torch.compile, which is not supported on this Python/platform")
        _COMPILED[key] = torch.compile(fn, backend=COMPILE_BACKEND, dynamic=True)
    return _COMPILED[key]


def _no_duck_shapes():
    import contextlib

    try:
        from torch.fx.experimental import _config
        if hasattr(_config, "use_duck_shape"):
            return _config.patch(use_duck_shape=False)
    except ImportError:
        pass
    return contextlib.nullcontext()


def _run_compiled(fn, *args):
    import torch._dynamo

    fn = _compiled(fn)
    # Past Dynamo's recompile limit it would run eagerly (an L x L score
    # matrix): make that an error instead.
    patch = {"fail_on_recompile_limit_hit": True} if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit") else {}
    try:
        # No duck sizing: a block count equal to the head count (static in
        # Flex) or to the 3 of FLUX's qkv view would be specialised, one
        # recompile per image size.
        with torch._dynamo.config.patch(**patch), _no_duck_shapes():
            return fn(*args)
    except FlexUnavailable:
        raise
    except Exception as exc:  # compile errors of any kind (Inductor, Triton, Dynamo)
        raise FlexUnavailable(f"compiling FlexAttention failed: {_one_line(exc)}") from exc


def _one_line(exc):
    """``Type: first line`` of the innermost cause (Dynamo wraps backend errors)."""
    seen = {id(exc)}
    while True:
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        exc = inner
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def clear_attention_flex(q, k, v, *, text_len, grid, window, pooled_k=None, pooled_v=None, scale):
    """CLEAR attention on validated inputs through FlexAttention: compiled on
    CUDA (``FlexUnavailable`` if that is impossible), eager elsewhere for
    small shapes. Output laid out so that ``out.transpose(1, 2)`` is contiguous."""
    import warnings

    B, H, L, _ = q.shape
    T = text_len
    grid = (int(grid[0]), int(grid[1]))
    if pooled_k is not None:  # the pooled keys are few; Flex takes one dtype (a fresh tensor, not a view,
        # so Dynamo has no view base to guard on)
        pooled_k, pooled_v = (p.to(q.dtype, copy=p._base is not None and p.dtype == q.dtype) for p in (pooled_k, pooled_v))
    compiled = q.device.type in COMPILE_DEVICES
    if not compiled:
        P = 0 if pooled_k is None else pooled_k.shape[2]
        scores = B * H * L * (L + P) * 4
        if scores > EAGER_MAX_SCORE_BYTES and not torch.compiler.is_compiling():
            raise FlexUnavailable(f"FlexAttention runs eagerly on {q.device.type} and would build "
                                  f"{scores / 2**30:.1f} GiB of scores; use the torch path")
    block_mask = clear_block_mask(T, grid, window, q.device)
    # A fill kernel, not a host-to-device copy: no sync, and legal while a CUDA graph records.
    scale = torch.full((), scale, dtype=torch.float32, device=q.device)
    fn, args = (_flex_local, (q, k, v, block_mask, scale)) if pooled_k is None else (
        _flex_pooled, (q, k, v, block_mask, pooled_k, pooled_v, T, scale))
    if compiled and not torch.compiler.is_compiling():  # inside a user's compile, its compiler takes Flex
        return _run_compiled(fn, *args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        warnings.filterwarnings("ignore", message=".*return_lse is deprecated")
        return fn(*args)
