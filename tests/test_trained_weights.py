"""Trained CLEAR files (CLEAR Distill's output, nodes/weights.py): written with
save_trained_weights, loaded through the CLEAR Attention Patch on tiny FLUX.1
and FLUX.2 (Klein-shaped) models built with ComfyUI's own classes, sampled
through ComfyUI's real sampling path, against the same model with the trained
weights written into its fused layers by hand and training-free CLEAR. Also: a
user's LoRA stacks on a CLEAR LoRA file in either order, every mismatch is one
clear error, the metadata round-trips, and the base-model hash."""

import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flux_tiny import conditioning, make_tiny_family, make_tiny_flux, sample_one_step

pytestmark = pytest.mark.comfyui

H = 256  # tiny hidden size (flux_tiny.TINY)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def env(comfyui):
    from comfyui_clear.nodes import clear_patch, weights

    return weights, clear_patch


def _families():
    import flux_tiny

    return [f for f in ("flux1", "flux2") if f in flux_tiny.available_families()]


def _model(family, seed=0):
    return make_tiny_family(family, seed=seed)  # (ModelPatcher, latent channels)


def trained_state(W, fingerprint, fmt, rank=4, alpha=2.0, down_factor=1, seed=3):
    """Random tensors with exactly the names and shapes of a trained file, of a
    size that changes the model's output clearly."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in W.trained_file_shapes(fingerprint, fmt, rank=rank if fmt == "lora" else None,
                                            down_factor=down_factor).items():
        if key.endswith(".alpha"):
            state[key] = torch.tensor(alpha)
        elif key.endswith("spatial_weight"):
            state[key] = torch.full(shape, 1.0 / down_factor ** 2) + 0.05 * torch.randn(shape, generator=gen)
        elif key.endswith(".bias"):
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        elif fmt == "full":
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        else:
            state[key] = 0.2 * torch.randn(shape, generator=gen)
    return state


def save(W, path, model, state, fmt, window=3, down=1, rank=4, alpha=2.0, family=None, steps=7, loss=0.125):
    dm = model.model.diffusion_model
    from comfyui_clear.nodes.clear_patch import flux_family

    return W.save_trained_weights(
        str(path), state, fmt=fmt, window_size=window, down_factor=down, family=family or flux_family(dm),
        fingerprint=W.model_fingerprint(dm), base_hash=W.base_model_hash(model), steps=steps, final_loss=loss,
        rank=rank if fmt == "lora" else None, alpha=alpha if fmt == "lora" else None)


def by_hand(W, model, state, fmt):
    """Write the trained weights into the model's fused layers directly (no
    ComfyUI patch, no CLEAR code): q/k/v rows of img_attn.qkv and linear1, proj."""
    dm = model.model.diffusion_model
    with torch.no_grad():
        for kind, blocks in (("double", dm.double_blocks), ("single", dm.single_blocks)):
            for i, block in enumerate(blocks):
                fused = block.img_attn.qkv if kind == "double" else block.linear1
                targets = [(fused, row * H) for row in range(3)]
                if kind == "double":
                    targets.append((block.img_attn.proj, 0))
                for (layer, start), proj in zip(targets, W.PROJECTIONS[kind]):
                    p = W.file_prefix(kind, i, proj)
                    rows = layer.weight[start:start + H]
                    if fmt == "full":
                        rows.copy_(state[p + ".weight"])
                        if layer.bias is not None:
                            layer.bias[start:start + H].copy_(state[p + ".bias"])
                    else:
                        up, down = state[p + ".lora_up.weight"], state[p + ".lora_down.weight"]
                        rows += (float(state[p + ".alpha"]) / down.shape[0]) * (up @ down)
    return model


def sample(model, channels, seed=0):
    latent = torch.randn(1, channels, 10, 12, generator=torch.Generator().manual_seed(5))
    return sample_one_step(model, latent, conditioning(6, seed=6), seed)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------
# save -> load through the patch node == the weights applied by hand

def test_trained_file_through_patch_node_equals_weights_set_by_hand(env, tmp_path):
    """FLUX.1 (with attention biases) and, where ComfyUI builds it, FLUX.2 (Klein-shaped, none)."""
    W, clear_patch = env
    for family in _families():
        _check_against_hand(W, clear_patch, family, tmp_path)


def _check_against_hand(W, clear_patch, family, tmp_path):
    model, channels = _model(family)
    fingerprint = W.model_fingerprint(model.model.diffusion_model)
    assert fingerprint == f"hidden={H},heads=2,double=2,single=2,bias={int(family == 'flux1')}"
    plain_clear = sample(clear_patch.patch_model(model, W.TRAINING_FREE, 3, 1), channels)
    for fmt in W.TRAINED_FORMATS:
        state = trained_state(W, fingerprint, fmt)
        path = save(W, tmp_path / f"{family}_{fmt}.safetensors", model, state, fmt)
        patched = clear_patch.patch_model(model, path)  # window 3 from the file's metadata
        ref = clear_patch.patch_model(by_hand(W, _model(family)[0], state, fmt), W.TRAINING_FREE, 3, 1)
        out, expected = sample(patched, channels), sample(ref, channels)
        assert rel(out, expected) < 1e-6, (family, fmt, rel(out, expected))
        assert rel(plain_clear, expected) > 1e-2, (family, fmt)  # the trained weights matter
    assert torch.equal(sample(clear_patch.patch_model(model, W.TRAINING_FREE, 3, 1), channels), plain_clear)


def test_lora_file_with_pooling_equals_its_published_layout_equivalent(env, tmp_path):
    """d > 1: a LoRA file with spatial weights samples like a published-layout
    file (the path test_patch.py checks against the oracle) holding base + delta
    written by hand and the same spatial weights."""
    W, clear_patch = env
    model, channels = _model("flux1")
    fingerprint = W.model_fingerprint(model.model.diffusion_model)
    state = trained_state(W, fingerprint, "lora", down_factor=2, seed=4)
    lora_path = save(W, tmp_path / "lora_d2.safetensors", model, state, "lora", window=2, down=2)
    hand = by_hand(W, _model("flux1")[0], state, "lora").model.diffusion_model
    published = {}
    for kind, blocks in (("double", hand.double_blocks), ("single", hand.single_blocks)):
        for i, block in enumerate(blocks):
            fused = block.img_attn.qkv if kind == "double" else block.linear1
            for row, proj in enumerate(("to_q", "to_k", "to_v")):
                published[f"{W.file_prefix(kind, i, proj)}.weight"] = fused.weight[row * H:(row + 1) * H].clone()
                published[f"{W.file_prefix(kind, i, proj)}.bias"] = fused.bias[row * H:(row + 1) * H].clone()
            if kind == "double":
                published[f"{W.file_prefix(kind, i, 'to_out.0')}.weight"] = block.img_attn.proj.weight.clone()
                published[f"{W.file_prefix(kind, i, 'to_out.0')}.bias"] = block.img_attn.proj.bias.clone()
            sw = f"{W._BLOCK_NAMES[kind]}.{i}.attn.processor.spatial_weight"
            published[sw] = state[sw]
    save_file(published, str(tmp_path / "clear_local_2_down_2.safetensors"))
    out = sample(clear_patch.patch_model(model, lora_path), channels)
    expected = sample(clear_patch.patch_model(model, str(tmp_path / "clear_local_2_down_2.safetensors")), channels)
    assert rel(out, expected) < 1e-6, rel(out, expected)
    mean_pooled = sample(clear_patch.patch_model(by_hand(W, _model("flux1")[0], state, "lora"), W.TRAINING_FREE,
                                                 2, 2), channels)
    assert rel(mean_pooled, expected) > 1e-3  # the trained spatial weights are used


# --------------------------------------------------------------------------
# a user's LoRA stacks on a CLEAR LoRA file, in either order

def _effective(patcher, keys):
    with torch.inference_mode():
        patcher.patch_model(device_to=CPU)
        sd = patcher.model.state_dict()
        out = {k: sd[k].clone() for k in keys}
        patcher.unpatch_model(device_to=CPU)
    return out


def test_user_lora_stacks_on_clear_lora_in_either_order(env, tmp_path):
    import comfy.sd

    W, clear_patch = env
    model, channels = _model("flux1")
    fingerprint = W.model_fingerprint(model.model.diffusion_model)
    state = trained_state(W, fingerprint, "lora", seed=8)
    path = save(W, tmp_path / "lora.safetensors", model, state, "lora")

    gen = torch.Generator().manual_seed(9)
    user, deltas = {}, {}
    for module, rows in (("double_blocks.0.img_attn.qkv", 3 * H), ("single_blocks.1.linear1", 7 * H),
                         ("double_blocks.1.img_attn.proj", H)):
        up, down = 0.3 * torch.randn(rows, 2, generator=gen), 0.3 * torch.randn(2, H, generator=gen)
        name = "lora_unet_" + module.replace(".", "_")
        user[f"{name}.lora_up.weight"], user[f"{name}.lora_down.weight"] = up, down
        user[f"{name}.alpha"] = torch.tensor(1.0)
        deltas[f"diffusion_model.{module}.weight"] = 0.8 * (1.0 / 2) * (up @ down)
    user_first = comfy.sd.load_lora_for_models(model, None, user, 0.8, 0)[0]
    assert all(k in user_first.patches for k in deltas)  # ComfyUI really mapped the user's LoRA
    a = clear_patch.patch_model(user_first, path)
    b = comfy.sd.load_lora_for_models(clear_patch.patch_model(model, path), None, user, 0.8, 0)[0]

    clear_only = by_hand(W, _model("flux1")[0], state, "lora").model.state_dict()
    wa, wb = _effective(a, deltas), _effective(b, deltas)
    for key, delta in deltas.items():
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(wa[key], clear_only[key] + delta, rtol=1e-5, atol=1e-6)
        assert delta.abs().mean() > 0.1 * clear_only[key].abs().mean()  # losing either LoRA would fail
    assert rel(sample(a, channels), sample(b, channels)) < 1e-5
    assert model.patches == {}  # the user's model is never mutated


# --------------------------------------------------------------------------
# one clear error for each mismatch

def _resave(path, out, drop=(), replace=None, metadata=None):
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        meta = {**f.metadata(), **(metadata or {})}
    tensors.update(replace or {})
    save_file(tensors, str(out), metadata=meta)
    return str(out)


def test_mismatched_files_raise_one_clear_error(env, tmp_path):
    W, clear_patch = env
    model, _ = _model("flux1")
    fingerprint = W.model_fingerprint(model.model.diffusion_model)
    lora = save(W, tmp_path / "lora.safetensors", model, trained_state(W, fingerprint, "lora"), "lora")
    full = save(W, tmp_path / "full.safetensors", model, trained_state(W, fingerprint, "full"), "full")
    prefix = W.file_prefix("single", 1, "to_k")
    cases = {
        "fingerprint": (lora, make_tiny_flux(depth=3), "trained for a FLUX.1 (dev, schnell, fine-tunes, "
                        "Fill/Depth/Canny) model of shape hidden=256,heads=2,double=2,single=2,bias=1, but this"),
        "family": (_resave(lora, tmp_path / "fam.safetensors", metadata={"clear.family": "flux2"}), model,
                   "trained for a FLUX.2 ([dev] or Klein) model (clear.family=flux2"),
        "missing": (_resave(full, tmp_path / "miss.safetensors", drop={prefix + ".weight"}), model,
                    f"'{prefix}.weight' is missing"),
        "missing lora": (_resave(lora, tmp_path / "miss_l.safetensors", drop={prefix + ".alpha"}), model,
                         f"'{prefix}.alpha' is missing"),
        "rank": (_resave(lora, tmp_path / "rank.safetensors", replace={prefix + ".lora_up.weight": torch.ones(H, 3)}),
                 model, f"'{prefix}' LoRA ranks disagree"),
        "rank metadata": (_resave(lora, tmp_path / "rank_m.safetensors", metadata={"clear.rank": "8"}), model,
                          "ranks disagree"),
        "format": (_resave(full, tmp_path / "fmt.safetensors", metadata={"clear.format": "lora"}), model,
                   "clear.format='lora' but it holds full weights"),
        "bias in lora": (_resave(lora, tmp_path / "bias.safetensors", replace={prefix + ".bias": torch.ones(H)}),
                         model, "key(s) CLEAR LoRA files do not have"),
    }
    for name, (path, target, why) in cases.items():
        clone = target.clone()
        with pytest.raises(W.CLEARWeightsError) as err:
            clear_patch.patch_model(clone, path)
        assert path in str(err.value) and why in str(err.value), f"{name}: {err.value}"
        assert clone.patches == {} and clone.get_attachment(W.ATTACHMENT) is None
    assert W.load_clear_weights(lora, model).format == "lora"  # the originals load


def test_save_refuses_bad_state_before_writing(env, tmp_path):
    W, _ = env
    model, _ = _model("flux1")
    fingerprint = W.model_fingerprint(model.model.diffusion_model)
    good = trained_state(W, fingerprint, "lora")
    path = tmp_path / "x.safetensors"
    some = W.file_prefix("double", 0, "to_out.0")
    cases = {
        "missing": ({k: v for k, v in good.items() if k != some + ".alpha"}, "lora", "missing"),
        "extra": ({**good, some + ".bias": torch.zeros(H)}, "lora", "does not have"),
        "shape": ({**good, some + ".lora_up.weight": torch.zeros(H, 5)}, "lora", "expected (256, 4)"),
        "nan": ({**good, some + ".lora_down.weight": torch.full((4, H), math.nan)}, "lora", "not finite"),
        "alpha": ({**good, some + ".alpha": torch.tensor(3.0)}, "lora", "but alpha = 2.0"),
        "format": (good, "diff", "format must be one of"),
    }
    for name, (state, fmt, why) in cases.items():
        with pytest.raises(ValueError, match=re.escape(why)):
            save(W, path, model, state, fmt)
        assert not path.exists() and list(tmp_path.iterdir()) == [], name
    with pytest.raises(ValueError, match="family must be one of"):
        save(W, path, model, good, "lora", family="FLUX.2")
    with pytest.raises(ValueError, match="not a CLEAR model fingerprint"):
        W.save_trained_weights(str(path), good, fmt="lora", window_size=3, down_factor=1, family="flux1",
                               fingerprint="hidden=256", base_hash="0", steps=1, final_loss=0.1, rank=4, alpha=2.0)


def test_file_of_one_family_is_refused_on_the_other(env, tmp_path):
    """Where ComfyUI builds FLUX.2 (0.33; 0.3.64 cannot: there the FLUX.1 side
    is test_mismatched_files_raise_one_clear_error's "family" case)."""
    W, clear_patch = env
    if "flux2" in _families():
        for family, other in (("flux1", "flux2"), ("flux2", "flux1")):
            _check_refused(W, clear_patch, family, other, tmp_path)


def _check_refused(W, clear_patch, family, other, tmp_path):
    model, _ = _model(family)
    target, _ = _model(other)
    path = save(W, tmp_path / f"{family}.safetensors", model,
                trained_state(W, W.model_fingerprint(model.model.diffusion_model), "lora"), "lora")
    with pytest.raises(W.CLEARWeightsError, match=re.escape(f"trained for a {clear_patch.FAMILIES[family]} model")) as err:
        W.load_clear_weights(path, target)
    assert f"but this is a {clear_patch.FAMILIES[other]} model" in str(err.value)
    if other == "flux1":  # the node loads it: the loader's error
        with pytest.raises(W.CLEARWeightsError, match=re.escape(f"trained for a {clear_patch.FAMILIES[family]}")):
            clear_patch.patch_model(target, path)
    else:  # the node's family check, before loading
        with pytest.raises(clear_patch.CLEARPatchError, match=re.escape(f"is for {clear_patch.FAMILIES[family]} models")):
            clear_patch.patch_model(target, path)
    if other == "flux2":  # a published-layout file (no clear.family) on FLUX.2: the FLUX.1-only refusal
        save_file({"x": torch.zeros(1)}, str(tmp_path / "published_layout.safetensors"))
        with pytest.raises(clear_patch.CLEARPatchError, match="fit FLUX.1 models only"):
            clear_patch.patch_model(target, str(tmp_path / "published_layout.safetensors"))
        proportional = save(W, tmp_path / "own.safetensors", target,
                            trained_state(W, W.model_fingerprint(target.model.diffusion_model), "full"), "full")
        with pytest.raises(clear_patch.CLEARPatchError, match="training length"):
            clear_patch.patch_model(target, proportional, proportional_attention=True)


# --------------------------------------------------------------------------
# metadata, catalogue, base hash

def test_metadata_round_trip_and_catalogue(env, clear_folders, tmp_path):
    W, clear_patch = env
    model, _ = _model("flux1")
    dm = model.model.diffusion_model
    W.register_model_folder()
    folder = clear_folders.get_folder_paths(W.FOLDER)[0]
    state = trained_state(W, W.model_fingerprint(dm), "lora", rank=4, alpha=2.5, down_factor=2)
    path = save(W, f"{folder}/my_klein_clear.safetensors", model, state, "lora", window=5, down=2, alpha=2.5,
                steps=1234, loss=0.03125)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(state)
        assert all(torch.equal(f.get_tensor(k), state[k].float()) for k in state)
    version = meta.pop("clear.trainer")
    assert version.startswith("comfyui-clear ") and len(version) > len("comfyui-clear ")
    assert meta == {"clear.format": "lora", "clear.window_size": "5", "clear.down_factor": "2",
                    "clear.family": "flux1", "clear.fingerprint": "hidden=256,heads=2,double=2,single=2,bias=1",
                    "clear.base_model": W.base_model_hash(model), "clear.steps": "1234",
                    "clear.final_loss": "0.03125", "clear.rank": "4", "clear.alpha": "2.5"}
    clear_folders.filename_list_cache.clear()
    assert "my_klein_clear.safetensors" in W.weight_choices()
    assert W.training_setting("my_klein_clear.safetensors") == (5, 2)
    assert W.file_family("my_klein_clear.safetensors") == "flux1"
    loaded = W.load_clear_weights(W.resolve_weight_file("my_klein_clear.safetensors"), model)
    assert (loaded.format, loaded.family, loaded.down_factor, loaded.metadata["clear.steps"]) == ("lora", "flux1", 2, "1234")
    patched = clear_patch.patch_model(model, "my_klein_clear.safetensors")
    assert patched.get_attachment(W.ATTACHMENT).path == path
    assert not [p for p in tmp_path.rglob("*.tmp")]  # the atomic write left no temporary file


def test_base_model_hash_is_stable_and_sensitive(env):
    W, _ = env
    import comfy.sd

    model = make_tiny_flux(seed=0)
    h = W.base_model_hash(model)
    assert len(h) == 16 and int(h, 16) >= 0
    assert W.base_model_hash(model) == h == W.base_model_hash(make_tiny_flux(seed=0)) == W.base_model_hash(model.clone())
    changed = make_tiny_flux(seed=0)
    with torch.no_grad():
        changed.model.diffusion_model.final_layer.linear.weight[3, 7] += 1e-3
    assert W.base_model_hash(changed) != h
    changed = make_tiny_flux(seed=0)
    with torch.no_grad():
        changed.model.diffusion_model.img_in.weight[0, 0] *= -1
    assert W.base_model_hash(changed) != h
    assert W.base_model_hash(make_tiny_flux(seed=1)) != h
    fp8 = make_tiny_flux(torch.float8_e4m3fn, seed=0)  # hashed through a uint8 view
    assert W.base_model_hash(fp8) == W.base_model_hash(make_tiny_flux(torch.float8_e4m3fn, seed=0)) != h
    # a LoRA on img_in, patched into the loaded model in place, does not change the base hash
    gen = torch.Generator().manual_seed(2)
    lora = {"lora_unet_img_in.lora_up.weight": torch.randn(H, 2, generator=gen),
            "lora_unet_img_in.lora_down.weight": torch.randn(2, 64, generator=gen)}
    with_lora = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0]
    assert "diffusion_model.img_in.weight" in with_lora.patches
    with torch.inference_mode():
        with_lora.patch_model(device_to=CPU)
        try:
            assert W.base_model_hash(with_lora) == h
        finally:
            with_lora.unpatch_model(device_to=CPU)


def test_base_model_hash_of_gguf_quantized_weights(env):
    """A GGUF-quantized weight hashes as its raw quantized blocks."""
    W, _ = env
    from _gguf import import_comfyui_gguf

    ops = import_comfyui_gguf().ops  # skips without gguf / ComfyUI-GGUF
    import gguf

    gen = torch.Generator().manual_seed(0)
    value = torch.randn(64, 64, generator=gen)
    q = gguf.quants.quantize(value.numpy(), gguf.GGMLQuantizationType.Q8_0)
    tensor = ops.GGMLTensor(torch.from_numpy(q), tensor_type=gguf.GGMLQuantizationType.Q8_0, tensor_shape=value.shape)
    data, description = W._raw_bytes(tensor)
    assert data == q.tobytes() and "(64, 64)" in description and "Q8_0" in description
    q2 = q.copy()
    q2.reshape(-1)[5] ^= 1
    tensor2 = ops.GGMLTensor(torch.from_numpy(q2), tensor_type=gguf.GGMLQuantizationType.Q8_0, tensor_shape=value.shape)
    assert W._raw_bytes(tensor2)[0] != data


def test_lora_file_on_a_gguf_model(env, tmp_path):
    """ComfyUI-GGUF applies the CLEAR LoRA patches to its quantized q/k/v rows
    right after dequantizing them: it samples like the float model with the same
    file, within Q8_0's rounding, and far from training-free CLEAR."""
    from _gguf import import_comfyui_gguf, tiny_gguf_flux

    W, clear_patch = env
    plain, _ = tiny_gguf_flux()  # skips without gguf / ComfyUI-GGUF
    quantized = import_comfyui_gguf().nodes.GGUFModelPatcher.clone(plain)  # as its UnetLoaderGGUF does
    dense = make_tiny_flux()
    fingerprint = W.model_fingerprint(dense.model.diffusion_model)
    assert W.model_fingerprint(quantized.model.diffusion_model) == fingerprint
    path = save(W, tmp_path / "lora.safetensors", dense, trained_state(W, fingerprint, "lora", seed=12), "lora")
    latent = torch.randn(1, 16, 10, 12, generator=torch.Generator().manual_seed(5))
    out, expected, plain = (sample_one_step(m, latent, conditioning(6, seed=6), 0, inference_mode=True) for m in (
        clear_patch.patch_model(quantized, path), clear_patch.patch_model(dense, path),
        clear_patch.patch_model(quantized, W.TRAINING_FREE, 3, 1)))
    assert rel(out, expected) < 2e-2, rel(out, expected)
    assert rel(plain, expected) > 10 * rel(out, expected)
