"""One run that checks CLEAR on a GPU and measures it against every peer:
the first thing to run whenever a GPU is available (bench/README.md, "GPU
check"). Under 8 minutes on an H100/H200; each part has a time budget and is
cut short (what it measured is kept) past it.

    bench/gpu_check.sh                    # GPU: everything, results in $OUT or bench/results/gpu-<date>/
    bench/gpu_check.sh --parts correctness attention
    bench/gpu_check.sh --dry              # CPU: tiny shapes, every code path (CI; also GPU_CHECK_DRY=1)

Parts (each a subprocess with its own budget, elapsed time printed):
  install      pip-installs the peers in bench/requirements-gpu.txt (wheels only,
               no dependencies: torch is never replaced); a failure marks that
               peer "not installed"
  correctness  Triton vs the exact torch path on FLUX shapes, the first-use
               self-check's verdict per variant, the same under torch.compile,
               FlexAttention at more image sizes than Dynamo's recompile limit
  attention    bench/attention.py: dense flash, FlexAttention, sol_attn, NATTEN, ours
  step         bench/flux_step.py: one FLUX.1-dev-sized step at 4K and 8K, dense vs
               CLEAR, with and without token chunking, peak memory

Writes gpu_check.json (device, versions, commit, date, command, every part's
status and the goals), each part's JSON and log, and PNG plots into one
folder; prints a summary. Exits non-zero on a correctness mismatch or a part
that crashed (a part stopped by its budget is reported, not an error).
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REQUIREMENTS = os.path.join(HERE, "requirements-gpu.txt")

# Seconds per part on an H100/H200 (470 s, the whole run capped at 450 s by
# --total-s: under the 8-minute goal with start-up). Attention stops starting new grids at 80% of its budget;
# correctness gives each section a share (SECTION_ENDS) and rolls unused time on.
BUDGETS = {"install": 30, "correctness": 170, "attention": 170, "step": 100}
DRY_BUDGETS = {"install": 20, "correctness": 240, "attention": 240, "step": 240}  # caps on a loaded CPU
PARTS = tuple(BUDGETS)

# Relative L2 error vs the float32 torch path (output rounding is ~4e-3 in bf16).
TOL = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-4}

GOALS = [  # (key, what, target, how it is measured)
    ("kernel_ideal", "kernel % of the FLOP-proportional ideal, 8K r16 d1", 60.0, "attention"),
    ("kernel_ceiling", "kernel % of the work-model ceiling, 8K r16 d1", 85.0, "attention"),
    ("vs_flex", "kernel speed-up over FlexAttention, 8K r16 d1", 3.0, "attention"),
    ("step_8k", "FLUX step speed-up over dense flash, 8K", 8.5, "step"),
    ("step_4k", "FLUX step speed-up over dense flash, 4K", 2.7, "step"),
    ("peak_8k", "FLUX step peak memory, CLEAR / dense, 8K (at most)", 1.05, "step"),
]


# ---------------------------------------------------------------------------
# correctness (runs in its own process: python bench/gpu_check.py --part correctness)

def _rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


SECTIONS = ("triton", "self_check", "compile", "flex")
# When each section must stop starting cases, as a fraction of the part's budget
# (Triton compiles 6 variants, Inductor and FlexAttention compile per shape).
SECTION_ENDS = {"triton": 0.30, "self_check": 0.42, "compile": 0.57, "flex": 0.95}


@contextlib.contextmanager
def _check_problem(grid, text_len):
    """The self-check's problem (kernels/selfcheck.py); given a grid (dry runs:
    the interpreter), shrunk as tests/test_backends.py does, restored after."""
    from comfyui_clear.kernels import selfcheck

    saved = selfcheck.BATCH, selfcheck.TEXT_LEN, selfcheck.check_grid
    if grid is not None:
        selfcheck.BATCH, selfcheck.TEXT_LEN = 1, text_len
        selfcheck.check_grid = lambda window, down_factor: grid
    try:
        yield selfcheck
    finally:
        selfcheck.BATCH, selfcheck.TEXT_LEN, selfcheck.check_grid = saved


def correctness(json_path, budget_s, dry, sections=SECTIONS):
    """Part 1, in its own process; returns the exit status (1 on any mismatch)."""
    import logging

    import torch

    from comfyui_clear import kernels
    from comfyui_clear.kernels import clear_attention

    sys.path.insert(0, HERE)
    from common import environment

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    t0 = time.perf_counter()
    res = {"environment": environment(), "dry": dry, "device_type": device, "triton_vs_torch": [],
           "self_check": {}, "compile": [], "flex_sizes": [], "failures": [], "skipped": [], "notes": []}

    def save():
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2, default=str)

    def fail(what):
        res["failures"].append(what)
        print("FAIL:", what, flush=True)

    def late(what):
        section = what.split()[0]
        if time.perf_counter() > t0 + SECTION_ENDS[section] * budget_s:
            res["skipped"].append(what)
            return True
        return False

    def inputs(B, H, L, D, dtype, seed):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return [torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]

    def exact(q, k, v, T, grid, r, d):
        return clear_attention(q.float(), k.float(), v.float(), text_len=T, grid=grid, window=r, down_factor=d,
                               backend="torch")

    dtypes = [torch.bfloat16, torch.float16]
    if dry:  # Triton's interpreter is slow: tiny shapes, each code path once
        H, D, T, grids, radii, downs = 1, 16, 5, [(7, 11)], [3], [1, 2]
        check_grid, check_text = (7, 11), 5  # the self-check's problem, shrunk (kernels/selfcheck.py)
    else:  # FLUX head_dim and text length; 1K-4K and odd grids (4 heads: errors do not depend on the count)
        H, D, T = 4, 128, 512
        check_grid = check_text = None  # the self-check's own problem
        grids, radii, downs = [(64, 64), (97, 131), (128, 128), (255, 189), (256, 256)], [8, 16, 32], [1, 4]

    # 1. Triton vs the exact torch path
    print(f"[correctness] Triton vs torch path: grids {grids}, r {radii}, d {downs}, bf16/fp16", flush=True)
    for gi, grid in enumerate(grids if "triton" in sections else []):
        L = T + grid[0] * grid[1]
        base = inputs(1, H, L, D, torch.float32, gi)
        for dtype in dtypes:
            q, k, v = (t.to(dtype) for t in base)
            why = kernels.triton_supported(q)
            if why is not None:
                (fail if cuda else res["skipped"].append)(f"triton at {dtype}: {why}")
                continue
            for d in downs:
                for r in radii:
                    if dry and (dtype == torch.bfloat16) != (d == 1):  # dry: bf16 d1 and fp16 d2 only
                        continue
                    name = f"grid {grid[0]}x{grid[1]} r{r} d{d} {str(dtype)[6:]}"
                    if late(f"triton {name}"):
                        continue
                    row = {"grid": grid, "window": r, "down_factor": d, "dtype": str(dtype)[6:], "heads": H,
                           "head_dim": D, "text_len": T}
                    try:
                        out = clear_attention(q, k, v, text_len=T, grid=grid, window=r, down_factor=d,
                                              backend="triton")
                        row["rel_err"] = _rel_err(out, exact(q, k, v, T, grid, r, d))
                        row["ok"] = row["rel_err"] < TOL[row["dtype"]]
                    except Exception as exc:
                        row["error"], row["ok"] = f"{type(exc).__name__}: {str(exc)[:300]}", False
                    res["triton_vs_torch"].append(row)
                    if not row["ok"]:
                        fail(f"Triton vs torch path, {name}: {row.get('error') or row['rel_err']}")
        save()

    # 2. the first-use self-check (kernels/selfcheck.py) per variant: each backend's verdict and what one
    # check costs (the second call: compiles excluded), then what "auto" runs on a problem of that size
    with _check_problem(check_grid, check_text) as selfcheck:
        print("[correctness] first-use self-check per variant", flush=True)
        # one per kernel configuration: 8x8 key blocks, with pooled keys, 2x8 blocks (r > 16 with d > 1)
        configs, head_dims = (((3, 1), (3, 2)), (16,)) if dry else (((16, 1), (16, 4), (32, 4)), (64, 128))
        variants = [(dt, hd, r, d) for dt in dtypes for hd in head_dims for r, d in configs
                    if not dry or (dt == torch.bfloat16) == (d == 1)]
        for dtype, hd, r, d in variants if "self_check" in sections else []:
            key = f"{str(dtype)[6:]} head_dim {hd} r{r} d{d}"
            if late(f"self_check {key}"):
                continue
            grid, t = selfcheck.check_grid(r, d), selfcheck.TEXT_LEN
            entry, outs = {"check_grid": grid, "check_text_len": t, "check_batch": selfcheck.BATCH}, {}
            for name in ("triton", "flex", "torch"):
                try:
                    why = kernels._self_check(name, torch.device(device), dtype, hd, r, d)  # compiles
                    start = time.perf_counter()
                    why = kernels._self_check(name, torch.device(device), dtype, hd, r, d)  # synchronises inside
                    entry[f"{name}_ms"] = round(1e3 * (time.perf_counter() - start), 2)
                    entry[name] = "pass" if why is None else why
                except Exception as exc:  # the check must never raise: that is a finding too
                    entry[name] = f"check raised {type(exc).__name__}: {str(exc).strip()[:200]}"
                    fail(f"the self-check raised for {name} {key}: {entry[name]}")
            q, k, v = inputs(1, 2, t + grid[0] * grid[1], hd, dtype, 99)
            ref = exact(q, k, v, t, grid, r, d)
            try:
                auto = clear_attention(q, k, v, text_len=t, grid=grid, window=r, down_factor=d)
                entry["auto_rel_err"] = _rel_err(auto, ref)
            except Exception as exc:
                auto, entry["auto_error"] = None, f"{type(exc).__name__}: {str(exc)[:300]}"
                fail(f"auto backend raised for {key}: {entry['auto_error']}")
            for name in ("triton", "flex", "torch"):
                try:
                    outs[name] = clear_attention(q, k, v, text_len=t, grid=grid, window=r, down_factor=d, backend=name)
                except Exception:
                    pass  # its verdict above says why
            # what "auto" ran, from the public API: the backends whose output it reproduces bit for bit
            entry["auto_ran"] = [n for n, o in outs.items() if auto is not None and torch.equal(o, auto)]
            entry["verdict"] = "|".join(entry["auto_ran"]) or "none of the forced backends"
            res["self_check"][key] = entry
            print(f"  {key}: auto ran {entry['verdict']}; check triton {entry['triton']} "
                  f"({entry.get('triton_ms', '-')} ms), flex {entry['flex']} ({entry.get('flex_ms', '-')} ms)",
                  flush=True)
            if cuda and entry["triton"] != "pass":
                fail(f"the Triton kernel fails its check for {key}: {entry['triton']}")
            if cuda and "triton" not in entry["auto_ran"]:
                fail(f"auto did not run the Triton kernel for {key} on a GPU (ran {entry['verdict']})")
            if entry.get("auto_rel_err", 0) >= TOL[str(dtype)[6:]]:
                fail(f"auto backend wrong for {key}: relative error {entry['auto_rel_err']:.2e}")
    choices = getattr(kernels, "backend_choices", None)
    if choices is not None and "self_check" in sections:  # what "auto" chose and why, as the package reports it
        try:
            res["backend_choices"] = {str(key): list(val) if isinstance(val, tuple) else val
                                      for key, val in choices().items()}
            for key, val in res["backend_choices"].items():
                if cuda and (val[0] if isinstance(val, list) else val) != "triton":
                    fail(f"auto chose {val} for {key} on a GPU")
        except Exception as exc:
            res["backend_choices"] = f"{type(exc).__name__}: {exc}"
            res["notes"].append("kernels.backend_choices() failed; verdicts above come from forced runs")
    else:
        res["notes"].append("kernels.backend_choices() not present; verdicts come from forced runs per backend")
    save()

    # 3. the same under torch.compile (inductor on a GPU; Dynamo's eager backend in dry runs)
    compile_backend = "inductor" if cuda else "eager"
    cases = [((7, 11), 3, 2)] if dry else [((64, 64), 16, 1), ((97, 131), 16, 4), ((128, 128), 32, 1)]
    print(f"[correctness] torch.compile ({compile_backend}): {cases}", flush=True)
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        counters = {}
    for grid, r, d in cases if "compile" in sections else []:
        name = f"grid {grid[0]}x{grid[1]} r{r} d{d}"
        if late(f"compile {name}"):
            continue
        q, k, v = inputs(1, H, T + grid[0] * grid[1], D, torch.bfloat16, 7)
        row = {"grid": grid, "window": r, "down_factor": d, "dtype": "bfloat16", "compile_backend": compile_backend}
        breaks = sum(counters.get("graph_break", {}).values())
        try:
            fn = torch.compile(lambda q, k, v, grid=grid, r=r, d=d: clear_attention(
                q, k, v, text_len=T, grid=grid, window=r, down_factor=d) * 1.0, backend=compile_backend)
            row["rel_err"] = _rel_err(fn(q, k, v), exact(q, k, v, T, grid, r, d))
            row["ok"] = row["rel_err"] < TOL["bfloat16"]
        except Exception as exc:
            row["error"], row["ok"] = f"{type(exc).__name__}: {str(exc)[:300]}", False
        row["graph_breaks"] = sum(counters.get("graph_break", {}).values()) - breaks
        res["compile"].append(row)
        if not row["ok"]:
            fail(f"under torch.compile, {name}: {row.get('error') or row['rel_err']}")
    save()

    # 4. FlexAttention at more image sizes than Dynamo's recompile limit
    dyn = torch._dynamo.config
    name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
    if dry:  # the same path past the limit with fewer (slow, eager) CPU calls
        setattr(dyn, name, 2)
    limit = getattr(dyn, name)
    n = limit + 3
    if dry:
        fh, fd, ft, fdtype = 1, 16, 3, torch.float32
        sizes = [(4 + i, 5 + i) for i in range(n)]
    else:
        fh, fd, ft, fdtype = 2, 128, 64, torch.bfloat16
        sizes = [(24 + 4 * i, 32 + 4 * i) for i in range(n)]
    print(f"[correctness] FlexAttention at {n} image sizes (recompile limit {limit})", flush=True)
    res["recompile_limit"] = limit
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "recompile" in msg.lower() or "cache_size_limit" in msg:
                seen.append(msg.splitlines()[0][:300])

    handler = Catch()
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        for i, grid in enumerate(sizes if "flex" in sections else []):
            if late(f"flex size {grid[0]}x{grid[1]}"):
                continue
            q, k, v = inputs(1, fh, ft + grid[0] * grid[1], fd, fdtype, 50 + i)
            row = {"grid": grid}
            try:
                out = clear_attention(q, k, v, text_len=ft, grid=grid, window=5, backend="flex")
                if cuda:
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                out = clear_attention(q, k, v, text_len=ft, grid=grid, window=5, backend="flex")
                if cuda:
                    torch.cuda.synchronize()
                row["second_call_ms"] = (time.perf_counter() - t1) * 1e3
                row["rel_err"] = _rel_err(out, exact(q, k, v, ft, grid, 5, 1))
                row["ok"] = row["rel_err"] < TOL[str(fdtype)[6:]]
            except Exception as exc:
                row["error"], row["ok"] = f"{type(exc).__name__}: {str(exc)[:300]}", False
            res["flex_sizes"].append(row)
            if not row["ok"]:
                fail(f"FlexAttention at grid {grid} (size {i + 1} of {n}): {row.get('error') or row['rel_err']}")
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    res["flex_recompile_messages"] = seen[:10]
    times = [r["second_call_ms"] for r in res["flex_sizes"] if "second_call_ms" in r]
    if len(times) > limit:
        before, after = sorted(times[:limit])[limit // 2], max(times[limit:])
        res["flex_slowdown_past_limit"] = after / before
        if cuda and after > 5 * before:
            res["notes"].append(f"FlexAttention is {after / before:.1f}x slower past the recompile limit "
                                "(Dynamo falls back to eager)")
    res["elapsed_s"] = time.perf_counter() - t0
    save()
    print(f"[correctness] {len(res['failures'])} failures, {len(res['skipped'])} skipped by the budget", flush=True)
    return 1 if res["failures"] else 0


# ---------------------------------------------------------------------------
# the driver

def _run(cmd, log_path, timeout, env=None):
    """Run cmd, echo and log its output; (return code or None if stopped by
    the timeout, elapsed seconds, CPU seconds)."""
    import resource
    t0 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)

        def pump():
            for line in proc.stdout:
                sys.stdout.write("    " + line)
                sys.stdout.flush()
                log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # its own session: the part and anything it started
            proc.wait()
            rc = None
        reader.join(timeout=5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return rc, time.perf_counter() - t0, (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def install_peers(out, budget, dry):
    """pip install each line of requirements-gpu.txt on its own: wheels only,
    no dependencies (never replaces torch), short network timeouts. Dry runs
    pass --dry-run (nothing changes)."""
    reqs = [line.split("#")[0].strip() for line in open(REQUIREMENTS)]
    status, t0 = {}, time.perf_counter()
    for req in filter(None, reqs):
        left = budget - (time.perf_counter() - t0)
        if left < 5:
            status[req] = "not installed: install budget spent"
            continue
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "--retries", "0",
               "--timeout", "15", "--disable-pip-version-check", "--no-input", req] + (["--dry-run"] if dry else [])
        print("  $", " ".join(cmd[2:]), flush=True)
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=left)
            tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
            status[req] = ("installed" if not dry else "would install") if p.returncode == 0 else \
                f"not installed: {tail[0][:200]}"
        except subprocess.TimeoutExpired:
            status[req] = "not installed: pip timed out (no network?)"
        print(f"  {req}: {status[req]}", flush=True)
    with open(os.path.join(out, "install.json"), "w") as f:
        json.dump(status, f, indent=2)
    return status


def _find_row(rows, **match):
    for row in rows or []:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def goals(attention, step):
    """Each goal with what was measured (None where it was not)."""
    att_rows = (attention or {}).get("rows", [])
    step_rows = (step or {}).get("rows", [])
    k = _find_row(att_rows, grid=512, window=16, down_factor=1) or {}
    s8 = _find_row(step_rows, image_px=8192) or {}
    s4 = _find_row(step_rows, image_px=4096) or {}
    peak = (s8["clear_peak_gib"] / s8["dense_peak_gib"]) if s8.get("clear_peak_gib") and s8.get("dense_peak_gib") \
        else None
    measured = {"kernel_ideal": k.get("percent_of_ideal"), "kernel_ceiling": k.get("percent_of_ceiling"),
                "vs_flex": k.get("speedup_vs_flex"), "step_8k": s8.get("speedup"), "step_4k": s4.get("speedup"),
                "peak_8k": peak}
    out = []
    for key, what, target, _ in GOALS:
        value = measured[key]
        met = None if value is None else (value <= target if key.startswith("peak") else value >= target)
        out.append({"goal": key, "what": what, "target": target, "measured": value, "met": met})
    return out


def plots(out, attention_json, step_json):
    """PNG per measured part (bench/plot.py); [] with a note if matplotlib is missing."""
    sys.path.insert(0, HERE)
    import plot
    made, notes = [], []
    for kind, path in (("attention", attention_json), ("step", step_json)):
        if path and os.path.exists(path) and (_load(path) or {}).get("rows"):
            try:
                made.append(plot.main([path, "--kind", kind]))
            except SystemExit as exc:
                notes.append(f"{kind} plot skipped: {exc}")
            except Exception as exc:  # a plot must not hide the measurements
                notes.append(f"{kind} plot failed: {type(exc).__name__}: {exc}")
    return made, notes


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def summary(report):
    lines = ["", "=" * 78, f"GPU check: {report['environment']['device']}  torch {report['environment']['torch']}  "
             f"Triton {report['environment']['triton']}  commit {report['environment']['commit'][:10]}"]
    if report["dry"]:
        lines.append("*** DRY RUN (CPU, tiny shapes): checks the script, measures nothing ***")
    for name, part in report["parts"].items():
        lines.append(f"  {name:12s} {part['status']:34s} {part.get('elapsed_s', 0):6.1f} s of {part['budget_s']:.0f} s")
    corr = report.get("correctness") or {}
    if corr:
        rows = corr.get("triton_vs_torch", [])
        worst = max((r.get("rel_err", math.inf) for r in rows), default=None)
        lines.append(f"  correctness: {sum(r['ok'] for r in rows)}/{len(rows)} Triton-vs-torch cases pass "
                     f"(worst rel. error {_fmt(worst, '.1e')}), auto ran "
                     f"{sorted({v['verdict'] for v in corr.get('self_check', {}).values()})}, "
                     f"compile {sum(r['ok'] for r in corr.get('compile', []))}/{len(corr.get('compile', []))}, "
                     f"Flex {sum(r['ok'] for r in corr.get('flex_sizes', []))}/{len(corr.get('flex_sizes', []))} "
                     f"sizes (limit {corr.get('recompile_limit')})")
    if corr.get("skipped"):
        lines.append(f"  correctness: {len(corr['skipped'])} cases skipped by the time budget")
    att = report.get("attention") or {}
    if att.get("skipped"):
        lines.append(f"  attention: {len(att['skipped'])} configurations skipped by the time budget")
    if att.get("rows"):
        lines.append(f"  attention peers: {att.get('peers')}")
        lines.append(f"  {'grid':>5} {'r':>3} {'d':>2} {'ours ms':>9} {'TF/s':>6} {'x dense':>8} {'x flex':>7} "
                     f"{'x sol':>6} {'x natten':>8} {'% ideal':>8} {'% ceil':>7}")
        for r in att["rows"]:
            lines.append(f"  {r['grid']:5d} {r['window']:3d} {r['down_factor']:2d} {r['ours_ms']:9.3f} "
                         f"{r['ours_tflops']:6.1f} {r['speedup_vs_dense']:8.2f} {_fmt(r.get('speedup_vs_flex'), '7.2f')} "
                         f"{_fmt(r.get('speedup_vs_sol'), '6.2f')} {_fmt(r.get('speedup_vs_natten'), '8.2f')} "
                         f"{r['percent_of_ideal']:8.1f} {r['percent_of_ceiling']:7.1f}")
    step = report.get("step") or {}
    for r in step.get("rows", []):
        lines.append(f"  step {r['image_px']}px ({r['blocks']} blocks): dense {r['dense_ms']:.1f} ms, CLEAR "
                     f"{r['clear_ms']:.1f} ms, x{r['speedup']:.2f}; chunked x{_fmt(r.get('speedup_chunked'), '.2f')}; "
                     f"peak GiB dense {_fmt(r.get('dense_peak_gib'), '.2f')} / CLEAR {_fmt(r.get('clear_peak_gib'), '.2f')}")
    lines.append("  goals (H100/H200 bf16):")
    for g in report["goals"]:
        verdict = "not measured" if g["met"] is None else ("met" if g["met"] else "MISSED")
        lines.append(f"    {g['what']:55s} target {g['target']:5.2f}  measured {_fmt(g['measured'], '7.2f')}  {verdict}")
    for f in report["failures"]:
        lines.append(f"  FAILURE: {f}")
    lines.append(f"  results: {report['out']}")
    lines.append("=" * 78)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, every code path (also GPU_CHECK_DRY=1)")
    p.add_argument("--out", help="output folder (default $OUT, else bench/results/gpu-<date>)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--comfyui", help="ComfyUI checkout for the step part (default $COMFYUI_PATH, else "
                   ".comfyui/ComfyUI-0.33.0 in the repo)")
    p.add_argument("--step-blocks", choices=["one", "full"], default="one",
                   help="full: the whole 57-block model (~2 min per dense 8K forward: exceeds the budget)")
    p.add_argument("--scale-budget", type=float, default=1.0, help="multiply every part's budget")
    p.add_argument("--total-s", type=float, help="cap on the whole run (default 450 s; dry runs: none); a part "
                   "gets at most what is left of it, minus 15 s for the plots and summary")
    p.add_argument("--part", choices=["correctness"], help=argparse.SUPPRESS)  # internal: one part's process
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dry = args.dry or os.environ.get("GPU_CHECK_DRY") == "1"
    if args.part == "correctness":
        return correctness(args.json, args.budget_s, dry)

    t_all = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc)
    out = os.path.abspath(args.out or os.environ.get("OUT") or
                          os.path.join(HERE, "results", f"gpu-{'dry-' if dry else ''}{date:%Y-%m-%d-%H%M}"))
    os.makedirs(out, exist_ok=True)
    sys.path.insert(0, HERE)
    from common import environment

    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not dry:
        print("No CUDA GPU here: running the dry mode instead (tiny shapes; measures nothing).", flush=True)
        dry = True
    budgets = {k: v * args.scale_budget for k, v in (DRY_BUDGETS if dry else BUDGETS).items()}
    total = args.total_s if args.total_s is not None else (None if dry else 450.0 * args.scale_budget)

    def budget_of(name):  # the part's own budget, within what is left of the total
        if total is None:
            return budgets[name]
        return min(budgets[name], total - (time.perf_counter() - t_all) - 15)
    env = dict(os.environ)
    if dry:
        env["TRITON_INTERPRET"] = "1"  # the Triton kernel on the CPU (interpreter)
    report = {"environment": environment(), "dry": dry, "out": out, "args": vars(args), "budgets_s": budgets,
              "parts": {}, "failures": [], "notes": []}
    py = sys.executable

    def save():
        report["elapsed_s"] = time.perf_counter() - t_all
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)

    def part(name, cmd):
        budget = budget_of(name)
        if budget < 10:
            report["parts"][name] = {"status": "SKIPPED: total time spent", "elapsed_s": 0, "budget_s": budget}
            print(f"\n[{name}] skipped: the total time budget is spent", flush=True)
            return
        if "--budget-s" in cmd:  # the part's own clock, for what it stops starting
            cmd[cmd.index("--budget-s") + 1] = str(float(cmd[cmd.index("--budget-s") + 1]) * budget / budgets[name])
        print(f"\n[{name}] budget {budget:.0f} s", flush=True)
        rc, elapsed, cpu_s = _run(cmd, os.path.join(out, f"{name}.log"), budget, env)
        status = "ok" if rc == 0 else ("TIMED OUT (partial results kept)" if rc is None else f"FAILED (exit {rc})")
        report["parts"][name] = {"status": status, "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu_s, 1),
                                 "budget_s": budget,
                                 "command": " ".join(os.path.relpath(c, REPO) if c.endswith(".py") else c
                                                     for c in cmd[1:]), "log": f"{name}.log"}
        print(f"[{name}] {status} in {elapsed:.1f} s ({cpu_s:.1f} s CPU)", flush=True)
        if rc not in (0, None):
            report["failures"].append(f"part {name} failed (exit {rc}); see {name}.log")
        save()

    if "install" in args.parts:
        budget = budget_of("install")
        print(f"\n[install] budget {budget:.0f} s", flush=True)
        t0 = time.perf_counter()
        report["install"] = install_peers(out, budget, dry)
        report["parts"]["install"] = {"status": "ok", "elapsed_s": round(time.perf_counter() - t0, 1),
                                      "budget_s": budget}
        print(f"[install] done in {time.perf_counter() - t0:.1f} s", flush=True)

    corr_json = os.path.join(out, "correctness.json")
    if "correctness" in args.parts:
        part("correctness", [py, os.path.join(HERE, "gpu_check.py"), "--part", "correctness", "--json", corr_json,
                             "--budget-s", str(budgets["correctness"])] + (["--dry"] if dry else []))
        report["correctness"] = _load(corr_json)
        for f in (report["correctness"] or {}).get("failures", []):
            report["failures"].append(f"correctness: {f}")

    att_json = os.path.join(out, "attention.json")
    if "attention" in args.parts:
        cmd = [py, os.path.join(HERE, "attention.py"), "--peers", "sol", "natten", "--out", att_json,
               "--budget-s", str(0.8 * budgets["attention"])]
        if dry:
            # budget 0: grid 12 runs (the first always does), grid 16 is skipped by the budget
            cmd[cmd.index("--budget-s") + 1] = "0"
            cmd += ["--quick", "--grids", "12", "16", "--radii", "3", "--down", "1", "2", "--standin-peers",
                    "--repeats", "1"]
        else:  # 8K first: the goals are there; Flex (a compile per config) at r16 d1 only
            cmd += ["--grids", "512", "256", "128", "64", "--radii", "16", "8", "32", "--down", "1", "4",
                    "--flex-radii", "16", "--flex-down", "1", "--repeats", "10"]
        part("attention", cmd)
        report["attention"] = _load(att_json)
        for r in (report["attention"] or {}).get("rows", []):
            err = r.get("rel_err_vs_torch_path")
            if err is not None and not err < TOL[r["dtype"]]:
                report["failures"].append(f"attention: ours vs torch path at grid {r['grid']} r{r['window']} "
                                          f"d{r['down_factor']}: relative error {err:.2e}")

    step_json = os.path.join(out, "flux_step.json")
    if "step" in args.parts:
        comfy = args.comfyui or os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".comfyui", "ComfyUI-0.33.0")
        if not os.path.isfile(os.path.join(comfy, "comfy", "model_patcher.py")):
            report["parts"]["step"] = {"status": "SKIPPED: no ComfyUI", "budget_s": budgets["step"], "elapsed_s": 0}
            report["notes"].append(f"step skipped: no ComfyUI checkout at {comfy} (pass --comfyui or COMFYUI_PATH)")
            print("\n[step]", report["notes"][-1], flush=True)
        else:
            cmd = [py, os.path.join(HERE, "flux_step.py"), "--comfyui", comfy, "--out", step_json]
            if dry:
                cmd += ["--tiny", "--sizes", "128", "--blocks", "one", "--chunk-tokens", "32", "--repeats", "1"]
            else:
                cmd += ["--sizes", "4096", "8192", "--blocks", args.step_blocks, "--chunk-tokens", "8192",
                        "--repeats", "2"]
            part("step", cmd)
            report["step"] = _load(step_json)
            for r in (report["step"] or {}).get("rows", []):
                for name in ("dense", "clear"):
                    err = r.get(f"{name}_chunked_rel_err")
                    if err is not None and not err < 2e-2:
                        report["failures"].append(f"step: {name} with token chunking differs by {err:.2e} at "
                                                  f"{r['image_px']}px")

    report["goals"] = goals(report.get("attention"), report.get("step"))
    report["plots"], plot_notes = plots(out, att_json if "attention" in args.parts else None,
                                        step_json if "step" in args.parts else None)
    report["plots"] = [os.path.relpath(p, out) for p in report["plots"]]
    report["notes"] += plot_notes
    save()
    text = summary(report)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    print(f"total {time.perf_counter() - t_all:.1f} s", flush=True)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
