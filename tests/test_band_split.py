"""CLEAR Multi-GPU Split: one image as P row bands (threads on the CPU standing
in for GPUs) gives the single-device CLEAR result.

- the band attention alone against ``clear_attention`` on the whole sequence
  (P = 2, 3, 4; bands thinner than the halo; pooled blocks straddling bands;
  no text), and the bytes it exchanges against bench/band_volume.py's model;
- one Euler step of the tiny FLUX through ComfyUI's sampling (comfy.sample)
  split vs unsplit: odd grids, batch 2, d = 4 with unaligned bands, double
  and single blocks, with token chunking, a LoRA and a ControlNet;
- clear errors: no CLEAR patch, ComfyUI without the multi-GPU engine.
"""

import importlib.util
import os
import threading

import pytest
import torch

from comfyui_clear.kernels import clear_attention
from comfyui_clear.kernels.band import Exchange, band_rows, clear_attention_band

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _volume():
    spec = importlib.util.spec_from_file_location("band_volume", os.path.join(REPO, "bench", "band_volume.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bands(q, k, v, parts, **kw):
    """Each band's rows through clear_attention_band, one thread per band."""
    T, (h, w) = kw["text_len"], kw["grid"]
    bands = band_rows(h, parts)
    exchange = Exchange(len(bands), timeout=60)
    outs, errors = [None] * len(bands), []

    def work(rank):
        y0, y1 = bands[rank]
        sel = torch.cat([torch.arange(T), T + torch.arange(y0 * w, y1 * w)])
        try:
            outs[rank] = clear_attention_band(q[:, :, sel], k[:, :, sel], v[:, :, sel], rank=rank, bands=bands,
                                              exchange=exchange, **kw)
        except BaseException as exc:
            errors.append(exc)
            exchange.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bands))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for o in outs[1:]:  # every worker ends with the same text rows
        assert torch.equal(o[:, :, :T], outs[0][:, :, :T])
    return torch.cat([outs[0][:, :, :T]] + [o[:, :, T:] for o in outs], 2), exchange


CASES = [  # (grid, r, d, T)
    ((7, 9), 3, 1, 5),
    ((11, 5), 5, 1, 5),   # P=4: bands of 3 and 2 rows, halo 4 rows: from two neighbours
    ((13, 6), 2, 4, 5),   # pooled 4x4 blocks straddle every band edge
    ((9, 7), 6, 3, 3),    # odd grid, d=3, halo past the next band
    ((5, 4), 8, 4, 0),    # no text; radius larger than the grid
]


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("grid,r,d,T", CASES)
def test_band_attention_matches_one_device(parts, grid, r, d, T):
    B, H, D = 2, 2, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T + grid[0] * grid[1], D, generator=gen, dtype=torch.float64) for _ in range(3))
    sw = (torch.rand(d, d, generator=gen, dtype=torch.float64) + 0.5) / d ** 2 if d > 1 else None
    kw = dict(text_len=T, grid=grid, window=r, down_factor=d, spatial_weight=sw, scale=D ** -0.5)
    want = clear_attention(q, k, v, **kw)
    got, exchange = _run_bands(q, k, v, parts, **kw)
    assert (got - want).abs().max().item() < 1e-12
    # bytes each worker read from the others = the volume model, float64 activations
    assert exchange.received == _volume().band_bytes(parts, grid, T, r, d, batch=B, heads=H, head_dim=D,
                                                     itemsize=8, exact_itemsize=8)
    if parts > 1:
        assert min(exchange.received) > 0


def test_band_attention_bfloat16():
    B, H, D, T, grid = 1, 2, 32, 4, (10, 6)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T + 60, D, generator=gen).to(torch.bfloat16) for _ in range(3))
    kw = dict(text_len=T, grid=grid, window=3, down_factor=2, spatial_weight=None, scale=D ** -0.5)
    want = clear_attention(q, k, v, **kw).double()
    got, exchange = _run_bands(q, k, v, 3, **kw)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
    assert exchange.received == _volume().band_bytes(3, grid, T, 3, 2, batch=B, heads=H, head_dim=D, itemsize=2)


def test_band_rows():
    assert band_rows(9, 4) == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert band_rows(2, 4) == [(0, 1), (1, 2)]  # never an empty band
    with pytest.raises(ValueError, match="parts"):
        band_rows(4, 0)


def test_volume_model_8k_sketch():
    """The issue's sketch (bf16, 8K, r=16, 2 GPUs) is of the same order as the model."""
    vol = _volume()
    two = max(vol.band_bytes(2, (512, 512), 512, 16))
    assert 50e6 < two < 250e6
    assert vol.ulysses_bytes(2, (512, 512), 512) == pytest.approx(1.614e9, rel=1e-3)
    assert "| 8K (8192x8192) | 4 |" in vol.tables()


# ---------------------------------------------------------------------------
# Through ComfyUI

@pytest.fixture
def env(comfyui, monkeypatch):
    """On a ComfyUI without the multi-GPU engine (0.3.64) the node refuses
    (test_refuses_without_engine); the CPU band machinery below that refusal
    is still run there, on that ComfyUI's FLUX."""
    import flux_tiny

    from comfyui_clear.nodes import band_split, clear_patch
    if not band_split.has_engine():
        monkeypatch.setattr(band_split, "_require_engine", lambda: None)
    return flux_tiny, clear_patch, band_split


@pytest.fixture
def exchanges(monkeypatch):
    """Every Exchange the split creates."""
    from comfyui_clear.kernels import band
    made = []
    real = band.Exchange.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        made.append(self)
    monkeypatch.setattr(band.Exchange, "__init__", init)
    return made


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("parts,shape,r,d", [
    (2, (2, 16, 18, 14), 3, 1),   # batch 2, 9x7 grid
    (3, (1, 16, 17, 15), 2, 4),   # odd latent (padded to 9x8), 4x4 pooling over 3-row bands
    (4, (1, 16, 18, 10), 5, 1),   # 9 rows in 4 bands, halo 4 rows: several neighbours
    (4, (2, 16, 14, 12), 3, 2),   # batch 2, 7 rows, 2x2 pooling, one-row bands
])
def test_sampling_split_matches_one_device(env, exchanges, parts, shape, r, d):
    flux_tiny, clear_patch, band_split = env
    clear = clear_patch.patch_model(flux_tiny.make_tiny_flux(), "none (training-free)", window_size=r, down_factor=d)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    positive = flux_tiny.conditioning(5, seed=2)
    want = flux_tiny.sample_one_step(clear, latent, positive)
    got = flux_tiny.sample_one_step(band_split.split_model(clear, parts), latent, positive)
    assert len(exchanges) == 1 and exchanges[0].parts == parts
    assert exchanges[0].calls == [4] * parts  # 2 double + 2 single blocks, each band through CLEAR
    assert _rel(got, want) < 1e-5
    plain = flux_tiny.sample_one_step(flux_tiny.make_tiny_flux(), latent, positive)
    assert _rel(plain, want) > 1e-3  # CLEAR matters here, so the split had to reproduce it


def test_split_bytes_match_volume_model(env, exchanges):
    flux_tiny, clear_patch, band_split = env
    clear = clear_patch.patch_model(flux_tiny.make_tiny_flux(), "none (training-free)", window_size=3, down_factor=2)
    latent = torch.randn(1, 16, 18, 14, generator=torch.Generator().manual_seed(1))
    flux_tiny.sample_one_step(band_split.split_model(clear, 3), latent, flux_tiny.conditioning(5, seed=2))
    heads = flux_tiny.TINY["heads"]
    per_layer = _volume().band_bytes(3, (9, 7), 5, 3, 2, heads=heads, head_dim=flux_tiny.TINY["hidden"] // heads,
                                     itemsize=4)
    assert exchanges[0].received == [4 * b for b in per_layer]  # 4 attention layers


def test_split_with_chunking_lora_controlnet(env, exchanges):
    """Token chunking (either order), a LoRA-like weight patch and a ControlNet's
    per-token residuals: the split gives the unsplit result."""
    flux_tiny, clear_patch, band_split = env
    from comfyui_clear.nodes import token_chunking

    model = flux_tiny.make_tiny_flux()
    gen = torch.Generator().manual_seed(9)
    lora = {}
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name:
            w = module.weight
            lora[f"diffusion_model.{name}.weight"] = (0.05 * torch.randn(w.shape, generator=gen) / w.shape[1] ** 0.5,)
    model = model.clone()
    model.add_patches(lora, 1.0)
    clear = clear_patch.patch_model(model, "none (training-free)", window_size=3)
    control = flux_tiny.make_tiny_controlnet()
    latent = torch.randn(1, 16, 16, 12, generator=torch.Generator().manual_seed(12))
    hint = torch.rand(1, 3, 16, 12, generator=torch.Generator().manual_seed(13))
    plain = flux_tiny.conditioning(5, seed=14)
    positive = [[plain[0][0], {**plain[0][1], "control": control.copy().set_cond_hint(hint, 1.0, (0.0, 1.0)),
                               "control_apply_to_uncond": False}]]
    want = flux_tiny.sample_one_step(clear, latent, positive)
    assert _rel(want, flux_tiny.sample_one_step(clear, latent, plain)) > 1e-3  # the ControlNet matters
    split_then_chunk = token_chunking.patch_model(band_split.split_model(clear, 2), 16)
    chunk_then_split = band_split.split_model(token_chunking.patch_model(clear, 16), 3)
    for patched in (split_then_chunk, chunk_then_split):
        got = flux_tiny.sample_one_step(patched, latent, positive)
        assert _rel(got, want) < 1e-5
    assert [e.parts for e in exchanges] == [2, 3]


def test_split_before_clear_node(env, exchanges):
    """The node order does not matter: split first, CLEAR patch after."""
    flux_tiny, clear_patch, band_split = env
    model = flux_tiny.make_tiny_flux()
    latent = torch.randn(1, 16, 12, 12, generator=torch.Generator().manual_seed(3))
    positive = flux_tiny.conditioning(4, seed=4)
    want = flux_tiny.sample_one_step(clear_patch.patch_model(model, "none (training-free)", window_size=2),
                                     latent, positive)
    got = flux_tiny.sample_one_step(
        clear_patch.patch_model(band_split.split_model(model, 2), "none (training-free)", window_size=2),
        latent, positive)
    assert _rel(got, want) < 1e-5 and len(exchanges) == 1


def test_refuses_without_clear(env):
    flux_tiny, clear_patch, band_split = env
    latent = torch.randn(1, 16, 8, 8)
    with pytest.raises(band_split.BandSplitError, match="CLEAR Attention Patch"):
        flux_tiny.sample_one_step(band_split.split_model(flux_tiny.make_tiny_flux(), 2), latent,
                                  flux_tiny.conditioning(4, seed=4))


def test_node_interface_and_bad_inputs(env):
    flux_tiny, clear_patch, band_split = env
    from comfyui_clear.nodes import NODE_CLASS_MAPPINGS
    node = NODE_CLASS_MAPPINGS["CLEARMultiGPUSplit"]
    tooltip = node.INPUT_TYPES()["required"]["gpus"][1]["tooltip"]
    assert "full model weights" in tooltip and "identical GPUs" in tooltip
    model = flux_tiny.make_tiny_flux()
    (out,) = node().patch(model, 2)
    assert out is not model and not model.model_options.get("transformer_options", {}).get("wrappers")
    for bad in (0, 1.5, True):
        with pytest.raises(band_split.BandSplitError, match="gpus"):
            band_split.split_model(model, bad)


@pytest.mark.parametrize("missing", ["module", "function"])
def test_refuses_without_engine(comfyui, monkeypatch, missing):
    """A ComfyUI without comfy/multigpu.py, or one whose comfy.multigpu lacks
    create_multigpu_deepclones: one error naming what is missing. On 0.3.64
    the module is really absent; otherwise it is hidden or emptied."""
    import sys
    import types

    import flux_tiny
    from comfyui_clear.nodes import band_split
    if band_split.has_engine():
        import comfy

        engine = None if missing == "module" else types.ModuleType("comfy.multigpu")  # None: import fails;
        monkeypatch.setitem(sys.modules, "comfy.multigpu", engine)  # else a module without what the split uses
        monkeypatch.setattr(comfy, "multigpu", engine)
    assert not band_split.has_engine()
    with pytest.raises(band_split.BandSplitError, match=r"needs ComfyUI's multi-GPU support \(comfy/multigpu\.py "
                                                        r"with create_multigpu_deepclones, in ComfyUI 0\.23\.0"):
        band_split.split_model(flux_tiny.make_tiny_flux(), 2)


def test_core_multigpu_clones_run_the_bands(comfyui, monkeypatch, exchanges):
    """The engine path: ComfyUI core's create_multigpu_deepclones makes a fresh
    model per extra device (a second CPU device index stands in for a GPU),
    with the LoRA's weight patches; each band runs on its own device's clone.
    On a ComfyUI without the engine the node refuses instead."""
    import comfy.model_management
    import flux_tiny

    from comfyui_clear.nodes import band_split, clear_patch
    if not band_split.has_engine():
        with pytest.raises(band_split.BandSplitError, match=r"create_multigpu_deepclones"):
            band_split.split_model(flux_tiny.make_tiny_flux(), 2)
        return
    cpu, stand_in = torch.device("cpu"), torch.device("cpu", 0)  # unequal devices, both the CPU
    monkeypatch.setattr(comfy.model_management, "get_all_torch_devices", lambda exclude_current=False: [cpu, stand_in])
    base = flux_tiny.make_tiny_flux()
    base.cached_patcher_init = (flux_tiny.make_tiny_flux, ())  # as core loaders register it
    gen = torch.Generator().manual_seed(9)
    lora = {f"diffusion_model.{name}.weight": (0.1 * torch.randn(m.weight.shape, generator=gen) / m.weight.shape[1] ** 0.5,)
            for name, m in base.model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear) and "blocks." in name}
    base.add_patches(lora, 1.0)
    clear = clear_patch.patch_model(base, "none (training-free)", window_size=3)
    latent = torch.randn(2, 16, 18, 14, generator=torch.Generator().manual_seed(1))
    positive = flux_tiny.conditioning(5, seed=2)
    want = flux_tiny.sample_one_step(clear, latent, positive)
    split = band_split.split_model(clear, 2)
    assert [m.load_device for m in split.get_additional_models_with_key("multigpu")] == [stand_in]
    ran = []
    real = band_split._band_forward
    monkeypatch.setattr(band_split, "_band_forward", lambda *a, flux, **k: ran.append(flux) or real(*a, flux=flux, **k))
    try:
        got = flux_tiny.sample_one_step(split, latent, positive)
    finally:
        comfy.model_management.unload_all_models()
    # the bands run at once (the worker thread may record first): one on the main model, one on the clone
    assert len(ran) == 2 and sum(flux is clear.model.diffusion_model for flux in ran) == 1 and ran[1] is not ran[0]
    assert _rel(got, want) < 1e-5 and [e.parts for e in exchanges] == [2]
    # the LoRA reached the clone: without it the result moves
    assert _rel(flux_tiny.sample_one_step(clear_patch.patch_model(flux_tiny.make_tiny_flux(), "none (training-free)",
                                                                  window_size=3), latent, positive), want) > 1e-3


def _tiny_with_ops(flux_tiny, weight_dtype=None, operations=None, quantize=None):
    """The tiny FLUX with its block weights stored as fp8 or GGUF (ComfyUI's own
    manual-cast ops or ComfyUI-GGUF's ops), computing in float32."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(flux_tiny.tiny_unet_config())
    config.set_inference_dtype(weight_dtype or torch.float32, torch.float32)
    if operations is not None:
        config.custom_operations = operations
    model = config.get_model({})
    sd = {key: quantize(value) if "blocks." in key and key.endswith(".weight") and value.dim() == 2 else value
          for key, value in flux_tiny.make_tiny_flux().model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(sd, strict=False)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, cpu, cpu)


@pytest.mark.parametrize("weights", ["fp8", "gguf"])
def test_split_quantized_weights(env, exchanges, weights):
    """fp8 weights (ComfyUI's manual-cast layers) and GGUF Q8_0 weights
    (ComfyUI-GGUF's layers): the split gives the unsplit result."""
    flux_tiny, clear_patch, band_split = env
    if weights == "fp8":
        model = _tiny_with_ops(flux_tiny, torch.float8_e4m3fn, quantize=lambda w: w.to(torch.float8_e4m3fn))
    else:
        from _gguf import import_comfyui_gguf
        ops = import_comfyui_gguf().ops  # skips without ComfyUI-GGUF or the gguf package
        import gguf
        q8 = gguf.GGMLQuantizationType.Q8_0
        model = _tiny_with_ops(flux_tiny, operations=ops.GGMLOps, quantize=lambda w: ops.GGMLTensor(
            torch.from_numpy(gguf.quants.quantize(w.numpy(), q8)), tensor_type=q8, tensor_shape=w.shape))
    clear = clear_patch.patch_model(model, "none (training-free)", window_size=3)
    latent = torch.randn(1, 16, 14, 12, generator=torch.Generator().manual_seed(17))
    positive = flux_tiny.conditioning(4, seed=18)
    want = flux_tiny.sample_one_step(clear, latent, positive)
    got = flux_tiny.sample_one_step(band_split.split_model(clear, 3), latent, positive)
    assert _rel(got, want) < 1e-5 and [e.parts for e in exchanges] == [3]
    full = clear_patch.patch_model(flux_tiny.make_tiny_flux(), "none (training-free)", window_size=3)
    assert _rel(want, flux_tiny.sample_one_step(full, latent, positive)) > 1e-4  # really the quantized weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_text_partial_fused_and_loop_agree(dtype):
    """The text queries' partial attention: PyTorch's fused op (with its
    log-sum-exp) and the plain loop both equal softmax over the keys, and the
    fused op passes its first-use check here."""
    from comfyui_clear.kernels import band
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 6, 32, generator=gen).to(dtype)
    groups = [torch.randn(2, 3, n, 32, generator=gen).to(dtype) for n in (5, 40)]
    values = [torch.randn(2, 3, n, 32, generator=gen).to(dtype) for n in (5, 40)]
    s = (q.double() @ torch.cat(groups, 2).double().transpose(-1, -2)) * 0.2
    want = torch.softmax(s, -1) @ torch.cat(values, 2).double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
    assert band._fused_ok(q)
    for fused in (True, False):
        out, lse = band.text_partial(q, groups, values, 0.2, fused=fused)
        assert ((out.double() - want).norm() / want.norm()).item() < tol
        assert (lse.double() - torch.logsumexp(s, -1)).abs().max().item() < 100 * tol


def test_a_failing_band_stops_all_bands_with_its_error(env, monkeypatch):
    """One worker fails in an attention layer: the others leave the barrier and
    the step raises that worker's error (no hang, no ExchangeAborted)."""
    flux_tiny, clear_patch, band_split = env
    from comfyui_clear.kernels import band

    real = band.clear_attention_band

    def flaky(*a, rank, exchange, **k):
        if rank == 2 and exchange.calls[rank] == 2:  # in the second layer
            raise RuntimeError("out of memory on worker 2")
        return real(*a, rank=rank, exchange=exchange, **k)
    monkeypatch.setattr(band, "clear_attention_band", flaky)
    clear = clear_patch.patch_model(flux_tiny.make_tiny_flux(), "none (training-free)", window_size=2)
    with pytest.raises(RuntimeError, match="out of memory on worker 2"):
        flux_tiny.sample_one_step(band_split.split_model(clear, 3), torch.randn(1, 16, 12, 12),
                                  flux_tiny.conditioning(4, seed=4))


def test_split_with_cfg_and_a_negative_prompt(env, exchanges):
    """CFG 3 with a different negative: cond and uncond both go through the split."""
    flux_tiny, clear_patch, band_split = env
    import comfy.sample

    clear = clear_patch.patch_model(flux_tiny.make_tiny_flux(), "none (training-free)", window_size=3)
    latent = torch.randn(1, 16, 14, 12, generator=torch.Generator().manual_seed(5))
    positive, negative = flux_tiny.conditioning(5, seed=6), flux_tiny.conditioning(3, seed=7)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(8))

    def sample(model):
        return comfy.sample.sample(model, noise, 1, 3.0, "euler", "simple", positive, negative, latent,
                                   denoise=1.0, disable_pbar=True, seed=0)
    want = sample(clear)
    got = sample(band_split.split_model(clear, 2))
    assert _rel(got, want) < 1e-5
    assert len(exchanges) == 2  # text lengths differ: cond and uncond are two model calls, each split
