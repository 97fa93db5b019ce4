"""One run that checks CLEAR on a GPU and measures it against every peer:
the first thing to run whenever a GPU is available (bench/README.md, "GPU
check"). Sized for a lent machine: at most 300 s in all (a global deadline
the script enforces, so a rerun fits in 15 minutes of device time), at most
8 files in the output folder, nothing fetched from the network.

    bench/gpu_check.sh                    # GPU: everything, results in $OUT or bench/results/gpu-<date>/
    bench/gpu_check.sh --parts correctness attention
    bench/gpu_check.sh --dry              # CPU: tiny shapes, every section (CI; also GPU_CHECK_DRY=1)

Parts (each a subprocess with its own budget, elapsed time printed):
  install      peers (bench/requirements-gpu.txt) from carried wheels only: a folder
               of .whl files (--wheels, default .whl in the repo) installed with
               pip --no-index --no-deps into a scratch folder; without one the
               peers run only if already importable
  correctness  FLUX shapes first (head_dim 128, bf16 and fp16): what "auto" trusts
               per kernel variant (exit 1 where it does not trust Triton on a GPU
               of compute capability >= 8.0), Triton vs the exact torch path;
               then FlexAttention at the scales proportional attention gives
               (more than Dynamo's recompile limit; compiles counted),
               torch.compile, head_dim 64
  attention    bench/attention.py: dense baselines (SDPA flash = FA2, SDPA cuDNN,
               FA3 where importable; the fastest is the comparison), FlexAttention,
               sol_attn, NATTEN, ours
  step         bench/flux_step.py: one FLUX.1-dev-sized step at 4K and 8K, dense vs
               CLEAR, peak memory; through ComfyUI's Flux code where it imports
               (with token chunking), else plain torch FLUX-shaped blocks (labelled)
  distill      bench/distill_step.py: CLEAR distillation through the trainer on
               full-size models with random weights built by ComfyUI's classes, 20
               steps at 1024^2 on an fp8 base: FLUX.1-dev LoRA r64, FLUX.2 Klein 4B
               full (where the ComfyUI checkout builds FLUX.2); peak memory and
               seconds per step against the memory model. Runs last, on what the
               other parts leave: skipped, with a line saying so, when less than
               DISTILL_MIN_S is left (run it alone: --parts distill)

Writes into one folder: gpu_check.json (everything: device, versions, commit,
date, command, every part's and section's status, all results, the goals),
gpu_check.log (every part's output), summary.txt, attention.png and
flux_step.png. Exits non-zero on a correctness mismatch, where "auto" does
not trust Triton for FLUX shapes on a GPU, on more Flex compiles than
variants, more than 8 output files, or a part that crashed (a part stopped by
its budget is reported, not an error).
"""

import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REQUIREMENTS = os.path.join(HERE, "requirements-gpu.txt")

# What a lent GPU machine returns from $OUT: at most 8 files, two folders deep,
# names of letters, digits, '.', '_' and '-'.
MAX_FILES = 8
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

# Seconds per part on an H100/H200. They add up to TOTAL_S with RESERVE_S for
# the plots and summary; the whole run (Python's start-up included, from
# gpu_check.sh's start) is held to TOTAL_S: a part gets at most what is left.
# "distill" is outside that sum: it runs last with at most its own budget of what
# is left before the deadline, and is skipped below DISTILL_MIN_S.
BUDGETS = {"install": 10, "correctness": 125, "attention": 90, "step": 65, "distill": 150}
TOTAL_S, RESERVE_S = 300.0, 10.0
DISTILL_MIN_S = 45.0  # imports, building a 12 B-parameter model, Flex's compiles and a few steps
DRY_BUDGETS = {"install": 30, "correctness": 420, "attention": 240, "step": 300, "distill": 300}  # loaded CPU
PARTS = tuple(BUDGETS)

# Relative L2 error vs the float32 torch path (output rounding is ~4e-3 in bf16).
TOL = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-4}

GOALS = [  # (key, what, target, how it is measured)
    ("kernel_ideal", "kernel % of the FLOP-proportional ideal, 8K r16 d1", 60.0, "attention"),
    ("kernel_ceiling", "kernel % of the work-model ceiling, 8K r16 d1", 85.0, "attention"),
    ("vs_flex", "kernel speed-up over FlexAttention, 8K r16 d1", 3.0, "attention"),
    ("step_8k", "FLUX step speed-up over dense, 8K", 8.5, "step"),
    ("step_4k", "FLUX step speed-up over dense, 4K", 2.7, "step"),
    ("peak_8k", "FLUX step peak memory, CLEAR / dense, 8K (at most)", 1.05, "step"),
]


# ---------------------------------------------------------------------------
# correctness (runs in its own process: python bench/gpu_check.py --part correctness)

def _rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


# FLUX shapes first: a budget cut never skips what decides the exit status.
SECTIONS = ("flux_trust", "flux_triton", "flex_scales", "compile", "head_dim_64")
# When each section must stop starting cases, as a fraction of the part's budget
# (cumulative: unused time rolls on to the next section).
SECTION_ENDS = {"flux_trust": 0.40, "flux_triton": 0.55, "flex_scales": 0.85, "compile": 0.92, "head_dim_64": 0.96}


@contextlib.contextmanager
def _dry_regime(dry, check_grid, check_text, specialize_float=True):
    """Dry runs take the GPU's paths on the CPU, all restored after (tests call
    correctness() in their own process): "auto" tries the compiled backends
    (Triton under its interpreter), Flex compiles through Dynamo (its "eager"
    backend, floats specialised as Inductor specialises them) and the
    self-check's problem is shrunk as tests/test_backends.py
    shrinks it."""
    import torch._dynamo

    from comfyui_clear import kernels
    from comfyui_clear.kernels import flex, selfcheck

    dyn = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
    saved = (kernels._fast_device, dict(kernels._TRUST), dict(kernels._CHOICES), flex.COMPILE_DEVICES,
             flex.COMPILE_BACKEND, flex._COMPILED, selfcheck.BATCH, selfcheck.TEXT_LEN, selfcheck.check_grid,
             getattr(dyn, limit_name), getattr(dyn, "specialize_float", None))
    kernels._CHOICES.clear()  # "auto"'s choices reported are this check's own, not earlier calls' in the process
    if dry:
        kernels._fast_device = lambda q: True
        flex.COMPILE_DEVICES, flex.COMPILE_BACKEND, flex._COMPILED = ("cuda", "cpu"), "eager", {}
        if hasattr(dyn, "specialize_float"):
            dyn.specialize_float = specialize_float
        selfcheck.BATCH, selfcheck.TEXT_LEN = 1, check_text
        selfcheck.check_grid = lambda window, down_factor: check_grid
        torch._dynamo.reset()
    try:
        yield limit_name
    finally:
        (kernels._fast_device, trust, choices, flex.COMPILE_DEVICES, flex.COMPILE_BACKEND, flex._COMPILED,
         selfcheck.BATCH, selfcheck.TEXT_LEN, selfcheck.check_grid, limit, specialize) = saved
        kernels._TRUST.clear()
        kernels._TRUST.update(trust)
        kernels._CHOICES.clear()
        kernels._CHOICES.update(choices)
        setattr(dyn, limit_name, limit)
        if specialize is not None:
            dyn.specialize_float = specialize
        if dry:
            torch._dynamo.reset()


def correctness(json_path, budget_s, dry, sections=SECTIONS, specialize_float=True):
    """Part 1, in its own process; returns the exit status (1 on any failure)."""
    import torch

    from comfyui_clear import kernels
    from comfyui_clear.kernels import clear_attention
    from comfyui_clear.nodes.clear_patch import attention_scale

    sys.path.insert(0, HERE)
    from common import environment

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # Where "auto" must run Triton: every GPU the kernel is built for (sm_80 on), and dry runs (interpreter)
    capability = torch.cuda.get_device_capability() if cuda else None
    expect_triton = dry or (cuda and capability >= (8, 0))
    t0 = time.perf_counter()
    res = {"environment": environment(), "dry": dry, "device_type": device, "capability": capability,
           "expect_triton": expect_triton, "sections": {}, "flux_trust": {}, "triton_vs_torch": [],
           "compile": [], "flex_scales": [], "head_dim_64": {}, "failures": [], "skipped": [], "notes": []}

    def save():
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2, default=str)

    def fail(section, what):
        res["failures"].append(f"{section}: {what}")
        print("FAIL:", res["failures"][-1], flush=True)

    def late(section, what):
        if time.perf_counter() > t0 + SECTION_ENDS[section] * budget_s:
            res["skipped"].append(f"{section}: {what}")
            res["sections"][section]["skipped"] += 1
            return True
        return False

    @contextlib.contextmanager
    def section(name):
        entry = res["sections"][name] = {"ran": 0, "skipped": 0, "status": "running"}
        start = time.perf_counter()
        print(f"[correctness] {name}", flush=True)
        try:
            yield entry
            entry["status"] = "ok" if entry["ran"] else ("skipped by the budget" if entry["skipped"] else "no cases")
        except Exception as exc:  # a section that raises is a finding; the next sections still run
            entry["status"] = f"raised {type(exc).__name__}: {str(exc)[:300]}"
            fail(name, entry["status"])
        entry["elapsed_s"] = round(time.perf_counter() - start, 1)
        save()

    def inputs(B, H, L, D, dtype, seed):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return [torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]

    def exact(q, k, v, T, grid, r, d, scale=None):
        return clear_attention(q.float(), k.float(), v.float(), text_len=T, grid=grid, window=r, down_factor=d,
                               scale=scale, backend="torch")

    dtypes = [torch.bfloat16, torch.float16]
    if dry:  # Triton's interpreter is slow: tiny shapes, each code path once (head_dim 16 stands for 128)
        H, D, D_OTHER, T, grids, radii, downs = 1, 16, 32, 5, [(7, 11)], [3], [1, 2]
        configs = ((3, 1), (3, 2))
        check_grid, check_text = (7, 11), 5
    else:  # FLUX head_dim and text length; 1K-4K and odd grids (4 heads: errors do not depend on the count)
        H, D, D_OTHER, T = 4, 128, 64, 512
        grids, radii, downs = [(64, 64), (97, 131), (128, 128), (255, 189)], [16, 32, 8], [1, 4]
        configs = ((16, 1), (16, 4), (32, 4))  # one per kernel configuration (r > 16 with d > 1: 2x8 blocks)
        check_grid = check_text = None  # the self-check's own problem

    def trust(sec, dtype, hd, r, d, backends=("triton", "torch")):
        """The first-use self-check's verdict per backend for one variant, what
        one check costs (the second call: compiles excluded), and what "auto"
        runs on a problem of the check's size (its output bit for bit). Flex
        is left to flex_scales: "auto" checks it only where Triton fails, and
        Inductor compiles it per dtype (tens of seconds each on a GPU)."""
        from comfyui_clear.kernels import selfcheck
        key = f"{str(dtype)[6:]} head_dim {hd} r{r} d{d}"
        grid, t = selfcheck.check_grid(r, d), selfcheck.TEXT_LEN
        entry, outs = {"check_grid": grid, "check_text_len": t, "check_batch": selfcheck.BATCH}, {}
        for name in backends:
            try:
                why = kernels._self_check(name, torch.device(device), dtype, hd, r, d)  # compiles
                start = time.perf_counter()
                why = kernels._self_check(name, torch.device(device), dtype, hd, r, d)  # synchronises inside
                entry[f"{name}_ms"] = round(1e3 * (time.perf_counter() - start), 2)
                entry[name] = "pass" if why is None else why
            except Exception as exc:  # the check must never raise: that is a finding too
                entry[name] = f"check raised {type(exc).__name__}: {str(exc).strip()[:200]}"
                fail(sec, f"the self-check raised for {name} {key}: {entry[name]}")
        q, k, v = inputs(1, 2, t + grid[0] * grid[1], hd, dtype, 99)
        ref = exact(q, k, v, t, grid, r, d)
        try:
            auto = clear_attention(q, k, v, text_len=t, grid=grid, window=r, down_factor=d)
            entry["auto_rel_err"] = _rel_err(auto, ref)
        except Exception as exc:
            auto, entry["auto_error"] = None, f"{type(exc).__name__}: {str(exc)[:300]}"
            fail(sec, f"auto backend raised for {key}: {entry['auto_error']}")
        for name in backends:
            try:
                outs[name] = clear_attention(q, k, v, text_len=t, grid=grid, window=r, down_factor=d, backend=name)
            except Exception:
                pass  # its verdict above says why
        entry["auto_ran"] = [n for n, o in outs.items() if auto is not None and torch.equal(o, auto)]
        entry["verdict"] = "|".join(entry["auto_ran"]) or "none of the forced backends"
        print(f"  {key}: auto ran {entry['verdict']}; " + ", ".join(
            f"check {n} {entry[n]} ({entry.get(n + '_ms', '-')} ms)" for n in backends), flush=True)
        if expect_triton and entry["triton"] != "pass":
            fail(sec, f"the Triton kernel fails its check for {key}: {entry['triton']}")
        if expect_triton and "triton" not in entry["auto_ran"]:
            fail(sec, f"auto does not trust the Triton kernel for {key} (ran {entry['verdict']})")
        if entry.get("auto_rel_err", 0) >= TOL[str(dtype)[6:]]:
            fail(sec, f"auto backend wrong for {key}: relative error {entry['auto_rel_err']:.2e}")
        return key, entry

    def variants(dts):
        return [(dt, r, d) for dt in dts for r, d in configs if not dry or (dt == torch.bfloat16) == (d == 1)]

    with _dry_regime(dry, check_grid, check_text, specialize_float) as limit_name:
        # 1. FLUX shapes: what "auto" trusts per kernel variant (the exit status hangs on it)
        if "flux_trust" in sections:
            with section("flux_trust") as sec:
                wanted = variants(dtypes)
                for dtype, r, d in wanted:
                    if late("flux_trust", f"{str(dtype)[6:]} r{r} d{d}"):
                        continue
                    key, entry = trust("flux_trust", dtype, D, r, d)
                    res["flux_trust"][key] = entry
                    sec["ran"] += 1
                    save()
                if expect_triton and sec["ran"] < len(wanted):
                    fail("flux_trust", f"only {sec['ran']} of {len(wanted)} FLUX variants were checked before the "
                         "section's budget ran out: auto's trust in Triton for FLUX shapes is unknown")

        # 2. FLUX shapes: the Triton kernel (forced) vs the exact torch path
        if "flux_triton" in sections:
            with section("flux_triton") as sec:
                print(f"  grids {grids}, r {radii}, d {downs}, head_dim {D}, bf16/fp16", flush=True)
                for gi, grid in enumerate(grids):
                    L = T + grid[0] * grid[1]
                    base = inputs(1, H, L, D, torch.float32, gi)
                    for dtype in dtypes:
                        q, k, v = (t.to(dtype) for t in base)
                        why = kernels.triton_supported(q)
                        if why is not None:
                            if expect_triton:
                                fail("flux_triton", f"triton at {dtype}: {why}")
                            else:
                                res["notes"].append(f"flux_triton: Triton cannot run here: {why}")
                            continue
                        for d in downs:
                            for r in radii:
                                if dry and (dtype == torch.bfloat16) != (d == 1):  # dry: bf16 d1 and fp16 d2 only
                                    continue
                                name = f"grid {grid[0]}x{grid[1]} r{r} d{d} {str(dtype)[6:]}"
                                if late("flux_triton", name):
                                    continue
                                row = {"grid": grid, "window": r, "down_factor": d, "dtype": str(dtype)[6:],
                                       "heads": H, "head_dim": D, "text_len": T}
                                try:
                                    out = clear_attention(q, k, v, text_len=T, grid=grid, window=r, down_factor=d,
                                                          backend="triton")
                                    row["rel_err"] = _rel_err(out, exact(q, k, v, T, grid, r, d))
                                    row["ok"] = row["rel_err"] < TOL[row["dtype"]]
                                except Exception as exc:
                                    row["error"], row["ok"] = f"{type(exc).__name__}: {str(exc)[:300]}", False
                                res["triton_vs_torch"].append(row)
                                sec["ran"] += 1
                                if not row["ok"]:
                                    fail("flux_triton", f"Triton vs torch path, {name}: "
                                         f"{row.get('error') or row['rel_err']}")
                    save()

        # 3. FlexAttention at the scales proportional attention gives, more distinct ones than
        # Dynamo's recompile limit: compiled once per variant (local, pooled keys) whatever the scale
        if "flex_scales" in sections:
            with section("flex_scales") as sec:
                flex_scales(res, sec, late, fail, inputs, exact, torch, clear_attention, attention_scale, dry, D, T,
                            limit_name, cuda)

        # 4. the same under torch.compile (Inductor on a GPU; Dynamo's eager backend in dry runs)
        if "compile" in sections:
            with section("compile") as sec:
                compile_backend = "inductor" if cuda else "eager"
                cases = [((7, 11), 3, 2)] if dry else [((64, 64), 16, 4), ((97, 131), 16, 1)]
                print(f"  torch.compile ({compile_backend}): {cases}", flush=True)
                from torch._dynamo.utils import counters
                for grid, r, d in cases:
                    name = f"grid {grid[0]}x{grid[1]} r{r} d{d}"
                    if late("compile", name):
                        continue
                    q, k, v = inputs(1, H, T + grid[0] * grid[1], D, torch.bfloat16, 7)
                    row = {"grid": grid, "window": r, "down_factor": d, "dtype": "bfloat16",
                           "compile_backend": compile_backend}
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
                    sec["ran"] += 1
                    if not row["ok"]:
                        fail("compile", f"under torch.compile, {name}: {row.get('error') or row['rel_err']}")

        # 5. the kernel's other head_dim (64; dry runs: 32), what "auto" trusts
        if "head_dim_64" in sections:
            with section("head_dim_64") as sec:
                for dtype, r, d in variants(dtypes):
                    if late("head_dim_64", f"{str(dtype)[6:]} r{r} d{d}"):
                        continue
                    key, entry = trust("head_dim_64", dtype, D_OTHER, r, d)
                    res["head_dim_64"][key] = entry
                    sec["ran"] += 1

        choices = getattr(kernels, "backend_choices", None)
        if choices is not None:  # what "auto" chose and why, as the package reports it
            res["backend_choices"] = {str(key): list(val) for key, val in choices().items()}
            for key, (backend, reason) in res["backend_choices"].items():
                if expect_triton and f"head_dim {D}," in key and backend not in ("triton", "sdpa"):
                    fail("flux_trust", f"auto chose {backend} for {key}: {reason}")
    res["elapsed_s"] = time.perf_counter() - t0
    save()
    print(f"[correctness] {len(res['failures'])} failures, {len(res['skipped'])} skipped by the budget", flush=True)
    return 1 if res["failures"] else 0


def flex_scales(res, sec, late, fail, inputs, exact, torch, clear_attention, attention_scale, dry, D, T, limit_name,
                cuda):
    """FlexAttention (forced) at image sizes whose proportional-attention
    scales all differ, more of them than Dynamo's recompile limit, local keys
    then pooled; counts the graphs Dynamo compiles (and recompile messages).
    Once two calls in a row have each compiled or failed (a compile per
    scale: the finding is made) the remaining sizes are skipped, pooled keys
    included (they compile the same way), to spare the budget."""
    import logging

    from torch._dynamo.utils import counters

    from comfyui_clear.kernels import flex

    if dry:  # from no compiled entry (the CPU's self-checks made several): the first call compiles, no other may
        flex._COMPILED.clear()
        torch._dynamo.reset()
    limit = getattr(torch._dynamo.config, limit_name)
    res["recompile_limit"] = limit
    n = limit + 2
    if dry:
        sizes = [(16 + i, 17 + i) for i in range(n)]  # L > 256 as in every FLUX call: no size-1 block counts
        pooled = [((16, 18), 2), ((17, 19), 2)]
        fh, ft, fdtype = 2, 5, torch.bfloat16  # the flux_trust section's dtype and head_dim: its entries serve
    else:
        sizes = [(24 + 4 * i, 32 + 4 * i) for i in range(n)]
        pooled = [((40, 52), 4), ((44, 60), 4)]
        fh, ft, fdtype = 2, T, torch.bfloat16
    cases = [(g, 1) for g in sizes] + pooled
    print(f"  FlexAttention at {len(cases)} proportional-attention scales (recompile limit {limit})", flush=True)
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "recompil" in msg.lower() or "cache_size_limit" in msg or "recompile_limit" in msg:
                seen.append(msg.splitlines()[0][:300])

    handler = Catch()
    logging.getLogger("torch._dynamo").addHandler(handler)
    compiles = {"local": [], "pooled": []}  # graphs compiled per call, per variant
    scales = []
    try:
        for i, (grid, d) in enumerate(cases):
            variant = "pooled" if d > 1 else "local"
            calls = compiles[variant]
            name = f"grid {grid[0]}x{grid[1]} d{d}"
            if any(len(c) >= 2 and all(n is None or n > 0 for n in c[-2:]) for c in compiles.values()):
                res["skipped"].append(f"flex_scales: {name} (a compile or failure per scale already seen)")
                sec["skipped"] += 1
                continue
            if late("flex_scales", name):
                continue
            scale = attention_scale(D, ft, grid, d, True)
            q, k, v = inputs(2, fh, ft + grid[0] * grid[1], D, fdtype, 50 + i)  # batch 2: no size-1 specialisation
            row = {"grid": grid, "down_factor": d, "scale": scale}
            graphs = counters["stats"]["unique_graphs"]
            try:
                out = clear_attention(q, k, v, text_len=ft, grid=grid, window=5, down_factor=d, scale=scale,
                                      backend="flex")
                row["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs
                if cuda:
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                out = clear_attention(q, k, v, text_len=ft, grid=grid, window=5, down_factor=d, scale=scale,
                                      backend="flex")
                if cuda:
                    torch.cuda.synchronize()
                row["second_call_ms"] = (time.perf_counter() - t1) * 1e3
                row["rel_err"] = _rel_err(out, exact(q, k, v, ft, grid, 5, d, scale))
                row["ok"] = row["rel_err"] < TOL[str(fdtype)[6:]]
            except Exception as exc:
                row["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs
                row["error"], row["ok"] = f"{type(exc).__name__}: {str(exc)[:300]}", False
            calls.append(row["compiled_graphs"] if row["ok"] or row["compiled_graphs"] else None)
            scales.append(scale)
            res["flex_scales"].append(row)
            sec["ran"] += 1
            print(f"    {name} scale {scale:.5f}: {row['compiled_graphs']} graph(s) compiled, "
                  f"{'ok' if row['ok'] else row.get('error') or row.get('rel_err')}", flush=True)
            if not row["ok"]:
                fail("flex_scales", f"FlexAttention at {name}, scale {scale:.5f}: {row.get('error') or row['rel_err']}")
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    # what Flex's first-use self-check says and costs (after the loop: its compile is not counted there)
    from comfyui_clear import kernels
    r, device = 3 if dry else 16, torch.device("cuda" if cuda else "cpu")
    if not late("flex_scales", "Flex's first-use self-check"):
        try:
            why = kernels._self_check("flex", device, fdtype, D, r, 1)  # compiles
            start = time.perf_counter()
            why = kernels._self_check("flex", device, fdtype, D, r, 1)
            res["flex_check"] = {"variant": f"{str(fdtype)[6:]} head_dim {D} r{r} d1", "verdict": why or "pass",
                                 "ms": round(1e3 * (time.perf_counter() - start), 2)}
        except Exception as exc:  # the check must never raise: that is a finding
            res["flex_check"] = {"verdict": f"check raised {type(exc).__name__}: {str(exc).strip()[:200]}"}
            fail("flex_scales", f"Flex's self-check raised: {res['flex_check']['verdict']}")
    res["flex_distinct_scales"] = len(set(scales))
    res["flex_compiles"] = {variant: sum(c or 0 for c in calls) for variant, calls in compiles.items()}
    res["flex_recompile_messages"] = seen[:10]
    for variant, calls in compiles.items():
        if res["flex_compiles"][variant] > 1:
            fail("flex_scales", f"FlexAttention ({variant} keys) compiled {res['flex_compiles'][variant]} times in "
                 f"{len(calls)} calls "
                 f"at distinct scales: once per variant expected, whatever the scale (a compile per scale reaches "
                 f"Dynamo's recompile limit of {limit} and Flex is distrusted)")


# ---------------------------------------------------------------------------
# the driver

_RUNNING = []  # the part process in flight: the deadline's watchdog stops it


def _run(cmd, log_path, timeout, env=None):
    """Run cmd, echo its output and append it to log_path; (return code or
    None if stopped by the timeout, elapsed seconds, CPU seconds)."""
    import resource
    t0 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        _RUNNING.append(proc)

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
        finally:
            _RUNNING.remove(proc)
        reader.join(timeout=5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return rc, time.perf_counter() - t0, (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def install_peers(wheels, site, budget, dry):
    """Install the carried peer wheels (a lent GPU machine is offline): every
    .whl in ``wheels`` with pip --no-index --no-deps into ``site`` (torch is
    never replaced, nothing is fetched). Dry runs add --dry-run."""
    reqs = [line.split("#")[0].strip() for line in open(REQUIREMENTS)]
    files = sorted(glob.glob(os.path.join(wheels, "*.whl"))) if wheels else []
    result = {"wheels": wheels, "peers": list(filter(None, reqs)), "files": [os.path.basename(f) for f in files]}
    if not files:
        result["status"] = (f"no wheels carried ({wheels or 'no --wheels folder'}): the peers run only where "
                            "already importable")
        return result
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--no-input", "--target", site] + files + (["--dry-run"] if dry else [])
    print("  $", " ".join(cmd[2:]), flush=True)
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, budget))
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        result["status"] = ("installed" if not dry else "would install") if p.returncode == 0 else \
            f"pip failed: {tail[0][:300]}"
    except subprocess.TimeoutExpired:
        result["status"] = "pip timed out"
    return result


def _find_row(rows, **match):
    for row in rows or []:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def goals(attention, step):
    """Each goal with what was measured (None where it was not); the step's
    from ComfyUI's Flux code where it ran, else from the standalone blocks."""
    att_rows = (attention or {}).get("rows", [])
    step_rows = (step or {}).get("rows", [])
    step_rows = [r for r in step_rows if r.get("impl", "comfyui") == "comfyui"] or step_rows
    k = _find_row(att_rows, grid=512, window=16, down_factor=1) or {}
    s8 = _find_row(step_rows, image_px=8192) or {}
    s4 = _find_row(step_rows, image_px=4096) or {}
    peak = (s8["clear_peak_gib"] / s8["dense_peak_gib"]) if s8.get("clear_peak_gib") and s8.get("dense_peak_gib") \
        else None
    measured = {"kernel_ideal": k.get("percent_of_ideal"), "kernel_ceiling": k.get("percent_of_ceiling"),
                "vs_flex": k.get("speedup_vs_flex"), "step_8k": s8.get("speedup"), "step_4k": s4.get("speedup"),
                "peak_8k": peak}
    source = {"attention": f"vs {k['dense_backend']}" if k.get("dense_backend") else None,
              "step": (s8 or s4).get("impl")}
    out = []
    for key, what, target, part in GOALS:
        value = measured[key]
        met = None if value is None else (value <= target if key.startswith("peak") else value >= target)
        out.append({"goal": key, "what": what, "target": target, "measured": value, "met": met,
                    "source": source[part] if value is not None else None})
    return out


def plots(out, attention_json, step_json):
    """attention.png and flux_step.png in out (bench/plot.py); a note instead
    where matplotlib is missing."""
    sys.path.insert(0, HERE)
    import plot
    made, notes = [], []
    for kind, path, name in (("attention", attention_json, "attention.png"), ("step", step_json, "flux_step.png")):
        if path and os.path.exists(path) and (_load(path) or {}).get("rows"):
            try:
                made.append(plot.main([path, "--kind", kind, "--out", os.path.join(out, name)]))
            except SystemExit as exc:
                notes.append(f"{kind} plot skipped: {exc}")
            except Exception as exc:  # a plot must not hide the measurements
                notes.append(f"{kind} plot failed: {type(exc).__name__}: {exc}")
    return made, notes


def out_files(out):
    """(files under out as relative paths, problems): what a lent machine
    would not return (more than MAX_FILES, too deep, odd names)."""
    files, problems = [], []
    for root, dirs, names in os.walk(out):
        rel = os.path.relpath(root, out)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for name in names + dirs:
            if not OUT_NAME.match(name):
                problems.append(f"{os.path.join(rel, name)}: a name a lent machine does not return")
        for name in names:
            files.append(os.path.normpath(os.path.join(rel, name)))
            if depth > 2:
                problems.append(f"{files[-1]}: more than 2 folders down")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in the output folder; a lent machine returns at most {MAX_FILES}")
    return sorted(files), problems


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def summary(report):
    env = report["environment"]
    lines = ["", "=" * 78, f"GPU check: {env['device']}  torch {env['torch']}  Triton {env['triton']}  "
             f"commit {env['commit'][:10]}  {report.get('elapsed_s', 0):.0f} s of {report['total_s'] or '-'}"]
    if report["dry"]:
        lines.append("*** DRY RUN (CPU, tiny shapes): checks the script, measures nothing ***")
    for name, part in report["parts"].items():
        lines.append(f"  {name:12s} {part['status']:34s} {part.get('elapsed_s', 0):6.1f} s of {part['budget_s']:.0f} s")
    lines.append("  sections: " + ", ".join(f"{k} {v}" for k, v in report["sections"].items()))
    corr = report.get("correctness") or {}
    if corr:
        trusted = sorted({v["verdict"] for v in corr.get("flux_trust", {}).values()})
        lines.append(f"  FLUX shapes: auto ran {trusted} on {len(corr.get('flux_trust', {}))} variants; "
                     f"head_dim 64: {sorted({v['verdict'] for v in corr.get('head_dim_64', {}).values()})}")
        rows = corr.get("triton_vs_torch", [])
        worst = max((r.get("rel_err", math.inf) for r in rows), default=None)
        lines.append(f"  Triton vs torch path: {sum(r['ok'] for r in rows)}/{len(rows)} pass (worst rel. error "
                     f"{_fmt(worst, '.1e')}); torch.compile {sum(r['ok'] for r in corr.get('compile', []))}/"
                     f"{len(corr.get('compile', []))}")
        lines.append(f"  Flex at {corr.get('flex_distinct_scales', 0)} proportional-attention scales: "
                     f"{sum(r['ok'] for r in corr.get('flex_scales', []))}/{len(corr.get('flex_scales', []))} ok, "
                     f"compiles per variant {corr.get('flex_compiles')} "
                     f"(recompile limit {corr.get('recompile_limit')})")
        if corr.get("skipped"):
            lines.append(f"  correctness: {len(corr['skipped'])} cases skipped (budget or finding made)")
    att = report.get("attention") or {}
    if att.get("skipped"):
        lines.append(f"  attention: {len(att['skipped'])} configurations skipped by the time budget")
    if att.get("dense"):
        lines.append("  dense baselines: " + "; ".join(f"{k}: {v}" for k, v in att["dense"].items()))
    if att.get("rows"):
        best = sorted({r["dense_backend"] for r in att["rows"]})
        lines.append(f"  fastest dense (the comparison, x dense): {', '.join(best)}; peers: {att.get('peers')}")
        lines.append(f"  {'grid':>5} {'r':>3} {'d':>2} {'dense':>10} {'ours ms':>9} {'TF/s':>6} {'x dense':>8} "
                     f"{'x flex':>7} {'x sol':>6} {'x natten':>8} {'% ideal':>8} {'% ceil':>7}")
        for r in att["rows"]:
            lines.append(f"  {r['grid']:5d} {r['window']:3d} {r['down_factor']:2d} {r['dense_backend']:>10} "
                         f"{r['ours_ms']:9.3f} {r['ours_tflops']:6.1f} {r['speedup_vs_dense']:8.2f} "
                         f"{_fmt(r.get('speedup_vs_flex'), '7.2f')} {_fmt(r.get('speedup_vs_sol'), '6.2f')} "
                         f"{_fmt(r.get('speedup_vs_natten'), '8.2f')} {r['percent_of_ideal']:8.1f} "
                         f"{r['percent_of_ceiling']:7.1f}")
    step = report.get("step") or {}
    if step.get("comfyui_unavailable"):
        lines.append(f"  step: ComfyUI not importable ({step['comfyui_unavailable'][:120]}): standalone blocks")
    for r in step.get("rows", []):
        lines.append(f"  step [{r.get('impl', 'comfyui')}] {r['image_px']}px ({r['blocks']} blocks): dense "
                     f"{r['dense_ms']:.1f} ms, CLEAR {r['clear_ms']:.1f} ms, x{r['speedup']:.2f}; chunked "
                     f"x{_fmt(r.get('speedup_chunked'), '.2f')}; peak GiB dense {_fmt(r.get('dense_peak_gib'), '.2f')}"
                     f" / CLEAR {_fmt(r.get('clear_peak_gib'), '.2f')}")
    for r in (report.get("distill") or {}).get("rows", []):
        peak = r.get("peak_allocated_bytes")
        lines.append(f"  distill [{r['run']}] {r.get('mode', '-')} {r.get('optimizer', '-')} {r.get('base', '-')} base "
                     f"{r.get('size', '-')}px: {r['status'][:60]}, {r.get('steps_done', 0)} steps, "
                     f"{_fmt(r.get('seconds_per_step'), '.3f')} s/step"
                     + (f", peak {peak / 1e9:.2f} GB allocated ({r['peak_reserved_bytes'] / 1e9:.2f} reserved), "
                        f"modelled {r['modelled_allocated_bytes'] / 1e9:.2f} GB" if peak else ""))
    lines.append("  goals (H100/H200 bf16):")
    for g in report["goals"]:
        verdict = "not measured" if g["met"] is None else ("met" if g["met"] else "MISSED")
        lines.append(f"    {g['what']:52s} target {g['target']:5.2f}  measured {_fmt(g['measured'], '7.2f')}  "
                     f"{verdict}{'  (' + g['source'] + ')' if g.get('source') else ''}")
    for f in report["failures"]:
        lines.append(f"  FAILURE: {f}")
    lines.append(f"  results: {report['out']} ({', '.join(report.get('files', []))})")
    lines.append("=" * 78)
    return "\n".join(lines)


def _comfyui_checkout(arg):
    """The ComfyUI for the step part: --comfyui, $COMFYUI_PATH, else a copy
    carried in the repo. 0.3.64 first: its Flux path imports only packages a
    lent GPU machine has (0.33.0's needs comfy-kitchen and comfy-aimdo)."""
    for path in (arg, os.environ.get("COMFYUI_PATH"), os.path.join(REPO, ".comfyui", "ComfyUI-0.3.64"),
                 os.path.join(REPO, ".comfyui", "ComfyUI-0.33.0")):
        if path and os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
            return path
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, every section (also GPU_CHECK_DRY=1)")
    p.add_argument("--out", help="output folder (default $OUT, else bench/results/gpu-<date>)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--comfyui", help="ComfyUI checkout for the step part (default $COMFYUI_PATH, else "
                   ".comfyui/ComfyUI-0.3.64 or -0.33.0 in the repo; none or not importable: standalone blocks)")
    p.add_argument("--wheels", help="folder of peer wheels to install offline (default .whl in the repo)")
    p.add_argument("--step-blocks", choices=["one", "full"], default="one",
                   help="full: the whole 57-block model (~2 min per dense 8K forward: exceeds the budget)")
    p.add_argument("--scale-budget", type=float, default=1.0, help="multiply every part's budget and the total")
    p.add_argument("--total-s", type=float, help=f"deadline for the whole run from gpu_check.sh's start (default "
                   f"{TOTAL_S:.0f} s; dry runs: none); a part gets at most what is left, minus {RESERVE_S:.0f} s")
    p.add_argument("--part", choices=["correctness"], help=argparse.SUPPRESS)  # internal: one part's process
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dry = args.dry or os.environ.get("GPU_CHECK_DRY") == "1"
    if args.part == "correctness":
        return correctness(args.json, args.budget_s, dry)

    # the clock starts with gpu_check.sh (Python's and torch's imports count)
    started = float(os.environ.get("GPU_CHECK_START") or time.time())
    date = datetime.datetime.now(datetime.timezone.utc)
    out = os.path.abspath(args.out or os.environ.get("OUT") or
                          os.path.join(HERE, "results", f"gpu-{'dry-' if dry else ''}{date:%Y-%m-%d-%H%M}"))
    os.makedirs(out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="gpu_check-")  # the parts' own JSON: merged into gpu_check.json
    log_path = os.path.join(out, "gpu_check.log")
    open(log_path, "w").close()
    sys.path.insert(0, HERE)
    from common import environment

    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not dry:
        print("No CUDA GPU here: running the dry mode instead (tiny shapes; measures nothing).", flush=True)
        dry = True
    budgets = {k: v * args.scale_budget for k, v in (DRY_BUDGETS if dry else BUDGETS).items()}
    total = args.total_s if args.total_s is not None else (None if dry else TOTAL_S * args.scale_budget)
    deadline = None if total is None else started + total

    def budget_of(name):  # the part's own budget, within what is left before the deadline
        if deadline is None:
            return budgets[name]
        return min(budgets[name], deadline - time.time() - RESERVE_S)

    env = dict(os.environ)
    if dry:
        env["TRITON_INTERPRET"] = "1"  # the Triton kernel on the CPU (interpreter)
    report = {"environment": environment(), "dry": dry, "out": out, "args": vars(args), "budgets_s": budgets,
              "total_s": total, "parts": {}, "sections": {}, "failures": [], "notes": []}
    py = sys.executable

    def say(text):
        print(text, flush=True)
        with open(log_path, "a") as f:
            f.write(text + "\n")

    def save():
        report["elapsed_s"] = round(time.time() - started, 1)
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)

    watchdog = None

    def finish():
        if watchdog is not None and threading.current_thread() is not watchdog:
            watchdog.cancel()
        report["goals"] = goals(report.get("attention"), report.get("step"))
        report["plots"], plot_notes = plots(out, att_json if "attention" in args.parts else None,
                                            step_json if "step" in args.parts else None)
        report["plots"] = [os.path.relpath(p, out) for p in report["plots"]]
        report["notes"] += plot_notes
        for name in ("summary.txt", "gpu_check.json"):  # written below: counted now
            open(os.path.join(out, name), "a").close()
        report["files"], problems = out_files(out)
        report["failures"] += [f"output folder: {p}" for p in problems]
        if dry:  # every section ran and reported
            for name, status in report["sections"].items():
                if not status.startswith(("ran", "n/a")):  # n/a: the installed ComfyUI cannot build that model
                    report["failures"].append(f"dry run: section {name} {status}")
        save()
        text = summary(report)
        with open(os.path.join(out, "summary.txt"), "w") as f:
            f.write(text + "\n")
        say(text)
        shutil.rmtree(scratch, ignore_errors=True)
        return 1 if report["failures"] else 0

    # The script's own deadline: whatever hangs, the JSON and summary are written in time.
    if deadline is not None:
        def overdue():
            for proc in list(_RUNNING):
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, 9)
            report["failures"].append(f"the run passed its {total:.0f} s deadline; parts still running were cut")
            say("\n[gpu_check] deadline passed: writing what was measured")
            try:
                finish()
            finally:
                os._exit(3)
        watchdog = threading.Timer(max(1.0, deadline - time.time() - 2), overdue)
        watchdog.daemon = True
        watchdog.start()

    def part(name, cmd, min_s=10):
        budget = budget_of(name)
        if budget < min_s:
            report["parts"][name] = {"status": "SKIPPED: total time spent", "elapsed_s": 0, "budget_s": budget}
            say(f"\n[{name}] skipped: {max(budget, 0):.0f} s left of the total, it needs at least {min_s:.0f} s"
                + (" (run it alone: bench/gpu_check.sh --parts distill)" if name == "distill" else ""))
            return False
        if "--budget-s" in cmd:  # the part's own clock, for what it stops starting
            i = cmd.index("--budget-s") + 1
            cmd[i] = str(float(cmd[i]) * budget / budgets[name])
        say(f"\n[{name}] budget {budget:.0f} s")
        with open(log_path, "a") as f:
            f.write(f"\n===== part {name}, budget {budget:.0f} s =====\n")
        rc, elapsed, cpu_s = _run(cmd, log_path, budget, env)
        status = "ok" if rc == 0 else ("TIMED OUT (partial results kept)" if rc is None else f"FAILED (exit {rc})")
        report["parts"][name] = {"status": status, "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu_s, 1),
                                 "budget_s": round(budget, 1),
                                 "command": " ".join(os.path.relpath(c, REPO) if c.endswith(".py") else c
                                                     for c in cmd[1:] if not c.startswith(scratch))}
        say(f"[{name}] {status} in {elapsed:.1f} s ({cpu_s:.1f} s CPU)")
        if rc not in (0, None):
            report["failures"].append(f"part {name} failed (exit {rc}); see gpu_check.log")
        save()
        return True

    if "install" in args.parts:
        budget = budget_of("install")
        say(f"\n[install] budget {budget:.0f} s")
        t0 = time.perf_counter()
        wheels = args.wheels or (os.path.join(REPO, ".whl") if os.path.isdir(os.path.join(REPO, ".whl")) else None)
        site = os.path.join(scratch, "site")
        report["install"] = install_peers(wheels, site, budget, dry)
        if report["install"]["status"] == "installed":
            env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
        report["parts"]["install"] = {"status": "ok", "elapsed_s": round(time.perf_counter() - t0, 1),
                                      "budget_s": budget}
        report["sections"]["install"] = f"ran: {report['install']['status']}"
        say(f"[install] {report['install']['status']} ({time.perf_counter() - t0:.1f} s)")

    corr_json = os.path.join(scratch, "correctness.json")
    if "correctness" in args.parts:
        part("correctness", [py, os.path.join(HERE, "gpu_check.py"), "--part", "correctness", "--json", corr_json,
                             "--budget-s", str(budgets["correctness"])] + (["--dry"] if dry else []))
        report["correctness"] = corr = _load(corr_json) or {}
        for f in corr.get("failures", []):
            report["failures"].append(f"correctness: {f}")
        for name in SECTIONS:
            sec = corr.get("sections", {}).get(name)
            report["sections"][f"correctness/{name}"] = (
                "not run (the part was cut or crashed)" if sec is None else
                f"ran {sec['ran']} cases" + (f", {sec['skipped']} skipped" if sec["skipped"] else "")
                if sec["status"] == "ok" else sec["status"])
        save()

    att_json = os.path.join(scratch, "attention.json")
    if "attention" in args.parts:
        cmd = [py, os.path.join(HERE, "attention.py"), "--peers", "sol", "natten", "--dense", "flash", "cudnn", "fa3",
               "--out", att_json, "--budget-s", str(0.8 * budgets["attention"])]
        if dry:
            # budget 0: grid 12 runs (the first always does), grid 16 is skipped by the budget
            cmd[cmd.index("--budget-s") + 1] = "0"
            cmd += ["--quick", "--grids", "12", "16", "--radii", "3", "--down", "1", "2", "--standin-peers",
                    "--repeats", "1"]
        else:  # 8K first: the goals are there; Flex (a compile per config) at r16 d1 only
            cmd += ["--grids", "512", "256", "128", "--radii", "16", "8", "32", "--down", "1", "4",
                    "--flex-radii", "16", "--flex-down", "1", "--repeats", "10"]
        part("attention", cmd)
        report["attention"] = att = _load(att_json) or {}
        for r in att.get("rows", []):
            err = r.get("rel_err_vs_torch_path")
            if err is not None and not err < TOL[r["dtype"]]:
                report["failures"].append(f"attention: ours vs torch path at grid {r['grid']} r{r['window']} "
                                          f"d{r['down_factor']}: relative error {err:.2e}")
        rows = att.get("rows", [])
        report["sections"]["attention/dense_baselines"] = (
            f"ran: {', '.join(f'{k} {v}' for k, v in att['dense'].items())}" if att.get("dense") else "not run")
        report["sections"]["attention/ours"] = f"ran {len(rows)} configurations" if rows else "not run"
        flex_rows = [r for r in rows if r.get("flex_ms")]
        report["sections"]["attention/flex"] = f"ran {len(flex_rows)} configurations" if flex_rows else "not run"
        report["sections"]["attention/peers"] = (f"ran: {att['peers']}" if att.get("peers") else "not run")
        save()

    step_json = os.path.join(scratch, "flux_step.json")
    if "step" in args.parts:
        comfy = _comfyui_checkout(args.comfyui)
        cmd = [py, os.path.join(HERE, "flux_step.py"), "--out", step_json] + (["--comfyui", comfy] if comfy else [])
        if dry:  # both implementations, so CI keeps each working
            cmd += ["--impl", "both" if comfy else "standalone", "--tiny", "--sizes", "128", "--blocks", "one",
                    "--chunk-tokens", "32", "--repeats", "1"]
        else:
            cmd += ["--impl", "auto", "--sizes", "8192", "4096", "--blocks", args.step_blocks, "--chunk-tokens",
                    "8192", "--repeats", "1"]
        part("step", cmd)
        report["step"] = step = _load(step_json) or {}
        for r in step.get("rows", []):
            for name in ("dense", "clear"):
                err = r.get(f"{name}_chunked_rel_err")
                if err is not None and not err < 2e-2:
                    report["failures"].append(f"step: {name} with token chunking differs by {err:.2e} at "
                                              f"{r['image_px']}px")
        for impl in (["comfyui", "standalone"] if dry and comfy else [None]):
            rows = [r for r in step.get("rows", []) if impl is None or r.get("impl") == impl]
            label = "step" if impl is None else f"step/{impl}"
            report["sections"][label] = (f"ran {len(rows)} sizes ({', '.join(sorted({r['impl'] for r in rows}))})"
                                         if rows else "not run")
        save()

    distill_json = os.path.join(scratch, "distill.json")
    if "distill" in args.parts:
        comfy = _comfyui_checkout(args.comfyui)
        cmd = [py, os.path.join(HERE, "distill_step.py"), "--out", distill_json, "--budget-s",
               str(0.85 * budgets["distill"])] + (["--comfyui", comfy] if comfy else [])
        if dry:
            cmd += ["--tiny", "--steps", "2", "--size", "128", "--text-tokens", "16"]
        ran = comfy is not None and part("distill", cmd, min_s=10 if dry else DISTILL_MIN_S)
        if comfy is None:
            report["parts"]["distill"] = {"status": "SKIPPED: no ComfyUI checkout", "elapsed_s": 0,
                                          "budget_s": budgets["distill"]}
            say("\n[distill] skipped: no ComfyUI checkout (--comfyui, $COMFYUI_PATH or .comfyui/)")
        report["distill"] = dist = _load(distill_json) or {}
        for run in ("flux1-dev", "flux2-klein-4b"):
            row = next((r for r in dist.get("rows", []) if r.get("run") == run), None)
            report["sections"][f"distill/{run}"] = (
                "not run" + ("" if ran else ": skipped for time") if row is None else
                f"ran {row['steps_done']} steps" if row.get("status") == "ok" else row.get("status", "not run"))
            if row is not None and str(row.get("status", "")).startswith("FAILED"):
                report["failures"].append(f"distill: {run} {row['status']}")
        save()

    return finish()


if __name__ == "__main__":
    sys.exit(main())
