"""Tiling of the CLEAR Triton kernel, and its exact work model (no Triton here).

Image queries are cut into TILE_Y x TILE_X tiles; local keys are read in
KEY_Y x KEY_X blocks aligned to the same lattice (TILE_* is a multiple of
KEY_*), so the key blocks a tile's discs reach are a fixed set of block
offsets that depends only on the radius (``block_offsets``). A tile near a
border uses the same set clipped to the grid; tiles with the same clipping
share one list (``tile_schedule``), so the kernel runs one flat loop over a
contiguous range of (dy, dx) block offsets per tile, which Triton can
software-pipeline. Text keys and pooled keys go through a plain flash loop in
BLOCK_T chunks.

``issued_pairs`` counts the (query, key) products this schedule makes;
``useful_pairs`` the ones CLEAR needs. tests/test_kernel_work.py holds the
first against a count taken from the kernel itself.
"""

import math
from functools import lru_cache

import numpy as np



def kernel_config(head_dim, window, down_factor=1, arch=None):
    """The launch configuration for one call: tile and key-block shapes,
    text/pooled chunk, warps and pipeline stages. ``arch`` is what
    ``clear_triton.device_arch`` returns: the CUDA compute capability as an
    int (80, 86, 89, 90, 120, ...), a ROCm gfx name ("gfx942", ...) or None
    (interpreter). ROCm is told apart by that name, never by a capability
    number (ROCm reports 9.x for MI300).

    The one place to tune per GPU. Constraints proven by
    tests/test_kernel_compile.py for every NVIDIA arch (sm_80..sm_120) and
    AMD arch (gfx90a, gfx942, gfx950, gfx1100, gfx1201): no register spills,
    shared memory within the arch's per-block limit, tensor cores (MMA,
    MFMA, WMMA) for every dot. Speed on AMD is not yet measured on a GPU.
    """
    # 8x8 query tiles (64 rows: the smallest wgmma M) with 8x8 key blocks;
    # at r > 16 with pooled keys, 2x8 key blocks follow the disc's rim closer
    # (issued/useful 1.15 instead of 1.18 at 4K r32 d4; bench/README.md).
    tile_y, tile_x = 8, 8
    key_y, key_x = (2, 8) if (window > 16 and down_factor > 1) or head_dim >= 256 else (8, 8)
    block_t = 64
    maxnreg = None
    if isinstance(arch, str) and _rdna(arch):
        # RDNA 3/4 (32-lane wavefronts, WMMA, 256 VGPRs per lane): with 4
        # warps (2 stages or 1) LLVM spills 40-690 bytes to scratch on
        # gfx1100/gfx1201; 8 warps at head_dim 64 fit, without software
        # pipelining; 16 at 128 still spill 28-68 bytes in some variants
        # (tests/test_kernel_compile.py). maxnreg is an NVIDIA option.
        num_warps, num_stages = (8 if head_dim <= 64 else 16), 1
    elif isinstance(arch, str):
        # CDNA (64-lane wavefronts, MFMA, 512 VGPRs + AGPRs): 4 warps; 2
        # stages is what Triton's AMD stream pipeliner expects.
        num_warps, num_stages = 4, 2
    elif arch is not None and arch // 10 == 9:
        num_warps, num_stages = 4, 3
    elif head_dim <= 64:
        # sm_80/86/89: ptxas aims at three blocks per SM (168 registers) and
        # spills 8-16 bytes (2 stages too); uncapped, no spill. sm_120 spills
        # uncapped and not at its own choice.
        num_warps, num_stages, maxnreg = 4, 3, (255 if arch in (80, 86, 89) else None)
    else:
        # sm_80/86/89/120 at head_dim 128: 4 warps spill (255 registers). With
        # 8 warps ptxas aims at two blocks per SM (128 registers) and spills
        # with pooled keys on sm_86/89; uncapped it needs ~226, no spill.
        num_warps, num_stages, maxnreg = 8, 3, 255
    return dict(TILE_Y=tile_y, TILE_X=tile_x, KEY_Y=key_y, KEY_X=key_x, BLOCK_T=block_t,
                num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


def _rdna(arch):
    """RDNA (gfx10xx-gfx12xx: 32-lane wavefronts) rather than CDNA (gfx9xx: 64)."""
    return int(arch[3:-2] or 0) >= 10  # "gfx1100" -> 11, "gfx942" -> 9, "gfx90a" -> 9


def _config_key(cfg):
    return cfg["TILE_Y"], cfg["TILE_X"], cfg["KEY_Y"], cfg["KEY_X"]


@lru_cache(maxsize=256)
def block_offsets(window, tile_y, tile_x, key_y, key_x):
    """Key-block offsets (oy, ox), row-major, that some disc of a tile at the
    lattice origin reaches: block rows [oy*key_y, oy*key_y + key_y) and
    columns likewise, relative to the tile's first row/column. A block is in
    when its nearest token is within distance < window of the tile's nearest
    query (the exact disc test on the two rectangles)."""
    assert tile_y % key_y == 0 and tile_x % key_x == 0, "key blocks must tile the query tiles"
    r, reach = window, window - 1

    def gap(o, k, t):  # token distance between block [o*k, o*k+k) and tile [0, t)
        return max(0, o * k - (t - 1), -(o * k + k - 1))

    out = []
    for oy in range(-((reach + key_y - 1) // key_y), (tile_y - 1 + reach) // key_y + 1):
        for ox in range(-((reach + key_x - 1) // key_x), (tile_x - 1 + reach) // key_x + 1):
            if gap(oy, key_y, tile_y) ** 2 + gap(ox, key_x, tile_x) ** 2 < r * r:
                out.append((oy, ox))
    return tuple(out)


# Most (offset) entries a schedule may hold before it stops clipping columns.
SCHEDULE_BUDGET = 1 << 21


@lru_cache(maxsize=64)
def _schedule(h, w, window, tile_y, tile_x, key_y, key_x):
    base = np.array(block_offsets(window, tile_y, tile_x, key_y, key_x), dtype=np.int32).reshape(-1, 2)
    tiles_y, tiles_x = -(-h // tile_y), -(-w // tile_x)
    blocks_y, blocks_x = -(-h // key_y), -(-w // key_x)

    def clip(n_tiles, step, n_blocks, col):
        lo, hi = base[:, col].min(), base[:, col].max()
        return [(max(lo, -t * step), min(hi, n_blocks - 1 - t * step)) for t in range(n_tiles)]

    rows = clip(tiles_y, tile_y // key_y, blocks_y, 0)
    cols = clip(tiles_x, tile_x // key_x, blocks_x, 1)
    if len(set(rows)) * len(set(cols)) * len(base) > SCHEDULE_BUDGET:
        # Radius near the grid size (r ~ 256 at 8K): nearly every tile has its
        # own clipping and the lists would take ~100 MB. Clip rows only; the
        # kernel masks blocks past the left/right edge (issued, counted).
        cols = [(base[:, 1].min(), base[:, 1].max())] * tiles_x
    lists, where, ranges = [], {}, np.empty((tiles_y * tiles_x, 2), dtype=np.int32)
    start = 0
    for ty, (ylo, yhi) in enumerate(rows):
        for tx, (xlo, xhi) in enumerate(cols):
            key = (ylo, yhi, xlo, xhi)
            if key not in where:
                keep = base[(base[:, 0] >= ylo) & (base[:, 0] <= yhi) & (base[:, 1] >= xlo) & (base[:, 1] <= xhi)]
                lists.append(keep)
                where[key] = (start, start + len(keep))
                start += len(keep)
            ranges[ty * tiles_x + tx] = where[key]
    return np.concatenate(lists), ranges


def tile_schedule(grid, window, cfg):
    """(offsets int32 (n, 2), ranges int32 (tiles, 2)): tile t = ty*tiles_x + tx
    visits key-block offsets ``offsets[ranges[t, 0]:ranges[t, 1]]`` relative
    to its own block (ty*TILE_Y/KEY_Y, tx*TILE_X/KEY_X). Every listed block
    lies (at least partly) inside the grid, except past the left/right edge
    for radii so large that clipping columns too would exceed SCHEDULE_BUDGET."""
    return _schedule(int(grid[0]), int(grid[1]), int(window), *_config_key(cfg))


def local_pairs(h, w, r):
    """Exact (image query, image key) pairs inside the disc, clipped at the
    borders: sum over offsets (dy, dx) with dy^2 + dx^2 < r^2 of (h-|dy|)(w-|dx|)."""
    total = 0
    for dy in range(-min(r - 1, h - 1), min(r - 1, h - 1) + 1):
        dxm = min(math.isqrt(r * r - 1 - dy * dy), w - 1)
        xs = np.arange(-dxm, dxm + 1)
        total += (h - abs(dy)) * int((w - np.abs(xs)).sum())
    return total


def pooled_count(h, w, d):
    return 0 if d <= 1 else (-(-h // d)) * (-(-w // d))


def useful_pairs(text_len, grid, window, down_factor=1):
    """(query, key) pairs CLEAR needs for one (batch, head), by part."""
    T, (h, w) = text_len, grid
    n = h * w
    return {"text_rows": T * (T + n), "image_text": n * T, "local": local_pairs(h, w, window),
            "pooled": n * pooled_count(h, w, down_factor)}


def issued_pairs(text_len, grid, window, down_factor=1, cfg=None, head_dim=128):
    """(query, key) products the Triton path issues for one (batch, head), by
    part: text rows through SDPA (counted as exactly needed: flash
    attention's own tiling is not modelled), then per image tile of
    TILE_Y*TILE_X query rows (partial tiles at the edge issue full rows) the
    text keys and pooled keys in BLOCK_T chunks and the scheduled key blocks."""
    cfg = cfg or kernel_config(head_dim, window, down_factor)
    T, (h, w) = text_len, grid
    bt = cfg["BLOCK_T"]
    block_m = cfg["TILE_Y"] * cfg["TILE_X"]
    _, ranges = tile_schedule(grid, window, cfg)
    tiles = len(ranges)
    blocks = int((ranges[:, 1] - ranges[:, 0]).sum())
    P = pooled_count(h, w, down_factor)
    return {"text_rows": T * (T + h * w), "image_text": tiles * block_m * (-(-T // bt) * bt),
            "local": blocks * block_m * cfg["KEY_Y"] * cfg["KEY_X"],
            "pooled": tiles * block_m * (-(-P // bt) * bt)}


def work_ratio(text_len, grid, window, down_factor=1, cfg=None, head_dim=128):
    """Issued / useful pairs over all rows (1.0 = no wasted products)."""
    issued = sum(issued_pairs(text_len, grid, window, down_factor, cfg, head_dim).values())
    return issued / sum(useful_pairs(text_len, grid, window, down_factor).values())
