"""Backend choice: "auto" trusts each compiled Triton kernel variant only
after a first-use self-check that ran that variant, falls back to
FlexAttention (checked the same way) and then to torch with one warning, also
when a trusted backend fails mid-sampling; CLEAR_ATTENTION_BACKEND forces one.
The public op is a torch.library custom op that torch.compile treats as
opaque; launches and the self-check run under the tensors' CUDA device.
On the CPU: Triton runs under TRITON_INTERPRET=1 and Flex eagerly, and "auto"
is widened to the CPU for these tests."""

import logging
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import pytest
import torch

import comfyui_clear.kernels as kernels
from comfyui_clear.kernels import clear_attention, selfcheck
from oracle import clear_oracle, rel_err

pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")
SHAPE = dict(T=5, h=9, w=11, r=4)


def _inputs(D=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = SHAPE["T"] + SHAPE["h"] * SHAPE["w"]
    return [torch.randn(1, 2, L, D, generator=gen).to(dtype) for _ in range(3)]


def _call(q, k, v, backend="auto", d=1):
    return clear_attention(q, k, v, text_len=SHAPE["T"], grid=(SHAPE["h"], SHAPE["w"]), window=SHAPE["r"],
                           down_factor=d, backend=backend)


def _oracle(q, k, v, d=1):
    return clear_oracle(q, k, v, SHAPE["T"], (SHAPE["h"], SHAPE["w"]), SHAPE["r"], d)


def _small_self_check(monkeypatch, grid):
    monkeypatch.setattr(selfcheck, "BATCH", 1)
    monkeypatch.setattr(selfcheck, "TEXT_LEN", 3)
    monkeypatch.setattr(selfcheck, "check_grid", lambda window, down_factor: grid)


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """Fresh trust state, "auto" considering the CPU a fast device, and a log of
    which backend each call ran (a self-check, whatever number of passes it
    launches, counts once)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to run the Triton kernel on the CPU")
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "_TRUST", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.setattr(kernels, "_fast_device", lambda q: True)
    # the GPU check problem, shrunk for the interpreter (still several tiles and borders)
    _small_self_check(monkeypatch, (9, 11))
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    ran, checking = [], []
    real, real_check = kernels._run_backend, kernels._self_check

    def spy(name, *args, **kwargs):
        if not checking:
            ran.append(name)
        return real(name, *args, **kwargs)

    def check_spy(name, *args, **kwargs):
        ran.append(name)
        checking.append(name)
        try:
            return real_check(name, *args, **kwargs)
        finally:
            checking.pop()

    monkeypatch.setattr(kernels, "_run_backend", spy)
    monkeypatch.setattr(kernels, "_self_check", check_spy)
    return ran


def _clear_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "failed on" in r.getMessage()]


@pytest.mark.parametrize("d", [1, 2])
def test_auto_trusts_triton_after_its_check(auto_on_cpu, caplog, d):
    q, k, v = _inputs()
    out = _call(q, k, v, d=d)
    assert auto_on_cpu[-1] == "triton" and "triton" in auto_on_cpu[:-1]  # the check ran the kernel first
    assert rel_err(out, _oracle(q, k, v, d)) < 1e-5
    assert not _clear_warnings(caplog)
    n = len(auto_on_cpu)
    _call(q, k, v, d=d)
    assert auto_on_cpu[n:] == ["triton"], "checked once per kernel variant"


def test_trust_key_holds_the_pooled_variant(auto_on_cpu):
    """d = 1 then d = 4 compile two kernels (HAS_POOL): each gets its own check."""
    q, k, v = _inputs()
    _call(q, k, v, d=1)
    n = len(auto_on_cpu)
    out = _call(q, k, v, d=4)
    assert auto_on_cpu[n:] == ["triton", "triton"], "the pooled variant ran unchecked"
    assert rel_err(out, _oracle(q, k, v, 4)) < 1e-5
    variants = [key[2] for key in kernels._TRUST if key[0] == "triton"]
    assert len(variants) == 2 and {dict(v[2])["HAS_POOL"] for v in variants} == {False, True}


class _BrokenKernel:
    """Stands in for the Triton kernel: every launch raises ``message``."""

    def __init__(self, message):
        from comfyui_clear.kernels import clear_triton

        self.fn = clear_triton._clear_image_rows_kernel.fn
        self.message = message

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError(self.message)
        return launch


def test_compile_failure_falls_back_to_flex_with_one_warning(auto_on_cpu, caplog, monkeypatch):
    from comfyui_clear.kernels import clear_triton

    monkeypatch.setattr(clear_triton, "_clear_image_rows_kernel", _BrokenKernel(
        "PTX .version 9.9 does not support .target sm_999 (simulated compile failure)"))
    q, k, v = _inputs()
    with caplog.at_level(logging.WARNING, logger="comfyui_clear"):
        out = _call(q, k, v)
        assert auto_on_cpu[-1] == "flex"
        assert rel_err(out, _oracle(q, k, v)) < 1e-5
        _call(q, k, v)
        assert auto_on_cpu[-1] == "flex"
    (warning,) = _clear_warnings(caplog)
    msg = warning.getMessage()
    import triton
    assert "cpu" in msg and f"Triton {triton.__version__}" in msg and "simulated compile failure" in msg
    assert "first-use check" in msg
    assert "Running FlexAttention instead" in msg and kernels.BACKEND_ENV in msg


def test_wrong_result_falls_back(auto_on_cpu, caplog, monkeypatch):
    from comfyui_clear.kernels import clear_triton

    real = clear_triton.clear_attention_triton

    def slightly_wrong(q, k, v, **kw):
        out = real(q, k, v, **kw)
        out[:, :, -1] += 0.5  # one token off: what a miscompiled border would do
        return out

    monkeypatch.setattr(clear_triton, "clear_attention_triton", slightly_wrong)
    q, k, v = _inputs(dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="comfyui_clear"):
        out = _call(q, k, v)
    assert auto_on_cpu[-1] == "flex"
    assert rel_err(out, _oracle(q, k, v)) < 1e-2
    (warning,) = _clear_warnings(caplog)
    assert "visits the wrong keys" in warning.getMessage() and "bfloat16" in warning.getMessage()


def test_flex_failing_too_falls_back_to_torch(auto_on_cpu, caplog, monkeypatch):
    from comfyui_clear.kernels import clear_triton, flex

    monkeypatch.setattr(clear_triton, "_clear_image_rows_kernel", _BrokenKernel("simulated launch failure"))
    monkeypatch.setattr(flex, "clear_attention_flex", lambda q, k, v, **kw: torch.zeros_like(q))
    q, k, v = _inputs()
    with caplog.at_level(logging.WARNING, logger="comfyui_clear"):
        out = _call(q, k, v)
    assert auto_on_cpu[-1] == "torch"
    assert rel_err(out, _oracle(q, k, v)) < 1e-5
    (warning,) = _clear_warnings(caplog)
    msg = warning.getMessage()
    assert "triton and flex failed" in msg and "Running the torch path instead" in msg


@pytest.mark.parametrize("forced", ["torch", "flex", "triton"])
def test_environment_variable_forces_a_backend(auto_on_cpu, monkeypatch, forced):
    monkeypatch.setenv(kernels.BACKEND_ENV, forced)
    q, k, v = _inputs()
    out = _call(q, k, v)
    assert auto_on_cpu == [forced], "forced: no self-check"
    assert rel_err(out, _oracle(q, k, v)) < 1e-5


def test_environment_variable_typo_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.BACKEND_ENV, "trtion")
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=kernels.BACKEND_ENV):
        _call(q, k, v)


def test_auto_stays_on_torch_off_cuda(monkeypatch, caplog):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    monkeypatch.setattr(kernels, "_CHOICES", {})
    ran = []
    real = kernels._run_backend
    monkeypatch.setattr(kernels, "_run_backend", lambda name, *a, **kw: ran.append(name) or real(name, *a, **kw))
    q, k, v = _inputs()
    with caplog.at_level(logging.INFO, logger="comfyui_clear"):
        _call(q, k, v)
        _call(q, k, v)
    assert ran == ["torch", "torch"]
    assert kernels.backend_choices() == {"cpu, float32, head_dim 16, local keys": (
        "torch", "cpu device: the compiled backends run on CUDA")}
    infos = [r.getMessage() for r in caplog.records
             if r.levelno == logging.INFO and "CLEAR attention on" in r.getMessage()]
    assert infos == ["CLEAR attention on cpu, float32, head_dim 16, local keys: running the torch path "
                     "(cpu device: the compiled backends run on CUDA)"], "one INFO line per variant"


@pytest.mark.parametrize("T,h,w,r,d,dtype", [(5, 9, 11, 4, 1, torch.float32), (0, 7, 9, 3, 2, torch.float32),
                                              (3, 10, 13, 5, 4, torch.bfloat16)])
def test_flex_backend_matches_oracle(T, h, w, r, d, dtype):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, T + h * w, 16, generator=gen).to(dtype) for _ in range(3))
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, backend="flex")
    assert out.dtype == dtype
    assert rel_err(out, clear_oracle(q, k, v, T, (h, w), r, d)) < (1e-5 if dtype == torch.float32 else 1e-2)


# --- kernel variants, failures mid-sampling ----------------------------------

def test_stride_class_is_part_of_the_trust_key(auto_on_cpu, caplog, monkeypatch):
    """A v whose row stride is not a multiple of 16 would compile another
    kernel variant: the launcher copies it to the checked layout. With that
    copy disabled, the unchecked variant is refused (its self-check ran the
    canonical one) and Flex runs."""
    from comfyui_clear.kernels import clear_triton

    q, k, v = _inputs()
    v_odd = torch.randn(*v.shape[:3], v.shape[3] + 1)[..., :v.shape[3]]  # row stride 17
    assert not clear_triton.is_canonical(v_odd)
    out = _call(q, k, v_odd)
    assert auto_on_cpu[-1] == "triton" and rel_err(out, _oracle(q, k, v_odd)) < 1e-5
    assert [key[0] for key in kernels._TRUST] == ["triton"], "one variant, one check"

    monkeypatch.setattr(clear_triton, "canonical", lambda x: x)
    monkeypatch.setattr(kernels, "_TRUST", {})
    with caplog.at_level(logging.WARNING, logger="comfyui_clear"):
        out = _call(q, k, v_odd)
    assert auto_on_cpu[-1] == "flex" and rel_err(out, _oracle(q, k, v_odd)) < 1e-5
    (warning,) = _clear_warnings(caplog)
    assert "did not run this kernel variant" in warning.getMessage()


def test_failure_while_running_falls_back_with_one_warning(auto_on_cpu, caplog, monkeypatch):
    """The kernel passes its check, then its production launch raises (a
    resource or compile error at the real size): Flex runs this very call,
    the variant is distrusted for the process, one warning, nothing raised."""
    from comfyui_clear.kernels import clear_triton

    real_kernel, real_check = clear_triton._clear_image_rows_kernel, kernels._self_check
    checking = []

    def check(*args):
        checking.append(True)
        try:
            return real_check(*args)
        finally:
            checking.pop()

    failed_launches = []

    class FailsOutsideTheCheck:
        fn = real_kernel.fn

        def __getitem__(self, grid):
            if checking:
                return real_kernel[grid]

            def fail(*args, **kwargs):
                failed_launches.append(grid)
                raise RuntimeError("out of resources (simulated, mid-sampling)")
            return fail

    monkeypatch.setattr(kernels, "_self_check", check)
    monkeypatch.setattr(clear_triton, "_clear_image_rows_kernel", FailsOutsideTheCheck())
    q, k, v = _inputs()
    with caplog.at_level(logging.WARNING, logger="comfyui_clear"):
        out = _call(q, k, v)
        assert auto_on_cpu == ["triton", "triton", "flex", "flex"]  # check, launch (raised), Flex check, Flex
        assert rel_err(out, _oracle(q, k, v)) < 1e-5
        assert len(failed_launches) == 1
        _call(q, k, v)
        assert auto_on_cpu[4:] == ["triton", "flex"] and len(failed_launches) == 1, \
            "the failed variant stays distrusted: refused before any launch"
    (warning,) = _clear_warnings(caplog)
    msg = warning.getMessage()
    assert "failed while running" in msg and "simulated, mid-sampling" in msg and "Running FlexAttention" in msg


def test_input_errors_still_raise(auto_on_cpu):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="window"):
        clear_attention(q, k, v, text_len=SHAPE["T"], grid=(SHAPE["h"], SHAPE["w"]), window=0)


# --- torch.compile -----------------------------------------------------------

@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_at_two_sizes(auto_on_cpu, caplog, compile_backend):
    """CLEAR is one opaque op to Dynamo: no graph break at two grid sizes
    (the second one recompiles with dynamic shapes), the first (compiled)
    call still self-checks Triton eagerly and Triton stays trusted."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def f(q, k, v, T, h, w):
        return clear_attention(q, k, v, text_len=T, grid=(h, w), window=4, down_factor=2) * 2

    compiled = torch.compile(f, backend=compile_backend, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="comfyui_clear"):
        for T, h, w in ((5, 9, 11), (3, 10, 12)):
            q, k, v = (torch.randn(1, 2, T + h * w, 16, generator=gen) for _ in range(3))
            out = compiled(q, k, v, T, h, w)
            assert rel_err(out / 2, clear_oracle(q, k, v, T, (h, w), 4, 2)) < 1e-5
            assert out.shape == q.shape
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch._dynamo.explain(f)(q, k, v, T, h, w).graph_break_count == 0
    assert not _clear_warnings(caplog)
    assert auto_on_cpu[-1] == "triton"
    trust = [why for key, why in kernels._TRUST.items() if key[0] == "triton"]
    assert trust == [None], trust


def test_op_fake_matches_real():
    """torch.library.opcheck: schema, fake implementation (shapes and strides)
    and AOT dispatch agree with the real op."""
    q, k, v = _inputs()
    for args in ((q, k, v, SHAPE["T"], SHAPE["h"], SHAPE["w"], SHAPE["r"], 1, None, 0.25, "torch"),
                 (q, k, v, SHAPE["T"], SHAPE["h"], SHAPE["w"], 99, 1, None, 0.25, "auto"),  # dense: SDPA
                 (q, k, v, SHAPE["T"], SHAPE["h"], SHAPE["w"], 3, 2, torch.full((2, 2), 0.25), 0.25, "torch"),
                 (q, k, v, SHAPE["T"], SHAPE["h"], SHAPE["w"], 3, 4, None, 0.25, "torch", q[:, :, :9], v[:, :, 2:11])):
        torch.library.opcheck(torch.ops.comfyui_clear.clear_attention.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["torch", "triton", "flex", "dense"])
def test_output_transposes_to_contiguous(backend, compiled):
    """(B, H, L, D) view of (B, L, H, D) memory: the override's
    ``transpose(1, 2).reshape(B, L, H*D)`` is a view. Triton gives it always;
    under torch.compile every backend does (the layout the op's fake
    promises); eager torch/Flex leave the copy to that reshape (no extra
    buffer)."""
    if backend == "triton" and kernels.triton_supported(_inputs()[0]) is not None:
        pytest.skip(kernels.triton_supported(_inputs()[0]))
    q, k, v = _inputs()
    window = 99 if backend == "dense" else SHAPE["r"]

    def f(q, k, v):
        return clear_attention(q, k, v, text_len=SHAPE["T"], grid=(SHAPE["h"], SHAPE["w"]), window=window,
                               backend="auto" if backend == "dense" else backend)

    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, backend="eager", fullgraph=True)
    out = f(q, k, v)
    assert rel_err(out, clear_oracle(q, k, v, SHAPE["T"], (SHAPE["h"], SHAPE["w"]), window, 1)) < 1e-5
    if compiled or backend == "triton":
        assert out.transpose(1, 2).is_contiguous()
        B, L, H, D = out.transpose(1, 2).shape
        assert out.transpose(1, 2).reshape(B, L, H * D).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["torch", "triton", "flex"])
def test_precomputed_pooled_keys_every_backend(backend, compiled):
    """pooled_k/pooled_v from the caller (the multi-GPU split's whole-image
    pooled keys): any count (70: two 64-key chunks), strided, through the op
    under torch.compile too."""
    if backend == "triton" and kernels.triton_supported(_inputs()[0]) is not None:
        pytest.skip(kernels.triton_supported(_inputs()[0]))
    q, k, v = _inputs()
    gen = torch.Generator().manual_seed(5)
    pk, pv = (torch.randn(70, 1, 2, 16, generator=gen).permute(1, 2, 0, 3) for _ in range(2))  # not contiguous

    def f(q, k, v, pk, pv):
        return clear_attention(q, k, v, text_len=SHAPE["T"], grid=(SHAPE["h"], SHAPE["w"]), window=SHAPE["r"],
                               down_factor=4, pooled_k=pk, pooled_v=pv, backend=backend)

    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, backend="eager", fullgraph=True)
    out = f(q, k, v, pk, pv)
    ref = clear_oracle(q, k, v, SHAPE["T"], (SHAPE["h"], SHAPE["w"]), SHAPE["r"], pooled_k=pk, pooled_v=pv)
    assert rel_err(out, ref) < 1e-5


# --- dense shortcut ----------------------------------------------------------

@pytest.mark.parametrize("h,w,window,dense", [(4, 5, 6, True), (4, 5, 5, False), (1, 7, 7, True), (9, 11, 13, True)])
def test_dense_mask_runs_sdpa(auto_on_cpu, h, w, window, dense):
    """Radius past the grid's diagonal ((h-1)^2 + (w-1)^2 < r^2) and no pooled
    keys: SDPA, no CLEAR backend. At r^2 = the diagonal^2 (4x5, r 5) the far
    corner is outside the disc: not dense."""
    T = 3
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, T + h * w, 16, generator=gen) for _ in range(3))
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=window)
    ref = clear_attention(q, k, v, text_len=T, grid=(h, w), window=window, backend="torch")
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, clear_oracle(q, k, v, T, (h, w), window, 1)) < 1e-5
    if dense:
        assert auto_on_cpu == ["torch"], "only the explicit torch call ran a CLEAR backend"
        assert [b for b, _ in kernels.backend_choices().values()] == ["sdpa"]
    else:
        assert "triton" in auto_on_cpu[:-1]


def test_dense_info_line_says_why_once(monkeypatch, caplog):
    """Issue 26.9: the line read "..., dense (window covers the grid): running
    scaled_dot_product_attention (the window covers the whole grid)"."""
    import logging

    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    q = torch.randn(1, 2, 3 + 4 * 5, 16)
    with caplog.at_level(logging.INFO, logger=kernels.log.name):
        clear_attention(q, q, q, text_len=3, grid=(4, 5), window=6)
        clear_attention(q, q, q, text_len=3, grid=(4, 5), window=6)
    (line,) = [r.getMessage() for r in caplog.records if "CLEAR attention on" in r.getMessage()]
    assert line == "CLEAR attention on cpu, float32, head_dim 16, dense: running scaled_dot_product_attention " \
                   "(the window covers the grid)"


# --- device guard, self-check failure handling -------------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake CUDA tensors (no GPU needed) and a stand-in for torch.cuda's
    device context that records which device is current."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    pytest.importorskip("triton")
    current = [0]
    events = []

    class device:
        def __init__(self, dev):
            self.index = torch.device(dev).index

        def __enter__(self):
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: events.append(("sync", current[0])))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield events, current


def test_launches_and_self_check_run_on_the_tensors_device(fake_cuda, monkeypatch):
    """A model on cuda:1 while cuda:0 is current: every launch and the
    self-check's synchronize happen with cuda:1 current, and the current
    device is restored after."""
    from comfyui_clear.kernels import clear_triton

    events, current = fake_cuda

    class StubKernel:  # records the device current at launch time
        fn = clear_triton._clear_image_rows_kernel.fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append(("launch", torch.cuda.current_device()))

    monkeypatch.setattr(clear_triton, "_clear_image_rows_kernel", StubKernel())
    q = torch.empty(2, 2, 3 + 4 * 5, 64, device="cuda:1", dtype=torch.bfloat16)
    out = clear_triton.clear_attention_triton(q, q, q, text_len=3, grid=(4, 5), window=2, scale=0.125)
    assert events == [("launch", 1), ("launch", 1)] and current == [0]  # one launch per batch element
    assert out.device == q.device and out.transpose(1, 2).is_contiguous()
    events.clear()
    _small_self_check(monkeypatch, (4, 5))  # batch 1: one launch
    why = kernels._self_check("triton", q.device, q.dtype, 64, 2, 1)
    assert events == [("launch", 1), ("sync", 1)] and current == [0]
    assert isinstance(why, str)  # fake tensors cannot be compared: a reason, not an exception


def test_self_check_reference_failure_is_a_reason(monkeypatch):
    """After an illegal memory access the CUDA context is broken and the torch
    reference raises too: the check must report that, not raise."""
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(selfcheck, "clear_attention_torch", broken)
    _small_self_check(monkeypatch, (5, 6))
    why = kernels._self_check("flex", torch.device("cpu"), torch.float32, 16, 3, 1)
    assert "illegal memory access" in why


# --- what runs, and why -------------------------------------------------------

def test_unsupported_faster_backend_is_named_once(auto_on_cpu, caplog, monkeypatch):
    """float32 on CUDA: Triton cannot run; Flex runs, one warning says why,
    and backend_choices reports it."""
    why = "float32 on CUDA: the Triton kernel takes float16 and bfloat16 (load the model in bf16 or fp16 to use it)"
    monkeypatch.setattr(kernels, "triton_supported", lambda q: why)
    q, k, v = _inputs()
    with caplog.at_level(logging.INFO, logger="comfyui_clear"):
        _call(q, k, v)
        _call(q, k, v)
    assert auto_on_cpu == ["flex", "flex", "flex"]  # check, run, run
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"CLEAR attention on cpu: {why}; running FlexAttention."]
    ((backend, reason),) = kernels.backend_choices().values()
    assert backend == "flex" and why in reason


def test_triton_supported_on_cuda(fake_cuda):
    def q(dtype=torch.bfloat16, D=128):
        return torch.empty(1, 2, 8, D, device="cuda:0", dtype=dtype)

    assert kernels.triton_supported(q()) is None
    assert kernels.triton_supported(q(torch.float16, 64)) is None
    assert "float32 on CUDA" in kernels.triton_supported(q(torch.float32))
    for D in (16, 32, 256):  # not compile-checked ahead of time: refused on the GPU
        assert "head_dim 64 and 128" in kernels.triton_supported(q(D=D))


def test_rocm_arch_is_the_gfx_name(monkeypatch):
    """An MI300 reports capability 9.4 but is no Hopper: configs follow the gfx
    name, without NVIDIA-only options."""
    import types

    pytest.importorskip("triton")
    from comfyui_clear.kernels import clear_triton, tiling

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 4))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d=None: types.SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-"))
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert clear_triton.device_arch(torch.device("cuda:0")) == "gfx942"
    amd = tiling.kernel_config(128, 16, 1, "gfx942")
    assert amd["maxnreg"] is None and amd != tiling.kernel_config(128, 16, 1, 90)
    monkeypatch.setattr(torch.version, "hip", None)
    assert clear_triton.device_arch(torch.device("cuda:0")) == 94


def test_specialisation_mirror_matches_triton():
    """The pure-Python specialisation rule (for Triton builds without the native
    one) gives what Triton's launcher computes."""
    pytest.importorskip("triton")
    native = pytest.importorskip("triton.runtime.jit").__dict__.get("native_specialize_impl")
    if native is None:
        pytest.skip("this Triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    from comfyui_clear.kernels import clear_triton

    from triton.backends.amd.compiler import HIPBackend

    buf = torch.empty(64, dtype=torch.bfloat16)
    # ROCm: whether the whole allocation is below 2 GiB (a view of a larger one is not)
    big = torch.empty(2 ** 30, dtype=torch.bfloat16, device="meta")
    edge = torch.empty(2 ** 30 - 1, dtype=torch.bfloat16, device="meta")
    for value in (0, 1, 2, 16, 17, 21504, 2 ** 31 - 16, 2 ** 31, -16, 2 ** 63, 0.5, True, buf, buf[1:], buf[8:],
                  big, big[:64], edge, clear_triton._full_range(buf), clear_triton._full_range(edge)):
        for specialize in (True, False):
            if isinstance(value, torch.Tensor) and not specialize:
                continue
            for hip, backend in ((False, BaseBackend), (True, HIPBackend)):
                expected = tuple(native(backend, value, False, specialize, True))
                assert clear_triton._specialize_py(value, specialize, hip) == expected, (value, hip)
                assert clear_triton._specialize(value, specialize, hip) == expected, (value, hip)
    assert clear_triton._specialize(big, True, True)[1] == "D" and clear_triton._specialize(edge, True, True)[1] == "DS"
    assert clear_triton._specialize(clear_triton._full_range(edge), True, True)[1] == "D"


@pytest.mark.parametrize("arch", ["gfx942", "gfx1100"])
def test_rocm_variant_does_not_depend_on_allocation_size(arch):
    """Triton's AMD launcher compiles a pointer into an allocation below 2 GiB
    with buffer loads, another binary. The small first-use check must launch
    the variant of an 8K call, where the single block's v is a slice of
    linear1's 11 GB output: the kernel's pointers opt out (same variant)."""
    pytest.importorskip("triton.backends.amd.compiler")
    from comfyui_clear.kernels import clear_triton, tiling

    def variants(T, grid):
        B, H, D = 1, 24, 128
        L = T + grid[0] * grid[1]
        qk = torch.empty(B, H, L, D, dtype=torch.bfloat16, device="meta")
        linear1 = torch.empty(B, L, 7 * H * D, dtype=torch.bfloat16, device="meta")
        v = linear1[..., :3 * H * D].view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)[2]
        q, k, v, kp, vp = clear_triton.prepare(qk, qk, v)
        out = clear_triton._empty_output(B, L, H, D, q.dtype, "meta")
        table = torch.empty(64, 2, dtype=torch.int32, device="meta")
        launches = clear_triton.image_rows_launches(q, k, v, out, kp, vp, table, table, text_len=T, grid=grid,
                                                    window=16, scale=0.1, cfg=tiling.kernel_config(D, 16, 1, arch))
        return {clear_triton.launch_variant(args, kwargs, arch) for _, _, args, kwargs in launches}

    assert variants(77, (27, 29)) == variants(512, (512, 512))


# --- ComfyUI's TorchCompileModel ---------------------------------------------

def test_comfyui_torch_compile_node_on_tiny_flux(comfyui, auto_on_cpu, caplog):
    """ComfyUI's TorchCompileModel (torch.compile backend "eager": the node's
    own backends need a compiler toolchain) on the tiny FLUX patched with
    CLEAR, two latent sizes: the same images as uncompiled, Triton trusted."""
    import flux_tiny
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    from comfyui_clear.nodes import clear_patch

    torch._dynamo.reset()
    model = flux_tiny.make_tiny_flux()
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, "none (training-free)", 2, 2, False, 1.0)
    result = TorchCompileModel.execute(patched, backend="eager")
    compiled = result[0] if isinstance(result, tuple) else result.result[0]
    positive = flux_tiny.conditioning(3, seed=2)
    with caplog.at_level(logging.WARNING, logger="comfyui_clear"):
        for hw in ((6, 6), (8, 10)):
            latent = torch.randn(1, 16, *hw, generator=torch.Generator().manual_seed(1))
            plain = flux_tiny.sample_one_step(patched, latent, positive)
            n = len(auto_on_cpu)
            assert torch.equal(flux_tiny.sample_one_step(compiled, latent, positive), plain)
            assert set(auto_on_cpu[n:]) == {"triton"}
    assert not _clear_warnings(caplog)
    assert all(why is None for why in kernels._TRUST.values())
