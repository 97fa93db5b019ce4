"""Ahead-of-time compile of every Triton launch the dispatcher can make for
FLUX shapes, for each NVIDIA arch we target, on the CPU (no GPU needed).

Launches are discovered, not listed: every radius and down factor the node
allows goes through ``tiling.kernel_config`` and every FLUX-like shape through
``clear_triton.image_rows_launch`` (the function the real launch uses), then
through Triton's own launcher specialisation (ints equal to 1, divisibility by
16) for a ``GPUTarget``; the distinct specialisations are compiled, in
parallel. Each must use tensor cores (HGMMA on sm_90, HMMA elsewhere), spill
nothing (ptxas -v) and fit the arch's shared memory per block.

Compiles take seconds each: results are kept per (kernel source, Triton
version, specialisation) in ``$CLEAR_AOT_CACHE`` (default
``~/.cache/comfyui-clear/aot``), so an unchanged kernel re-checks instantly;
CI may cache that folder.
"""

import concurrent.futures
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (it comes with torch's Linux wheels)")

# Max shared memory per block (opt-in), bytes.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}
NODE_RADII = range(1, 257)  # the node's window_size range
NODE_DOWN = range(1, 17)    # the node's down_factor range
DTYPES = (torch.bfloat16, torch.float16)  # on CUDA the Triton backend takes half precision only
# FLUX-like shapes: (heads, head_dim), text lengths, grids (incl. odd), q/k/v layouts.
HEADS = ((24, 128), (48, 64))
TEXT = (512, 256, 333)
GRIDS = ((64, 64), (63, 95), (512, 512))
LAYOUTS = ("bhld", "blhd")  # (B, H, L, D) contiguous, or (B, L, H, D) memory viewed as (B, H, L, D)


def _bin(name):
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return path if os.path.exists(path) else None


def _meta(shape, dtype, layout):
    B, H, L, D = shape
    if layout == "blhd":
        return torch.empty(B, L, H, D, dtype=dtype, device="meta").transpose(1, 2)
    return torch.empty(B, H, L, D, dtype=dtype, device="meta")


def discover_launches():
    """Distinct (arch, specialisation) compiles over everything the dispatcher can launch for FLUX."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from comfyui_clear.kernels import clear_triton, tiling

    jobs = {}
    for arch in SMEM_LIMIT:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        kernel = clear_triton._clear_image_rows_kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        for heads, head_dim in HEADS:
            # one representative (r, d) per distinct config and per int class of r
            reps = {}
            for r in NODE_RADII:
                for d in NODE_DOWN:
                    cfg = tiling.kernel_config(head_dim, r, d, arch)
                    reps.setdefault((tuple(sorted(cfg.items())), d > 1, r == 1, r % 16 == 0), (r, d, cfg))
            for r, d, cfg in reps.values():
                for dtype in DTYPES:
                    for T in TEXT:
                        for h, w in GRIDS:
                            for layout in LAYOUTS:
                                L = T + h * w
                                q = _meta((1, heads, L, head_dim), dtype, layout)
                                out = torch.empty_like(q)
                                kp = None
                                if d > 1:
                                    P = tiling.pooled_count(h, w, d)
                                    kp = torch.empty(1, heads, P, head_dim, dtype=dtype, device="meta")
                                offsets = torch.empty(64, 2, dtype=torch.int32, device="meta")
                                ranges = torch.empty(64, 2, dtype=torch.int32, device="meta")
                                _, _, args, kwargs = clear_triton.image_rows_launch(
                                    q, q, q, out, kp, kp, offsets, ranges, text_len=T, grid=(h, w), window=r,
                                    scale=head_dim ** -0.5, cfg=cfg)
                                kwargs["UPCAST"] = False  # what a CUDA launch passes
                                bound, spec, opts = binder(*args, **kwargs)
                                options, signature, constexprs, attrs = kernel._pack_args(
                                    backend, kwargs, bound, spec, opts)
                                key = repr((arch, sorted(signature.items()), sorted(constexprs.items()),
                                            sorted(attrs.items()), sorted(options.__dict__.items())))
                                jobs.setdefault(key, dict(arch=arch, signature=signature, constexprs=constexprs,
                                                          attrs=attrs, options=options.__dict__,
                                                          example=f"head_dim {head_dim} {dtype} r {r} d {d} "
                                                                  f"T {T} grid {h}x{w} {layout}"))
    return jobs


def _source_hash():
    from comfyui_clear.kernels import clear_triton, tiling
    h = hashlib.sha256(triton.__version__.encode())
    for mod in (clear_triton, tiling):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def compile_and_inspect(job):
    """Compile one specialisation; report shared memory, registers, spills, MMA instructions."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from comfyui_clear.kernels import clear_triton

    arch = job["arch"]
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        ck = triton.compile(ASTSource(clear_triton._clear_image_rows_kernel, job["signature"], job["constexprs"],
                                      job["attrs"]), target=GPUTarget("cuda", arch, 32), options=job["options"])
    ptxas_log = log.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        if "spill" not in ptxas_log:  # Triton's own cache had the kernel: ask ptxas again, same flags
            sm = f"sm_{arch}a" if arch in (90, 100, 120) else f"sm_{arch}"
            ptxas = (_bin("ptxas-blackwell") if arch >= 100 else None) or _bin("ptxas")
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ck.asm["ptx"])
            ptxas_log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}", src, "-o",
                                        os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                                       check=True).stderr
        cubin = os.path.join(tmp, "triton.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        sass = subprocess.run([_bin("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log)]
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", ptxas_log)]
    return dict(shared=ck.metadata.shared, regs=max(regs) if regs else None, spill_bytes=sum(spills),
                spill_reported=bool(spills), hgmma=len(re.findall(r"\bHGMMA\.", sass)),
                hmma=len(re.findall(r"\bHMMA\.", sass)), num_warps=ck.metadata.num_warps,
                num_stages=ck.metadata.num_stages)


@contextlib.contextmanager
def _compiler_processes():
    """Worker processes that see Triton's compiler, not its interpreter: the
    other kernel tests set TRITON_INTERPRET=1 in this process, where
    ``triton.jit`` then makes interpreted functions that cannot be compiled."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with concurrent.futures.ProcessPoolExecutor(
                max(1, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _cached_results(jobs, pool):
    root = os.environ.get("CLEAR_AOT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "comfyui-clear", "aot"))
    folder = os.path.join(root, _source_hash())
    os.makedirs(folder, exist_ok=True)
    results, futures = {}, {}
    for key in jobs:
        path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        if os.path.exists(path):
            with open(path) as f:
                results[key] = json.load(f)
        else:
            futures[pool.submit(compile_and_inspect, jobs[key])] = (key, path)
    for fut in concurrent.futures.as_completed(futures):
        key, path = futures[fut]
        results[key] = fut.result()
        with open(path, "w") as f:
            json.dump(results[key], f)
    return results


@pytest.fixture(scope="module")
def compiled():
    if _bin("ptxas") is None or _bin("cuobjdump") is None:
        pytest.skip("Triton's bundled ptxas/cuobjdump are absent (triton/backends/nvidia/bin)")
    with _compiler_processes() as pool:
        jobs = pool.submit(discover_launches).result()
        return jobs, _cached_results(jobs, pool)


def test_launches_discovered(compiled):
    jobs, _ = compiled
    archs = {job["arch"] for job in jobs.values()}
    assert archs == set(SMEM_LIMIT)
    head_dims = {job["constexprs"][(list(job["signature"]).index("HEAD_DIM"),)] for job in jobs.values()}
    assert head_dims == {64, 128}


def report(jobs, results):
    """One line per compile: what the README's compile table is made from."""
    lines = []
    for key, job in sorted(jobs.items(), key=lambda kv: (kv[1]["arch"], kv[1]["example"])):
        res = results[key]
        lines.append(f"sm_{job['arch']:<4} {job['example']:<58} warps {res['num_warps']} stages {res['num_stages']} "
                     f"regs {res['regs']} shared {res['shared'] // 1024} KB spill {res['spill_bytes']} B "
                     f"{'HGMMA' if res['hgmma'] else 'HMMA'} {res['hgmma'] or res['hmma']}")
    return "\n".join(lines)


def test_every_launch_compiles_clean(compiled):
    jobs, results = compiled
    print(report(jobs, results))  # shown with pytest -s
    bad = []
    for key, job in jobs.items():
        res, arch = results[key], job["arch"]
        problems = []
        if arch == 90 and res["hgmma"] == 0:
            problems.append("no HGMMA in SASS")
        if arch != 90 and res["hmma"] == 0:
            problems.append("no HMMA in SASS")
        if not res["spill_reported"]:
            problems.append("ptxas reported no spill line")
        if res["spill_bytes"]:
            problems.append(f"{res['spill_bytes']} spill bytes")
        if res["shared"] > SMEM_LIMIT[arch]:
            problems.append(f"shared {res['shared']} B > {SMEM_LIMIT[arch]} B")
        if problems:
            bad.append(f"sm_{arch} ({job['example']}; {res['num_warps']} warps, {res['num_stages']} stages, "
                       f"{res['regs']} regs, {res['shared']} B shared): {', '.join(problems)}")
    assert not bad, "\n".join(bad)
