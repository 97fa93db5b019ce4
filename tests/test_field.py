"""Field-test failures of issue 10, each reproduced through ComfyUI's real
sampling path on the tiny FLUX (tests/flux_tiny.py): re-runs after changing a
setting, chained CLEAR nodes, later attention overrides, odd weight files and
out-of-range inputs."""

import logging
import math

import pytest
import torch

from test_patch import _conditioning, _sample, env  # noqa: F401  (env is a fixture)
from test_weights import W  # noqa: F401  (fixture; clear_folders is in conftest)

pytestmark = pytest.mark.comfyui

FREE = "none (training-free)"


@pytest.fixture(scope="module")
def tiny(env):
    """One tiny FLUX for tests that only patch (patching never modifies it)."""
    return env[1].make_tiny_flux()


def _record_theta(patcher, seen):
    """Record the rotary base FLUX really uses in each call of ``patcher``."""
    import comfy.patcher_extension

    def wrapper(executor, *args, **kwargs):
        seen.append(executor.class_obj.pe_embedder.theta)
        return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_theta", wrapper)
    return patcher


@pytest.mark.parametrize("order", ["A B", "A B A", "B A base B", "A A2 A", "A chainB"])
def test_rope_ntk_factor_never_compounds(env, order):
    """Issue 10.1: every clone runs with the model's theta x its own factor, however
    often the node runs (fresh clones after a setting change) and in any order."""
    clear_patch, flux_tiny, _, _ = env
    model = flux_tiny.make_tiny_flux()
    base = model.get_model_object("diffusion_model.pe_embedder").theta
    latent = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(1))
    positive = _conditioning(1, 3, seed=2)
    node = clear_patch.CLEARAttentionPatch()
    factors = {"A": 4.0, "A2": 4.0, "B": 10.0, "chainB": 10.0, "base": 1.0}
    made = {}
    for name in order.split():
        if name == "base":
            patched = model
        elif name.startswith("chain"):  # a second CLEAR node after the last one
            (patched,) = node.patch(last, FREE, 2, 0, False, factors[name])
        else:  # the node runs again on the user's model, e.g. after a setting changed
            (patched,) = node.patch(model, FREE, 2, 0, False, factors[name])
        made[name] = last = patched
        seen = []
        _sample(_record_theta(patched.clone(), seen), latent, positive)
        assert seen and set(seen) == {base * factors[name]}, (name, seen)
    assert model.get_model_object("diffusion_model.pe_embedder").theta == base


@pytest.mark.parametrize("first_file,down", [("clear_local_3.safetensors", 1), ("clear_local_2_down_2.safetensors", 2)])
def test_training_free_after_a_file_drops_the_file_weights(env, first_file, down):
    """Issue 10.2: CLEAR(file) -> CLEAR(training-free) is exactly CLEAR(training-free):
    no weight patches, no attachment, no pooling weights of the file, even when
    the first model was sampled (and so is still loaded with its weights)."""
    from comfyui_clear.nodes import weights

    clear_patch, flux_tiny, _, _ = env
    model = flux_tiny.make_tiny_flux()
    latent = torch.randn(1, 16, 10, 8, generator=torch.Generator().manual_seed(3))
    positive = _conditioning(1, 4, seed=4)
    node = clear_patch.CLEARAttentionPatch()
    (first,) = node.patch(model, first_file, 0, 0, False, 1.0)
    with_file = _sample(first, latent, positive)
    (second,) = node.patch(first, FREE, 2, down, False, 1.0)
    (direct,) = node.patch(model, FREE, 2, down, False, 1.0)
    assert not second.patches and second.get_attachment(weights.ATTACHMENT) is None
    out = _sample(second, latent, positive)
    expected = _sample(direct, latent, positive)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6), (out - expected).abs().max()
    assert not torch.allclose(out, with_file, rtol=1e-3, atol=1e-3)  # the comparison can fail


def _other_override(calls):
    def sage_like_override(func, *args, **kwargs):  # a later attention node that does not chain
        calls.append(args[0].shape)
        return func(*args, **kwargs)
    return sage_like_override


def _plain_block(args, extra):
    """A dit block patch of another extension (IP-adapter style): the block, plus
    one attention call of its own (image queries on a few extra tokens) through
    ComfyUI's attention, with the options minus CLEAR's layer marker: a call
    that is not CLEAR's to take."""
    from comfy.ldm.modules.attention import optimized_attention

    out = extra["original_block"](args)
    options = {k: v for k, v in args["transformer_options"].items() if k != "clear_layer"}
    img = out["img"]
    tokens = img[:, :3]
    return {**out, "img": img + 0.1 * optimized_attention(img, tokens, tokens, 2, transformer_options=options)}


def test_a_later_attention_override_does_not_turn_clear_off(env, caplog, monkeypatch):
    """Issue 10.3: a node after CLEAR that sets optimized_attention_override without
    chaining: CLEAR still runs in its blocks, the other override gets every other
    attention call, and the log says so once."""
    clear_patch, flux_tiny, _, _ = env
    from comfyui_clear.nodes import runtime

    monkeypatch.setattr(runtime, "_warned", set())
    model = flux_tiny.make_tiny_flux()
    latent = torch.randn(1, 16, 10, 10, generator=torch.Generator().manual_seed(5))
    positive = _conditioning(1, 4, seed=6)
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_3.safetensors", 0, 0, False, 1.0)
    patched.set_model_patch_replace(_plain_block, "dit", "single_block", 1)
    expected = _sample(patched, latent, positive)

    calls = []
    later = patched.clone()
    later.model_options["transformer_options"]["optimized_attention_override"] = _other_override(calls)
    with caplog.at_level(logging.WARNING):
        out = _sample(later, latent, positive)
        _sample(later, latent, positive)
    assert torch.equal(out, expected)
    assert len(calls) == 2  # the patch's own attention call, in each of the two runs
    assert len([r for r in caplog.records if "sage_like_override" in r.getMessage()]) == 1

    import comfy.patcher_extension

    dense = later.clone()  # the same chain with CLEAR's override really gone is not the same image
    dense.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, clear_patch.WRAPPER_KEY)
    for key in [k for k in dense.object_patches if k.endswith(".forward")]:
        del dense.object_patches[key]
    assert not torch.allclose(_sample(dense, latent, positive), expected, rtol=1e-3, atol=1e-3)


def _override_node_before_clear(model):
    """(model, name of its override) with an attention override that puts itself
    back on top of whatever is on the hook at every step, applied before CLEAR:
    ComfyUI's Model Sparse Attention where core has it (0.36+, the flux038
    overlay; dense here: the tiny sequences are under min_tokens), else a
    stand-in doing the same from a DIFFUSION_MODEL wrapper."""
    try:
        from comfy_extras import nodes_sparse_attention as sparse
    except ImportError:
        sparse = None
    if sparse is not None:
        return sparse.apply_block_sparse_attention(
            model, tau=1.3, topk_ratio=0.0, vsa=False, start_percent=0.0, end_percent=1.0, min_tokens=1 << 20,
            dense_blocks=set(), sink_conditioning="off", extra_tokens=0, verbose=False), \
            "comfy_extras.nodes_sparse_attention.make_attention_override.<locals>.override"
    import comfy.patcher_extension

    def on_top_every_call(previous):
        def reinstalled_override(func, *args, **kwargs):
            return func(*args, **kwargs) if previous is None else previous(func, *args, **kwargs)
        return reinstalled_override

    def wrapper(executor, *args, **kwargs):
        options = args[7] if len(args) > 7 else kwargs["transformer_options"]
        options["optimized_attention_override"] = on_top_every_call(options.get("optimized_attention_override"))
        return executor(*args, **kwargs)

    m = model.clone()
    options = m.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = on_top_every_call(options.get("optimized_attention_override"))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_override", wrapper)
    return m, "test_field._override_node_before_clear.<locals>.on_top_every_call.<locals>.reinstalled_override"


def test_override_node_before_clear_warning_names_it_without_a_side(env, caplog, monkeypatch):
    """Issue 26.7: an override node before CLEAR that re-installs itself every
    step (core's Model Sparse Attention) was reported as "a node after the
    CLEAR Attention Patch". The warning names the other override and says
    nothing of where it sits; CLEAR still runs in its blocks."""
    clear_patch, flux_tiny, _, _ = env
    from comfyui_clear.nodes import runtime

    monkeypatch.setattr(runtime, "_warned", set())
    model = flux_tiny.make_tiny_flux()
    latent = torch.randn(1, 16, 10, 10, generator=torch.Generator().manual_seed(5))
    positive = _conditioning(1, 4, seed=6)
    before, name = _override_node_before_clear(model)
    (patched,) = clear_patch.CLEARAttentionPatch().patch(before, "clear_local_3.safetensors", 0, 0, False, 1.0)
    (alone,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_3.safetensors", 0, 0, False, 1.0)
    with caplog.at_level(logging.WARNING):
        out = _sample(patched, latent, positive)
    assert torch.equal(out, _sample(alone, latent, positive))
    (line,) = [r.getMessage() for r in caplog.records if "attention override" in r.getMessage()]
    assert f"another attention override ({name}) is on this model" in line, line
    words = line.replace(name, "")
    assert "after" not in words and "before" not in words


def _attention_backend_node(model):
    """ComfyUI's own "Model Attention Backend" node (0.33+) with PyTorch
    attention; on a ComfyUI without it, what it does: a clone whose
    optimized_attention_override is PyTorch attention, not chained."""
    import comfy.ldm.modules.attention as attention
    import comfy_extras.nodes_model_advanced as advanced

    if hasattr(advanced, "ModelAttentionBackend"):
        return advanced.ModelAttentionBackend().patch(model, "pytorch attention")[0]
    m = model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = (
        lambda func, *args, **kwargs: attention.attention_pytorch(*args, **kwargs))
    return m


def test_comfyui_attention_backend_node_after_clear_keeps_clear(env):
    """ComfyUI's "Model Attention Backend" node placed after CLEAR replaces the
    override without chaining: the image stays CLEAR's."""
    clear_patch, flux_tiny, _, _ = env
    model = flux_tiny.make_tiny_flux()
    latent = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(7))
    positive = _conditioning(1, 5, seed=8)
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, "clear_local_3.safetensors", 0, 0, False, 1.0)
    backend = _attention_backend_node(patched)
    assert not clear_patch._is_clear_override(backend.model_options["transformer_options"]["optimized_attention_override"])
    assert torch.equal(_sample(backend, latent, positive), _sample(patched, latent, positive))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_float8_clear_file_loads_and_matches_the_reference(env, fp8, tmp_path):
    """Issue 10.5: a CLEAR file saved in float8 loads (isfinite has no float8
    kernel) and samples exactly like the reference with the same fp8 values."""
    from test_patch import _reference_model

    clear_patch, flux_tiny, _, folder = env
    name = f"clear_local_3_{str(fp8).split('_')[-1]}.safetensors"
    sd = flux_tiny.write_clear_file(folder / name, seed=21, dtype=fp8, hidden=256, depth=2, depth_single=2)
    model = flux_tiny.make_tiny_flux()
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, name, 0, 0, False, 1.0)
    latent = torch.randn(1, 16, 8, 10, generator=torch.Generator().manual_seed(9))
    positive = _conditioning(1, 3, seed=10)
    ref, calls = _reference_model(flux_tiny, {k: v.float() for k, v in sd.items()}, 3, 1, False, 1.0, (4, 5), 3)
    out, expected = _sample(patched, latent, positive), _sample(ref, latent, positive)
    assert calls[0] > 0 and ((out - expected).norm() / expected.norm()).item() < 1e-4


def test_float8_clear_file_with_nan_gets_the_usual_error(env, tmp_path):
    from comfyui_clear.nodes import weights

    clear_patch, flux_tiny, _, _ = env
    sd = flux_tiny.clear_state_dict(seed=22, dtype=torch.float32)
    sd["transformer_blocks.1.attn.to_q.weight"][5, 6] = float("nan")
    path = tmp_path / "clear_local_3_nan.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, str(path))
    with pytest.raises(weights.CLEARWeightsError, match=r"clear_local_3_nan.*to_q.weight' is not finite"):
        clear_patch.CLEARAttentionPatch().patch(flux_tiny.make_tiny_flux(), str(path), 0, 0, False, 1.0)


@pytest.mark.parametrize("name,metadata", [
    ("clear_local_0.safetensors", None),
    ("clear_local_4_down_0.safetensors", None),
    ("distilled_meta_zero.safetensors", {"window_size": "0"}),
    ("distilled_meta_negative.safetensors", {"window_size": "-4"}),
    ("distilled_meta_down_zero.safetensors", {"clear.window_size": "8", "clear.down_factor": "0"}),
])
@pytest.mark.parametrize("window_size", [0, 5])
def test_file_trained_with_a_radius_below_one_is_refused_at_patch_time(env, tiny, name, metadata, window_size):
    """Issue 10.6: one error naming the file, at patch time (not when sampling),
    whether or not the user overrides the radius."""
    from safetensors.torch import save_file

    clear_patch, flux_tiny, _, folder = env
    save_file(flux_tiny.clear_state_dict(seed=23), str(folder / name), metadata=metadata)
    with pytest.raises(clear_patch.CLEARPatchError, match=rf"{name}.*must be >= 1"):
        clear_patch.CLEARAttentionPatch().patch(tiny, name, window_size, 0, False, 1.0)


@pytest.mark.parametrize("inputs,name", [
    (dict(weights=None), "weights"),
    (dict(weights=3), "weights"),
    (dict(window_size=2.5), "window_size"),
    (dict(window_size=True), "window_size"),
    (dict(window_size=-1), "window_size"),
    (dict(window_size=float("nan")), "window_size"),
    (dict(window_size=float("inf")), "window_size"),
    (dict(window_size="8"), "window_size"),
    (dict(down_factor=None), "down_factor"),
    (dict(down_factor=1.5), "down_factor"),
    (dict(down_factor=False), "down_factor"),
    (dict(down_factor=-2), "down_factor"),
    (dict(proportional_attention=1), "proportional_attention"),
    (dict(proportional_attention="false"), "proportional_attention"),
    (dict(proportional_attention=None), "proportional_attention"),
    (dict(rope_ntk_factor=float("nan")), "rope_ntk_factor"),
    (dict(rope_ntk_factor=float("inf")), "rope_ntk_factor"),
    (dict(rope_ntk_factor=0.5), "rope_ntk_factor"),
    (dict(rope_ntk_factor=True), "rope_ntk_factor"),
    (dict(rope_ntk_factor="10"), "rope_ntk_factor"),
    (dict(rope_ntk_factor=1e305), "rope_ntk_factor"),  # theta 1e4 * 1e305 = inf
    (dict(rope_ntk_factor=10 ** 400), "rope_ntk_factor"),  # past float: OverflowError before
])
def test_bad_inputs_fail_at_patch_time_naming_the_input(env, tiny, inputs, name):
    """Issue 10.7: every input is checked when the node runs, not when sampling."""
    clear_patch = env[0]
    args = dict(weights=FREE, window_size=4, down_factor=0, proportional_attention=False, rope_ntk_factor=1.0)
    with pytest.raises(clear_patch.CLEARPatchError, match=name):
        clear_patch.patch_model(tiny, **{**args, **inputs})


def test_whole_number_floats_are_accepted(env, tiny):
    clear_patch = env[0]
    patched = clear_patch.patch_model(tiny, FREE, 4.0, 2.0, False, 4)
    import comfy.patcher_extension

    wrapper = patched.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL][clear_patch.WRAPPER_KEY][0]
    layer = wrapper.keywords["clear_layers"][("double", 0)]
    assert (layer["window"], layer["down_factor"]) == (4, 2) and type(layer["window"]) is int


@pytest.mark.parametrize("latent_hw,window,down", [
    ((10, 8), 10 ** 10, 0),  # a radius far past the grid (OverflowError before) = full image attention
    ((14, 12), 0, 40),       # 7x6 grid, pooling blocks much larger than the grid
    ((6, 4), 2, 9),          # 3x2 grid
])
def test_huge_window_and_down_factor_match_the_definition(env, latent_hw, window, down):
    """Issues 10.7 and 10.8: sizes beyond the grid give exactly what CLEAR defines
    (dense float64 oracle: full-grid window; one edge-padded pooled block)."""
    from test_patch import _reference_model

    clear_patch, flux_tiny, files, _ = env
    name = "clear_local_3.safetensors"
    model = flux_tiny.make_tiny_flux()
    (patched,) = clear_patch.CLEARAttentionPatch().patch(model, name, window, down, False, 1.0)
    grid = ((latent_hw[0] + 1) // 2, (latent_hw[1] + 1) // 2)
    latent = torch.randn(1, 16, *latent_hw, generator=torch.Generator().manual_seed(11))
    positive = _conditioning(1, 3, seed=12)
    ref, calls = _reference_model(flux_tiny, files[name], window or 3, down or 1, False, 1.0, grid, 3)
    out, expected = _sample(patched, latent, positive), _sample(ref, latent, positive)
    assert calls[0] > 0 and ((out - expected).norm() / expected.norm()).item() < 1e-4


@pytest.mark.parametrize("down", [1000, 10 ** 10, 10 ** 400], ids=["1000", "1e10", "1e400"])
def test_huge_down_factor_is_fast(env, tiny, down, monkeypatch):
    """Issue 10.8: down_factor=1000 on a 7x6 grid took 28 s; the kernel now gets
    a block (and radius) no larger than the grid needs, for any Python int."""
    import time

    import comfyui_clear.kernels as kernels

    clear_patch = env[0]
    seen = []
    op = kernels.clear_attention
    monkeypatch.setattr(kernels, "clear_attention",
                        lambda *a, **k: seen.append((k["window"], k["down_factor"])) or op(*a, **k))
    (patched,) = clear_patch.CLEARAttentionPatch().patch(tiny, FREE, down, down, False, 1.0)
    latent = torch.randn(1, 16, 14, 12, generator=torch.Generator().manual_seed(13))
    start = time.perf_counter()
    out = _sample(patched, latent, _conditioning(1, 3, seed=14))
    assert torch.isfinite(out).all() and time.perf_counter() - start < 10
    assert seen and set(seen) == {(8, 7)}  # radius 8 > sqrt(6^2 + 5^2) already sees the whole 7x6 grid


@pytest.mark.parametrize("grid,down", [((7, 6), 9), ((7, 6), 40), ((1, 1), 5), ((3, 8), 13), ((2, 2), 3)])
@pytest.mark.parametrize("mean", [True, False])
def test_pooling_clamp_equals_the_kernels_own_edge_padding(env, grid, down, mean):
    """The folded block the node passes for d > grid pools exactly like the
    kernel's edge padding with the original d (the op docs/attention.md defines)."""
    from comfyui_clear.kernels import pool_image_tokens

    clear_patch = env[0]
    gen = torch.Generator().manual_seed(down)
    x = torch.randn(2, 3, grid[0] * grid[1], 8, generator=gen, dtype=torch.float64)
    sw = None if mean else torch.rand(down, down, generator=gen)
    window, d, folded = clear_patch._fit_to_grid(10 ** 12, down, sw, grid)
    assert d == max(*grid, 2) and window == math.isqrt((grid[0] - 1) ** 2 + (grid[1] - 1) ** 2) + 1
    expected = pool_image_tokens(x, grid, down, sw)
    assert torch.allclose(pool_image_tokens(x, grid, d, folded.double()), expected, rtol=1e-6, atol=1e-7)


def test_dangling_symlinks_are_not_offered(W, clear_folders, tmp_path):
    """Issue 10 (also): a symlink in models/clear whose target is gone (an
    unmounted drive, a deleted download) is not in the weights dropdown."""
    import os

    folder = tmp_path / "models" / "clear"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "target.safetensors").write_bytes(b"x")
    (folder / "real.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "target.safetensors", folder / "linked.safetensors")
    os.symlink(tmp_path / "gone.safetensors", folder / "dangling.safetensors")
    os.symlink(tmp_path / "gone.safetensors", folder / "sub" / "dangling2.safetensors")
    os.symlink(tmp_path / "gone.safetensors", folder / "clear_local_8.safetensors")  # published: still offered
    choices = W.weight_choices()
    assert sorted(choices[len(W.PUBLISHED):-1]) == ["linked.safetensors", "real.safetensors"]
    assert "clear_local_8.safetensors" in choices


def test_replacing_clear_keeps_a_lora(env):
    """A second CLEAR node (training-free or another file) removes only the first
    one's weights: a LoRA loaded before or after the first stays applied (either
    order gives the same patch lists: CLEAR's patches first, then the LoRA's)."""
    import comfy.sd

    from test_weights import make_lora

    clear_patch, flux_tiny, _, _ = env
    node = clear_patch.CLEARAttentionPatch()
    model = flux_tiny.make_tiny_flux()

    def lora(m):
        return comfy.sd.load_lora_for_models(m, None, make_lora()[0], 1.0, 0)[0]

    latent = torch.randn(1, 16, 10, 12, generator=torch.Generator().manual_seed(15))
    positive = _conditioning(1, 4, seed=16)
    first = lora(node.patch(model, "clear_local_3.safetensors", 0, 0, False, 1.0)[0])
    _sample(first, latent, positive)
    for weights, window in ((FREE, 3), ("clear_local_2_down_2.safetensors", 0)):
        (chained,) = node.patch(first, weights, window, 0, False, 1.0)
        (direct,) = node.patch(lora(model), weights, window, 0, False, 1.0)
        out, expected = _sample(chained, latent, positive), _sample(direct, latent, positive)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6), weights
    (no_lora,) = node.patch(model, weights, window, 0, False, 1.0)
    assert not torch.allclose(out, _sample(no_lora, latent, positive), rtol=1e-3, atol=1e-3)


def test_read_only_clear_folder_hint_names_extra_model_paths(tmp_path, monkeypatch):
    """Issue 17.4: with models/clear read-only the error told the user to save the
    file into that same folder; it names a `clear:` entry in extra_model_paths.yaml."""
    import os

    from comfyui_clear.nodes import hub

    folder = tmp_path / "models" / "clear"
    folder.mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(hub.os, "access", lambda path, mode: False if str(path) == str(folder) else access(path, mode))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.CLEARDownloadError) as info:
        hub.download_published("clear_local_8.safetensors", str(folder))
    message = str(info.value)
    assert f"{folder} is read-only" in message and "`clear:` entry" in message and "extra_model_paths.yaml" in message
    writable = tmp_path / "writable"
    with pytest.raises(hub.CLEARDownloadError) as info:
        hub.download_published("clear_local_8.safetensors", str(writable))  # missing, its parent writable
    assert "read-only" not in str(info.value) and str(writable / "clear_local_8.safetensors") in str(info.value)
