"""CLEAR attention for one worker of a row-band split (one image over P devices).

Each worker holds a band of image-token rows [y0, y1) plus every text token.
In one attention layer it needs, besides its own q, k, v:

- the k/v of the r-1 rows above and below its band (a disc of radius r,
  strictly less, reaches r-1 rows): the halo, taken from as many neighbours
  as it spans (a band thinner than r-1 rows takes it from several);
- with pooled keys (d > 1): every pooled key. The worker that holds the first
  row of a d x d block row pools that block row from its own rows plus, when
  the block row runs past its band, up to d-1 rows of the next bands (fetched
  with the halo), so every pooled key is computed exactly as on one device
  (same op, same rows, same edge padding); the pooled rows are all-gathered;
- for the text queries (which see every image key): each band's partial
  attention over its own image keys with its log-sum-exp, merged across the
  workers in a fixed order (so every worker gets the same text rows).

The image rows then run the public ``clear_attention`` on
``[text | halo-extended band]`` with the whole image's pooled keys passed in
(``pooled_k``/``pooled_v``) and the single-device scale; only the band's rows
are kept. The halo's query rows are zero and discarded (wasted work: 2(r-1)
rows per band), and so are that call's text rows (T rows over the band).

Workers meet twice per layer at an ``Exchange`` (an in-process, barrier-
synchronised mailbox; tensors move between devices with ``Tensor.to``, peer
copies on CUDA). It counts the bytes each worker reads from the others, which
tests hold against ``bench/band_volume.py``'s model.
"""

import threading

import torch

from . import clear_attention
from .reference import pool_image_tokens, pooled_grid

__all__ = ["band_rows", "band_needs", "Exchange", "clear_attention_band", "text_partial", "merge_partials"]


def band_rows(h, parts):
    """Split h token rows into ``parts`` contiguous bands (sizes differ by at most one)."""
    if not isinstance(parts, int) or parts < 1:
        raise ValueError(f"band_rows: parts must be an int >= 1, got {parts!r}")
    parts = min(parts, h)
    base, extra = divmod(h, parts)
    bands, y = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        bands.append((y, y + n))
        y += n
    return bands


def band_needs(band, h, window, down_factor):
    """Rows a band worker needs.

    Returns (fetch, owned): ``fetch`` = (lo, hi) image rows whose k/v it must
    hold (its band, the halo, and the rows completing the pooled block rows it
    owns); ``owned`` = (b0, b1) the pooled block rows it pools (those whose
    first row lies in its band; may be empty)."""
    y0, y1 = band
    r, d = window, down_factor
    lo, hi = max(0, y0 - (r - 1)), min(h, y1 + (r - 1))
    b0, b1 = -(-y0 // d), -(-y1 // d)
    if d > 1 and b1 > b0:
        hi = max(hi, min(h, b1 * d))
    return (lo, hi), (b0, b1)


class ExchangeAborted(RuntimeError):
    """Another worker failed; this one stops at the next exchange."""


class Exchange:
    """A barrier-synchronised mailbox for P worker threads in one process.

    Each worker posts tensors under its rank, meets the others at ``wait``,
    then reads what it needs with ``read`` (copied to its device; the bytes
    read from other ranks are counted in ``received[rank]``)."""

    def __init__(self, parts, timeout=None):
        self.parts = parts
        self._slots = [{} for _ in range(parts)]
        self._barrier = threading.Barrier(parts, timeout=timeout)
        self.received = [0] * parts
        self.calls = [0] * parts  # attention layers each worker ran

    def post(self, rank, **tensors):
        for t in tensors.values():
            if t.is_cuda:  # the readers copy from this device on their own streams
                torch.cuda.current_stream(t.device).synchronize()
                break
        self._slots[rank].update(tensors)

    def wait(self):
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise ExchangeAborted("CLEAR Multi-GPU Split: another band worker failed") from None

    def abort(self):
        self._barrier.abort()

    def read(self, rank, source, name, index=None, device=None):
        """``source``'s tensor ``name`` (sliced by ``index`` along dim 2), on ``device``."""
        t = self._slots[source][name]
        if index is not None:
            t = t[:, :, index]
        if source != rank:
            self.received[rank] += t.numel() * t.element_size()
        return t.to(device) if device is not None else t


def _sdpa_with_lse(q, k, v, scale):
    """PyTorch's fused attention that also returns the log-sum-exp (flash
    attention on CUDA, its CPU version on the CPU)."""
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    elif q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    else:
        raise NotImplementedError(f"no fused attention with log-sum-exp on {q.device.type}")
    return out, lse[..., :q.shape[2]]


_FUSED = {}  # (device, dtype, head_dim) -> whether the fused op passed its first-use check
_FUSED_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _fused_ok(q):
    """Whether ``_sdpa_with_lse`` runs here and matches the float32 loop on a
    small problem (checked once per device, dtype and head_dim)."""
    key = (str(q.device), q.dtype, q.shape[-1])
    if key not in _FUSED:
        ok = False
        try:
            gen = torch.Generator().manual_seed(0)
            a, b, c = (torch.randn(1, 2, n, q.shape[-1], generator=gen).to(q.device, q.dtype) for n in (7, 45, 45))
            want = _text_partial_loop(a, [b], [c], 0.3)
            out, lse = _sdpa_with_lse(a, b, c, 0.3)
            ok = bool(((out.double() - want[0].double()).norm() / want[0].double().norm()).item()
                      < _FUSED_TOL[q.dtype]
                      and (lse.double() - want[1].double()).abs().max().item() < 100 * _FUSED_TOL[q.dtype])
        except Exception:  # noqa: BLE001 - op missing or unsupported here: the loop runs
            ok = False
        _FUSED[key] = ok
    return _FUSED[key]


def text_partial(q_text, keys, values, scale, fused=None):
    """Text queries over some keys: (normalised output, log-sum-exp), float32
    (float64 for float64 input).

    q_text (B, H, T, D); keys, values lists of (B, H, n, D) (concatenated
    logically). PyTorch's fused attention per key group where it passed its
    first-use check (``fused=None``), else a float32 loop."""
    if fused is None:
        fused = _fused_ok(q_text)
    if not fused:
        return _text_partial_loop(q_text, keys, values, scale)
    dtype = torch.float64 if q_text.dtype == torch.float64 else torch.float32
    parts = []
    try:
        for k, v in zip(keys, values):
            out, lse = _sdpa_with_lse(q_text, k, v, scale)
            parts.append((out.to(dtype), lse.to(dtype)))
    except RuntimeError:  # e.g. a layout or size the check did not cover: the loop from now on
        _FUSED[(str(q_text.device), q_text.dtype, q_text.shape[-1])] = False
        return _text_partial_loop(q_text, keys, values, scale)
    return merge_partials(parts, with_lse=True) if len(parts) > 1 else parts[0]


def _text_partial_loop(q_text, keys, values, scale, key_chunk=8192):
    """``text_partial`` in plain torch: online softmax over key chunks, one head
    at a time, so memory stays at T x key_chunk scores."""
    B, H, T, D = q_text.shape
    dtype = torch.float64 if q_text.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, H, T, D, dtype=dtype, device=q_text.device)
    lse = torch.full((B, H, T), float("-inf"), dtype=dtype, device=q_text.device)
    for hd in range(H):
        q = q_text[:, hd].to(dtype)
        m = torch.full((B, T, 1), float("-inf"), dtype=dtype, device=q.device)
        l = torch.zeros(B, T, 1, dtype=dtype, device=q.device)
        acc = torch.zeros(B, T, D, dtype=dtype, device=q.device)
        for k, v in zip(keys, values):
            for c0 in range(0, k.shape[2], key_chunk):
                kc = k[:, hd, c0:c0 + key_chunk].to(dtype)
                s = (q @ kc.transpose(-1, -2)).mul_(scale)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                alpha = torch.exp(m - m_new)
                s.sub_(m_new).exp_()
                l = l * alpha + s.sum(-1, keepdim=True)
                acc = acc * alpha + s @ v[:, hd, c0:c0 + key_chunk].to(dtype)
                m = m_new
        seen = l > 0
        out[:, hd] = torch.where(seen, acc / l.clamp_min(torch.finfo(dtype).tiny), 0)
        lse[:, hd] = torch.where(seen, m + torch.log(l.clamp_min(torch.finfo(dtype).tiny)), float("-inf"))[..., 0]
    return out, lse


def merge_partials(parts, with_lse=False):
    """Merge [(out, lse), ...] of disjoint key sets into the attention over their
    union (and its log-sum-exp with ``with_lse``)."""
    lse = torch.stack([p[1] for p in parts])
    top = lse.amax(0)
    top = torch.where(torch.isfinite(top), top, 0)  # rows no part saw: weights 0, not NaN
    weights = torch.exp(lse - top)  # (P, B, H, T)
    total = weights.sum(0)
    out = sum(w[..., None] * p[0] for w, p in zip(weights, parts))
    out = out / total[..., None]
    return (out, top + torch.log(total)) if with_lse else out


def clear_attention_band(q, k, v, *, rank, bands, exchange, text_len, grid, window, down_factor=1,
                         spatial_weight=None, scale):
    """CLEAR attention for band ``bands[rank]`` of the full ``grid``.

    q, k, v: (B, H, text_len + rows*w, D) for this worker's rows, text first.
    Every worker calls this once per attention layer, in the same order.
    Returns what ``clear_attention`` on the whole sequence returns for these
    rows (text rows included), within floating-point tolerance."""
    h, w = grid
    T = text_len
    y0, y1 = bands[rank]
    if q.shape[2] != T + (y1 - y0) * w:
        raise ValueError(f"clear_attention_band: worker {rank} holds rows {y0}..{y1} of a {h}x{w} grid "
                         f"with {T} text tokens, so {T + (y1 - y0) * w} tokens, but got {q.shape[2]}")
    device = q.device
    d = down_factor
    (lo, hi), (b0, b1) = band_needs((y0, y1), h, window, d)
    exchange.calls[rank] += 1

    # Phase 1: post this band's image k, v; fetch halo (and pooling) rows.
    exchange.post(rank, k=k[:, :, T:], v=v[:, :, T:])
    exchange.wait()
    k_rows, v_rows = [], []
    for src, (s0, s1) in enumerate(bands):
        a, b = max(lo, s0), min(hi, s1)
        if a >= b:
            continue
        idx = slice((a - s0) * w, (b - s0) * w)
        k_rows.append(exchange.read(rank, src, "k", idx, device))
        v_rows.append(exchange.read(rank, src, "v", idx, device))
    k_ext, v_ext = torch.cat(k_rows, 2), torch.cat(v_rows, 2)  # rows lo..hi

    # Pooled rows this worker owns, from its fetched rows (exactly the single-device op).
    pooled = {}
    if d > 1 and b1 > b0:
        p0, p1 = b0 * d, min(h, b1 * d)
        sub = slice((p0 - lo) * w, (p1 - lo) * w)
        pooled = dict(pk=pool_image_tokens(k_ext[:, :, sub], (p1 - p0, w), d, spatial_weight),
                      pv=pool_image_tokens(v_ext[:, :, sub], (p1 - p0, w), d, spatial_weight))

    # Text queries over this band's image keys (rank 0 adds the text keys).
    keys, values = [k[:, :, T:]], [v[:, :, T:]]
    if rank == 0 and T > 0:
        keys.insert(0, k[:, :, :T])
        values.insert(0, v[:, :, :T])
    t_out, t_lse = text_partial(q[:, :, :T], keys, values, scale) if T > 0 else (None, None)

    # Phase 2: post pooled rows and text partials; everyone reads all of them.
    exchange.post(rank, **pooled, **({} if T == 0 else dict(to=t_out, tl=t_lse)))
    exchange.wait()
    pk = pv = None
    if d > 1:
        owners = [src for src, band in enumerate(bands) if (lambda o: o[1] > o[0])(band_needs(band, h, window, d)[1])]
        pk = torch.cat([exchange.read(rank, s, "pk", device=device) for s in owners], 2)
        pv = torch.cat([exchange.read(rank, s, "pv", device=device) for s in owners], 2)
        assert pk.shape[2] == pooled_grid(grid, d)[0] * pooled_grid(grid, d)[1]
    out = torch.empty_like(q)
    if T > 0:
        parts = [(exchange.read(rank, s, "to", device=device), exchange.read(rank, s, "tl", device=device))
                 for s in range(len(bands))]
        out[:, :, :T] = merge_partials(parts).to(q.dtype)

    # Image rows: [text | halo-extended band] with the whole image's pooled keys.
    n_ext = (hi - lo) * w
    q_ext = q.new_zeros(q.shape[0], q.shape[1], n_ext, q.shape[3])
    q_ext[:, :, (y0 - lo) * w:(y1 - lo) * w] = q[:, :, T:]
    a_hi = min(h, y1 + window - 1)  # attention needs rows lo..a_hi only (pooling may have fetched more)
    n_att = (a_hi - lo) * w
    res = clear_attention(torch.cat([q[:, :, :T], q_ext[:, :, :n_att]], 2),
                          torch.cat([k[:, :, :T], k_ext[:, :, :n_att]], 2),
                          torch.cat([v[:, :, :T], v_ext[:, :, :n_att]], 2),
                          text_len=T, grid=(a_hi - lo, w), window=window, down_factor=d, pooled_k=pk,
                          pooled_v=pv, scale=scale)
    start = T + (y0 - lo) * w
    out[:, :, T:] = res[:, :, start:start + (y1 - y0) * w]
    return out
