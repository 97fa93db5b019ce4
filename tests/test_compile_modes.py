"""Compile modes: CUDA graphs and the multi-GPU split's threads.

- A CUDA graph (torch.compile ``mode="reduce-overhead"``, the cudagraphs
  backend) records the addresses of the cached tile schedules and BlockMasks
  it reads: a cache entry handed out while a graph records is never freed,
  however many other shapes come after (the caches once cleared themselves at
  64 schedules / 8 masks). There is no GPU here: "a graph is recording" is
  faked (``kernels._graph_recording``); the eviction around it is real.
- The split's workers reach their first call at once: each (device, variant)
  is checked (and compiled) once, one thread at a time, and the other threads
  reuse the verdict; a thread's launch record holds only its own launches.
  Real threads on the CPU, Triton under TRITON_INTERPRET=1, "auto" widened
  to the CPU as in test_backends.py. (Flex's one compile per scale is in
  test_flex.py.)
"""

import gc
import os
import threading
import time
import weakref

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import pytest
import torch

import comfyui_clear.kernels as kernels
from comfyui_clear.kernels import clear_attention, selfcheck
from oracle import clear_oracle, rel_err


def _recording(monkeypatch, state):
    monkeypatch.setattr(kernels, "_graph_recording", lambda device: state[0], raising=False)


def test_schedule_a_graph_recorded_is_never_freed(monkeypatch):
    clear_triton = pytest.importorskip("comfyui_clear.kernels.clear_triton")
    from comfyui_clear.kernels.tiling import kernel_config

    recording = [True]
    _recording(monkeypatch, recording)
    cfg = kernel_config(16, 3)
    cpu = torch.device("cpu")
    recorded = clear_triton._device_schedule((9, 301), 3, cfg, cpu)  # looked up while a graph records
    ptrs = [t.data_ptr() for t in recorded]
    refs = [weakref.ref(t) for t in recorded]
    recording[0] = False
    other = [weakref.ref(t) for t in clear_triton._device_schedule((9, 302), 3, cfg, cpu)]
    del recorded
    for i in range(100):  # a long session of many sizes, well past the cache's 64
        clear_triton._device_schedule((10, 300 + i), 3, cfg, cpu)
    gc.collect()
    assert all(r() is not None for r in refs), "a schedule a CUDA graph recorded was freed"
    again = clear_triton._device_schedule((9, 301), 3, cfg, cpu)
    assert [t.data_ptr() for t in again] == ptrs  # the graph's addresses still hold it
    assert all(r() is None for r in other), "entries no graph recorded are still evicted"
    assert len(clear_triton._SCHEDULES) <= 64 + 1


def test_block_mask_a_graph_recorded_is_never_freed(monkeypatch):
    pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")
    from comfyui_clear.kernels import flex

    recording = [True]
    _recording(monkeypatch, recording)
    recorded = flex.clear_block_mask(3, (7, 140), 2, "cpu")
    tensors = [recorded.kv_indices, recorded.full_kv_indices, recorded.q_indices]
    ptrs = [t.data_ptr() for t in tensors]
    refs = [weakref.ref(t) for t in tensors]
    recording[0] = False
    other = weakref.ref(flex.clear_block_mask(3, (7, 141), 2, "cpu").kv_indices)
    del recorded, tensors
    for i in range(12):  # past the cache's 8
        flex.clear_block_mask(3, (8, 140 + i), 2, "cpu")
    gc.collect()
    assert all(r() is not None for r in refs), "a BlockMask a CUDA graph recorded was freed"
    again = flex.clear_block_mask(3, (7, 140), 2, "cpu")
    assert [t.data_ptr() for t in (again.kv_indices, again.full_kv_indices, again.q_indices)] == ptrs
    assert other() is None, "entries no graph recorded are still evicted"
    assert len(flex._MASKS) <= 8 + 1


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """"auto" on the CPU (Triton interpreted, Flex eager) with a small check."""
    pytest.importorskip("triton")
    pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to run the Triton kernel on the CPU")
    monkeypatch.setattr(kernels, "_TRUST", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.setattr(kernels, "_fast_device", lambda q: True)
    monkeypatch.setattr(selfcheck, "BATCH", 1)
    monkeypatch.setattr(selfcheck, "TEXT_LEN", 3)
    monkeypatch.setattr(selfcheck, "check_grid", lambda window, down_factor: (9, 11))
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)


def test_split_workers_check_each_variant_once_one_at_a_time(auto_on_cpu, monkeypatch):
    """Three band workers (threads) reach their first attention call at once,
    with pooled keys: each trust key is checked once, never two checks at a
    time, every worker runs Triton, and the bands give the one-device result."""
    from test_band_split import _run_bands

    checks, active, overlap = [], [0], [0]
    lock = threading.Lock()
    real_check = kernels._self_check

    def check(name, device, dtype, head_dim, window, down_factor):
        with lock:
            active[0] += 1
            overlap[0] = max(overlap[0], active[0])
            checks.append((name, str(device), dtype, head_dim, down_factor))
        try:
            time.sleep(0.3)  # widen the window another worker would race into
            return real_check(name, device, dtype, head_dim, window, down_factor)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(kernels, "_self_check", check)
    B, H, D, T, grid, r, d = 1, 2, 16, 3, (12, 10), 3, 2
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T + grid[0] * grid[1], D, generator=gen) for _ in range(3))
    kw = dict(text_len=T, grid=grid, window=r, down_factor=d, spatial_weight=None, scale=D ** -0.5)
    got, _ = _run_bands(q, k, v, 3, **kw)
    assert rel_err(got, clear_oracle(q, k, v, T, grid, r, d)) < 1e-5
    assert overlap[0] == 1, "two first-use checks ran at once"
    trust_keys = [key for key in kernels._TRUST if key[0] == "triton"]
    assert trust_keys and all(why is None for why in kernels._TRUST.values())
    assert len(checks) == len(trust_keys), f"{len(checks)} checks for {len(trust_keys)} variants: {checks}"
    assert {backend for backend, _ in kernels.backend_choices().values()} == {"triton"}


def test_launch_records_stay_in_their_thread():
    """A thread recording its self-check's launches does not see another
    thread's launches (which would trust a variant its check never ran)."""
    clear_triton = pytest.importorskip("comfyui_clear.kernels.clear_triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 to run the Triton kernel on the CPU")
    recording, launched = threading.Event(), threading.Event()
    records = {}

    def recorder():
        with clear_triton.recorded_variants() as seen:
            recording.set()
            launched.wait(60)
            records["idle"] = set(seen)

    def launcher():
        recording.wait(60)
        T, grid = 3, (6, 7)
        q, k, v = (torch.randn(1, 2, T + 42, 16) for _ in range(3))
        with clear_triton.recorded_variants() as seen:
            clear_triton.clear_attention_triton(q, k, v, text_len=T, grid=grid, window=2, scale=0.25)
        records["launcher"] = set(seen)
        launched.set()

    threads = [threading.Thread(target=recorder), threading.Thread(target=launcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(records["launcher"]) == 1
    assert records["idle"] == set(), "another thread's launch landed in this thread's record"
