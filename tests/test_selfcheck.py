"""The first-use self-check (kernels/selfcheck.py): it passes correct backends
and catches every dropped key block of the Triton kernel (mutations under
TRITON_INTERPRET=1 on the CPU), a dropped text or pooled chunk, exceptions,
NaN and a wrongly scaled row."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import math
import random

import numpy as np
import pytest
import torch

from comfyui_clear.kernels import selfcheck
from comfyui_clear.kernels.reference import clear_attention_torch, pool_image_tokens
from comfyui_clear.kernels.selfcheck import check_backend, check_grid, coverage_plan, coverage_ratios

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster than several competing ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_run(q, k, v, T, grid, window, down_factor, pk, pv, scale):
    return clear_attention_torch(q, k, v, text_len=T, grid=grid, window=window, pooled_k=pk, pooled_v=pv,
                                 scale=scale)


def check(run, dtype=torch.bfloat16, head_dim=16, window=3, down_factor=1):
    return check_backend(run, device="cpu", dtype=dtype, head_dim=head_dim, window=window,
                         down_factor=down_factor)


# --- the problem it builds ---------------------------------------------------

@pytest.mark.parametrize("r,d", [(1, 1), (3, 1), (8, 4), (16, 4), (32, 1), (33, 1), (64, 2), (256, 4), (5, 16)])
def test_problem_shape(r, d):
    """Odd grid with ragged last tiles; r <= 32 has an interior 8x8 tile whose
    whole disc fits; discs clip (the radius is below the grid's diagonal);
    two pooled chunks where the token cap allows."""
    h, w = check_grid(r, d)
    assert h % 8 and w % 8 and h >= 19 and w >= 21
    assert r * r < (h - 1) ** 2 + (w - 1) ** 2, "the disc covers the whole grid: the mask is not exercised"
    if r <= 32:
        tile = math.ceil((r - 1) / 8)  # a tile whose disc reach stays inside the grid
        assert tile * 8 - (r - 1) >= 0 and tile * 8 + 7 + (r - 1) <= h - 1 and tile * 8 + 7 + (r - 1) <= w - 1
    if d > 1:  # two pooled chunks, unless that takes more than MAX_POOL_TOKENS tokens
        rows = math.ceil(h / d)
        assert rows * math.ceil(w / d) > 64 or h * d * (64 // rows + 1) > selfcheck.MAX_POOL_TOKENS
    assert selfcheck.TEXT_LEN > 64


def test_layout_is_comfyuis():
    """q contiguous, k a (B, L, H, D) view, v a slice of a wider linear1 output:
    three stride sets."""
    x = torch.randn(2, 3, 10, 16)
    q, k, v = selfcheck._comfy_layout(x, x + 1, x + 2, torch.float16, torch.device("cpu"))
    assert q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    assert len({q.stride(), k.stride(), v.stride()}) == 3
    assert v.stride() == (10 * 4 * 3 * 16, 16, 4 * 3 * 16, 1)
    for t, want in ((q, x), (k, x + 1), (v, x + 2)):
        assert torch.equal(t.float(), want.half().float())


# --- correct and broken runs -------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,r,d", [(16, 3, 1), (32, 5, 2), (16, 2, 3), (64, 8, 4)])
def test_torch_path_passes(dtype, D, r, d):
    assert check(torch_run, dtype, D, r, d) is None


def test_raising_run_is_the_reason():
    def run(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
    assert check(run) == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_nan_is_caught():
    assert "non-finite" in check(lambda *a: torch.full_like(a[0], float("nan")))


def test_wrong_shape_is_caught():
    assert "misshapen" in check(lambda q, *a: q[:, :, 1:])


def test_output_on_another_device_is_caught():
    assert "output on meta" in check(lambda q, *a: torch.empty_like(q, device="meta"))


@pytest.mark.parametrize("dtype,factor", [(torch.float32, 1 + 1e-5), (torch.float16, 1.01),
                                          (torch.bfloat16, 1.05)])
def test_one_scaled_row_is_caught(dtype, factor):
    """A correct result with one image row scaled: the reason names that row."""
    h, w = check_grid(3, 1)
    row = selfcheck.TEXT_LEN + (h - 1) * w + 5  # bottom row, x = 5: tile (2, 0)

    def run(*args):
        out = torch_run(*args)
        out[1, 1, row] *= factor
        return out

    why = check(run, dtype)
    assert why and f"batch 1, head 1, image row (y={h - 1}, x=5) in 8x8 tile (2, 0)" in why, why


def test_scaled_row_in_random_pass_only():
    """A backend right on the coverage pass but wrong on random inputs (e.g. a
    wrong scale on large logits) fails the random pass."""
    def run(q, k, v, T, grid, window, d, pk, pv, scale):
        return torch_run(q, k, v, T, grid, window, d, pk, pv, scale * 1.1)

    why = check(run, torch.bfloat16)
    assert why and "random pass" in why, why


# --- the coverage pass cannot miss a key: the design, analytically -----------

@pytest.mark.parametrize("D,r,d,dtype", [(16, 3, 1, torch.bfloat16), (32, 5, 2, torch.bfloat16),
                                         (16, 6, 4, torch.float16), (128, 16, 4, torch.bfloat16),
                                         (128, 32, 1, torch.bfloat16)])
def test_any_missed_or_extra_image_key_exceeds_the_tolerance(D, r, d, dtype):
    """With q = k = 0 a row's output is the mean of the values it visits. For
    image rows, take the exact outputs of the check problem and the outputs
    with one visible key removed (or one invisible image key added): every such
    change must exceed the tolerance by a margin that also covers the
    backend's own rounding (2u relative)."""
    p = selfcheck._Problem("cpu", dtype, D, r, d)
    T, (h, w), H = p.T, p.grid, p.heads
    v = selfcheck._coverage_values(selfcheck.BATCH, H, D, T, p.grid, p.g, p.torus).to(dtype).double()
    vals = v[:, :, T:]  # image keys (B, H, N, D)
    if d > 1:
        pooled = pool_image_tokens(vals.float(), p.grid, d).to(dtype).double()
    y, x = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    gen = torch.Generator().manual_seed(0)
    # border, corner and a sample of other rows (the big grids: a few, to stay fast)
    sample = 120 if h * w < 1500 else 12
    corners = torch.tensor([0, w - 1, (h - 1) * w, h * w - 1, (h // 2) * w + w // 2])
    rows = torch.cat([corners, torch.randperm(h * w, generator=gen)[:sample]])
    u = selfcheck._UNIT[dtype]
    worst = math.inf
    for i in rows.tolist():
        disc = ((y - y[i]) ** 2 + (x - x[i]) ** 2 < r * r)
        total = v[:, :, :T].sum(2) + vals[:, :, disc].sum(2) + (pooled.sum(2) if d > 1 else 0)
        n = T + int(disc.sum()) + (pooled.shape[2] if d > 1 else 0)
        out = total / n  # (B, H, D): the exact row
        tol = 3 * u * out.abs() + 1e-6 * out.abs().amax(-1, keepdim=True)
        sign = torch.where(disc, -1.0, 1.0).double()  # visible: removed; invisible: added
        # out' = (total -/+ v_j) / (n -/+ 1) for every image key j: (B, H, N, D)
        changed = (total[:, :, None] + sign[:, None] * vals) / (n + sign)[:, None]
        # the change in its (head, channel) slot must beat tol + the backend's rounding of out'
        excess = ((changed - out[:, :, None]).abs() - 2 * u * changed.abs()) / tol[:, :, None]
        # any head/channel of any batch may show it: best per key, worst over keys and batches
        worst = min(worst, excess.amax(dim=(1, 3)).min().item())
    print(f"worst single-key change / tolerance: {worst:.2f}")
    assert worst > 1.5, f"a single key change is only {worst:.2f}x the tolerance"


def test_plan_fits_published_settings_with_small_lumps():
    """Every published setting (r 8/16/32, d 1/4) at head_dim 128 gets lumps of
    at most 4x4 (a missed key moves its slot by >= 1/16) within 4 heads."""
    for r, d in [(8, 1), (16, 1), (32, 1), (16, 4), (8, 4)]:
        g, heads, _ = coverage_plan(128, r, check_grid(r, d))
        assert g <= 4 and heads <= 4, (r, d, g, heads)


# --- mutations of the Triton kernel under the interpreter --------------------

triton_needed = pytest.mark.skipif(not INTERPRET, reason="mutation tests run the kernel under TRITON_INTERPRET=1")


def _triton_run(cfg=None):
    from comfyui_clear.kernels.clear_triton import clear_attention_triton

    def run(q, k, v, T, grid, window, down_factor, pk, pv, scale):
        return clear_attention_triton(q, k, v, text_len=T, grid=grid, window=window, pooled_k=pk, pooled_v=pv,
                                      scale=scale, down_factor=down_factor, cfg=cfg)
    return run


def _drop_blocks(monkeypatch, drops):
    """Schedule with entry drops[t] removed from tile t's range (tiles listed
    in ``drops`` only); tile lists are rebuilt per tile, so sharing is undone."""
    from comfyui_clear.kernels import clear_triton, tiling

    def schedule(grid, window, cfg, device):
        offsets, ranges = tiling.tile_schedule(grid, window, cfg)
        lists, new_ranges, start = [], [], 0
        for t, (a, b) in enumerate(ranges.tolist()):
            keep = offsets[a:b]
            if t in drops:
                keep = np.delete(keep, drops[t], axis=0)
            lists.append(keep)
            new_ranges.append((start, start + len(keep)))
            start += len(keep)
        return (torch.from_numpy(np.concatenate(lists).astype(np.int32)).to(device),
                torch.tensor(new_ranges, dtype=torch.int32, device=device))

    monkeypatch.setattr(clear_triton, "_device_schedule", schedule)


def _tile_ratios(ratio, T, grid, tile=8):
    """Worst coverage ratio per 8x8 image tile: {(ty, tx): ratio}."""
    h, w = grid
    img = ratio[:, :, T:].amax(dim=(0, 1)).reshape(h, w)
    return {(ty, tx): img[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile].max().item()
            for ty in range(math.ceil(h / tile)) for tx in range(math.ceil(w / tile))}


MUT_D, MUT_R = 32, 3  # head_dim 32: two heads suffice for the slots; 3x3 tiles of 8x8


@triton_needed
def test_triton_passes_and_every_dropped_block_fails(monkeypatch):
    """Default config (8x8 tiles and key blocks), bfloat16: the kernel passes;
    then, launch i drops the i-th scheduled block of every tile at once
    (tiles are independent programs, so each tile's rows are what a kernel
    missing only that block gives). Every block of every tile, corners
    included, must push its tile's rows past the tolerance."""
    from comfyui_clear.kernels import tiling

    dtype = torch.bfloat16
    assert check(_triton_run(), dtype, MUT_D, MUT_R) is None
    grid = check_grid(MUT_R, 1)
    cfg = tiling.kernel_config(MUT_D, MUT_R, 1)
    _, ranges = tiling.tile_schedule(grid, MUT_R, cfg)
    tiles_x = math.ceil(grid[1] / cfg["TILE_X"])
    lengths = (ranges[:, 1] - ranges[:, 0]).tolist()
    margins = {}
    for i in range(max(lengths)):
        drops = {t: i for t, n in enumerate(lengths) if i < n}
        _drop_blocks(monkeypatch, drops)
        ratio, why = coverage_ratios(_triton_run(), device="cpu", dtype=dtype, head_dim=MUT_D, window=MUT_R,
                                     down_factor=1)
        assert why is None, why
        per_tile = _tile_ratios(ratio, selfcheck.TEXT_LEN, grid)
        for t in drops:
            margins[(divmod(t, tiles_x), i)] = per_tile[divmod(t, tiles_x)]
    missed = {key: m for key, m in margins.items() if not m > 1}
    assert not missed, f"dropped blocks the check misses (tile, block): ratio {missed}"
    assert len(margins) == sum(lengths)
    # end to end: one dropped block of the bottom-right corner tile, and the reason names it
    corner = len(lengths) - 1
    _drop_blocks(monkeypatch, {corner: lengths[corner] - 1})
    why = check(_triton_run(), dtype, MUT_D, MUT_R)
    assert why and "visits the wrong keys" in why and f"tile {divmod(corner, tiles_x)}".replace(" ", " ") in why, why


TALL = dict(TILE_Y=8, TILE_X=8, KEY_Y=2, KEY_X=8, BLOCK_T=64, num_warps=4, num_stages=1)


try:
    import triton
    import triton.language as tl  # module level: the interpreter looks it up in the jit function's globals
except ImportError:  # the mutation tests skip
    triton = None

_ATTEND = None  # the kernel's own text/pooled loop, while a test replaces it
_SKIP_N = -1  # which loop skips a chunk: the one over this many keys


if triton is not None:
    @triton.jit
    def _attend_skipping_a_chunk(q, k_base, v_base, skl, skd, svl, svd, n_keys, qk_scale, m_i, l_i, acc,
                                 BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
        """The kernel's loop over keys [0, n_keys), but keys [64, 128) skipped
        when n_keys == _SKIP_N (interpreter only: runs as Python)."""
        if n_keys == _SKIP_N:
            m_i, l_i, acc = _ATTEND(q, k_base, v_base, skl, skd, svl, svd, 64, qk_scale, m_i, l_i, acc,
                                    BLOCK_T, HEAD_DIM, UPCAST)
            if n_keys > 128:
                m_i, l_i, acc = _ATTEND(q, k_base + 128 * skl, v_base + 128 * svl, skl, skd, svl, svd, n_keys - 128,
                                        qk_scale, m_i, l_i, acc, BLOCK_T, HEAD_DIM, UPCAST)
        else:
            m_i, l_i, acc = _ATTEND(q, k_base, v_base, skl, skd, svl, svd, n_keys, qk_scale, m_i, l_i, acc,
                                    BLOCK_T, HEAD_DIM, UPCAST)
        return m_i, l_i, acc


@pytest.fixture
def skip_chunk(monkeypatch):
    """install(n): the kernel's text/pooled loop skips keys [64, 128) of the
    loop over n keys (TEXT_LEN: a text chunk; P: a pooled chunk)."""
    from comfyui_clear.kernels import clear_triton

    original = clear_triton._attend_all_keys

    def install(n_keys):
        monkeypatch.setitem(globals(), "_ATTEND", original)
        monkeypatch.setitem(globals(), "_SKIP_N", n_keys)
        monkeypatch.setattr(clear_triton, "_attend_all_keys", _attend_skipping_a_chunk)
    return install


@triton_needed
def test_triton_pooled_tall_blocks_and_chunks(monkeypatch, skip_chunk):
    """2x8 key blocks (the r > 16 pooled config) with pooled keys, float16: a
    random block dropped in every tile fails every tile while the text rows
    still pass; a skipped text chunk and a skipped pooled chunk each fail
    check_backend. (The unmutated kernel passing: the test above.)"""
    from comfyui_clear.kernels import tiling

    dtype, d = torch.float16, 2
    T, grid = selfcheck.TEXT_LEN, check_grid(MUT_R, d)
    P = math.ceil(grid[0] / d) * math.ceil(grid[1] / d)
    assert P > 64 and T > 64, "one chunk only: nothing to skip"
    run = _triton_run(TALL)
    _, ranges = tiling.tile_schedule(grid, MUT_R, TALL)
    rng = random.Random(0)
    drops = {t: rng.randrange(b - a) for t, (a, b) in enumerate(ranges.tolist())}
    _drop_blocks(monkeypatch, drops)
    ratio, why = coverage_ratios(run, device="cpu", dtype=dtype, head_dim=MUT_D, window=MUT_R, down_factor=d)
    assert why is None, why
    assert ratio[:, :, :T].max() <= 1, "text rows (not mutated) fail: the check is not what catches the drops"
    per_tile = _tile_ratios(ratio, T, grid)
    assert min(per_tile.values()) > 1, per_tile
    monkeypatch.undo()

    for n_keys, what in ((T, "text"), (P, "pooled")):
        skip_chunk(n_keys)
        why = check(run, dtype, MUT_D, MUT_R, d)
        assert why and "visits the wrong keys" in why and "image row" in why, (what, why)


@pytest.mark.parametrize("mixup", ["batch", "head"])
def test_batch_or_head_mixup_is_caught(mixup):
    """Batch 1 given batch 0's rows (or head 1 head 0's): batches and heads
    carry different slots in the coverage pass, so this shows."""
    def run(*args):
        out = torch_run(*args)
        if mixup == "batch":
            out[1] = out[0]
        else:
            out[:, 1] = out[:, 0]
        return out

    why = check(run, torch.bfloat16)
    assert why and "visits the wrong keys" in why, why


def test_shrinkable_for_interpreter_tests(monkeypatch):
    """Tests that run the whole auto path under the interpreter may shrink the
    problem through the module's constants and check_grid."""
    monkeypatch.setattr(selfcheck, "BATCH", 1)
    monkeypatch.setattr(selfcheck, "TEXT_LEN", 3)
    monkeypatch.setattr(selfcheck, "check_grid", lambda window, down_factor: (9, 11))
    seen = []

    def run(q, *args):
        seen.append(tuple(q.shape))
        return torch_run(q, *args)

    assert check(run, torch.float32, 16, 3, 2) is None
    assert seen and all(s[0] == 1 and s[2] == 3 + 9 * 11 for s in seen)
