"""Backend choice: "auto" trusts the Triton kernel only after a first-use
self-check against the torch path, falls back to FlexAttention (checked the
same way) and then to torch with one warning; CLEAR_ATTENTION_BACKEND forces
one. On the CPU: Triton runs under TRITON_INTERPRET=1 and Flex eagerly, and
"auto" is widened to the CPU for these tests."""

import logging
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import pytest
import torch

import comfyui_clear.kernels as kernels
from comfyui_clear.kernels import clear_attention
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


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """Fresh trust state, "auto" considering the CPU a fast device, and a log of
    which backend each call ran."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to run the Triton kernel on the CPU")
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "_TRUST", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    monkeypatch.setattr(kernels, "_fast_device", lambda q: True)
    # the GPU check problem, shrunk for the interpreter (still several tiles and borders)
    monkeypatch.setattr(kernels, "_CHECK_SHAPE", dict(batch=1, heads=1, text_len=3, grid=(9, 11)))
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    ran = []
    real = kernels._run_backend

    def spy(name, *args):
        ran.append(name)
        return real(name, *args)

    monkeypatch.setattr(kernels, "_run_backend", spy)
    return ran


def _clear_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "first-use check" in r.getMessage()]


@pytest.mark.parametrize("d", [1, 2])
def test_auto_trusts_triton_after_its_check(auto_on_cpu, caplog, d):
    q, k, v = _inputs()
    out = _call(q, k, v, d=d)
    assert auto_on_cpu[-1] == "triton" and "triton" in auto_on_cpu[:-1]  # the check ran the kernel first
    assert rel_err(out, _oracle(q, k, v, d)) < 1e-5
    assert not _clear_warnings(caplog)
    n = len(auto_on_cpu)
    _call(q, k, v, d=d)
    assert auto_on_cpu[n:] == ["triton"], "checked once per (device, dtype, head_dim, config)"


def test_compile_failure_falls_back_to_flex_with_one_warning(auto_on_cpu, caplog, monkeypatch):
    from comfyui_clear.kernels import clear_triton

    def broken(*args, **kwargs):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_999 (simulated compile failure)")

    monkeypatch.setattr(clear_triton, "clear_attention_triton", broken)
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
    assert "wrong result" in warning.getMessage() and "bfloat16" in warning.getMessage()


def test_flex_failing_too_falls_back_to_torch(auto_on_cpu, caplog, monkeypatch):
    from comfyui_clear.kernels import clear_triton, flex

    def broken(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(clear_triton, "clear_attention_triton", broken)
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


def test_auto_stays_on_torch_off_cuda(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    q, k, v = _inputs()
    assert kernels._auto_backend(q, 4, 1) == "torch"


@pytest.mark.parametrize("T,h,w,r,d,dtype", [(5, 9, 11, 4, 1, torch.float32), (0, 7, 9, 3, 2, torch.float32),
                                              (3, 10, 13, 5, 4, torch.bfloat16)])
def test_flex_backend_matches_oracle(T, h, w, r, d, dtype):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, T + h * w, 16, generator=gen).to(dtype) for _ in range(3))
    out = clear_attention(q, k, v, text_len=T, grid=(h, w), window=r, down_factor=d, backend="flex")
    assert out.dtype == dtype
    assert rel_err(out, clear_oracle(q, k, v, T, (h, w), r, d)) < (1e-5 if dtype == torch.float32 else 1e-2)
