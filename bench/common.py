"""Shared by the benchmarks: exact FLOP counts, timing, result files."""

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
SMOKE_NOTE = "cpu smoke run, not a benchmark"


# Exact pair counts live with the kernel's work model (one copy).
from comfyui_clear.kernels.tiling import local_pairs, pooled_count  # noqa: E402,F401


def clear_flops(batch, heads, head_dim, text_len, h, w, r, d=1):
    """FLOPs CLEAR must do (QK^T and PV, 2 each per pair and channel): text rows
    see T + N keys, image rows see T text keys, their disc and the pooled keys."""
    n = h * w
    pairs = text_len * (text_len + n) + n * text_len + local_pairs(h, w, r) + n * pooled_count(h, w, d)
    return 4 * batch * heads * head_dim * pairs


def dense_flops(batch, heads, head_dim, text_len, h, w):
    seq = text_len + h * w
    return 4 * batch * heads * head_dim * seq * seq


def flex_mask_bytes(q_len, kv_len, block=128):
    """Memory a FlexAttention BlockMask holds: int32 block indices for partial
    and full blocks, each also transposed (for the backward), so 4 matrices of
    (q blocks x kv blocks). Built without torch.compile, create_block_mask
    first materialises the whole q_len x kv_len mask (1 byte per pair, plus
    int64 temporaries): the reference compiles it, and so does the bench."""
    nq, nkv = -(-q_len // block), -(-kv_len // block)
    return 4 * nq * nkv * 4 + 4 * (nq + nkv) * 4


def time_ms(fn, repeats=20):
    """Median milliseconds of fn(): CUDA events through triton.testing.do_bench on
    a GPU (warm-up excluded), wall clock on the CPU."""
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=max(100, repeats * 10), return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(max(3, repeats // 4)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def time_long_ms(fn, repeats=3):
    """Median milliseconds of `repeats` calls of fn() that each take seconds
    (a whole model step), the caller having already warmed it up: do_bench
    would first run it 5 more times to estimate its length."""
    times = []
    for _ in range(max(1, repeats)):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def environment():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # a copy without .git: the caller may say
        commit = os.environ.get("CLEAR_GIT_COMMIT", "unknown")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
        "torch": torch.__version__, "triton": triton_version, "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
    }


def write_results(kind, payload, out=None):
    env = payload["environment"]
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")[:40]
    path = out or os.path.join(RESULTS, f"{kind}-{slug}-{env['date'][:10]}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path
