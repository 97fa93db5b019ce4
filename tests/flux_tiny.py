"""A scaled-down FLUX built through ComfyUI's own classes, and CLEAR weight
files with the published key names at that size. Needs ComfyUI importable
(use the ``comfyui`` fixture first)."""

import torch

TINY = dict(hidden=256, heads=2, depth=2, depth_single=2)


def tiny_unet_config(hidden=256, heads=2, depth=2, depth_single=2, guidance_embed=True, in_channels=16):
    from comfyui_clear.nodes.compat import flux_params_extra

    head_dim = hidden // heads
    axes = [head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8]  # 128 -> [32, 48, 48]
    return {**flux_params_extra(),
        "image_model": "flux", "in_channels": in_channels, "out_channels": 16, "vec_in_dim": 32,
        "context_in_dim": 64, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads,
        "depth": depth, "depth_single_blocks": depth_single, "axes_dim": axes, "theta": 10000,
        "patch_size": 2, "qkv_bias": True, "guidance_embed": guidance_embed,
    }


def make_tiny_flux(dtype=torch.float32, seed=0, **config):
    """ModelPatcher around a tiny ComfyUI Flux with weights of std 1/sqrt(fan_in),
    so attention matters in the output. ``config`` goes to tiny_unet_config."""
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = tiny_unet_config(**config)
    model_config = comfy.supported_models.Flux(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                value = noise / p.shape[1] ** 0.5
            elif name.endswith(".scale"):  # RMSNorm gains: near 1 so q.k stays O(1)
                value = 1.0 + 0.1 * noise
            else:  # biases
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


FAMILY_CONFIGS = {  # tiny versions of the FLUX-class models of ComfyUI 0.33, as its model detection sets them up
    "flux2": ("Flux2", dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, mlp_ratio=3.0,
                            axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, ops_bias=False,
                            global_modulation=True, mlp_silu_act=True, default_ref_method="index",
                            ref_index_scale=10.0, txt_ids_dims=[3], guidance_embed=False)),  # Klein-like
    "longcat": ("LongCatImage", dict(vec_in_dim=None, guidance_embed=False, txt_ids_dims=[1, 2])),
    "ovis": ("Flux", dict(yak_mlp=True, txt_norm=True, txt_ids_dims=[1, 2], guidance_embed=False)),
}


def available_families():
    """The FLUX-class models the installed ComfyUI can build (0.3.64: FLUX.1 only)."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.supported_models

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return ["flux1"] + [name for name, (cls, cfg) in FAMILY_CONFIGS.items()
                        if hasattr(comfy.supported_models, cls) and set(cfg) - {"image_model"} <= fields]


def make_tiny_family(family, seed=0):
    """(ModelPatcher, latent channels) of a tiny model of ``family`` through ComfyUI's own classes."""
    if family == "flux1":
        return make_tiny_flux(seed=seed), 16
    import comfy.model_patcher
    import comfy.supported_models

    cls, overrides = FAMILY_CONFIGS[family]
    unet_config = {**tiny_unet_config(), **overrides}
    model_config = getattr(comfy.supported_models, cls)(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / p.shape[1] ** 0.5 if p.dim() > 1 else
                    1.0 + 0.1 * noise if name.endswith((".scale", ".weight")) else 0.1 * noise)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), unet_config["in_channels"]


def detect_as_tiny(monkeypatch):
    """Make ComfyUI's model detection (0.3.64 fixes FLUX's width at 3072) return
    the tiny config for a FLUX file, so its loader nodes (UNETLoader,
    ComfyUI-GGUF's) load tiny FLUX files; the rest of the load is theirs."""
    import comfy.model_detection
    import comfy.supported_models

    real = comfy.model_detection.model_config_from_unet

    def detect(state_dict, prefix, *args, **kwargs):
        config = real(state_dict, prefix, *args, **kwargs)
        assert config is not None and config.unet_config["image_model"] == "flux", "not detected as FLUX"
        return comfy.supported_models.Flux(tiny_unet_config())

    monkeypatch.setattr(comfy.model_detection, "model_config_from_unet", detect)


def clear_state_dict(hidden=256, depth=2, depth_single=2, down_factor=1, seed=1, dtype=torch.bfloat16):
    """Random CLEAR weights with the published (diffusers) key names."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(dtype)

    sd = {}
    blocks = [f"transformer_blocks.{i}" for i in range(depth)]
    blocks += [f"single_transformer_blocks.{i}" for i in range(depth_single)]
    for b in blocks:
        names = ["to_q", "to_k", "to_v"] + (["to_out.0"] if b.startswith("transformer_blocks") else [])
        for n in names:
            sd[f"{b}.attn.{n}.weight"] = rnd(hidden, hidden)
            sd[f"{b}.attn.{n}.bias"] = rnd(hidden)
        if down_factor > 1:
            d = down_factor
            w = torch.full((d, d), 1.0 / (d * d)) + 0.05 * torch.randn((d, d), generator=gen)
            sd[f"{b}.attn.processor.spatial_weight"] = w.reshape(1, 1, 1, d, 1, d, 1).to(torch.float32)
    return sd


def write_clear_file(path, down_factor=1, seed=1, dtype=torch.bfloat16, **dims):
    """Write a CLEAR safetensors file; ``dims`` as clear_state_dict (hidden, depth, depth_single)."""
    from safetensors.torch import save_file

    sd = clear_state_dict(down_factor=down_factor, seed=seed, dtype=dtype, **dims)
    save_file(sd, str(path))
    return sd


def flux_full_width_shapes(depth=1, depth_single=1, guidance_embed=True):
    """Key -> shape of a FLUX.1 diffusion model at the real width (3072, what
    ComfyUI's model detection assumes) with few blocks, from ComfyUI's class
    built on the meta device (no memory)."""
    import comfy.ldm.flux.model
    import comfy.ops

    config = tiny_unet_config(hidden=3072, heads=24, depth=depth, depth_single=depth_single,
                              guidance_embed=guidance_embed)
    config.update(context_in_dim=4096, vec_in_dim=768, axes_dim=[16, 56, 56])
    config.pop("image_model")
    model = comfy.ldm.flux.model.Flux(device="meta", operations=comfy.ops.disable_weight_init, **config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_flux_checkpoint(path, depth=1, depth_single=1, dtype=torch.float8_e4m3fn, seed=0):
    """A FLUX.1 diffusion-model file (BFL key names, as in diffusion_models/)
    that ComfyUI's UNETLoader detects and loads: real width, few blocks,
    random weights of std 1/sqrt(fan_in)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in flux_full_width_shapes(depth, depth_single).items():
        if key.endswith(".scale"):
            t = torch.ones(shape)
        elif len(shape) > 1:
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        else:
            t = torch.zeros(shape)
        sd[key] = t.to(dtype if len(shape) > 1 else torch.bfloat16)
    save_file(sd, str(path))


def load_scaled_fp8_flux(scale=2 ** -6, depth=1, depth_single=1, seed=0):
    """A "fp8 scaled" FLUX.1 diffusion model (the checkpoint format: float8_e4m3fn
    weights = value / scale, a ``scale_weight`` per layer and a ``scaled_fp8``
    marker) at the real width with few blocks, loaded the way UNETLoader does
    it, through comfy.sd.load_diffusion_model_state_dict: 0.3.64 builds scaled-fp8
    layers, 0.33 comfy_quant mixed-precision layers (QuantizedTensor weights).
    Loaded under torch.inference_mode, as ComfyUI executes nodes. Attention and
    linear1 weights are random (std 1/sqrt(fan_in)); the rest is zero.
    ``scale=None``: each layer's scale maps its largest |w| to fp8's largest."""
    import comfy.sd

    gen = torch.Generator().manual_seed(seed)
    sd = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, shape in flux_full_width_shapes(depth, depth_single).items():
        if len(shape) == 2 and key.endswith(".weight"):
            layer_scale = scale
            if any(part in key for part in ("img_attn.", "linear1.")):
                value = torch.randn(shape, generator=gen) / shape[1] ** 0.5
                layer_scale = scale or float(value.abs().max()) / 448  # None: max |w| -> fp8's largest, as quantizers do
                sd[key] = (value / layer_scale).to(torch.float8_e4m3fn)
            else:
                sd[key] = torch.zeros(shape, dtype=torch.float8_e4m3fn)
            sd[key[: -len("weight")] + "scale_weight"] = torch.tensor(layer_scale or 1.0, dtype=torch.float32)
        else:
            sd[key] = (torch.ones(shape) if key.endswith(".scale") else 0.1 * torch.randn(shape, generator=gen)
                       ).to(torch.bfloat16)
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"load_device": torch.device("cpu")})


def conditioning(T, seed):
    """FLUX conditioning at the tiny size: T random context tokens, a pooled
    vector and guidance 3.5, as ComfyUI's CLIPTextEncode + FluxGuidance give."""
    config = tiny_unet_config()
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, T, config["context_in_dim"], generator=gen),
             {"pooled_output": torch.randn(1, config["vec_in_dim"], generator=gen), "guidance": 3.5}]]


def sample_one_step(model, latent, positive, seed=0, inference_mode=False):
    """One Euler step through ComfyUI's real sampling path (comfy.sample.sample);
    inference_mode as ComfyUI executes nodes (quantized tensors need it)."""
    import contextlib

    import comfy.sample

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode() if inference_mode else contextlib.nullcontext():
        return comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", positive, positive, latent,
                                   denoise=1.0, disable_pbar=True, seed=seed)


def make_tiny_controlnet(seed=11):
    """A ComfyUI ControlNet around ControlNetFlux at the tiny size (3-channel
    hint), weights of std 1/sqrt(fan_in)."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops

    config = tiny_unet_config()
    config.pop("image_model")
    control_model = comfy.ldm.flux.controlnet.ControlNetFlux(
        latent_input=True, control_latent_channels=3, operations=comfy.ops.disable_weight_init, **config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in control_model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[1] ** 0.5 if p.dim() > 1 else 10)
                    + (1.0 if name.endswith(".scale") else 0.0))
    cpu = torch.device("cpu")
    return comfy.controlnet.ControlNet(control_model, compression_ratio=1, latent_format=None, load_device=cpu,
                                       manual_cast_dtype=None, extra_conds=["y", "guidance"])
