"""The Triton kernel under TRITON_INTERPRET=1 on the CPU against the dense
float64 oracle. The interpreter is slow: tiny shapes."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (it comes with torch's Linux wheels)")

from comfyui_clear.kernels import clear_attention, clear_triton  # noqa: E402
from oracle import clear_oracle, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture
def poisoned_output(monkeypatch):
    """Every output buffer the kernel module allocates starts as NaN, so an
    element the kernel fails to write shows up."""
    real = clear_triton._empty_output

    def nan_output(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(clear_triton, "_empty_output", nan_output)


def _run(B, H, D, T, h, w, r, d=1, dtype=torch.float32, sw_shape=None):
    L = T + h * w
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE).to(dtype) for _ in range(3))
    sw = None
    if d > 1:
        sw = torch.rand(d, d) * 2 / (d * d)
        if sw_shape == "published":
            sw = sw.reshape(1, 1, 1, d, 1, d, 1)
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, spatial_weight=sw,
                          backend="triton")
    assert out.shape == q.shape and out.dtype == dtype
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) output elements"
    err = rel_err(out.cpu(), clear_oracle(q.cpu(), k.cpu(), v.cpu(), T, (h, w), r, d, sw))
    assert err < TOL[dtype], err


# (batch, heads, head_dim, text_len, h, w, window, down_factor)
@pytest.mark.parametrize("B,H,D,T,h,w,r,d", [
    (1, 2, 16, 5, 6, 6, 3, 1),
    (2, 1, 32, 3, 5, 7, 2, 1),     # batch 2, odd non-square grid
    (1, 1, 16, 0, 9, 1, 4, 1),     # one column, no text
    (1, 1, 16, 7, 1, 9, 4, 1),     # one row, odd text
    (1, 1, 16, 2, 3, 3, 1, 1),     # r = 1: only itself
    (1, 1, 16, 4, 4, 5, 30, 1),    # r beyond the grid
    (1, 1, 16, 4, 11, 19, 5, 1),   # several tiles, ragged edges
    (1, 2, 16, 4, 8, 8, 3, 2),     # pooled keys, divisible
    (1, 1, 32, 0, 10, 7, 3, 4),    # pooled, not divisible, no text
    (1, 1, 64, 6, 5, 5, 2, 2),
    (1, 1, 16, 5, 19, 21, 6, 1),   # 3x3 tiles, ragged right/bottom tiles, interior tile
    (1, 1, 16, 3, 23, 17, 18, 4),  # r > 16 with pooled keys (2x8 key blocks), d not dividing the grid
    (1, 1, 16, 0, 7, 9, 3, 2),     # T = 0, d = 2 on an odd grid
    (1, 1, 16, 2, 17, 9, 40, 1),   # r larger than the grid, several tiles
])
def test_triton_matches_oracle_fp32(poisoned_output, B, H, D, T, h, w, r, d):
    _run(B, H, D, T, h, w, r, d, torch.float32, sw_shape="published" if d == 2 else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,D,T,h,w,r,d", [
    (1, 2, 16, 4, 10, 20, 5, 4),
    (2, 1, 32, 3, 7, 5, 2, 1),
])
def test_triton_matches_oracle_half(poisoned_output, dtype, B, H, D, T, h, w, r, d):
    _run(B, H, D, T, h, w, r, d, dtype)


SMALL_TILES = dict(TILE_Y=4, TILE_X=4, KEY_Y=2, KEY_X=2, BLOCK_T=4, num_warps=4, num_stages=1)


@pytest.mark.parametrize("h,w,r,d", [(13, 11, 1, 1), (13, 11, 3, 1), (9, 14, 5, 3), (7, 10, 30, 1)])
def test_many_tiles_small_config(poisoned_output, h, w, r, d):
    """Small tiles and key blocks make many border, corner and interior tiles
    (and partial text/pooled chunks) on a grid the interpreter runs quickly."""
    B, H, D, T = 1, 1, 16, 5
    q, k, v = (torch.randn(B, H, T + h * w, D, device=DEVICE) for _ in range(3))
    pooled = {}
    if d > 1:
        pooled = dict(pooled_k=clear_attention_pool(k, T, (h, w), d), pooled_v=clear_attention_pool(v, T, (h, w), d))
    out = clear_triton.clear_attention_triton(q, k, v, text_len=T, grid=(h, w), window=r, scale=D ** -0.5,
                                              cfg=SMALL_TILES, **pooled)
    assert not torch.isnan(out).any()
    assert rel_err(out.cpu(), clear_oracle(q.cpu(), k.cpu(), v.cpu(), T, (h, w), r, d)) < 1e-5


def clear_attention_pool(x, T, grid, d):
    from comfyui_clear.kernels import pool_image_tokens
    return pool_image_tokens(x[:, :, T:], grid, d)


@pytest.mark.parametrize("cfg", [None, SMALL_TILES], ids=["default", "small"])
@pytest.mark.parametrize("h,w,r", [(7, 9, 1), (7, 9, 3), (11, 10, 5), (6, 11, 20)])
def test_every_needed_key_is_visited(cfg, h, w, r):
    """q = 0 gives each query a uniform softmax over exactly the keys it
    visits; one-hot values turn the output into that key set. A skipped key
    block (or a mask off by one) shows up as a missing or extra key."""
    n = h * w
    D = 1 << (n - 1).bit_length()  # head_dim: a power of two >= the key count
    q = torch.zeros(1, 1, n, D, device=DEVICE)
    v = torch.eye(n, D, device=DEVICE)[None, None]
    out = clear_triton.clear_attention_triton(q, torch.randn_like(q), v, text_len=0, grid=(h, w), window=r,
                                              scale=1.0, cfg=cfg)[0, 0, :, :n].cpu()
    y, x = torch.arange(n) // w, torch.arange(n) % w
    disc = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2 < r * r
    assert torch.equal(out > 0, disc)
    assert torch.allclose(out.sum(1), torch.ones(n), atol=1e-5)


def test_schedule_without_column_clipping(monkeypatch):
    """Huge radii fall back to row-only clipping (blocks past the left/right
    edge are masked in the kernel): still exactly the disc."""
    from comfyui_clear.kernels import tiling

    monkeypatch.setattr(tiling, "SCHEDULE_BUDGET", 0)
    monkeypatch.setattr(clear_triton, "_SCHEDULES", clear_triton.DeviceCache(64))
    tiling._schedule.cache_clear()
    try:
        offsets, _ = tiling.tile_schedule((7, 9), 3, SMALL_TILES)
        assert (offsets[:, 1] < 0).any(), "no block past the left edge: the fallback did not run"
        test_every_needed_key_is_visited(SMALL_TILES, 7, 9, 3)
    finally:
        tiling._schedule.cache_clear()


def test_head_dim_128(poisoned_output):
    _run(1, 1, 128, 3, 3, 4, 2, 1, torch.float32)


def test_far_keys_do_not_leak(poisoned_output):
    """A huge value at a key outside the query's disc must not change its
    output; one just inside must."""
    D, h, w, r = 16, 12, 12, 3
    q = torch.randn(1, 1, h * w, D, device=DEVICE) * 0.1
    k = torch.randn_like(q) * 0.1
    v = torch.randn_like(q)
    base = clear_attention(q, k, v, text_len=0, grid=(h, w), window=r, backend="triton")
    centre = 5 * w + 5
    far = v.clone()
    far[0, 0, centre + 3] = 1e4           # distance exactly r: outside
    far[0, 0, centre + 2 * w + 3] = 1e4   # distance^2 = 13 >= 9: outside
    out = clear_attention(q, k, far, text_len=0, grid=(h, w), window=r, backend="triton")
    assert torch.equal(out[0, 0, centre], base[0, 0, centre])
    near = v.clone()
    near[0, 0, centre + 2 * w + 2] = 1e4  # distance^2 = 8 < 9: inside
    out = clear_attention(q, k, near, text_len=0, grid=(h, w), window=r, backend="triton")
    assert (out[0, 0, centre] - base[0, 0, centre]).abs().max() > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(poisoned_output, dtype):
    """q, k, v as (B, L, H, D) memory viewed as (B, H, L, D), as attention code
    often passes them; v a slice of a wider buffer."""
    B, H, D, T, h, w, r = 1, 2, 16, 3, 9, 10, 4
    L = T + h * w
    q, k = (torch.randn(B, L, H, D, device=DEVICE).to(dtype).transpose(1, 2) for _ in range(2))
    v = torch.randn(B, H, L, 2 * D, device=DEVICE).to(dtype)[..., D:]
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=2, backend="triton")
    ref = clear_oracle(q.cpu(), k.cpu(), v.cpu(), T, (h, w), r, 2)
    assert rel_err(out.cpu(), ref) < TOL[dtype]


def test_unsupported_head_dim_is_a_clear_error():
    q = torch.randn(1, 1, 4 + 4, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        clear_attention(q, q, q, text_len=4, grid=(2, 2), window=2, backend="triton")
