"""Gradients of clear_attention: the torch path's backward (exact: float64
gradcheck, and autograd through the dense oracle), gradients to q, k, v,
pooled keys and spatial_weight, the custom op's autograd formula (direct
calls, opcheck, torch.compile), the backends without a backward (Triton
refused, Flex refused off CUDA), "auto" never picking Triton for training,
and the backward's memory: within the forward's working-set budget, no
L x L tensor."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (the auto test runs it)

import pytest
import torch

import comfyui_clear.kernels as kernels
from _memory import LargestTensor, LiveBytes
from comfyui_clear.kernels import autograd, clear_attention, pool_image_tokens, reference
from oracle import clear_oracle, rel_err

OP = torch.ops.comfyui_clear.clear_attention.default


def _qkv(B, H, D, L, dtype=torch.float64, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)
            for _ in range(3)]


def _weight(d, shape=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(d, d, generator=gen, dtype=torch.float64) * 2 / (d * d)  # learned-looking
    return w.reshape(shape or (d, d)).requires_grad_()


def _free_memory_is(monkeypatch, nbytes):
    monkeypatch.setattr(reference, "free_memory", lambda device: nbytes)


def _grads(out, inputs, seed=2):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


# (batch, heads, head_dim, text_len, h, w, window, down_factor): odd grids,
# text, pooled keys on a grid d does not divide (edge padding), batch 2
GRAD_SHAPES = [
    (2, 1, 4, 3, 5, 7, 2, 2),
    (2, 2, 4, 2, 5, 7, 3, 1),
    (1, 1, 4, 0, 3, 5, 2, 2),  # no text
]


@pytest.mark.parametrize("B,H,D,T,h,w,r,d", GRAD_SHAPES)
@pytest.mark.parametrize("tile", [16, 3], ids=["one-tile", "tiles-3"])
def test_gradcheck_torch_path(monkeypatch, B, H, D, T, h, w, r, d, tile):
    """Finite differences in float64 agree with the backward, for q, k, v and
    spatial_weight; with 3x3 tiles the grid has several tiles and shifted
    last tiles (queries computed twice must count once), and no free memory
    gives one tile of one head per chunk."""
    monkeypatch.setattr(reference, "TILE", tile)
    if tile == 3:
        _free_memory_is(monkeypatch, 0)
    q, k, v = _qkv(B, H, D, T + h * w)
    inputs = [q, k, v]
    sw = None
    if d > 1:
        sw = _weight(d, (1, 1, 1, d, 1, d, 1))
        inputs.append(sw)

    def f(q, k, v, *sw):
        return clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d,
                               spatial_weight=sw[0] if sw else None, backend="torch")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    # and equal to autograd through the dense masked oracle (analytic vs analytic)
    ours = _grads(f(*inputs), inputs)
    ref = _grads(clear_oracle(q, k, v, T, (h, w), r, d, sw), inputs)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12


def test_gradcheck_given_pooled_keys():
    """Pooled keys passed by the caller (kernels/band.py) get their gradients."""
    B, H, D, T, h, w, r = 2, 1, 4, 2, 5, 7, 2
    q, k, v = _qkv(B, H, D, T + h * w)
    pk, pv = _qkv(B, H, D, 6, seed=3)[:2]

    def f(q, k, v, pk, pv):
        return clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=3, pooled_k=pk,
                               pooled_v=pv, backend="torch")

    assert torch.autograd.gradcheck(f, (q, k, v, pk, pv), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("d", [1, 2, 4])
def test_float32_gradients_match_the_dense_oracle(d):
    """float32 inputs (float32 arithmetic), several 16x16 tiles with a ragged
    edge and a grid d does not divide: gradients within 1e-5 of float64
    autograd through the dense oracle."""
    B, H, D, T, h, w, r = 2, 2, 16, 5, 19, 21, 4
    q, k, v = _qkv(B, H, D, T + h * w, dtype=torch.float32)
    sw = _weight(d).float().detach().requires_grad_() if d > 1 else None
    inputs = [q, k, v] + ([sw] if sw is not None else [])
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, spatial_weight=sw,
                          backend="torch")
    assert out.dtype == torch.float32
    ours = _grads(out, inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = _grads(clear_oracle(*ref_inputs[:3], T, (h, w), r, d, ref_inputs[3] if d > 1 else None), ref_inputs)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32 and rel_err(a, b) < 1e-5, rel_err(a, b)


def test_bfloat16_gradients_come_back_in_the_input_dtype():
    B, H, D, T, h, w, r = 1, 2, 16, 3, 6, 7, 3
    q, k, v = _qkv(B, H, D, T + h * w, dtype=torch.bfloat16)
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=2, backend="torch")
    grads = _grads(out, [q, k, v])
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _grads(clear_oracle(*ref_inputs, T, (h, w), r, 2), ref_inputs)
    for a, b in zip(grads, ref):
        assert a.dtype == torch.bfloat16 and rel_err(a, b) < 2e-2


def test_gradients_through_the_custom_op():
    """The op's autograd formula (the path torch.compile takes), also when the
    op pools itself with a spatial_weight: equal to the dense oracle's."""
    B, H, D, T, h, w, r, d = 2, 2, 4, 3, 5, 7, 2, 2
    q, k, v = _qkv(B, H, D, T + h * w)
    sw = _weight(d, (1, 1, 1, d, 1, d, 1))
    out = OP(q, k, v, T, h, w, r, d, sw, 0.3, "torch")
    ours = _grads(out, [q, k, v, sw])
    ref = _grads(clear_oracle(q, k, v, T, (h, w), r, d, sw, scale=0.3), [q, k, v, sw])
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12


def test_opcheck_with_gradients():
    """torch.library.opcheck with inputs that require grad: the autograd
    registration, fake implementations and AOT dispatch (forward and
    backward) of the op and of its backward op."""
    B, H, D, T, h, w, r = 1, 2, 4, 3, 5, 7, 2
    q, k, v = _qkv(B, H, D, T + h * w)
    pk, pv = (x[:, :, :6].detach().clone().requires_grad_() for x in (k, v))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for args in ((q, k, v, T, h, w, r, 2, _weight(2), 0.3, "torch"),
                 (q, k, v, T, h, w, 99, 1, None, 0.3, "auto"),  # dense: SDPA forward
                 (q, k, v, T, h, w, r, 2, None, 0.3, "torch", pk, pv)):
        torch.library.opcheck(OP, args, test_utils=utils)
    g = torch.randn(B, H, T + h * w, D, dtype=torch.float64)
    backward_op = torch.ops.comfyui_clear.clear_attention_backward.default
    for extra in ((), (pk.detach(), pv.detach())):
        torch.library.opcheck(backward_op, (g, q.detach(), k.detach(), v.detach(), T, h, w, r, 0.3, *extra),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_gradients_under_torch_compile():
    """Compiled (one graph, the opaque op plus its backward op): same gradients,
    spatial_weight included."""
    B, H, D, T, h, w, r, d = 2, 1, 4, 3, 5, 7, 2, 2
    q, k, v = _qkv(B, H, D, T + h * w)
    sw = _weight(d)

    def f(q, k, v, sw):
        return clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, spatial_weight=sw)

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, sw)
    ours = _grads(out, [q, k, v, sw])
    ref = _grads(clear_oracle(q, k, v, T, (h, w), r, d, sw), [q, k, v, sw])
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-12


# --- backends without a backward ---


def test_triton_refuses_when_gradients_are_needed(monkeypatch):
    """One clear error naming the backends that train, instead of gradients
    that silently stop; also when the environment variable forces Triton;
    no refusal without gradients (inference)."""
    q, k, v = _qkv(1, 1, 16, 3 + 5 * 7, dtype=torch.float32)
    call = dict(text_len=3, grid=(5, 7), window=2)
    with pytest.raises(ValueError) as err:
        clear_attention(q, k, v, backend="triton", **call)
    message = str(err.value)
    assert message == autograd.TRITON_REFUSAL
    assert "backend='flex'" in message and "backend='torch'" in message and "no backward" in message
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="no backward"):
        clear_attention(q, k, v, **call)
    with torch.no_grad():  # inference: the forward runs (under the interpreter) or says why it cannot run here
        try:
            clear_attention(q, k, v, backend="triton", **call)
        except ValueError as exc:
            assert "no backward" not in str(exc)
    with pytest.raises(ValueError, match="no backward"):  # compiled: refused while tracing
        torch.compile(lambda q: clear_attention(q, k, v, backend="triton", **call), backend="eager")(q)


def test_flex_on_cpu_refuses_gradients_with_one_clear_error():
    q, k, v = _qkv(1, 1, 16, 3 + 5 * 7, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend='flex' has no backward on cpu.*backend='torch'"):
        clear_attention(q, k, v, text_len=3, grid=(5, 7), window=2, backend="flex")


def _lift_flex_cpu_backward_check(monkeypatch):
    """FlexAttention refuses requires_grad inputs on the CPU; its eager (math)
    backward still runs there, which lets the CPU test our wrapper's autograd
    (the pooled-key LSE merge, the output copies) as CUDA's compiled Flex sees it."""
    import torch.nn.attention.flex_attention as fa
    if not hasattr(fa, "_validate_device"):
        pytest.skip("this torch's FlexAttention has no device check to lift")
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


@pytest.mark.parametrize("pooled", [False, True])
def test_flex_wrapper_passes_gradients(monkeypatch, pooled):
    """Nothing in kernels/flex.py stops gradients: the LSE merge of local and
    pooled parts is differentiable, to q, k, v and the pooled keys."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from comfyui_clear.kernels.flex import clear_attention_flex
    _lift_flex_cpu_backward_check(monkeypatch)
    B, H, D, T, h, w, r = 2, 2, 16, 3, 5, 7, 2
    q, k, v = _qkv(B, H, D, T + h * w, dtype=torch.float32)
    inputs, pk, pv = [q, k, v], None, None
    if pooled:
        pk, pv = _qkv(B, H, D, 12, dtype=torch.float32, seed=4)[:2]
        inputs += [pk, pv]
    out = clear_attention_flex(q, k, v, text_len=T, grid=(h, w), window=r, pooled_k=pk, pooled_v=pv, scale=0.25)
    ours = _grads(out, inputs)
    ref = _grads(clear_oracle(q, k, v, T, (h, w), r, scale=0.25, pooled_k=pk, pooled_v=pv), inputs)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-5


def test_auto_trains_on_flex_or_torch_never_triton(monkeypatch):
    """"auto" with gradients needed on a fast device: Flex after its
    first-use check (Triton never runs), then torch once Flex is distrusted;
    gradients right either way (pooled keys and spatial_weight included)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from comfyui_clear.kernels import selfcheck
    _lift_flex_cpu_backward_check(monkeypatch)
    monkeypatch.setattr(kernels, "_TRUST", {})
    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    monkeypatch.setattr(kernels, "_fast_device", lambda q: True)
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    monkeypatch.setattr(selfcheck, "BATCH", 1)
    monkeypatch.setattr(selfcheck, "TEXT_LEN", 3)
    monkeypatch.setattr(selfcheck, "check_grid", lambda window, down_factor: (9, 11))
    ran, real = [], kernels._run_backend
    monkeypatch.setattr(kernels, "_run_backend", lambda name, *a, **kw: ran.append(name) or real(name, *a, **kw))
    B, H, D, T, h, w, r, d = 1, 2, 16, 3, 6, 7, 2, 2
    q, k, v = _qkv(B, H, D, T + h * w, dtype=torch.float32)
    sw = _weight(d).float().detach().requires_grad_()
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, sw)]
    ref = _grads(clear_oracle(*ref_inputs[:3], T, (h, w), r, d, ref_inputs[3]), ref_inputs)
    for expected in ("flex", "torch"):
        out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, spatial_weight=sw)
        assert ran[-1] == expected and "triton" not in ran, ran
        for a, b in zip(_grads(out, [q, k, v, sw]), ref):
            assert rel_err(a, b) < 1e-5
        for key in kernels._TRUST:
            kernels._TRUST[key] = "distrusted by the test"
    assert not any(key[0] == "triton" for key in kernels._TRUST)


# --- memory ---


@pytest.mark.parametrize("dtype,d", [(torch.float32, 1), (torch.float64, 2)])
def test_backward_working_set_stays_within_the_budget(monkeypatch, dtype, d):
    """Everything the backward allocates besides its gradients (recomputed
    scores and probabilities, gathered keys, partial products) fits the
    forward's budget, and gets smaller with less free memory."""
    B, H, D, T, h, w, r = 1, 8, 32, 9, 20, 27, 4
    L = T + h * w
    q, k, v = _qkv(B, H, D, L, dtype=dtype, grad=False)
    g = _qkv(B, H, D, L, dtype=dtype, seed=5, grad=False)[0]
    pk = pv = None
    if d > 1:
        pk, pv = (pool_image_tokens(x[:, :, T:], (h, w), d) for x in (k, v))
    c = torch.empty((), dtype=dtype).element_size()
    grads_bytes = (3 * B * H * L * D + (2 * pk.numel() if d > 1 else 0)) * c
    work = []
    for free in (64 << 20, 40 << 20, 24 << 20):
        _free_memory_is(monkeypatch, free)
        budget = reference.working_set_budget(q)
        with LiveBytes() as mode:
            autograd.clear_attention_backward(g, q, k, v, pk, pv, text_len=T, grid=(h, w), window=r, scale=0.2)
        work.append(mode.peak - grads_bytes)
        assert work[-1] <= budget, (free, work[-1], budget)
    assert work[-1] < work[0], work


@pytest.mark.parametrize("d", [1, 4])
def test_backward_never_builds_an_LxL_tensor(monkeypatch, d):
    """Forward and backward through autograd with a 1 MiB budget: no tensor
    comes near L*L elements (a dense backward's score matrix)."""
    _free_memory_is(monkeypatch, 8 << 20)
    B, H, D, T, h, w, r = 1, 2, 16, 16, 48, 48, 4
    L = T + h * w
    q, k, v = _qkv(B, H, D, L, dtype=torch.float32)
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, backend="torch")
    with LargestTensor() as mode:
        grads = _grads(out, [q, k, v])
    assert all(torch.isfinite(x).all() for x in grads)
    assert mode.largest < L * L / 8, (mode.largest, L * L)
    assert mode.largest * 4 <= max(B * H * L * D * 4, reference.working_set_budget(q))
