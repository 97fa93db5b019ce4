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

``--impl`` picks the model code: ``comfyui`` (above), ``standalone`` (plain
torch modules at FLUX.1-dev's shapes: a double and a single block as FLUX
computes them, modulation, QK RMSNorm, RoPE, GELU MLPs; CLEAR called as
the node calls it, proportional-attention scale included; no ComfyUI, no
token chunking: for machines where ComfyUI's packages cannot be installed,
each row labelled ``"impl": "standalone"``), ``auto`` (ComfyUI where it
imports, else standalone, with the reason) or ``both``.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SMOKE_NOTE, environment, time_long_ms, write_results  # noqa: E402

FULL = dict(hidden=3072, heads=24, depth=19, depth_single=38)
TINY = dict(hidden=256, heads=2, depth=2, depth_single=2)


STANDALONE = "standalone"


class ComfyUnavailable(RuntimeError):
    """ComfyUI's model code cannot be imported here; the message says why."""


def comfy_import(path):
    """Import the ComfyUI modules the step uses (and the node's, which import
    them); ComfyUnavailable if there is no checkout or a package it needs is
    missing (a lent GPU machine has no ComfyUI requirements installed)."""
    if not path or not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        raise ComfyUnavailable(f"no ComfyUI checkout at {path!r}: pass --comfyui PATH or set COMFYUI_PATH")
    sys.path.insert(0, path)
    try:
        import comfy.options
        comfy.options.enable_args_parsing(False)
        import comfy.cli_args
        comfy.cli_args.args.cpu = not torch.cuda.is_available()
        import utils.install_util  # noqa: F401  (ComfyUI's utils package before comfy/utils.py)
        import comfy.ldm.modules.attention  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.patcher_extension  # noqa: F401
        import comfy.supported_models  # noqa: F401
    except ImportError as exc:
        raise ComfyUnavailable(f"ComfyUI at {path} does not import here: {type(exc).__name__}: {exc}") from exc


def rope_axes(head_dim):
    side = 3 * head_dim // 8  # FLUX splits RoPE 16/56/56 of 128; scaled the same way for --tiny
    return [16, 56, 56] if head_dim == 128 else [head_dim - 2 * side, side, side]


def build_model(dims, device, dtype):
    import comfy.model_patcher
    import comfy.supported_models

    from comfyui_clear.nodes.compat import flux_params_extra

    axes = rope_axes(dims["hidden"] // dims["heads"])
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


# ---------------------------------------------------------------------------
# standalone: FLUX.1-dev's blocks in plain torch (no ComfyUI), for machines
# where ComfyUI's packages cannot be installed. Same shapes and operations
# per block as ComfyUI's Flux code; not its code: labelled in every row.

class DoubleBlock(torch.nn.Module):
    """Image and text streams, each modulated (shift, scale, gate x 2),
    attended jointly (text first), with their own projections and MLPs."""

    def __init__(self, hidden, heads, lin, norm):
        super().__init__()
        self.heads, mlp = heads, 4 * hidden
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", lin(hidden, 6 * hidden))
            setattr(self, f"{s}_qkv", lin(hidden, 3 * hidden))
            setattr(self, f"{s}_qnorm", norm(hidden // heads))
            setattr(self, f"{s}_knorm", norm(hidden // heads))
            setattr(self, f"{s}_proj", lin(hidden, hidden))
            setattr(self, f"{s}_mlp", torch.nn.Sequential(lin(hidden, mlp), torch.nn.GELU(approximate="tanh"),
                                                          lin(mlp, hidden)))

    def forward(self, img, txt, vec, pe, attn):
        mods, qkvs = {}, []
        for s, x in (("txt", txt), ("img", img)):
            mods[s] = m = getattr(self, f"{s}_mod")(torch.nn.functional.silu(vec))[:, None].chunk(6, -1)
            q, k, v = _heads(getattr(self, f"{s}_qkv")(_modulate(x, m[0], m[1])), self.heads)
            qkvs.append((getattr(self, f"{s}_qnorm")(q), getattr(self, f"{s}_knorm")(k), v))
        q, k, v = (torch.cat(t, 2) for t in zip(*qkvs))
        out = _merge(attn(_rope(q, pe), _rope(k, pe), v))
        T = txt.shape[1]
        res = []
        for s, x, a in (("txt", txt, out[:, :T]), ("img", img, out[:, T:])):
            m = mods[s]
            x = x + m[2] * getattr(self, f"{s}_proj")(a)
            res.append(x + m[5] * getattr(self, f"{s}_mlp")(_modulate(x, m[3], m[4])))
        return res[1], res[0]


class SingleBlock(torch.nn.Module):
    """One stream: a fused qkv + MLP-in linear, attention, a fused out linear."""

    def __init__(self, hidden, heads, lin, norm):
        super().__init__()
        self.heads, self.hidden, mlp = heads, hidden, 4 * hidden
        self.mod = lin(hidden, 3 * hidden)
        self.linear1 = lin(hidden, 3 * hidden + mlp)
        self.linear2 = lin(hidden + mlp, hidden)
        self.qnorm, self.knorm = norm(hidden // heads), norm(hidden // heads)

    def forward(self, x, vec, pe, attn):
        shift, scale, gate = self.mod(torch.nn.functional.silu(vec))[:, None].chunk(3, -1)
        qkv, mlp = self.linear1(_modulate(x, shift, scale)).split([3 * self.hidden, 4 * self.hidden], -1)
        q, k, v = _heads(qkv, self.heads)
        a = _merge(attn(_rope(self.qnorm(q), pe), _rope(self.knorm(k), pe), v))
        return x + gate * self.linear2(torch.cat([a, torch.nn.functional.gelu(mlp, approximate="tanh")], -1))


class StandaloneFlux(torch.nn.Module):
    def __init__(self, dims, device, dtype):
        super().__init__()
        lin = lambda i, o: torch.nn.Linear(i, o, device=device, dtype=dtype)  # noqa: E731
        norm = lambda d: torch.nn.RMSNorm(d, eps=1e-6, device=device, dtype=dtype)  # noqa: E731
        hidden, heads = dims["hidden"], dims["heads"]
        self.img_in, self.txt_in, self.vec_in = lin(64, hidden), lin(4096, hidden), lin(768, hidden)
        blocks = lambda kind, n: torch.nn.ModuleList(kind(hidden, heads, lin, norm) for _ in range(n))  # noqa: E731
        self.double_blocks = blocks(DoubleBlock, dims["depth"])
        self.single_blocks = blocks(SingleBlock, dims["depth_single"])
        self.final = lin(hidden, 64)

    def forward(self, img, txt, y, pe, attn):
        img, txt, vec = self.img_in(img), self.txt_in(txt), self.vec_in(y)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe, attn)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, vec, pe, attn)
        return self.final(x[:, txt.shape[1]:])


def _modulate(x, shift, scale):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


def _heads(qkv, heads):
    B, L, _ = qkv.shape
    return qkv.view(B, L, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D)


def _merge(out):
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


def _rope(x, pe):
    cos, sin = pe
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).to(x.dtype)


def rope_tables(text_len, grid, head_dim, device, axes=None):
    """cos, sin (L, head_dim / 2) of FLUX's 3-axis RoPE: ids (0, 0, 0) for text,
    (0, y, x) for image tokens; ``axes`` default rope_axes(head_dim)."""
    h, w = grid
    ids = torch.zeros(text_len + h * w, 3, device=device)
    ids[text_len:, 1] = torch.arange(h, device=device).repeat_interleave(w)
    ids[text_len:, 2] = torch.arange(w, device=device).repeat(h)
    angles = torch.cat([ids[:, i, None] * 10000.0 ** (-torch.arange(0, a, 2, device=device) / a)
                        for i, a in enumerate(axes or rope_axes(head_dim))], -1)
    return angles.cos(), angles.sin()


def time_standalone(args, model_dims, size, device, dtype, calls):
    """{dense, clear: ms; dense_peak, clear_peak: GiB; weights_gib, finite} of
    one forward of a standalone model with these dims: dense through SDPA
    (its own backend choice, as ComfyUI's default attention), CLEAR through
    clear_attention as the node calls it (proportional-attention scale)."""
    import comfyui_clear.kernels as kernels
    from comfyui_clear.nodes.clear_patch import attention_scale

    cuda = torch.device(device).type == "cuda"
    T, grid = args.text, (size // 16, size // 16)
    D = model_dims["hidden"] // model_dims["heads"]
    torch.manual_seed(0)
    model = StandaloneFlux(model_dims, device, dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    img = torch.randn(1, grid[0] * grid[1], 64, device=device, dtype=dtype, generator=gen)
    txt = torch.randn(1, T, 4096, device=device, dtype=dtype, generator=gen)
    y = torch.randn(1, 768, device=device, dtype=dtype, generator=gen)
    pe = rope_tables(T, grid, D, device)
    scale = attention_scale(D, T, grid, args.down, True)
    attns = {"dense": torch.nn.functional.scaled_dot_product_attention,
             "clear": lambda q, k, v: kernels.clear_attention(q, k, v, text_len=T, grid=grid, window=args.window,
                                                              down_factor=args.down, scale=scale)}
    result, outputs = {}, {}
    for name, attn in attns.items():
        run = lambda: model(img, txt, y, pe, attn)  # noqa: E731
        with torch.no_grad():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            before = calls[0]
            outputs[name] = run()  # warm-up, not timed
            expected = model_dims["depth"] + model_dims["depth_single"] if name == "clear" else 0
            if calls[0] - before != expected:
                sys.exit(f"standalone {name}: CLEAR ran in {calls[0] - before} blocks, expected {expected}")
            result[name] = time_long_ms(run, args.repeats)
            result[name + "_peak"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if model_dims["depth"] + model_dims["depth_single"] and torch.equal(outputs["dense"], outputs["clear"]):
        sys.exit("standalone: CLEAR gave the dense output: CLEAR did not change attention")
    result["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    result["finite"] = all(bool(torch.isfinite(o).all()) for o in outputs.values())
    return result


def fmt_gib(value):
    return "-" if value is None else f"{value:.2f}"


def compose(row, dims, names, rest, double, single, cuda):
    """The step as rest + depth x double + depth_single x single block, each
    timed on its own model; peak memory as the full model's weights + the
    larger one-block activation peak."""
    r = {"finite": rest["finite"] and double["finite"] and single["finite"]}
    weights = rest["weights_gib"] + dims["depth"] * (double["weights_gib"] - rest["weights_gib"]) \
        + dims["depth_single"] * (single["weights_gib"] - rest["weights_gib"])
    for name in names:
        row[f"{name}_rest_ms"] = rest[name]
        row[f"{name}_double_block_ms"] = double[name] - rest[name]
        row[f"{name}_single_block_ms"] = single[name] - rest[name]
        r[name] = rest[name] + dims["depth"] * row[f"{name}_double_block_ms"] \
            + dims["depth_single"] * row[f"{name}_single_block_ms"]
        r[name + "_peak"] = weights + max(double[name + "_peak"] - double["weights_gib"],
                                          single[name + "_peak"] - single["weights_gib"]) if cuda else None
    row["note"] = (f"composed: rest + {dims['depth']} x double + {dims['depth_single']} x single block, "
                   "each timed on its own model; peak memory estimated as the full model's weights "
                   "+ the larger one-block activation peak")
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    p.add_argument("--impl", choices=["auto", "comfyui", STANDALONE, "both"], default="auto",
                   help="model code: ComfyUI's Flux, standalone plain-torch blocks, auto (ComfyUI where it imports, "
                   "else standalone) or both")
    p.add_argument("--sizes", type=int, nargs="+", help="image sides in px (default 4096 8192; --tiny: 128 192)")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--down", type=int, default=1)
    p.add_argument("--text", type=int, default=512)
    p.add_argument("--blocks", choices=["full", "one"], default="full",
                   help="standalone always composes from one block of each kind")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-tokens", type=int, help="also time dense and CLEAR with FLUX Token Chunking, "
                   "chunks of this many tokens (ComfyUI only)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model and image")
    p.add_argument("--out")
    args = p.parse_args(argv)
    comfy_unavailable = None
    if args.impl != STANDALONE:
        try:
            comfy_import(args.comfyui)
        except ComfyUnavailable as exc:
            if args.impl != "auto":
                sys.exit(str(exc))
            comfy_unavailable = str(exc)
            print(f"NOTE: {exc}\nNOTE: running the standalone FLUX-shaped blocks (plain torch) instead", flush=True)
    impls = {"auto": [STANDALONE] if comfy_unavailable else ["comfyui"], "comfyui": ["comfyui"],
             STANDALONE: [STANDALONE], "both": ["comfyui", STANDALONE]}[args.impl]

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
    node = None

    def time_model(model_dims, x, t, context, y, guidance):
        """{dense, clear: ms; dense_peak, clear_peak: GiB} of one forward of a
        fresh ComfyUI model with these dims, the CLEAR one proven to have run CLEAR."""
        from comfyui_clear.nodes.clear_patch import CLEARAttentionPatch
        from comfyui_clear.nodes.token_chunking import patch_model as chunked
        from comfyui_clear.nodes.weights import TRAINING_FREE

        nonlocal node
        node = node or CLEARAttentionPatch()
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
        smoke = args.tiny or not cuda
        payload = {"environment": environment(), "cpu_smoke_run": smoke, "notes": [SMOKE_NOTE] if smoke else [],
                   "impls": impls, "comfyui_unavailable": comfy_unavailable, "args": vars(args), "rows": rows}
        if "comfyui" in impls:
            import comfy.ldm.modules.attention
            payload["comfy_attention"] = comfy.ldm.modules.attention.optimized_attention.__name__
        if STANDALONE in impls:
            payload["notes"].append("standalone rows: FLUX.1-dev-shaped blocks in plain torch (bench/flux_step.py), "
                                    "not ComfyUI's model code; dense = SDPA's own backend choice; no token chunking")
        return payload, write_results("flux_step", payload, args.out)

    rows = []
    for impl in impls:
        chunking = args.chunk_tokens if impl == "comfyui" else None
        names = ["dense", "clear"] + (["dense_chunked", "clear_chunked"] if chunking else [])
        blocks = args.blocks if impl == "comfyui" else "one"
        for size in args.sizes:
            row = {"impl": impl, "image_px": size, "grid": size // 16, "window": args.window, "down_factor": args.down,
                   "text_len": args.text, "blocks": blocks, "dims": dims}
            if impl == STANDALONE:
                parts = [time_standalone(args, {**dims, "depth": a, "depth_single": b}, size, device, dtype, calls)
                         for a, b in ((0, 0), (1, 0), (0, 1))]
                r = compose(row, dims, names, *parts, cuda)
            elif blocks == "full":
                parts = [r := time_model(dims, *step_inputs(size, args.text, device, dtype))]
            else:  # step = rest + 19 double + 38 single, each timed on its own model
                inputs = step_inputs(size, args.text, device, dtype)
                parts = [time_model({**dims, "depth": a, "depth_single": b}, *inputs)
                         for a, b in ((0, 0), (1, 0), (0, 1))]
                r = compose(row, dims, names, *parts, cuda)
            if "note" in row:
                print("NOTE:", row["note"], flush=True)
            for name in names:
                row[f"{name}_ms"], row[f"{name}_peak_gib"] = r[name], r[name + "_peak"]
            if not r["finite"]:  # random weights: timing is unaffected, but say so
                row["warning"] = "non-finite values in the output (random weights)"
            row["speedup"] = row["dense_ms"] / row["clear_ms"]
            if chunking:
                row["chunk_tokens"] = chunking
                row["speedup_chunked"] = row["dense_chunked_ms"] / row["clear_chunked_ms"]  # both chunked
                row["speedup_chunked_vs_dense"] = row["dense_ms"] / row["clear_chunked_ms"]
                for name in ("dense", "clear"):
                    row[f"{name}_chunked_rel_err"] = max(part[f"{name}_chunked_rel_err"] for part in parts)
            rows.append(row)
            save(rows)  # after every size: a run stopped by a time limit keeps what it measured
            print(f"[{impl}] {size}px ({size // 16}^2 tokens), r={args.window}, d={args.down}: dense "
                  f"{row['dense_ms']:.1f} ms, CLEAR {row['clear_ms']:.1f} ms, speed-up {row['speedup']:.2f}x, peak GiB "
                  f"dense {fmt_gib(row['dense_peak_gib'])} / CLEAR {fmt_gib(row['clear_peak_gib'])}", flush=True)
            if chunking:
                print(f"  chunked ({chunking} tokens): dense {row['dense_chunked_ms']:.1f} ms, CLEAR "
                      f"{row['clear_chunked_ms']:.1f} ms, speed-up {row['speedup_chunked']:.2f}x, peak GiB dense "
                      f"{fmt_gib(row['dense_chunked_peak_gib'])} / CLEAR {fmt_gib(row['clear_chunked_peak_gib'])}",
                      flush=True)
    payload, path = save(rows)
    print("wrote", os.path.relpath(path))
    return payload


if __name__ == "__main__":
    main()
