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


# --- bench/gpu_check.sh: the one GPU run, kept working by its dry mode ---------

import gpu_check  # noqa: E402  (bench/ is on sys.path above)


def test_gpu_check_dry_run(comfyui, tmp_path):
    """`bench/gpu_check.sh --dry`: every part on the CPU (tiny shapes, Triton's
    interpreter, peers as labelled stand-ins), one folder with the JSON and
    the plots, a summary, exit 0."""
    out = tmp_path / "gpu"
    env = {**os.environ, "COMFYUI_PATH": comfyui, "PYTHON": sys.executable}
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry", "--out", str(out)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    assert "DRY RUN" in res.stdout and "goals (H100/H200 bf16)" in res.stdout
    assert "goals (H100/H200 bf16)" in (out / "summary.txt").read_text()
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry"] is True and report["failures"] == []
    assert {"device", "torch", "triton", "commit", "date", "command"} <= set(report["environment"])
    assert {name: part["status"] for name, part in report["parts"].items()} == {
        "install": "ok", "correctness": "ok", "attention": "ok", "step": "ok"}
    assert all(part["elapsed_s"] >= 0 for part in report["parts"].values())
    assert set(json.loads((out / "install.json").read_text())) == {"comfy-kitchen>=0.2.40", "natten>=0.17"}

    corr = report["correctness"]
    assert corr["failures"] == [] and corr["skipped"] == []
    assert {r["dtype"] for r in corr["triton_vs_torch"]} == {"bfloat16", "float16"}
    assert all(r["ok"] and r["rel_err"] < 2e-2 for r in corr["triton_vs_torch"])
    assert corr["self_check"] and all(v["triton"] == v["flex"] == v["torch"] == "pass"
                                      for v in corr["self_check"].values())
    assert all(v[f"{name}_ms"] > 0 for v in corr["self_check"].values() for name in ("triton", "flex", "torch"))
    assert all("torch" in v["auto_ran"] for v in corr["self_check"].values())  # "auto" off CUDA: the torch path
    assert corr["compile"] and all(r["ok"] for r in corr["compile"])
    assert len(corr["flex_sizes"]) > corr["recompile_limit"] and all(r["ok"] for r in corr["flex_sizes"])

    att = report["attention"]
    assert set(att["peers"]) == {"sol", "natten"} and all("stand-in" in s for s in att["peers"].values())
    assert [(r["grid"], r["down_factor"]) for r in att["rows"]] == [(12, 1), (12, 2)]
    assert {s["grid"] for s in att["skipped"]} == {16}  # the budget path
    for r in att["rows"]:
        assert r["sol_ms"] > 0 and r["natten_ms"] > 0 and r["natten_kernel"] % 2 == 1
        assert r["percent_of_ceiling"] == pytest.approx(r["percent_of_ideal"] * r["issued_over_useful"])

    (row,) = report["step"]["rows"]
    assert row["chunk_tokens"] == 32 and row["clear_chunked_ms"] and row["dense_chunked_ms"]
    assert row["clear_chunked_rel_err"] < 1e-4 and row["dense_chunked_rel_err"] < 1e-4
    assert [g["goal"] for g in report["goals"]] == [g[0] for g in gpu_check.GOALS]
    assert all(g["met"] is None for g in report["goals"])  # no 8K/4K rows in a dry run
    if report["plots"]:  # matplotlib present
        assert sorted(report["plots"]) == ["attention.png", "flux_step.png"]
        assert all((out / p).stat().st_size > 10_000 for p in report["plots"])


def test_gpu_check_fails_on_a_mismatch(tmp_path, monkeypatch):
    """A Triton result 5% off the torch path is a failure (exit status 1)."""
    from comfyui_clear import kernels

    exact = kernels.clear_attention

    def off_by_five_percent(q, k, v, **kwargs):
        if kwargs.get("backend") == "triton":
            return exact(q, k, v, **{**kwargs, "backend": "torch"}) * 1.05
        return exact(q, k, v, **kwargs)

    monkeypatch.setattr(kernels, "clear_attention", off_by_five_percent)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from comfyui_clear.kernels import selfcheck
    check_problem = selfcheck.BATCH, selfcheck.TEXT_LEN, selfcheck.check_grid
    assert gpu_check.correctness(str(tmp_path / "c.json"), 60, True, sections=("triton",)) == 1
    assert (selfcheck.BATCH, selfcheck.TEXT_LEN, selfcheck.check_grid) == check_problem, "dry mode leaked its shrink"
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["failures"] and all("Triton vs torch path" in f for f in data["failures"])


def test_gpu_check_goals_and_part_timeout(tmp_path):
    att = {"rows": [{"grid": 512, "window": 16, "down_factor": 1, "percent_of_ideal": 61.0,
                     "percent_of_ceiling": 80.0, "speedup_vs_flex": 3.2}]}
    step = {"rows": [{"image_px": 8192, "speedup": 9.0, "clear_peak_gib": 30.0, "dense_peak_gib": 28.0}]}
    got = {g["goal"]: (g["measured"], g["met"]) for g in gpu_check.goals(att, step)}
    assert got == {"kernel_ideal": (61.0, True), "kernel_ceiling": (80.0, False), "vs_flex": (3.2, True),
                   "step_8k": (9.0, True), "step_4k": (None, None), "peak_8k": (30.0 / 28.0, False)}
    # a part past its budget is stopped and reported (None), not waited for
    rc, elapsed, _ = gpu_check._run([sys.executable, "-c", "import time; print('started', flush=True); "
                                     "time.sleep(60)"], str(tmp_path / "log"), 2)
    assert rc is None and elapsed < 30 and "started" in (tmp_path / "log").read_text()
