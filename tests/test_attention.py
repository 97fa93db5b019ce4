"""The exact torch path of clear_attention against the dense float64 oracle,
the argument checks, and memory: no L x L tensor, a working set sized from the
problem and the free memory, a peak at most ComfyUI's own attention's."""

import math
import sys

import pytest
import torch

from _memory import LargestTensor, LiveBytes
from comfyui_clear.kernels import clear_attention, pool_image_tokens, reference
from oracle import clear_oracle, rel_err

# (batch, heads, head_dim, text_len, h, w, window, down_factor)
SHAPES = [
    (1, 2, 16, 5, 6, 6, 3, 1),
    (2, 1, 8, 3, 5, 7, 2, 1),    # batch > 1, non-square
    (1, 2, 16, 0, 4, 9, 3, 1),   # no text
    (1, 1, 8, 4, 1, 9, 2, 1),    # single row
    (1, 1, 8, 4, 9, 1, 2, 1),    # single column
    (1, 2, 8, 2, 5, 5, 1, 1),    # r = 1: only itself
    (1, 1, 8, 3, 4, 6, 20, 1),   # r larger than the grid: full attention
    (1, 2, 16, 6, 18, 21, 5, 1), # several tiles, ragged last tile
    (2, 2, 8, 3, 8, 8, 3, 2),    # pooled keys, divisible
    (1, 2, 8, 5, 8, 12, 3, 4),   # d = 4, divisible
    (1, 1, 16, 2, 7, 5, 2, 2),   # d = 2, not divisible: edge padding
    (1, 2, 8, 0, 9, 10, 3, 4),   # d = 4, not divisible, no text
]


def _inputs(B, H, D, L, dtype=torch.float64, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return [torch.randn(B, H, L, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("B,H,D,T,h,w,r,d", SHAPES)
def test_torch_path_matches_oracle(B, H, D, T, h, w, r, d):
    q, k, v = _inputs(B, H, D, T + h * w)
    sw = None
    if d > 1:
        sw = torch.rand(1, 1, 1, d, 1, d, 1, dtype=torch.float64) / (d * d) * 2  # a learned-looking weight
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, spatial_weight=sw,
                          backend="torch")
    ref = clear_oracle(q, k, v, T, (h, w), r, d, sw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-12


def _free_memory_is(monkeypatch, nbytes):
    """Simulate a device with ``nbytes`` free: the chunk budget becomes nbytes/8."""
    monkeypatch.setattr(reference, "free_memory", lambda device: nbytes)


def test_small_tiles_and_chunks_change_nothing(monkeypatch):
    """Tiny tiles and no free memory (one tile of one head, one text row of one
    head per chunk) exercise the tiling/chunking code paths."""
    B, H, D, T, h, w, r, d = 2, 3, 8, 7, 11, 13, 4, 2
    q, k, v = _inputs(B, H, D, T + h * w)
    sw = torch.randn(d, d, dtype=torch.float64)
    ref = clear_oracle(q, k, v, T, (h, w), r, d, sw)
    monkeypatch.setattr(reference, "TILE", 3)
    _free_memory_is(monkeypatch, 0)
    assert reference.working_set_budget(q) == 0
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, spatial_weight=sw,
                          backend="torch")
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_torch_path_low_precision(dtype, tol):
    B, H, D, T, h, w, r = 1, 2, 32, 9, 10, 7, 4
    q, k, v = _inputs(B, H, D, T + h * w, dtype=dtype)
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, backend="torch")
    assert out.dtype == dtype
    assert rel_err(out, clear_oracle(q, k, v, T, (h, w), r)) < tol


def test_explicit_scale_and_noncontiguous_inputs():
    B, H, D, T, h, w, r = 1, 2, 16, 4, 6, 5, 3
    L = T + h * w
    _, k, v = _inputs(B, H, D, L)
    q = torch.randn(B, L, H, D, dtype=torch.float64).transpose(1, 2)  # non-contiguous view
    assert not q.is_contiguous()
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, scale=0.37, backend="torch")
    assert rel_err(out, clear_oracle(q, k, v, T, (h, w), r, scale=0.37)) < 1e-12


def test_mask_is_a_disc_strictly_less_than_r():
    """A key at distance exactly r must not be seen; one just inside must."""
    D, h, w, r = 4, 9, 9, 3
    q = torch.zeros(1, 1, h * w, D, dtype=torch.float64)
    k = torch.zeros_like(q)
    v = torch.zeros_like(q)
    centre = 4 * w + 4
    v[0, 0, centre + 3] = 1000.0       # (4, 7): distance exactly 3 -> outside
    v[0, 0, centre + 2 * w + 2, 1] = 1000.0  # (6, 6): distance^2 = 8 < 9 -> inside
    out = clear_attention(q, k, v, text_len=0, grid=(h, w), window=r, backend="torch")
    assert out[0, 0, centre, 0] == 0.0
    assert out[0, 0, centre, 1] > 0.0


def test_pooling_edge_padding_and_weight_layout():
    """Pooled token (i, j) uses weight[i, j] on block row offset i, column offset j;
    a partial block repeats the grid's last row/column."""
    h, w, d = 3, 5, 2
    x = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h * w, 1)
    weight = torch.tensor([[1.0, 10.0], [100.0, 1000.0]], dtype=torch.float64)
    pooled = pool_image_tokens(x, (h, w), d, weight.reshape(1, 1, 1, d, 1, d, 1))
    assert pooled.shape == (1, 1, 2 * 3, 1)
    grid = x.reshape(h, w)
    # block (0, 0): rows 0-1, cols 0-1
    assert pooled[0, 0, 0, 0] == grid[0, 0] + 10 * grid[0, 1] + 100 * grid[1, 0] + 1000 * grid[1, 1]
    # block (1, 2): rows 2, 2(repeat), cols 4, 4(repeat)
    assert pooled[0, 0, 5, 0] == 1111 * grid[2, 4]


def _inference_tensor(t):
    with torch.inference_mode():  # as ComfyUI's executor makes every tensor a node creates
        return t.clone()


@pytest.mark.parametrize("change", ["none", "in place", "in place through .data", "in place in inference mode"])
def test_pooling_reads_the_weights_current_values(change):
    """Issue 26.2: under ComfyUI's executor (torch.inference_mode) a CLEAR file's
    pooling weights are inference tensors, which have no version counter (the
    old per-tensor float cache raised reading it). Pooling takes them in and
    out of inference mode, and after an in-place write, also one that moves no
    version counter, pools with the new values, never the ones it saw before."""
    grid, d = (7, 9), 4
    x = torch.randn(2, 3, grid[0] * grid[1], 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = torch.rand(d, d, generator=torch.Generator().manual_seed(2))
    weight = values.clone() if change in ("in place", "in place through .data") else _inference_tensor(values)
    expected = pool_image_tokens(x, grid, d, values.clone())
    assert torch.equal(pool_image_tokens(x, grid, d, weight), expected)
    with torch.inference_mode():
        assert torch.equal(pool_image_tokens(_inference_tensor(x), grid, d, weight), expected)
    if change == "none":
        return
    if change == "in place":
        weight.mul_(3)
    elif change == "in place through .data":  # how ComfyUI's copy_to_param writes weights: no version bump
        weight.data.mul_(3)
    else:
        with torch.inference_mode():
            weight.mul_(3)
    changed = pool_image_tokens(x, grid, d, values * 3)
    assert not torch.allclose(changed, expected)
    assert torch.equal(pool_image_tokens(x, grid, d, weight), changed)


@pytest.mark.parametrize("inference", [False, True])
def test_pooling_weights_traced_and_on_the_tensors_device(inference):
    """Traced (torch.compile) and with the weight on the tensors' device (meta
    here: no host sync may read it), pooling uses the weight as a tensor; traced
    with an inference-tensor weight, in or out of inference mode, it gives the
    eager result."""
    grid, d = (6, 5), 2
    x = torch.randn(1, 2, grid[0] * grid[1], 8, generator=torch.Generator().manual_seed(3))
    weight = torch.rand(d, d, generator=torch.Generator().manual_seed(4))
    expected = pool_image_tokens(x, grid, d, weight)
    if inference:
        x, weight = _inference_tensor(x), _inference_tensor(weight)
    torch._dynamo.reset()
    compiled = torch.compile(pool_image_tokens, backend="eager", fullgraph=True)
    with torch.inference_mode(inference):
        assert torch.allclose(compiled(x, grid, d, weight), expected, rtol=1e-6, atol=1e-6)
    on_meta = pool_image_tokens(x.to("meta"), grid, d, weight.to("meta"))
    assert on_meta.shape == expected.shape and on_meta.device.type == "meta"


@pytest.mark.parametrize("kwargs,match", [
    (dict(text_len=3), "text_len \\+ h\\*w"),
    (dict(text_len=-1), "text_len"),
    (dict(grid=(0, 4)), "grid"),
    (dict(grid=(2,)), "grid"),
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(down_factor=0), "down_factor"),
    (dict(down_factor=2, spatial_weight=torch.ones(3, 3)), "spatial_weight"),
    (dict(spatial_weight=torch.ones(2, 2)), "spatial_weight"),
    (dict(scale=-1.0), "scale"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, match):
    q, k, v = _inputs(1, 2, 8, 2 + 4 * 4)
    args = dict(text_len=2, grid=(4, 4), window=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        clear_attention(q, k, v, **args)


@pytest.mark.parametrize("bad,match", [
    (lambda q: q[0], "shape"),
    (lambda q: q.to(torch.int32), "dtype"),
    (lambda q: q.to(torch.float32), "one dtype"),
    (lambda q: q[:, :1], "one shape"),
])
def test_bad_tensors_raise(bad, match):
    q, k, v = _inputs(1, 2, 8, 2 + 4 * 4)
    with pytest.raises(ValueError, match=match):
        clear_attention(bad(q), k, v, text_len=2, grid=(4, 4), window=2)


@pytest.mark.parametrize("P", [5, 70])  # 70: more than one 64-key chunk
def test_precomputed_pooled_keys(P):
    """pooled_k/pooled_v from the caller (the multi-GPU split passes the whole
    image's): any count, seen by every image row and by no text row."""
    B, H, D, T, h, w, r = 2, 2, 8, 3, 6, 7, 3
    q, k, v = _inputs(B, H, D, T + h * w)
    pk, pv = _inputs(B, H, D, P)[:2]
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=4, pooled_k=pk, pooled_v=pv,
                          backend="torch")
    assert rel_err(out, clear_oracle(q, k, v, T, (h, w), r, pooled_k=pk, pooled_v=pv)) < 1e-12
    # the keys it would pool itself give its own result
    sw = torch.rand(2, 2, dtype=torch.float64)
    pk, pv = (pool_image_tokens(x[:, :, T:], (h, w), 2, sw) for x in (k, v))
    inside = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=2, spatial_weight=sw,
                             backend="torch")
    given = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=2, pooled_k=pk, pooled_v=pv,
                            backend="torch")
    assert rel_err(given, inside) < 1e-14


@pytest.mark.parametrize("kwargs,match", [
    (dict(pooled_k="P"), "together"),
    (dict(pooled_k="P", pooled_v="P"), "down_factor is 1"),
    (dict(pooled_k="P", pooled_v="P", down_factor=2, spatial_weight=torch.ones(2, 2)), "spatial_weight"),
    (dict(pooled_k="P", pooled_v="P3", down_factor=2), "heads, pooled tokens, head_dim"),
    (dict(pooled_k="P", pooled_v="P9", down_factor=2), "one shape"),
    (dict(pooled_k="P", pooled_v=[1.0], down_factor=2), "torch.Tensor"),
])
def test_bad_pooled_keys_raise_one_clear_error(kwargs, match):
    q, k, v = _inputs(1, 2, 8, 2 + 4 * 4)
    tensors = {"P": torch.randn(1, 2, 4, 8, dtype=torch.float64), "P3": torch.randn(1, 3, 4, 8, dtype=torch.float64),
               "P9": torch.randn(1, 2, 9, 8, dtype=torch.float64)}
    kwargs = {key: tensors.get(val, val) if isinstance(val, str) else val for key, val in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        clear_attention(q, k, v, text_len=2, grid=(4, 4), window=2, **kwargs)


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _inputs(1, 1, 16, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        clear_attention(q, k, v, text_len=0, grid=(2, 2), window=2, backend="triton")


@pytest.mark.parametrize("d", [1, 4])
def test_torch_path_never_builds_an_LxL_tensor(monkeypatch, d):
    """With the chunk budget lowered, no intermediate reaches L*L elements (a dense
    implementation's score matrix is B*H*L*L); the biggest is bounded by the
    budget plus the per-tile gather, i.e. O(L * (r^2 + T + P)) in total."""
    _free_memory_is(monkeypatch, 8 << 20)  # a 1 MiB budget
    B, H, D, T, h, w, r = 1, 2, 16, 16, 48, 48, 4
    L = T + h * w
    q, k, v = _inputs(B, H, D, L, dtype=torch.float32, seed=0)
    with LargestTensor() as mode:
        out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, backend="torch")
    assert torch.isfinite(out).all()
    assert mode.largest < L * L / 8, (mode.largest, L * L)
    # bigger than inputs only by the chunk budget (scores and gathered tiles)
    assert mode.largest * 4 <= max(B * H * L * D * 4, reference.working_set_budget(q))


@pytest.mark.slow
def test_2k_grid_runs_on_cpu_within_a_few_gb():
    """FLUX at 2K: 128x128 tokens, 24 heads, head_dim 128, 512 text tokens, r=16.
    Run in a subprocess and read its peak resident memory."""
    import subprocess
    import sys
    code = """
import resource, torch
from comfyui_clear.kernels import clear_attention
torch.manual_seed(0)
T, h, w = 512, 128, 128
q, k, v = (torch.randn(1, 24, T + h * w, 128, dtype=torch.bfloat16) for _ in range(3))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=16, backend="torch")
assert torch.isfinite(out.float()).all()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base // 1024, peak // 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    base_mb, peak_mb = map(int, res.stdout.split())
    # A dense score matrix alone would be 24 * 16896^2 * 4 B = 27 GB.
    assert peak_mb < 4096, f"peak RSS {peak_mb} MB"


# --- memory: the working set is sized from the problem and the free memory ---

# (batch, heads, head_dim, text_len, h, w, window, down_factor, dtype); v is a
# strided view like FLUX's (B, L, 3, H, D) qkv split.
BUDGET_SHAPES = [
    (1, 16, 32, 16, 24, 24, 3, 2, torch.float64),
    (2, 8, 32, 9, 20, 27, 4, 1, torch.float32),
    (1, 8, 128, 16, 24, 24, 5, 2, torch.bfloat16),
]


def _flux_like_inputs(B, H, D, L, dtype):
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, L, 3, H, D, generator=gen, dtype=torch.float64).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return q.contiguous(), k.contiguous(), v  # FLUX's rope makes q, k contiguous; v stays a view


@pytest.mark.parametrize("B,H,D,T,h,w,r,d,dtype", BUDGET_SHAPES)
def test_working_set_stays_within_the_budget_and_shrinks_with_free_memory(monkeypatch, B, H, D, T, h, w, r, d,
                                                                          dtype):
    """Everything the torch path allocates besides its output (scores, exp,
    masks, gathered float32 keys/values, partial outputs, pooled keys) fits the
    budget: with plenty of memory, and on a device with little free memory,
    where the chunks get smaller and the result stays exact."""
    L = T + h * w
    q, k, v = _flux_like_inputs(B, H, D, L, dtype)
    sw = torch.rand(d, d, dtype=torch.float64) if d > 1 else None
    ref = clear_oracle(q, k, v, T, (h, w), r, d, sw)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    peaks = []
    # the real free memory, then devices with 56 down to 24 MiB free (3 to 7
    # MiB budgets, falling at different points between chunk sizes)
    for free in (None, 56 << 20, 40 << 20, 32 << 20, 24 << 20):
        if free is not None:
            _free_memory_is(monkeypatch, free)
        budget = reference.working_set_budget(q)
        with LiveBytes() as mode:
            out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, spatial_weight=sw,
                                  backend="torch")
        work = mode.peak - out.numel() * out.element_size()
        assert work <= budget, (free, work, budget)
        assert rel_err(out, ref) < tol
        peaks.append(work)
    assert budget == (24 << 20) * reference.FREE_MEMORY_FRACTION
    assert peaks[-1] < peaks[0], peaks  # the small device really got smaller chunks


def test_budget_comes_from_the_problem_and_the_free_memory(monkeypatch):
    q = torch.empty(1, 24, 16384 + 512, 128, device="meta")  # FLUX at 2K: a float32 copy of q is 207 MiB
    _free_memory_is(monkeypatch, 64 << 30)
    assert reference.working_set_budget(q) == q.numel() * 4
    assert reference.working_set_budget(q.double()) == q.numel() * 8  # float64 computes in float64
    flux_1k = q[:, :, :4096 + 512]  # a float32 copy is 57 MiB: the floor applies
    assert reference.working_set_budget(flux_1k) == reference.MIN_BUDGET_BYTES
    small = q[:, :1, :1000]  # at most half of a dense 1000 x 1000 float32 score matrix
    assert reference.working_set_budget(small) == 1000 * 1000 * 4 // 2
    _free_memory_is(monkeypatch, 1 << 30)
    assert reference.working_set_budget(q) == 128 << 20  # an eighth of what is free
    _free_memory_is(monkeypatch, None)  # unknown: the problem decides
    assert reference.working_set_budget(q) == q.numel() * 4


def test_free_memory_is_read_without_comfyui_or_psutil(monkeypatch):
    free = reference.free_memory(torch.device("cpu"))
    assert isinstance(free, int) and free > 0
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now fails
    fallback = reference.free_memory("cpu")
    assert fallback is None or fallback > 0
    if sys.platform.startswith("linux"):  # /proc/meminfo
        assert abs(fallback - free) < max(free // 4, 1 << 30)


# (batch, heads, head_dim, text_len, h, w, window, down_factor). ComfyUI's
# attention is dense and does the same (B, H, L, D) call whatever r and d are.
COMFYUI_CASES = [
    [1, 3, 16, 5, 6, 6, 3, 1],       # tiny
    [1, 1, 16, 4, 12, 12, 20, 2],    # small, window over the whole grid, pooled keys
    [1, 1, 128, 8, 40, 40, 64, 2],   # one head, window over the grid: ComfyUI holds only ~20 MB
    [1, 2, 64, 8, 64, 64, 64, 2],    # a 128x128 latent on a 2-head model (the case)
    [1, 2, 64, 8, 64, 64, 8, 1],
    [1, 8, 128, 64, 96, 96, 16, 1],  # FLUX-like: a 1536 px image's 96x96 grid, 8 of 24 heads
]
# RSS is counted in pages and allocator arenas: a few MiB of noise.
RSS_TOLERANCE = 8 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_peak_memory_is_at_most_comfyuis_own_attention(comfyui):
    """The same (B, H, L, D) call on the CPU, each implementation in its own
    process: ours through the torch path, ComfyUI's through the
    optimized_attention it picks on this device (sub-quadratic on CPU). Peak
    live tensor bytes (exact) and peak resident-set rise (what a user sees)."""
    import json
    import os
    import subprocess
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_attention_peak.py")
    results = {}
    for impl in ("clear", "comfyui"):
        res = subprocess.run([sys.executable, script, impl, json.dumps(COMFYUI_CASES)], capture_output=True,
                             text=True, timeout=600, env={**os.environ, "COMFYUI_PATH": comfyui})
        assert res.returncode == 0, res.stderr[-3000:]
        results[impl] = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    for ours, theirs in zip(results["clear"], results["comfyui"]):
        what = f"{ours['case']}: ours {ours} vs ComfyUI's {theirs}"
        assert ours["case"] == theirs["case"]
        assert ours["live"] <= theirs["live"], what
        assert ours["rss"] <= theirs["rss"] + RSS_TOLERANCE, what
    assert len(results["clear"]) == len(COMFYUI_CASES)


def test_torch_path_traces_without_graph_breaks():
    """Under torch.compile the budget skips reading free memory (a graph break)."""
    q, k, v = _inputs(1, 2, 16, 4 + 8 * 8, dtype=torch.float32, seed=3)

    def attend(q, k, v):
        return clear_attention(q, k, v, text_len=4, grid=(8, 8), window=3, down_factor=2, backend="torch")
    explained = torch._dynamo.explain(attend)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons


# --- no host syncs or needless copies per layer; output layout ---

def test_torch_path_output_transposes_to_a_contiguous_view():
    """(B, H, L, D) values in (B, L, H, D) storage: the override's
    out.transpose(1, 2).reshape(B, L, H*D) is a view, not a copy."""
    B, H, D, T, h, w, r, d = 2, 3, 8, 4, 7, 9, 3, 2
    q, k, v = _flux_like_inputs(B, H, D, T + h * w, torch.float32)
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, backend="torch")
    assert out.transpose(1, 2).is_contiguous()
    assert rel_err(out, clear_oracle(q, k, v, T, (h, w), r, d)) < 1e-5


def test_free_memory_is_read_once_per_call(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "free_memory", lambda device: calls.append(device) or (1 << 30))
    q, k, v = _inputs(1, 2, 8, 3 + 8 * 9, dtype=torch.float32, seed=2)
    clear_attention(q, k, v, text_len=3, grid=(8, 9), window=3, down_factor=4, backend="torch")
    assert len(calls) == 1  # the torch path's budget; pooling keys and values reads none
    calls.clear()
    pool_image_tokens(k[:, :, 3:], (8, 9), 4)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid,d", [((12, 16), 4), ((13, 10), 4), ((9, 7), 2)])
def test_pooling_allocates_only_its_result(dtype, grid, d):
    """Pooling reads each block offset as a strided view of x: its memory is
    its result plus, for a bf16 input on the CPU, one head's cast slice
    (reference.pooling_bytes, the number the token-chunking model counts).
    The earlier gather of whole rows per offset held d times more."""
    B, H, D = 2, 4, 16
    h, w = grid
    x = torch.randn(B, H, h * w, D).to(dtype)
    sw = torch.rand(d, d)
    with LiveBytes() as mode:
        pooled = pool_image_tokens(x, grid, d, sw)
    assert mode.peak <= reference.pooling_bytes(B, H, grid, D, d, x.element_size()), mode.peak
    from oracle import pooled_tokens
    assert rel_err(pooled, pooled_tokens(x, h, w, d, sw.double())) < (1e-6 if dtype == torch.float32 else 1e-2)


class _HostToDevice(torch.overrides.TorchFunctionMode):
    """Counts host-to-device copies: a CPU tensor (not a 0-d scalar) going into
    an op whose result is on another device, or a tensor built from Python
    data on another device."""

    BUILDERS = (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor)

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if func is torch.Tensor.copy_:
            outs = [args[0]]
        if any(t.device.type != "cpu" for t in outs):
            leaves = tree_leaves((args, kwargs))
            from_python = func in self.BUILDERS and not isinstance(args[0], torch.Tensor)
            if from_python or any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0
                                  for t in leaves):
                self.copies += 1
        return out


def test_no_host_to_device_copies_per_layer(comfyui, monkeypatch, tmp_path):
    """A patched FLUX forward with _down_2 pooling weights (CPU tensors in the
    node's layer settings): every CLEAR call is replayed with q, k, v on the
    "meta" device, counting host-to-device copies. The pooling weights reach
    the pooling as Python floats and the tile coordinates are made on
    the device: none per layer, from the first call on."""
    import folder_paths

    import comfyui_clear.kernels as kernels
    import flux_tiny
    from comfyui_clear.nodes import clear_patch

    folder_paths.add_model_folder_path("clear", str(tmp_path), is_default=True)
    flux_tiny.write_clear_file(tmp_path / "clear_local_2_down_2.safetensors", down_factor=2, seed=9, hidden=256,
                               depth=2, depth_single=2)
    model = flux_tiny.make_tiny_flux()
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_2_down_2.safetensors", 0, 0, True, 1.0)
    real = kernels.clear_attention
    copies, weights = [], []

    def replay_on_meta(q, k, v, **kw):
        out = real(q, k, v, **kw)
        weights.append(kw.get("spatial_weight"))
        qm, km, vm = (t.to("meta") for t in (q, k, v))
        with _HostToDevice() as mode:
            real(qm, km, vm, **{**kw, "backend": "torch"})
        copies.append(mode.copies)
        return out

    monkeypatch.setattr(kernels, "clear_attention", replay_on_meta)
    latent = torch.randn(1, 16, 12, 14, generator=torch.Generator().manual_seed(3))
    flux_tiny.sample_one_step(patched, latent, flux_tiny.conditioning(5, seed=4))
    assert len(copies) >= 4  # every double and single block of the tiny FLUX, cond and uncond
    assert all(isinstance(w, torch.Tensor) and w.device.type == "cpu" for w in weights)  # the case at issue
    assert copies == [0] * len(copies), copies


def test_host_to_device_counter_sees_a_weight_copy():
    """The counter above counts what the old pooling did per layer: a CPU
    weight moved to the tensors' device."""
    x = torch.empty(1, 1, 16, 8, device="meta")
    with _HostToDevice() as mode:
        reference.spatial_weight_matrix(torch.rand(2, 2), 2, x.device)
        torch.tensor([1, 2], device=x.device)
    assert mode.copies == 2


def test_token_chunking_model_counts_what_pooling_allocates():
    """The token-chunking memory model's pooled keys and values during
    attention (pooled_kv_bytes) equal what pooling k and then v allocates
    (float32 input: no CPU cast), and the 8K d = 4 block peak includes them."""
    from comfyui_clear.nodes import token_chunking as tc

    B, H, D, T, grid, d = 2, 3, 8, 5, (13, 10), 4
    k = torch.randn(B, H, T + grid[0] * grid[1], D)
    v = torch.randn_like(k)
    sw = torch.rand(d, d)
    with LiveBytes() as mode:
        pooled = [pool_image_tokens(x[:, :, T:], grid, d, sw) for x in (k, v)]
    model = tc.pooled_kv_bytes(k.shape[2], B, T, d, H * D, grid)
    assert mode.peak == model == sum(p.numel() * p.element_size() for p in pooled)
    L = 512 + 512 * 512  # 8K
    assert tc.pooled_kv_bytes(L, 1, 512, 4) == 2 * 128 * 128 * 3072 * 4  # 0.4 GB
    plain = tc.block_activation_bytes("double", L, 2, chunk=8192)
    assert tc.block_activation_bytes("double", L, 2, chunk=8192, down_factor=4) == plain + tc.pooled_kv_bytes(L, 1, 512, 4)
