"""GGUF-quantized FLUX (city96/ComfyUI-GGUF) with CLEAR: small GGUF FLUX files
written as ComfyUI-GGUF's tools/convert.py (F16, BF16) and its patched
llama-quantize (tools/lcpp.patch: Q8_0, K-quants, ...) write them, loaded by
ComfyUI-GGUF's own "Unet Loader (GGUF)" node, patched by the CLEAR node.

ComfyUI-GGUF dequantizes each quantized weight at every forward and applies the
key's patch list to the result (GGMLLayer.get_weight -> comfy.lora.calculate_weight),
so CLEAR's row-slice "set" patches land there; F16/F32 tensors are patched at load
like any ComfyUI model. Checked: the weights the forward really uses (CLEAR rows,
biases and proj exact, every other row as ComfyUI-GGUF dequantizes it), for every
type ComfyUI-GGUF dequantizes; LoRA in either order; a sampled latent against an
independent reference; FLUX.1's real width with no seam at all. Needs COMFYUI_PATH and COMFYUI_GGUF_PATH (a ComfyUI-GGUF
checkout); skips otherwise."""

import contextlib
import math

import pytest
import torch

from _gguf import import_comfyui_gguf
from flux_tiny import conditioning, detect_as_tiny, make_tiny_flux, sample_one_step, write_clear_file

pytestmark = pytest.mark.comfyui

H = 256  # tiny FLUX hidden size: every block weight is 256 wide, a multiple of the K-quant block (256)
CPU = torch.device("cpu")

# Tensors lcpp.patch never quantizes in a FLUX model (kept as converted, BF16 / F32).
FLUX_UNQUANTIZED = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
# Byte offsets of the float16 scales (d, dmin) in one block of the types gguf-py cannot quantize
# (ggml's block_q2_K ... block_iq4_xs): those files get random quants with scales set here.
HALF_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,)}

# The modules CLEAR patches, plus one it does not (linear2): module -> (CLEAR key prefix, rows CLEAR sets)
MODULES = {
    "double_blocks.0.img_attn.qkv": ("transformer_blocks.0.attn.", ("to_q", "to_k", "to_v")),
    "double_blocks.1.img_attn.proj": ("transformer_blocks.1.attn.", ("to_out.0",)),
    "single_blocks.1.linear1": ("single_transformer_blocks.1.attn.", ("to_q", "to_k", "to_v")),
    "single_blocks.0.linear2": (None, ()),
}


@pytest.fixture(scope="module")
def G(comfyui):
    return import_comfyui_gguf()


@pytest.fixture(scope="module")
def folders(G, tmp_path_factory):
    import folder_paths

    models = tmp_path_factory.mktemp("gguf_models")
    folder_paths.add_model_folder_path("diffusion_models", str(models))
    clear_file = tmp_path_factory.mktemp("gguf_clear") / "clear_local_3.safetensors"
    return models, write_clear_file(clear_file, seed=31), clear_file


# --------------------------------------------------------------------------
# writing GGUF files

def _random_blocks(G, qtype, shape, gen):
    """Valid blocks of a type gguf-py cannot quantize: random quants, float16 scale
    fields set so the dequantized weights have std ~ 1/sqrt(fan_in)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = torch.randint(0, 256, (rows * cols // block, size), dtype=torch.uint8, generator=gen)
    halves = HALF_FIELDS[qtype.name]

    def set_scales(value):
        for offset in halves:
            data[:, offset:offset + 2] = torch.tensor([value], dtype=torch.float16).view(torch.uint8)

    set_scales(1.0)
    std = G.dequant.dequantize(data.reshape(rows, -1), qtype, shape, torch.float32).std().item()
    set_scales(cols ** -0.5 / std)
    return data.reshape(rows, -1).numpy()


def write_gguf(G, path, qtype_name, seed=0):
    """A tiny FLUX as a GGUF file. F16 / BF16: tools/convert.py's own tensor
    handling on an fp16 / bf16 checkpoint. Other types: lcpp.patch's FLUX rules
    on the BF16 conversion (2-D weights outside FLUX_UNQUANTIZED get the type,
    F16 where the row length is not a multiple of its block)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = Q[qtype_name]
    source_dtype = torch.float16 if qtype == Q.F16 else torch.bfloat16
    sd = make_tiny_flux(torch.float32, seed=seed).model.diffusion_model.state_dict()
    sd = {k: v.to(source_dtype) for k, v in sd.items()}

    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if qtype in (Q.F16, Q.BF16):
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == Q.F16 else gguf.LlamaFileType.MOSTLY_BF16)
        G.tools.convert.handle_tensors(writer, sd, G.tools.convert.ModelFlux())
    else:
        gen = torch.Generator().manual_seed(seed)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        for key, t in sd.items():
            if t.dim() == 1 or t.numel() <= G.tools.convert.QUANTIZATION_THRESHOLD:
                ttype = Q.F32
            elif not key.endswith(".weight") or key.startswith(FLUX_UNQUANTIZED):
                ttype = Q.BF16
            elif t.shape[-1] % block:
                ttype = Q.F16
            else:
                ttype = qtype
            if ttype.name in HALF_FIELDS:
                data = _random_blocks(G, ttype, tuple(t.shape), gen)
            else:
                data = gguf.quants.quantize(t.float().numpy(), ttype)
            writer.add_tensor(key, data, raw_dtype=ttype)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def tiny_detection(G, monkeypatch):
    """ComfyUI 0.3.64's FLUX detection fixes the width at 3072; let it return the
    tiny config (everything else in the load is ComfyUI's and ComfyUI-GGUF's own)."""
    detect_as_tiny(monkeypatch)


def load_gguf(G, folders, qtype_name, seed=0, **advanced):
    """(ModelPatcher from ComfyUI-GGUF's Unet Loader node, or with ``advanced``
    options its Advanced node; the file's state dict as gguf_sd_loader reads it)."""
    models = folders[0]
    name = f"tiny-flux-{qtype_name}-{seed}.gguf"
    if not (models / name).exists():
        write_gguf(G, models / name, qtype_name, seed)
    node = G.nodes.UnetLoaderGGUFAdvanced() if advanced else G.nodes.UnetLoaderGGUF()
    with torch.inference_mode():  # as ComfyUI executes nodes
        (patcher,) = node.load_unet(name, **advanced)
    assert isinstance(patcher, G.nodes.GGUFModelPatcher)
    return patcher, G.loader.gguf_sd_loader(str(models / name))


# --------------------------------------------------------------------------
# the weights the forward uses

@contextlib.contextmanager
def recording_linear():
    """Record (weight, bias) of every torch.nn.functional.linear call: what the
    layers really compute with, however their ops produced it."""
    calls = []
    real = torch.nn.functional.linear

    def record(input, weight, bias=None):
        calls.append((weight.detach().clone(), None if bias is None else bias.detach().clone()))
        return real(input, weight, bias)

    torch.nn.functional.linear = record
    try:
        yield calls
    finally:
        torch.nn.functional.linear = real


def forward_weights(patcher, dtype, lowvram=False, modules=MODULES):
    """module -> (weight, bias) its forward uses on an input of ``dtype``, after
    ComfyUI loads ``patcher`` (fully, or every module low-VRAM). Unpatches afterwards."""
    import comfy.utils

    out = {}
    with torch.inference_mode():  # as ComfyUI executes every prompt
        patcher.patch_model(device_to=CPU, lowvram_model_memory=1 if lowvram else 0)
        try:
            for name in modules:
                m = comfy.utils.get_attr(patcher.model.diffusion_model, name)
                with recording_linear() as calls:
                    m(torch.zeros(1, m.in_features, dtype=dtype))
                assert len(calls) == 1, name
                out[name] = calls[0]
        finally:
            patcher.unpatch_model(device_to=CPU)
    return out


def expected_weights(G, gguf_sd, clear_sd, dtype, dequant_dtype=None, modules=MODULES):
    """module -> (weight, bias) the CLEAR model must compute with: ComfyUI-GGUF's
    dequantization of the file with the CLEAR rows written in. Where a tensor is
    stored F16/F32 ComfyUI patches it at load and keeps that storage dtype."""
    out = {}
    for name, (prefix, projections) in modules.items():
        pair = []
        for param in ("weight", "bias"):
            stored = gguf_sd[f"{name}.{param}"]
            value = G.dequant.dequantize_tensor(stored, dtype, dequant_dtype)
            # a plain copy: GGMLTensor.clone() returns itself, and F32 data is the read-only file mapping
            value = value.as_subclass(torch.Tensor).clone()
            if projections:
                rows = torch.cat([clear_sd[f"{prefix}{p}.{param}"] for p in projections])
                storage = stored.dtype if G.dequant.is_torch_compatible(stored) else dtype
                value[:rows.shape[0]] = rows.to(storage).to(dtype)
            pair.append(value)
        out[name] = tuple(pair)
    return out


def check_forward_weights(G, base, patched, gguf_sd, clear_sd, dtype, lowvram=False, dequant_dtype=None,
                          modules=MODULES, recheck_base=True):
    """The CLEAR model computes with CLEAR's rows, biases and proj exactly and with
    every other row exactly as ComfyUI-GGUF's own forward gives it; the user's model
    still computes with the file's weights afterwards."""
    want = expected_weights(G, gguf_sd, clear_sd, dtype, dequant_dtype, modules)
    raw = forward_weights(base, dtype, modules=modules)
    got = forward_weights(patched, dtype, lowvram, modules)
    for name, (prefix, projections) in modules.items():
        rows = len(projections) * got[name][0].shape[1]  # hidden rows per projection
        for i, param in enumerate(("weight", "bias")):
            where = (name, param, dtype, lowvram)
            assert got[name][i].dtype == dtype, where
            assert torch.equal(got[name][i], want[name][i]), where
            assert torch.equal(got[name][i][rows:], raw[name][i][rows:]), where
            if rows:
                assert not torch.equal(got[name][i][:rows], raw[name][i][:rows]), where  # CLEAR changed them
    if recheck_base:
        again = forward_weights(base, dtype, modules=modules)
        assert all(torch.equal(again[n][i], raw[n][i]) for n in modules for i in (0, 1))


def apply_clear(patcher, folders):
    from comfyui_clear.nodes import clear_patch

    with torch.inference_mode():
        return clear_patch.patch_model(patcher, str(folders[2]))  # a path: no other test's file of that name


ALL_TYPES = ["F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0",
             "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"]
COMMON_TYPES = ["F16", "BF16", "Q8_0", "Q4_K"]  # the FLUX GGUF files most used


def test_every_type_comfyui_gguf_dequantizes_is_covered(G):
    types = {t.name for t in G.dequant.dequantize_functions} | {"F16"}  # F32: never converted to
    assert types <= set(ALL_TYPES), types - set(ALL_TYPES)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_forward_weights_have_clear_rows_exactly(G, folders, tiny_detection, qtype):
    base, gguf_sd = load_gguf(G, folders, qtype)
    assert gguf_sd["double_blocks.0.img_attn.qkv.weight"].tensor_type.name == qtype  # where CLEAR patches
    patched = apply_clear(base, folders)  # was refused: the layout check read the stored bytes' shapes
    check_forward_weights(G, base, patched, gguf_sd, folders[1], torch.float32)


@pytest.mark.parametrize("qtype", COMMON_TYPES)
def test_forward_weights_bf16_low_vram_and_advanced_loader(G, folders, tiny_detection, qtype):
    """As a GPU user runs it: bf16 compute, low-VRAM load, the Advanced loader's options."""
    options = dict(dequant_dtype="float16", patch_dtype="bfloat16", patch_on_device=True)
    base, gguf_sd = load_gguf(G, folders, qtype, **options)
    patched = apply_clear(base, folders)
    check_forward_weights(G, base, patched, gguf_sd, folders[1], torch.bfloat16, lowvram=True,
                          dequant_dtype=torch.float16)


# --------------------------------------------------------------------------
# LoRA before or after CLEAR

def make_lora(seed=5, rank=4, alpha=2.0):
    """A kohya-style LoRA on modules CLEAR patches (and one it does not)."""
    gen = torch.Generator().manual_seed(seed)
    targets = {"double_blocks.0.img_attn.qkv": (3 * H, H), "single_blocks.1.linear1": (7 * H, H),
               "double_blocks.1.img_attn.proj": (H, H), "single_blocks.0.linear2": (H, 5 * H)}
    sd, deltas = {}, {}
    for module, (rows, cols) in targets.items():
        up = torch.randn(rows, rank, generator=gen) * 0.3
        down = torch.randn(rank, cols, generator=gen) * 0.3
        name = "lora_unet_" + module.replace(".", "_")
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[module] = (alpha / rank) * (up @ down)
    return sd, deltas


@pytest.mark.parametrize("qtype", COMMON_TYPES)
def test_lora_before_and_after_clear(G, folders, tiny_detection, qtype):
    import comfy.sd

    base, gguf_sd = load_gguf(G, folders, qtype)
    lora_sd, deltas = make_lora()
    strength = 0.7
    with torch.inference_mode():
        lora_first = comfy.sd.load_lora_for_models(base, None, lora_sd, strength, 0)[0]
        assert all(f"diffusion_model.{m}.weight" in lora_first.patches for m in deltas)  # ComfyUI mapped it
        lora_then_clear = apply_clear(lora_first, folders)
        clear_then_lora = comfy.sd.load_lora_for_models(apply_clear(base, folders), None, lora_sd, strength, 0)[0]

    want = expected_weights(G, gguf_sd, folders[1], torch.float32)
    a = forward_weights(lora_then_clear, torch.float32)
    b = forward_weights(clear_then_lora, torch.float32)
    for name in MODULES:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
        target = want[name][0] + strength * deltas[name]
        # F16-stored tensors are patched in float32 and rounded back to float16 (2^-11 relative)
        f16 = G.dequant.is_torch_compatible(gguf_sd[f"{name}.weight"]) and gguf_sd[f"{name}.weight"].dtype == torch.float16
        tol = dict(rtol=2 ** -10, atol=1e-4) if f16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[name][0], target, **tol)
        assert torch.equal(a[name][1], want[name][1])  # the LoRA has no bias: CLEAR's biases exactly
        assert (strength * deltas[name]).abs().mean() > 0.1 * target.abs().mean()  # the LoRA matters


# --------------------------------------------------------------------------
# sampled through ComfyUI against an independent reference

def _conditioning(T, seed):
    return conditioning(T, seed)


def _sample(model, latent, positive, seed=0):
    return sample_one_step(model, latent, positive, seed, inference_mode=True)


def _reference(G, gguf_sd, clear_sd, window, grid, T):
    """A plain (non-GGUF) tiny FLUX holding the dequantized file with CLEAR's rows
    written in by hand, and a dense float64 masked attention (tests/oracle.py)."""
    from oracle import clear_oracle

    ref = make_tiny_flux(torch.float32)
    dm = ref.model.diffusion_model
    sd = {k: G.dequant.dequantize_tensor(v, torch.float32).as_subclass(torch.Tensor).clone()
          for k, v in gguf_sd.items()}
    for name, weights in expected_weights(G, gguf_sd, clear_sd, torch.float32).items():
        sd[f"{name}.weight"], sd[f"{name}.bias"] = weights
    for i in range(len(dm.double_blocks)):  # the modules MODULES does not list
        p, k = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}.img_attn."
        for param in ("weight", "bias"):
            sd[f"{k}qkv.{param}"] = torch.cat([clear_sd[f"{p}to_{n}.{param}"] for n in "qkv"]).float()
            sd[f"{k}proj.{param}"] = clear_sd[f"{p}to_out.0.{param}"].float()
    for i in range(len(dm.single_blocks)):
        p, k = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}.linear1."
        for param in ("weight", "bias"):
            sd[k + param][:3 * H] = torch.cat([clear_sd[f"{p}to_{n}.{param}"] for n in "qkv"]).float()
    dm.load_state_dict(sd)

    def dense_masked(func, q, k, v, heads, **kwargs):
        out = clear_oracle(q, k, v, T, grid, window, scale=1 / math.sqrt(q.shape[-1])).to(q.dtype)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    ref.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = dense_masked
    return ref


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q4_K"])
def test_sampled_output_matches_reference(G, folders, tiny_detection, qtype):
    base, gguf_sd = load_gguf(G, folders, qtype)
    patched = apply_clear(base, folders)
    latent = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(3))
    T = 5
    positive = _conditioning(T, seed=4)
    ref = _reference(G, gguf_sd, folders[1], window=3, grid=(6, 5), T=T)

    dense = _sample(base, latent, positive)
    out = _sample(patched, latent, positive)
    expected = _sample(ref, latent, positive)
    err = ((out - expected).norm() / expected.norm()).item()
    assert err < 1e-4, err
    assert ((dense - expected).norm() / expected.norm()).item() > 1e-2  # CLEAR really changes the output
    assert torch.equal(_sample(base, latent, positive), dense)  # the user's GGUF model is unchanged


# --------------------------------------------------------------------------
# the field report's case: FLUX.1's real width, ComfyUI-GGUF's loader node as it is

def write_full_width_q8_0(path, seed=0):
    """FLUX.1 at its real width (3072, as ComfyUI's detection needs) with one block
    of each kind, typed as llama-quantize types a Q8_0 file (FLUX_UNQUANTIZED and
    1-D tensors unquantized). Random 64-row bands, repeated (drawing or quantizing
    0.5 G random values would take most of a minute); Q8_0 blocks: int8 quants
    with a fixed scale."""
    gguf = pytest.importorskip("gguf")

    from flux_tiny import flux_full_width_shapes

    Q = gguf.GGMLQuantizationType
    gen = torch.Generator().manual_seed(seed)
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, shape in flux_full_width_shapes(depth=1, depth_single=1).items():
        if len(shape) == 1:
            data, ttype = (torch.ones(shape) if key.endswith(".scale") else torch.zeros(shape)).numpy(), Q.F32
        elif key.startswith(FLUX_UNQUANTIZED):
            band = (torch.randn(64, shape[1], generator=gen) / shape[1] ** 0.5).half()
            data, ttype = band.repeat(shape[0] // 64, 1).numpy(), Q.F16
        else:
            blocks = torch.randint(0, 256, (64 * shape[1] // 32, 34), dtype=torch.uint8, generator=gen)
            scale = 1 / (74 * shape[1] ** 0.5)  # int8 uniform quants: std 74
            blocks[:, :2] = torch.tensor([scale], dtype=torch.float16).view(torch.uint8)
            data, ttype = blocks.reshape(64, -1).repeat(shape[0] // 64, 1).numpy(), Q.Q8_0
        writer.add_tensor(key, data, raw_dtype=ttype)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_full_width_q8_0_from_the_unet_loader_gguf_node(G, tmp_path):
    """No seams: ComfyUI's model detection, ComfyUI-GGUF's node, the CLEAR node,
    on the stored shapes of the report ((9216, 3264) for a (9216, 3072) qkv)."""
    import folder_paths

    from comfyui_clear.nodes import clear_patch

    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    model_file, clear_file = tmp_path / "flux1-dev-1-block-Q8_0.gguf", tmp_path / "clear_local_8.safetensors"
    try:
        write_full_width_q8_0(model_file)
        clear_sd = write_clear_file(clear_file, hidden=3072, depth=1, depth_single=1, seed=41)
        with torch.inference_mode():
            (base,) = G.nodes.UnetLoaderGGUF().load_unet(model_file.name)
        stored = base.model_state_dict()["diffusion_model.double_blocks.0.img_attn.qkv.weight"]
        assert tuple(stored.shape) == (9216, 3072 // 32 * 34)  # what the layout check used to read
        with torch.inference_mode():
            patched = clear_patch.patch_model(base, str(clear_file))
        modules = {"double_blocks.0.img_attn.qkv": ("transformer_blocks.0.attn.", ("to_q", "to_k", "to_v")),
                   "double_blocks.0.img_attn.proj": ("transformer_blocks.0.attn.", ("to_out.0",)),
                   "single_blocks.0.linear1": ("single_transformer_blocks.0.attn.", ("to_q", "to_k", "to_v"))}
        gguf_sd = G.loader.gguf_sd_loader(str(model_file))
        check_forward_weights(G, base, patched, gguf_sd, clear_sd, torch.bfloat16, modules=modules,
                              recheck_base=False)
    finally:  # 0.7 GB: pytest keeps recent temporary folders
        model_file.unlink(missing_ok=True)
        clear_file.unlink(missing_ok=True)
