"""What CLEAR's weight patches cost and do at full FLUX.1 width, on the CPU
(ComfyUI's own patch code, a FLUX.1 model with one double and one single
block at width 3072, random weights and CLEAR tensors):

1. dynamic VRAM (ComfyUI 0.33's default on GPUs): ModelPatcherDynamic keeps the
   weights as loaded and re-applies every patched key through LowVramPatch on
   each forward in which the layer is not resident: stage the patch tensors
   (``prepare``) and apply them to the weight in the compute dtype. Timed per
   key, summed per block and for the 19 + 38 blocks of FLUX.1, with the bytes
   staged per forward.
2. fp8 full load (``--fp8``; ComfyUI 0.33 comfy_quant layers): patching a key
   de-quantises the whole fused tensor and re-quantises it with a new
   per-tensor scale; what that does to linear1's MLP rows, which CLEAR leaves
   alone (any LoRA on linear1 does the same).

    COMFYUI_PATH=/path/to/ComfyUI python bench/patch_cost.py [--fp8] [--out FILE]
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from common import environment, write_results  # noqa: E402
from flux_step import build_model, comfy_import  # noqa: E402

WIDTH, DOUBLE, SINGLE = 3072, 19, 38


def clear_file(path, hidden=WIDTH, seed=1, scale=1.0):
    from flux_tiny import write_clear_file

    sd = write_clear_file(path, seed=seed, hidden=hidden, depth=1, depth_single=1)
    if scale != 1.0:
        from safetensors.torch import save_file

        sd = {k: (v.float() * scale).to(v.dtype) for k, v in sd.items()}
        save_file(sd, str(path))
    return sd


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[len(times) // 2]


def dynamic_cost(repeats):
    import comfy.model_patcher

    from comfyui_clear.nodes.clear_patch import patch_model

    model = build_model(dict(hidden=WIDTH, heads=24, depth=1, depth_single=1), "cpu", torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        clear_file(os.path.join(tmp, "clear_local_16.safetensors"))
        patched = patch_model(model, os.path.join(tmp, "clear_local_16.safetensors"))
    rows = []
    for key in sorted(patched.patches):
        weight = comfy.model_patcher.get_key_weight(patched.model, key)[0]
        patch = comfy.model_patcher.LowVramPatch(key, patched.patches)
        staged = patch.memory_required() if hasattr(patch, "memory_required") else sum(
            p[1][1][0].numel() * p[1][1][0].element_size() for p in patched.patches[key])
        prepare_ms = None
        if hasattr(patch, "prepare"):
            buffer = torch.empty(staged, dtype=torch.uint8)
            prepare_ms = median_ms(lambda: patch.prepare(buffer, None, copy=True, commit=True), repeats)
        copies = [weight.to(torch.bfloat16, copy=True) for _ in range(repeats)]
        apply_ms = median_ms(lambda: patch(copies.pop()), repeats)
        x = torch.randn(1024, weight.shape[-1], dtype=torch.bfloat16) if weight.dim() == 2 else None
        matmul_ms = median_ms(lambda: x @ weight.T, repeats) if x is not None else None
        rows.append({"key": key, "shape": list(weight.shape), "staged_bytes": staged, "prepare_ms": prepare_ms,
                     "apply_ms": apply_ms, "matmul_1024_tokens_ms": matmul_ms})
        print(f"{key}: {tuple(weight.shape)}, stage {staged / 2**20:.1f} MiB"
              f"{'' if prepare_ms is None else f' in {prepare_ms:.2f} ms'}, apply {apply_ms:.2f} ms"
              f"{'' if matmul_ms is None else f'; the layer on 1024 tokens: {matmul_ms:.1f} ms'}", flush=True)
    per = {kind: {f: sum(r[f] or 0 for r in rows if f".{kind}_blocks." in r["key"])
                  for f in ("staged_bytes", "prepare_ms", "apply_ms", "matmul_1024_tokens_ms")}
           for kind in ("double", "single")}
    total = {f: DOUBLE * per["double"][f] + SINGLE * per["single"][f] for f in per["double"]}
    print(f"FLUX.1 ({DOUBLE} double + {SINGLE} single blocks), every layer re-patched: stage "
          f"{total['staged_bytes'] / 2**30:.2f} GiB, prepare {total['prepare_ms']:.0f} ms + apply "
          f"{total['apply_ms']:.0f} ms per forward on this CPU (the patched layers' matmuls on 1024 tokens: "
          f"{total['matmul_1024_tokens_ms']:.0f} ms)", flush=True)
    return {"keys": rows, "per_block": per, "flux1_per_forward": total}


def fp8_requant(case_scales):
    import comfy.model_patcher

    from comfyui_clear.nodes.weights import apply_clear_weights, load_clear_weights
    from flux_tiny import load_scaled_fp8_flux

    model = load_scaled_fp8_flux(scale=None)
    key = "diffusion_model.single_blocks.0.linear1.weight"

    def dequantized(patcher):
        weight, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
        w = weight.to(torch.float32, copy=True)
        return (convert(w, inplace=True) if convert is not None else w).float()

    g = torch.randn(2 ** 22, generator=torch.Generator().manual_seed(0))  # for scale: one fp8 rounding
    g_scale = float(g.abs().max()) / 448
    one_rounding = float((((g / g_scale).to(torch.float8_e4m3fn).float() * g_scale) - g).norm() / g.norm())
    print(f"one fp8 e4m3 rounding of Gaussian weights (scale max/448): relative RMS error {one_rounding:.2e}")
    base = dequantized(model)
    mlp = base[3 * WIDTH:]
    results = []
    for scale in case_scales:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "clear_local_16.safetensors")
            clear_file(path, scale=scale)
            clone = model.clone()
            apply_clear_weights(clone, load_clear_weights(path, clone))
            with torch.inference_mode():
                clone.patch_model(device_to=torch.device("cpu"))
                after = dequantized(clone)
                clone.unpatch_model(device_to=torch.device("cpu"))
        changed = after[3 * WIDTH:] != mlp
        rel = (after[3 * WIDTH:] - mlp).norm() / mlp.norm()
        row = {"clear_scale": scale, "max_abs_attention_rows": float(after[:3 * WIDTH].abs().max()),
               "max_abs_mlp_rows": float(mlp.abs().max()), "mlp_values_changed": float(changed.float().mean()),
               "mlp_relative_rms_change": float(rel)}
        results.append(row)
        print(f"CLEAR tensors x{scale}: attention rows max |w| {row['max_abs_attention_rows']:.4f}, MLP rows "
              f"{row['max_abs_mlp_rows']:.4f}; MLP values changed {100 * row['mlp_values_changed']:.1f}%, "
              f"relative RMS change {row['mlp_relative_rms_change']:.2e}", flush=True)
    return {"one_fp8_rounding_relative_rms": one_rounding, "cases": results}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fp8", action="store_true", help="also measure the fp8 re-quantisation of linear1")
    p.add_argument("--out")
    args = p.parse_args(argv)
    comfy_import(args.comfyui)
    torch.set_grad_enabled(False)
    payload = {"environment": environment(), "args": vars(args), "dynamic_vram": dynamic_cost(args.repeats)}
    if args.fp8:
        # CLEAR tensors x0.5: their max stays below the MLP rows' (the per-tensor scale stays);
        # x2: above it (the scale grows, every value is re-rounded)
        payload["fp8_requant"] = fp8_requant([0.5, 2.0])
    print("wrote", os.path.relpath(write_results("patch_cost", payload, args.out)))


if __name__ == "__main__":
    main()
