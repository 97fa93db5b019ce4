"""FLUX Token Chunking while ComfyUI streams weights (issue 26.1): layers not
resident on the device are cast per call into a cast buffer the next cast on
the same offload stream reuses. The chunked blocks hold weights over a whole
block call; run through ComfyUI's real cast code with offload streams
(tests/_streaming.py), they must give the unchunked result."""

import pytest
import torch

T_CTX, VEC = 64, 32  # tiny FLUX context_in_dim / vec_in_dim (tests/flux_tiny.py)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(seed=7):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 16, 14, 12, generator=gen)  # 7x6 grid: 42 image + 4 text tokens, chunks of 8
    context = torch.randn(1, 4, T_CTX, generator=gen)
    y = torch.randn(1, VEC, generator=gen)
    return img, context, y


def _run(patcher, dm, inputs):
    """The diffusion model's forward with the patcher's wrappers and patches, as the sampler calls it."""
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = patcher.wrappers
    with torch.no_grad():
        return dm(inputs[0], torch.tensor([0.7]), inputs[1], inputs[2], torch.tensor([3.5]), transformer_options=options)


def _lora_patches(dm, seed=9):
    gen = torch.Generator().manual_seed(seed)
    return {f"diffusion_model.{name}.weight": (0.05 * torch.randn(m.weight.shape, generator=gen) / m.weight.shape[1] ** 0.5,)
            for name, m in dm.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in name}


def _streamed(patcher):
    """Low-VRAM load with nothing resident: every layer casts per call (comfy_cast_weights)."""
    patcher.load(torch.device("cpu"), lowvram_model_memory=1, force_patch_weights=False)
    dm = patcher.model.diffusion_model
    cast = [m for name, m in dm.named_modules() if "blocks." in name and getattr(m, "comfy_cast_weights", False)]
    assert cast, "the low-VRAM load left every block layer resident"
    return dm, cast


def _streamed_layers(dm):
    return [m for name, m in dm.named_modules()
            if "blocks." in name and getattr(m, "weight", None) is not None and hasattr(m, "comfy_cast_weights")]


@pytest.mark.parametrize("streams", [2, 1])
@pytest.mark.parametrize("weights", ["plain", "lora", "fp8_lora"])
def test_chunked_equals_unchunked_under_weight_streaming(comfyui, streams, weights):
    """Every block layer non-resident, cast through ComfyUI's offload streams
    (2 as on NVIDIA/AMD by default, 1 as --async-offload 1); with LoRA in low-VRAM
    mode the patch is applied to the weight in the cast buffer. fp8 weights are
    cast into tensors of their own (nothing to copy out; still equal)."""
    import flux_tiny
    from _streaming import weight_streaming

    from comfyui_clear.nodes import token_chunking

    model = flux_tiny.make_tiny_flux(dtype=torch.float8_e4m3fn if weights == "fp8_lora" else torch.float32)
    if weights != "plain":
        model.add_patches(_lora_patches(model.model.diffusion_model), 1.0)
    dm, _ = _streamed(model)
    inputs = _inputs()
    with torch.no_grad():
        resident = _run(model, dm, inputs)  # no streams: the reference
    with weight_streaming(streams) as streaming:
        want = _run(model, dm, inputs)
        unchunked_casts = streaming["casts"]
        got = _run(token_chunking.patch_model(model, 8), dm, inputs)
    import comfy.ops
    if streams == 1 and not hasattr(comfy.ops, "uncast_bias_weight"):
        assert unchunked_casts == 0  # 0.3.x streams only with 2+ streams (--async-offload 1 turns it off)
    else:
        assert unchunked_casts > 0, "the harness did not stream any weight"
    assert _rel(want, resident) < 1e-6  # ComfyUI's own blocks are right under streaming
    assert _rel(got, want) < 1e-6, _rel(got, want)
    model.detach()


def test_chunked_equals_unchunked_under_dynamic_vram(comfyui):
    """0.33's dynamic VRAM (aimdo): layers that do not fit are staged in the
    stream's aimdo cast buffer, always at offset 0."""
    import flux_tiny
    from _streaming import dynamic_vram, has_dynamic_vram, weight_streaming

    from comfyui_clear.nodes import token_chunking

    import comfy.ops
    if not has_dynamic_vram():  # 0.3.x: no dynamic VRAM, and no cast buffer (the test above covers its streaming)
        assert not hasattr(comfy.ops, "uncast_bias_weight")
        return
    model = flux_tiny.make_tiny_flux()
    dm = model.model.diffusion_model
    layers = _streamed_layers(dm)
    inputs = _inputs()
    want = _run(model, dm, inputs)
    with weight_streaming(2), dynamic_vram(layers) as buffers:
        unchunked = _run(model, dm, inputs)
        assert buffers, "the harness did not stage any weight in an aimdo cast buffer"
        got = _run(token_chunking.patch_model(model, 8), dm, inputs)
    assert _rel(unchunked, want) < 1e-6
    assert _rel(got, want) < 1e-6, _rel(got, want)


def test_gguf_unquantized_layers_under_weight_streaming(comfyui):
    """ComfyUI-GGUF: Q8_0 layers dequantize into their own tensors; its
    unquantized (F32) layers go through ComfyUI's cast, so through the streams."""
    from _gguf import tiny_gguf_flux
    from _streaming import weight_streaming

    from comfyui_clear.nodes import token_chunking

    patcher, _ = tiny_gguf_flux(quantized=lambda key: key.endswith(("qkv.weight", "linear1.weight")),
                                unquantized_as_f32=True)
    dm = patcher.model.diffusion_model
    inputs = _inputs()
    reference = _run(patcher, dm, inputs)
    with weight_streaming(2) as streaming:
        want = _run(patcher, dm, inputs)
        assert streaming["casts"] > 0
        got = _run(token_chunking.patch_model(patcher, 8), dm, inputs)
    assert _rel(want, reference) < 1e-6
    assert _rel(got, want) < 1e-6, _rel(got, want)
