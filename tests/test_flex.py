"""The FlexAttention backend (kernels/flex.py): exact against the oracle, a
BlockMask built from the geometry (never an L x L mask), one compiled function
for every image size, pooled keys merged by log-sum-exp (no K/V
concatenation), FlexUnavailable instead of an eager run where that is unsafe.

Compilation is checked on the CPU with torch.compile's "eager" backend
wrapped in a frame counter: Dynamo's tracing, guards and recompiles are the
same as on a GPU; only the code generation (Inductor/Triton) is left out."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")

from comfyui_clear.kernels import clear_attention, flex, pool_image_tokens
from comfyui_clear.kernels.reference import clear_attention_torch
from oracle import clear_oracle, rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _qkv(B, H, L, D, dtype=torch.float32, seed=0, strided_v=False):
    gen = torch.Generator().manual_seed(seed)
    if strided_v:  # FLUX's single block: v a strided view of linear1's output
        qkv = torch.randn(B, L, 3, H, D, generator=gen).to(dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return q.contiguous(), k.contiguous(), v
    return [torch.randn(B, H, L, D, generator=gen).to(dtype) for _ in range(3)]


# (B, H, D, T, h, w, r, d)
SHAPES = [
    (1, 2, 16, 5, 9, 11, 4, 1),
    (2, 1, 16, 3, 7, 13, 3, 2),     # batch 2, odd grid, not divisible by d
    (1, 2, 32, 0, 10, 7, 3, 2),     # no text
    (1, 1, 16, 7, 1, 29, 5, 1),     # one grid row
    (1, 1, 16, 4, 23, 1, 3, 1),     # one grid column
    (1, 2, 16, 6, 6, 8, 20, 4),     # radius past the diagonal: dense, d = 4 with partial blocks
    (1, 1, 16, 9, 3, 150, 4, 2),    # grid rows wider than Flex's 128-token block
    (1, 1, 16, 130, 5, 9, 2, 1),    # text longer than one block
]


# every shape in float32; half precision on three of them keeps the test fast
CASES = [(*s, torch.float32) for s in SHAPES] + [
    (*s, dt) for s in (SHAPES[0], SHAPES[1], SHAPES[6]) for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("B,H,D,T,h,w,r,d,dtype", CASES)
def test_flex_matches_the_oracle(B, H, D, T, h, w, r, d, dtype):
    q, k, v = _qkv(B, H, T + h * w, D, dtype, seed=h * w + r)
    sw = torch.rand(d, d, dtype=torch.float64) * 2 / (d * d) if d > 1 else None
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, spatial_weight=sw,
                          backend="flex")
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, clear_oracle(q, k, v, T, (h, w), r, d, sw)) < TOL[dtype]
    assert out.transpose(1, 2).is_contiguous()  # the override's reshape to (B, L, H*D) is a view


def _dense_mask(T, h, w, r):
    L = T + h * w
    pos = torch.arange(h * w)
    y, x = pos // w, pos % w
    mask = torch.ones(L, L, dtype=torch.bool)
    mask[T:, T:] = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2 < r * r
    return mask


@pytest.mark.parametrize("T,h,w,r,block", [
    (5, 9, 11, 4, 8), (0, 12, 6, 2, 8), (3, 7, 30, 3, 8), (9, 5, 41, 6, 16), (20, 4, 4, 9, 8),
    (2, 31, 3, 1, 8), (13, 10, 17, 25, 8), (1, 6, 19, 3, 4),
])
def test_block_layout_covers_every_visible_pair(T, h, w, r, block):
    """Every block with a visible pair is listed; "full" blocks have only
    visible pairs and lie inside the sequence; no block is listed twice."""
    partial, full = flex.block_layout(T, (h, w), r, block=block)
    assert not (partial & full).any()
    L = T + h * w
    n = -(-L // block)
    mask = torch.zeros(n * block, n * block, dtype=torch.bool)
    mask[:L, :L] = _dense_mask(T, h, w, r)
    blocks = mask.reshape(n, block, n, block).permute(0, 2, 1, 3)
    needed, all_visible = blocks.any(-1).any(-1), blocks.all(-1).all(-1)
    assert not (needed & ~(partial | full)).any(), "a block with visible pairs is missing"
    assert not (full & ~all_visible).any(), "a block marked full has masked pairs"
    listed = (partial | full).sum().item()
    assert listed <= 1.5 * needed.sum().item() + n, (listed, needed.sum().item())  # not far beyond what is needed


def test_block_layout_is_tight_on_wide_grids():
    """A 128-query block of a 512-wide grid (8K) reaches its own few columns of
    each nearby row, not whole rows: block count near what the disc needs."""
    T, h, w, r = 512, 24, 512, 16
    partial, full = flex.block_layout(T, (h, w), r)
    image_rows = slice(T // 128 + 4 * 8, T // 128 + 4 * 16)  # query blocks of grid rows 8..15
    per_block = (partial | full)[image_rows].sum(-1).float().mean().item()
    text_blocks = T // 128
    # whole rows would be 31 rows x 4 blocks = 124 (+4 text); the disc needs ~2-3 per row
    assert per_block - text_blocks < 3.2 * (2 * r - 1), per_block


class _NoEagerMask:
    def __init__(self, *a, **k):
        raise AssertionError("the CLEAR BlockMask must not be built by evaluating a mask over L x L")


def _count_compiles(monkeypatch, counter):
    """Flex compiled on the CPU through ``counter``; evaluating a mask_mod over
    the sequence fails the test."""
    import torch._dynamo
    from torch.nn.attention import flex_attention as fa

    torch._dynamo.reset()  # Dynamo's cache is per code object: start from no entries
    monkeypatch.setattr(flex, "COMPILE_BACKEND", counter)
    monkeypatch.setattr(flex, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(flex, "_COMPILED", {})
    monkeypatch.setattr(flex, "_MASKS", flex.DeviceCache(8))
    monkeypatch.setattr(fa, "create_block_mask", _NoEagerMask)
    monkeypatch.setattr(fa, "create_mask", _NoEagerMask)


@pytest.fixture
def counted_compile(monkeypatch):
    """Flex compiled on the CPU through a frame counter around the "eager" backend."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    _count_compiles(monkeypatch, counter)
    yield counter
    torch._dynamo.reset()


# 12 image sizes (and text lengths, radii, scales) in one process; L > 128 as
# in every FLUX call, T >= 2.
TWELVE = [(7, 11, 23, 4), (5, 12, 20, 3), (2, 13, 17, 5), (4, 6, 31, 3), (9, 16, 19, 2), (6, 17, 19, 6),
          (8, 60, 3, 2), (3, 14, 14, 40), (9, 15, 23, 3), (2, 17, 11, 4), (4, 3, 200, 5), (12, 2, 301, 3)]


def test_twelve_image_sizes_compile_once_per_variant(counted_compile):
    for i, (T, h, w, r) in enumerate(TWELVE):
        d = 1 if i % 2 else 2
        q, k, v = _qkv(1, 2, T + h * w, 16, seed=i, strided_v=True)
        pk = pv = None
        if d > 1:
            pk, pv = (pool_image_tokens(x[:, :, T:], (h, w), d) for x in (k, v))
        scale = 0.2 + 0.01 * i  # proportional attention changes the scale with the size
        out = flex.clear_attention_flex(q, k, v, text_len=T, grid=(h, w), window=r, pooled_k=pk, pooled_v=pv,
                                        scale=scale)
        ref = clear_attention_torch(q, k, v, text_len=T, grid=(h, w), window=r, pooled_k=pk, pooled_v=pv,
                                    scale=scale)
        assert rel_err(out, ref) < 1e-5, (T, h, w, r, d)
        assert out.transpose(1, 2).is_contiguous()
    # one Dynamo entry for the local-only function, one for the pooled one: no recompile per size
    assert counted_compile.frame_count == 2, counted_compile.frame_count


def _has_cpp_compiler():
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


class _SpecialisingCounter:
    """A frame counter around the "eager" backend that, as Inductor's Flex
    lowering does, turns every symbolic float a flex_attention call takes
    (its ``scale``) into a constant: a guard on its value, one graph per value."""

    def __init__(self):
        from torch._dynamo.testing import CompileCounter

        self.counter = CompileCounter()
        self.specialised = 0

    @property
    def frame_count(self):
        return self.counter.frame_count

    def __call__(self, gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "flex_attention" in str(node.target):
                for arg in node.args:
                    value = arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else None
                    if isinstance(value, torch.SymFloat):
                        float(value)  # specialise: Dynamo guards on the value
                        self.specialised += 1
        return self.counter(gm, example_inputs)


def _three_scales_per_variant(counter, runs):
    for i, (T, h, w, r, d, scale) in enumerate(runs):
        q, k, v = _qkv(1, 2, T + h * w, 16, seed=i)
        pk = pv = None
        if d > 1:
            pk, pv = (pool_image_tokens(x[:, :, T:], (h, w), d) for x in (k, v))
        out = flex.clear_attention_flex(q, k, v, text_len=T, grid=(h, w), window=r, pooled_k=pk, pooled_v=pv,
                                        scale=scale)
        ref = clear_attention_torch(q, k, v, text_len=T, grid=(h, w), window=r, pooled_k=pk, pooled_v=pv,
                                    scale=scale)
        assert rel_err(out, ref) < 1e-5, (T, h, w, d, scale)


# (T, h, w, r, d, scale): three scales (proportional attention: one per image size) per variant
SCALES = [(5, 10, 15, 3, 1, 0.25), (5, 10, 15, 3, 1, 0.3), (6, 11, 13, 3, 1, 0.35),
          (5, 10, 15, 3, 2, 0.25), (5, 10, 15, 3, 2, 0.3), (6, 11, 13, 3, 2, 0.35)]


def test_flex_compiles_once_whatever_the_scale(monkeypatch):
    """Inductor bakes Flex's Python-float ``scale`` into its kernel (the plain
    "eager" backend does not): three scales were three graphs, and the 9th
    distinct scale hit the recompile limit, distrusting Flex for the process.
    The scale reaches Flex as a tensor: one graph per variant."""
    import torch._dynamo

    counter = _SpecialisingCounter()
    _count_compiles(monkeypatch, counter)
    try:
        _three_scales_per_variant(counter, SCALES)
        assert counter.frame_count == 2, counter.frame_count  # local-only and pooled
        assert counter.specialised == 0
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.skipif(not _has_cpp_compiler(), reason="Inductor on the CPU needs a C++ compiler")
def test_inductor_compiles_once_whatever_the_scale(monkeypatch):
    """The same with Inductor itself on the CPU (the local-only variant: CPU
    Inductor has no Flex log-sum-exp, which the pooled variant needs)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    _count_compiles(monkeypatch, counter)
    try:
        _three_scales_per_variant(counter, [run for run in SCALES if run[4] == 1])
        assert counter.frame_count == 1, counter.frame_count
    finally:
        torch._dynamo.reset()


def test_recompile_limit_raises_instead_of_running_eagerly(counted_compile):
    """Past Dynamo's recompile limit Flex would run eagerly (an L x L score
    matrix on the GPU): FlexUnavailable instead."""
    import torch._dynamo

    q, k, v = _qkv(1, 1, 5 + 150, 16)
    q16, k16, v16 = (t.half() for t in (q, k, v))  # a new dtype is a new entry
    with torch._dynamo.config.patch(recompile_limit=1):
        flex.clear_attention_flex(q, k, v, text_len=5, grid=(10, 15), window=3, scale=0.25)
        with pytest.raises(flex.FlexUnavailable, match="recompile limit"):
            flex.clear_attention_flex(q16, k16, v16, text_len=5, grid=(10, 15), window=3, scale=0.25)


def test_compile_failure_is_flex_unavailable_with_one_line(monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("ptxas fatal: unsupported arch\nsecond line")

    monkeypatch.setattr(flex, "COMPILE_BACKEND", broken)
    monkeypatch.setattr(flex, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(flex, "_COMPILED", {})
    q, k, v = _qkv(1, 1, 3 + 64, 16)
    with pytest.raises(flex.FlexUnavailable) as info:
        flex.clear_attention_flex(q, k, v, text_len=3, grid=(8, 8), window=3, scale=0.25)
    assert "\n" not in str(info.value) and "ptxas fatal" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_eager_flex_refuses_large_sequences(monkeypatch):
    """Off CUDA Flex runs eagerly and materialises the scores: beyond a cap it
    refuses (the torch path runs such sizes in bounded memory)."""
    monkeypatch.setattr(flex, "EAGER_MAX_SCORE_BYTES", 1 << 16)
    q, k, v = _qkv(1, 2, 4 + 100, 16)
    with pytest.raises(flex.FlexUnavailable, match="torch path"):
        flex.clear_attention_flex(q, k, v, text_len=4, grid=(10, 10), window=3, scale=0.25)


class _CatCalls(TorchFunctionMode):
    def __init__(self, big):
        super().__init__()
        self.big, self.cats = big, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.cat, torch.concat, torch.concatenate):
            self.cats += any(t.numel() >= self.big for t in args[0])
        return func(*args, **(kwargs or {}))


def test_pooled_keys_are_not_concatenated_to_k_and_v():
    T, h, w, r, d = 4, 12, 10, 3, 2
    q, k, v = _qkv(1, 2, T + h * w, 16, seed=5)
    pk, pv = (pool_image_tokens(x[:, :, T:], (h, w), d) for x in (k, v))
    with _CatCalls(big=k.numel() // 2) as mode:
        out = flex.clear_attention_flex(q, k, v, text_len=T, grid=(h, w), window=r, pooled_k=pk, pooled_v=pv,
                                        scale=0.25)
    assert mode.cats == 0
    assert rel_err(out, clear_oracle(q, k, v, T, (h, w), r, d)) < 1e-5
