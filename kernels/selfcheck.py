"""First-use self-check of a CLEAR attention backend (docs/selfcheck.md).

``check_backend(run, ...)`` runs one backend on a small problem shaped like
the real call (batch 2, text longer than one 64-key chunk, an odd grid with
border, corner and interior tiles, ComfyUI's strided q/k/v layout) and
compares it per row with the exact torch path, in two passes:

1. Coverage (exact at any precision). q = k = 0, so every key a query row
   visits gets the same softmax weight; the values are one-hot codes that
   name small groups of keys ("lumps" of g x g image tokens, 8 text tokens),
   spread over heads and channels so that the lumps one row can see have
   distinct (head, channel) slots. A row's output in a slot is then
   (visited keys of that lump) / (visited keys), computed exactly in float32
   and rounded once to the output dtype. A missed or extra key changes its
   slot by at least 1/g^2 of that slot's value (a whole lump's slot goes
   to 0); a correct backend is off by one rounding (2^-8 relative in
   bfloat16). Every element must match within 3 units of roundoff of itself.
2. Random inputs: per-row maximum error over the row's largest reference
   value, < 1e-4 (float32), 1e-2 (float16), 4e-2 (bfloat16).
"""

import math

import torch

from .reference import clear_attention_torch, pool_image_tokens

# Text tokens: more than one 64-key chunk (the kernels' BLOCK_T), not a
# multiple of 8.
TEXT_LEN = 77
BATCH = 2
# The kernels' query-tile lattice (8 x 8 tiles; key blocks 8 x 8 or 2 x 8).
LATTICE = 8
TEXT_LUMP = 8  # text keys that share one coverage slot
MIN_HEADS, MAX_HEADS = 2, 4
# Largest image the check grows to for two pooled chunks (tokens).
MAX_POOL_TOKENS = 8192
# Unit roundoff of the output dtype (one rounding of an exact value).
_UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# Random pass: per-row max |out - ref| / max |ref row|. Half precision: the
# output rounding plus the softmax weights rounded to the dtype before P @ V;
# over a row of random values these add up to a few u of the row's scale.
# Measured for the Triton kernel under the CPU interpreter (which truncates to
# bfloat16 instead of rounding): 1.1e-2 bf16, 6.5e-4 fp16, 8e-7 fp32. What
# this pass is for (a wrong scale, wrong Q.K or softmax) is off by O(1).
RANDOM_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _round_up(n, mod, rem):
    """Smallest value >= n that is rem modulo mod."""
    return n + (rem - n) % mod


def check_grid(window, down_factor):
    """(h, w) of the check problem for this radius and down factor.

    r <= 32: a grid where one 8 x 8 tile sees its whole disc (an unclipped
    interior tile) next to border and corner tiles, with ragged last tiles.
    r > 32: r + 19 rows (discs clip at the top and bottom) by a few tiles,
    wide enough that the disc's rim crosses the grid within its last rows.
    Widened until there are two pooled chunks (> 64 pooled keys), up to
    MAX_POOL_TOKENS tokens."""
    r, d = window, down_factor
    reach = r - 1
    if r <= 32:
        h = max(19, _round_up(LATTICE * -(-reach // LATTICE) + LATTICE + reach, LATTICE, 3))
        w = h + 2
    else:
        h = _round_up(r + 19, LATTICE, 3)
        w = max(21, _round_up(math.isqrt(4 * r) + 5, LATTICE, 5))
    if d > 1 and (-(-h // d)) * (-(-w // d)) <= 64:
        wide = _round_up(d * (64 // -(-h // d) + 1), LATTICE, 5)  # columns for 65+ pooled keys
        if h * wide <= MAX_POOL_TOKENS:
            w = max(w, wide)
    return h, w


def coverage_plan(head_dim, window, grid, text_len=TEXT_LEN):
    """(g, heads, (my, mx)): lump side g, head count and lump torus for the
    coverage pass.

    A row's disc spans at most ceil((2r - 1)/g) + 1 lumps per axis; lumps get
    ids on a torus of that size (so ids are distinct within any disc), text
    keys one id per TEXT_LUMP. The smallest g whose ids fit heads * head_dim
    slots with heads <= MAX_HEADS wins (each slot then holds at most g^2 keys
    a row can see); past that, g = 8 and ids wrap (slots are shared)."""
    h, w = grid
    r = min(window, h + w)
    text_ids = -(-text_len // TEXT_LUMP)
    for g in (1, 2, 4, 8):
        m = -(-(2 * r - 1) // g) + 1
        my, mx = min(m, -(-h // g)), min(m, -(-w // g))
        ids = my * mx + text_ids
        heads = max(MIN_HEADS, -(-ids // head_dim))
        if heads <= MAX_HEADS or g == 8:
            return g, min(heads, MAX_HEADS), (my, mx)
    raise AssertionError("unreachable")


def _coverage_values(B, H, D, T, grid, g, torus, device="cpu"):
    """One-hot codes (B, H, L, D) in float32: token -> one (head, channel) slot
    per batch (batches use shifted slots, so a batch mix-up shows)."""
    h, w = grid
    my, mx = torus
    y = torch.arange(h, device=device).repeat_interleave(w)
    x = torch.arange(w, device=device).repeat(h)
    image_ids = (y // g % my) * mx + (x // g % mx)
    text_ids = my * mx + torch.arange(T, device=device) // TEXT_LUMP
    ids = torch.cat([text_ids, image_ids])
    slots = H * D
    v = torch.zeros(B, H, T + h * w, D, device=device)
    tokens = torch.arange(T + h * w, device=device)
    for b in range(B):
        slot = (ids + b * (slots // 2 + 1)) % slots
        v[b, slot % H, tokens, slot // H] = 1.0
    return v


def _comfy_layout(q, k, v, dtype, device):
    """q, k, v (B, H, L, D) in the layouts ComfyUI hands to attention: q
    contiguous (after RoPE), k a (B, L, H, D) tensor viewed as (B, H, L, D)
    (the override's reshape), v a slice of a single block's linear1 output
    viewed through ``view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)``
    (comfy/ldm/flux/layers.py); three different stride sets."""
    B, H, L, D = q.shape
    qq = q.to(device=device, dtype=dtype).contiguous()
    kk = torch.empty(B, L, H, D, device=device, dtype=dtype).transpose(1, 2)
    kk.copy_(k)
    # linear1's output: [q | k | v | mlp] along the last dim (mlp: one more H*D here)
    linear1 = torch.zeros(B, L, 4 * H * D, device=device, dtype=dtype)
    vv = linear1[..., :3 * H * D].view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)[2]
    vv.copy_(v)
    return qq, kk, vv


def _pooled(k, v, T, grid, down_factor, dtype):
    """Pooled keys/values as the caller computes them, rounded to ``dtype``
    (what every backend's dots see), so the reference gets the same numbers."""
    if down_factor == 1:
        return None, None
    return tuple(pool_image_tokens(x[:, :, T:], grid, down_factor).to(dtype).float() for x in (k, v))


def _reason(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _run(run, q, k, v, T, grid, window, down_factor, pk, pv, scale, device):
    """(output, None) or (None, reason) when ``run`` raises."""
    try:
        out = run(q, k, v, T, grid, window, down_factor, pk, pv, scale)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a launch error surfaces here, not later in the user's step
    except Exception as exc:  # compile or launch failure: anything the backend raised
        return None, _reason(exc)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q.shape):
        return None, f"misshapen output {tuple(getattr(out, 'shape', ()))} (expected {tuple(q.shape)})"
    if out.device != q.device:
        return None, f"output on {out.device}, inputs on {q.device}"
    return out, None


def _reference(q, k, v, T, grid, window, pk, pv, scale):
    """The exact torch path in float32 on the same (dtype-rounded) inputs."""
    return clear_attention_torch(q.float(), k.float(), v.float(), text_len=T, grid=grid, window=window,
                                 pooled_k=pk, pooled_v=pv, scale=scale)


def _where(index, shape, T, grid):
    """'batch b, head h, <row>' for a flat index into (B, H, L)."""
    _, H, L = shape
    b, rest = divmod(int(index), H * L)
    hd, row = divmod(rest, L)
    if row < T:
        return f"batch {b}, head {hd}, text row {row}"
    y, x = divmod(row - T, grid[1])
    return f"batch {b}, head {hd}, image row (y={y}, x={x}) in 8x8 tile ({y // LATTICE}, {x // LATTICE})"


class _Problem:
    """Shapes of the check problem for one (head_dim, window, down_factor)."""

    def __init__(self, device, dtype, head_dim, window, down_factor):
        self.device, self.dtype, self.D = torch.device(device), dtype, head_dim
        self.window, self.down_factor = window, down_factor
        self.T, self.grid = TEXT_LEN, check_grid(window, down_factor)
        self.L = self.T + self.grid[0] * self.grid[1]
        self.g, self.heads, self.torus = coverage_plan(head_dim, window, self.grid, self.T)
        self.scale = head_dim ** -0.5

    def run(self, run, q, k, v):
        """(output, reference, None) or (None, None, reason)."""
        try:
            pk, pv = _pooled(k, v, self.T, self.grid, self.down_factor, self.dtype)
        except Exception as exc:  # e.g. out of memory: never fail the user's step from here
            return None, None, f"pooling the check's keys failed: {_reason(exc)}"
        args = (self.T, self.grid, self.window, self.down_factor, pk, pv, self.scale)
        out, why = _run(run, q, k, v, *args, self.device)
        if why is None and not torch.isfinite(out).all():
            why = "non-finite output"
        if why:
            return None, None, why
        try:
            ref = _reference(q, k, v, self.T, self.grid, self.window, pk, pv, self.scale)
        except Exception as exc:  # e.g. out of memory: distrust the backend rather than fail the user's step
            return None, None, f"the torch-path reference failed: {_reason(exc)}"
        return out.float(), ref, None


def coverage_ratios(run, *, device, dtype, head_dim, window, down_factor):
    """The coverage pass: ((B, H, L) worst |out - ref| / tolerance per row,
    None) or (None, reason) when ``run`` raises or returns non-finite values.
    A row passes when its ratio is <= 1."""
    p = _Problem(device, dtype, head_dim, window, down_factor)
    zeros = torch.zeros(BATCH, p.heads, p.L, p.D, device=p.device)
    values = _coverage_values(BATCH, p.heads, p.D, p.T, p.grid, p.g, p.torus, p.device)
    out, ref, why = p.run(run, *_comfy_layout(zeros, zeros, values, dtype, p.device))
    if why:
        return None, why
    # The reference is exact to float32; a correct backend rounds the exact
    # value once to its dtype: <= u relative to nearest, < 2u if it truncates
    # (Triton's CPU interpreter does for bfloat16). 3u leaves room for both
    # and float32 summation noise, and stays far below what one missed or
    # extra key does to its slot (>= 1/16 of the slot's value for g <= 4).
    tol = 3 * _UNIT[dtype] * ref.abs() + 1e-6 * ref.abs().amax(-1, keepdim=True)
    return ((out - ref).abs() / tol).amax(-1), None


def check_backend(run, *, device, dtype, head_dim, window, down_factor):
    """None if ``run`` computes CLEAR attention right for this device, dtype,
    head_dim, window and down factor, else a one-line reason.

    ``run(q, k, v, text_len, grid, window, down_factor, pooled_k, pooled_v,
    scale)`` runs one backend on validated inputs and returns (B, H, L, D);
    pooled_k/pooled_v are None when down_factor == 1. Exceptions from ``run``
    (compile or launch errors) become the reason. On CUDA the check runs
    under ``torch.cuda.device(device)`` (Triton launches on the current device)."""
    from . import device_guard

    device = torch.device(device)
    with device_guard(device):
        try:
            return _check(run, device, dtype, head_dim, window, down_factor)
        except Exception as exc:  # e.g. a CUDA context broken by the backend: a reason, never the user's step
            return f"the check failed: {_reason(exc)}"


def _check(run, device, dtype, head_dim, window, down_factor):
    p = _Problem(device, dtype, head_dim, window, down_factor)
    h, w = p.grid
    # 1. coverage: zero q and k, one-hot values
    ratio, why = coverage_ratios(run, device=device, dtype=dtype, head_dim=head_dim, window=window,
                                 down_factor=down_factor)
    if why:
        return f"{why} (coverage pass)" if why == "non-finite output" else why
    if not ratio.max() <= 1:
        worst = int(ratio.argmax())
        return (f"visits the wrong keys (coverage pass: {_where(worst, ratio.shape, p.T, p.grid)} is off by "
                f"{ratio.max().item():.1f}x its tolerance; grid {h}x{w}, text {p.T})")
    del ratio

    # 2. random inputs: per-row relative error (two heads suffice here)
    gen = torch.Generator(device=p.device).manual_seed(0)
    shape = (BATCH, MIN_HEADS, p.L, p.D)
    out, ref, why = p.run(run, *_comfy_layout(*(torch.randn(shape, generator=gen, device=p.device) for _ in range(3)),
                                              dtype=dtype, device=p.device))
    if why:
        return f"{why} (random pass)" if why == "non-finite output" else why
    row_err = (out - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-30)
    if not row_err.max() <= RANDOM_TOL[dtype]:
        worst = int(row_err.argmax())
        return (f"wrong result (random pass: {_where(worst, row_err.shape, p.T, p.grid)} has relative error "
                f"{row_err.max().item():.2e} > {RANDOM_TOL[dtype]:.0e} vs the torch path)")
    return None


def check_cost(head_dim, window, down_factor):
    """What one check costs: shapes and multiply-add FLOPs (both passes) of
    the backend (useful pairs only) and of the torch-path reference (what it
    issues), and the bytes of q, k, v and pooled tensors per pass (2-byte dtypes)."""
    from .tiling import pooled_count, useful_pairs

    grid = check_grid(window, down_factor)
    h, w = grid
    T, B, D = TEXT_LEN, BATCH, head_dim
    _, H, _ = coverage_plan(D, window, grid, T)
    L = T + h * w
    P = pooled_count(h, w, down_factor)
    pairs = sum(useful_pairs(T, grid, window, down_factor).values())
    # the torch path: 16 x 16 query tiles over the key rectangle they reach
    r = min(window, h + w)
    ty, tx = min(16, h), min(16, w)
    wy, wx = min(ty + 2 * (r - 1), h), min(tx + 2 * (r - 1), w)
    tiles = len({min(y, h - ty) for y in range(0, h, ty)}) * len({min(x, w - tx) for x in range(0, w, tx)})
    ref_pairs = T * L + tiles * ty * tx * (wy * wx + T + P)
    flops = lambda n: 2 * 2 * n * D * B * (H + MIN_HEADS)  # QK^T and PV, 2 FLOPs per MAC; both passes
    return dict(grid=grid, text_len=T, batch=B, heads=H, tokens=L, pooled=P,
                backend_flops=flops(pairs), reference_flops=flops(ref_pairs),
                input_bytes=B * (H + MIN_HEADS) * (3 * L + 2 * P) * D * 2)
