"""The "CLEAR Multi-GPU Split" node: one FLUX image over several GPUs, exactly.

With CLEAR, everything in a FLUX forward but attention acts on each token
alone, and CLEAR's image attention is local. So each device runs the whole
forward on a band of image-token rows plus all text tokens, and meets the
others only inside attention (``kernels.band.clear_attention_band``: halo
rows, pooled keys, the text queries' log-sum-exp merge). See docs/multigpu.md.

Engine: ComfyUI core's multi-GPU support (comfy/multigpu.py). The node asks
``comfy.multigpu.create_multigpu_deepclones`` for a model clone per extra
GPU (core loads the full weights, with every weight patch such as CLEAR's
and LoRAs, onto each). At sampling time:

- a CALC_COND_BATCH wrapper takes the per-device clones core prepared and
  keeps core from splitting cond/uncond over the devices (the band split
  uses every device for every model call instead, at any CFG);
- a DIFFUSION_MODEL wrapper patchifies the latent, cuts the token rows into
  bands, and runs the remaining wrappers and the forward of each device's
  clone on its band in a thread per device, then joins the bands.

On the CPU (tests, or ComfyUI started with --cpu) the bands run as threads on
the one CPU model: CPU devices standing in for GPUs.
"""

import functools
import logging
import threading

from .runtime import CATEGORY, band_state as _local, ui_error, warn_once as _warn_once

log = logging.getLogger(__name__)

WRAPPER_KEY = "comfyui_clear_band_split"
MODELS_KEY = "clear_band_models"  # transformer_options: [(device, Flux module)] of this call
CHUNKING_MODEL_KEY = "clear_chunking_model"  # token chunking reads its Flux module from here

CLEAR_KEY = "comfyui_clear"  # clear_patch.WRAPPER_KEY
NEEDS_CLEAR = ("CLEAR Multi-GPU Split needs the CLEAR Attention Patch on the model (before or after this node) on "
               "every FLUX block: without CLEAR's local attention a band cannot compute its rows exactly")


@ui_error
class BandSplitError(ValueError):
    """The split cannot run here; the message says what to change."""


class BandWorker:
    """What one band worker's attention calls need: its rank, all bands, the
    exchange, and the full image's layout (text tokens, token grid)."""

    def __init__(self, rank, bands, exchange, text_len, grid):
        self.rank, self.bands, self.exchange = rank, bands, exchange
        self.text_len, self.grid = text_len, grid
        y0, y1 = bands[rank]
        self.tokens = text_len + (y1 - y0) * grid[1]  # tokens this worker holds

    def attention(self, q, k, v, *, text_len, grid, window, down_factor=1, spatial_weight=None, scale):
        from ..kernels.band import clear_attention_band

        if (text_len, tuple(grid)) != (self.text_len, self.grid):
            raise BandSplitError(f"CLEAR Multi-GPU Split: an attention call expected {text_len} text tokens on a "
                                 f"{grid} grid, the split holds {self.text_len} on {self.grid}")
        return clear_attention_band(q, k, v, rank=self.rank, bands=self.bands, exchange=self.exchange,
                                    text_len=text_len, grid=self.grid, window=window, down_factor=down_factor,
                                    spatial_weight=spatial_weight, scale=scale)


def has_engine():
    """Whether this ComfyUI has what the split uses of core's multi-GPU engine
    (comfy.multigpu.create_multigpu_deepclones; ComfyUI has had it since 0.23).
    Asked of ComfyUI itself, not of its version number."""
    try:
        import comfy.multigpu
    except ImportError:
        return False
    return callable(getattr(comfy.multigpu, "create_multigpu_deepclones", None))


def _require_engine():
    if not has_engine():
        raise BandSplitError(
            "CLEAR Multi-GPU Split needs ComfyUI's multi-GPU support (comfy/multigpu.py with "
            "create_multigpu_deepclones, in ComfyUI 0.23.0 and newer), which this ComfyUI lacks. Update ComfyUI, "
            "or remove this node to run on one GPU.")


# ---------------------------------------------------------------------------
# Run-time hooks (functools.partial of plain functions: model_options are deep-copied)

def _cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: hand core's per-device clones to the band split
    and run every cond on the main device (whose forward then uses them all)."""
    clones = model_options.get("multigpu_clones")
    if clones:
        model_options = {**model_options}
        del model_options["multigpu_clones"]
        options = {**model_options.get("transformer_options", {})}
        options[MODELS_KEY] = [(device, patcher.model.diffusion_model) for device, patcher in clones.items()]
        model_options["transformer_options"] = options
    return executor(model, conds, x_in, timestep, model_options)


def _workers(flux, x, transformer_options, gpus):
    """[(device, Flux module)] for this call: the main model, then core's clones."""
    main = (x.device, flux)
    extra = [(d, m) for d, m in transformer_options.get(MODELS_KEY, []) if m is not flux and d != x.device]
    workers = [main] + extra
    if x.device.type == "cpu" and len(workers) == 1:
        _warn_once(f"CLEAR Multi-GPU Split: running {gpus} bands as threads on the CPU (stand-ins for GPUs).")
        return [main] * gpus
    if len(workers) < gpus:
        raise BandSplitError(
            f"CLEAR Multi-GPU Split: {gpus} GPUs asked for, but ComfyUI gives this model {len(workers)} "
            f"({', '.join(str(d) for d, _ in workers)}). Set 'gpus' to {len(workers)} or fewer, check that "
            "ComfyUI sees every GPU (CUDA_VISIBLE_DEVICES), or remove the node to run on one GPU.")
    return workers[:gpus]


def _slice_control(control, start, stop, device):
    """ControlNet residuals are per image token: this band's tokens, on its device."""
    if control is None:
        return None
    out = {}
    for key, value in control.items():
        if isinstance(value, (list, tuple)):
            out[key] = [None if t is None else t[:, start:min(stop, t.shape[1])].to(device) for t in value]
        else:
            out[key] = value
    return out


def _to(value, device):
    import torch
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _process_img(flux, x, transformer_options):
    import inspect
    if "transformer_options" in inspect.signature(flux.process_img).parameters:  # 0.33: RoPE options
        return flux.process_img(x, transformer_options=transformer_options)
    return flux.process_img(x)


def _band_forward(x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                  transformer_options={}, *, flux, img_ids, **kwargs):
    """One band's forward: Flux._forward's steps, with the band's slice of the
    full image's positions (so RoPE is the full image's)."""
    import torch

    img, _ = _process_img(flux, x, transformer_options)
    bs = x.shape[0]
    txt_ids = torch.zeros((bs, context.shape[1], len(flux.params.axes_dim)), device=x.device, dtype=torch.float32)
    for i in getattr(flux.params, "txt_ids_dims", None) or []:
        txt_ids[:, :, i] = torch.linspace(0, context.shape[1] - 1, steps=context.shape[1], device=x.device,
                                          dtype=torch.float32)
    return flux.forward_orig(img, img_ids, context, txt_ids, timestep, y, guidance, control,
                             transformer_options=transformer_options, attn_mask=kwargs.get("attention_mask"))


def _split_wrapper(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                   transformer_options={}, *, gpus, **kwargs):
    """DIFFUSION_MODEL wrapper: run this forward as ``gpus`` row bands."""
    import comfy.ldm.common_dit
    import comfy.model_management
    import comfy.patcher_extension
    import torch
    from einops import rearrange

    from ..kernels.band import Exchange, band_rows

    if ref_latents:
        raise BandSplitError("CLEAR Multi-GPU Split does not support reference latents (FLUX Kontext-style "
                             "image inputs). Remove the node for Kontext edits.")
    if kwargs.get("attention_mask") is not None:
        raise BandSplitError("CLEAR Multi-GPU Split cannot split an attention mask from the conditioning; "
                             "remove the mask or the node.")
    flux = executor.class_obj
    wrappers = (transformer_options.get("wrappers") or {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    if not wrappers.get(CLEAR_KEY):
        raise BandSplitError(NEEDS_CLEAR)
    p = flux.patch_size
    bs, _, h_orig, w_orig = x.shape
    xp = comfy.ldm.common_dit.pad_to_patch_size(x, (p, p))  # pad the whole image, as Flux.process_img does
    h, w = xp.shape[-2] // p, xp.shape[-1] // p
    _, img_ids = _process_img(flux, x, transformer_options)  # the full image's positions
    workers = _workers(flux, x, transformer_options, gpus)
    bands = band_rows(h, len(workers))
    workers = workers[:len(bands)]  # never more bands than token rows
    T = context.shape[1]
    exchange = Exchange(len(bands), timeout=transformer_options.get("clear_band_timeout", 600))
    outs, errors = [None] * len(bands), [None] * len(bands)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def work(rank):
        device, model = workers[rank]
        y0, y1 = bands[rank]
        try:
            if device.type != "cpu":  # this thread's current device, as core's multi-GPU workers set it
                getattr(comfy.model_management, "set_torch_device", lambda d: None)(device)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                _local.band = _band_worker(rank, bands, exchange, T, (h, w))
                options = {**transformer_options, CHUNKING_MODEL_KEY: model}
                options.pop(MODELS_KEY, None)
                forward = functools.partial(_band_forward, flux=model,
                                            img_ids=img_ids[:, y0 * w:y1 * w].to(device))
                inner = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                    forward, model, executor.wrappers, idx=executor.idx + 1)
                out = inner.execute(xp[:, :, y0 * p:y1 * p].to(device), _to(timestep, device), context.to(device),
                                    _to(y, device), _to(guidance, device), None,
                                    _slice_control(control, y0 * w, y1 * w, device),
                                    {**options}, **{k: _to(v, device) for k, v in kwargs.items()})
                outs[rank] = out.to(x.device)
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors[rank] = exc
            exchange.abort()
        finally:
            _local.band = None

    threads = [threading.Thread(target=work, args=(rank,), name=f"clear-band-{rank}", daemon=True)
               for rank in range(len(bands))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    from ..kernels.band import ExchangeAborted
    real = [e for e in errors if e is not None and not isinstance(e, ExchangeAborted)]
    if real or any(errors):
        raise (real or [e for e in errors if e is not None])[0]
    layers = len(flux.double_blocks) + len(flux.single_blocks)
    if any(calls != layers for calls in exchange.calls):  # a block ran dense attention on its band alone
        raise BandSplitError(NEEDS_CLEAR + f" (attention layers run by CLEAR per band: {exchange.calls}, "
                             f"the model has {layers})")
    out = torch.cat(outs, 1)
    if transformer_options.get("clear_band_record") is not None:  # tests: the exchange's byte counts
        transformer_options["clear_band_record"].append(exchange)
    out = rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=p, pw=p)
    return out[:, :, :h_orig, :w_orig]


def _band_worker(rank, bands, exchange, text_len, grid):
    return BandWorker(rank, bands, exchange, text_len, grid)


# ---------------------------------------------------------------------------
# Patching

def split_model(model, gpus=2):
    """Return a clone of ``model`` (a ComfyUI ModelPatcher of FLUX with the CLEAR
    patch) whose forwards run as ``gpus`` row bands, one per device."""
    import comfy.ldm.flux.model
    import comfy.patcher_extension

    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise BandSplitError(f"CLEAR Multi-GPU Split: gpus must be an int >= 1, got {gpus!r}")
    _require_engine()
    flux = model.get_model_object("diffusion_model")
    if not isinstance(flux, comfy.ldm.flux.model.Flux):
        raise BandSplitError(f"CLEAR Multi-GPU Split needs a FLUX model, got {type(flux).__name__}")
    if gpus > 1 and has_engine():  # core's clone per extra device (none on a CPU-only ComfyUI: bands run as threads)
        import comfy.multigpu
        model = comfy.multigpu.create_multigpu_deepclones(model, gpus, reuse_loaded=True)
    else:
        model = model.clone()
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, _cond_batch_wrapper),
                          (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                           functools.partial(_split_wrapper, gpus=gpus))):
        model.remove_wrappers_with_key(kind, WRAPPER_KEY)
        if gpus > 1:
            model.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return model


class CLEARMultiGPUSplit:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX model with the CLEAR Attention Patch applied."}),
            "gpus": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip": (
                "How many GPUs share each image (1 = off). Each GPU holds the full model weights "
                "(ComfyUI's multi-GPU clones) and runs a band of image rows; the result is the one-GPU image. "
                "Use identical GPUs: the bands are equal, so the slowest GPU sets the pace.")}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, its every step run as bands of image rows across the GPUs (the one-GPU "
                       "image). Connect it to the sampler.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs one image across several GPUs, exactly: each GPU computes a band of image rows and "
                   "exchanges only the CLEAR window's halo rows, pooled keys and the text tokens' attention. "
                   "Needs ComfyUI's multi-GPU support (0.23 or newer), the CLEAR Attention Patch before it, the "
                   "full model on every GPU, and a loader ComfyUI can clone per GPU (core loaders). Wall-clock "
                   "speed-up not yet measured on GPUs; see docs/multigpu.md.")

    def patch(self, model, gpus):
        return (split_model(model, gpus),)


NODE_CLASS_MAPPINGS = {"CLEARMultiGPUSplit": CLEARMultiGPUSplit}
NODE_DISPLAY_NAME_MAPPINGS = {"CLEARMultiGPUSplit": "CLEAR Multi-GPU Split"}
