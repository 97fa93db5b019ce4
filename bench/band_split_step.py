"""Benchmark: one FLUX step with CLEAR on 1 GPU vs split over P GPUs by the
CLEAR Multi-GPU Split node, at 4K and 8K: per-step time and peak memory per GPU.

    COMFYUI_PATH=/path/to/ComfyUI python bench/band_split_step.py --gpus 2        # 1 vs 2 GPUs, 4K and 8K
    COMFYUI_PATH=/path/to/ComfyUI python bench/band_split_step.py --gpus 2 4 8 --sizes 8192
    COMFYUI_PATH=/path/to/ComfyUI python bench/band_split_step.py --depth 2 2      # fewer blocks (small GPUs)
    COMFYUI_PATH=/path/to/ComfyUI python bench/band_split_step.py --tiny --gpus 2  # CPU smoke run (not a benchmark)

Random weights (timing only), bf16, CLEAR training-free (r = --window,
d = --down). The model goes through ComfyUI's own sampling (comfy.sample, one
Euler step) and, for P > 1, through ComfyUI's multi-GPU clones (full weights
on every GPU). Each split result is compared with the 1-GPU result (relative
error printed). Needs ComfyUI 0.33 or newer and P visible GPUs; nothing here
has been measured on GPUs yet.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SMOKE_NOTE, environment, write_results  # noqa: E402
from flux_step import FULL, TINY, build_model, comfy_import  # noqa: E402


def devices():
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


def sync_all():
    for d in devices():
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def step(model, latent, positive):
    import comfy.sample

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", positive, positive, latent,
                                   denoise=1.0, disable_pbar=True, seed=0)


def measure(model, latent, positive, repeats):
    step(model, latent, positive)  # warm-up: loads weights on every GPU, compiles kernels
    times, peaks = [], {}
    for d in devices():
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    out = None
    for _ in range(repeats):
        sync_all()
        t0 = time.perf_counter()
        out = step(model, latent, positive)
        sync_all()
        times.append((time.perf_counter() - t0) * 1e3)
    for d in devices():
        if d.type == "cuda":
            peaks[str(d)] = torch.cuda.max_memory_allocated(d)
    return sorted(times)[len(times) // 2], peaks, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--gpus", type=int, nargs="+", default=[2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="image side in pixels")
    ap.add_argument("--depth", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--down", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at a tiny size")
    ap.add_argument("--out")
    args = ap.parse_args()
    comfy_import(args.comfyui)
    from comfyui_clear.nodes import band_split, clear_patch

    dims = dict(TINY if args.tiny else FULL)
    if args.depth:
        dims.update(depth=args.depth[0], depth_single=args.depth[1])
    sizes = [64] if args.tiny else args.sizes
    dtype = torch.float32 if args.tiny else torch.bfloat16
    main_device = devices()[0]
    factory_args = (dims, str(main_device), dtype)
    base = build_model(*factory_args)
    base.cached_patcher_init = (build_model, factory_args)  # what core's multi-GPU clones load per GPU
    clear = clear_patch.patch_model(base, "none (training-free)", window_size=args.window, down_factor=args.down)
    gen = torch.Generator().manual_seed(1)
    text, ctx = 512, 4096
    positive = [[torch.randn(1, text, ctx, generator=gen).to(dtype),
                 {"pooled_output": torch.randn(1, 768, generator=gen).to(dtype), "guidance": 3.5}]]
    rows = []
    for side in sizes:
        latent = torch.zeros(1, 16, side // 8, side // 8)
        one_ms, one_peak, want = measure(clear, latent, positive, args.repeats)
        rows.append({"size": side, "gpus": 1, "step_ms": one_ms, "peak_bytes": one_peak})
        print(f"{side}px  1 GPU : {one_ms:9.1f} ms/step  peak {one_peak}")
        for P in args.gpus:
            split = band_split.split_model(clear, P)
            ms, peak, got = measure(split, latent, positive, args.repeats)
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            rows.append({"size": side, "gpus": P, "step_ms": ms, "peak_bytes": peak, "rel_err_vs_1": err,
                         "speedup": one_ms / ms})
            print(f"{side}px  {P} GPUs: {ms:9.1f} ms/step  x{one_ms / ms:.2f}  peak {peak}  rel.err {err:.1e}")
            del split
    payload = {"environment": environment(), "dims": dims, "window": args.window, "down": args.down,
               "results": rows, "note": SMOKE_NOTE if args.tiny else "random weights, timing only"}
    print("written", write_results("band_split_step", payload, args.out))


if __name__ == "__main__":
    main()
