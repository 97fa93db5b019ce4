"""The work model (kernels/tiling.py) against the kernel itself and against
brute force: the schedule visits every key a tile's discs need, and
``issued_pairs`` is exactly what the kernel multiplies."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import pytest
import torch

from comfyui_clear.kernels import tiling

DEFAULT = tiling.kernel_config(16, 8)
SMALL = dict(TILE_Y=4, TILE_X=4, KEY_Y=2, KEY_X=2, BLOCK_T=4, num_warps=4, num_stages=1)
TALL = dict(TILE_Y=8, TILE_X=8, KEY_Y=2, KEY_X=8, BLOCK_T=64, num_warps=4, num_stages=1)


@pytest.mark.parametrize("cfg", [DEFAULT, SMALL, TALL], ids=["8x8/8x8", "4x4/2x2", "8x8/2x8"])
@pytest.mark.parametrize("h,w,r", [(1, 1, 1), (5, 23, 3), (17, 9, 6), (20, 20, 9), (12, 30, 40)])
def test_schedule_covers_exactly_the_needed_blocks(cfg, h, w, r):
    """Per tile: every key inside some query's disc lies in a visited block,
    every visited block overlaps the grid and some disc, none twice."""
    offsets, ranges = tiling.tile_schedule((h, w), r, cfg)
    ty_, tx_, ky_, kx_ = cfg["TILE_Y"], cfg["TILE_X"], cfg["KEY_Y"], cfg["KEY_X"]
    tiles_x = math.ceil(w / tx_)
    assert len(ranges) == math.ceil(h / ty_) * tiles_x
    for t, (a, b) in enumerate(ranges):
        y0, x0 = (t // tiles_x) * ty_, (t % tiles_x) * tx_
        queries = [(y, x) for y in range(y0, min(y0 + ty_, h)) for x in range(x0, min(x0 + tx_, w))]
        blocks = [(y0 + oy * ky_, x0 + ox * kx_) for oy, ox in offsets[a:b].tolist()]
        assert len(set(blocks)) == len(blocks)
        visited = set()
        for by, bx in blocks:
            keys = [(y, x) for y in range(by, min(by + ky_, h)) for x in range(bx, min(bx + kx_, w))]
            assert keys and by >= 0 and bx >= 0, "block outside the grid"
            assert any((qy - y) ** 2 + (qx - x) ** 2 < r * r for qy, qx in queries for y, x in keys), "useless block"
            visited.update(keys)
        needed = {(y, x) for qy, qx in queries for y in range(h) for x in range(w)
                  if (qy - y) ** 2 + (qx - x) ** 2 < r * r}
        assert needed <= visited


@pytest.mark.parametrize("h,w,r,d,T", [(1, 1, 1, 1, 0), (7, 9, 3, 1, 5), (16, 16, 8, 4, 11), (9, 20, 30, 2, 3)])
def test_useful_pairs_brute_force(h, w, r, d, T):
    n = h * w
    disc = sum((y - yy) ** 2 + (x - xx) ** 2 < r * r for y in range(h) for x in range(w)
               for yy in range(h) for xx in range(w))
    P = math.ceil(h / d) * math.ceil(w / d) if d > 1 else 0
    assert tiling.useful_pairs(T, (h, w), r, d) == {"text_rows": T * (T + n), "image_text": n * T,
                                                   "local": disc, "pooled": n * P}


triton = pytest.importorskip("triton", reason="Triton is not installed (it comes with torch's Linux wheels)")


@pytest.fixture
def counted_products(monkeypatch):
    """Count the (query, key) products of every Q K^T the kernel issues, by
    wrapping its ``_scores`` helper (the interpreter resolves it at call time)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts products under TRITON_INTERPRET=1 only")
    from comfyui_clear.kernels import clear_triton

    count = [0]
    real = clear_triton._scores

    def counting(q, k, *args):
        count[0] += q.shape[0] * k.shape[1]
        return real(q, k, *args)

    monkeypatch.setattr(clear_triton, "_scores", counting)
    return count


@pytest.mark.parametrize("cfg", [None, TALL], ids=["default", "8x8/2x8"])
@pytest.mark.parametrize("B,H,T,h,w,r,d", [(1, 1, 0, 9, 10, 3, 1), (2, 1, 5, 11, 17, 6, 2), (1, 2, 70, 13, 9, 20, 4)])
def test_issued_pairs_match_the_kernel(counted_products, cfg, B, H, T, h, w, r, d):
    from comfyui_clear.kernels import clear_triton, pool_image_tokens

    D = 16
    q, k, v = (torch.randn(B, H, T + h * w, D) for _ in range(3))
    pooled = {}
    if d > 1:
        pooled = dict(pooled_k=pool_image_tokens(k[:, :, T:], (h, w), d),
                      pooled_v=pool_image_tokens(v[:, :, T:], (h, w), d))
    clear_triton.clear_attention_triton(q, k, v, text_len=T, grid=(h, w), window=r, scale=0.25, cfg=cfg,
                                        down_factor=d, **pooled)
    model = tiling.issued_pairs(T, (h, w), r, d, cfg=cfg, head_dim=D)
    image_rows = model["image_text"] + model["local"] + model["pooled"]  # text rows run through SDPA
    assert counted_products[0] == B * H * image_rows
