"""The CLEAR distillation trainer (docs/distill.md, "Training"): learns CLEAR
weights for the user's own FLUX-family model from its teacher data.

- Trainable: the authors' set only: each double block's image-stream q, k, v
  (rows of ``img_attn.qkv``) and out (``img_attn.proj``); each single block's
  q, k, v (rows [0, 3*hidden) of ``linear1``, never its MLP rows); the pooled
  keys' ``spatial_weight`` (initialised to 1/d^2) when d > 1. As a LoRA of
  rank r per projection, or as full rows (fp32 master copies).
- The adapters are ComfyUI weight wrappers (``ModelPatcher.add_weight_wrapper``)
  on a clone, so the user's model is never changed and ComfyUI's own loading
  (fp8 and quantized weights, devices) runs the model; a switch turns them off.
- One loaded model serves three passes: the teacher (adapters off, ComfyUI's
  dense attention, no grad), the student (adapters on, CLEAR attention with the
  chosen window and pooling) and, for previews, training-free CLEAR (adapters
  off, CLEAR attention).
- Loss = loss_fm * MSE(v_s, noise - x0) + loss_distill * MSE(v_s, v_t)
  + loss_attn * mean over single blocks i % 4 == 0 of MSE(attn_s, attn_t),
  attn = the raw attention output (text and image tokens) entering linear2.
- Per-block gradient checkpointing (non-reentrant) through
  ``patches_replace["dit"]``; each block's residual stream is a tensor whose
  ``+=`` is out of place (``_Residual``), because ComfyUI's blocks update it
  in place after a norm saved it for backward: the recomputed block would
  otherwise see the already-updated tensor (wrong gradients).
- Every random draw of a step (sample order, noise, sigma) comes from
  (seed, global sample slot), so a resumed run equals an uninterrupted one and
  two data-parallel processes with batch b equal one process with batch 2b.
"""

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import time

import torch
import torch.utils.checkpoint

from . import weights
from .runtime import CATEGORY, ui_error

log = logging.getLogger(__name__)

MODES = ("lora", "full")
OPTIMIZERS = ("prodigy", "adamw", "adamw8bit")
ATTN_LOSS_EVERY = 4  # single blocks i % 4 == 0 give the attention loss (the authors' choice)
MAX_DOWN_FACTOR = 16
STATE_SUFFIX = ".state.pt"
STATE_FORMAT = 1
PREVIEW_STEPS = 4
# Settings a resumed run must share with its checkpoint (the rest may change).
_RESUME_KEYS = ("window_size", "down_factor", "mode", "rank", "alpha", "batch_size", "grad_accum", "optimizer",
                "seed")
_OUT_OF_PLACE_RESIDUALS = True  # tests turn it off to show the check catches ComfyUI's in-place residuals


@ui_error
class CLEARDistillError(ValueError):
    """The trainer cannot run with these inputs; the message says what to change."""


@dataclasses.dataclass
class DistillSettings:
    window_size: int = 16
    down_factor: int = 1
    mode: str = "lora"            # "lora" | "full"
    rank: int = 64
    alpha: float = None           # None -> rank
    steps: int = 2000
    batch_size: int = 1
    grad_accum: int = 1
    optimizer: str = "prodigy"    # "prodigy" | "adamw" | "adamw8bit"
    learning_rate: float = 1.0    # Prodigy's 1.0; AdamW ~1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    loss_fm: float = 1.0
    loss_distill: float = 0.5
    loss_attn: float = 0.5
    checkpoint_every: int = 250
    preview_every: int = 250
    seed: int = 0

    def checked(self, hidden):
        """self, after one CLEARDistillError for the first value out of range."""
        def whole(name, low, high=None, value=None):
            value = getattr(self, name) if value is None else value
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            out_of_range = value < low or (high is not None and value > high) if isinstance(value, int) else True
            if isinstance(value, bool) or out_of_range:
                bound = f"between {low} and {high}" if high is not None else f">= {low}"
                raise CLEARDistillError(f"{name} must be a whole number {bound}, got {value!r}.")
            setattr(self, name, value)

        def number(name, low, strict=False):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < low or (strict and value == low):
                bound = f"{'>' if strict else '>='} {low}"
                raise CLEARDistillError(f"{name} must be a finite number {bound}, got {value!r}.")
            setattr(self, name, float(value))

        if self.mode not in MODES:
            raise CLEARDistillError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise CLEARDistillError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
        whole("window_size", 1)
        whole("down_factor", 1, MAX_DOWN_FACTOR)
        if self.mode == "lora":
            if isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > hidden:
                raise CLEARDistillError(f"rank {self.rank} is larger than the model's width ({hidden}): a LoRA of "
                                        f"rank >= the width is a full fine-tune; use rank <= {hidden} or mode 'full'.")
            whole("rank", 1, hidden)
            if self.alpha is not None:
                number("alpha", 0.0, strict=True)
        for name in ("steps", "batch_size", "grad_accum"):
            whole(name, 1)
        for name in ("checkpoint_every", "preview_every", "seed"):
            whole(name, 0)
        number("learning_rate", 0.0, strict=True)
        for name in ("weight_decay", "grad_clip", "loss_fm", "loss_distill", "loss_attn"):
            number(name, 0.0)
        if self.loss_fm == self.loss_distill == self.loss_attn == 0:
            raise CLEARDistillError("loss_fm, loss_distill and loss_attn are all 0: nothing to train; "
                                    "the authors use 1.0, 0.5, 0.5.")
        return self


@dataclasses.dataclass
class DistillResult:
    path: str
    steps: int
    final_loss: float
    losses: list
    previews: object = None  # IMAGE (3, H, W, 3): student, teacher, training-free CLEAR; or None


# ---------------------------------------------------------------------------
# What is trained

PROJECTIONS = {"double": ("q", "k", "v", "out"), "single": ("q", "k", "v")}
_FILE_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


def trainable_parameter_set(diffusion_model):
    """The authors' parameter set in ComfyUI's layout, as
    [(kind, index, projection, module key, (first row, end row))]."""
    hidden = diffusion_model.hidden_size
    out = []
    for i in range(len(diffusion_model.double_blocks)):
        key = f"diffusion_model.double_blocks.{i}.img_attn"
        for n, proj in enumerate("qkv"):
            out.append(("double", i, proj, f"{key}.qkv", (n * hidden, (n + 1) * hidden)))
        out.append(("double", i, "out", f"{key}.proj", (0, hidden)))
    for i in range(len(diffusion_model.single_blocks)):
        for n, proj in enumerate("qkv"):
            key = f"diffusion_model.single_blocks.{i}.linear1"
            out.append(("single", i, proj, key, (n * hidden, (n + 1) * hidden)))
    return out


def _module(diffusion_model, key):
    module = diffusion_model
    for part in key.split(".")[1:]:
        module = getattr(module, part)
    return module


def _flux_model(model):
    import comfy.ldm.flux.model

    from .clear_patch import FAMILIES

    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion_model, comfy.ldm.flux.model.Flux):
        raise CLEARDistillError(
            f"CLEAR Distill trains FLUX-family models ({', '.join(FAMILIES.values())}); got "
            f"{type(diffusion_model).__name__}. Connect the output of a FLUX model loader.")
    return diffusion_model


def _fingerprint(diffusion_model):
    from .weights import model_fingerprint

    return model_fingerprint(diffusion_model)


def _base_hash(model):
    from .weights import base_model_hash

    return base_model_hash(model)


def _refuse_untrainable(model, diffusion_model, items):
    """GGUF bases and models already CLEAR-patched: one clear error each."""
    for _, _, _, key, _ in items:
        weight = _module(diffusion_model, key).weight
        if type(weight).__name__ == "GGMLTensor":
            raise CLEARDistillError(
                "CLEAR Distill cannot train on a GGUF model (ComfyUI-GGUF's quantized weights have no gradients "
                "path and cannot be dequantized per step at training speed). Load the same model as "
                "safetensors (bf16, or fp8 with the fp8 weight dtype) with ComfyUI's diffusion model loader.")
    import comfy.patcher_extension

    from . import token_chunking
    from .clear_patch import _is_clear_override

    options = model.model_options.get("transformer_options", {})
    if _is_clear_override(options.get("optimized_attention_override")):
        raise CLEARDistillError(
            "CLEAR Distill got a model that already runs the CLEAR Attention Patch: the teacher must be the "
            "model's own dense attention. Connect the model from before the CLEAR Attention Patch.")
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, token_chunking.WRAPPER_KEY):
        raise CLEARDistillError(
            "CLEAR Distill got a model with FLUX Token Chunking, which is for generating at 4K-8K; training "
            "checkpoints every block and needs no chunking. Connect the model from before FLUX Token Chunking.")


# ---------------------------------------------------------------------------
# Adapters as weight wrappers

class _Switch:
    """Whether the adapters act (off: teacher and training-free passes)."""

    def __init__(self):
        self.on = True


class _RowsWrapper:
    """ComfyUI weight (or bias) wrapper of one module: the first rows of the
    weight ComfyUI computed (patches applied, dequantized, cast) get the
    trained projections: LoRA deltas added, or full rows replaced."""

    def __init__(self, loss, parts, bias):
        self.loss, self.parts, self.bias = loss, parts, bias  # parts: [(rows, name)] contiguous from row 0

    def __deepcopy__(self, memo):  # ModelPatcher clones copy wrapper lists; the parameters stay shared
        return self

    def __call__(self, weight):
        loss = self.loss
        if not loss.switch.on:
            return weight
        end = self.parts[-1][0][1]
        pieces = []
        for (r0, r1), name in self.parts:
            base = weight[r0:r1]
            if loss.mode == "full":
                param = loss.full[name + ("_bias" if self.bias else "_weight")]
                if not loss.ready:  # fp32 master copy of what the model computes, on first use
                    with torch.no_grad():
                        param.copy_(base.float())
                pieces.append(param.to(weight.dtype))
            else:
                down, up = loss.lora[name + "_down"], loss.lora[name + "_up"]
                delta = (up @ down) * loss.lora_scale  # float32 (float64 in gradient checks), as ComfyUI's LoRA patches
                pieces.append((base.to(delta.dtype) + delta).to(weight.dtype))
        if loss.weight_dtype is None:
            loss.weight_dtype = weight.dtype
        return torch.cat(pieces + ([weight[end:]] if end < weight.shape[0] else []), 0)


class _Copied:
    """Weight wrapper that only makes ComfyUI cast a copy: weights loaded under
    torch.inference_mode (as ComfyUI runs loader nodes) cannot be saved for
    backward, their copies made outside it can."""

    def __deepcopy__(self, memo):
        return self

    def __call__(self, weight):
        return weight


_OURS = (_RowsWrapper, _Copied)


def _name(kind, index, proj):
    return f"{kind}_{index}_{proj}"


def _call_block(block, kind, block_args):
    """What ComfyUI's ``original_block`` does for a FLUX block, bound to this
    block (ComfyUI's closure reads the loop variable, which a checkpoint's
    recompute during backward would find pointing at the last block)."""
    options = block_args.get("transformer_options")
    if kind == "double":
        img, txt = block(img=block_args["img"], txt=block_args["txt"], vec=block_args["vec"], pe=block_args["pe"],
                         attn_mask=block_args.get("attn_mask"), transformer_options=options)
        return {"img": img, "txt": txt}
    return {"img": block(block_args["img"], vec=block_args["vec"], pe=block_args["pe"],
                         attn_mask=block_args.get("attn_mask"), transformer_options=options)}


class _Residual(torch.Tensor):
    """A FLUX block's residual stream whose ``+=`` is out of place. ComfyUI's
    blocks update it in place (``img += ...``, ``x += ...``) after a norm saved
    it for backward: autograd refuses that, and under checkpointing (which
    does not check) the recomputed norm would see the updated values: wrong
    gradients. Other operations give plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __iadd__(self, other):
        return torch.add(self.as_subclass(torch.Tensor), other).as_subclass(_Residual)


def _checkpointed_block(args, extra, *, kind, block, inner=None):
    """patches_replace["dit"] entry: the block (and any other block patch it
    had) under non-reentrant checkpointing, its residual updates out of place."""
    names = ("img", "txt") if kind == "double" else ("img",)
    calls = []

    def run(*tensors):
        block_args = dict(args)
        for n, t in zip(names, tensors):
            block_args[n] = t.as_subclass(_Residual) if _OUT_OF_PLACE_RESIDUALS else t
        block_extra = extra if not calls else {**extra, "original_block": lambda a: _call_block(block, kind, a)}
        calls.append(True)
        out = inner(block_args, block_extra) if inner is not None else block_extra["original_block"](block_args)
        return tuple(out[n].as_subclass(torch.Tensor) for n in names)

    if not torch.is_grad_enabled():
        return inner(args, extra) if inner is not None else extra["original_block"](args)
    outs = torch.utils.checkpoint.checkpoint(run, *(args[n] for n in names), use_reentrant=False)
    return dict(zip(names, outs))


class DistillLoss(torch.nn.Module):
    """The trainable parameters (adapters, pooling weights) and the three-term
    loss on one batch. Holds the student model (a clone of ``model`` with the
    adapters as weight wrappers and CLEAR attention); ``load()`` puts it on its
    device through ComfyUI. torch's DistributedDataParallel wraps this module."""

    def __init__(self, model, settings):
        super().__init__()
        from .clear_patch import patch_model
        from .weights import TRAINING_FREE

        flux = _flux_model(model)
        self.settings = settings
        self.mode = settings.mode
        self.hidden = flux.hidden_size
        self.items = trainable_parameter_set(flux)
        _refuse_untrainable(model, flux, self.items)
        self.switch = _Switch()
        self.ready = True
        self.weight_dtype = None
        self.lora = torch.nn.ParameterDict()
        self.full = torch.nn.ParameterDict()
        self.spatial = torch.nn.ParameterDict()
        gen = torch.Generator().manual_seed(settings.seed)
        alpha = settings.alpha if settings.alpha is not None else settings.rank
        self.lora_scale = alpha / settings.rank
        by_module = {}
        for kind, i, proj, key, rows in self.items:
            name = _name(kind, i, proj)
            module = _module(flux, key)
            fan_in = module.weight.shape[1]
            if self.mode == "lora":
                r = settings.rank
                down = torch.randn(r, fan_in, generator=gen) / math.sqrt(fan_in)
                self.lora[name + "_down"] = torch.nn.Parameter(down)
                self.lora[name + "_up"] = torch.nn.Parameter(torch.zeros(rows[1] - rows[0], r))
            else:
                self.ready = False
                self.full[name + "_weight"] = torch.nn.Parameter(torch.zeros(rows[1] - rows[0], fan_in))
                if getattr(module, "bias", None) is not None:
                    self.full[name + "_bias"] = torch.nn.Parameter(torch.zeros(rows[1] - rows[0]))
            by_module.setdefault(key, []).append((rows, name))
        d = settings.down_factor
        spatial = {}
        if d > 1:
            for kind, blocks in (("double", flux.double_blocks), ("single", flux.single_blocks)):
                for i in range(len(blocks)):
                    p = torch.nn.Parameter(torch.full((1, 1, 1, d, 1, d, 1), 1.0 / (d * d)))
                    self.spatial[f"{kind}_{i}"] = p
                    spatial[(kind, i)] = p
        self.__dict__["teacher"] = model  # the user's model: its options, never changed
        student = patch_model(model, TRAINING_FREE, settings.window_size, d, spatial_weights=spatial or None)
        for key, parts in by_module.items():
            parts.sort()
            student.add_weight_wrapper(key + ".weight", _RowsWrapper(self, parts, bias=False))
            if self.mode == "full" and getattr(_module(flux, key), "bias", None) is not None:
                student.add_weight_wrapper(key + ".bias", _RowsWrapper(self, parts, bias=True))
        wrapped = set(student.weight_wrapper_patches)
        copied = _Copied()
        for module_name, module in flux.named_modules():
            for attr, t in module.named_parameters(recurse=False):
                key = f"diffusion_model.{module_name}.{attr}"
                if not t.is_inference() or key in wrapped:
                    continue
                if hasattr(module, "comfy_cast_weights") and attr in ("weight", "bias"):
                    student.add_weight_wrapper(key, copied)
                else:  # not cast by ComfyUI (e.g. RMSNorm scales of older versions): a normal copy, small
                    student.add_object_patch(key, torch.nn.Parameter(t.clone(), requires_grad=False))
        self.__dict__["student"] = student  # a ModelPatcher: not a submodule
        self.__dict__["flux"] = flux
        self.attn_blocks = [i for i in range(len(flux.single_blocks)) if i % ATTN_LOSS_EVERY == 0]

    # -- the model on its device, through ComfyUI

    def load(self):
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.student], force_full_load=True)
        self.to(self.student.load_device)
        # no gradients for the frozen weights (restored by unload): only the adapters train
        self.__dict__["frozen"] = [p for p in self.student.model.parameters()
                                   if p.requires_grad and not p.is_inference()]
        for p in self.frozen:
            p.requires_grad_(False)
        return self

    def unload(self):
        """Give the model back as ComfyUI found it (weight wrappers, object patches off)."""
        import comfy.model_management

        for p in self.__dict__.pop("frozen", []):
            p.requires_grad_(True)
        loaded = comfy.model_management.current_loaded_models
        for i in reversed(range(len(loaded))):
            if loaded[i].model is self.student:
                loaded[i].model_unload()
                loaded.pop(i)
        for module in self.flux.modules():  # ComfyUI leaves weight functions of a full load in place
            for attr in ("weight_function", "bias_function"):
                functions = module.__dict__.get(attr)
                if functions and any(isinstance(f, _OURS) for f in functions):
                    setattr(module, attr, [f for f in functions if not isinstance(f, _OURS)])

    @property
    def device(self):
        return self.student.load_device

    @property
    def dtype(self):
        """The loss's dtype: float32 (float64 when the parameters are, in gradient checks)."""
        return next(self.parameters()).dtype

    # -- the passes

    def _options(self, clear):
        """transformer_options of one pass: the student's (CLEAR's wrapper and
        override) with per-block checkpointing, or the user's own (teacher)."""
        import functools

        import comfy.patcher_extension

        patcher = self.student if clear else self.__dict__["teacher"]
        options = dict(patcher.model_options.get("transformer_options", {}))
        options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(  # as sampler_helpers does for sampling
            dict(options.get("wrappers") or {}), patcher.wrappers, copy_dict1=True)
        if clear:
            replace = dict(options.get("patches_replace") or {})
            dit = dict(replace.get("dit") or {})
            flux = self.flux
            for kind, blocks in (("double", flux.double_blocks), ("single", flux.single_blocks)):
                for i in range(len(blocks)):
                    key = (f"{kind}_block", i)
                    dit[key] = functools.partial(_checkpointed_block, kind=kind, block=blocks[i], inner=dit.get(key))
            replace["dit"] = dit
            options["patches_replace"] = replace
        return options

    def model_call(self, x_t, sigma, batch, *, adapters, clear):
        """The velocity the model predicts for x_t at sigma (B,): the student
        (adapters, clear), the teacher (neither) or training-free CLEAR (clear)."""
        from .clear_patch import dense_pass_through

        base = self.student.model
        flux = self.flux
        dtype = base.get_dtype_inference() if hasattr(base, "get_dtype_inference") else (
            base.manual_cast_dtype or base.get_dtype())
        device = self.device
        kwargs = {}
        if batch.get("pooled") is not None and getattr(flux, "vector_in", None) is not None:
            kwargs["y"] = batch["pooled"].to(device, dtype)
        if flux.params.guidance_embed:
            kwargs["guidance"] = batch["guidance"].to(device, dtype)
        t = base.model_sampling.timestep(sigma.to(device)).float()
        self.switch.on = adapters
        try:
            with contextlib.nullcontext() if clear else dense_pass_through():
                out = flux(x_t.to(device, dtype), t, context=batch["context"].to(device, dtype),
                           transformer_options=self._options(clear), **kwargs)
        finally:
            self.switch.on = True
        if adapters and not self.ready:
            self.ready = True
        return out.to(self.dtype)

    @contextlib.contextmanager
    def _capture(self, store):
        """Record the raw attention output entering each chosen single block's linear2."""
        if store is None:
            yield
            return
        hidden = self.hidden
        handles = []
        for i in self.attn_blocks:
            def hook(module, inputs, i=i):
                store[i] = inputs[0][..., :hidden]
            handles.append(self.flux.single_blocks[i].linear2.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward(self, batch):
        s = self.settings
        x0 = batch["x0"].to(self.device, self.dtype)
        noise = batch["noise"].to(self.device, self.dtype)
        sigma = batch["sigma"].to(self.device, self.dtype)
        sv = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - sv) * x0 + sv * noise
        attn_t = {} if s.loss_attn and self.attn_blocks else None
        attn_s = {} if attn_t is not None else None
        with torch.no_grad(), self._capture(attn_t):
            v_t = self.model_call(x_t, sigma, batch, adapters=False, clear=False)
        with self._capture(attn_s):
            v_s = self.model_call(x_t, sigma, batch, adapters=True, clear=True)
        mse = torch.nn.functional.mse_loss
        parts = {"fm": mse(v_s, noise - x0), "distill": mse(v_s, v_t)}
        if attn_t is not None:
            parts["attn"] = torch.stack([mse(attn_s[i].to(self.dtype), attn_t[i].to(self.dtype))
                                         for i in self.attn_blocks]).mean()
        else:
            parts["attn"] = v_s.new_zeros(())
        loss = s.loss_fm * parts["fm"] + s.loss_distill * parts["distill"] + s.loss_attn * parts["attn"]
        return loss, parts

    # -- the trained tensors, in the file layout

    def trained_tensors(self):
        """{file key: tensor} in the trained-file layout (docs/distill.md: full or LoRA, spatial weights)."""
        out = {}
        dtype = self.weight_dtype or torch.float32
        alpha = self.settings.alpha if self.settings.alpha is not None else self.settings.rank
        for kind, i, proj, key, rows in self.items:
            name, prefix = _name(kind, i, proj), weights.file_prefix(kind, i, _FILE_NAMES[proj])
            if self.mode == "full":
                out[prefix + ".weight"] = self.full[name + "_weight"].detach().to("cpu", dtype).contiguous()
                if name + "_bias" in self.full:
                    out[prefix + ".bias"] = self.full[name + "_bias"].detach().to("cpu", dtype).contiguous()
            else:
                out[prefix + ".lora_down.weight"] = self.lora[name + "_down"].detach().cpu().float().contiguous()
                out[prefix + ".lora_up.weight"] = self.lora[name + "_up"].detach().cpu().float().contiguous()
                out[prefix + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        for name, p in self.spatial.items():
            kind, i = name.split("_")
            block = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
            out[f"{block}.{i}.attn.processor.spatial_weight"] = p.detach().cpu().float().contiguous()
        return out


# ---------------------------------------------------------------------------
# Deterministic draws

def _generator(seed, *key):
    digest = hashlib.sha256(repr((int(seed),) + key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


class _Sampler:
    """Sample index, noise and sigma of a global sample slot, from (seed, slot)
    alone: slot = ((step * grad_accum + micro) * world + rank) * batch + k."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self._perms = dataset, seed, {}

    def index(self, slot):
        n = len(self.dataset)
        epoch = slot // n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(n, generator=_generator(self.seed, "epoch", epoch)).tolist()}
        return self._perms[epoch][slot % n]

    def draw(self, slot):
        sample = self.dataset[self.index(slot)]
        gen = _generator(self.seed, "slot", slot)
        noise = torch.randn(sample["latent"].shape, generator=gen)
        sigma = torch.rand((1,), generator=gen)
        return sample, noise, sigma


def _batches(samples, process_in, default_guidance):
    """Group drawn samples by text length (tokens of one batch must line up)
    into batch dicts; returns [(batch, count)]."""
    groups = {}
    for sample, noise, sigma in samples:
        groups.setdefault((sample["context"].shape[1], sample.get("pooled") is not None), []).append(
            (sample, noise, sigma))
    out = []
    for group in groups.values():
        guidance = [s["guidance"] if s.get("guidance") is not None else default_guidance for s, _, _ in group]
        guidance = None if None in guidance else torch.tensor(guidance, dtype=torch.float32)
        batch = {"x0": process_in(torch.cat([s["latent"] for s, _, _ in group])),
                 "noise": torch.cat([n for _, n, _ in group]),
                 "sigma": torch.cat([g for _, _, g in group]),
                 "context": torch.cat([s["context"] for s, _, _ in group]),
                 "pooled": torch.cat([s["pooled"] for s, _, _ in group]) if group[0][0].get("pooled") is not None
                 else None,
                 "guidance": guidance}
        out.append((batch, len(group)))
    return out


# ---------------------------------------------------------------------------
# Optimiser, state, output

def make_optimizer(name, params, learning_rate, weight_decay):
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise CLEARDistillError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt "
                                    "(or choose optimizer 'adamw').") from e
        return Prodigy(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as e:
            raise CLEARDistillError("optimizer 'adamw8bit' needs bitsandbytes, which is not installed: "
                                    "pip install bitsandbytes (or choose optimizer 'adamw' or 'prodigy').") from e
        return bitsandbytes.optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay)
    raise CLEARDistillError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}.")


def output_path(output_name):
    """models/clear/<output_name>.safetensors; a path with a folder is used as given."""
    name = os.fspath(output_name)
    if not name or not name.strip():
        raise CLEARDistillError("output_name is empty: give the name of the file to write in models/clear.")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    from .weights import FOLDER, PUBLISHED, register_model_folder

    if os.path.basename(name) in PUBLISHED:
        raise CLEARDistillError(f"output_name '{os.path.basename(name)}' is a published CLEAR file's name: training "
                                "would overwrite the FLUX.1-dev weights there. Pick another name, e.g. "
                                f"'{os.path.basename(name)[:-len('.safetensors')]}_mymodel'.")
    if os.path.dirname(name):
        return os.path.abspath(name)
    import folder_paths

    register_model_folder()
    return os.path.join(folder_paths.get_folder_paths(FOLDER)[0], name)


def state_path(path):
    return path[: -len(".safetensors")] + STATE_SUFFIX


def _atomic_save(obj, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_output(path, tensors, **metadata):
    """The trained file (weights.save_trained_weights: keys, shapes and metadata checked)."""
    from .weights import save_trained_weights

    return save_trained_weights(path, tensors, **metadata)


# ---------------------------------------------------------------------------
# The loop

def _open_dataset(dataset):
    from .distill_data import CLEARDataError, TeacherDataset

    if isinstance(dataset, TeacherDataset) or hasattr(dataset, "__getitem__") and hasattr(dataset, "family"):
        return dataset
    try:
        return TeacherDataset(dataset)
    except CLEARDataError as e:
        raise CLEARDistillError(str(e)) from e


def _check_dataset(dataset, family, fingerprint):
    from .clear_patch import FAMILIES

    if len(dataset) == 0:
        raise CLEARDistillError("the teacher dataset has no samples: generate them with the 'CLEAR Distill: "
                                "Teacher Data' node first.")
    if dataset.family != family or dataset.fingerprint != fingerprint:
        raise CLEARDistillError(
            f"the teacher dataset was generated by another model ({FAMILIES.get(dataset.family, dataset.family)}, "
            f"{dataset.fingerprint}) than the one connected ({FAMILIES.get(family, family)}, {fingerprint}). "
            "Train on data generated by this model: run the 'CLEAR Distill: Teacher Data' node with it.")


@contextlib.contextmanager
def training_mode():
    """ComfyUI's training switch (0.33+: differentiable RoPE and linears
    instead of its inference kernels), on for forward and backward passes."""
    import comfy.model_management as mm

    before = getattr(mm, "in_training", None)
    mm.in_training = True
    try:
        yield
    finally:
        if before is None:
            del mm.in_training
        else:
            mm.in_training = before


def _distributed():
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_memory(loss, flux, settings, dataset):
    """On CUDA: refuse settings that cannot fit before loading anything (the
    memory model, nodes/distill_memory.py)."""
    device = loss.device
    if getattr(device, "type", str(device)) != "cuda":
        return
    from . import distill_memory

    weight = _module(flux, loss.items[0][3]).weight
    base_bytes = getattr(getattr(weight, "dtype", None), "itemsize", 2) or 2
    _, h, w = dataset.latent_shape
    text = dataset[0]["context"].shape[1]
    estimate = distill_memory.estimate(
        distill_memory.ModelShape.of(flux), mode=settings.mode, rank=settings.rank, base_bytes_per_param=base_bytes,
        optimizer=settings.optimizer, width=dataset.width, height=dataset.height, batch_size=settings.batch_size,
        text_tokens=text, down_factor=settings.down_factor)
    distill_memory.check_fits(estimate, distill_memory.available_cuda_bytes(device))



class _Trainer:
    def __init__(self, model, dataset, settings, output_name, resume, vae, progress, report=None):
        self.flux = _flux_model(model)
        self.model = model
        self.settings = settings.checked(self.flux.hidden_size)
        self.family = _family(self.flux)
        self.fingerprint = _fingerprint(self.flux)
        self.dataset = _open_dataset(dataset)
        _check_dataset(self.dataset, self.family, self.fingerprint)
        self.path = output_path(output_name)
        self.state_file = state_path(self.path)
        self.resume, self.vae, self.progress, self.report = resume, vae, progress, report
        self.rank, self.world = _distributed()
        self.sampler = _Sampler(self.dataset, settings.seed)
        self.losses = []
        self.previews = None

    def _state(self, step, optimizer):
        return {"format": STATE_FORMAT, "step": step, "params": {k: v.detach().cpu() for k, v in
                                                                 self.loss.state_dict().items()},
                "optimizer": optimizer.state_dict(), "losses": list(self.losses),
                "settings": dataclasses.asdict(self.settings), "fingerprint": self.fingerprint,
                "weight_dtype": str(self.loss.weight_dtype) if self.loss.weight_dtype else None}

    def save_state(self, step, optimizer):
        if self.rank == 0:
            _atomic_save(self._state(step, optimizer), self.state_file)

    def load_state(self, optimizer):
        if not (self.resume and os.path.isfile(self.state_file)):
            return 0
        try:
            state = torch.load(self.state_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CLEARDistillError(f"cannot read the training checkpoint {self.state_file} ({e}); delete it to "
                                    "start over, or turn resume off.") from e
        saved = state.get("settings", {})
        changed = [k for k in _RESUME_KEYS if saved.get(k) != getattr(self.settings, k)]
        if state.get("fingerprint") != self.fingerprint or changed:
            what = ", ".join(f"{k}={saved.get(k)!r} (now {getattr(self.settings, k)!r})" for k in changed) or \
                "another model"
            raise CLEARDistillError(
                f"the training checkpoint {self.state_file} was made with {what}. Use the same settings to "
                "resume, another output_name for a new run, or turn resume off to start over.")
        self.loss.load_state_dict(state["params"])
        optimizer.load_state_dict(state["optimizer"])
        self.loss.ready = True
        if state.get("weight_dtype"):
            self.loss.weight_dtype = getattr(torch, state["weight_dtype"].replace("torch.", ""))
        self.losses = list(state["losses"])
        log.info("CLEAR Distill: resuming %s at step %d", self.state_file, state["step"])
        return int(state["step"])

    def step(self, step, module, optimizer, params):
        s = self.settings
        b, accum, world = s.batch_size, s.grad_accum, self.world
        default_guidance = 3.5 if self.flux.params.guidance_embed else None
        process_in = self.model.model.latent_format.process_in
        work = []
        for micro in range(accum):
            slots = [((step * accum + micro) * world + self.rank) * b + k for k in range(b)]
            for batch, count in _batches([self.sampler.draw(slot) for slot in slots], process_in, default_guidance):
                work.append((batch, count))
        total = b * accum
        value = torch.zeros((), dtype=torch.float64)
        parts_sum = {}
        for n, (batch, count) in enumerate(work):
            sync = n == len(work) - 1
            with contextlib.nullcontext() if sync or not hasattr(module, "no_sync") else module.no_sync():
                loss, parts = module(batch)
                (loss * (count / total)).backward()
            value += float(loss.detach()) * count / total
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach()) * count / total
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor([float(value)] + [parts_sum[k] for k in ("fm", "distill", "attn")], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                t = t.to(self.loss.device)
            dist.all_reduce(t)
            t = (t / world).cpu()
            value = t[0]
            parts_sum = dict(zip(("fm", "distill", "attn"), t[1:].tolist()))
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(value), parts_sum

    def check_interrupt(self):
        """ComfyUI's interrupt (Cancel in the UI, Ctrl-C on the command line), agreed
        by every process: one rank stopping alone would leave the others waiting in
        DDP's all-reduce, and rank 0 would never save the checkpoint."""
        import comfy.model_management as mm

        if self.world == 1:
            mm.throw_exception_if_processing_interrupted()
            return
        import torch.distributed as dist

        flag = torch.tensor([1.0 if mm.processing_interrupted() else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.to(self.loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException()

    def run(self):
        import comfy.model_management
        import comfy.utils

        s = self.settings
        self.loss = DistillLoss(self.model, s)
        _check_memory(self.loss, self.flux, s, self.dataset)
        params = [p for p in self.loss.parameters() if p.requires_grad]
        optimizer = None
        try:
            self.loss.load()
            optimizer = make_optimizer(s.optimizer, params, s.learning_rate, s.weight_decay)
            start = self.load_state(optimizer)
            module = self.loss
            if self.world > 1:
                from torch.nn.parallel import DistributedDataParallel

                device_ids = [self.loss.device.index] if self.loss.device.type == "cuda" else None
                module = DistributedDataParallel(self.loss, device_ids=device_ids)
            pbar = self.progress if self.progress is not None else comfy.utils.ProgressBar(s.steps)
            step = start
            try:
                while step < s.steps:
                    self.check_interrupt()
                    begin = time.perf_counter()
                    value, parts = self.step(step, module, optimizer, params)
                    step += 1
                    self.losses.append(value)
                    line = (f"CLEAR Distill step {step}/{s.steps}: loss {value:.5f} (fm {parts['fm']:.5f}, "
                            f"distill {parts['distill']:.5f}, attn {parts['attn']:.5f}), "
                            f"{time.perf_counter() - begin:.2f} s")
                    log.info(line)
                    if self.report is not None and self.rank == 0:
                        self.report(line)
                    preview = None
                    if s.preview_every and (step % s.preview_every == 0 or step == s.steps) and self.rank == 0:
                        preview = self.preview()
                    pbar.update_absolute(step, s.steps, preview)
                    if s.checkpoint_every and step % s.checkpoint_every == 0 and step < s.steps:
                        self.save_state(step, optimizer)
            except comfy.model_management.InterruptProcessingException:
                # Raised between steps only (here, in the progress bar, in a preview), so the state
                # is whole. A KeyboardInterrupt (a second Ctrl-C on the command line) may land inside
                # optimizer.step(): it aborts, and the last periodic checkpoint stands.
                self.save_state(step, optimizer)
                log.info("CLEAR Distill: interrupted at step %d; saved %s (run again to resume)", step,
                         self.state_file)
                raise
            final = self.losses[-1] if self.losses else float("nan")
            if self.rank == 0:
                self.save_state(step, optimizer)
                save_output(self.path, self.loss.trained_tensors(), fmt=s.mode, window_size=s.window_size,
                            down_factor=s.down_factor, family=self.family, fingerprint=self.fingerprint,
                            base_hash=_base_hash(self.model), steps=step, final_loss=final,
                            rank=s.rank if s.mode == "lora" else None,
                            alpha=(s.alpha if s.alpha is not None else s.rank) if s.mode == "lora" else None)
                log.info("CLEAR Distill: wrote %s (%d steps, final loss %.5f)", self.path, step, final)
            return DistillResult(self.path, step, final, list(self.losses), self.previews)
        finally:
            self.loss.unload()

    # -- previews

    @torch.no_grad()
    def preview(self):
        """Student, teacher and training-free CLEAR from the same noise on the
        first dataset sample's prompt (a short Euler run); the images, or None."""
        import comfy.samplers

        loss, base = self.loss, self.loss.student.model
        sample = self.dataset[0]
        default_guidance = 3.5 if self.flux.params.guidance_embed else None
        batch, _ = _batches([(sample, sample["latent"], torch.zeros(1))], lambda x: x, default_guidance)[0]
        sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, "simple", PREVIEW_STEPS).float().cpu()
        noise = torch.randn(sample["latent"].shape, generator=_generator(self.settings.seed, "preview"))
        latents = []
        for adapters, clear in ((True, True), (False, False), (False, True)):
            x = noise * sigmas[0]
            for i in range(len(sigmas) - 1):
                v = loss.model_call(x, sigmas[i:i + 1], batch, adapters=adapters, clear=clear).cpu()
                x = x + (sigmas[i + 1] - sigmas[i]) * v
            latents.append(x)
        images = self._decode(torch.cat(latents))
        if images is None:
            return None
        self.previews = images
        from PIL import Image

        row = torch.cat(list(images), 1)  # student | teacher | training-free, side by side
        picture = Image.fromarray((row.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        return ("JPEG", picture, 512)

    def _decode(self, latents):
        latent_format = self.model.model.latent_format
        if self.vae is not None:
            images = self.vae.decode(latent_format.process_out(latents))
            return images.reshape(-1, *images.shape[-3:]).float().cpu()
        factors = getattr(latent_format, "latent_rgb_factors", None)
        if factors is None:
            return None
        factors = torch.tensor(factors, dtype=torch.float32)  # (C, 3)
        if factors.shape[0] != latents.shape[1]:
            return None
        rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors)
        bias = getattr(latent_format, "latent_rgb_factors_bias", None)
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32)
        return ((rgb + 1) / 2).clamp(0, 1)


def _family(flux):
    from .clear_patch import flux_family

    return flux_family(flux)


def distill(model, dataset, settings, output_name, *, resume=True, vae=None, progress=None, report=None):
    """Train CLEAR weights for ``model`` (a ComfyUI ModelPatcher of a FLUX-family
    model) on ``dataset`` (a teacher-data folder or TeacherDataset); write
    models/clear/<output_name>.safetensors and return a DistillResult. Resumes
    from ``<output>.state.pt`` when ``resume``. Under torch.distributed, each
    process trains its shard and rank 0 writes the files. ``report``: called with
    each step's loss line (the node shows it in the UI)."""
    with torch.inference_mode(False), training_mode():
        return _Trainer(model, dataset, settings, output_name, resume, vae, progress, report).run()


# ---------------------------------------------------------------------------
# The node

class CLEARDistill:
    DESCRIPTION = (
        "Distils CLEAR attention weights for the connected FLUX-family model from its own teacher data (the "
        "'CLEAR Distill: Teacher Data' node): trains the image-stream attention projections (and the pooled "
        "keys' weights when down_factor > 1) so that the model with CLEAR local attention matches the model "
        "with full attention. Writes models/clear/<output_name>.safetensors, which the CLEAR Attention Patch "
        "loads. Saves a checkpoint every checkpoint_every steps and on Cancel; queue it again to resume.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("weights", "previews")
    OUTPUT_TOOLTIPS = ("The trained file's name in models/clear (pick it in the CLEAR Attention Patch).",
                       "The last preview: student, teacher and training-free CLEAR from the same noise on the "
                       "first dataset prompt (a black image without previews).")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        d = DistillSettings()
        return {"required": {
            "model": ("MODEL", {"tooltip": "The FLUX-family model to distil (the same one that made the dataset), "
                                           "without the CLEAR Attention Patch."}),
            "dataset": ("CLEAR_DATASET", {"tooltip": "Teacher data from the 'CLEAR Distill: Teacher Data' node."}),
            "output_name": ("STRING", {"default": "clear_local_16_mymodel",
                                       "tooltip": "File name in models/clear (.safetensors added). The checkpoint "
                                                  "<name>.state.pt sits beside it; the same name resumes."}),
            "window_size": ("INT", {"default": d.window_size, "min": 1, "max": 256,
                                    "tooltip": "CLEAR radius in tokens (16 px each) to train for."}),
            "down_factor": ("INT", {"default": d.down_factor, "min": 1, "max": MAX_DOWN_FACTOR,
                                    "tooltip": "Pooled d x d keys (1 = off; the published _down_4 files use 4)."}),
            "mode": (list(MODES), {"default": d.mode, "tooltip": "lora: low-rank adapters (less memory, stacks as "
                                                                  "weight patches); full: the projections' weights."}),
            "rank": ("INT", {"default": d.rank, "min": 1, "max": 3072, "tooltip": "LoRA rank per projection."}),
            "steps": ("INT", {"default": d.steps, "min": 1, "max": 1000000, "tooltip": "Optimiser steps."}),
            "batch_size": ("INT", {"default": d.batch_size, "min": 1, "max": 64, "tooltip": "Samples per micro-step."}),
            "grad_accum": ("INT", {"default": d.grad_accum, "min": 1, "max": 1024,
                                   "tooltip": "Micro-steps per optimiser step."}),
            "optimizer": (list(OPTIMIZERS), {"default": d.optimizer, "tooltip": "prodigy (the authors', lr 1.0), "
                                                                                "adamw (lr ~1e-4), adamw8bit "
                                                                                "(needs bitsandbytes)."}),
            "learning_rate": ("FLOAT", {"default": d.learning_rate, "min": 1e-8, "max": 10.0, "step": 1e-6,
                                        "tooltip": "Prodigy: 1.0; AdamW: ~1e-4."}),
            "loss_fm": ("FLOAT", {"default": d.loss_fm, "min": 0.0, "max": 10.0, "step": 0.05,
                                  "tooltip": "Weight of flow matching against the data."}),
            "loss_distill": ("FLOAT", {"default": d.loss_distill, "min": 0.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "Weight of matching the teacher's prediction."}),
            "loss_attn": ("FLOAT", {"default": d.loss_attn, "min": 0.0, "max": 10.0, "step": 0.05,
                                    "tooltip": "Weight of matching the teacher's attention outputs (single blocks "
                                               "0, 4, 8, ...)."}),
            "checkpoint_every": ("INT", {"default": d.checkpoint_every, "min": 0, "max": 1000000,
                                         "tooltip": "Save <name>.state.pt every N steps (0: only on Cancel and "
                                                    "at the end)."}),
            "preview_every": ("INT", {"default": d.preview_every, "min": 0, "max": 1000000,
                                      "tooltip": "Show a preview every N steps (0: none)."}),
            "seed": ("INT", {"default": d.seed, "min": 0, "max": 2 ** 63 - 1,
                             "tooltip": "Seed of sample order, noise, timesteps and the adapters' start."}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "Decodes the previews; without it they are the latents' rough colours."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, model, dataset, output_name, window_size, down_factor, mode, rank, steps, batch_size, grad_accum,
              optimizer, learning_rate, loss_fm, loss_distill, loss_attn, checkpoint_every, preview_every, seed,
              vae=None, unique_id=None):
        settings = DistillSettings(window_size=window_size, down_factor=down_factor, mode=mode, rank=rank,
                                   steps=steps, batch_size=batch_size, grad_accum=grad_accum, optimizer=optimizer,
                                   learning_rate=learning_rate, loss_fm=loss_fm, loss_distill=loss_distill,
                                   loss_attn=loss_attn, checkpoint_every=checkpoint_every,
                                   preview_every=preview_every, seed=seed)
        result = distill(model, dataset, settings, output_name, vae=vae, report=_ui_text(unique_id))
        previews = result.previews if result.previews is not None else torch.zeros(1, 64, 64, 3)
        return (os.path.basename(result.path), previews)


def _ui_text(node_id):
    """A callable that shows a line of text on the node in the UI (ComfyUI's
    progress text), or None where there is no server (scripts, tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    server = getattr(PromptServer, "instance", None)
    if node_id is None or server is None or not hasattr(server, "send_progress_text"):
        return None
    return lambda text: server.send_progress_text(text, node_id)


NODE_CLASS_MAPPINGS = {"CLEARDistill": CLEARDistill}
NODE_DISPLAY_NAME_MAPPINGS = {"CLEARDistill": "CLEAR Distill"}
