"""The benchmark scripts keep working: CPU smoke runs at tiny sizes (they are
benchmarks only on a GPU), and the exact FLOP counter they report against."""

import json
import os
import re
import subprocess
import sys
import time

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


def test_standalone_step_blocks_compute_comfyuis_flux_blocks(comfyui):
    """bench/flux_step.py --impl standalone (the step where ComfyUI cannot be
    installed) computes what ComfyUI's FLUX double and single blocks compute,
    given their weights: its timings are of the same work."""
    import flux_step
    from flux_tiny import make_tiny_flux

    dm = make_tiny_flux(depth=1, depth_single=1).model.diffusion_model
    lin = lambda i, o: torch.nn.Linear(i, o)  # noqa: E731
    norm = lambda d: torch.nn.RMSNorm(d, eps=1e-6)  # noqa: E731
    renames = [(r"_mod\.lin\.", "_mod."), (r"modulation\.lin\.", "mod."), (r"_attn\.(qkv|proj)\.", r"_\1."),
               (r"_attn\.norm\.(q|k)[a-z]*_norm\.(scale|weight)", r"_\1norm.weight"),  # QK gains: .scale (0.3.x)
               (r"^norm\.(q|k)[a-z]*_norm\.(scale|weight)", r"\1norm.weight")]

    def ours(block, theirs):
        state = {}
        for key, value in theirs.state_dict().items():
            for old, new in renames:
                key = re.sub(old, new, key)
            state[key] = value
        block.load_state_dict(state)  # strict: every weight has its counterpart
        return block

    double, single = ours(flux_step.DoubleBlock(256, 2, lin, norm), dm.double_blocks[0]), \
        ours(flux_step.SingleBlock(256, 2, lin, norm), dm.single_blocks[0])
    T, (h, w), gen = 5, (3, 4), torch.Generator().manual_seed(0)
    img, txt, vec = torch.randn(1, h * w, 256, generator=gen), torch.randn(1, T, 256, generator=gen), \
        torch.randn(1, 256, generator=gen)
    ids = torch.zeros(1, T + h * w, 3)
    ids[0, T:, 1], ids[0, T:, 2] = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    pe = dm.pe_embedder(ids)
    tables = flux_step.rope_tables(T, (h, w), 128, "cpu", axes=dm.params.axes_dim)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        want_img, want_txt = dm.double_blocks[0](img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, attn_mask=None,
                                                 transformer_options={})  # clones: ComfyUI adds in place
        got_img, got_txt = double(img, txt, vec, tables, sdpa)
        x = torch.cat([txt, img], 1)
        want_x = dm.single_blocks[0](x.clone(), vec=vec, pe=pe, attn_mask=None, transformer_options={})
        got_x = single(x, vec, tables, sdpa)
    for got, want in ((got_img, want_img), (got_txt, want_txt), (got_x, want_x)):
        assert ((got - want).norm() / want.norm()).item() < 1e-5


# --- bench/gpu_check.sh: the one GPU run, kept working by its dry mode ---------

import gpu_check  # noqa: E402  (bench/ is on sys.path above)


def test_gpu_check_dry_run(comfyui, tmp_path):
    """`bench/gpu_check.sh --dry`: every part and section on the CPU (tiny
    shapes, Triton's interpreter as "auto"'s first choice, Flex compiled by
    Dynamo, peers as labelled stand-ins, the FLUX step through ComfyUI and
    standalone), at most 8 files in one folder (what a lent GPU machine
    returns), a summary, exit 1 exactly where it reports a failure."""
    import flux_tiny

    out = tmp_path / "gpu"
    env = {**os.environ, "COMFYUI_PATH": comfyui, "PYTHON": sys.executable}
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry", "--out", str(out)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    report = json.loads((out / "gpu_check.json").read_text())
    assert res.returncode == (1 if report["failures"] else 0), res.stdout[-4000:] + res.stderr[-3000:]
    assert "DRY RUN" in res.stdout and "goals (H100/H200 bf16)" in res.stdout
    assert "goals (H100/H200 bf16)" in (out / "summary.txt").read_text()

    # what comes back from a lent machine: at most 8 plain files, the part JSONs merged into one
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= gpu_check.MAX_FILES, files
    assert {"gpu_check.json", "gpu_check.log", "summary.txt"} <= set(files) and files == report["files"]
    assert "[correctness] flux_trust" in (out / "gpu_check.log").read_text()

    assert report["dry"] is True
    assert {"device", "torch", "triton", "commit", "date", "command"} <= set(report["environment"])
    assert {name: part["status"] for name, part in report["parts"].items()} == {
        "install": "ok", "correctness": "ok" if not report["correctness"]["failures"] else "FAILED (exit 1)",
        "attention": "ok", "step": "ok", "distill": "ok"}
    # every section ran and reported, FLUX shapes first
    assert list(report["sections"]) == ["install"] + [f"correctness/{s}" for s in gpu_check.SECTIONS] + [
        "attention/dense_baselines", "attention/ours", "attention/flex", "attention/peers", "step/comfyui",
        "step/standalone", "distill/flux1-dev", "distill/flux2-klein-4b"]
    flux2 = "flux2" in flux_tiny.available_families()
    assert all(status.startswith("ran") or (not flux2 and name == "distill/flux2-klein-4b" and status.startswith("n/a"))
               for name, status in report["sections"].items()), report["sections"]
    assert report["install"]["status"].startswith("no wheels carried")

    corr = report["correctness"]
    assert list(corr["sections"]) == list(gpu_check.SECTIONS)
    assert all(s["status"] == "ok" and s["ran"] > 0 for s in corr["sections"].values())
    # "auto" must trust the Triton kernel (its interpreter here) for every FLUX variant
    assert corr["expect_triton"] and corr["flux_trust"] and corr["head_dim_64"]
    for entry in list(corr["flux_trust"].values()) + list(corr["head_dim_64"].values()):
        assert entry["triton"] == entry["torch"] == "pass" and entry["auto_ran"] == ["triton"]
        assert all(entry[f"{name}_ms"] > 0 for name in ("triton", "torch"))
    assert corr["flex_check"]["verdict"] == "pass" and corr["flex_check"]["ms"] > 0
    assert {r["dtype"] for r in corr["triton_vs_torch"]} == {"bfloat16", "float16"}
    assert all(r["ok"] and r["rel_err"] < 2e-2 for r in corr["triton_vs_torch"])
    assert corr["compile"] and all(r["ok"] for r in corr["compile"])
    # Flex at distinct proportional-attention scales (more than Dynamo's recompile limit), compiles
    # counted per variant; Dynamo's eager backend specialises floats here as Inductor does on a GPU,
    # and Flex takes the scale as a tensor: one compile per variant, no failure
    assert corr["recompile_limit"] == 8
    assert report["failures"] == [] and corr["flex_compiles"] == {"local": 1, "pooled": 1}
    assert corr["flex_distinct_scales"] == len(corr["flex_scales"]) > corr["recompile_limit"]
    assert all(r["ok"] for r in corr["flex_scales"])

    att = report["attention"]
    assert set(att["peers"]) == {"sol", "natten"} and all("stand-in" in s for s in att["peers"].values())
    assert att["dense"]["flash"] == "ok" and set(att["dense"]) == {"flash", "cudnn", "fa3"}
    assert att["dense"]["fa3"].startswith(("ok", "not importable"))
    assert [(r["grid"], r["down_factor"]) for r in att["rows"]] == [(12, 1), (12, 2)]
    assert {s["grid"] for s in att["skipped"]} == {16}  # the budget path
    for r in att["rows"]:
        assert r["dense_ms"] == min(r[f"dense_{n}_ms"] for n in att["dense"] if f"dense_{n}_ms" in r)
        assert r["dense_ms"] == r[f"dense_{r['dense_backend']}_ms"]
        assert r["sol_ms"] > 0 and r["natten_ms"] > 0 and r["natten_kernel"] % 2 == 1
        assert r["percent_of_ceiling"] == pytest.approx(r["percent_of_ideal"] * r["issued_over_useful"])
    assert "fastest dense (the comparison, x dense)" in res.stdout

    comfy_row, standalone_row = report["step"]["rows"]
    assert comfy_row["impl"] == "comfyui" and standalone_row["impl"] == "standalone"
    assert comfy_row["chunk_tokens"] == 32 and comfy_row["clear_chunked_ms"] and comfy_row["dense_chunked_ms"]
    assert comfy_row["clear_chunked_rel_err"] < 1e-4 and comfy_row["dense_chunked_rel_err"] < 1e-4
    assert standalone_row["clear_ms"] > 0 and "chunk_tokens" not in standalone_row
    # the distillation section: the trainer's steps on tiny shapes, timed, beside the memory model
    lora, full = report["distill"]["rows"]
    assert (lora["run"], lora["mode"], lora["status"], lora["steps_done"]) == ("flux1-dev", "lora", "ok", 2)
    assert lora["seconds_per_step"] > 0 and lora["modelled_total_bytes"] > 0
    assert full["run"] == "flux2-klein-4b" and (full["status"], full["mode"]) == (("ok", "full") if flux2 else (
        "n/a: this ComfyUI builds no FLUX.2 (0.33 or newer does)", "full"))
    assert "distill [flux1-dev] lora prodigy" in (out / "summary.txt").read_text()
    assert [g["goal"] for g in report["goals"]] == [g[0] for g in gpu_check.GOALS]
    assert all(g["met"] is None for g in report["goals"])  # no 8K/4K rows in a dry run
    if report["plots"]:  # matplotlib present
        assert sorted(report["plots"]) == ["attention.png", "flux_step.png"]
        assert all((out / p).stat().st_size > 10_000 for p in report["plots"])


def test_gpu_check_holds_its_deadline(tmp_path):
    """--total-s is a deadline for the whole run from gpu_check.sh's start: a
    part gets what is left of it (minus the reserve for the summary) and is
    stopped there; the JSON and summary are still written."""
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable}
    start = time.time()
    total = 20  # well below the dry correctness part's own run (~40 s on 2 idle cores)
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry", "--total-s", str(total), "--parts", "correctness",
                          "attention", "--out", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    took = time.time() - start
    report = json.loads((out / "gpu_check.json").read_text())
    assert took < total + 10, (took, res.stdout[-3000:])
    assert report["total_s"] == total and report["parts"]["correctness"]["budget_s"] <= total - gpu_check.RESERVE_S
    # stopped at the deadline (or skipped, where start-up took all but the reserve)
    assert report["parts"]["correctness"]["status"].startswith(("TIMED OUT", "SKIPPED"))
    assert report["parts"]["attention"]["status"].startswith("SKIPPED")
    assert res.returncode == 1 and any("dry run: section" in f for f in report["failures"])  # not every section ran
    assert (out / "summary.txt").exists() and len(report["files"]) <= gpu_check.MAX_FILES


def test_gpu_check_output_folder_limits(tmp_path):
    """More than 8 files, a folder three deep or an odd name: reported, as a
    lent machine would not return them."""
    for i in range(7):
        (tmp_path / f"f{i}.json").write_text("{}")
    assert gpu_check.out_files(tmp_path) == (sorted(f"f{i}.json" for i in range(7)), [])
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("")
    (tmp_path / "odd name.txt").write_text("")
    files, problems = gpu_check.out_files(tmp_path)
    assert len(files) == 9 and len(problems) == 3, problems
    assert any("at most 8" in p for p in problems) and any("2 folders down" in p for p in problems)
    assert any("odd name.txt" in p for p in problems)


def test_gpu_check_counts_flex_compiles(tmp_path):
    """FlexAttention at more distinct proportional-attention scales than
    Dynamo's recompile limit, compiled through Dynamo on the CPU: with a
    backend that keeps the scale symbolic, one compile per variant, every
    call right, no failure; the counts come from Dynamo's own counter."""
    from comfyui_clear.kernels import flex

    saved = flex.COMPILE_DEVICES, flex.COMPILE_BACKEND, flex._COMPILED
    path = tmp_path / "c.json"
    assert gpu_check.correctness(str(path), 300, True, sections=("flex_scales",), specialize_float=False) == 0
    assert (flex.COMPILE_DEVICES, flex.COMPILE_BACKEND, flex._COMPILED) == saved, "dry mode leaked its regime"
    data = json.loads(path.read_text())
    assert data["failures"] == [] and data["flex_compiles"] == {"local": 1, "pooled": 1}
    assert data["flex_distinct_scales"] == len(data["flex_scales"]) > data["recompile_limit"]
    assert [r["compiled_graphs"] for r in data["flex_scales"] if r["down_factor"] == 1][0] == 1
    assert all(r["ok"] and r["rel_err"] < 2e-2 for r in data["flex_scales"])
    assert data["flex_check"]["verdict"] == "pass"


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
    fast_device = kernels._fast_device
    assert gpu_check.correctness(str(tmp_path / "c.json"), 60, True, sections=("flux_triton",)) == 1
    assert (selfcheck.BATCH, selfcheck.TEXT_LEN, selfcheck.check_grid) == check_problem, "dry mode leaked its shrink"
    assert kernels._fast_device is fast_device, "dry mode leaked its regime"
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["failures"] and all(f.startswith("flux_triton: Triton vs torch path") for f in data["failures"])


def test_gpu_check_goals_and_part_timeout(tmp_path):
    att = {"rows": [{"grid": 512, "window": 16, "down_factor": 1, "percent_of_ideal": 61.0,
                     "percent_of_ceiling": 80.0, "speedup_vs_flex": 3.2}]}
    step = {"rows": [{"image_px": 8192, "speedup": 9.0, "clear_peak_gib": 30.0, "dense_peak_gib": 28.0,
                      "impl": "comfyui"},
                     {"image_px": 4096, "speedup": 3.0, "impl": "standalone"}]}  # ComfyUI's rows win
    got = {g["goal"]: (g["measured"], g["met"]) for g in gpu_check.goals(att, step)}
    assert got == {"kernel_ideal": (61.0, True), "kernel_ceiling": (80.0, False), "vs_flex": (3.2, True),
                   "step_8k": (9.0, True), "step_4k": (None, None), "peak_8k": (30.0 / 28.0, False)}
    # a part past its budget is stopped and reported (None), not waited for
    rc, elapsed, _ = gpu_check._run([sys.executable, "-c", "import time; print('started', flush=True); "
                                     "time.sleep(60)"], str(tmp_path / "log"), 2)
    assert rc is None and elapsed < 30 and "started" in (tmp_path / "log").read_text()


def test_gpu_check_skips_the_distillation_when_time_is_short(comfyui, tmp_path):
    """The distillation part runs last on what is left: below its minimum it
    is skipped with a line saying so (and how to run it alone), and reported."""
    out = tmp_path / "gpu"
    env = {**os.environ, "COMFYUI_PATH": comfyui, "PYTHON": sys.executable}
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry", "--total-s", "12", "--parts", "distill", "--out",
                          str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "gpu_check.json").read_text())
    assert "[distill] skipped:" in res.stdout and "--parts distill" in res.stdout, res.stdout[-3000:]
    assert report["parts"]["distill"]["status"] == "SKIPPED: total time spent"
    assert report["sections"]["distill/flux1-dev"] == "not run: skipped for time"
    assert gpu_check.BUDGETS["distill"] >= gpu_check.DISTILL_MIN_S
    assert sum(v for k, v in gpu_check.BUDGETS.items() if k != "distill") + gpu_check.RESERVE_S == gpu_check.TOTAL_S
