"""CLEAR weight files mapped onto a tiny FLUX built through ComfyUI's own classes:
patched weights == published weights through ComfyUI's real load paths (full
and low-VRAM), LoRA order independence with a real LoRA loaded by ComfyUI, the
user's model never mutated, every bad file rejected before anything is patched,
and the models/clear catalogue. Needs COMFYUI_PATH (skips otherwise)."""

import os

import pytest
import torch
from safetensors.torch import save_file

from _hub_server import FakeHub
from flux_tiny import clear_state_dict, make_tiny_flux, write_clear_file

pytestmark = pytest.mark.comfyui

H = 256  # tiny FLUX hidden size (flux_tiny.TINY)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def W(comfyui):
    from comfyui_clear.nodes import weights

    return weights


@pytest.fixture(scope="module")
def flux_bf16(comfyui):
    return make_tiny_flux(torch.bfloat16, seed=0)


# --------------------------------------------------------------------------
# helpers

def expected_published(pub, base_sd):
    """ComfyUI-layout values the published file should produce (float32), for the
    patched keys; untouched rows of linear1 keep the base model's values."""
    out = {}
    for i in range(2):
        a = f"transformer_blocks.{i}.attn."
        p = f"diffusion_model.double_blocks.{i}.img_attn."
        for param in ("weight", "bias"):
            out[p + "qkv." + param] = torch.cat([pub[a + f"to_{n}.{param}"] for n in "qkv"]).float()
            out[p + "proj." + param] = pub[a + f"to_out.0.{param}"].float()
        a = f"single_transformer_blocks.{i}.attn."
        p = f"diffusion_model.single_blocks.{i}.linear1."
        for param in ("weight", "bias"):
            rest = base_sd[p + param][3 * H:].float()
            out[p + param] = torch.cat([pub[a + f"to_{n}.{param}"].float() for n in "qkv"] + [rest])
    return out


UNTOUCHED = ["diffusion_model.double_blocks.0.txt_attn.qkv.weight", "diffusion_model.double_blocks.1.txt_attn.proj.bias",
             "diffusion_model.single_blocks.0.linear2.weight", "diffusion_model.double_blocks.0.img_mlp.0.weight"]


def effective_weights(patcher, keys, lowvram=False, low_vram_keys=None):
    """The weights the model computes with after ComfyUI loads ``patcher``:
    patched in place (full load), or through the LowVramPatch functions that
    comfy.ops applies at forward time (lowvram=True: every module; an int: that
    many bytes load fully, the rest low-VRAM, i.e. partial loading). Keys that
    went through LowVramPatch are added to ``low_vram_keys``. Unpatches afterwards."""
    import comfy.model_patcher
    import comfy.ops
    import comfy.utils

    with torch.inference_mode():  # as ComfyUI executes every prompt
        out = {}
        if lowvram:
            budget = 1 if lowvram is True else lowvram  # 1 byte: every module low-VRAM
            patcher.patch_model(device_to=CPU, lowvram_model_memory=budget)
            assert patcher.model.model_lowvram
            for key in keys:
                module_name, param = key.rsplit(".", 1)
                m = comfy.utils.get_attr(patcher.model, module_name)
                functions = m.weight_function if param == "weight" else m.bias_function
                if key in patcher.patches and lowvram is True:
                    assert functions and isinstance(functions[0], comfy.model_patcher.LowVramPatch)
                if functions and low_vram_keys is not None:
                    low_vram_keys.add(key)
                compute = compute_dtype(patcher, m.weight)  # what the forward casts to, as comfy.ops does
                w, b = comfy.ops.cast_bias_weight(m, dtype=compute, device=CPU,
                                                  bias_dtype=compute_dtype(patcher, m.bias))[:2]
                out[key] = (w if param == "weight" else b).clone()
        else:
            patcher.patch_model(device_to=CPU)
            sd = patcher.model.state_dict()
            out = {k: sd[k].clone() for k in keys}
        patcher.unpatch_model(device_to=CPU)
    return out


def compute_dtype(patcher, weight):
    """The dtype a layer computes in: its own, or for fp8 storage the model's
    manual-cast dtype (bf16 when the model has none, as on a GPU)."""
    if weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return weight.dtype
    return patcher.model.manual_cast_dtype or torch.bfloat16


def fp8_spacing(x):
    """Distance between neighbouring float8_e4m3fn values around x (float32)."""
    ax = x.abs().clamp_min(2.0 ** -6)
    return torch.exp2(torch.floor(torch.log2(ax)) - 3)


def make_lora(seed=5, rank=4, alpha=2.0):
    """A kohya-style LoRA on two fused keys that CLEAR also patches, in the key
    format ComfyUI maps to FLUX (lora_unet_<module path with _>)."""
    gen = torch.Generator().manual_seed(seed)
    targets = {"double_blocks.0.img_attn.qkv": (3 * H, H), "single_blocks.1.linear1": (7 * H, H),
               "double_blocks.1.img_attn.proj": (H, H)}
    sd, deltas, sizes = {}, {}, {}
    for module, (rows, cols) in targets.items():
        up = torch.randn(rows, rank, generator=gen) * 0.3
        down = torch.randn(rank, cols, generator=gen) * 0.3
        name = "lora_unet_" + module.replace(".", "_")
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[f"diffusion_model.{module}.weight"] = (alpha / rank) * (up @ down)
        sizes[f"diffusion_model.{module}.weight"] = (alpha / rank) * (up.abs() @ down.abs())  # for rounding bounds
    return sd, deltas, sizes


def apply_file(W, patcher, path):
    clone = patcher.clone()
    W.apply_clear_weights(clone, W.load_clear_weights(str(path), clone))
    return clone


# --------------------------------------------------------------------------
# patched weights == published weights

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_patched_weights_equal_published_full_and_lowvram(W, dtype, tmp_path):
    base = make_tiny_flux(dtype, seed=3)
    base_sd = {k: v.clone() for k, v in base.model.state_dict().items()}
    pub = write_clear_file(tmp_path / "c.safetensors", seed=11)
    clone = apply_file(W, base, tmp_path / "c.safetensors")
    expected = expected_published(pub, base_sd)
    keys = list(expected) + UNTOUCHED

    full = effective_weights(clone, keys)
    low = effective_weights(clone, keys, lowvram=True)
    for key in keys:
        assert full[key].dtype == dtype, key
        if dtype != torch.float8_e4m3fn:
            assert torch.equal(full[key], low[key]), f"full vs lowvram differ: {key}"
        if key in UNTOUCHED:
            assert torch.equal(full[key].view(torch.uint8), base_sd[key].view(torch.uint8)), key
            assert torch.equal(low[key], base_sd[key].to(low[key].dtype)), key
            continue
        e, a = expected[key], full[key].float()
        if dtype == torch.float8_e4m3fn:  # ComfyUI rounds stochastically: one of the two neighbours
            assert ((a - e).abs() <= fp8_spacing(e)).all(), key
            # low-VRAM patches the weight after the cast to the compute dtype (bf16): the published
            # values exactly, the rest of linear1 the fp8 base values
            assert low[key].dtype == torch.bfloat16 and torch.equal(low[key].float(), e), key
            if key.endswith("linear1.weight"):
                # ComfyUI re-rounds the whole fused weight stochastically (as for any LoRA on it), which
                # moves ~1% of even exactly representable fp8 values by one step: MLP rows stay within that
                mlp, mlp_base = full[key][3 * H:].float(), base_sd[key][3 * H:].float()
                assert ((mlp - mlp_base).abs() <= fp8_spacing(mlp_base)).all()
                assert (mlp != mlp_base).float().mean() < 0.03
        else:
            assert torch.equal(full[key], e.to(dtype)), key
        assert not torch.equal(full[key].view(torch.uint8), base_sd[key].view(torch.uint8)), key


def test_mapping_agrees_with_comfyui_own_diffusers_to_flux_key_map(W, flux_bf16, tmp_path):
    """comfy.utils.flux_to_diffusers is ComfyUI's own diffusers -> BFL map (used to
    load diffusers FLUX checkpoints): every published tensor must be patched
    exactly where ComfyUI would put that diffusers key."""
    import comfy.utils

    pub = write_clear_file(tmp_path / "c.safetensors", down_factor=4, seed=27)
    w = W.load_clear_weights(str(tmp_path / "c.safetensors"), flux_bf16)
    key_map = comfy.utils.flux_to_diffusers({"depth": 2, "depth_single_blocks": 2, "hidden_size": H},
                                            output_prefix="diffusion_model.")
    by_tensor = {id(value[1][0]): patch_key for patch_key, value in w.patches.items()}
    mapped = 0
    for name, tensor in pub.items():
        if name.endswith("spatial_weight"):
            continue
        target = key_map[name]
        assert by_tensor[id(w._tensors[name])] == target, name  # same key and row slice
        mapped += 1
    assert mapped == len(w.patches) == 2 * 4 * 2 + 2 * 3 * 2


def test_partial_loading_mixes_both_paths_with_published_values(W, flux_bf16, tmp_path):
    pub = write_clear_file(tmp_path / "c.safetensors", seed=26)
    clone = apply_file(W, flux_bf16, tmp_path / "c.safetensors")
    base_sd = {k: v.clone() for k, v in flux_bf16.model.state_dict().items()}
    expected = expected_published(pub, base_sd)
    low_vram_keys = set()
    got = effective_weights(clone, list(expected), lowvram=clone.model_size() // 2, low_vram_keys=low_vram_keys)
    assert 0 < len(low_vram_keys) < len(expected)  # really partial: some keys each way
    for key, value in expected.items():
        assert torch.equal(got[key], value.to(torch.bfloat16)), key


def test_dynamic_vram_path_computes_with_published_values(W, flux_bf16, tmp_path):
    """ComfyUI 0.33's dynamic VRAM loading (ModelPatcherDynamic, default on GPUs;
    on a CPU it falls back to ModelPatcher) keeps the weights as they are and
    re-applies every patched key on each forward through LowVramPatch: staged
    through a cast buffer (prepare), applied to the weight cast to the compute
    dtype. The parts of that path that run on a CPU, per CLEAR key: the patches
    keep the weight's shape (else the layer would be force-loaded) and the
    patched weight is the published one."""
    import comfy.lora
    import comfy.model_patcher

    pub = write_clear_file(tmp_path / "c.safetensors", seed=31)
    clone = apply_file(W, flux_bf16, tmp_path / "c.safetensors")
    base_sd = {k: v.clone() for k, v in flux_bf16.model.state_dict().items()}
    expected = expected_published(pub, base_sd)
    assert set(expected) == set(clone.patches)
    calculate_shape = getattr(comfy.lora, "calculate_shape", None)  # the dynamic loader's check (0.33)
    for key, want in expected.items():
        weight = comfy.model_patcher.get_key_weight(clone.model, key)[0]
        if calculate_shape is not None:
            assert calculate_shape(clone.patches[key], weight, key) == weight.shape, key
        patch = comfy.model_patcher.LowVramPatch(key, clone.patches)
        if hasattr(patch, "prepare"):  # 0.33: the patch tensors are copied into the layer's cast buffer
            buffer = torch.zeros(patch.memory_required(), dtype=torch.uint8)
            patch.prepare(buffer, None, copy=True, commit=True)
            assert all(p[1][1][0].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                       for p in patch.prepared_patches)
        got = patch(weight.to(torch.bfloat16, copy=True))
        assert torch.equal(got, want.to(torch.bfloat16)), key
    assert torch.equal(flux_bf16.model.state_dict()[key], base_sd[key])  # the weight itself untouched


# --------------------------------------------------------------------------
# LoRA before or after: same weights == published + LoRA delta

def test_lora_before_and_after_clear_give_published_plus_delta(W, flux_bf16, tmp_path):
    import comfy.sd

    pub = write_clear_file(tmp_path / "c.safetensors", seed=12)
    lora_sd, deltas, sizes = make_lora()
    strength = 0.7

    lora_first = comfy.sd.load_lora_for_models(flux_bf16, None, lora_sd, strength, 0)[0]
    assert all(k in lora_first.patches for k in deltas)  # ComfyUI really mapped the LoRA
    lora_then_clear = apply_file(W, lora_first, tmp_path / "c.safetensors")
    clear_then_lora = comfy.sd.load_lora_for_models(
        apply_file(W, flux_bf16, tmp_path / "c.safetensors"), None, lora_sd, strength, 0)[0]

    base_sd = {k: v.clone() for k, v in flux_bf16.model.state_dict().items()}
    expected = expected_published(pub, base_sd)
    keys = list(deltas)
    a = effective_weights(lora_then_clear, keys)
    b = effective_weights(clear_then_lora, keys)
    a_low = effective_weights(lora_then_clear, keys, lowvram=True)
    b_low = effective_weights(clear_then_lora, keys, lowvram=True)
    for key in keys:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(a_low[key], b_low[key]), key
        want = expected[key] + strength * deltas[key]
        torch.testing.assert_close(a[key].float(), want, rtol=2 ** -7, atol=1e-6)  # float32, one rounding
        # ComfyUI's low-VRAM path computes the LoRA product and the sum in bf16 (2^-8 relative per rounding)
        bound = 2 ** -6 * (expected[key].abs() + strength * sizes[key]) + 1e-6
        ratio = ((a_low[key].float() - want).abs() / bound).max()
        assert ratio <= 1, (key, ratio)
        # the delta is far above bf16 rounding (2^-8 relative): losing the LoRA would fail
        assert (strength * deltas[key]).abs().mean() > 0.1 * want.abs().mean()


def test_original_patcher_untouched(W, tmp_path):
    import comfy.sd

    raw = make_tiny_flux(torch.bfloat16, seed=4)
    user_model = comfy.sd.load_lora_for_models(raw, None, make_lora()[0], 1.0, 0)[0]  # has patch lists
    weights_before = {k: v.clone() for k, v in user_model.model.state_dict().items()}
    patches_before = {k: list(v) for k, v in user_model.patches.items()}
    uuid_before = user_model.patches_uuid

    write_clear_file(tmp_path / "c.safetensors", down_factor=4, seed=13)
    clone = apply_file(W, user_model, tmp_path / "c.safetensors")
    effective_weights(clone, ["diffusion_model.double_blocks.0.img_attn.qkv.weight"])
    effective_weights(clone, ["diffusion_model.double_blocks.0.img_attn.qkv.weight"], lowvram=True)

    assert user_model.patches_uuid == uuid_before
    assert user_model.get_attachment(W.ATTACHMENT) is None
    assert user_model.patches.keys() == patches_before.keys()
    for k, v in patches_before.items():
        assert len(user_model.patches[k]) == len(v) and all(x is y for x, y in zip(user_model.patches[k], v)), k
    after = user_model.model.state_dict()
    for k, v in weights_before.items():
        assert torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k
    assert clone.patches_uuid != uuid_before


def test_second_clear_file_replaces_the_first(W, flux_bf16, tmp_path):
    write_clear_file(tmp_path / "a.safetensors", seed=21)
    pub_b = write_clear_file(tmp_path / "b.safetensors", seed=22)
    twice = apply_file(W, apply_file(W, flux_bf16, tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    key = "diffusion_model.double_blocks.1.img_attn.qkv.weight"
    assert len(twice.patches[key]) == 3  # q, k, v slices of b only
    got = effective_weights(twice, [key])[key]
    base_sd = {k: v.clone() for k, v in flux_bf16.model.state_dict().items()}
    assert torch.equal(got, expected_published(pub_b, base_sd)[key].to(torch.bfloat16))


# --------------------------------------------------------------------------
# spatial weights and returned structure

def test_spatial_weights_per_layer(W, flux_bf16, tmp_path):
    pub = write_clear_file(tmp_path / "d4.safetensors", down_factor=4, seed=14)
    w = W.load_clear_weights(str(tmp_path / "d4.safetensors"), flux_bf16)
    assert w.down_factor == 4 and w.path == str(tmp_path / "d4.safetensors")
    layers = [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    assert sorted(w.spatial_weights) == sorted(layers)
    for kind, i in layers:
        name = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{i}.attn.processor.spatial_weight"
        sw = w.spatial_weights[(kind, i)]
        assert sw.dtype == torch.float32 and sw.shape == (4, 4)
        assert torch.equal(sw, pub[name].reshape(4, 4))  # [row offset, column offset]
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for _, (t,) in w.patches.values())

    write_clear_file(tmp_path / "d1.safetensors", seed=15)
    plain = W.load_clear_weights(str(tmp_path / "d1.safetensors"), flux_bf16)
    assert plain.down_factor == 1 and plain.spatial_weights == {}


def test_reloading_an_unchanged_file_shares_its_tensors(W, flux_bf16, tmp_path):
    import gc

    path = str(tmp_path / "c.safetensors")
    write_clear_file(path, seed=24)
    first = W.load_clear_weights(path, flux_bf16)
    second = W.load_clear_weights(path, flux_bf16)  # e.g. the node re-runs after an upstream change
    key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    assert second.patches[key][1][0] is first.patches[key][1][0]

    pub = write_clear_file(path, seed=25)  # file replaced: read again
    os.utime(path, ns=(1, 1))  # distinct mtime even on coarse filesystem clocks
    third = W.load_clear_weights(path, flux_bf16)
    assert torch.equal(third.patches[key][1][0], pub["transformer_blocks.0.attn.to_out.0.weight"])

    del first, second, third
    gc.collect()
    assert not [k for k in W._file_cache.keys() if k[0] == path]  # the cache never keeps a file alive alone


def test_transformer_prefix_is_accepted(W, flux_bf16, tmp_path):
    sd = clear_state_dict(seed=16)
    save_file({"transformer." + k: v for k, v in sd.items()}, str(tmp_path / "p.safetensors"))
    w = W.load_clear_weights(str(tmp_path / "p.safetensors"), flux_bf16)
    key = ("diffusion_model.single_blocks.1.linear1.weight", (0, H, H))
    assert torch.equal(w.patches[key][1][0], sd["single_transformer_blocks.1.attn.to_k.weight"])


# --------------------------------------------------------------------------
# bad files: one clear error naming the file, nothing patched

def _bad_files(tmp_path):
    cases = {}

    def save(name, sd, why):
        path = tmp_path / name
        save_file(sd, str(path))
        cases[name] = (path, why)

    good = clear_state_dict(seed=17)
    good_path = tmp_path / "good.safetensors"
    save_file(good, str(good_path))
    data = good_path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) * 2 // 3])
    cases["truncated.safetensors"] = (tmp_path / "truncated.safetensors", "truncated or corrupt")
    (tmp_path / "text.safetensors").write_bytes(b"<html>404 Not Found</html>")
    cases["text.safetensors"] = (tmp_path / "text.safetensors", "truncated or corrupt")

    save("sdxl.safetensors", {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3),
                              "mid_block.attentions.0.proj_in.weight": torch.zeros(4, 4)}, "not a CLEAR file")
    save("hidden128.safetensors", clear_state_dict(hidden=128, seed=1), "hidden size is 256")
    save("missing_layer.safetensors", clear_state_dict(depth_single=1, seed=1), "lacks single block(s) 1")
    save("extra_layer.safetensors", clear_state_dict(depth=3, seed=1), "double block(s) 2 but the model has 2")
    save("missing_bias.safetensors", {k: v for k, v in good.items() if k != "transformer_blocks.1.attn.to_k.bias"},
         "'transformer_blocks.1.attn.to_k.bias' is missing")
    save("unknown_key.safetensors", {**good, "transformer_blocks.0.attn.add_q_proj.weight": torch.zeros(H, H)},
         "transformer_blocks.0.attn.add_q_proj.weight")
    save("single_to_out.safetensors", {**good, "single_transformer_blocks.0.attn.to_out.0.weight": torch.zeros(H, H)},
         "single_transformer_blocks.0.attn.to_out.0.weight")
    nan = dict(good)
    nan["single_transformer_blocks.0.attn.to_v.weight"] = good["single_transformer_blocks.0.attn.to_v.weight"].clone()
    nan["single_transformer_blocks.0.attn.to_v.weight"][3, 4] = float("nan")
    save("nan.safetensors", nan, "not finite")

    d4 = clear_state_dict(down_factor=4, seed=18)
    mixed = dict(d4)
    mixed["transformer_blocks.1.attn.processor.spatial_weight"] = torch.full((1, 1, 1, 2, 1, 2, 1), 0.25)
    save("mixed_d.safetensors", mixed, "spatial_weight sizes disagree")
    partial = {k: v for k, v in d4.items() if k != "single_transformer_blocks.1.attn.processor.spatial_weight"}
    save("partial_sw.safetensors", partial, "only some layers have a spatial_weight")
    bad_shape = dict(d4)
    bad_shape["transformer_blocks.0.attn.processor.spatial_weight"] = torch.full((1, 1, 1, 4, 1, 2, 1), 0.25)
    save("sw_shape.safetensors", bad_shape, "expected (1, 1, 1, d, 1, d, 1)")
    return cases


def test_bad_files_raise_one_clear_error_and_patch_nothing(W, flux_bf16, tmp_path):
    cases = _bad_files(tmp_path)
    clone = flux_bf16.clone()
    patches_before = {k: list(v) for k, v in clone.patches.items()}
    for name, (path, why) in cases.items():
        with pytest.raises(W.CLEARWeightsError) as err:
            W.load_clear_weights(str(path), clone)
        msg = str(err.value)
        assert str(path) in msg and why in msg, f"{name}: {msg}"
        assert isinstance(err.value, ValueError)
    assert {k: list(v) for k, v in clone.patches.items()} == patches_before
    assert clone.get_attachment(W.ATTACHMENT) is None


def test_non_flux_model_is_rejected(W, tmp_path):
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "pos_embed_max_size": 32,
           "num_patches": 32 * 32, "adm_in_channels": 32,
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}}}
    config = comfy.supported_models.SD3(cfg)
    config.set_inference_dtype(torch.float32, None)
    sd3 = comfy.model_patcher.ModelPatcher(config.get_model({}), CPU, CPU)
    write_clear_file(tmp_path / "c.safetensors", seed=19)
    with pytest.raises(W.CLEARWeightsError, match="not a FLUX model") as err:
        W.load_clear_weights(str(tmp_path / "c.safetensors"), sd3)
    assert str(tmp_path / "c.safetensors") in str(err.value)


def test_bigger_flux_is_rejected_with_hidden_size(W, tmp_path):
    write_clear_file(tmp_path / "c.safetensors", seed=20)  # hidden 256
    wide = make_tiny_flux(torch.bfloat16, seed=0, hidden=384, heads=3)
    with pytest.raises(W.CLEARWeightsError, match="hidden size is 384"):
        W.load_clear_weights(str(tmp_path / "c.safetensors"), wide)


# --------------------------------------------------------------------------
# catalogue: models/clear folder, names, training settings, resolution


def test_register_is_idempotent_and_keeps_yaml_folder_first(W, clear_folders, tmp_path, monkeypatch):
    default = str(tmp_path / "models" / "clear")
    W.register_model_folder()
    W.register_model_folder()
    assert clear_folders.get_folder_paths(W.FOLDER) == [default]
    assert clear_folders.folder_names_and_paths[W.FOLDER][1] == {".safetensors"}

    yaml_dir = str(tmp_path / "elsewhere")
    monkeypatch.setitem(clear_folders.folder_names_and_paths, W.FOLDER, ([yaml_dir], set()))
    W.register_model_folder()
    assert clear_folders.get_folder_paths(W.FOLDER) == [yaml_dir, default]


def test_weight_choices_and_training_settings(W, clear_folders, tmp_path):
    folder = tmp_path / "models" / "clear"
    (folder / "sub").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(folder / "my_clear.safetensors"),
              metadata={"window_size": "24", "down_factor": "2"})
    (folder / "sub" / "clear_local_12_down_3_fp16.safetensors").write_bytes(b"")
    (folder / "clear_local_8.safetensors").write_bytes(b"")  # published, on disk: listed once
    (folder / "notes.txt").write_text("not a weight file")

    choices = W.weight_choices()
    assert choices[:5] == list(W.PUBLISHED)
    assert choices[-1] == W.TRAINING_FREE
    assert sorted(choices[5:-1]) == sorted(["my_clear.safetensors", os.path.join("sub", "clear_local_12_down_3_fp16.safetensors")])

    assert W.training_setting("clear_local_16_down_4.safetensors") == (16, 4)
    assert W.training_setting("clear_local_32.safetensors") == (32, 1)
    assert W.training_setting(os.path.join("sub", "clear_local_12_down_3_fp16.safetensors")) == (12, 3)
    assert W.training_setting("my_clear.safetensors") == (24, 2)
    assert W.training_setting("unknown.safetensors") is None


def test_resolve_finds_local_downloads_published_and_rejects_unknown(W, clear_folders, tmp_path, monkeypatch):
    folder = tmp_path / "models" / "clear"
    folder.mkdir(parents=True)
    (folder / "mine.safetensors").write_bytes(b"x")
    assert W.resolve_weight_file("mine.safetensors") == str(folder / "mine.safetensors")

    with pytest.raises(W.CLEARWeightsError, match="not found") as err:
        W.resolve_weight_file("nope.safetensors")
    assert str(folder) in str(err.value)
    with pytest.raises(W.CLEARWeightsError):
        W.resolve_weight_file(W.TRAINING_FREE)

    payload = b"published bytes"
    with FakeHub({"Huage001/CLEAR/clear_local_16.safetensors": payload}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        path = W.resolve_weight_file("clear_local_16.safetensors")
    assert path == str(folder / "clear_local_16.safetensors")
    assert (folder / "clear_local_16.safetensors").read_bytes() == payload


@pytest.fixture(scope="module")
def scaled_fp8(comfyui):
    from flux_tiny import load_scaled_fp8_flux

    return load_scaled_fp8_flux(scale=2 ** -6)


def forward_weights(patcher, modules, lowvram=False, columns=40):
    """{module: (weight[:, :columns], bias)} that each Linear really computes
    with after ComfyUI loads ``patcher`` (fully or low-VRAM): its outputs for
    unit vectors minus its output for zero, computed in float32 (exact sums).
    Works for every layer type ComfyUI has (scaled fp8, comfy_quant QuantizedTensor)."""
    import comfy.utils

    out = {}
    with torch.inference_mode():
        patcher.patch_model(device_to=CPU, lowvram_model_memory=1 if lowvram else 0)
        assert bool(patcher.model.model_lowvram) == lowvram
        for name in modules:
            linear = comfy.utils.get_attr(patcher.model, name)
            x = torch.cat([torch.zeros(1, linear.in_features), torch.eye(linear.in_features)[:columns]])
            y = linear(x).float()
            out[name] = ((y[1:] - y[:1]).T.clone(), y[0].clone())
        patcher.unpatch_model(device_to=CPU)
    return out


def test_scaled_fp8_checkpoint_computes_with_published_values(W, scaled_fp8, tmp_path):
    """A "fp8 scaled" FLUX checkpoint loaded through ComfyUI's loader (0.33:
    comfy_quant layers whose full load re-quantises the whole patched tensor with
    a new scale): the layers compute with the published values up to one fp8
    rounding, full and low-VRAM load, and the MLP rows of linear1 keep theirs."""
    n = 40
    modules = ["diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.double_blocks.0.img_attn.proj",
               "diffusion_model.single_blocks.0.linear1"]
    base = forward_weights(scaled_fp8, modules, columns=n)
    pub = write_clear_file(tmp_path / "c.safetensors", seed=23, hidden=3072, depth=1, depth_single=1)
    clone = apply_file(W, scaled_fp8, tmp_path / "c.safetensors")
    a = "transformer_blocks.0.attn."
    s = "single_transformer_blocks.0.attn."
    want = {  # published (weight columns, bias) per module, attention rows only
        modules[0]: [torch.cat([pub[a + f"to_{p}.{x}"] for p in "qkv"]).float() for x in ("weight", "bias")],
        modules[1]: [pub[a + f"to_out.0.{x}"].float() for x in ("weight", "bias")],
        modules[2]: [torch.cat([pub[s + f"to_{p}.{x}"] for p in "qkv"]).float() for x in ("weight", "bias")],
    }

    def within_fp8(got, expected, tiny=2 ** -15):  # one fp8 e4m3 rounding (3 mantissa bits); tiny: subnormals
        return ((got - expected).abs() <= expected.abs() / 8 + tiny).all()

    for lowvram in (False, True):
        got = forward_weights(clone, modules, lowvram=lowvram, columns=n)
        for name in modules:
            (w, b), (w_want, b_want) = got[name], want[name]
            rows = w_want.shape[0]
            assert within_fp8(w[:rows], w_want[:, :n]), (name, lowvram)
            # biases: 0.3.64 stores them as unscaled fp8 on this CPU (spacing 2^-9 below 2^-6)
            assert within_fp8(b[:rows], b_want, tiny=2 ** -9), (name, lowvram)
            assert not within_fp8(base[name][0][:rows], w_want[:, :n])  # the check can fail
            if rows < w.shape[0]:  # linear1's MLP rows: the model's own values (re-rounded at most)
                assert within_fp8(w[rows:], base[name][0][rows:]), lowvram
                assert within_fp8(b[rows:], base[name][1][rows:], tiny=2 ** -9), lowvram
