"""The benchmark scripts keep working: CPU smoke runs at tiny sizes (they are
benchmarks only on a GPU), and the exact FLOP counter they report against."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import common  # noqa: E402


def _brute_force_local_pairs(h, w, r):
    ys = torch.arange(h).repeat_interleave(w)
    xs = torch.arange(w).repeat(h)
    return int((((ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2) < r * r).sum())


@pytest.mark.parametrize("h,w,r", [(1, 1, 1), (5, 7, 2), (9, 4, 3), (12, 12, 5), (6, 3, 20), (16, 16, 16)])
def test_exact_flop_counter(h, w, r):
    assert common.local_pairs(h, w, r) == _brute_force_local_pairs(h, w, r)


def test_clear_flops_match_the_oracle_mask():
    """4*D per allowed (query, key) pair: text rows see text + image keys, image
    rows text keys, their disc and every pooled key (3 x 3 of them here)."""
    T, h, w, r, d = 3, 5, 6, 2, 2
    n = h * w
    allowed = T * (T + n) + n * T + _brute_force_local_pairs(h, w, r) + n * 3 * 3
    assert common.clear_flops(1, 1, 1, T, h, w, r, d) == 4 * allowed
    assert common.dense_flops(1, 1, 1, T, h, w) == 4 * (T + n) ** 2


def _run(args, timeout=300):
    res = subprocess.run([sys.executable] + args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_attention_bench_cpu_smoke(tmp_path):
    out = tmp_path / "att.json"
    stdout = _run(["bench/attention.py", "--quick", "--out", str(out)])
    assert "CPU SMOKE RUN" in stdout
    data = json.loads(out.read_text())
    assert data["cpu_smoke_run"] is True and common.SMOKE_NOTE in data["notes"]
    assert {"device", "torch", "triton", "commit", "date", "command"} <= set(data["environment"])
    rows = data["rows"]
    assert len(rows) == 8
    for row in rows:
        assert row["rel_err_vs_torch_path"] < 1e-5
        # Flex (eager on the CPU) with the bench's own mask_mod agrees with ours:
        # a wrong disc, text row or pooled-key rule would not
        assert row["flex_mode"] == "eager (cpu smoke)" and row["flex_vs_ours_rel_err"] < 1e-5
        assert row["clear_flops"] == common.clear_flops(1, row["heads"], row["head_dim"], row["text_len"],
                                                        row["grid"], row["grid"], row["window"], row["down_factor"])
        assert row["clear_flops"] < row["dense_flops"]
        assert row["percent_of_ideal"] == pytest.approx(100 * row["speedup_vs_dense"] / row["flop_ratio"])
    pytest.importorskip("matplotlib", reason="plot needs matplotlib")
    _run(["bench/plot.py", str(out)])
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_flux_step_bench_cpu_smoke(comfyui, tmp_path):
    """bench/flux_step.py runs ComfyUI's Flux code (in a subprocess)."""
    for blocks in ("full", "one"):
        out = tmp_path / f"step-{blocks}.json"
        stdout = _run(["bench/flux_step.py", "--tiny", "--blocks", blocks, "--comfyui", comfyui, "--out", str(out)])
        assert "CPU SMOKE RUN" in stdout
        data = json.loads(out.read_text())
        assert data["cpu_smoke_run"] is True and common.SMOKE_NOTE in data["notes"]
        rows = data["rows"]
        assert [r["image_px"] for r in rows] == [128, 192]
        for r in rows:
            assert r["speedup"] == pytest.approx(r["dense_ms"] / r["clear_ms"])
            if blocks == "full":
                assert r["dense_ms"] > 0 and r["clear_ms"] > 0
            else:  # composed from block timings (CPU noise can make a difference negative)
                for name in ("dense", "clear"):
                    assert r[f"{name}_ms"] == pytest.approx(r[f"{name}_rest_ms"] + 2 * r[f"{name}_double_block_ms"]
                                                            + 2 * r[f"{name}_single_block_ms"])
