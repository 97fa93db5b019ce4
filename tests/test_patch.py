"""The CLEAR Attention Patch node on a tiny FLUX built with ComfyUI's own
classes, sampled through ComfyUI's real sampling path, against an independent
reference: the same FLUX with the CLEAR weights written into its fused layers
by hand and a dense-masked float64 attention (tests/oracle.py)."""

import logging
import math

import pytest
import torch

from flux_tiny import conditioning as flux_tiny_conditioning, sample_one_step

pytestmark = pytest.mark.comfyui



@pytest.fixture(scope="module")
def env(comfyui, tmp_path_factory):
    import folder_paths

    from comfyui_clear.nodes import clear_patch
    import flux_tiny

    folder = tmp_path_factory.mktemp("clear_models")
    folder_paths.add_model_folder_path("clear", str(folder), is_default=True)
    files = {}
    for name, d in (("clear_local_3.safetensors", 1), ("clear_local_2_down_2.safetensors", 2)):
        files[name] = flux_tiny.write_clear_file(folder / name, down_factor=d, seed=7 + d, hidden=256, depth=2, depth_single=2)
    return clear_patch, flux_tiny, files, folder


def _conditioning(batch_text, T, seed):
    return flux_tiny_conditioning(T, seed)


def _sample(model, latent, positive, seed=0):
    """One Euler step of ComfyUI's sampler (patches, wrappers, options all live)."""
    return sample_one_step(model, latent, positive, seed)


def _reference_model(flux_tiny, clear_sd, window, down, proportional, ntk, grid, T, **config):
    """The tiny FLUX with CLEAR weights written into its fused layers by hand and
    a dense-masked oracle attention: shares no code with the patch."""
    from oracle import clear_oracle

    ref = flux_tiny.make_tiny_flux(**config)
    dm = ref.model.diffusion_model
    hidden = flux_tiny.TINY["hidden"]
    with torch.no_grad():
        for i, block in enumerate(dm.double_blocks):
            p = f"transformer_blocks.{i}.attn."
            block.img_attn.qkv.weight.copy_(torch.cat([clear_sd[p + n + ".weight"] for n in ("to_q", "to_k", "to_v")]))
            block.img_attn.qkv.bias.copy_(torch.cat([clear_sd[p + n + ".bias"] for n in ("to_q", "to_k", "to_v")]))
            block.img_attn.proj.weight.copy_(clear_sd[p + "to_out.0.weight"])
            block.img_attn.proj.bias.copy_(clear_sd[p + "to_out.0.bias"])
        for i, block in enumerate(dm.single_blocks):
            p = f"single_transformer_blocks.{i}.attn."
            block.linear1.weight[:3 * hidden].copy_(torch.cat([clear_sd[p + n + ".weight"] for n in ("to_q", "to_k", "to_v")]))
            block.linear1.bias[:3 * hidden].copy_(torch.cat([clear_sd[p + n + ".bias"] for n in ("to_q", "to_k", "to_v")]))
    dm.pe_embedder.theta = dm.pe_embedder.theta * ntk  # a private instance: mutating it is fine here
    layers = [f"transformer_blocks.{i}" for i in range(len(dm.double_blocks))]
    layers += [f"single_transformer_blocks.{i}" for i in range(len(dm.single_blocks))]
    calls = [0]

    def dense_masked(func, q, k, v, heads, **kwargs):
        name = layers[calls[0] % len(layers)]
        calls[0] += 1
        sw = clear_sd.get(name + ".attn.processor.spatial_weight") if down > 1 else None
        D = q.shape[-1]
        scale = 1 / math.sqrt(D)
        if proportional:
            scale = math.sqrt(math.log((10 if down > 1 else 1) * (T + grid[0] * grid[1]), 4608) / D)
        out = clear_oracle(q, k, v, T, grid, window, down, sw, scale).to(q.dtype)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    ref.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = dense_masked
    return ref, calls


@pytest.mark.parametrize("latent_hw,T,weights,proportional,ntk,batch,guidance_embed", [
    ((12, 16), 5, "clear_local_3.safetensors", False, 1.0, 1, True),
    ((10, 10), 6, "clear_local_3.safetensors", False, 1.0, 1, False),     # schnell-style: no guidance embedding
    ((11, 9), 7, "clear_local_3.safetensors", True, 10.0, 2, True),      # odd latent -> padded 6x5 grid
    ((16, 12), 3, "clear_local_2_down_2.safetensors", False, 1.0, 2, True),
    ((14, 10), 4, "clear_local_2_down_2.safetensors", True, 4.0, 1, True),  # 7x5 grid, not divisible by d
])
def test_patched_model_matches_independent_reference(env, latent_hw, T, weights, proportional, ntk, batch,
                                                     guidance_embed):
    clear_patch, flux_tiny, files, _ = env
    model = flux_tiny.make_tiny_flux(guidance_embed=guidance_embed)
    window, down = clear_patch.training_setting(weights)
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, weights, 0, 0, proportional, ntk)
    latent = torch.randn(batch, 16, *latent_hw, generator=torch.Generator().manual_seed(3))
    positive = _conditioning(batch, T, seed=4)
    grid = ((latent_hw[0] + 1) // 2, (latent_hw[1] + 1) // 2)
    ref, calls = _reference_model(flux_tiny, files[weights], window, down, proportional, ntk, grid, T,
                                  guidance_embed=guidance_embed)

    out = _sample(patched, latent, positive)
    expected = _sample(ref, latent, positive)
    dense = _sample(model, latent, positive)
    assert calls[0] > 0
    err = ((out - expected).norm() / expected.norm()).item()
    assert err < 1e-4, err
    # the comparison can fail: CLEAR (weights + mask) really changes the output
    assert ((dense - expected).norm() / expected.norm()).item() > 1e-2


def test_training_free_mode_uses_the_model_weights(env):
    clear_patch, flux_tiny, _, _ = env
    model = flux_tiny.make_tiny_flux()
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, "none (training-free)", 2, 0, False, 1.0)
    assert not patched.patches, "training-free must not patch weights"
    latent = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(5))
    positive = _conditioning(1, 6, seed=6)
    from oracle import clear_oracle

    ref = flux_tiny.make_tiny_flux()  # the model's own weights, oracle attention

    def dense_masked(func, q, k, v, heads, **kwargs):
        out = clear_oracle(q, k, v, 6, (6, 6), 2).to(q.dtype)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    ref.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = dense_masked
    out, expected = _sample(patched, latent, positive), _sample(ref, latent, positive)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-4


def test_original_model_is_untouched(env):
    clear_patch, flux_tiny, _, _ = env
    model = flux_tiny.make_tiny_flux()
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    positive = _conditioning(1, 4, seed=2)
    before_sd = {k: v.clone() for k, v in model.model.state_dict().items()}
    before_out = _sample(model, latent, positive)
    options_before = repr(model.model_options)
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_2_down_2.safetensors", 0, 0, True, 10.0)
    _sample(patched, latent, positive)
    del patched
    after_out = _sample(model, latent, positive)
    assert torch.equal(before_out, after_out)
    assert repr(model.model_options) == options_before and not model.patches
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, before_sd[k]), k


def test_second_clear_node_replaces_the_first(env):
    """Chaining two CLEAR nodes runs the second's settings, not both."""
    clear_patch, flux_tiny, _, _ = env
    model = flux_tiny.make_tiny_flux()
    latent = torch.randn(1, 16, 10, 10, generator=torch.Generator().manual_seed(8))
    positive = _conditioning(1, 3, seed=9)
    (once,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_3.safetensors", 0, 0, False, 1.0)
    (first,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_2_down_2.safetensors", 0, 0, True, 10.0)
    (twice,) = clear_patch.CLEARAttentionPatch().patch(first, "clear_local_3.safetensors", 0, 0, False, 1.0)
    assert torch.allclose(_sample(once, latent, positive), _sample(twice, latent, positive), rtol=1e-5, atol=1e-6)


def test_other_attention_is_not_routed_through_clear(env):
    """The override calls ComfyUI's attention for calls outside our blocks."""
    clear_patch, flux_tiny, _, _ = env
    model = flux_tiny.make_tiny_flux()
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_3.safetensors", 0, 0, False, 1.0)
    override = patched.model_options["transformer_options"]["optimized_attention_override"]
    seen = []

    def backend(*args, **kwargs):
        seen.append(args[0].shape)
        return "dense"

    q = torch.randn(1, 2, 10, 8)
    assert override(backend, q, q, q, 2, skip_reshape=True, transformer_options={}) == "dense"
    assert override(backend, q, q, q, 2, skip_reshape=True,
                    transformer_options={"clear_tokens": (1, (3, 3))}) == "dense"  # not inside a FLUX block
    assert len(seen) == 2


@pytest.mark.parametrize("case", ["ref_latents", "mask", "extra_tokens"])
def test_inputs_clear_cannot_place_raise(env, case):
    clear_patch, flux_tiny, _, _ = env
    model = flux_tiny.make_tiny_flux()
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_3.safetensors", 0, 0, False, 1.0)
    if case == "ref_latents":
        import comfy.patcher_extension
        wrappers = patched.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL][clear_patch.WRAPPER_KEY]
        executor = type("E", (), {"class_obj": patched.model.diffusion_model})()
        with pytest.raises(clear_patch.CLEARPatchError, match="reference latents"):
            wrappers[0](executor, torch.randn(1, 16, 8, 8), None, torch.randn(1, 3, 64),
                        ref_latents=[torch.randn(1, 16, 8, 8)])
        return
    override = patched.model_options["transformer_options"]["optimized_attention_override"]
    layer = {"window": 3, "down_factor": 1, "spatial_weight": None, "proportional": False}
    options = {"clear_tokens": (2, (3, 3)), "clear_layer": layer}
    q = torch.randn(1, 2, 2 + 9 + (1 if case == "extra_tokens" else 0), 8)
    with pytest.raises(clear_patch.CLEARPatchError, match="mask" if case == "mask" else "expected"):
        override(lambda *a, **k: None, q, q, q, 2, skip_reshape=True, transformer_options=options,
                 mask=torch.zeros(1) if case == "mask" else None)


def test_non_flux_model_is_refused(env, comfyui):
    import comfy.model_patcher
    import comfy.supported_models

    clear_patch = env[0]
    cfg = comfy.supported_models.SD3({"in_channels": 16, "pos_embed_scaling_factor": None, "depth": 1,
                                      "patch_size": 2, "adm_in_channels": 32, "context_embedder_config": {
                                          "target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 64}},
                                      "pos_embed_max_size": 16, "num_patches": 256})
    cfg.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(cfg.get_model({}), cpu, cpu)
    with pytest.raises(clear_patch.CLEARPatchError, match="needs a FLUX-class model .*got OpenAISignatureMMDITWrapper"):
        clear_patch.CLEARAttentionPatch().patch(model, "none (training-free)", 0, 0, False, 1.0)


def test_mismatched_settings_warn_once(env, caplog):
    clear_patch, flux_tiny, _, _ = env
    model = flux_tiny.make_tiny_flux()
    with caplog.at_level(logging.WARNING):
        clear_patch.CLEARAttentionPatch().patch(model, "clear_local_3.safetensors", 5, 0, False, 1.0)
        clear_patch.CLEARAttentionPatch().patch(model, "clear_local_3.safetensors", 5, 0, False, 1.0)
    hits = [r for r in caplog.records if "trained with window_size=3" in r.getMessage()]
    assert len(hits) == 1


def test_unknown_radius_needs_window_size(env):
    clear_patch, flux_tiny, _, folder = env
    flux_tiny.write_clear_file(folder / "my_distilled.safetensors", hidden=256, depth=2, depth_single=2)
    model = flux_tiny.make_tiny_flux()
    with pytest.raises(clear_patch.CLEARPatchError, match="set window_size"):
        clear_patch.CLEARAttentionPatch().patch(model, "my_distilled.safetensors", 0, 0, False, 1.0)
    clear_patch.CLEARAttentionPatch().patch(model, "my_distilled.safetensors", 4, 0, False, 1.0)


def test_node_interface(env):
    clear_patch = env[0]
    inputs = clear_patch.CLEARAttentionPatch.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "weights", "window_size", "down_factor", "proportional_attention",
                            "rope_ntk_factor"]
    choices = inputs["weights"][0]
    assert choices[:5] == ["clear_local_8.safetensors", "clear_local_16.safetensors", "clear_local_32.safetensors",
                           "clear_local_8_down_4.safetensors", "clear_local_16_down_4.safetensors"]
    assert choices[-1] == "none (training-free)" and "clear_local_3.safetensors" in choices
    assert all("tooltip" in opts for _, opts in inputs.values())


def test_controlnet_runs_on_the_patched_model_with_its_own_attention_dense(env, monkeypatch):
    """A FLUX ControlNet (ComfyUI's ControlNetFlux at the tiny size) on the
    patched model: sampling runs, the control changes the result, and CLEAR
    runs exactly in the main model's blocks (the ControlNet's stay dense)."""
    import comfyui_clear.kernels as kernels

    clear_patch, flux_tiny, _, _ = env
    control = flux_tiny.make_tiny_controlnet()
    latent = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(12))
    hint = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(13))
    plain = _conditioning(1, 5, seed=14)
    controlled = [[plain[0][0], {**plain[0][1], "control": control.copy().set_cond_hint(hint, 1.0, (0.0, 1.0)),
                                 "control_apply_to_uncond": False}]]

    calls = []
    op = kernels.clear_attention
    monkeypatch.setattr(kernels, "clear_attention", lambda *a, **k: calls.append(1) or op(*a, **k))
    model = flux_tiny.make_tiny_flux()
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_3.safetensors", 0, 0, False, 1.0)
    out_plain = _sample(patched, latent, plain)
    per_step = len(calls)
    out_control = _sample(patched, latent, controlled)
    assert per_step == 4  # 2 double + 2 single blocks, one step
    assert len(calls) == 2 * per_step  # the ControlNet's own blocks did not run CLEAR
    assert torch.isfinite(out_control).all()
    assert ((out_control - out_plain).norm() / out_plain.norm()).item() > 1e-3


def test_flux_class_models_beyond_flux1(env):
    """Every FLUX-class model the installed ComfyUI builds (0.33: FLUX.2/Klein,
    LongCat-Image, Ovis; tiny, from ComfyUI's own classes) is recognised; beyond
    FLUX.1 the weight files and proportional attention are refused, and
    training-free CLEAR matches the model's own weights with the oracle's mask."""
    from oracle import clear_oracle

    clear_patch, flux_tiny, _, _ = env
    families = flux_tiny.available_families()
    assert families[0] == "flux1"
    node = clear_patch.CLEARAttentionPatch()
    for family in families:
        model, channels = flux_tiny.make_tiny_family(family)
        assert clear_patch.flux_family(model.model.diffusion_model) == family
        if family != "flux1":
            with pytest.raises(clear_patch.CLEARPatchError, match="fit FLUX.1 models only"):
                node.patch(model, "clear_local_3.safetensors", 0, 0, False, 1.0)
            with pytest.raises(clear_patch.CLEARPatchError, match="training length"):
                node.patch(model, "none (training-free)", 2, 0, True, 1.0)
        (patched,) = node.patch(model, "none (training-free)", 2, 0, False, 1.0)
        latent = torch.randn(1, channels, 10, 12, generator=torch.Generator().manual_seed(5))
        grid = (5, 6) if model.model.diffusion_model.patch_size == 2 else (10, 12)
        ref, _ = flux_tiny.make_tiny_family(family)

        def dense_masked(func, q, k, v, heads, **kwargs):
            text_len = q.shape[2] - grid[0] * grid[1]
            out = clear_oracle(q, k, v, text_len, grid, 2).to(q.dtype)
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

        ref.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = dense_masked
        positive = _conditioning(1, 6, seed=6)
        out, expected, dense = (_sample(m, latent, positive) for m in (patched, ref, model))
        assert ((out - expected).norm() / expected.norm()).item() < 1e-4, family
        assert ((dense - expected).norm() / expected.norm()).item() > 1e-3, family
