"""The "CLEAR Attention Patch" node: FLUX model in, CLEAR model out.

Everything goes through ComfyUI's own patch mechanisms on a clone, so the
user's model is never modified:

- weights: the distilled q/k/v/out projections become weight patches placed
  first on each key (``weights.apply_clear_weights``), so LoRAs land on top;
- a DIFFUSION_MODEL wrapper reads the token layout of every call (text length
  from the context, token grid from the latent), refuses inputs CLEAR cannot
  place (reference latents) and opens a per-call ``_Run`` that holds the
  layout, each layer's settings (radius, pooling weights, scale) and the
  guard's counters;
- CLEAR reaches every FLUX block however the forward is rebuilt: an object
  patch on each block's ``forward`` puts the layer's settings into the
  block's ``transformer_options`` (creating them when a caller such as a
  TeaCache-style forward passes none), and the wrapper wraps every
  ``patches_replace["dit"]`` entry of the call, outside any other extension's
  block patch, so a patch added after CLEAR gets them too;
- ``optimized_attention_override`` runs ``clear_attention`` for attention
  calls inside those blocks and hands every other call (ControlNet, other
  models, other extensions) to the attention ComfyUI would have used; the
  wrapper puts it back on top in every call, so a later node's override
  cannot silently replace it;
- the guard: per model call, every FLUX block that ran must have run CLEAR
  attention at least once (integer counters, no device sync); otherwise one
  error names the node that stopped it (a block patch that replaced the
  block, a replaced block forward such as Raylight's) or says
  "N of M blocks ran without CLEAR";
- blocks another node replaced as whole modules (object patches, as
  ComfyUI-IPAdapter-Flux does) are refused: by the node when they come before
  it, by an OUTER_SAMPLE wrapper before ComfyUI applies any patch when they
  come after it (CLEAR's per-block forward patch cannot go inside them);
- RoPE NTK scaling is an object patch of ``diffusion_model.pe_embedder``, built
  from the model's own theta (never from an earlier CLEAR node's).
"""

import contextvars
import functools
import logging
import math
import numbers
import weakref

from .weights import (TRAINING_FREE, apply_clear_weights, file_family, load_clear_weights, remove_clear_weights,
                      resolve_weight_file, training_setting, weight_choices)
from .runtime import CATEGORY, current_band, ui_error, warn_once

log = logging.getLogger(__name__)

WRAPPER_KEY = "comfyui_clear"
RUN_KEY = "clear_run"  # transformer_options entry: this model call's _Run
TRAIN_TOKENS = 64 * 64 + 512  # sequence length FLUX/CLEAR were trained at (1024 px, 512 text tokens)
TRAINING_FREE_DEFAULT = (16, 1)


@ui_error
class CLEARPatchError(ValueError):
    """The model or the inputs cannot run with CLEAR; the message says what to change."""


def attention_scale(head_dim, text_len, grid, down_factor, proportional):
    """1/sqrt(head_dim), or CLEAR's proportional-attention scale for long sequences:
    sqrt(log_{4608}(c * L) / head_dim), L = text + image keys, c = 10 with pooled keys."""
    if not proportional:
        return 1.0 / math.sqrt(head_dim)
    keys = text_len + grid[0] * grid[1]
    c = 10 if down_factor > 1 else 1
    return math.sqrt(math.log(c * keys) / math.log(TRAIN_TOKENS) / head_dim)


# ---------------------------------------------------------------------------
# Run-time hooks (plain functions bound with functools.partial: ComfyUI
# deep-copies model_options when a model is cloned)

# This model call's _Run, for block calls that arrive without transformer_options
# (a TeaCache-style forward_orig drops them). Per thread: ComfyUI's multi-GPU
# worker threads each run their own call.
_RUN = contextvars.ContextVar("comfyui_clear_run", default=None)
# Set by the distillation trainer for its teacher pass: blocks called outside a
# CLEAR model call run their own forward (dense attention) instead of refusing.
_PASS_THROUGH = contextvars.ContextVar("comfyui_clear_pass_through", default=False)


class dense_pass_through:
    """Context manager: CLEAR-patched blocks called outside a CLEAR model call
    run as if unpatched (the trainer's teacher pass on the same loaded model)."""

    def __enter__(self):
        self._token = _PASS_THROUGH.set(True)
        return self

    def __exit__(self, *exc):
        _PASS_THROUGH.reset(self._token)


class _Run:
    """One call of a CLEAR model: where CLEAR's settings come from in every block,
    and the guard's counters (Python integers: nothing waits for the device)."""

    __slots__ = ("flux", "tokens", "layers", "override", "blocks", "clear", "forwards", "slot", "forward_miss",
                 "missed")

    def __init__(self, flux, tokens, layers, override):
        self.flux, self.tokens, self.layers, self.override = flux, tokens, layers, override
        self.blocks = 0      # FLUX blocks that ran
        self.clear = 0       # attention calls that ran CLEAR
        self.forwards = 0    # calls of CLEAR's block-forward patch
        self.slot = None     # the patches_replace block running now: (kind, index)
        self.forward_miss = None  # a replaced block forward that ran no CLEAR inside the current slot
        self.missed = []     # (kind, index, what stopped CLEAR or None)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):  # options copied inside the call keep counting here (and never copy the model)
        return self

    def block(self, kind, index):
        return (self.flux.double_blocks if kind == "double" else self.flux.single_blocks)[index]

    def options(self, options, kind, index):
        """A block's transformer_options (or none) with this layer's CLEAR settings."""
        options = dict(options or {})
        options["clear_layer"] = self.layers[(kind, index)]
        options["clear_tokens"] = self.tokens
        options[RUN_KEY] = self
        current = options.get("optimized_attention_override")
        if current is None:
            options["optimized_attention_override"] = self.override
        elif not _is_clear_override(current):  # set by something inside this call
            options["optimized_attention_override"] = _override_on_top(options)
        return options

    def ran(self, kind, index, before, culprit):
        """Count one block; it missed CLEAR if no CLEAR attention ran since ``before``."""
        self.blocks += 1
        if self.clear == before:
            self.missed.append((kind, index, culprit))


def _layout_wrapper(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                    transformer_options={}, *, clear_layers=None, **kwargs):
    """DIFFUSION_MODEL wrapper: record [text | image grid] of this call, give
    every block CLEAR's settings, and check afterwards that CLEAR ran in each."""
    if ref_latents:
        raise CLEARPatchError(
            "CLEAR does not support reference latents (FLUX Kontext-style image inputs): their tokens sit "
            "outside the image grid. Use the model without the CLEAR Attention Patch for Kontext edits.")
    flux = executor.class_obj
    p = flux.patch_size
    grid = ((x.shape[-2] + p // 2) // p, (x.shape[-1] + p // 2) // p)  # as Flux.process_img pads
    tokens = (context.shape[1], grid)
    override = _override_on_top(transformer_options)
    run = _Run(flux, tokens, clear_layers or {}, override)
    transformer_options = {**transformer_options, "clear_tokens": tokens, RUN_KEY: run,
                           "optimized_attention_override": override,
                           "patches_replace": _guarded_block_patches(transformer_options, run)}
    token = _RUN.set(run)
    try:
        out = executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
    finally:
        _RUN.reset(token)
    if run.missed:  # a cache hit that ran no block at all is fine
        raise CLEARPatchError(_guard_message(run))
    return out


def _guarded_block_patches(transformer_options, run):
    """This call's patches_replace, with every FLUX block's entry wrapped by
    _guard_block (outermost: block patches added after CLEAR sit inside it)."""
    patches_replace = dict(transformer_options.get("patches_replace") or {})
    dit = patches_replace.get("dit") or {}
    guarded = dict(dit)
    for kind, index in run.layers:
        key = (f"{kind}_block", index)
        guarded[key] = functools.partial(_guard_block, run=run, kind=kind, index=index, inner=dit.get(key))
    patches_replace["dit"] = guarded
    return patches_replace


def _guard_block(args, extra, *, run, kind, index, inner=None):
    """patches_replace["dit"] entry of one call: run the block (and any other
    extension's patch of it) with this layer's CLEAR settings, and count it.
    A patch that replaces the block still runs CLEAR if it calls ComfyUI's
    attention with the options it got; otherwise the guard names it."""
    original = extra["original_block"]
    called = []

    def original_block(block_args):
        called.append(True)
        return original(block_args)

    args = {**args, "transformer_options": run.options(args.get("transformer_options"), kind, index)}
    outer, run.slot, run.forward_miss = run.slot, (kind, index), None
    before, forwards = run.clear, run.forwards
    try:
        if inner is None:
            out = original_block(args)
        else:
            out = inner(args, {**extra, "original_block": original_block})
    finally:
        run.slot = outer
    culprit = None
    if run.clear == before:
        if not called and isinstance(out, dict) and out.get("img") is args["img"]:
            return out  # skipped: the block's inputs come back (Skip Layer Guidance); nothing ran
        if inner is not None and not called:
            culprit = (f"the block patch {_name(inner)} (patches_replace[\"dit\"][(\"{kind}_block\", {index})]) "
                       "replaces the block without calling original_block, and without ComfyUI's attention")
        elif run.forward_miss:
            culprit = run.forward_miss
        elif called and run.forwards == forwards:  # CLEAR's forward patch was replaced after it was applied
            live = getattr(_live_block(run, kind, index), "__dict__", {}).get("forward")
            if live is not None:
                culprit = _replaced_forward(live)
    run.ran(kind, index, before, culprit)
    return out


def _live_block(run, kind, index):
    try:
        return run.block(kind, index)
    except (AttributeError, IndexError, TypeError):  # another extension rebuilt the block list
        return None


def _clear_forward(*args, clear_block, clear_previous=None, clear_bound=True, clear_module=None, **kwargs):
    """Object patch of a FLUX block's ``forward``: the block runs with its CLEAR
    settings however it is called (with or without transformer_options).
    ``clear_previous``: the forward it replaced when that was not the class's
    own (called with the block first when ``clear_bound``). The block is this
    call's (ComfyUI's multi-GPU clones reuse object patches on their own copy of
    the model); ``clear_module``, a weak reference to the block patched, when
    another extension moved the blocks."""
    kind, index = clear_block
    options = kwargs.get("transformer_options")
    run = (options.get(RUN_KEY) if options else None) or _RUN.get()
    if run is None and _PASS_THROUGH.get():
        block = clear_module() if clear_module is not None else None
        if clear_previous is None:
            return type(block).forward(block, *args, **kwargs)
        return clear_previous(block, *args, **kwargs) if clear_bound else clear_previous(*args, **kwargs)
    if run is None:
        raise CLEARPatchError(
            f"CLEAR: FLUX {kind} block {index} ran outside a model call of the CLEAR model: something calls the "
            "model's forward or blocks directly, bypassing ComfyUI's model wrappers, so CLEAR cannot place "
            "its tokens. Remove that node or the CLEAR Attention Patch.")
    block = _live_block(run, kind, index)
    if getattr(getattr(block, "__dict__", {}).get("forward"), "keywords", {}).get("clear_block") != clear_block:
        block = clear_module() if clear_module is not None else None  # not this call's model: the patched one
        if block is None:
            raise CLEARPatchError(f"CLEAR: cannot find FLUX {kind} block {index} of this model call: another "
                                  "node rebuilt the model's blocks. Remove that node or the CLEAR Attention Patch.")
    kwargs["transformer_options"] = run.options(options, kind, index)
    before = run.clear
    run.forwards += 1
    if clear_previous is None:
        out = type(block).forward(block, *args, **kwargs)
    elif clear_bound:
        out = clear_previous(block, *args, **kwargs)
    else:
        out = clear_previous(*args, **kwargs)
    culprit = None if clear_previous is None else _replaced_forward(clear_previous)
    if run.slot is None:
        run.ran(kind, index, before, culprit)
    elif run.clear == before:
        run.forward_miss = culprit
    return out


def _name(obj):
    """module.qualname of a function, method, partial or callable object."""
    obj = getattr(obj, "__func__", obj)
    while isinstance(obj, functools.partial):
        obj = obj.func
    module = getattr(obj, "__module__", None) or type(obj).__module__
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{qualname}"


def _replaced_forward(forward):
    return f"the block's forward is replaced by {_name(forward)}, which does not run ComfyUI's attention"


# Extensions known to replace FLUX's forward or blocks (matched in module names), and what to do
_KNOWN_EXTENSIONS = {
    ("raylight",): ("Raylight", "its sequence-parallel (xDiT Ulysses/ring) attention runs instead of ComfyUI's "
                                "and cannot run CLEAR's local mask; run this model without Raylight's sequence "
                                "parallelism, or without the CLEAR Attention Patch"),
    ("ipadapter-flux", "ipadapter_flux"): (
        "ComfyUI-IPAdapter-Flux", "its blocks (and its forward_orig) call attention without the options CLEAR's "
                                  "settings travel in, and add the image prompt's own attention, so CLEAR's local "
                                  "attention cannot run inside them, in either order; use IP-Adapter-Flux on the "
                                  "model without the CLEAR Attention Patch"),
    ("torch._dynamo.eval_frame.optimizedmodule",): (
        "torch.compile of single blocks (e.g. KJNodes' FLUX compile node)", "compile the whole diffusion model "
        "after the CLEAR Attention Patch instead (ComfyUI's TorchCompileModel), which keeps CLEAR's patches"),
}


def _forward_orig_note(flux):
    """'; the model's forward_orig is replaced by X' where another extension did so."""
    forward_orig = getattr(flux, "__dict__", {}).get("forward_orig")
    if forward_orig is None or getattr(forward_orig, "__func__", None) is type(flux).forward_orig:
        return ""
    return f" (the model's forward_orig is replaced by {_name(forward_orig)})"


def _with_known_extensions(message):
    text = message.lower()
    for keys, (name, advice) in _KNOWN_EXTENSIONS.items():
        if any(key in text for key in keys):
            message += f" This is {name}: {advice}."
    return message


def _guard_message(run):
    where = ", ".join(f"{kind} {index}" for kind, index, _ in run.missed[:8]) + (", ..." if len(run.missed) > 8 else "")
    culprits = list(dict.fromkeys(c for _, _, c in run.missed if c))
    message = (f"CLEAR: {len(run.missed)} of {run.blocks} FLUX blocks ran without CLEAR attention ({where})"
               + _forward_orig_note(run.flux))
    if culprits:
        message += ": " + "; ".join(culprits)
    return _with_known_extensions(
        message + ". With CLEAR's weights but not its attention the image would silently differ, so sampling "
        "stops. Remove the node that replaces these blocks, or use the model without the CLEAR Attention Patch.")


def _fit_to_grid(window, down_factor, spatial_weight, grid):
    """(window, down_factor, spatial_weight) clamped to the token grid, computing
    the same attention: a radius past the grid's diagonal already sees the whole
    grid, and a pooling block larger than the grid is one edge-padded block whose
    padding offsets (copies of the last real row/column) fold into the last
    offset's weight. Keeps huge inputs from overflowing or taking minutes."""
    h, w = grid
    window = min(window, math.isqrt((h - 1) ** 2 + (w - 1) ** 2) + 1)
    n = max(h, w, 2)  # >= 2: a pooled key stays a pooled key on a 1x1 grid
    if down_factor <= n:
        return window, down_factor, spatial_weight
    import torch

    if spatial_weight is None:  # mean pooling, without building a d x d matrix for a huge d
        share = torch.tensor([1 / down_factor] * (n - 1) + [(down_factor - n + 1) / down_factor],
                             dtype=torch.float64)  # Python int division: exact enough for any d
        folded = torch.outer(share, share)
    else:
        sw = spatial_weight.reshape(down_factor, down_factor).double()
        sw = torch.cat([sw[:n - 1], sw[n - 1:].sum(0, keepdim=True)])
        folded = torch.cat([sw[:, :n - 1], sw[:, n - 1:].sum(1, keepdim=True)], 1)
    return window, n, folded.float()


def _clear_attention_override(func, *args, previous=None, **kwargs):
    """optimized_attention_override: CLEAR inside our blocks, ``func`` elsewhere."""
    options = kwargs.get("transformer_options") or {}
    layer = options.get("clear_layer")
    tokens = options.get("clear_tokens")
    if layer is None or tokens is None:
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    from ..kernels import clear_attention

    run = options.get(RUN_KEY)
    if run is not None:
        run.clear += 1  # the guard's count
    q, k, v, heads = args[:4]
    text_len, grid = tokens
    if kwargs.get("mask") is not None:
        raise CLEARPatchError("CLEAR cannot combine its local attention with an attention mask from the "
                              "conditioning; remove the mask or the CLEAR Attention Patch.")
    if not kwargs.get("skip_reshape", False):  # (B, L, H*D) -> (B, H, L, D)
        b, _, inner = q.shape
        q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    band = current_band()  # a band worker of the CLEAR Multi-GPU Split: this call holds its rows only
    if band is not None:
        text_len, grid = band.text_len, band.grid
    if q.shape[2] != (band.tokens if band is not None else text_len + grid[0] * grid[1]):
        raise CLEARPatchError(_with_known_extensions(
            f"CLEAR expected {text_len} text + {grid[0]}x{grid[1]} image tokens in a FLUX block but got "
            f"{q.shape[2]}: another node adds or splits tokens (e.g. reference images, IP-Adapter-style tokens, "
            "sequence parallelism), which CLEAR's local mask cannot place"
            + _forward_orig_note(run.flux if run is not None else None)
            + ". Remove that node or the CLEAR Attention Patch."))
    scale = attention_scale(q.shape[-1], text_len, grid, layer["down_factor"], layer["proportional"])
    spatial_weight = layer["spatial_weight"]
    if isinstance(spatial_weight, _Shared):
        spatial_weight = spatial_weight.tensor
    window, down, spatial_weight = _fit_to_grid(layer["window"], layer["down_factor"], spatial_weight, grid)
    out = (clear_attention if band is None else band.attention)(q, k, v, text_len=text_len, grid=grid, window=window,
                                                                down_factor=down, spatial_weight=spatial_weight,
                                                                scale=scale)
    if kwargs.get("skip_output_reshape", False):
        return out
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


def _is_clear_override(obj):
    return isinstance(obj, functools.partial) and obj.func is _clear_attention_override


def _override_on_top(transformer_options):
    """CLEAR's attention override, on top of whatever override this call carries.

    Another node that sets ``optimized_attention_override`` without chaining
    (another attention backend, Sage-style patches), or that puts itself back
    on top at every step (ComfyUI's Model Sparse Attention, which may sit
    before or after CLEAR), would otherwise turn CLEAR off silently while its
    distilled weights stay: re-installed here on every model call, CLEAR takes
    its calls and the other override keeps the rest. The warning names the
    other override; where its node sits, CLEAR cannot tell."""
    current = transformer_options.get("optimized_attention_override")
    if _is_clear_override(current):
        return current
    if current is None:
        warn_once("CLEAR: another node removed CLEAR's attention override from this model; CLEAR re-installs it: "
                  "the FLUX blocks run CLEAR attention.")
    else:
        other = _name(current)
        warn_once(f"CLEAR: another attention override ({other}) is on this model without keeping CLEAR's; CLEAR "
                  f"puts its own back on top: the FLUX blocks run CLEAR attention and every other attention call "
                  f"goes to {other}.")
    return functools.partial(_clear_attention_override, previous=current)


def _unwrap(obj, func):
    """The chain below a previous patch made by ``func``: a second node of the
    same kind (CLEAR, token chunking) replaces the first instead of stacking."""
    while isinstance(obj, functools.partial) and obj.func is func:
        obj = obj.keywords.get("previous")
    return obj


# ---------------------------------------------------------------------------
# Patching

FAMILIES = {  # models built on ComfyUI's comfy.ldm.flux.model.Flux -> how users know them
    "flux1": "FLUX.1 (dev, schnell, fine-tunes, Fill/Depth/Canny)",
    "flux2": "FLUX.2 ([dev] or Klein)",
    "longcat": "LongCat-Image",
    "ovis": "Ovis-Image",
}


def flux_family(diffusion_model):
    """Which FLUX-class model this is, from its FluxParams (ComfyUI 0.33 builds
    FLUX.2, Klein, LongCat-Image and Ovis from the same class; fields an older
    ComfyUI lacks mean FLUX.1)."""
    params = diffusion_model.params
    if getattr(params, "global_modulation", False):  # FLUX.2 and Klein: shared modulation, no biases
        return "flux2"
    if getattr(params, "yak_mlp", False) or getattr(params, "txt_norm", False):
        return "ovis"
    if list(getattr(params, "txt_ids_dims", None) or []):  # text tokens with positions: LongCat-Image
        return "longcat"
    return "flux1"


def _flux_model(model):
    import comfy.ldm.flux.model

    diffusion_model = model.get_model_object("diffusion_model")
    if not isinstance(diffusion_model, comfy.ldm.flux.model.Flux):
        raise CLEARPatchError(
            f"CLEAR Attention Patch needs a FLUX-class model ({', '.join(FAMILIES.values())}); "
            f"got {type(diffusion_model).__name__}, which it does not support (Chroma, SD3 and other DiTs "
            "place their tokens differently). Connect the output of a FLUX model loader.")
    return diffusion_model


class _Shared:
    """A tensor held by reference through ComfyUI's deep copies of model_options
    (a trainer's parameter must stay the one the optimiser updates)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _check_family(family, weights, proportional_attention):
    """CLEAR beyond FLUX.1: training-free, or a file CLEAR Distill trained for
    this family (its ``clear.family``; load_clear_weights then checks the exact
    shape). The published files are FLUX.1's; proportional attention uses
    FLUX.1's training length."""
    if family == "flux1":
        return  # a file trained for another family: load_clear_weights names both
    name = FAMILIES[family]
    if weights != TRAINING_FREE:
        trained_for = file_family(weights)
        if trained_for != family:
            what = (f"'{weights}' is for {FAMILIES.get(trained_for, trained_for)} models"
                    if trained_for is not None else f"'{weights}' is not a file on disk")
            raise CLEARPatchError(
                f"The published CLEAR weight files fit FLUX.1 models only ({FAMILIES['flux1']}: 19 double + "
                f"38 single blocks, width 3072); this is a {name} model, with other layers, and {what}. Pick a "
                f"file CLEAR Distill trained for this model, or set weights to '{TRAINING_FREE}' to run CLEAR "
                "attention on its own weights.")
    if proportional_attention:
        raise CLEARPatchError(
            f"proportional_attention scales by FLUX.1's training length ({TRAIN_TOKENS} tokens), not "
            f"{name}'s; turn it off for this model.")


def _checked_inputs(weights, window_size, down_factor, proportional_attention, rope_ntk_factor):
    """The node's inputs, type- and range-checked (ComfyUI checks widget values,
    but not values linked from other nodes nor calls from Python). Radius and
    pooling size have no upper bound: at run time they are clamped to what the
    token grid can use, which changes nothing in the result."""
    if not isinstance(weights, str):
        raise CLEARPatchError(f"weights must be a file name from models/clear or '{TRAINING_FREE}', "
                              f"got {type(weights).__name__} {weights!r}")

    def integer(name, value):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise CLEARPatchError(f"{name} must be a whole number >= 0 (0 = the weights' setting), got {value!r}")
        return int(value)

    if not isinstance(proportional_attention, bool):
        raise CLEARPatchError(f"proportional_attention must be True or False, got {proportional_attention!r}")
    factor = math.nan
    if isinstance(rope_ntk_factor, numbers.Real) and not isinstance(rope_ntk_factor, bool):
        try:
            factor = float(rope_ntk_factor)
        except OverflowError:  # an int past float's range
            factor = math.inf
    if not (math.isfinite(factor) and factor >= 1.0):
        raise CLEARPatchError(f"rope_ntk_factor must be a finite number >= 1.0 (1.0 = off), got {rope_ntk_factor!r}")
    return (weights, integer("window_size", window_size), integer("down_factor", down_factor),
            proportional_attention, factor)


def _base_pe_embedder(model):
    """(embedder, theta) that NTK scaling starts from: never a CLEAR-scaled one, so
    factors do not compound. The live module may still hold another clone's
    object patch after sampling; get_model_object returns this patcher's own
    object patch, else the unpatched original ComfyUI keeps while patched."""
    embedder = model.get_model_object("diffusion_model.pe_embedder")
    return embedder, getattr(embedder, "clear_base_theta", embedder.theta)  # an earlier CLEAR node's: its base


def _settings(weights, window_size, down_factor, file_down_factor, path=None):
    """(window, down_factor) to run with; 0 means what the file was trained with."""
    trained = TRAINING_FREE_DEFAULT if weights == TRAINING_FREE else training_setting(weights)
    if trained is not None and min(trained) < 1:
        raise CLEARPatchError(
            f"CLEAR weight file '{path or weights}': its name or safetensors metadata says it was trained with "
            f"window_size={trained[0]}, down_factor={trained[1]}, but both must be >= 1. Fix the name "
            "(clear_local_<r>[_down_<d>]) or the metadata, or pick another file.")
    if trained is None:
        if window_size == 0:
            raise CLEARPatchError(
                f"The radius CLEAR file '{weights}' was trained with is unknown (its name is not "
                "clear_local_<r>[_down_<d>] and it has no window_size metadata): set window_size.")
        trained = (window_size, file_down_factor)
    window = window_size or trained[0]
    down = down_factor or (file_down_factor if weights != TRAINING_FREE else trained[1])
    if weights != TRAINING_FREE and (window, down) != (trained[0], file_down_factor):
        warn_once(f"CLEAR: '{weights}' was trained with window_size={trained[0]}, down_factor={file_down_factor}; "
                  f"running it with window_size={window}, down_factor={down} (quality may drop).")
    return window, down


def _forward_patch(current, block, where):
    """CLEAR's object patch for a block's ``forward``, over ``current`` (what
    get_model_object returns: the class's own bound method, an earlier CLEAR
    node's patch, which this one replaces, or another extension's forward).
    Holds no bound method of the live block (only a weak reference): ComfyUI's
    multi-GPU clones reuse object patches on their own copy of the model, and
    the block is looked up in each call's model."""
    if isinstance(current, functools.partial) and current.func is _clear_forward:
        previous, bound = current.keywords.get("clear_previous"), current.keywords.get("clear_bound", True)
    elif getattr(current, "__self__", None) is block:
        previous, bound = current.__func__, True
        if previous is type(block).forward:
            previous = None
    else:
        previous, bound = current, False
    return functools.partial(_clear_forward, clear_block=where, clear_previous=previous, clear_bound=bound,
                             clear_module=weakref.ref(block))


def _takes_options(forward):
    """Whether ``forward`` can be called with transformer_options (a parameter
    of that name or **kwargs); True where Python cannot tell."""
    import inspect

    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "transformer_options" or p.kind is p.VAR_KEYWORD for p in parameters)


def _replaced_blocks(model, diffusion_model):
    """{what: ["double 0", ...]} for the FLUX blocks that ``model``'s object
    patches replace as whole modules (or as the block list), as
    ComfyUI-IPAdapter-Flux and per-block compile nodes do. CLEAR cannot run
    inside them: its patch of ``<block>.forward`` would land on the replacement
    (before CLEAR) or stay on the original block (after CLEAR), and ComfyUI,
    which restores object patches in the order it applied them, would then
    leave one block's forward on the other."""
    refused = {}
    for kind, blocks in (("double", diffusion_model.double_blocks), ("single", diffusion_model.single_blocks)):
        list_key = f"diffusion_model.{kind}_blocks"
        for i in range(len(blocks)):
            key = f"{list_key}.{i}"
            replacement = model.object_patches.get(key, model.object_patches.get(list_key))
            if replacement is not None:
                what = (f"replaced by {_name(type(replacement))} (an object patch of the whole "
                        f"{'block' if key in model.object_patches else 'block list'})")
                refused.setdefault(what, []).append(f"{kind} {i}")
    return refused


def _refusal(refused):
    details = "; ".join(f"FLUX blocks {', '.join(names[:4])}{', ...' if len(names) > 4 else ''} "
                        f"({len(names)} in all) are {what}" for what, names in refused.items())
    return CLEARPatchError(_with_known_extensions(
        f"CLEAR Attention Patch: another node changed this model's blocks in a way CLEAR cannot run inside: "
        f"{details}.") + " Remove that node, or use the model without the CLEAR Attention Patch.")


def _block_forward_patches(model, diffusion_model):
    """[(key, CLEAR's object patch)] for every FLUX block's ``forward``; or one
    CLEARPatchError naming what another node put in place of blocks before
    CLEAR where CLEAR cannot run inside: whole blocks (_replaced_blocks), or a
    block forward replaced (by an object patch or on the module) by one that
    takes no transformer_options, which CLEAR's settings reach attention in.
    A replaced forward that takes them is chained: CLEAR runs inside it, and
    the guard checks in every call that it did."""
    refused = _replaced_blocks(model, diffusion_model)
    patches = []
    for kind, blocks in (("double", diffusion_model.double_blocks), ("single", diffusion_model.single_blocks)):
        for i in range(len(blocks)):
            key = f"diffusion_model.{kind}_blocks.{i}.forward"
            patch = _forward_patch(model.get_model_object(key), blocks[i], (kind, i))
            previous = patch.keywords["clear_previous"]
            if previous is None or _takes_options(previous):
                patches.append((key, patch))
            elif not any(f"{kind} {i}" in names for names in refused.values()):
                what = (f"run by a replaced forward, {_name(previous)}, which takes no transformer_options "
                        "(what CLEAR's settings reach attention in)")
                refused.setdefault(what, []).append(f"{kind} {i}")
    if refused:
        raise _refusal(refused)
    return patches


def _sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: before ComfyUI loads and patches the model, refuse
    blocks replaced by a node after CLEAR (as _block_forward_patches does for
    nodes before it): once applied with CLEAR's patches, ComfyUI's restore
    would leave the models it shares broken."""
    patcher = executor.class_obj.model_patcher
    refused = _replaced_blocks(patcher, patcher.get_model_object("diffusion_model"))
    if refused:
        raise _refusal(refused)
    return executor(*args, **kwargs)


def patch_model(model, weights="clear_local_16.safetensors", window_size=0, down_factor=0,
                proportional_attention=False, rope_ntk_factor=1.0, spatial_weights=None):
    """Return a clone of ``model`` (a ComfyUI ModelPatcher of FLUX) running CLEAR.
    ``spatial_weights``: {(kind, index): tensor} pooling weights that override
    the file's (the trainer's parameters; held by reference, not copied)."""
    weights, window_size, down_factor, proportional_attention, rope_ntk_factor = _checked_inputs(
        weights, window_size, down_factor, proportional_attention, rope_ntk_factor)
    diffusion_model = _flux_model(model)
    _check_family(flux_family(diffusion_model), weights, proportional_attention)
    forward_patches = _block_forward_patches(model, diffusion_model)

    clear_weights = None
    file_down = 1
    if weights != TRAINING_FREE:
        clear_weights = load_clear_weights(resolve_weight_file(weights), model)  # validates, no side effects
        file_down = clear_weights.down_factor
    window, down = _settings(weights, window_size, down_factor, file_down,
                             clear_weights.path if clear_weights is not None else None)

    m = model.clone()
    if clear_weights is None:
        remove_clear_weights(m)  # an earlier CLEAR node's file: training-free replaces it too
    else:
        apply_clear_weights(m, clear_weights)
        if down > 1 and file_down == 1:
            warn_once(f"CLEAR: '{weights}' has no pooling weights; down_factor={down} uses mean pooling.")
        elif down == 1 and file_down > 1:
            warn_once(f"CLEAR: down_factor=1 ignores the pooling weights of '{weights}'.")

    def layer(kind, index):
        sw = None
        if clear_weights is not None and down == file_down:
            sw = clear_weights.spatial_weights.get((kind, index))
        if spatial_weights is not None and (kind, index) in spatial_weights:
            sw = _Shared(spatial_weights[(kind, index)])
        return {"window": window, "down_factor": down, "spatial_weight": sw, "proportional": proportional_attention}

    layers = {(kind, i): layer(kind, i) for kind, blocks in (("double", diffusion_model.double_blocks),
                                                             ("single", diffusion_model.single_blocks))
              for i in range(len(blocks))}
    for key, forward in forward_patches:
        m.add_object_patch(key, forward)
    options = m.model_options.setdefault("transformer_options", {})
    previous = _unwrap(options.get("optimized_attention_override"), _clear_attention_override)
    options["optimized_attention_override"] = functools.partial(_clear_attention_override, previous=previous)

    import comfy.patcher_extension
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                           functools.partial(_layout_wrapper, clear_layers=layers)),
                          (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, _sample_wrapper)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)

    if rope_ntk_factor != 1.0:
        from comfy.ldm.flux.layers import EmbedND
        base, base_theta = _base_pe_embedder(model)
        if not math.isfinite(base_theta * rope_ntk_factor):
            raise CLEARPatchError(f"rope_ntk_factor={rope_ntk_factor:g} makes the rotary base infinite; "
                                  "the high-resolution recipe uses 10")
        embedder = EmbedND(dim=base.dim, theta=base_theta * rope_ntk_factor, axes_dim=list(base.axes_dim))
        embedder.clear_ntk_factor = rope_ntk_factor
        embedder.clear_base_theta = base_theta
        m.add_object_patch("diffusion_model.pe_embedder", embedder)
    elif hasattr(m.object_patches.get("diffusion_model.pe_embedder"), "clear_ntk_factor"):
        del m.object_patches["diffusion_model.pe_embedder"]  # an earlier CLEAR node's NTK patch
    log.info("CLEAR: %s, window_size=%d, down_factor=%d, proportional_attention=%s, rope_ntk_factor=%g",
             weights, window, down, proportional_attention, rope_ntk_factor)
    return m


# ---------------------------------------------------------------------------
# The node

class CLEARAttentionPatch:
    DESCRIPTION = (
        "Makes every attention layer of a FLUX.1 model run CLEAR local attention: each image token attends "
        "to the image tokens within a radius (in 16 px tokens), to all text tokens, and in the _down_4 variants "
        "to a pooled copy of the image. Loads the distilled CLEAR weights (downloaded from the Hugging Face Hub "
        "into models/clear on first use) as weight patches, so LoRAs stack in either order. For 2K-8K images; "
        "a ControlNet's own attention stays full (its weights were not distilled for CLEAR).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with CLEAR local attention in every FLUX block (and the distilled weights, "
                       "if chosen). Connect it to the sampler, LoRA loaders or the other CLEAR nodes.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX.1 model (dev, schnell, fine-tunes, Fill/Depth/Canny), or another "
                                           "FLUX-class model (FLUX.2, Klein) with training-free CLEAR or weights "
                                           "CLEAR Distill trained for it."}),
            "weights": (weight_choices(), {
                "default": "clear_local_16.safetensors",
                "tooltip": "Distilled CLEAR weights from models/clear (the published files download on first "
                           "use). clear_local_<r>: radius r; _down_4: plus 4x4 pooled tokens. Files CLEAR "
                           "Distill trained are listed too (for FLUX.2/Klein only those trained for it). "
                           "'none (training-free)' keeps the model's own weights."}),
            "window_size": ("INT", {
                "default": 0, "min": 0, "max": 256,
                "tooltip": "Radius r in tokens (1 token = 16 px). 0 = the radius the weights were trained "
                           "with (training-free: 16)."}),
            "down_factor": ("INT", {
                "default": 0, "min": 0, "max": 16,
                "tooltip": "Pool d x d blocks of image tokens into extra keys every token sees. 0 = the "
                           "weights' setting (training-free: 1 = off)."}),
            "proportional_attention": ("BOOLEAN", {
                "default": False,
                "tooltip": "Scale attention logits with the token count (CLEAR's high-resolution recipe; "
                           "on for 4K-8K)."}),
            "rope_ntk_factor": ("FLOAT", {
                "default": 1.0, "min": 1.0, "max": 100.0, "step": 0.1,
                "tooltip": "Multiply the rotary position base (NTK scaling). 1.0 = off; the high-resolution "
                           "recipe uses 10."}),
        }}

    def patch(self, model, weights, window_size, down_factor, proportional_attention, rope_ntk_factor):
        return (patch_model(model, weights, window_size, down_factor, proportional_attention, rope_ntk_factor),)


NODE_CLASS_MAPPINGS = {"CLEARAttentionPatch": CLEARAttentionPatch}
NODE_DISPLAY_NAME_MAPPINGS = {"CLEARAttentionPatch": "CLEAR Attention Patch"}
