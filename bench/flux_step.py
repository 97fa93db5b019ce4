"""Benchmark: one FLUX.1-dev-sized denoising step through ComfyUI's own Flux
model code, unpatched (dense attention) vs patched with the CLEAR Attention
Patch node, at 4K and 8K.

    COMFYUI_PATH=/path/to/ComfyUI python bench/flux_step.py                 # full model, 4K and 8K
    COMFYUI_PATH=/path/to/ComfyUI python bench/flux_step.py --blocks one    # one double + one single block, composed
    COMFYUI_PATH=/path/to/ComfyUI python bench/flux_step.py --chunk-tokens 8192   # + FLUX Token Chunking
    COMFYUI_PATH=/path/to/ComfyUI python bench/flux_step.py --tiny          # CPU smoke run (not a benchmark)

Weights are random (timing only), bf16; CLEAR runs training-free with
window r (the distilled weights change no shape or FLOP). ``--blocks one``
times the rest (embedders, final layer), one double and one single block at
the real shapes, each on its own model, and composes rest + 19 x double +
38 x single, for devices whose command time limit a full 8K step exceeds.
The patched model is checked to run CLEAR in every block and to differ from
the dense one. ``--chunk-tokens N`` also times both models behind the FLUX
Token Chunking node (chunks of N tokens; CLEAR first, then chunking).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SMOKE_NOTE, environment, time_long_ms, write_results  # noqa: E402

FULL = dict(hidden=3072, heads=24, depth=19, depth_single=38)
TINY = dict(hidden=256, heads=2, depth=2, depth_single=2)


def comfy_import(path):
    if not path or not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        sys.exit("ComfyUI not found: pass --comfyui PATH or set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import utils.install_util  # noqa: F401  (ComfyUI's utils package before comfy/utils.py)


def build_model(dims, device, dtype):
    import comfy.model_patcher
    import comfy.supported_models

    from comfyui_clear.nodes.compat import flux_params_extra

    head_dim = dims["hidden"] // dims["heads"]
    side = 3 * head_dim // 8  # FLUX splits RoPE 16/56/56 of 128; scaled the same way for --tiny
    axes = [16, 56, 56] if head_dim == 128 else [head_dim - 2 * side, side, side]
    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": dims["hidden"], "mlp_ratio": 4.0, "num_heads": dims["heads"],
              "depth": dims["depth"], "depth_single_blocks": dims["depth_single"], "axes_dim": axes,
              "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True, **flux_params_extra()}
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.fill_(1.0 if name.endswith(".scale") else 0.0)
    model.to(device=device, dtype=dtype).eval()
    device = torch.device(device)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def options_of(patcher):
    """transformer_options as ComfyUI's sampler hands them to the model
    (the patcher's wrappers merged in)."""
    import comfy.patcher_extension

    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = {}
    comfy.patcher_extension.merge_nested_dicts(options["wrappers"], patcher.wrappers, copy_dict1=False)
    return options


def count_clear_calls():
    """Wrap the op so the benchmark can prove CLEAR really ran."""
    import comfyui_clear.kernels as kernels

    calls = [0]
    op = kernels.clear_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return op(*args, **kwargs)

    kernels.clear_attention = counted
    return calls


def step_inputs(image_px, text_len, device, dtype, batch=1):
    latent = image_px // 8
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 16, latent, latent, device=device, dtype=dtype, generator=gen)
    context = torch.randn(batch, text_len, 4096, device=device, dtype=dtype, generator=gen)
    y = torch.randn(batch, 768, device=device, dtype=dtype, generator=gen)
    t = torch.full((batch,), 0.5, device=device, dtype=dtype)
    guidance = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return x, t, context, y, guidance


def fmt_gib(value):
    return "-" if value is None else f"{value:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    p.add_argument("--sizes", type=int, nargs="+", help="image sides in px (default 4096 8192; --tiny: 128 192)")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--down", type=int, default=1)
    p.add_argument("--text", type=int, default=512)
    p.add_argument("--blocks", choices=["full", "one"], default="full")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-tokens", type=int, help="also time dense and CLEAR with FLUX Token Chunking, "
                   "chunks of this many tokens")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model and image")
    p.add_argument("--out")
    args = p.parse_args(argv)
    comfy_import(args.comfyui)
    from comfyui_clear.nodes.clear_patch import CLEARAttentionPatch
    from comfyui_clear.nodes.token_chunking import patch_model as chunked
    from comfyui_clear.nodes.weights import TRAINING_FREE

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    dims = FULL
    if args.tiny or not cuda:
        dims, args.text, args.window = TINY, 8, 4
        args.sizes = [s for s in args.sizes or [] if s <= 256] or [128, 192]
        print(f"*** {SMOKE_NOTE.upper()} ***\nCPU smoke run: tiny FLUX and images; times nothing meaningful",
              flush=True)
    args.sizes = args.sizes or [4096, 8192]
    calls = count_clear_calls()
    node = CLEARAttentionPatch()

    def time_model(model_dims, x, t, context, y, guidance):
        """{dense, clear: ms; dense_peak, clear_peak: GiB} of one forward of a
        fresh model with these dims, the CLEAR one proven to have run CLEAR."""
        model = build_model(model_dims, device, dtype)
        (patched,) = getattr(node, node.FUNCTION)(model, TRAINING_FREE, window_size=args.window,
                                                  down_factor=args.down, proportional_attention=True,
                                                  rope_ntk_factor=1.0)
        dm = model.model.diffusion_model
        result, outputs = {}, {}
        variants = [("dense", model), ("clear", patched)]
        if args.chunk_tokens:
            variants += [("dense_chunked", chunked(model, args.chunk_tokens)),
                         ("clear_chunked", chunked(patched, args.chunk_tokens))]
        for name, patcher in variants:
            options = options_of(patcher)
            run = lambda: dm(x, t, context, y, guidance, transformer_options=options)  # noqa: E731
            with torch.no_grad():
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                before = calls[0]
                outputs[name] = run()  # warm-up (Triton autotuning, cuBLAS heuristics), not timed
                ran_clear = calls[0] - before
                expected = model_dims["depth"] + model_dims["depth_single"] if name.startswith("clear") else 0
                if ran_clear != expected:
                    sys.exit(f"{name}: CLEAR attention ran in {ran_clear} blocks, expected {expected}: "
                             "the patch's wrappers/override are not (only) active where they should be")
                result[name] = time_long_ms(run, args.repeats)
                result[name + "_peak"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if model_dims["depth"] + model_dims["depth_single"] and torch.equal(outputs["dense"], outputs["clear"]):
            sys.exit("the CLEAR-patched model gave the dense model's output: CLEAR did not change attention")
        result["weights_gib"] = sum(p.numel() * p.element_size() for p in dm.parameters()) / 2**30
        result["finite"] = all(bool(torch.isfinite(o).all()) for o in outputs.values())
        if args.chunk_tokens:  # chunking changes no value beyond rounding
            for name in ("dense", "clear"):
                ref = outputs[name].double()
                result[f"{name}_chunked_rel_err"] = ((outputs[f"{name}_chunked"].double() - ref).norm()
                                                     / ref.norm()).item()
        return result

    def save(rows):
        import comfy.ldm.modules.attention
        smoke = args.tiny or not cuda
        payload = {"environment": environment(), "cpu_smoke_run": smoke, "notes": [SMOKE_NOTE] if smoke else [],
                   "comfy_attention": comfy.ldm.modules.attention.optimized_attention.__name__,
                   "args": vars(args), "rows": rows}
        return payload, write_results("flux_step", payload, args.out)

    names = ["dense", "clear"] + (["dense_chunked", "clear_chunked"] if args.chunk_tokens else [])
    rows = []
    for size in args.sizes:
        inputs = step_inputs(size, args.text, device, dtype)
        row = {"image_px": size, "grid": size // 16, "window": args.window, "down_factor": args.down,
               "text_len": args.text, "blocks": args.blocks, "dims": dims}
        if args.blocks == "full":
            r = time_model(dims, *inputs)
        else:  # step = rest + 19 double + 38 single, each timed on its own model
            rest = time_model({**dims, "depth": 0, "depth_single": 0}, *inputs)
            double = time_model({**dims, "depth": 1, "depth_single": 0}, *inputs)
            single = time_model({**dims, "depth": 0, "depth_single": 1}, *inputs)
            r = {"finite": rest["finite"] and double["finite"] and single["finite"]}
            weights = rest["weights_gib"] + dims["depth"] * (double["weights_gib"] - rest["weights_gib"]) \
                + dims["depth_single"] * (single["weights_gib"] - rest["weights_gib"])
            for name in names:
                row[f"{name}_rest_ms"] = rest[name]
                row[f"{name}_double_block_ms"] = double[name] - rest[name]
                row[f"{name}_single_block_ms"] = single[name] - rest[name]
                r[name] = rest[name] + dims["depth"] * row[f"{name}_double_block_ms"] \
                    + dims["depth_single"] * row[f"{name}_single_block_ms"]
                if cuda:  # activations of the worse block model + the full model's weights
                    r[name + "_peak"] = weights + max(double[name + "_peak"] - double["weights_gib"],
                                                      single[name + "_peak"] - single["weights_gib"])
                else:
                    r[name + "_peak"] = None
            row["note"] = (f"composed: rest + {dims['depth']} x double + {dims['depth_single']} x single block, "
                           "each timed on its own model; peak memory estimated as the full model's weights "
                           "+ the larger one-block activation peak")
            print("NOTE:", row["note"], flush=True)
        for name in names:
            row[f"{name}_ms"], row[f"{name}_peak_gib"] = r[name], r[name + "_peak"]
        if not r["finite"]:  # random weights: timing is unaffected, but say so
            row["warning"] = "non-finite values in the output (random weights)"
        row["speedup"] = row["dense_ms"] / row["clear_ms"]
        if args.chunk_tokens:
            row["chunk_tokens"] = args.chunk_tokens
            row["speedup_chunked"] = row["dense_chunked_ms"] / row["clear_chunked_ms"]  # both chunked
            row["speedup_chunked_vs_dense"] = row["dense_ms"] / row["clear_chunked_ms"]
            for name in ("dense", "clear"):
                for part in ((rest, double, single) if args.blocks == "one" else (r,)):
                    key = f"{name}_chunked_rel_err"
                    row[key] = max(row.get(key, 0.0), part[key])
        rows.append(row)
        save(rows)  # after every size: a run stopped by a time limit keeps what it measured
        print(f"{size}px ({size // 16}^2 tokens), r={args.window}, d={args.down}: dense {row['dense_ms']:.1f} ms, "
              f"CLEAR {row['clear_ms']:.1f} ms, speed-up {row['speedup']:.2f}x, peak GiB dense "
              f"{fmt_gib(row['dense_peak_gib'])} / CLEAR {fmt_gib(row['clear_peak_gib'])}", flush=True)
        if args.chunk_tokens:
            print(f"  chunked ({args.chunk_tokens} tokens): dense {row['dense_chunked_ms']:.1f} ms, CLEAR "
                  f"{row['clear_chunked_ms']:.1f} ms, speed-up {row['speedup_chunked']:.2f}x, peak GiB dense "
                  f"{fmt_gib(row['dense_chunked_peak_gib'])} / CLEAR {fmt_gib(row['clear_chunked_peak_gib'])}",
                  flush=True)
    payload, path = save(rows)
    print("wrote", os.path.relpath(path))
    return payload


if __name__ == "__main__":
    main()
