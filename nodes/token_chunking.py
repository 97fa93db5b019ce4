"""The "FLUX Token Chunking (CLEAR)" node: exact token-chunked FLUX blocks.

Only attention needs every token at once; a FLUX block's modulation, norms,
linear layers and MLP act on each token alone. A chunked block therefore runs
in two passes over token chunks around one attention call over the whole
sequence, and computes what ComfyUI's block computes (up to float rounding):

1. per chunk: norm, modulation, q/k/v projection, QK norm, RoPE, written into
   whole-sequence q, k, v (and, in a single block, the MLP half of linear2);
2. ``comfy.ldm.flux.math.attention`` on the whole sequence, with the block's
   ``transformer_options`` (so CLEAR's and other attention overrides apply);
3. per chunk: output projection, residual, MLP (double block), residual.

What stays alive over the whole sequence is x, q, k, v and the attention output
(and one L x hidden partial in a single block), not the 7x-wide linear1 output,
the GELU activations and their concatenation.

Each Linear layer is cast, dequantized (fp8, GGUF) and patched (LoRA in low-VRAM
mode) once per block call, and the chunks reuse that weight; a streamed weight
left in ComfyUI's reused cast buffer is copied out first (``_held``).

Hooked in with ``patches_replace["dit"]`` wrappers that chain with any earlier
wrapper of the block, and a DIFFUSION_MODEL wrapper that hands the blocks their
modules through this call's ``transformer_options`` (model_options are
deep-copied by ComfyUI). The CLEAR Attention Patch, in either node order, wraps
these per call and gives them its settings in the options.
"""

import contextlib
import functools
import logging
import math
import numbers

from .clear_patch import _unwrap
from .runtime import CATEGORY, ui_error, warn_once

log = logging.getLogger(__name__)

WRAPPER_KEY = "comfyui_clear_token_chunking"
MODEL_KEY = "clear_chunking_model"  # transformer_options entry: the Flux module of this call
UNCHUNKED_KEY = "clear_chunking_unchunked"  # transformer_options entry: {why: block kinds} run unchunked this call
MIN_CHUNK = 256  # smallest auto chunk
TEXT_TOKENS = 512


@ui_error
class TokenChunkingError(ValueError):
    """The model cannot be chunked; the message says what to change."""


# ---------------------------------------------------------------------------
# Memory model: the bytes a FLUX block allocates besides its inputs, counted
# from the tensors its code holds at each point (h = hidden, m = MLP width,
# L = all tokens, N = image tokens, c = chunk). ComfyUI 0.33's own block when
# chunk is None (0.3.64 frees less and peaks higher). RoPE upcasts q and k to
# float32 one at a time: r = the float32 copy and product of one, in units of
# h (none in float32). The auto chunk size and bench/ use the same numbers.

def pooled_kv_bytes(tokens, batch=1, text=TEXT_TOKENS, down_factor=1, h=3072, grid=None):
    """Bytes CLEAR's pooled keys and values take during attention (down_factor
    d > 1): two float32 (B, H, ceil(gh/d)*ceil(gw/d), D) tensors, H*D = h
    (``kernels.reference.pooling_bytes``; pooling reads x through strided
    views, so that is all it allocates on a GPU). ``grid`` (gh, gw) defaults
    to the square grid of the image tokens."""
    if down_factor <= 1:
        return 0
    from ..kernels.reference import pooled_grid

    if grid is None:
        side = math.isqrt(max(tokens - text, 0))
        grid = (side, -(-(tokens - text) // side) if side else 0)
    hp, wp = pooled_grid(grid, down_factor)
    return 2 * batch * hp * wp * h * 4


def block_activation_bytes(kind, tokens, itemsize=2, chunk=None, batch=1, text=TEXT_TOKENS, h=3072, m=12288,
                           down_factor=1, grid=None):
    """Peak bytes of one "double"/"single" block over ``tokens`` (text + image)
    tokens of ``itemsize`` bytes, unchunked (chunk None) or in chunks of ``chunk``;
    with CLEAR's pooled keys (``down_factor`` > 1 over ``grid``) held during attention."""
    L, N = tokens, tokens - text
    # pooled keys/values during the attention call, in units of one activation value
    a = pooled_kv_bytes(tokens, batch, text, down_factor, h, grid) / (batch * itemsize)
    chunk = None if chunk is not None and chunk >= tokens else chunk  # one chunk runs ComfyUI's block
    r = 0 if itemsize >= 4 else 2 * 4 // itemsize * h
    if chunk is None and kind == "single":
        lin1 = 3 * h + m
        peak = max(L * (lin1 + 2 * h + h + r),        # roping k: linear1 out, normed q/k, roped q
                   L * (lin1 + 2 * h + 2 * h + 2 * h) + a,  # attention: + roped q/k, output and its reshape
                   L * (lin1 + h + m),                  # GELU while the linear1 output is still held
                   L * (h + m + (h + m) + h))           # linear2 on [attention | GELU]
    elif chunk is None:
        peak = max(L * (3 * h + 3 * h),                 # q/k/v concatenated while the qkv outputs live
                   L * (3 * h + h + r),                 # roping k
                   L * (3 * h + 2 * h + 2 * h) + a,     # attention: q/k/v, roped q/k, output + reshape
                   L * h + N * (h + 2 * m))             # image MLP: modulated input, fc1, GELU
    elif kind == "single":
        c, lin1 = chunk, 3 * h + m
        peak = max(L * 4 * h + c * max(lin1 + 4 * h, lin1 + 3 * h + r, lin1 + m),  # q/k/v + MLP partial
                   L * 6 * h + a,                                                  # attention + output
                   L * 2 * h + c * 3 * h)                                          # output pass
    else:
        c = chunk
        peak = max(L * 3 * h + c * (6 * h + max(2 * h, h + r)),  # q/k/v + one chunk's projection, norms, RoPE
                   L * 5 * h + a,                                # attention + output
                   L * h + c * (2 * h + 2 * m))                  # output pass: residual, MLP
    return int(batch * itemsize * peak)


def chunk_tokens_for(kind, tokens, batch, itemsize, free_bytes, text=TEXT_TOKENS, h=3072, m=12288, margin=1.25,
                     down_factor=1, grid=None):
    """Chunk size as ComfyUI sizes its split attention: halve the chunk until the
    block's modelled peak fits the free memory. ``tokens`` = no chunking needed."""
    steps = 1
    while steps < tokens and margin * block_activation_bytes(
            kind, tokens, itemsize, -(-tokens // steps) if steps > 1 else None, batch, text, h, m,
            down_factor, grid) > free_bytes:
        steps *= 2
    return tokens if steps == 1 else max(MIN_CHUNK, -(-tokens // steps))


# ---------------------------------------------------------------------------
# Compatibility seam: a Linear layer's weight as its own forward would use it,
# cast once. Layers whose forward this cannot reproduce exactly are called per
# chunk (their own code, so still exact per token).

class _Linear:
    """``self(x)`` applies ``layer`` to a chunk; ``cols`` restricts to input
    columns (linear2 split into its attention and MLP halves)."""

    def __init__(self, layer, weight=None, bias=None):
        self.layer, self.weight, self.bias = layer, weight, bias
        self.materialized = weight is not None

    def __call__(self, x, cols=None, with_bias=True):
        import torch

        if not self.materialized:
            return self.layer(x)
        w = self.weight if cols is None else self.weight[:, cols]
        return torch.nn.functional.linear(x, w, self.bias if with_bias else None)


@contextlib.contextmanager
def _cast_once(layer, x):
    import comfy.ops
    import torch

    base = comfy.ops.disable_weight_init.Linear
    cls = type(layer)
    patched = bool(getattr(layer, "weight_function", None) or getattr(layer, "bias_function", None))
    needs_cast = patched or getattr(layer, "comfy_cast_weights", False)
    gguf = getattr(layer, "is_ggml_quantized", None)
    if cls.forward is torch.nn.Linear.forward or (cls.forward is base.forward and not needs_cast):
        yield _Linear(layer, layer.weight, layer.bias)  # used as stored
    elif cls.forward is base.forward and gguf is not None and gguf():
        weight, bias = layer.cast_bias_weight(x)  # ComfyUI-GGUF: dequantize + its patches
        yield _Linear(layer, _plain(weight), _plain(bias))
    elif cls.forward is base.forward and (cls.forward_comfy_cast_weights is base.forward_comfy_cast_weights
                                          or gguf is not None):  # GGUF's unquantized layers use ComfyUI's cast
        with _comfy_cast(layer, x) as (weight, bias):
            yield _Linear(layer, weight, bias) if gguf is None else _Linear(layer, _plain(weight), _plain(bias))
    elif _mixed_precision_unquantized(layer):
        with _comfy_cast(layer, x, compute_dtype=x.dtype) as (weight, bias):
            yield _Linear(layer, weight, bias)
    else:
        yield _Linear(layer)  # e.g. fp8 matmul paths: the layer's own forward per chunk


def _plain(t):
    """GGUF's tensor subclass would follow the outputs around (as its own layers avoid)."""
    import torch

    return None if t is None else t.as_subclass(torch.Tensor)


@contextlib.contextmanager
def _comfy_cast(layer, x, **kwargs):
    """ComfyUI's cast of ``layer`` for ``x``, as its forward does it, held for a
    whole block call. From 0.33 on, a streamed (non-resident) layer is cast into
    its offload stream's one cast buffer, which the next cast on that stream
    overwrites (classic path: ``get_cast_buffer``; dynamic VRAM: the aimdo cast
    buffer, at offset 0); the chunk loops cast other layers meanwhile (QKNorm's
    RMSNorms per chunk; proj, fc1 and fc2 at once), so what sits in a buffer is
    copied out once."""
    import comfy.ops

    if not hasattr(comfy.ops, "uncast_bias_weight"):  # 0.3.x: every cast makes its own tensors
        yield comfy.ops.cast_bias_weight(layer, x)
        return
    weight, bias, offload = comfy.ops.cast_bias_weight(layer, x, offloadable=True, **kwargs)
    try:
        yield _held(weight, offload), _held(bias, offload)
    finally:
        comfy.ops.uncast_bias_weight(layer, weight, bias, offload)  # the stream may reuse its buffer after this


def _held(t, offload):
    """``t`` from cast_bias_weight(offloadable=True), safe to use until uncast
    whatever is cast meanwhile: copied if it may be in a stream's cast buffer."""
    import torch

    if t is None or offload is None:
        return t
    if not (isinstance(offload, tuple) and len(offload) == 3):
        return t.clone()  # an offload state this code does not know: assume the buffer
    stream, staged, staged_bias = offload
    if stream is None:  # not cast through a stream: the stored tensor, or a tensor of its own
        return t
    if isinstance(staged, torch.Tensor):  # classic path: staged = the weight and bias as copied to the device
        shares = any(s is not None and _same_storage(s, t) for s in (staged, staged_bias))
        return t.clone() if shares else t  # else a later copy: dtype cast, dequantization or LoRA
    if staged is not None:  # dynamic VRAM: the layer's own VRAM, pinned until uncast
        return t
    return t.clone()  # dynamic VRAM, not resident: staged in the aimdo cast buffer (or a copy of it)


def _same_storage(a, b):
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError):  # a tensor subclass without storage of its own
        return True


def _mixed_precision_unquantized(layer):
    """comfy_quant layers (0.33) take the plain cast + F.linear path when they will
    not quantize the input: no quant layout, full precision, or weight patches."""
    if not hasattr(layer, "_forward") or getattr(layer, "pre_quant_scale", None) is not None:
        return False
    return (getattr(layer, "layout_type", None) is None or getattr(layer, "_full_precision_mm", False)
            or getattr(layer, "comfy_force_cast_weights", False)
            or bool(layer.weight_function) or bool(layer.bias_function))


# ---------------------------------------------------------------------------
# The chunked blocks (FLUX.1 blocks; anything else runs ComfyUI's own block)

def _spans(tokens, chunk):
    import comfy.model_management
    import torch

    for start in range(0, tokens, chunk):
        if not torch.compiler.is_compiling():  # a block at 8K takes seconds: stop on cancel
            comfy.model_management.throw_exception_if_processing_interrupted()
        yield start, min(start + chunk, tokens)


def _qkv(attn_norm, qkv, heads):
    """(B, n, 3*H*D) -> q, k, v (B, H, n, D), q/k normed, as ComfyUI's blocks."""
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn_norm(q, k, v)
    return q, k, v


def _store(buffers, start, end, q, k, v, pe):
    from comfy.ldm.flux.math import apply_rope

    if pe is not None:
        q, k = apply_rope(q, k, pe[:, :, start:end])
    for buf, t in zip(buffers, (q, k, v)):
        buf[:, :, start:end] = t


def _attention(q, k, v, args, block):
    import inspect

    from comfy.ldm.flux.math import attention

    kwargs = {}
    if hasattr(block, "comfy_attention") and "preferred_attention" in inspect.signature(attention).parameters:
        kwargs["preferred_attention"] = block.comfy_attention  # newer ComfyUI: the block's own attention choice
    # RoPE is already applied per chunk
    return attention(q, k, v, pe=None, mask=args.get("attn_mask"), transformer_options=args.get("transformer_options"),
                     **kwargs)


def _modulated_norm(x, norm, mod):
    """``norm(x) * (1 + scale) + shift``, through ComfyUI's fused ``modulated_norm``
    where it has one (newer ComfyUI's blocks use it; it rounds differently)."""
    from comfy.ldm.flux import layers

    fused = getattr(layers, "modulated_norm", None)
    if fused is not None:
        return fused(x, norm, mod.scale, mod.shift)
    return layers.apply_mod(norm(x), 1 + mod.scale, mod.shift)


def double_block(block, args, chunk):
    import torch
    from comfy.ldm.flux.layers import apply_mod

    img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
    (img_mod1, img_mod2), (txt_mod1, txt_mod2) = block.img_mod(vec), block.txt_mod(vec)
    b, n_txt, heads = img.shape[0], txt.shape[1], block.num_heads
    length = n_txt + img.shape[1]
    head_dim = block.hidden_size // heads
    q, k, v = (torch.empty(b, heads, length, head_dim, dtype=img.dtype, device=img.device) for _ in range(3))
    streams = ((txt, txt_mod1, txt_mod2, block.txt_norm1, block.txt_attn, block.txt_norm2, block.txt_mlp, 0),
               (img, img_mod1, img_mod2, block.img_norm1, block.img_attn, block.img_norm2, block.img_mlp, n_txt))
    for x, mod1, _, norm1, attn, _, _, offset in streams:
        with _cast_once(attn.qkv, x) as qkv:
            for s, e in _spans(x.shape[1], chunk):
                modulated = _modulated_norm(x[:, s:e], norm1, mod1)
                _store((q, k, v), offset + s, offset + e, *_qkv(attn.norm, qkv(modulated), heads), pe)
    out = _attention(q, k, v, args, block)
    del q, k, v
    if out.dtype != img.dtype or not out.is_contiguous():
        out = out.to(img.dtype).contiguous()
    # write each stream's result over its attention output: the inputs stay untouched
    for x, mod1, mod2, _, attn, norm2, mlp, offset in streams:
        with _cast_once(attn.proj, x) as proj, _cast_once(mlp[0], x) as fc1, _cast_once(mlp[2], x) as fc2:
            for s, e in _spans(x.shape[1], chunk):
                y = x[:, s:e] + apply_mod(proj(out[:, offset + s:offset + e]), mod1.gate)
                y = y + apply_mod(fc2(mlp[1](fc1(_modulated_norm(y, norm2, mod2)))), mod2.gate)
                out[:, offset + s:offset + e] = y
    txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
    if txt_out.dtype == torch.float16:
        txt_out = torch.nan_to_num(txt_out, nan=0.0, posinf=65504, neginf=-65504)
    return img_out, txt_out


def single_block(block, args, chunk):
    import torch
    from comfy.ldm.flux.layers import apply_mod

    x, vec, pe = args["img"], args["vec"], args["pe"]
    mod, _ = block.modulation(vec)
    b, length, hidden, heads = x.shape[0], x.shape[1], block.hidden_size, block.num_heads
    q, k, v = (torch.empty(b, heads, length, hidden // heads, dtype=x.dtype, device=x.device) for _ in range(3))
    with _cast_once(block.linear1, x) as linear1, _cast_once(block.linear2, x) as linear2:
        # the MLP half of linear2 (its input is [attention | GELU(mlp)]) is summed in pass 1;
        # a layer that must run whole keeps GELU(mlp) instead
        mlp_out = torch.empty(b, length, hidden if linear2.materialized else block.mlp_hidden_dim, dtype=x.dtype, device=x.device)
        for s, e in _spans(length, chunk):
            qkv, mlp = torch.split(linear1(_modulated_norm(x[:, s:e], block.pre_norm, mod)),
                                   [3 * hidden, block.mlp_hidden_dim], dim=-1)
            _store((q, k, v), s, e, *_qkv(block.norm, qkv, heads), pe)
            del qkv
            mlp = block.mlp_act(mlp)
            mlp_out[:, s:e] = linear2(mlp, cols=slice(hidden, None), with_bias=False) if linear2.materialized else mlp
            del mlp
        attn = _attention(q, k, v, args, block)
        del q, k, v
        for s, e in _spans(length, chunk):
            if linear2.materialized:
                output = linear2(attn[:, s:e], cols=slice(0, hidden)) + mlp_out[:, s:e]
            else:
                output = linear2(torch.cat((attn[:, s:e], mlp_out[:, s:e]), 2))
            x[:, s:e] += apply_mod(output, mod.gate)  # in place, as ComfyUI's block
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


def _unsupported(kind, block, args):
    """Why ComfyUI's own block must run instead (other FLUX-family variants), or None."""
    import torch
    from comfy.ldm.flux import layers

    own = layers.DoubleStreamBlock if kind == "double" else layers.SingleStreamBlock
    cls = type(getattr(block, "_orig_mod", block))  # a torch.compile'd block: the block it wraps
    if getattr(cls, "forward", None) is not own.forward:  # another extension's block (IP-Adapter-Flux's) does
        return f"the block is {cls.__name__}, whose computation chunking cannot reproduce"  # more than its layers
    vec, img = args["vec"], args["img"]
    if not isinstance(vec, torch.Tensor) or vec.shape[0] != img.shape[0]:
        return "its modulation is not one vector per image (FLUX.2 / per-token timesteps)"
    patches = (args.get("transformer_options") or {}).get("patches", {})
    if patches.get("attn1_patch") or patches.get("attn1_output_patch"):
        return "an attn1 patch needs q/k/v before RoPE"
    if kind == "double":
        if getattr(block, "flipped_img_txt", False) or getattr(block, "modulation", True) is not True:
            return "its token order or modulation differs from FLUX.1"
        if not all(isinstance(m, torch.nn.Sequential) and len(m) == 3 for m in (block.img_mlp, block.txt_mlp)):
            return "its MLP differs from FLUX.1"
    elif block.modulation is None or getattr(block, "yak_mlp", False) or \
            getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim) != block.mlp_hidden_dim:
        return "its modulation or MLP differs from FLUX.1"
    return None


# ---------------------------------------------------------------------------
# Run-time hooks (plain functions bound with functools.partial, like CLEAR's)

def _model_wrapper(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                   transformer_options={}, **kwargs):
    """DIFFUSION_MODEL wrapper: let the block wrappers find this call's Flux module."""
    unchunked = {}
    transformer_options = {**transformer_options, MODEL_KEY: executor.class_obj, UNCHUNKED_KEY: unchunked}
    out = executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
    if unchunked:  # one line per model, not one per block (a FLUX.2 [dev] has 56)
        reasons = "; ".join(f"{' and '.join(sorted(kinds))} blocks: {why}" for why, kinds in unchunked.items())
        warn_once(f"FLUX Token Chunking: blocks of this model run unchunked (ComfyUI's own block, "
                  f"full activation memory): {reasons}.")
    return out


def _run_chunked(args, *, original, kind, index, chunk_tokens):
    import comfy.model_management

    flux = (args.get("transformer_options") or {}).get(MODEL_KEY)
    if flux is None:
        return original(args)
    block = (flux.double_blocks if kind == "double" else flux.single_blocks)[index]
    why = _unsupported(kind, block, args)
    if why is not None:
        args["transformer_options"].get(UNCHUNKED_KEY, {}).setdefault(why, set()).add(kind)
        return original(args)
    img = args["img"]
    tokens = img.shape[1] + (args["txt"].shape[1] if kind == "double" else 0)
    chunk = chunk_tokens
    if chunk == 0:
        free = comfy.model_management.get_free_memory(img.device)
        mlp = block.mlp_hidden_dim if kind == "single" else block.img_mlp[0].out_features
        text = args["txt"].shape[1] if kind == "double" else 0
        options = args.get("transformer_options") or {}
        layer, layout = options.get("clear_layer"), options.get("clear_tokens")  # set by CLEAR around this block
        down = layer["down_factor"] if layer and layout else 1
        chunk = chunk_tokens_for(kind, tokens, img.shape[0], img.element_size(), free, text, block.hidden_size, mlp,
                                 down_factor=down, grid=layout[1] if down > 1 else None)
    if chunk >= tokens:
        return original(args)
    if kind == "double":
        img, txt = double_block(block, args, chunk)
        return {"img": img, "txt": txt}
    return {"img": single_block(block, args, chunk)}


def _chunk_block(args, extra, *, kind, index, chunk_tokens, previous=None):
    """patches_replace["dit"] wrapper: the chunked block becomes the original block
    of any earlier wrapper (CLEAR sets its options, then calls it)."""
    original = extra["original_block"]
    if not (isinstance(original, functools.partial) and original.func is _run_chunked):  # else a later node's wins
        original = functools.partial(_run_chunked, original=original, kind=kind, index=index, chunk_tokens=chunk_tokens)
    if previous is not None:
        return previous(args, {**extra, "original_block": original})
    return original(args)


def _checked_chunk_tokens(chunk_tokens):
    """A whole number >= 0 (whole floats taken as ints), checked when the node runs:
    ComfyUI checks widget values, not values linked from other nodes or passed
    from Python, which would fail later inside the sampler."""
    value = chunk_tokens
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise TokenChunkingError(f"chunk_tokens must be a whole number >= 0 (tokens per chunk; 0 = auto), "
                                 f"got {type(chunk_tokens).__name__} {chunk_tokens!r}")
    return int(value)


def patch_model(model, chunk_tokens=0):
    """Return a clone of ``model`` (a ComfyUI ModelPatcher of FLUX) with token-chunked blocks."""
    import comfy.ldm.flux.model
    import comfy.patcher_extension

    diffusion_model = model.get_model_object("diffusion_model")
    if not isinstance(diffusion_model, comfy.ldm.flux.model.Flux):
        raise TokenChunkingError(
            f"FLUX Token Chunking needs a FLUX model; got {type(diffusion_model).__name__}. "
            "Connect the output of a FLUX model loader (or of the CLEAR Attention Patch).")
    chunk_tokens = _checked_chunk_tokens(chunk_tokens)
    m = model.clone()
    dit = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for kind, blocks in (("double", diffusion_model.double_blocks), ("single", diffusion_model.single_blocks)):
        for i in range(len(blocks)):
            wrapper = functools.partial(_chunk_block, kind=kind, index=i, chunk_tokens=chunk_tokens,
                                        previous=_unwrap(dit.get((f"{kind}_block", i)), _chunk_block))
            m.set_model_patch_replace(wrapper, "dit", f"{kind}_block", i)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _model_wrapper)
    return m


# ---------------------------------------------------------------------------
# The node

class CLEARTokenChunking:
    DESCRIPTION = (
        "Runs every FLUX block's linear layers, norms and MLP over chunks of tokens and only attention over "
        "the whole sequence: the same image, with a fraction of the activation memory at 4K-8K (an 8K step "
        "fits a 24 GB GPU with fp8 weights). Works with or without the CLEAR Attention Patch, in either order.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, its FLUX blocks run over chunks of tokens (the same image, less memory). "
                       "Connect it to the sampler, or to the CLEAR Attention Patch.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX.1 model (with or without the CLEAR Attention Patch)."}),
            "chunk_tokens": ("INT", {
                "default": 0, "min": 0, "max": 1 << 20, "step": 256,
                "tooltip": "Tokens per chunk (1 token = 16x16 px). 0 = auto: chunk only when a block would not "
                           "fit the free memory, in chunks sized to it."}),
        }}

    def patch(self, model, chunk_tokens):
        return (patch_model(model, chunk_tokens),)


NODE_CLASS_MAPPINGS = {"CLEARTokenChunking": CLEARTokenChunking}
NODE_DISPLAY_NAME_MAPPINGS = {"CLEARTokenChunking": "FLUX Token Chunking (CLEAR)"}
