"""CLEAR distillation steps on a full-size model with random weights, built
through ComfyUI's own classes (no weights can be downloaded where this runs):
peak GPU memory and seconds per step through the trainer (nodes/distill.py,
``distill()``), against the memory model (nodes/distill_memory.py).

    COMFYUI_PATH=/path/to/ComfyUI python bench/distill_step.py --out distill.json
    python bench/distill_step.py --runs flux1-dev --steps 20 --size 1024
    python bench/distill_step.py --tiny --steps 2          # CPU: tiny shapes (the GPU check's dry mode)

Runs (``RUNS``): FLUX.1-dev, LoRA r64 on an fp8 base, Prodigy; FLUX.2 Klein 4B,
full weights on an fp8 base, 8-bit AdamW where bitsandbytes imports, else
Prodigy (what the memory model then says is printed beside it). Each run: a
teacher dataset of random latents and text conditioning at --size (written
with nodes/distill_data.py's writer), then --steps steps through
``distill()``; seconds per step are the median after the first (which
includes CUDA/Flex warm-up), peak memory is torch's max allocated (and
reserved) over the run. The run stops after its last step (no state or output
file: they are not what is measured), or earlier when --budget-s runs out
(steps done reported).
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

RUNS = {  # name -> (shape, DistillSettings fields, base weight dtype)
    "flux1-dev": ("flux1-dev", dict(mode="lora", rank=64, optimizer="prodigy"), "fp8"),
    "flux2-klein-4b": ("flux2-klein-4b", dict(mode="full", optimizer="adamw8bit"), "fp8"),
}


class _Stop(Exception):
    """Raised from the progress callback after the last measured step."""


class StepClock:
    """ComfyUI ProgressBar stand-in for distill(): times each step, stops
    after ``steps`` or when ``deadline`` has passed."""

    def __init__(self, steps, deadline, cuda):
        self.steps, self.deadline, self.cuda = steps, deadline, cuda
        self.times, self.last = [], time.perf_counter()

    def update_absolute(self, step, total=None, preview=None):
        if self.cuda:
            import torch
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        if step >= self.steps or (self.deadline is not None and time.time() > self.deadline):
            raise _Stop()


def _comfyui(path, cpu):
    sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    if cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import utils.install_util  # noqa: F401  (ComfyUI's utils package before comfy/utils.py)


def build_model(shape, device, weight_dtype, compute_dtype, seed=0):
    """A ComfyUI ModelPatcher of ``shape`` (a distill_memory.ModelShape) with
    random weights (std 1/sqrt(fan_in); norm scales near 1), built on
    ``device`` in ``weight_dtype`` (fp8: ComfyUI's manual-cast layers compute in
    ``compute_dtype``), one parameter at a time (no full-size temporaries)."""
    import torch

    import comfy.model_patcher
    import comfy.supported_models

    config = shape.unet_config()
    cls = comfy.supported_models.Flux2 if shape.global_modulation else comfy.supported_models.Flux
    model_config = cls(config)
    model_config.set_inference_dtype(weight_dtype, compute_dtype if weight_dtype != compute_dtype else None)
    model = model_config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=compute_dtype)
            if p.dim() > 1:
                noise /= math.sqrt(p.shape[1])
            elif name.endswith((".scale", "norm.weight")):
                noise = 1.0 + 0.1 * noise
            else:
                noise *= 0.1
            p.copy_(noise.to(p.dtype))
            del noise
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def write_dataset(folder, patcher, width, height, count=4, text_tokens=512, seed=0):
    """A teacher dataset of ``count`` random samples for ``patcher``'s model."""
    import torch

    from comfyui_clear.nodes import distill, distill_data
    from comfyui_clear.nodes.clear_patch import flux_family

    flux = patcher.model.diffusion_model
    fmt = patcher.model.latent_format
    c, ratio = fmt.latent_channels, getattr(fmt, "spacial_downscale_ratio", 8)  # 0.3.64: FLUX.1 only, 8
    latent_shape = [c, height // ratio, width // ratio]
    guidance = 3.5 if flux.params.guidance_embed else None
    distill_data.write_index(folder, {
        "family": flux_family(flux), "fingerprint": distill._fingerprint(flux), "width": width, "height": height,
        "latent_shape": latent_shape, "steps": 1, "guidance": guidance, "count": count})
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        pooled = torch.randn(1, flux.params.vec_in_dim, generator=gen) if flux.params.vec_in_dim else None
        distill_data.write_sample(folder, i, torch.randn(1, *latent_shape, generator=gen),
                                  torch.randn(1, text_tokens, flux.params.context_in_dim, generator=gen), pooled,
                                  {"prompt": f"random {i}", "seed": str(seed + i),
                                   "guidance": "" if guidance is None else str(guidance), "width": str(width),
                                   "height": str(height), "steps": "1", "family": flux_family(flux)})
    return folder


def run_one(name, shape, settings_kw, base, size, steps, deadline, cuda, text_tokens, tmp):
    import torch

    from comfyui_clear.nodes import distill, distill_memory

    settings_kw = dict(settings_kw)
    if settings_kw.get("optimizer") == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            settings_kw["optimizer"] = "prodigy"
    device = torch.device("cuda" if cuda else "cpu")
    compute = torch.bfloat16 if cuda else torch.float32
    weight_dtype = torch.float8_e4m3fn if (base == "fp8" and cuda) else compute
    row = {"run": name, "shape": dataclass_dict(shape), "size": size, "base": base if cuda else "float32 (CPU)",
           **settings_kw}
    import comfy.supported_models
    if shape.global_modulation and not hasattr(comfy.supported_models, "Flux2"):
        row["status"] = "n/a: this ComfyUI builds no FLUX.2 (0.33 or newer does)"
        row["steps_done"] = 0
        return row
    t0 = time.perf_counter()
    patcher = build_model(shape, device, weight_dtype, compute)
    row["build_s"] = round(time.perf_counter() - t0, 1)
    folder = write_dataset(os.path.join(tmp, name), patcher, size, size, text_tokens=text_tokens)
    est = distill_memory.estimate(shape, mode=settings_kw["mode"], rank=settings_kw.get("rank", 64),
                                  base_bytes_per_param=torch.empty((), dtype=weight_dtype).element_size(),
                                  optimizer=settings_kw["optimizer"], width=size, height=size,
                                  text_tokens=text_tokens, compute_itemsize=torch.empty((), dtype=compute).element_size())
    row["modelled_total_bytes"] = est.total
    row["modelled_parts"] = est.parts
    settings = distill.DistillSettings(steps=steps, checkpoint_every=0, preview_every=0, batch_size=1,
                                       learning_rate=1.0 if settings_kw["optimizer"] == "prodigy" else 1e-4,
                                       **settings_kw)
    clock = StepClock(steps, deadline, cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock.last = time.perf_counter()
    try:
        distill.distill(patcher, folder, settings, os.path.join(tmp, f"{name}_out"), resume=False, progress=clock)
        row["status"] = "ran to the end (no stop raised)"
    except _Stop:
        row["status"] = "ok"
    except Exception as e:  # reported, the next run still goes
        row["status"] = f"FAILED: {type(e).__name__}: {str(e)[:300]}"
    row["steps_done"] = len(clock.times)
    row["step_s"] = [round(t, 3) for t in clock.times]
    if len(clock.times) > 1:
        row["seconds_per_step"] = round(statistics.median(clock.times[1:]), 3)
    if cuda:
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        # the model counts a CUDA context the allocator does not see
        row["modelled_allocated_bytes"] = est.total - est.parts["cuda context"]
        row["model_over_measured"] = round(row["modelled_allocated_bytes"] / row["peak_allocated_bytes"], 3)
        row["device"] = torch.cuda.get_device_name()
    del patcher
    if cuda:
        import comfy.model_management
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    return row


def dataclass_dict(shape):
    import dataclasses
    return dataclasses.asdict(shape)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default $COMFYUI_PATH)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=1024, help="training resolution (px, square)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--tiny", action="store_true", help="CPU: tiny shapes of each run's family (tests, dry runs)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting steps after this many seconds")
    p.add_argument("--out", help="JSON file for the results")
    a = p.parse_args(argv)
    if not a.comfyui:
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout")
    started = time.time()
    deadline = None if a.budget_s is None else started + a.budget_s
    import torch

    cuda = torch.cuda.is_available() and not a.tiny
    _comfyui(a.comfyui, cpu=not cuda)
    from comfyui_clear.nodes import distill_memory

    rows = []
    result = {"command": sys.argv, "tiny": a.tiny, "steps": a.steps, "size": a.size, "rows": rows,
              "notes": ["measured, random weights; seconds per step = median after the first step"]}

    def save():
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1, default=str)

    with tempfile.TemporaryDirectory(prefix="clear_distill_") as tmp:
        for name in a.runs:
            shape_name, settings_kw, base = RUNS[name]
            shape = distill_memory.SHAPES[shape_name]
            if a.tiny:
                import dataclasses
                shape = dataclasses.replace(shape, hidden=64, heads=2, double=2, single=5,
                                            context_dim=32, vec_dim=16 if shape.vec_dim else None)
                if name == "flux1-dev":
                    settings_kw = {**settings_kw, "rank": 4}
            if deadline is not None and time.time() > deadline - 5:
                rows.append({"run": name, "status": "skipped: the budget is spent"})
                print(f"[distill] {name}: skipped, the budget is spent", flush=True)
                continue
            row = run_one(name, shape, settings_kw, base, a.size, a.steps, deadline, cuda, a.text_tokens, tmp)
            rows.append(row)
            if row["status"].startswith("n/a"):
                print(f"[distill] {name}: {row['status']}", flush=True)
                save()
                continue
            peak = row.get("peak_allocated_bytes")
            print(f"[distill] {name} ({row['mode']}, {row['optimizer']}, {row['base']} base, {a.size}px): "
                  f"{row['status']}, {row['steps_done']} steps, "
                  f"{row.get('seconds_per_step', float('nan')):.3f} s/step"
                  + (f", peak {peak / 1e9:.2f} GB allocated ({row['peak_reserved_bytes'] / 1e9:.2f} reserved), "
                     f"modelled {row['modelled_allocated_bytes'] / 1e9:.2f} GB + {1e-9 * distill_memory.CUDA_CONTEXT:.1f}"
                     " context" if peak else ""), flush=True)
            save()
    save()
    return 0 if all(r["status"] == "ok" or r["status"].startswith(("skipped", "n/a")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
