"""Ahead-of-time compile of every Triton kernel variant the dispatcher can
launch for FLUX shapes, for each NVIDIA and AMD arch we target, on the CPU
(no GPU needed).

Variants are discovered, not listed: every radius and down factor the node
allows goes through ``tiling.kernel_config``, every FLUX-like shape and layout
(q/k/v contiguous, (B, L, H, D) memory, the single block's v as a slice of
linear1's 21504-wide output, batch 2, up to 8K) through
``clear_triton.prepare`` and ``clear_triton.image_rows_launches`` (what the
real launch runs), then through Triton's own launcher specialisation (i32/i64,
ints equal to 1, divisibility by 16, pointer alignment) for a ``GPUTarget``;
the distinct specialisations are compiled, in parallel. The dispatcher's trust
key (``clear_triton.launch_variant``) must see the same specialisation; no
stride argument may be 64-bit. Each compile must run every ``tl.dot`` on
tensor cores (each dot of the Triton IR is an MMA in the GPU IR, and the SASS
holds at least the HMMA/HGMMA instructions those dots need), spill nothing
(ptxas -v) and fit the arch's shared memory per block. head_dim 16/32/256
are not compiled: ``triton_supported`` refuses them on the GPU.

ROCm targets (CDNA gfx90a/gfx942/gfx950: 64-lane wavefronts; RDNA
gfx1100/gfx1201: 32) run Triton's whole AMD pipeline here, ttir -> ttgir ->
llir -> amdgcn -> hsaco: LLVM's AMDGPU target and lld are linked into
libtriton (``amd.assemble_amdgcn``, ``amd.link_hsaco``), so no ROCm install
is needed. Each compile must lower every dot to MFMA (CDNA) or WMMA (RDNA)
in the GPU IR with at least the matrix instructions those dots need in the
amdgcn, use no scratch memory (no VGPR spills: LLVM's kernel metadata; SGPR
spills go to VGPR lanes, not memory; RDNA at head_dim 128: at most
``RDNA_HEAD_DIM_128_SCRATCH`` bytes) and fit the LDS per workgroup, and
the hsaco must be an AMDGPU ELF. What stays unchecked without an AMD GPU:
loading the hsaco (HIP runtime) and running it.

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
# ROCm: gfx name -> (wavefront size, LDS per workgroup in bytes). CDNA (MI200, MI300, MI350) runs 64-lane
# wavefronts, RDNA 3/4 (RX 7000, RX 9000) 32.
ROCM = {"gfx90a": (64, 64 * 1024), "gfx942": (64, 64 * 1024), "gfx950": (64, 160 * 1024),
        "gfx1100": (32, 64 * 1024), "gfx1201": (32, 64 * 1024)}
# Scratch bytes accepted per compile: RDNA at head_dim 128 (16 warps, 1 stage) spills 6-16 VGPRs (28-68 B) in
# some variants on gfx1100/gfx1201 (Triton 3.8; with 4 warps 556-688 B). Not yet measured on a GPU.
RDNA_HEAD_DIM_128_SCRATCH = 128
TARGETS = [("cuda", arch, 32) for arch in SMEM_LIMIT] + [("hip", arch, lanes) for arch, (lanes, _) in ROCM.items()]
NODE_RADII = range(1, 257)  # the node's window_size range
NODE_DOWN = range(1, 17)    # the node's down_factor range
DTYPES = (torch.bfloat16, torch.float16)  # on CUDA the Triton backend takes half precision only
HEAD_DIMS = (64, 128)  # what triton_supported accepts on the GPU (test_supported_head_dims_are_compiled)
# FLUX-like shapes: (heads, head_dim), text lengths, grids (incl. odd, and 8K), batch sizes, q/k/v layouts.
HEADS = ((24, 128), (48, 64))
TEXT = (512, 256, 333)
GRIDS = ((64, 64), (63, 95), (512, 512))
BATCHES = (1, 2)
LAYOUTS = ("bhld", "blhd", "single")
LINEAR1_WIDTH = 3 * 3072 + 4 * 3072  # FLUX single block: q, k, v and the MLP input in one linear
RESULT_FORMAT = 3  # bump when compile_and_inspect reports new fields
def _bin(name):
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return path if os.path.exists(path) else None


def _meta(shape, dtype, layout):
    """q, k, v of one layout, on the meta device, and the byte offsets of each
    batch element's base (meta pointers are 0: alignment is checked on these)."""
    B, H, L, D = shape
    if layout == "single":  # q, k after RoPE: contiguous; v a strided slice of linear1's output
        qk = torch.empty(B, H, L, D, dtype=dtype, device="meta")
        buf = torch.empty(B, L, LINEAR1_WIDTH, dtype=dtype, device="meta")
        v = buf[..., :3 * H * D].view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)[2]
        return qk, qk, v
    if layout == "blhd":
        x = torch.empty(B, L, H, D, dtype=dtype, device="meta").transpose(1, 2)
    else:
        x = torch.empty(B, H, L, D, dtype=dtype, device="meta")
    return x, x, x


def _base_offsets(x):
    return [(x.storage_offset() + b * x.stride(0)) * x.element_size() for b in range(x.shape[0])]


def discover_launches():
    """Distinct (arch, specialisation) compiles over everything the dispatcher
    can launch for FLUX, and any disagreement between Triton's launcher and
    the dispatcher's ``launch_variant``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from comfyui_clear.kernels import clear_triton, tiling

    jobs, problems, seen = {}, [], set()
    kernel = clear_triton._clear_image_rows_kernel
    names = clear_triton._param_names()
    for target in TARGETS:
        arch = target[1]
        target = GPUTarget(*target)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        for heads, head_dim in HEADS:
            # one representative (r, d) per distinct config and per int class of r and d
            reps = {}
            for r in NODE_RADII:
                for d in NODE_DOWN:
                    cfg = tiling.kernel_config(head_dim, r, d, arch)
                    reps.setdefault((tuple(sorted(cfg.items())), d > 1, r == 1, r % 16 == 0, d % 16 == 0),
                                    (r, d, cfg))
            for r, d, cfg in reps.values():
                for dtype in DTYPES:
                    for T in TEXT:
                        for h, w in GRIDS:
                            for B in BATCHES:
                                for layout in LAYOUTS:
                                    L = T + h * w
                                    q, k, v = _meta((B, heads, L, head_dim), dtype, layout)
                                    if any(off % 16 for t in (q, k, v) for off in _base_offsets(t)):
                                        problems.append(f"{layout}: a batch element's base is not 16-byte aligned")
                                    pk = None
                                    if d > 1:  # pool_image_tokens gives float32 (B, H, P, D)
                                        pk = torch.empty(B, heads, tiling.pooled_count(h, w, d), head_dim,
                                                         device="meta")
                                    q, k, v, kp, vp = clear_triton.prepare(q, k, v, pk, pk)
                                    out = clear_triton._empty_output(B, L, heads, head_dim, dtype, "meta")
                                    offsets = torch.empty(64, 2, dtype=torch.int32, device="meta")
                                    launches = clear_triton.image_rows_launches(
                                        q, k, v, out, kp, vp, offsets, offsets, text_len=T, grid=(h, w), window=r,
                                        scale=head_dim ** -0.5, cfg=cfg)
                                    example = (f"head_dim {head_dim} {dtype} r {r} d {d} T {T} grid {h}x{w} "
                                               f"B {B} {layout}")
                                    for _, _, args, kwargs in launches:
                                        kwargs = {**kwargs, "UPCAST": False}  # what a CUDA launch passes
                                        bound, spec, opts = binder(*args, **kwargs)
                                        _, ours, _ = clear_triton.launch_variant(args, kwargs, arch)
                                        theirs = tuple((n, *s) for n, s in zip(names, spec) if s[0] != "constexpr"
                                                       or n not in dict(kwargs))
                                        if ours != theirs:
                                            problems.append(f"{example}: launch_variant {ours} != launcher {theirs}")
                                        spec_key = (arch, repr(spec), repr(sorted(kwargs.items())))
                                        if spec_key in seen:  # Triton's own cache key: nothing new to pack
                                            continue
                                        seen.add(spec_key)
                                        options, signature, constexprs, attrs = kernel._pack_args(
                                            backend, kwargs, bound, spec, opts)
                                        key = repr((arch, sorted(signature.items()), sorted(constexprs.items()),
                                                    sorted(attrs.items()), sorted(options.__dict__.items())))
                                        jobs.setdefault(key, dict(backend=target.backend, arch=arch,
                                                                  warp_size=target.warp_size, signature=signature,
                                                                  constexprs=constexprs, attrs=attrs,
                                                                  options=options.__dict__, example=example,
                                                                  has_pool=d > 1))
    return jobs, problems


def _source_hash():
    from comfyui_clear.kernels import clear_triton, tiling
    h = hashlib.sha256(f"{triton.__version__} {RESULT_FORMAT}".encode())
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
    if job["backend"] == "hip":
        ck = triton.compile(ASTSource(clear_triton._clear_image_rows_kernel, job["signature"], job["constexprs"],
                                      job["attrs"]), target=GPUTarget("hip", arch, job["warp_size"]),
                            options=job["options"])
        return dict(shared=ck.metadata.shared, num_warps=ck.metadata.num_warps, num_stages=ck.metadata.num_stages,
                    warp_size=ck.metadata.warp_size, hsaco_elf=ck.asm["hsaco"][:4] == b"\x7fELF",
                    **amdgcn_report(ck.asm["amdgcn"]), **dot_report(ck.asm["ttir"], ck.asm["ttgir"],
                                                                    ck.metadata.num_warps))
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
                num_stages=ck.metadata.num_stages, **dot_report(ck.asm["ttir"], ck.asm["ttgir"], ck.metadata.num_warps))


def amdgcn_report(asm):
    """What LLVM's AMDGPU backend says about one kernel: matrix instructions
    (MFMA on CDNA, WMMA on RDNA), registers, spills, scratch, occupancy."""
    def meta(name):
        found = re.findall(rf"^\s+\.{name}:\s+(\d+)", asm, re.M)
        return int(found[0]) if found else None

    scratch = re.findall(r"^; ScratchSize: (\d+)", asm, re.M)
    occupancy = re.findall(r"^; Occupancy: (\d+)", asm, re.M)
    return dict(mfma=len(re.findall(r"^\s+v_mfma_", asm, re.M)), wmma=len(re.findall(r"^\s+v_wmma_", asm, re.M)),
                vgprs=meta("vgpr_count"), agprs=meta("agpr_count"), vgpr_spills=meta("vgpr_spill_count"),
                sgpr_spills=meta("sgpr_spill_count"), private_segment=meta("private_segment_fixed_size"),
                scratch=int(scratch[0]) if scratch else None, occupancy=int(occupancy[0]) if occupancy else None)


# The matrix instruction shape (M, N, K) of an AMD WMMA layout per version: RDNA 3 and 4 take 16x16x16 for 16-bit
# inputs (Triton's amd_wmma encoding does not spell it out; amd_mfma's instrShape does).
WMMA_SHAPE = {1: (16, 16, 16), 2: (16, 16, 16)}


def dot_report(ttir, ttgir, num_warps):
    """Every dot of the Triton IR and how the GPU IR lowered it: an MMA layout
    (NVIDIA version 2: mma.sync, HMMA; version 3: wgmma, HGMMA; AMD "mfma",
    "wmma") or not (None: FMA), and the fewest tensor-core instructions per
    warp the MMA dots need (16-bit inputs: HMMA m16n8k16; HGMMA m64nNk16 per
    warpgroup; MFMA/WMMA of the layout's instruction shape). AMD's pipeliner
    peels loop iterations: its GPU IR may hold more dots than the source."""
    encodings = {name: (int(major), [int(x) for x in shape.split(",")])
                 for name, major, shape in re.findall(
                     r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+),.*?instrShape = \[([\d, ]+)\]", ttgir, re.M)}
    encodings.update({name: ("mfma", [int(x) for x in shape.split(",")]) for name, shape in re.findall(
        r"^#(\w+) = #ttg\.amd_mfma<\{.*?instrShape = \[([\d, ]+)\]", ttgir, re.M)})
    encodings.update({name: ("wmma", list(WMMA_SHAPE[int(version)])) for name, version in re.findall(
        r"^#(\w+) = #ttg\.amd_wmma<\{version = (\d+)", ttgir, re.M)})
    dots, need = [], {"hmma": 0, "hgmma": 0, "amd": 0}
    for line in ttgir.splitlines():
        if not re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", line):
            continue
        types = line.split(" : ", 1)[1]
        M, K = (int(x) for x in re.search(r"<(\d+)x(\d+)x", types).groups())
        res = re.search(r"-> tensor<(\d+)x(\d+)xf32, #(\w+)", types)
        N, enc = int(res.group(2)), res.group(3)
        version, instr = encodings.get(enc, (None, None))
        dots.append([M, N, K, version])
        if version == 2:
            need["hmma"] += (M // 16) * (N // 8) * (K // 16) // num_warps
        elif version == 3:
            need["hgmma"] += (M // 64) * (N // instr[1]) * (K // 16) // max(1, num_warps // 4)
        elif version in ("mfma", "wmma"):
            need["amd"] += (M // instr[0]) * (N // instr[1]) * (K // instr[2]) // num_warps
    return dict(ttir_dots=len(re.findall(r"= tt\.dot ", ttir)), dots=dots, hmma_min=need["hmma"],
                hgmma_min=need["hgmma"], amd_matrix_min=need["amd"])


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
        jobs, problems = pool.submit(discover_launches).result()
        return jobs, _cached_results(jobs, pool), problems


def test_launches_discovered(compiled):
    jobs, _, problems = compiled
    assert not problems, "\n".join(problems[:20])
    archs = {job["arch"] for job in jobs.values()}
    assert archs == {arch for _, arch, _ in TARGETS}
    head_dims = {job["constexprs"][(list(job["signature"]).index("HEAD_DIM"),)] for job in jobs.values()}
    assert head_dims == set(HEAD_DIMS)
    # with and without pooled keys, both key-block shapes, both half types, per arch
    for arch in archs:
        kinds = {(job["has_pool"], job["signature"]["Q"]) for job in jobs.values() if job["arch"] == arch}
        assert kinds == {(p, t) for p in (False, True) for t in ("*bf16", "*fp16")}
    wide = [(job["example"], name) for job in jobs.values() for name, kind in job["signature"].items()
            if kind in ("i64", "u64")]
    assert not wide, f"64-bit kernel arguments (batch strides must stay out of the kernel): {wide[:5]}"
    # ROCm: no variant per allocation size (buffer loads below 2 GiB; clear_triton._full_range)
    ranged = [job["example"] for job in jobs.values()
              if any(attr[0] == "tt.pointer_range" for attrs in job["attrs"].values() for attr in attrs)]
    assert not ranged, f"pointer-range (buffer load) variants: {ranged[:5]}"


def test_supported_head_dims_are_compiled(monkeypatch):
    """triton_supported accepts on the GPU exactly the head_dims compiled here."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from comfyui_clear import kernels

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        with FakeTensorMode():
            accepted = {D for D in (16, 32, 64, 96, 128, 256)
                        if kernels.triton_supported(torch.empty(1, 24, 8, D, device="cuda", dtype=torch.bfloat16))
                        is None}
    assert accepted == set(HEAD_DIMS)


def report(jobs, results):
    """One line per compile: what the README's compile table is made from."""
    lines = []
    for key, job in sorted(jobs.items(), key=lambda kv: (str(kv[1]["arch"]), kv[1]["example"])):
        res = results[key]
        if job["backend"] == "hip":
            lines.append(f"{job['arch']:<7} {job['example']:<58} warps {res['num_warps']}x{res['warp_size']} "
                         f"stages {res['num_stages']} vgprs {res['vgprs']} agprs {res['agprs']} "
                         f"shared {res['shared'] // 1024} KB scratch {res['scratch']} B "
                         f"sgpr spills {res['sgpr_spills']} occupancy {res['occupancy']} "
                         f"{'MFMA' if res['mfma'] else 'WMMA'} {res['mfma'] or res['wmma']}")
            continue
        lines.append(f"sm_{job['arch']:<4} {job['example']:<58} warps {res['num_warps']} stages {res['num_stages']} "
                     f"regs {res['regs']} shared {res['shared'] // 1024} KB spill {res['spill_bytes']} B "
                     f"{'HGMMA' if res['hgmma'] else 'HMMA'} {res['hgmma'] or res['hmma']}")
    return "\n".join(lines)


def test_every_launch_compiles_clean(compiled):
    jobs, results, _ = compiled
    print(report(jobs, results))  # shown with pytest -s
    bad = []
    for key, job in jobs.items():
        res, arch = results[key], job["arch"]
        problems = []
        sites = 6 if job["has_pool"] else 4  # Q K^T and P V for text, local and pooled keys
        if job["backend"] == "hip":
            problems = _rocm_problems(job, res, sites)
            if problems:
                bad.append(f"{arch} ({job['example']}; {res['num_warps']} warps, {res['num_stages']} stages, "
                           f"{res['vgprs']} VGPRs, {res['shared']} B LDS): {', '.join(problems)}")
            continue
        if res["ttir_dots"] != sites or len(res["dots"]) != sites:
            problems.append(f"{res['ttir_dots']} dots in TTIR, {len(res['dots'])} in TTGIR, {sites} in the source")
        fma = [dot for dot in res["dots"] if dot[3] is None]
        if fma:
            problems.append(f"dots not on tensor cores (M, N, K): {[dot[:3] for dot in fma]}")
        if arch == 90 and any(dot[3] != 3 for dot in res["dots"]):
            problems.append(f"dots not on wgmma: {[dot[:3] for dot in res['dots'] if dot[3] != 3]}")
        if res["hgmma"] < res["hgmma_min"] or res["hmma"] < res["hmma_min"]:
            problems.append(f"SASS has {res['hgmma']} HGMMA / {res['hmma']} HMMA, the dots need at least "
                            f"{res['hgmma_min']} / {res['hmma_min']}")
        if res["hgmma"] + res["hmma"] == 0:
            problems.append("no tensor-core instruction in SASS")
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


def _rocm_problems(job, res, sites):
    arch = job["arch"]
    problems = []
    matrix = "wmma" if job["warp_size"] == 32 else "mfma"  # RDNA: WMMA; CDNA: MFMA
    if res["warp_size"] != ROCM[arch][0]:
        problems.append(f"compiled for {res['warp_size']}-lane wavefronts")
    if res["ttir_dots"] != sites or len(res["dots"]) < sites:
        problems.append(f"{res['ttir_dots']} dots in TTIR, {len(res['dots'])} in TTGIR, {sites} in the source")
    off = [dot[:3] for dot in res["dots"] if dot[3] != matrix]
    if off:
        problems.append(f"dots not on {matrix.upper()} (M, N, K): {off}")
    if res[matrix] < max(1, res["amd_matrix_min"]):
        problems.append(f"amdgcn has {res[matrix]} {matrix.upper()} instructions, the dots need at least "
                        f"{res['amd_matrix_min']}")
    head_dim = job["constexprs"][(list(job["signature"]).index("HEAD_DIM"),)]
    allowed = RDNA_HEAD_DIM_128_SCRATCH if matrix == "wmma" and head_dim == 128 else 0
    if res["vgpr_spills"] is None or res["scratch"] is None:
        problems.append("LLVM reported no spill count or scratch size")
    elif max(res["scratch"], res["private_segment"] or 0) > allowed or (res["vgpr_spills"] and not allowed):
        problems.append(f"{res['vgpr_spills']} VGPRs spilled, {res['scratch']} B scratch")
    if res["shared"] > ROCM[arch][1]:
        problems.append(f"LDS {res['shared']} B > {ROCM[arch][1]} B")
    if not res["hsaco_elf"]:
        problems.append("hsaco is not an ELF object")
    return problems
