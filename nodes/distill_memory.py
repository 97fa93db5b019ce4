"""GPU memory of one CLEAR distillation step, modelled from the model's shape,
so the trainer can refuse a run that will not fit before it loads anything
more, and docs/distill.md can say what fits where.

The step (nodes/distill.py): a teacher forward without gradients (same weights,
dense attention), a student forward with per-block gradient checkpointing
(only each block's input is kept), the loss, and a backward that recomputes one
block at a time. Terms, in bytes (``MemoryEstimate.parts``):

- ``base weights``: every parameter of the diffusion model at the base's bytes
  per parameter (bf16 2, fp8 1), less the blocks block swap keeps in CPU memory,
  plus the largest layers cast to the compute dtype as they run.
- ``trainable``, ``gradients``: the authors' parameter set (``trainable_params``)
  in float32, as LoRA adapters or as full rows.
- ``optimizer``: AdamW 2 float32 states; 8-bit AdamW 2 one-byte states; Prodigy
  (prodigyopt 1.1) ``s``, ``p0``, ``exp_avg``, ``exp_avg_sq`` in float32, where
  ``p0`` is a 0-d tensor for a parameter that starts all zeros (LoRA's up
  matrices).
- ``checkpoints``: each block's saved input (text and image tokens, hidden wide).
- ``block recompute``: what autograd saves inside one recomputed block, counted
  tensor by tensor from ComfyUI's block code (``block_saved_values``), plus the
  backward's gradient working set.
- ``attention capture``: the student's (with graph) and the teacher's raw
  attention outputs of the single blocks with index % 4 == 0.
- ``teacher pass``: one block's inference peak (nodes/token_chunking.py's model);
  it runs before the student's pass, so the step's activation peak is the larger
  of the two (``activations`` in ``parts`` is that maximum).
- ``attention working set``: CLEAR's torch path chunks (kernels/reference.py,
  ``working_set_budget``): one float32 copy of q, at least 64 MiB.
- ``cuda context``: CUDA context, cuBLAS/cuDNN workspaces and allocator slack,
  a constant (the figure bench/memory_model.py uses), not measured here.

Import-safe: no torch or ComfyUI at module level (``ModelShape.of`` reads a
module it is given).
"""

import dataclasses
import math

from .runtime import ui_error

GB = 1e9
CUDA_CONTEXT = 0.8e9          # as bench/memory_model.py: context + workspaces, typical, not measured here
TEXT_TOKENS = 512             # T5 (FLUX.1), Qwen3 (Klein), Mistral (FLUX.2 [dev]) at ComfyUI's default length
MIN_ATTENTION_BUDGET = 64 << 20  # kernels/reference.py MIN_BUDGET_BYTES
MODES = ("lora", "full")
OPTIMIZERS = ("prodigy", "adamw", "adamw8bit")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the memory of a FLUX-class model depends on: ComfyUI's FluxParams
    fields (comfy/ldm/flux/model.py) under the names of the design."""
    hidden: int
    heads: int
    double: int                 # FluxParams.depth
    single: int                 # FluxParams.depth_single_blocks
    mlp_ratio: float
    bias: bool                  # qkv_bias: attention q/k/v biases
    context_dim: int            # context_in_dim: text encoder width
    vec_dim: int | None         # vec_in_dim: pooled CLIP width (None: FLUX.2)
    in_channels: int = 16       # latent channels before patching
    out_channels: int = 16
    patch_size: int = 2
    guidance: bool = True       # guidance_embed
    ops_bias: bool = True       # biases on every other linear (FLUX.2: none)
    global_modulation: bool = False  # FLUX.2: one shared modulation instead of one per block
    gated_mlp: bool = False     # mlp_silu_act: SiLU-gated MLP, first layer twice as wide

    @classmethod
    def of(cls, diffusion_model):
        """The shape of a ComfyUI ``comfy.ldm.flux.model.Flux`` module (any family)."""
        p = diffusion_model.params
        return cls(hidden=p.hidden_size, heads=p.num_heads, double=len(diffusion_model.double_blocks),
                   single=len(diffusion_model.single_blocks), mlp_ratio=float(p.mlp_ratio), bias=bool(p.qkv_bias),
                   context_dim=p.context_in_dim, vec_dim=p.vec_in_dim, in_channels=p.in_channels,
                   out_channels=p.out_channels, patch_size=p.patch_size, guidance=bool(p.guidance_embed),
                   ops_bias=bool(getattr(p, "ops_bias", True)),
                   global_modulation=bool(getattr(p, "global_modulation", False)),
                   gated_mlp=bool(getattr(p, "mlp_silu_act", False)))

    @property
    def mlp(self):
        """Width of the MLP's hidden layer (input of its second linear)."""
        return int(self.hidden * self.mlp_ratio)

    @property
    def mlp_first(self):
        """Output width of the MLP's first linear (twice ``mlp`` when gated)."""
        return self.mlp * (2 if self.gated_mlp else 1)

    @property
    def head_dim(self):
        return self.hidden // self.heads

    def block_params(self, kind):
        """Parameters of one "double" or "single" block as ComfyUI builds it."""
        h, hd, ob = self.hidden, self.head_dim, self.ops_bias
        qk_norms = 2 * hd                                        # QKNorm: two RMSNorm scales
        if kind == "double":
            if self.gated_mlp:
                mlp = _linear(h, self.mlp_first, False) + _linear(self.mlp, h, False)
            else:
                mlp = _linear(h, self.mlp, True) + _linear(self.mlp, h, True)
            stream = (_linear(h, 3 * h, self.bias) + qk_norms + _linear(h, h, ob) + mlp
                      + (0 if self.global_modulation else _linear(h, 6 * h, True)))
            return 2 * stream
        return (_linear(h, 3 * h + self.mlp_first, ob) + _linear(h + self.mlp, h, ob) + qk_norms
                + (0 if self.global_modulation else _linear(h, 3 * h, True)))

    def total_params(self):
        """Parameters of the whole diffusion model (comfy/ldm/flux/model.py's Flux)."""
        h, ob = self.hidden, self.ops_bias
        n = _linear(self.in_channels * self.patch_size ** 2, h, ob)            # img_in
        n += _linear(256, h, ob) + _linear(h, h, ob)                           # time_in
        if self.vec_dim is not None:
            n += _linear(self.vec_dim, h, True) + _linear(h, h, True)          # vector_in
        if self.guidance:
            n += _linear(256, h, ob) + _linear(h, h, ob)                       # guidance_in
        n += _linear(self.context_dim, h, ob)                                  # txt_in
        n += self.double * self.block_params("double") + self.single * self.block_params("single")
        n += _linear(h, 2 * h, ob) + _linear(h, self.patch_size ** 2 * self.out_channels, ob)  # final_layer
        if self.global_modulation:
            n += 2 * _linear(h, 6 * h, False) + _linear(h, 3 * h, False)      # double (img, txt), single
        return n

    def projections(self):
        """(kind, block, projection, in, out, has_bias) of the authors' set: the
        image stream's q/k/v/out of each double block, q/k/v of each single
        block (ComfyUI: img_attn.qkv rows, img_attn.proj, linear1's first 3*hidden rows)."""
        h = self.hidden
        out = []
        for i in range(self.double):
            out += [("double", i, p, h, h, self.bias) for p in ("q", "k", "v")]
            out.append(("double", i, "out", h, h, self.ops_bias))
        for i in range(self.single):
            out += [("single", i, p, h, h, self.ops_bias) for p in ("q", "k", "v")]
        return out

    def unet_config(self):
        """ComfyUI's unet_config for this shape, as its model detection sets one
        up (comfy/model_detection.py): to build the model through ComfyUI's
        classes (tests; bench/distill_step.py). Needs ComfyUI importable."""
        from .compat import flux_params_extra

        config = {**flux_params_extra(), "image_model": "flux2" if self.global_modulation else "flux",
                  "in_channels": self.in_channels, "out_channels": self.out_channels, "vec_in_dim": self.vec_dim,
                  "context_in_dim": self.context_dim, "hidden_size": self.hidden, "mlp_ratio": self.mlp_ratio,
                  "num_heads": self.heads, "depth": self.double, "depth_single_blocks": self.single,
                  "patch_size": self.patch_size, "qkv_bias": self.bias, "guidance_embed": self.guidance}
        rope = [self.head_dim - 2 * (3 * self.head_dim // 8), 3 * self.head_dim // 8, 3 * self.head_dim // 8]
        if self.global_modulation:  # FLUX.2
            config.update(axes_dim=[self.head_dim // 4] * 4, theta=2000, global_modulation=True,
                          mlp_silu_act=self.gated_mlp, ops_bias=self.ops_bias, default_ref_method="index",
                          ref_index_scale=10.0, txt_ids_dims=[3])
        else:                       # FLUX.1: [16, 56, 56] at head_dim 128
            config.update(axes_dim=rope, theta=10000)
        return config

    def capture_blocks(self):
        """Single blocks whose raw attention output the attention loss compares (i % 4 == 0)."""
        return len(range(0, self.single, 4))


def _linear(i, o, bias):
    return i * o + (o if bias else 0)


# Full-size shapes. ComfyUI reads each from the checkpoint (comfy/model_detection.py:
# hidden_size = img_in.weight rows, num_heads = hidden_size / sum(axes_dim) = hidden/128,
# depth / depth_single_blocks = counted block keys, context_in_dim = txt_in.weight columns;
# FLUX.2: mlp_ratio 3, SiLU-gated MLP, no biases, global modulation, in_channels 128,
# patch 1, 4 RoPE axes of 32; FLUX.1: mlp_ratio 4, qkv bias, patch 2, 16 channels).
# The widths and depths of the released files are those of their published
# transformer configs (diffusers' num_layers / num_single_layers / num_attention_heads
# / joint_attention_dim), cross-checked against each model's advertised size:
# total_params() gives 11.9 B (FLUX.1-dev), 3.9 B (Klein 4B), 9.1 B (Klein 9B), 32 B (FLUX.2 [dev]).
_FLUX2 = dict(mlp_ratio=3.0, bias=False, vec_dim=None, in_channels=128, out_channels=128, patch_size=1,
              ops_bias=False, global_modulation=True, gated_mlp=True)
SHAPES = {
    # FLUX.1-dev: 19 double + 38 single, 3072 wide, 24 heads; T5-XXL 4096, CLIP-L 768.
    "flux1-dev": ModelShape(hidden=3072, heads=24, double=19, single=38, mlp_ratio=4.0, bias=True,
                            context_dim=4096, vec_dim=768),
    # FLUX.2 Klein 4B: 5 + 20 blocks, 3072 wide (24 heads), Qwen3-4B 3 layers x 2560 = 7680.
    "flux2-klein-4b": ModelShape(hidden=3072, heads=24, double=5, single=20, context_dim=7680, guidance=False,
                                 **_FLUX2),
    # FLUX.2 Klein 9B: 8 + 24 blocks, 4096 wide (32 heads), Qwen3-8B 3 x 4096 = 12288.
    "flux2-klein-9b": ModelShape(hidden=4096, heads=32, double=8, single=24, context_dim=12288, guidance=False,
                                 **_FLUX2),
    # FLUX.2 [dev]: 8 + 48 blocks, 6144 wide (48 heads), Mistral Small 3 x 5120 = 15360, guidance embedding.
    "flux2-dev": ModelShape(hidden=6144, heads=48, double=8, single=48, context_dim=15360, guidance=True,
                            **_FLUX2),
}
SHAPE_NAMES = {"flux1-dev": "FLUX.1-dev (and fine-tunes, schnell)", "flux2-klein-4b": "FLUX.2 Klein 4B",
               "flux2-klein-9b": "FLUX.2 Klein 9B", "flux2-dev": "FLUX.2 [dev]"}


def trainable_params(shape, mode, rank=64, down_factor=1):
    """(params, zero-initialised params) of the authors' set: full rows (with
    their biases where the model has them) or one rank-``rank`` LoRA per
    projection (down r x in, up out x r; up starts at zero); plus each layer's
    d x d ``spatial_weight`` when down_factor > 1."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n = zeros = 0
    for _kind, _i, _proj, i, o, has_bias in shape.projections():
        if mode == "full":
            n += _linear(i, o, has_bias)
        else:
            n += rank * (i + o)
            zeros += rank * o
    if down_factor > 1:
        n += (shape.double + shape.single) * down_factor ** 2
    return n, zeros


def optimizer_state_bytes(params, zero_params, optimizer):
    """Bytes of the optimiser's state for ``params`` float32 parameters, of which
    ``zero_params`` belong to tensors that start all zeros."""
    if optimizer == "adamw":
        return 8 * params                                  # exp_avg, exp_avg_sq (float32)
    if optimizer == "adamw8bit":
        return 2 * params + 8 * math.ceil(params / 256)    # two uint8 states + a float32 absmax per 256-value block, each
    if optimizer == "prodigy":
        return 16 * params - 4 * zero_params              # s, p0, exp_avg, exp_avg_sq; p0 0-d on all-zero tensors
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def block_saved_values(shape, kind, tokens, text, mode="lora", rank=64, attention_saves_output=True):
    """Activation values (per batch item) autograd keeps for the backward of
    one block forward with gradients, counted from ComfyUI's block code
    (comfy/ldm/flux/layers.py), with the block input needing a gradient and
    the frozen weights not:

    - a frozen linear keeps nothing of its input (its input gradient needs only
      the weight); a trained one (LoRA or full) keeps its input, and a LoRA
      adapter its rank-wide hidden;
    - LayerNorm/RMSNorm keep their input; modulation keeps only its (B, 1, h) factors;
    - the q/k/v projection's output is one tensor: q and k (RMSNorm inputs) and v
      are views of it; a double block concatenates text and image q/k/v (new tensors);
    - RoPE keeps only its shared table; CLEAR attention keeps its roped q and k
      and v (the torch path recomputes the rest; Flex, on CUDA, also keeps its
      output and a float32 log-sum-exp: ``attention_saves_output``);
    - GELU keeps its input; the SiLU gate (FLUX.2) its input halves and silu(x1);
    - the single block's [attention | MLP] concatenation feeds a frozen linear2: not kept.
    """
    h, L = shape.hidden, tokens
    img = tokens - text
    lora = rank if mode == "lora" else 0
    act = shape.mlp_first + (shape.mlp if shape.gated_mlp else 0)   # activation's kept input (+ silu(x1))
    flex = (h + 2 * shape.heads) if attention_saves_output else 0  # output (B, H, L, D) + lse (float32 = 2 values)
    if kind == "double":
        return (L * (h                 # norm1 input (residual stream), both streams
                     + 3 * h           # q/k/v projection output, both streams
                     + 3 * h           # concatenated and roped q, k; concatenated v
                     + flex
                     + h               # attention output, heads merged (the image part feeds the trained proj)
                     + h               # norm2 input
                     + act)
                + img * (h             # image q/k/v projection input (trained)
                         + 4 * lora))  # LoRA hiddens: q, k, v, out
    return L * (h                      # pre_norm input
                + h                    # linear1 input (its q/k/v rows are trained)
                + 3 * h + shape.mlp_first  # linear1 output (q, k, v, MLP views)
                + 2 * h                # roped q, k
                + flex
                + (shape.mlp if shape.gated_mlp else 0)
                + 3 * lora)


def block_weight_values(shape, kind, base_itemsize, compute_itemsize):
    """Compute-dtype weights the recomputed block's graph keeps until its
    backward: each linear's weight as its forward used it (a frozen linear's
    input gradient needs it). A base in another dtype (fp8) is cast layer by
    layer: the whole block. A base in the compute dtype is used as is, except
    the trained layers, whose weight the trainer rebuilds (base rows + LoRA
    delta, or the full rows, concatenated with the untrained rows): the double
    block's q/k/v and out projections, the single block's whole linear1."""
    h = shape.hidden
    if base_itemsize != compute_itemsize:
        return shape.block_params(kind)
    if kind == "double":
        return 4 * h * h
    return h * (3 * h + shape.mlp_first)


def _attention_capture_values(shape, tokens):
    return 2 * shape.capture_blocks() * tokens * shape.hidden   # student (graph) + teacher, text and image tokens


def block_inference_peak(shape, kind, tokens, text, itemsize):
    """One block's inference peak (the teacher's pass), nodes/token_chunking.py's model."""
    from .token_chunking import block_activation_bytes

    return block_activation_bytes(kind, tokens, itemsize, None, 1, text, h=shape.hidden, m=shape.mlp_first)


@dataclasses.dataclass
class MemoryEstimate:
    parts: dict            # name -> bytes; they sum to ``total``
    total: int
    settings: dict = dataclasses.field(default_factory=dict)  # the estimate's inputs, for check_fits' advice
    detail: dict = dataclasses.field(default_factory=dict)    # the activation terms (student peak or teacher pass)

    def table(self):
        rows = [f"{k:24s} {v / GB:7.2f} GB" for k, v in self.parts.items()]
        rows += [f"  {k:22s} {v / GB:7.2f} GB" for k, v in self.detail.items()]
        return "\n".join(rows + [f"{'total':24s} {self.total / GB:7.2f} GB"])


def estimate(shape, *, mode="lora", rank=64, base_bytes_per_param=1, optimizer="prodigy", width=1024, height=1024,
             batch_size=1, text_tokens=TEXT_TOKENS, down_factor=1, block_swap=0, compute_itemsize=2,
             attention_saves_output=True, cuda_context=CUDA_CONTEXT):
    """Modelled peak GPU bytes of one training step (see the module docstring)."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    B, c = batch_size, compute_itemsize
    tokens = text_tokens + (width // 16) * (height // 16)
    h = shape.hidden

    # Weights: block swap keeps the last ``block_swap`` blocks on the CPU (two in flight on the GPU).
    swapped_singles = min(block_swap, shape.single)
    swapped_doubles = min(block_swap - swapped_singles, shape.double)
    swapped = swapped_singles * shape.block_params("single") + swapped_doubles * shape.block_params("double")
    in_flight = 2 * shape.block_params("single" if swapped_singles else "double") if block_swap else 0
    largest_layer = h * max(3 * h + shape.mlp_first, shape.mlp_first)          # single linear1 (or an MLP fc1)
    base = (shape.total_params() - swapped + in_flight) * base_bytes_per_param + 2 * largest_layer * c
    params, zeros = trainable_params(shape, mode, rank, down_factor)

    def recompute_bytes(kind):
        return (B * c * block_saved_values(shape, kind, tokens, text_tokens, mode, rank, attention_saves_output)
                + c * block_weight_values(shape, kind, base_bytes_per_param, c))

    recompute = max(recompute_bytes("double"), recompute_bytes("single"))
    checkpoints = B * c * (shape.double + shape.single) * tokens * h       # each block's saved input
    # d(input), d(output) and the largest intermediate gradient of the block; the largest rebuilt
    # weight's gradient (compute dtype) and its trained rows' float32 gradient
    grad_working = (B * c * (2 * tokens * h + tokens * (3 * h + shape.mlp_first))
                    + c * h * (3 * h + shape.mlp_first) + 4 * 3 * h * h)
    capture = B * c * _attention_capture_values(shape, tokens)             # student + teacher halves
    around = B * c * 2 * tokens * h                                        # embeddings, final layer input
    student = checkpoints + recompute + grad_working + capture + around
    teacher = around + capture // 2 + B * max(block_inference_peak(shape, k, tokens, text_tokens, c)
                                              for k in ("double", "single"))
    rope = B * tokens * shape.head_dim // 2 * 4 * 4                        # EmbedND's float32 table
    attention = min(max(B * tokens * h * 4, MIN_ATTENTION_BUDGET), B * shape.heads * tokens * tokens * 4 // 2)
    parts = {
        "base weights": int(base),
        "trainable": 4 * params,
        "gradients": 4 * params,
        "optimizer": optimizer_state_bytes(params, zeros, optimizer),
        "activations": int(max(student, teacher) + rope + attention),
        "cuda context": int(cuda_context),
    }
    detail = {"checkpoints": checkpoints, "block recompute": recompute, "gradient working set": grad_working,
              "attention capture": capture, "around the blocks": around, "teacher pass": int(teacher),
              "rope table": rope, "attention working set": attention}
    total = sum(parts.values())
    settings = dict(mode=mode, rank=rank, base_bytes_per_param=base_bytes_per_param, optimizer=optimizer,
                    width=width, height=height, batch_size=batch_size, block_swap=block_swap)
    return MemoryEstimate(parts, int(total), settings, detail)


@ui_error
class CLEARMemoryError(ValueError):
    """A distillation run that will not fit the GPU's free memory."""


_ADVICE = {
    "base weights": "load the base model in fp8 (weight_dtype fp8_e4m3fn in the model loader)",
    "optimizer": "use optimizer adamw8bit, or mode lora",
    "trainable": "use mode lora (full trains every q/k/v/out row, in float32)",
    "gradients": "use mode lora",
    "activations": "lower batch_size, or generate the teacher data at a lower resolution",
    "cuda context": "close other programs using the GPU",
}


def check_fits(estimate, free_bytes, margin=1.0):
    """Raise CLEARMemoryError when ``estimate`` exceeds ``free_bytes``: the
    message names the biggest parts and the setting to lower for each."""
    need = estimate.total * margin
    if need <= free_bytes:
        return
    keys = ("base weights", "trainable", "gradients", "optimizer", "activations")
    biggest = sorted(keys, key=lambda k: -estimate.parts[k])[:3]
    s = estimate.settings
    where = ", ".join(f"{k} {estimate.parts[k] / GB:.1f} GB" for k in biggest)
    advice = []
    for k in biggest:
        tip = _ADVICE[k]
        if k in ("trainable", "gradients", "optimizer") and s.get("mode") == "lora":
            tip = f"lower rank (now {s.get('rank')})" + (", or use optimizer adamw8bit" if k == "optimizer" else "")
        if k == "activations" and s.get("batch_size", 1) == 1:
            tip = f"generate the teacher data at a lower resolution (now {s.get('width')}x{s.get('height')})"
        if k == "base weights" and s.get("base_bytes_per_param", 2) <= 1:
            tip = ("the base is fp8 already: free GPU memory (close other programs, unload other models) or use "
                   "a GPU with more memory")
        if tip not in advice:
            advice.append(tip)
    raise CLEARMemoryError(
        f"CLEAR Distill needs about {need / GB:.1f} GB of GPU memory (modelled) and {free_bytes / GB:.1f} GB is "
        f"free. Biggest parts: {where}. To fit: {'; '.join(advice)}.")


def available_cuda_bytes(device):
    """What this process can have on a CUDA ``device``: free memory plus what
    torch already holds there (ComfyUI unloads its other models for the
    trainer), but not what other programs use."""
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


# ---------------------------------------------------------------------------
# Time per step, modelled from FLOPs (docs/distill.md; not yet measured on a GPU)

# Dense bf16 tensor-core peak (FP32 accumulate, no sparsity), TFLOPS, from the vendors'
# architecture whitepapers / datasheets; and the memory users have on them (GB).
GPUS = {
    "RTX 3090": (71, 24),
    "RTX 4090": (165, 24),
    "RTX 5090": (209, 32),
    "A100": (312, 80),
    "H100 SXM": (989, 80),
}
UTILIZATION = 0.45          # achieved share of peak assumed for this mix (large GEMMs, checkpointing, attention)
PCIE_BYTES_PER_S = 25e9     # host -> GPU copy rate assumed for block swap (PCIe 4.0 x16, pinned, effective)


def step_flops(shape, *, mode="lora", rank=64, width=1024, height=1024, batch_size=1, window_size=16,
               text_tokens=TEXT_TOKENS):
    """FLOPs of one training step: teacher forward (dense attention) + student
    forward (CLEAR) + its recompute + backward (input gradients through every
    block, weight gradients of the trained set; CLEAR's backward ~2x its forward)."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    N = (width // 16) * (height // 16)
    L = text_tokens + N
    h = shape.hidden
    block_params = shape.double * shape.block_params("double") + shape.single * shape.block_params("single")
    linear = 2 * block_params * L                                # one forward's matmuls
    layers = shape.double + shape.single
    dense_attention = layers * 4 * L * L * h                     # QK^T and PV
    keys = text_tokens + min(N, math.pi * window_size ** 2)      # CLEAR: text keys + the local disc
    clear_attention = layers * 4 * (N * keys + text_tokens * L) * h
    trained = trainable_params(shape, mode, rank)[0]
    weight_grads = 2 * trained * L
    teacher = linear + dense_attention
    student = linear + clear_attention
    backward = linear + 2 * clear_attention + weight_grads
    return batch_size * (teacher + 2 * student + backward)


def step_seconds(shape, gpu, block_swap=0, **kwargs):
    """Modelled seconds per step on ``gpu`` (a GPUS key): FLOPs at UTILIZATION of
    peak, plus the swapped blocks' fp8 weights copied in three times (teacher,
    student forward, recompute) at PCIE_BYTES_PER_S."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    tflops, _ = GPUS[gpu]
    compute = step_flops(shape, **kwargs) / (tflops * 1e12 * UTILIZATION)
    swapped = min(block_swap, shape.single) * shape.block_params("single") + \
        max(0, min(block_swap - shape.single, shape.double)) * shape.block_params("double")
    return compute + 3 * swapped / PCIE_BYTES_PER_S


def min_block_swap(shape, free_bytes, **kwargs):
    """Fewest blocks to swap to the CPU for ``estimate(shape, ...)`` to fit, or None."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    for n in range(shape.double + shape.single + 1):
        if estimate(shape, block_swap=n, **kwargs).total <= free_bytes:
            return n
    return None


# The runs docs/distill.md tabulates: (shape, label, estimate() settings).
RUNS = [
    ("flux1-dev", "LoRA r64, fp8 base, Prodigy", dict(mode="lora", rank=64, base_bytes_per_param=1)),
    ("flux1-dev", "LoRA r64, bf16 base, Prodigy", dict(mode="lora", rank=64, base_bytes_per_param=2)),
    ("flux1-dev", "full, fp8 base, 8-bit AdamW", dict(mode="full", base_bytes_per_param=1, optimizer="adamw8bit")),
    ("flux1-dev", "full, fp8 base, Prodigy", dict(mode="full", base_bytes_per_param=1)),
    ("flux2-klein-4b", "full, bf16 base, 8-bit AdamW", dict(mode="full", base_bytes_per_param=2,
                                                            optimizer="adamw8bit")),
    ("flux2-klein-4b", "full, fp8 base, 8-bit AdamW", dict(mode="full", base_bytes_per_param=1,
                                                           optimizer="adamw8bit")),
    ("flux2-klein-4b", "full, bf16 base, Prodigy", dict(mode="full", base_bytes_per_param=2)),
    ("flux2-klein-4b", "LoRA r64, bf16 base, Prodigy", dict(mode="lora", rank=64, base_bytes_per_param=2)),
    ("flux2-klein-9b", "LoRA r64, fp8 base, Prodigy", dict(mode="lora", rank=64, base_bytes_per_param=1)),
    ("flux2-klein-9b", "full, fp8 base, 8-bit AdamW", dict(mode="full", base_bytes_per_param=1,
                                                           optimizer="adamw8bit")),
    ("flux2-dev", "LoRA r64, fp8 base, Prodigy", dict(mode="lora", rank=64, base_bytes_per_param=1)),
]


def markdown_tables(width=1024, height=1024):
    """The memory and time tables of docs/distill.md, as markdown."""
    gpu_names = list(GPUS)
    out = ["| model | run | weights | trainable + grads + optimiser | activations | total (modelled) | fits |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, label, kw in RUNS:
        e = estimate(name, width=width, height=height, **kw)
        p = e.parts
        fits = [g for g in (16, 24, 32, 48, 80) if e.total <= g * GB]
        if fits:
            where = f"{fits[0]} GB"
        else:
            swap = min_block_swap(name, 24 * GB, width=width, height=height, **kw)
            where = f"24 GB only with block swap ({swap} blocks)*" if swap is not None else "no single GPU"
        out.append(f"| {SHAPE_NAMES[name]} | {label} | {p['base weights'] / GB:.1f} GB | "
                   f"{(p['trainable'] + p['gradients'] + p['optimizer']) / GB:.1f} GB | {p['activations'] / GB:.1f} GB |"
                   f" {e.total / GB:.1f} GB | {where} |")
    out += ["", "| model | run | PFLOP / sample | " + " | ".join(f"{g} s/step" for g in gpu_names) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in gpu_names) + " |"]
    for name, label, kw in RUNS:
        if "Prodigy" in label and "bf16" in label and name != "flux2-klein-4b":
            continue
        e = estimate(name, width=width, height=height, **kw)
        flops = step_flops(name, mode=kw["mode"], rank=kw.get("rank", 64), width=width, height=height)
        cells = []
        for g in gpu_names:
            tflops, mem = GPUS[g]
            swap = 0 if e.total <= mem * GB else min_block_swap(name, mem * GB, width=width, height=height, **kw)
            cells.append("does not fit" if swap is None else
                         f"{step_seconds(name, g, block_swap=swap, mode=kw['mode'], width=width, height=height):.1f}"
                         + (f" (swap {swap})*" if swap else ""))
        out.append(f"| {SHAPE_NAMES[name]} | {label} | {flops / 1e15:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":  # python -m comfyui_clear.nodes.distill_memory: the tables of docs/distill.md
    print(markdown_tables())
