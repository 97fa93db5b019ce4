"""Issue 17 (and 18.3): CLEAR runs in every FLUX block however another
extension rebuilds the forward, or one error names what stopped it. Each
extension is a stand-in written the way the real one works (not its code),
on the tiny FLUX through ComfyUI's real sampling path, compared to the
independent float64 oracle (tests/oracle.py via test_patch._reference_model):

- a cache node's forward_orig built like ComfyUI-TeaCache's FLUX forward:
  blocks called without transformer_options, through patches_replace's
  ``original_block`` and directly; a cache hit that runs no block;
- block patches added after CLEAR (PuLID / IP-adapter pattern): one that
  calls ``original_block`` and adds a residual, one that replaces the block
  and calls ComfyUI's attention with its options (CLEAR runs inside it), one
  that replaces it with attention of its own (one error naming it);
- a Raylight-style stand-in replacing every block's forward and forward_orig,
  its attention not ComfyUI's (one error naming Raylight);
- each with CLEAR alone, CLEAR -> token chunking and token chunking -> CLEAR.
"""

import types
import unittest.mock

import pytest
import torch

from test_patch import _conditioning, _reference_model, _sample, env  # noqa: F401  (env is a fixture)

pytestmark = pytest.mark.comfyui

FILE = "clear_local_3.safetensors"  # radius 3, trained r: tests/test_patch.py's env writes it
LATENT = (12, 10)  # 6x5 token grid: radius 3 masks part of it
GRID = (6, 5)
TEXT = 4
ORDERS = ["clear", "clear_then_chunking", "chunking_then_clear"]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def clear_counts(monkeypatch):
    """Counts the kernel calls CLEAR makes."""
    import comfyui_clear.kernels as kernels

    calls = []
    op = kernels.clear_attention
    monkeypatch.setattr(kernels, "clear_attention", lambda *a, **k: calls.append(1) or op(*a, **k))
    return calls


def _clear(model, order, chunk=8):
    """The CLEAR node, alone or before/after FLUX Token Chunking (chunks of 8 tokens)."""
    from comfyui_clear.nodes import clear_patch, token_chunking

    clear = lambda m: clear_patch.patch_model(m, FILE)  # noqa: E731
    if order == "clear":
        return clear(model)
    if order == "clear_then_chunking":
        return token_chunking.patch_model(clear(model), chunk)
    return clear(token_chunking.patch_model(model, chunk))


def _inputs(seed=0):
    latent = torch.randn(1, 16, *LATENT, generator=torch.Generator().manual_seed(31 + seed))
    return latent, _conditioning(1, TEXT, seed=32 + seed)


def _reference(env, patch=None):
    """The oracle model (CLEAR weights written by hand, dense-masked float64
    attention), with the same extra block patch when one is given."""
    _, flux_tiny, files, _ = env
    ref, calls = _reference_model(flux_tiny, files[FILE], 3, 1, False, 1.0, GRID, TEXT)
    if patch is not None:
        key, make = patch
        ref.set_model_patch_replace(make(ref.get_model_object("diffusion_model")), "dit", *key)
    return ref, calls


# ---------------------------------------------------------------------------
# A cache node's forward, built like ComfyUI-TeaCache's FLUX forward

def _embed(flux, img, img_ids, txt, txt_ids, timesteps, y, guidance):
    """FLUX.1's input embedding (what forward_orig does before the blocks)."""
    from comfy.ldm.flux.layers import timestep_embedding

    img = flux.img_in(img)
    vec = flux.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
    if flux.params.guidance_embed and guidance is not None:
        vec = vec + flux.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
    vec = vec + flux.vector_in(y[:, :flux.params.vec_in_dim])
    return img, flux.txt_in(txt), vec, flux.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))


def cache_style_forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                             transformer_options={}, attn_mask=None, **kwargs):
    """A cache node's forward_orig: the blocks are called without transformer_options,
    through a patches_replace entry's original_block where there is one (unless
    ``direct``), and on a cache hit not at all (the cached residual instead)."""
    state = transformer_options["test_cache"]
    dit = {} if state["direct"] else transformer_options.get("patches_replace", {}).get("dit", {})
    img, txt, vec, pe = _embed(self, img, img_ids, txt, txt_ids, timesteps, y, guidance)
    state["calls"] += 1
    if state["hit_after"] is not None and state["calls"] > state["hit_after"]:
        img = img + state["residual"]
    else:
        start = img.clone()
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in dit:
                def original(args, block=block):
                    out = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                attn_mask=args.get("attn_mask"))
                    return {"img": out[0], "txt": out[1]}
                out = dit[("double_block", i)]({"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask},
                                               {"original_block": original})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask)
        x = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in dit:
                def original(args, block=block):
                    return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"))}
                x = dit[("single_block", i)]({"img": x, "vec": vec, "pe": pe, "attn_mask": attn_mask},
                                             {"original_block": original})["img"]
            else:
                x = block(x, vec=vec, pe=pe, attn_mask=attn_mask)
        img = x[:, txt.shape[1]:]
        state["residual"] = img - start
    return self.final_layer(img, vec)


def cache_node(model, direct=False, hit_after=None):
    """Applied as ComfyUI-TeaCache applies its FLUX forward: a unet function
    wrapper that swaps forward_orig on the live module for each call."""
    m = model.clone()
    flux = m.get_model_object("diffusion_model")
    state = {"direct": direct, "hit_after": hit_after, "calls": 0}

    def unet_wrapper(apply_model, kwargs):
        c = {**kwargs["c"], "transformer_options": {**kwargs["c"]["transformer_options"], "test_cache": state}}
        with unittest.mock.patch.object(flux, "forward_orig", types.MethodType(cache_style_forward_orig, flux)):
            return apply_model(kwargs["input"], kwargs["timestep"], **c)
    m.set_model_unet_function_wrapper(unet_wrapper)
    return m, state


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("direct", [False, True], ids=["original_block", "direct"])
def test_cache_node_forward_without_transformer_options_runs_clear(env, clear_counts, order, direct):
    """Issue 17.1: before, every block ran full attention with CLEAR's weights (9e-2 off)."""
    model = env[1].make_tiny_flux()
    latent, positive = _inputs()
    patched, state = cache_node(_clear(model, order), direct=direct)
    out = _sample(patched, latent, positive)
    ref, _ = _reference(env)
    expected = _sample(ref, latent, positive)
    assert state["calls"] == 1 and len(clear_counts) == 4  # 2 double + 2 single blocks
    assert _rel(out, expected) < 1e-4, _rel(out, expected)
    assert _rel(_sample(model, latent, positive), expected) > 1e-2  # the comparison can fail


def _sample_steps(model, latent, positive, steps):
    import comfy.sample

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
                               denoise=1.0, disable_pbar=True, seed=0)


def test_cache_hit_that_runs_no_block_is_fine(env, clear_counts):
    """A cached step runs no block at all: no CLEAR call, no error."""
    model = env[1].make_tiny_flux()
    latent, positive = _inputs(1)
    patched, state = cache_node(_clear(model, "clear"), hit_after=1)
    assert torch.isfinite(_sample_steps(patched, latent, positive, 3)).all()
    assert state["calls"] == 3 and len(clear_counts) == 4  # blocks ran in the first step only


def test_skipped_blocks_are_fine(env, clear_counts):
    """Block patches that skip their block from the second call on (return its
    inputs, as ComfyUI's Skip Layer Guidance does; a first-block cache on a
    hit): CLEAR in every block that ran, no error."""
    model = env[1].make_tiny_flux()
    latent, positive = _inputs(2)
    patched = _clear(model, "clear")
    calls = []

    def first_block(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    def skip_after_first_call(args, extra):
        return args if len(calls) > 1 else extra["original_block"](args)

    patched.set_model_patch_replace(first_block, "dit", "double_block", 0)
    patched.set_model_patch_replace(skip_after_first_call, "dit", "double_block", 1)
    for i in range(2):
        patched.set_model_patch_replace(skip_after_first_call, "dit", "single_block", i)
    assert torch.isfinite(_sample_steps(patched, latent, positive, 2)).all()
    assert len(calls) == 2 and len(clear_counts) == 4 + 1


def test_easycache_on_the_clear_model(env, clear_counts):
    """ComfyUI's EasyCache (a DIFFUSION_MODEL wrapper that skips whole calls) on
    the CLEAR model: sampling runs, cached steps run no block, no error."""
    from comfy_extras import nodes_easycache

    model = env[1].make_tiny_flux()
    latent, positive = _inputs(3)
    patched = _clear(model, "clear")
    out = nodes_easycache.EasyCacheNode.execute(patched, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0,
                                                verbose=False)
    cached = out.result[0] if hasattr(out, "result") else out[0]
    assert torch.isfinite(_sample_steps(cached, latent, positive, 6)).all()
    assert 0 < len(clear_counts) < 6 * 4 and len(clear_counts) % 4 == 0  # some steps cached, CLEAR in every block run


# ---------------------------------------------------------------------------
# Block patches added after CLEAR

def residual_patch(flux):
    """PuLID / IP-adapter pattern: the original block, plus an identity residual."""
    def identity_residual(args, extra):
        out = extra["original_block"](args)
        return {**out, "img": out["img"] + 0.05 * torch.tanh(out["img"])}
    return identity_residual


def _single_block_by_hand(block, args, options):
    """FLUX.1's single block written out, its attention ComfyUI's with ``options``."""
    from comfy.ldm.flux.math import attention

    x, vec, pe = args["img"], args["vec"], args["pe"]
    mod, _ = block.modulation(vec)
    hidden = block.hidden_size
    qkv, mlp = torch.split(block.linear1((1 + mod.scale) * block.pre_norm(x) + mod.shift),
                           [3 * hidden, block.mlp_hidden_dim], dim=-1)
    q, k, v = qkv.view(x.shape[0], x.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = block.norm(q, k, v)
    attn = attention(q, k, v, pe=pe, transformer_options=options)
    return {"img": x + mod.gate * block.linear2(torch.cat((attn, block.mlp_act(mlp)), 2))}


def replacing_patch(flux):
    """Replaces single block 1 without calling original_block; its attention is
    ComfyUI's, with the options the patch got (so CLEAR runs inside it)."""
    def replaces_block_with_comfy_attention(args, extra):
        out = _single_block_by_hand(flux.single_blocks[1], args, args.get("transformer_options", {}))
        return {"img": out["img"] + 0.05 * torch.tanh(out["img"])}  # and changes it
    return replaces_block_with_comfy_attention


def own_attention_patch(flux):
    """Replaces single block 1 without calling original_block, with attention that
    does not get the options (its own backend): CLEAR cannot run there."""
    def replaces_block_with_own_attention(args, extra):
        return _single_block_by_hand(flux.single_blocks[1], args, {})
    return replaces_block_with_own_attention


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("patch,key", [
    (residual_patch, ("double_block", 0)),
    (replacing_patch, ("single_block", 1)),
], ids=["calls_original_block", "replaces_block"])
def test_block_patch_added_after_clear(env, clear_counts, order, patch, key):
    """Issue 17.1: set_model_patch_replace on the CLEAR model (after it) used to
    overwrite CLEAR's block wrapper: that block ran full attention silently."""
    model = env[1].make_tiny_flux()
    latent, positive = _inputs()
    patched = _clear(model, order).clone()
    patched.set_model_patch_replace(patch(patched.get_model_object("diffusion_model")), "dit", *key)
    out = _sample(patched, latent, positive)
    ref, _ = _reference(env, (key, patch))
    expected = _sample(ref, latent, positive)
    assert len(clear_counts) == 4
    assert _rel(out, expected) < 1e-4, _rel(out, expected)
    without, _ = _reference(env)
    assert _rel(_sample(without, latent, positive), expected) > 1e-3  # the patch matters


@pytest.mark.parametrize("order", ORDERS)
def test_block_patch_with_its_own_attention_is_one_error_naming_it(env, order):
    model = env[1].make_tiny_flux()
    latent, positive = _inputs()
    patched = _clear(model, order).clone()
    patched.set_model_patch_replace(own_attention_patch(patched.get_model_object("diffusion_model")),
                                    "dit", "single_block", 1)
    from comfyui_clear.nodes.clear_patch import CLEARPatchError

    with pytest.raises(CLEARPatchError) as info:
        _sample(patched, latent, positive)
    message = str(info.value)
    assert "1 of 4 FLUX blocks ran without CLEAR attention (single 1)" in message
    assert "own_attention_patch.<locals>.replaces_block_with_own_attention" in message
    assert 'patches_replace["dit"][("single_block", 1)]' in message


# ---------------------------------------------------------------------------
# Raylight-style forward replacement (issue 18.3)

RAYLIGHT_MODULE = "raylight.diffusion_models.flux.xdit_context_parallel"  # where Raylight's FLUX forwards live


def usp_like_double_forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}, **kwargs):
    """Stand-in for a sequence-parallel block forward: the block's computation with
    an attention of its own (here ComfyUI's block without the options, so no
    override reaches its attention, as xfuser's attention is called directly)."""
    return type(self).forward(self, img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options={})


def usp_like_single_forward(self, x, vec, pe, attn_mask=None, transformer_options={}, **kwargs):
    return type(self).forward(self, x, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options={})


def usp_like_dit_forward(self, *args, **kwargs):
    """Stand-in for the sequence-parallel forward_orig (one device: no split)."""
    return type(self).forward_orig(self, *args, **kwargs)


for _f in (usp_like_double_forward, usp_like_single_forward, usp_like_dit_forward):
    _f.__module__ = RAYLIGHT_MODULE  # the guard names an extension by its functions' module, as it would Raylight's


def raylight_like_inject(flux):
    """Replace every block's forward and forward_orig on the live module, as
    Raylight's USP injection does for FLUX (types.MethodType on each block)."""
    for block in flux.double_blocks:
        block.forward = types.MethodType(usp_like_double_forward, block)
    for block in flux.single_blocks:
        block.forward = types.MethodType(usp_like_single_forward, block)
    flux.forward_orig = types.MethodType(usp_like_dit_forward, flux)


def _undo_inject(flux):
    for block in list(flux.double_blocks) + list(flux.single_blocks):
        block.__dict__.pop("forward", None)
    flux.__dict__.pop("forward_orig", None)


def _with_raylight_like(model, order, when):
    """(CLEAR model, live Flux) with the stand-in injected: through an ON_LOAD
    callback as Raylight does (after ComfyUI applied CLEAR's object patches),
    or on the live module before the CLEAR node runs (CLEAR then wraps it)."""
    import comfy.patcher_extension

    flux = model.get_model_object("diffusion_model")
    if when == "before_clear":
        raylight_like_inject(flux)
        return _clear(model, order), flux
    patched = _clear(model, order)
    patched.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD,
                         lambda patcher, *args: raylight_like_inject(patcher.model.diffusion_model))
    return patched, flux


@pytest.mark.parametrize("when", ["on_load", "before_clear"])
def test_raylight_style_forward_is_one_error_naming_raylight(env, when):
    """Issue 18.3: before, every block ran the stand-in's own (full) attention silently."""
    from comfyui_clear.nodes.clear_patch import CLEARPatchError

    model = env[1].make_tiny_flux()
    latent, positive = _inputs()
    patched, flux = _with_raylight_like(model, "clear", when)
    try:
        with pytest.raises(CLEARPatchError) as info:
            _sample(patched, latent, positive)
    finally:
        _undo_inject(flux)
    message = str(info.value)
    assert message.count("ran without CLEAR") == 1 and "4 of 4 FLUX blocks" in message
    assert "This is Raylight" in message and f"{RAYLIGHT_MODULE}.usp_like_double_forward" in message
    assert f"forward_orig is replaced by {RAYLIGHT_MODULE}.usp_like_dit_forward" in message


def test_raylight_style_forward_with_chunking_runs_clear(env, clear_counts):
    """Token chunking computes each block itself with ComfyUI's attention, so
    CLEAR is reachable under the stand-in (one device: no token split) and runs."""
    model = env[1].make_tiny_flux()
    latent, positive = _inputs()
    patched, flux = _with_raylight_like(model, "clear_then_chunking", "on_load")
    try:
        out = _sample(patched, latent, positive)
    finally:
        _undo_inject(flux)
    ref, _ = _reference(env)
    assert len(clear_counts) == 4 and _rel(out, _sample(ref, latent, positive)) < 1e-4


def test_split_tokens_error_names_raylight(env):
    """With a real sequence split each device's block sees a part of the tokens:
    CLEAR's token check fails, and its error names the forward that split them."""
    from comfyui_clear.nodes import clear_patch

    flux = env[1].make_tiny_flux().get_model_object("diffusion_model")
    raylight_like_inject(flux)
    try:
        layer = {"window": 3, "down_factor": 1, "spatial_weight": None, "proportional": False}
        run = clear_patch._Run(flux, (2, (3, 3)), {("double", 0): layer}, None)
        q = torch.randn(1, 2, 6, 8)  # half of 2 + 9 tokens (padded), as one of two devices sees them
        with pytest.raises(clear_patch.CLEARPatchError, match=r"splits tokens.*usp_like_dit_forward.*This is Raylight"):
            clear_patch._clear_attention_override(lambda *a, **k: None, q, q, q, 2, skip_reshape=True,
                                                  transformer_options=run.options({}, "double", 0))
    finally:
        _undo_inject(flux)


# ---------------------------------------------------------------------------
# Whole-block replacements (issue 26.3): an IP-Adapter-Flux-style stand-in.
# ComfyUI-IPAdapter-Flux's node object-patches every block with a module of its
# own (built from the original block's layers; its forward takes the timestep
# ``t`` and no transformer_options, and adds the image prompt's attention) and
# forward_orig with one that calls those blocks (through patches_replace's
# original_block where an entry exists). Written here from that description.

IPA_MODULE = "/home/me/ComfyUI/custom_nodes/ComfyUI-IPAdapter-Flux.flux.layers"  # ComfyUI names a custom node's
# modules by their folder's path


def _image_prompt(x):
    """What the adapter adds to the image stream (stands in for its attention on image-prompt tokens)."""
    return 0.05 * torch.tanh(x)


class DoubleBlockWithImagePrompt(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        for name in ("img_mod", "img_norm1", "img_attn", "img_norm2", "img_mlp", "txt_mod", "txt_norm1", "txt_attn",
                     "txt_norm2", "txt_mlp"):  # the layers it reuses, as attributes of its own
            setattr(self, name, getattr(block, name))
        self.num_heads, self.hidden_size = block.num_heads, block.hidden_size
        self.flipped_img_txt = getattr(block, "flipped_img_txt", False)  # gone from newer ComfyUI
        self.original = block

    def forward(self, img, txt, vec, pe, t, attn_mask=None):
        img, txt = type(self.original).forward(self.original, img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask)
        return img + _image_prompt(img), txt


class SingleBlockWithImagePrompt(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        for name in ("linear1", "linear2", "norm", "pre_norm", "mlp_act", "modulation"):
            setattr(self, name, getattr(block, name))
        self.num_heads, self.hidden_size, self.mlp_hidden_dim = block.num_heads, block.hidden_size, block.mlp_hidden_dim
        self.scale, self.original = block.scale, block

    def forward(self, x, vec, pe, t, attn_mask=None):
        x = type(self.original).forward(self.original, x, vec=vec, pe=pe, attn_mask=attn_mask)
        return x + _image_prompt(x)


def forward_orig_with_image_prompt(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                                   transformer_options={}, attn_mask=None, **kwargs):
    dit = transformer_options.get("patches_replace", {}).get("dit", {})
    img, txt, vec, pe = _embed(self, img, img_ids, txt, txt_ids, timesteps, y, guidance)
    extra = {"vec": vec, "pe": pe, "timesteps": timesteps, "attn_mask": attn_mask}
    for i, block in enumerate(self.double_blocks):
        def run(args, block=block):
            out = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"], t=args["timesteps"],
                        attn_mask=args.get("attn_mask"))
            return {"img": out[0], "txt": out[1]}
        args = {"img": img, "txt": txt, **extra}
        out = dit[("double_block", i)](args, {"original_block": run}) if ("double_block", i) in dit else run(args)
        img, txt = out["img"], out["txt"]
    x = torch.cat((txt, img), 1)
    for i, block in enumerate(self.single_blocks):
        def run(args, block=block):
            return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], t=args["timesteps"],
                                 attn_mask=args.get("attn_mask"))}
        args = {"img": x, **extra}
        key = ("single_block", i)
        x = (dit[key](args, {"original_block": run}) if key in dit else run(args))["img"]
    return self.final_layer(x[:, txt.shape[1]:], vec)


for _c in (DoubleBlockWithImagePrompt, SingleBlockWithImagePrompt, forward_orig_with_image_prompt):
    _c.__module__ = IPA_MODULE


def image_prompt_node(model):
    """The stand-in applied as the IP-Adapter-Flux node applies itself: object
    patches of forward_orig and of every block, on a clone."""
    m = model.clone()
    flux = m.get_model_object("diffusion_model")
    m.add_object_patch("diffusion_model.forward_orig", types.MethodType(forward_orig_with_image_prompt, flux))
    for i, block in enumerate(flux.double_blocks):
        m.add_object_patch(f"diffusion_model.double_blocks.{i}", DoubleBlockWithImagePrompt(block))
    for i, block in enumerate(flux.single_blocks):
        m.add_object_patch(f"diffusion_model.single_blocks.{i}", SingleBlockWithImagePrompt(block))
    return m


@pytest.mark.parametrize("order", ORDERS)
def test_image_prompt_blocks_before_clear_are_refused_when_patching(env, order):
    """Before: the CLEAR node accepted the model and sampling stopped with
    "TypeError: DoubleStreamBlockIPA.forward() got an unexpected keyword
    argument 'transformer_options'"."""
    from comfyui_clear.nodes.clear_patch import CLEARPatchError

    model = image_prompt_node(env[1].make_tiny_flux())
    latent, positive = _inputs()
    assert torch.isfinite(_sample(model, latent, positive)).all()  # the stand-in runs on its own
    with pytest.raises(CLEARPatchError) as info:
        _clear(model, order)
    message = str(info.value)
    assert message.startswith("CLEAR Attention Patch: another node changed this model's blocks")
    assert (f"FLUX blocks double 0, double 1 (2 in all) are replaced by {IPA_MODULE}.DoubleBlockWithImagePrompt "
            "(an object patch of the whole block)") in message
    assert f"single 0, single 1 (2 in all) are replaced by {IPA_MODULE}.SingleBlockWithImagePrompt" in message
    assert message.count("This is ComfyUI-IPAdapter-Flux:") == 1


@pytest.mark.parametrize("order", ORDERS)
def test_image_prompt_blocks_after_clear_are_refused_before_loading(env, order):
    """Before: the guard's error came after sampling with both nodes' object
    patches applied, and ComfyUI's restore (in applying order) then left CLEAR's
    forward on the shared model's blocks: the plain model stopped with "ran
    outside a model call of the CLEAR model" from then on."""
    from comfyui_clear.nodes.clear_patch import CLEARPatchError

    model = env[1].make_tiny_flux()
    latent, positive = _inputs()
    plain = _sample(model, latent, positive)
    patched = image_prompt_node(_clear(model, order))
    with pytest.raises(CLEARPatchError) as info:
        _sample(patched, latent, positive)
    message = str(info.value)
    assert (f"FLUX blocks double 0, double 1 (2 in all) are replaced by {IPA_MODULE}.DoubleBlockWithImagePrompt "
            "(an object patch of the whole block)") in message
    assert message.count("This is ComfyUI-IPAdapter-Flux:") == 1
    assert torch.equal(_sample(model, latent, positive), plain)  # the shared model is as it was


def test_token_chunking_keeps_an_image_prompt_block(env):
    """Token chunking recomputes FLUX blocks from their layers; a block of
    another extension's class runs as it is (before, chunking silently dropped
    the image prompt: the replacement has the same layers)."""
    from comfyui_clear.nodes import token_chunking

    model = image_prompt_node(env[1].make_tiny_flux())
    latent, positive = _inputs()
    want = _sample(model, latent, positive)
    assert torch.equal(_sample(token_chunking.patch_model(model, 8), latent, positive), want)


@pytest.mark.parametrize("order", ["compile_then_clear", "clear_then_compile"])
def test_compiled_blocks_are_refused_with_advice(env, order):
    """Per-block torch.compile as KJNodes' FLUX compile node applies it (object
    patches of every block): refused in either order, before anything compiles."""
    from comfyui_clear.nodes.clear_patch import CLEARPatchError

    def compile_blocks(model):
        m = model.clone()
        flux = m.get_model_object("diffusion_model")
        for kind in ("double", "single"):
            for i, block in enumerate(getattr(flux, f"{kind}_blocks")):
                m.add_object_patch(f"diffusion_model.{kind}_blocks.{i}", torch.compile(block, backend="eager"))
        return m

    model = env[1].make_tiny_flux()
    latent, positive = _inputs()
    with pytest.raises(CLEARPatchError) as info:
        if order == "compile_then_clear":
            _clear(compile_blocks(model), "clear")
        else:
            _sample(compile_blocks(_clear(model, "clear")), latent, positive)
    message = str(info.value)
    assert "(4 in all) are replaced by torch._dynamo.eval_frame.OptimizedModule" in message
    assert "This is torch.compile of single blocks" in message and "TorchCompileModel" in message


def _forward_patch_before_clear(model, forward):
    m = model.clone()
    flux = m.get_model_object("diffusion_model")
    for kind in ("double", "single"):
        for i, block in enumerate(getattr(flux, f"{kind}_blocks")):
            m.add_object_patch(f"diffusion_model.{kind}_blocks.{i}.forward", types.MethodType(forward, block))
    return m


def test_block_forward_patch_before_clear_that_passes_the_options_runs_clear(env, clear_counts):
    """Only the block's forward replaced by an object patch, one that takes and
    passes transformer_options (a PuLID-style forward): CLEAR runs inside it."""
    calls = []

    def counting_forward(self, *args, transformer_options={}, **kwargs):
        calls.append(type(self).__name__)
        return type(self).forward(self, *args, transformer_options=transformer_options, **kwargs)

    model = env[1].make_tiny_flux()
    latent, positive = _inputs()
    out = _sample(_clear(_forward_patch_before_clear(model, counting_forward), "clear"), latent, positive)
    assert len(calls) == 4 and len(clear_counts) == 4
    assert torch.equal(out, _sample(_clear(model, "clear"), latent, positive))


def test_block_forward_patch_before_clear_without_the_options_is_refused_when_patching(env):
    """A replaced forward that takes no transformer_options cannot get CLEAR's
    settings; before, sampling stopped with a bare TypeError."""
    from comfyui_clear.nodes.clear_patch import CLEARPatchError

    def forward_without_options(self, img, txt=None, vec=None, pe=None, attn_mask=None):
        raise AssertionError("never called")

    model = _forward_patch_before_clear(env[1].make_tiny_flux(), forward_without_options)
    with pytest.raises(CLEARPatchError, match=r"FLUX blocks double 0, double 1, single 0, single 1 \(4 in all\) "
                                              r"are run by a replaced forward, test_guard\..*forward_without_options, "
                                              r"which takes no transformer_options"):
        _clear(model, "clear")


# ---------------------------------------------------------------------------
# Still fine

def test_block_outside_a_clear_model_call_is_an_error_not_dense(env):
    """A block of the CLEAR model called with CLEAR's object patches applied but
    outside its model call (bypassing ComfyUI's wrappers) refuses."""
    from comfyui_clear.nodes.clear_patch import CLEARPatchError

    model = env[1].make_tiny_flux()
    patched = _clear(model, "clear")
    patched.patch_model(load_weights=False)
    try:
        flux = patched.model.diffusion_model
        x = torch.randn(1, 9, 256)
        with pytest.raises(CLEARPatchError, match="outside a model call"):
            flux.single_blocks[0](x, vec=torch.randn(1, 256), pe=None)
    finally:
        patched.unpatch_model()
    assert "forward" not in flux.single_blocks[0].__dict__ or \
        flux.single_blocks[0].__dict__["forward"].__func__ is type(flux.single_blocks[0]).forward


@pytest.mark.slow  # dynamo traces the whole model: ~1-4 min on 2 busy cores
@pytest.mark.parametrize("order", ["clear", "clear_then_chunking"])
def test_torch_compile_of_the_clear_model(env, clear_counts, order):
    """ComfyUI-style torch.compile of the whole diffusion model (an object patch,
    eager backend) after CLEAR: the forward patches and the guard trace (graph
    breaks allowed), same result."""
    model = env[1].make_tiny_flux()
    latent, positive = _inputs()
    patched = _clear(model, order)
    want = _sample(patched, latent, positive)
    compiled = patched.clone()
    compiled.add_object_patch("diffusion_model", torch.compile(compiled.get_model_object("diffusion_model"),
                                                               backend="eager"))
    torch._dynamo.reset()
    try:
        got = _sample(compiled, latent, positive)
    finally:
        torch._dynamo.reset()
    assert len(clear_counts) >= 8 and _rel(got, want) < 1e-5
