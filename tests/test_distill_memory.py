"""The distillation memory model (nodes/distill_memory.py) held against real
counts: parameter counts of ComfyUI's own Flux modules (tiny, and full size on
the meta device), the tensors autograd keeps in one block forward of the tiny
models, and the state a real optimiser step creates; then the full-size
claims of docs/distill.md and check_fits' error."""

import pytest
import torch

from comfyui_clear.nodes import distill_memory as dm

GB = 1e9


# ---------------------------------------------------------------------------
# Parameter counts against ComfyUI's modules

def _families(comfyui):
    import flux_tiny

    return [f for f in flux_tiny.available_families() if f in ("flux1", "flux2")]


def _tiny(family):
    import flux_tiny

    patcher, _ = flux_tiny.make_tiny_family(family)
    return patcher.model.diffusion_model


def _authors_rows(diffusion_model):
    """Parameters of the authors' set counted on the real module: double blocks'
    img_attn.qkv (weight, bias) and img_attn.proj, single blocks' linear1 rows
    [0, 3*hidden) (weight and bias rows)."""
    h = diffusion_model.hidden_size
    n = 0
    for block in diffusion_model.double_blocks:
        for layer in (block.img_attn.qkv, block.img_attn.proj):
            n += sum(p.numel() for p in layer.parameters())
    for block in diffusion_model.single_blocks:
        n += block.linear1.weight[: 3 * h].numel()
        if block.linear1.bias is not None:
            n += block.linear1.bias[: 3 * h].numel()
    return n


def _lora_params(diffusion_model, rank):
    """r x in + out x r per projection, in/out read from the real layers' weights."""
    h = diffusion_model.hidden_size
    n = 0
    for block in diffusion_model.double_blocks:
        fan_in = block.img_attn.qkv.weight.shape[1]
        n += 3 * rank * (fan_in + block.img_attn.qkv.weight.shape[0] // 3)
        n += rank * sum(block.img_attn.proj.weight.shape)
    for block in diffusion_model.single_blocks:
        n += 3 * rank * (block.linear1.weight.shape[1] + h)
    return n


def test_parameter_counts_equal_the_tiny_modules(comfyui):
    for family in _families(comfyui):
        model = _tiny(family)
        shape = dm.ModelShape.of(model)
        assert shape.total_params() == sum(p.numel() for p in model.parameters()), family
        assert dm.trainable_params(shape, "full")[0] == _authors_rows(model), family
        assert dm.trainable_params(shape, "lora", rank=8)[0] == _lora_params(model, 8), family
        assert dm.trainable_params(shape, "full", down_factor=4)[0] == _authors_rows(model) + 16 * (
            len(model.double_blocks) + len(model.single_blocks))


@pytest.mark.parametrize("name", sorted(dm.SHAPES))
def test_full_size_shapes_build_in_comfyui_with_the_modelled_counts(comfyui, name):
    """Each SHAPES entry built by ComfyUI's Flux class on the meta device (no
    memory): the same parameter count, and ModelShape.of reads the shape back."""
    import comfy.ldm.flux.model
    import comfy.ops

    shape = dm.SHAPES[name]
    config = shape.unet_config()
    config.pop("image_model")
    if shape.global_modulation and "flux2" not in _families(comfyui):  # 0.3.64: no FLUX.2 fields to build it with
        with pytest.raises(TypeError):
            comfy.ldm.flux.model.Flux(device="meta", operations=comfy.ops.disable_weight_init, **config)
        return
    model = comfy.ldm.flux.model.Flux(device="meta", operations=comfy.ops.disable_weight_init, **config)
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    assert dm.ModelShape.of(model) == shape
    assert dm.trainable_params(shape, "full")[0] == _authors_rows(model)


def test_the_advertised_sizes():
    """Sanity of the shapes against what each model is known as (and the issue's numbers)."""
    billions = {k: round(s.total_params() / 1e9, 1) for k, s in dm.SHAPES.items()}
    assert billions == {"flux1-dev": 11.9, "flux2-klein-4b": 3.9, "flux2-klein-9b": 9.1, "flux2-dev": 32.2}
    trainable = {k: round(dm.trainable_params(s, "full")[0] / 1e9, 2) for k, s in dm.SHAPES.items()}
    assert trainable["flux1-dev"] == 1.79 and trainable["flux2-klein-4b"] == 0.75
    assert round(trainable["flux2-dev"], 1) == 6.6
    assert dm.SHAPES["flux1-dev"].capture_blocks() == 10  # single blocks 0, 4, ..., 36


# ---------------------------------------------------------------------------
# Activations: what autograd keeps in one block, measured on the tiny models

TEXT, GRID = 16, (8, 8)
# ComfyUI versions differ in what their blocks keep (see below); the model is within these of each, and
# underestimates by at most UNDER (what check_fits relies on). Measured: 0.33 -0.7..+5.9 %, 0.3.64 -9..-7 %,
# flux038 +6..+15 %.
UNDER, OVER = 0.10, 0.16


@pytest.fixture
def clear_attention_in_blocks(comfyui, monkeypatch):
    """The FLUX blocks' attention call runs CLEAR's differentiable torch path,
    as the student's does (ComfyUI's optimized_attention on the CPU keeps other tensors)."""
    import comfy.ldm.flux.math as flux_math

    from comfyui_clear.kernels.autograd import clear_attention_torch_autograd

    def attention(q, k, v, heads, skip_reshape=True, mask=None, transformer_options=None, **kwargs):
        if type(q).__name__ == "AttentionTensorContainer":  # newer ComfyUI wraps q/k/v
            q, k, v = q.take(), k.take(), v.take()
        B, H, L, D = q.shape
        out = clear_attention_torch_autograd(q, k, v, text_len=TEXT, grid=GRID, window=3, scale=D ** -0.5)
        return out.transpose(1, 2).reshape(B, L, H * D)

    monkeypatch.setattr(flux_math, "optimized_attention", attention)


def _saved_bytes(model, kind):
    """Bytes of the distinct storages autograd saves in one forward of block 0
    of ``kind`` with the input needing a gradient and only the authors'
    layers trainable (parameters themselves excluded: nothing new)."""
    h, N = model.hidden_size, GRID[0] * GRID[1]
    ids = torch.zeros(1, TEXT + N, len(model.params.axes_dim))
    ids[0, TEXT:, -2] = (torch.arange(N) // GRID[1]).float()
    ids[0, TEXT:, -1] = (torch.arange(N) % GRID[1]).float()
    pe = model.pe_embedder(ids)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    vec = torch.randn(1, h, generator=gen)
    if kind == "double":
        block = model.double_blocks[0]
        block.img_attn.qkv.weight.requires_grad_(True)
        block.img_attn.proj.weight.requires_grad_(True)
        if getattr(model.params, "global_modulation", False):
            vec = (model.double_stream_modulation_img(vec), model.double_stream_modulation_txt(vec))
    else:
        block = model.single_blocks[0]
        block.linear1.weight.requires_grad_(True)
        if getattr(model.params, "global_modulation", False):
            vec = model.single_stream_modulation(vec)[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    img = torch.randn(1, N, h, generator=gen, requires_grad=True)
    txt = torch.randn(1, TEXT, h, generator=gen, requires_grad=True)
    saved, keep = {}, []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
            keep.append(t)  # alive until counted: no address reuse
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if kind == "double":
            block(img=img * 1, txt=txt * 1, vec=vec, pe=pe, transformer_options={})
        else:
            block(torch.cat((txt, img), 1), vec=vec, pe=pe, transformer_options={})
    return sum(saved.values())


def test_block_activations_match_what_autograd_keeps(comfyui, clear_attention_in_blocks):
    """block_saved_values (float32 here, the CPU's compute dtype; full mode:
    the trained layers' weights are the parameters) within -UNDER..+OVER of the
    saved tensors of a real block forward, both kinds, both families. What
    the versions differ in: 0.33 adds its residuals in place (the second
    norm's input shares the first's storage: the model, out of place as the
    trainer runs, counts it), 0.3.64's RoPE keeps a float32 copy of k, the
    flux038 path's fused norm keeps no LayerNorm input."""
    N = GRID[0] * GRID[1]
    for family in _families(comfyui):
        model = _tiny(family)
        shape = dm.ModelShape.of(model)
        for kind in ("double", "single"):
            measured = _saved_bytes(model, kind)
            modelled = 4 * dm.block_saved_values(shape, kind, TEXT + N, TEXT, mode="full",
                                                 attention_saves_output=False)
            assert -UNDER <= modelled / measured - 1 <= OVER, (family, kind, measured, modelled)
            # and the measurement is of the right order: several hidden-wide tensors per token
            assert measured > 6 * (TEXT + N) * shape.hidden * 4


def _step_peak(family, mode, grid, text=16):
    """Peak bytes allocated during one training step of the trainer
    (nodes/distill.py: teacher pass, student pass with per-block
    checkpointing, loss, backward) on a tiny model, counted tensor by tensor
    (tests/_memory.py LiveBytes); the step's inputs and the weights exist before."""
    import flux_tiny
    from _memory import LiveBytes

    from comfyui_clear.nodes import distill

    patcher, channels = flux_tiny.make_tiny_family(family)
    flux = patcher.model.diffusion_model
    settings = distill.DistillSettings(mode=mode, rank=4, steps=1, checkpoint_every=0, preview_every=0)
    with torch.inference_mode(False), distill.training_mode():
        loss = distill.DistillLoss(patcher, settings).load()
        try:
            ratio = patcher.model.latent_format.__dict__.get("spacial_downscale_ratio", 16 if family == "flux2" else 8)
            gen = torch.Generator().manual_seed(0)
            x0 = torch.randn(1, channels, grid * 16 // ratio, grid * 16 // ratio, generator=gen)
            batch = {"x0": x0, "noise": torch.randn(x0.shape, generator=gen), "sigma": torch.tensor([0.5]),
                     "context": torch.randn(1, text, flux.params.context_in_dim, generator=gen),
                     "pooled": torch.randn(1, flux.params.vec_in_dim, generator=gen) if flux.params.vec_in_dim
                     else None,
                     "guidance": torch.tensor([3.5]) if flux.params.guidance_embed else None}
            loss(batch)[0].backward()  # first use: the full rows' master copies are made here, not measured
            for p in loss.parameters():
                p.grad = None
            with LiveBytes() as live:
                value, _ = loss(batch)
                value.backward()
            return live.peak, dm.ModelShape.of(flux)
        finally:
            loss.unload()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_training_step_stays_within_the_modelled_activations_and_gradients(comfyui, mode):
    """The trainer's real step on the CPU (float32: compute and base 4 bytes)
    never exceeds estimate()'s activations + gradients, and LoRA's is close to
    it (LoRA on FLUX.1, full on FLUX.2 where ComfyUI builds it). Measured:
    LoRA 11-21 % under the model (FLUX.1 / FLUX.2, grids 8 and 16), full 27-52 %: the model holds every gradient alive at the activation
    peak, which at this size (gradients as large as the activations) is far
    from the truth; at full size the gradients are a separate, exact part."""
    grid, text = 12, 16
    family = "flux2" if mode == "full" and "flux2" in _families(comfyui) else "flux1"  # one each: CI's time
    measured, shape = _step_peak(family, mode, grid, text)
    e = dm.estimate(shape, mode=mode, rank=4, base_bytes_per_param=4, compute_itemsize=4, width=grid * 16,
                    height=grid * 16, text_tokens=text, attention_saves_output=False, optimizer="adamw")
    modelled = e.parts["activations"] + e.parts["gradients"]
    # LoRA: 26 % over on 0.3.64 (it saves fewer of the block's tensors than the model assumes)
    assert 0 <= modelled / measured - 1 <= (0.30 if mode == "lora" else 0.60), (family, measured, modelled)


def test_block_activation_term_is_linear_in_tokens_and_has_no_LxL():
    shape = dm.SHAPES["flux1-dev"]
    one = dm.block_saved_values(shape, "single", 4608, 512)
    four = dm.block_saved_values(shape, "single", 4 * 4608, 4 * 512)
    assert four == 4 * one


# ---------------------------------------------------------------------------
# Optimiser state against a real step

def _params(shape, mode, rank):
    """Float32 tensors shaped like the trainer's: full rows (+ biases) or LoRA
    down (random) / up (zeros) per projection."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _kind, _i, _proj, fan_in, fan_out, has_bias in shape.projections():
        if mode == "full":
            out.append(torch.randn(fan_out, fan_in, generator=gen))
            if has_bias:
                out.append(torch.randn(fan_out, generator=gen))
        else:
            out += [torch.randn(rank, fan_in, generator=gen), torch.zeros(fan_out, rank)]
    return [torch.nn.Parameter(t) for t in out]


def _state_bytes(optimizer):
    """Bytes of the state tensors, without the per-parameter 0-d scalars
    (AdamW's step, Prodigy's p0 of an all-zero parameter): 4 bytes each."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("name", ["adamw", "prodigy"])
def test_optimizer_state_equals_a_real_step(name, mode):
    shape = dm.ModelShape(hidden=64, heads=2, double=2, single=2, mlp_ratio=4.0, bias=True, context_dim=32,
                          vec_dim=16)
    params = _params(shape, mode, rank=4)
    if name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    else:
        prodigyopt = pytest.importorskip("prodigyopt")
        optimizer = prodigyopt.Prodigy(params, lr=1.0, weight_decay=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    n, zeros = dm.trainable_params(shape, mode, rank=4)
    assert n == sum(p.numel() for p in params)
    assert _state_bytes(optimizer) == dm.optimizer_state_bytes(n, zeros, name)


def test_8bit_adamw_state():
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' 8-bit AdamW steps on CUDA")
    p = torch.nn.Parameter(torch.randn(4096, 64, device="cuda"))
    optimizer = bnb.optim.AdamW8bit([p])
    p.grad = torch.randn_like(p)
    optimizer.step()
    assert abs(_state_bytes(optimizer) / dm.optimizer_state_bytes(p.numel(), 0, "adamw8bit") - 1) < 0.05


# ---------------------------------------------------------------------------
# The full-size claims (docs/distill.md's table) and check_fits

def test_flux1_dev_lora_r64_on_fp8_fits_20_gb():
    e = dm.estimate("flux1-dev", mode="lora", rank=64, base_bytes_per_param=1, optimizer="prodigy",
                    width=1024, height=1024, batch_size=1)
    assert e.total <= 20 * GB
    assert e.total == sum(e.parts.values())
    assert max(e.parts, key=e.parts.get) == "base weights"


def test_klein_4b_full_fits_20_gb_with_8bit_adamw_not_with_prodigy():
    """What the model says: the issue's target (Klein 4B full <= 20 GB) holds
    with 8-bit AdamW (bf16 or fp8 base), not with Prodigy's four float32
    states per parameter (docs/distill.md says so)."""
    kw = dict(mode="full", width=1024, height=1024, batch_size=1)
    assert dm.estimate("flux2-klein-4b", base_bytes_per_param=2, optimizer="adamw8bit", **kw).total <= 20 * GB
    assert dm.estimate("flux2-klein-4b", base_bytes_per_param=1, optimizer="adamw8bit", **kw).total <= 20 * GB
    assert dm.estimate("flux2-klein-4b", base_bytes_per_param=1, optimizer="prodigy", **kw).total > 20 * GB


def test_flux1_dev_full_does_not_fit_24_gb():
    e = dm.estimate("flux1-dev", mode="full", base_bytes_per_param=1, optimizer="adamw8bit")
    assert e.total > 24 * GB


def test_block_swap_lowers_the_weights():
    a = dm.estimate("flux2-dev", mode="lora", rank=32, base_bytes_per_param=1)
    b = dm.estimate("flux2-dev", mode="lora", rank=32, base_bytes_per_param=1, block_swap=40)
    assert b.parts["base weights"] < a.parts["base weights"] - 15 * GB
    assert b.parts["activations"] == a.parts["activations"]


def test_estimate_grows_with_what_it_should():
    base = dm.estimate("flux1-dev")
    assert dm.estimate("flux1-dev", batch_size=2).parts["activations"] > 1.8 * base.parts["activations"] - 0.2 * GB
    assert dm.estimate("flux1-dev", width=2048, height=2048).parts["activations"] > 3 * base.parts["activations"]
    assert dm.estimate("flux1-dev", rank=128).parts["optimizer"] == pytest.approx(2 * base.parts["optimizer"], 0.01)
    assert dm.estimate("flux1-dev", base_bytes_per_param=2).parts["base weights"] > base.parts["base weights"] + 11 * GB


def test_check_fits_passes_and_refuses_with_the_setting_to_lower(comfyui):
    e = dm.estimate("flux1-dev", mode="lora", rank=64, base_bytes_per_param=1)
    dm.check_fits(e, 24 * GB)
    with pytest.raises(dm.CLEARMemoryError) as err:
        dm.check_fits(e, 12 * GB)
    text = str(err.value)
    assert "base weights" in text and "fp8 already" in text and "12.0 GB" in text
    assert dm.CLEARMemoryError.__module__ == "builtins"  # @ui_error: the UI shows the bare name

    full = dm.estimate("flux2-klein-4b", mode="full", base_bytes_per_param=2, optimizer="prodigy")
    with pytest.raises(dm.CLEARMemoryError, match="optimizer adamw8bit"):
        dm.check_fits(full, 20 * GB)
    big = dm.estimate("flux1-dev", mode="lora", rank=64, base_bytes_per_param=1, width=4096, height=4096)
    with pytest.raises(dm.CLEARMemoryError, match="lower resolution"):
        dm.check_fits(big, 16 * GB)
    bf16 = dm.estimate("flux1-dev", mode="lora", base_bytes_per_param=2)
    with pytest.raises(dm.CLEARMemoryError, match="fp8"):
        dm.check_fits(bf16, 20 * GB)
