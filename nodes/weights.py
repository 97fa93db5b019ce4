"""CLEAR weight files: catalogue, validation against a loaded FLUX, and mapping
onto ComfyUI's fused FLUX layout as weight patches.

The published files (Hub repo Huage001/CLEAR) hold diffusers names for the
image-stream attention projections of every FLUX.1 block:
``transformer_blocks.{i}.attn.to_q|to_k|to_v|to_out.0.{weight,bias}`` (double),
``single_transformer_blocks.{i}.attn.to_q|to_k|to_v.{weight,bias}`` (single)
and, in the down-sampled variants, ``...attn.processor.spatial_weight``
(shape (1, 1, 1, d, 1, d, 1)) per layer. ComfyUI keeps FLUX fused:
``img_attn.qkv`` rows are [q; k; v], ``img_attn.proj`` is to_out.0, and the
first 3*hidden rows of ``single_blocks.{i}.linear1`` are [q; k; v].

Patch design. Every CLEAR tensor becomes a ("set", (tensor,)) patch (a row
slice ``(key, (0, start, hidden))`` of the fused weights), moved to the FRONT
of that key's patch list on the cloned patcher. ``comfy.lora.calculate_weight``
applies a key's patches in order, so the published values replace the base
weights first and every other patch (a LoRA loaded before or after this node,
a model merge) lands on top of them; a "diff" patch would commute too but needs
the difference in float32 (~7 GB for FLUX). The same list is used by the full
load (``patch_weight_to_device``, float32 then one rounding to the weight dtype,
stochastic for fp8) and by the low-VRAM path (``LowVramPatch``); ComfyUI-GGUF
applies it to each quantized weight right after dequantizing it, at every
forward (so the untouched rows keep their quantized values). Tensors stay on
CPU in the file's dtype. Unknown keys in a file are an error, not skipped:
a file that is not exactly a CLEAR file for this model must not half-apply.

Trained files (CLEAR Distill, save_trained_weights) use the same names for any
FLUX-class model (no biases where the model has none, e.g. FLUX.2), or a LoRA
per projection (``<name>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``),
which becomes ComfyUI's own LoRAAdapter patch on the same slice: additive, so
it commutes with the user's LoRAs. Their ``clear.*`` metadata names the model
family and shape they fit (docs/distill.md, "File layout"); a file without it
is FLUX.1's published layout.
"""

import logging
import math
import os
import re
import uuid
import weakref
from dataclasses import dataclass, field

import torch

from .runtime import ui_error

PUBLISHED = {  # file name -> (window_size, down_factor) it was trained with
    "clear_local_8.safetensors": (8, 1),
    "clear_local_16.safetensors": (16, 1),
    "clear_local_32.safetensors": (32, 1),
    "clear_local_8_down_4.safetensors": (8, 4),
    "clear_local_16_down_4.safetensors": (16, 4),
}
TRAINING_FREE = "none (training-free)"
FOLDER = "clear"  # ComfyUI models folder key: models/clear/
EXTENSION = ".safetensors"
ATTACHMENT = "clear_weights"  # ModelPatcher attachment: the CLEARWeights applied to it

_NAME_PATTERN = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?(?!\d)", re.IGNORECASE)
_KEY_PATTERN = re.compile(
    r"(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)\.attn\."
    r"(?:(?P<proj>to_q|to_k|to_v|to_out\.0)\.(?P<param>weight|bias)|processor\.spatial_weight)")
_OPTIONAL_PREFIX = "transformer."  # a diffusers pipeline's transformer saved whole

log = logging.getLogger(__name__)


@ui_error
class CLEARWeightsError(ValueError):
    """A CLEAR weight file that cannot be used with this model (message names the file)."""


# ---------------------------------------------------------------------------
# Catalogue (ComfyUI's models/clear folder)

def register_model_folder():
    """Register models/clear with ComfyUI and create it (the README tells
    offline users to put the files there). Idempotent; a folder set in
    extra_model_paths.yaml stays first (downloads go to the first folder).
    A folder that cannot be created (read-only install) is left to the
    download, which reports it when a file is actually needed."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default)
    extensions = folder_paths.folder_names_and_paths[FOLDER][1]
    if not extensions:  # a new key gets an empty set, which would list every file
        extensions.add(EXTENSION)
    try:
        os.makedirs(default, exist_ok=True)
    except OSError as exc:  # ComfyUI must start anyway
        log.debug("CLEAR: could not create %s: %s", default, exc)


def weight_choices():
    """The published names (present or not: they download on first use), then
    other .safetensors files in the clear folder(s), then TRAINING_FREE."""
    import folder_paths

    register_model_folder()
    folders = folder_paths.get_folder_paths(FOLDER)
    on_disk = [f for f in folder_paths.get_filename_list(FOLDER)
               if f.lower().endswith(EXTENSION) and f not in PUBLISHED
               and any(os.path.isfile(os.path.join(d, f)) for d in folders)]  # not a dangling symlink
    return list(PUBLISHED) + on_disk + [TRAINING_FREE]


def _read_metadata_setting(path):
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        window = meta.get("clear.window_size", meta.get("window_size"))
        down = meta.get("clear.down_factor", meta.get("down_factor", 1))
        return (int(window), int(down)) if window is not None else None
    except Exception:  # unreadable or no usable metadata: the setting is simply unknown
        return None


def _local_path(name):
    """A weight file's path in the clear folder(s) (or an absolute path), None
    when it is not on disk; never downloads."""
    path = None
    try:
        import folder_paths

        path = folder_paths.get_full_path(FOLDER, name)
    except (ImportError, KeyError):
        pass
    if path is None and os.path.isabs(name) and os.path.isfile(name):
        path = name
    return path


def training_setting(name):
    """(window_size, down_factor) the file was trained with, or None if unknown:
    from PUBLISHED, else a name like clear_local_{r}[_down_{d}], else the
    safetensors metadata keys ``window_size`` / ``down_factor``."""
    if name in PUBLISHED:
        return PUBLISHED[name]
    match = _NAME_PATTERN.match(os.path.basename(name))
    if match:
        return int(match.group(1)), int(match.group(2) or 1)
    path = _local_path(name)
    return _read_metadata_setting(path) if path else None


def resolve_weight_file(name):
    """Absolute path of a weight file from the clear folder(s); a published file
    that is missing is downloaded into the first clear folder."""
    import folder_paths

    if name == TRAINING_FREE:
        raise CLEARWeightsError(f"'{TRAINING_FREE}' uses the model's own weights: there is no file to load.")
    register_model_folder()
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None and os.path.isabs(name) and os.path.isfile(name):
        path = name
    if path is not None:
        return os.path.abspath(path)
    folders = folder_paths.get_folder_paths(FOLDER)
    if name in PUBLISHED:
        from .hub import download_published

        return download_published(name, folders[0])
    raise CLEARWeightsError(
        f"CLEAR weight file '{name}' was not found in {folders}. Put it in one of those folders "
        f"or pick one of the published files ({', '.join(PUBLISHED)}), which download on first use.")


# ---------------------------------------------------------------------------
# Trained files (CLEAR Distill's output): names, fingerprint, writing

TRAINED_FORMATS = ("full", "lora")
PROJECTIONS = {"double": ("to_q", "to_k", "to_v", "to_out.0"), "single": ("to_q", "to_k", "to_v")}
_BLOCK_NAMES = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
_LORA_PATTERN = re.compile(
    r"(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)\.attn\."
    r"(?P<proj>to_q|to_k|to_v|to_out\.0)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")
_FINGERPRINT_FIELDS = ("hidden", "heads", "double", "single", "bias")


def file_prefix(kind, index, proj):
    """Key prefix of one projection in a CLEAR file: ``file_prefix("double", 3, "to_q")``
    -> ``transformer_blocks.3.attn.to_q`` (``proj`` one of PROJECTIONS[kind])."""
    if proj not in PROJECTIONS[kind]:
        raise ValueError(f"{kind} blocks have no CLEAR projection {proj!r} (one of {PROJECTIONS[kind]})")
    return f"{_BLOCK_NAMES[kind]}.{index}.attn.{proj}"


def model_target(kind, index, proj, hidden):
    """Where a file projection lives in ComfyUI's fused FLUX: (weight key, offset)
    with offset ``(0, start_row, hidden)`` for q/k/v (rows of img_attn.qkv or
    single_blocks.linear1) and None for to_out.0 (all of img_attn.proj); the
    bias key is the same with ``.bias``. The keys and offsets of add_patches."""
    file_prefix(kind, index, proj)  # validates proj
    if proj == "to_out.0":
        return f"diffusion_model.double_blocks.{index}.img_attn.proj.weight", None
    fused = (f"diffusion_model.double_blocks.{index}.img_attn.qkv" if kind == "double"
             else f"diffusion_model.single_blocks.{index}.linear1")
    return f"{fused}.weight", (0, ("to_q", "to_k", "to_v").index(proj) * hidden, hidden)


def model_fingerprint(diffusion_model):
    """The shape of a FLUX-class model as far as CLEAR files depend on it:
    ``"hidden=3072,heads=24,double=19,single=38,bias=1"`` (FLUX.1-dev; bias: the
    attention projections have biases)."""
    qkv = diffusion_model.double_blocks[0].img_attn.qkv
    bias = int(getattr(qkv, "bias", None) is not None)
    return (f"hidden={diffusion_model.hidden_size},heads={diffusion_model.num_heads},"
            f"double={len(diffusion_model.double_blocks)},single={len(diffusion_model.single_blocks)},bias={bias}")


def parse_fingerprint(fingerprint):
    """{"hidden": 3072, ...} from a model_fingerprint string; ValueError if malformed."""
    try:
        fields = dict(part.split("=", 1) for part in fingerprint.split(","))
        parsed = {name: int(fields[name]) for name in _FINGERPRINT_FIELDS}
    except (AttributeError, KeyError, ValueError):
        raise ValueError(f"not a CLEAR model fingerprint: {fingerprint!r} "
                         "(expected 'hidden=H,heads=N,double=D,single=S,bias=0|1')") from None
    if set(fields) != set(_FINGERPRINT_FIELDS):
        raise ValueError(f"not a CLEAR model fingerprint: {fingerprint!r} (fields {sorted(fields)})")
    return parsed


def _raw_bytes(tensor):
    """(bytes, description) of a weight as stored: fp8 through a uint8 view, a
    ComfyUI-GGUF quantized tensor as its raw blocks, a comfy_quant
    QuantizedTensor as its data plus scale. Same weights -> same bytes."""
    parts, extra = [], ""
    qdata = getattr(tensor, "_qdata", None)
    if qdata is not None:  # comfy_quant (ComfyUI 0.33 "fp8 scaled"): raw fp8 + per-layer scale
        scale = getattr(getattr(tensor, "_params", None), "scale", None)
        parts.append(qdata)
        if isinstance(scale, torch.Tensor):
            parts.append(scale)
        extra = type(tensor).__name__
    else:
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):  # GGMLTensor: raw quantized blocks
            kind = getattr(tensor, "tensor_type", "")
            extra = f"{type(tensor).__name__}:{getattr(kind, 'name', kind)}"
        parts.append(torch.Tensor.as_subclass(tensor.detach(), torch.Tensor))
    blobs = []
    for part in parts:
        part = torch.Tensor.as_subclass(part.detach(), torch.Tensor).to("cpu").contiguous().reshape(-1)
        blobs.append(part.view(torch.uint8).numpy().tobytes() if part.numel() else b"")
    return b"".join(blobs), f"{tuple(tensor.shape)}|{tensor.dtype}|{extra}"


def base_model_hash(model_patcher):
    """16 hex digits identifying the base weights: sha256 over ``img_in.weight``
    and ``final_layer.linear.weight`` (bytes as stored, shape, dtype). Cheap (two
    small layers), changes with a fine-tune or another quantization. Weights
    ComfyUI has patched in place (a loaded LoRA) hash as their backed-up originals."""
    import hashlib

    import comfy.utils

    digest = hashlib.sha256()
    for key in ("diffusion_model.img_in.weight", "diffusion_model.final_layer.linear.weight"):
        backup = getattr(model_patcher, "backup", {}).get(key)
        tensor = backup.weight if backup is not None else comfy.utils.get_attr(model_patcher.model, key)
        data, description = _raw_bytes(tensor)
        digest.update(key.encode() + b"\0" + description.encode() + b"\0")
        digest.update(data)
    return digest.hexdigest()[:16]


def trained_file_shapes(fingerprint, fmt, rank=None, down_factor=1):
    """Key -> shape of every tensor a trained file for a model of this
    fingerprint holds (the loader's layout; the trainer can name its tensors
    with it). full: q/k/v(/out) weights, biases where the model has them;
    lora: lora_down (r, in), lora_up (out, r), alpha (); plus a spatial_weight
    (1, 1, 1, d, 1, d, 1) per layer when down_factor d > 1."""
    shape = parse_fingerprint(fingerprint)
    hidden, d = shape["hidden"], down_factor
    if fmt not in TRAINED_FORMATS:
        raise ValueError(f"format must be one of {TRAINED_FORMATS}, got {fmt!r}")
    if fmt == "lora" and not (isinstance(rank, int) and 1 <= rank <= hidden):
        raise ValueError(f"a LoRA file needs a rank between 1 and {hidden}, got {rank!r}")
    shapes = {}
    for kind in ("double", "single"):
        for i in range(shape[kind]):
            for proj in PROJECTIONS[kind]:
                prefix = file_prefix(kind, i, proj)
                if fmt == "full":
                    shapes[prefix + ".weight"] = (hidden, hidden)
                    if shape["bias"]:
                        shapes[prefix + ".bias"] = (hidden,)
                else:
                    shapes[prefix + ".lora_down.weight"] = (rank, hidden)
                    shapes[prefix + ".lora_up.weight"] = (hidden, rank)
                    shapes[prefix + ".alpha"] = ()
            if d > 1:
                shapes[f"{_BLOCK_NAMES[kind]}.{i}.attn.processor.spatial_weight"] = (1, 1, 1, d, 1, d, 1)
    return shapes


def _trainer_version():
    try:
        from importlib.metadata import version

        return version("comfyui-clear")
    except Exception:  # not installed as a package (a custom_nodes checkout): pyproject's version
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
        try:
            with open(path, encoding="utf-8") as f:
                match = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
            return match.group(1) if match else "unknown"
        except OSError:
            return "unknown"


def save_trained_weights(path, tensors, *, fmt, window_size, down_factor, family, fingerprint, base_hash, steps,
                         final_loss, rank=None, alpha=None):
    """Write a trained CLEAR file (safetensors, with its clear.* metadata) atomically:
    a temporary file in the same folder, then os.replace, so a crash never leaves
    a half-written file the patch node would list. ``tensors`` must be exactly
    trained_file_shapes(fingerprint, fmt, rank, down_factor) (checked first,
    nothing is written otherwise); they are stored contiguous on the CPU in their
    dtype (alpha as float32). Returns ``path``."""
    from safetensors.torch import save_file

    def bad(problem):
        raise ValueError(f"save_trained_weights({path!r}): {problem}")

    for name, value in (("window_size", window_size), ("down_factor", down_factor), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "steps" else 1):
            bad(f"{name} must be an integer >= {0 if name == 'steps' else 1}, got {value!r}")
    from .clear_patch import FAMILIES

    if family not in FAMILIES:
        bad(f"family must be one of {sorted(FAMILIES)} (clear_patch.flux_family of the model), got {family!r}")
    try:
        expected = trained_file_shapes(fingerprint, fmt, rank, down_factor)
    except ValueError as exc:
        bad(str(exc))
    if fmt == "lora":
        alpha = float(rank if alpha is None else alpha)
    elif alpha is not None or rank is not None:
        bad("rank and alpha are LoRA settings; a full file has neither")
    if missing := sorted(set(expected) - set(tensors)):
        bad(f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    if extra := sorted(set(tensors) - set(expected)):
        bad(f"{len(extra)} tensor(s) a {fmt} file for {fingerprint} does not have, e.g. {extra[:3]}")
    out = {}
    for key, shape in expected.items():
        t = tensors[key]
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, dtype=torch.float32)
        if tuple(t.shape) != shape:
            bad(f"'{key}' has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point() or not _all_finite(t.detach()):
            bad(f"'{key}' is not finite floating point data")
        t = t.detach().to("cpu")
        if key.endswith(".alpha"):
            if not math.isclose(float(t), alpha, rel_tol=1e-6):
                bad(f"'{key}' = {float(t)} but alpha = {alpha}")
            t = t.to(torch.float32)
        out[key] = t.contiguous().clone()  # no shared storage (views of one fused matrix): safetensors refuses it
    if not (isinstance(final_loss, (int, float)) and math.isfinite(final_loss)):
        bad(f"final_loss must be a finite number, got {final_loss!r}")
    metadata = {"clear.format": fmt, "clear.window_size": str(window_size), "clear.down_factor": str(down_factor),
                "clear.family": family, "clear.fingerprint": fingerprint, "clear.base_model": str(base_hash),
                "clear.steps": str(steps), "clear.final_loss": repr(float(final_loss)),
                "clear.trainer": f"comfyui-clear {_trainer_version()}"}
    if fmt == "lora":
        metadata.update({"clear.rank": str(rank), "clear.alpha": repr(alpha)})
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(out, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ---------------------------------------------------------------------------
# Loading and validation

@dataclass
class CLEARWeights:
    path: str
    patches: dict  # ComfyUI add_patches keys -> ("set", (tensor,)) or a LoRAAdapter
    spatial_weights: dict = field(default_factory=dict)  # ("double"|"single", i) -> float32 (d, d)
    down_factor: int = 1
    format: str = "full"  # "full" ("set" patches) or "lora" (LoRAAdapter patches)
    family: str = "flux1"  # the model family the file is for (clear.family; none: FLUX.1)
    metadata: dict = field(default_factory=dict)  # the file's safetensors metadata
    _tensors: object = field(default=None, repr=False, compare=False)  # keeps the file cache entry alive


class _FileTensors(dict):
    """A file's checked tensors. Cached weakly: while any CLEARWeights built from
    it is alive (e.g. a node output ComfyUI keeps), loading the same unchanged
    file again shares the tensors instead of holding a second copy (GBs)."""


_file_cache = weakref.WeakValueDictionary()  # (path, mtime_ns, size) -> _FileTensors


def _param_shape(model, key):
    """Shape of a model tensor as the forward uses it. Read from the parameter:
    ComfyUI-GGUF's quantized GGMLTensor reports its real shape there, while
    model_state_dict() holds placeholders with the stored bytes' shape."""
    import comfy.utils

    return tuple(comfy.utils.get_attr(model, key).shape)


def _flux_layout(model_patcher, fail, biases=True):
    """Block indices and hidden size of the loaded model, or fail("not FLUX").
    ``biases``: True = the attention projections must have biases (FLUX.1, the
    published layout); None = as the model has them, all or none (FLUX.2 has none)."""
    sd = model_patcher.model_state_dict()  # for the key names only: shapes via _param_shape
    double = {int(m.group(1)) for k in sd
              if (m := re.fullmatch(r"diffusion_model\.double_blocks\.(\d+)\.img_attn\.qkv\.weight", k))}
    single = {int(m.group(1)) for k in sd
              if (m := re.fullmatch(r"diffusion_model\.single_blocks\.(\d+)\.linear1\.weight", k))}
    if not double or not single:
        fail("the model is not a FLUX model (no diffusion_model.double_blocks.*.img_attn.qkv / "
             "single_blocks.*.linear1 weights); CLEAR weights only fit FLUX-class models")
    hidden = _param_shape(model_patcher.model, f"diffusion_model.double_blocks.{min(double)}.img_attn.qkv.weight")[1]
    if biases is None:
        biases = f"diffusion_model.double_blocks.{min(double)}.img_attn.qkv.bias" in sd
    expected = {}
    for i in double:
        p = f"diffusion_model.double_blocks.{i}.img_attn."
        expected[p + "qkv.weight"], expected[p + "proj.weight"] = (3 * hidden, hidden), (hidden, hidden)
        if biases:
            expected[p + "qkv.bias"], expected[p + "proj.bias"] = (3 * hidden,), (hidden,)
    for i in single:
        p = f"diffusion_model.single_blocks.{i}.linear1."
        expected[p + "weight"] = (None, hidden)
        if biases:
            expected[p + "bias"] = (None,)
    for key, shape in expected.items():
        if key not in sd:
            fail(f"the model has no '{key}' (a FLUX variant without attention biases?), "
                 "so it does not match CLEAR's FLUX.1 layout")
        actual = _param_shape(model_patcher.model, key)
        rows_ok = shape[0] is None and actual[0] >= 3 * hidden or actual[0] == shape[0]
        if len(actual) != len(shape) or not rows_ok or actual[1:] != shape[1:]:
            fail(f"the model's '{key}' has shape {actual}, which is not FLUX's layout for hidden size {hidden}")
    return sorted(double), sorted(single), hidden


def _file_metadata(path):
    """The file's safetensors metadata; {} if unreadable (_read_file reports that)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def file_family(name):
    """The model family a CLEAR file is for, without downloading anything:
    "flux1" for the published files and files without ``clear.family``
    metadata (the published layout), the metadata's family otherwise, None
    when the file is not on disk or unreadable."""
    if name in PUBLISHED or name == TRAINING_FREE:
        return "flux1" if name in PUBLISHED else None
    path = _local_path(name)
    if path is None:
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("clear.family", "flux1")
    except Exception:
        return None


def _family_name(family):
    from .clear_patch import FAMILIES

    return FAMILIES.get(family, family)


def _check_trained_for(model_patcher, meta, fail, path):
    """The file's clear.family (none: FLUX.1, the published layout) and
    clear.fingerprint against the loaded model: one error naming both."""
    import comfy.ldm.flux.model

    diffusion_model = model_patcher.get_model_object("diffusion_model")
    if not isinstance(diffusion_model, comfy.ldm.flux.model.Flux):
        return  # _flux_layout says "not a FLUX model"
    from .clear_patch import flux_family

    family, fingerprint = flux_family(diffusion_model), model_fingerprint(diffusion_model)
    file_family_ = meta.get("clear.family", "flux1")
    file_fingerprint = meta.get("clear.fingerprint")
    trained = f"clear.family={file_family_}" + (f", clear.fingerprint={file_fingerprint}" if file_fingerprint else "")
    if file_family_ != family:
        what = "a published-layout CLEAR file (no clear.family metadata)" if "clear.family" not in meta else trained
        fail(f"it was trained for a {_family_name(file_family_)} model ({what}), but this is a "
             f"{_family_name(family)} model ({family}, {fingerprint}). Load it on the model it was trained for, "
             "or distil a file for this model with CLEAR Distill")
    if file_fingerprint is not None and file_fingerprint != fingerprint:
        fail(f"it was trained for a {_family_name(file_family_)} model of shape {file_fingerprint}, but this "
             f"{_family_name(family)} model is {fingerprint} (another size of the family). Load it on the model "
             "it was trained for, or distil a file for this model with CLEAR Distill")
    base = meta.get("clear.base_model")
    if base:
        try:
            here = base_model_hash(model_patcher)
        except Exception:  # weights not readable here (e.g. on the meta device): nothing to compare
            here = base
        if here != base:
            from .runtime import warn_once

            warn_once(f"CLEAR: weight file {path} was trained on another base model (clear.base_model={base}, this "
                      f"model: {here}); it fits this model's shape, but quality may differ from the training.")


def _all_finite(t):
    if t.element_size() == 1:  # float8 types have no isfinite kernel; float32 holds every fp8 value
        return all(bool(torch.isfinite(chunk.float()).all()) for chunk in t.reshape(-1).split(1 << 24))
    return bool(torch.isfinite(t).all())


def _read_file(path, fail):
    from safetensors import safe_open

    try:
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
        cached = _file_cache.get(key)
        if cached is not None:
            return cached
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = _FileTensors((k, f.get_tensor(k)) for k in f.keys())
    except Exception as exc:  # SafetensorError / OSError on truncated, foreign or missing files
        fail(f"it cannot be read as safetensors ({type(exc).__name__}: {exc}); "
             "the file is missing, truncated or corrupt: delete it and download it again")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not _all_finite(t)]
    tensors.non_finite = set(bad)  # checked once per read, reported against the model below
    _file_cache[key] = tensors
    return tensors


def _describe(indices):
    return ", ".join(str(i) for i in sorted(indices)[:8]) + (" ..." if len(indices) > 8 else "")


def _spatial_weight(tensor, key, fail):
    dims = [s for s in tensor.shape if s != 1]
    if len(dims) != 2 or dims[0] != dims[1] or tensor.dim() not in (2, 7):
        fail(f"'{key}' has shape {tuple(tensor.shape)}; expected (1, 1, 1, d, 1, d, 1) with d > 1")
    d = dims[0]
    return tensor.reshape(d, d).to(torch.float32, copy=True)  # never a view of the shared file tensor


def load_clear_weights(path, model_patcher):
    """Read and validate a CLEAR file against the loaded model; build its patches.

    A published file (or a trained one in their layout, ``clear.format`` full):
    ("set") patches of q/k/v(/out) and their biases where the model has them.
    A trained LoRA file (``lora_down``/``lora_up``/``alpha`` per projection):
    ComfyUI LoRA patches (comfy.weight_adapter's LoRAAdapter) on the same
    fused slices, ordinary patches that add to whatever else patches the key.

    Everything is checked before anything is returned (no side effects): the
    file's clear.family / clear.fingerprint (none = FLUX.1) are the model's, the
    model is FLUX-like, the file covers exactly the model's blocks with all of
    q/k/v (+ out for double blocks) of the model's hidden size, no unknown keys,
    finite values, one spatial_weight per layer with the same d in down-sampled
    files. Raises CLEARWeightsError naming the file."""
    path = os.path.abspath(path)

    def fail(problem):
        raise CLEARWeightsError(f"CLEAR weight file {path}: {problem}.")

    meta = _file_metadata(path)
    _check_trained_for(model_patcher, meta, fail, path)  # before the layout: says which model the file is for
    published = "clear.family" not in meta
    double_ids, single_ids, hidden = _flux_layout(model_patcher, fail, biases=True if published else None)
    has_bias = f"diffusion_model.double_blocks.{double_ids[0]}.img_attn.qkv.bias" in model_patcher.model_state_dict()
    source = _read_file(path, fail)
    tensors, non_finite = source, source.non_finite
    if source and all(k.startswith(_OPTIONAL_PREFIX) for k in source):
        n = len(_OPTIONAL_PREFIX)
        tensors = {k[n:]: v for k, v in source.items()}
        non_finite = {k[n:] for k in non_finite}

    lora = any(_LORA_PATTERN.fullmatch(k) for k in tensors)
    fmt = meta.get("clear.format", "lora" if lora else "full")
    if fmt not in TRAINED_FORMATS or (fmt == "lora") != lora:
        fail(f"its metadata says clear.format={fmt!r} but it holds {'LoRA' if lora else 'full'} weights "
             f"(clear.format is one of {TRAINED_FORMATS}); the file is damaged or was edited")
    pattern = _LORA_PATTERN if lora else _KEY_PATTERN
    layers = {}  # (kind, i) -> {"to_q.weight": tensor, ..., "spatial_weight": tensor}
    unknown = []
    for key, tensor in tensors.items():
        m = pattern.fullmatch(key)
        if m is None and lora and key.endswith(".processor.spatial_weight"):
            m = _KEY_PATTERN.fullmatch(key)
        if m is None or (m["kind"] == "single_transformer_blocks" and m["proj"] == "to_out.0"):
            unknown.append(key)
            continue
        kind = "double" if m["kind"] == "transformer_blocks" else "single"
        if not m["proj"]:
            name = "spatial_weight"
        else:
            name = f"{m['proj']}.{m['part'] if lora else m['param']}"
        layers.setdefault((kind, int(m["index"])), {})[name] = tensor
    if not layers:
        fail(f"it holds no CLEAR attention weights (keys like {sorted(tensors)[:3]}); "
             "it is not a CLEAR file for FLUX")
    if unknown:
        fail(f"it has {len(unknown)} key(s) CLEAR {'LoRA ' if lora else ''}files do not have, e.g. "
             f"{sorted(unknown)[:5]}; it is not a CLEAR weight file (or was saved with other names)")

    for kind, model_ids in (("double", double_ids), ("single", single_ids)):
        file_ids = {i for k, i in layers if k == kind}
        if extra := file_ids - set(model_ids):
            fail(f"it has {kind} block(s) {_describe(extra)} but the model has {len(model_ids)} {kind} "
                 "blocks; it was made for another model")
        if missing := set(model_ids) - file_ids:
            fail(f"it lacks {kind} block(s) {_describe(missing)} of the model's {len(model_ids)}; "
                 "a partially applied CLEAR model would be wrong")

    if lora:
        parts = (("lora_down.weight", None), ("lora_up.weight", None), ("alpha", None))
    else:
        parts = (("weight", (hidden, hidden)),) + ((("bias", (hidden,)),) if published or has_bias else ())
    file_rank = meta.get("clear.rank")
    down_factors = set()
    for (kind, i), names in sorted(layers.items()):
        prefix = f"{_BLOCK_NAMES[kind]}.{i}.attn."
        for proj in PROJECTIONS[kind]:
            for param, shape in parts:
                key = f"{prefix}{proj}.{param}"
                t = names.get(f"{proj}.{param}")
                if t is None:
                    fail(f"'{key}' is missing")
                if not t.is_floating_point() or key in non_finite:
                    fail(f"'{key}' is not finite floating point data (corrupt file)")
                if shape is not None and tuple(t.shape) != shape:
                    fail(f"'{key}' has shape {tuple(t.shape)} but the model's hidden size "
                         f"is {hidden} (expected {shape}); the file is for another model")
            if not lora:
                if not (published or has_bias) and f"{proj}.bias" in names:
                    fail(f"'{prefix}{proj}.bias' is a bias, but this model's attention has none; "
                         "the file is for another model")
                continue
            down, up, alpha = (names[f"{proj}.{p}"] for p, _ in parts)
            rank = down.shape[0] if down.dim() == 2 else None
            if down.dim() != 2 or up.dim() != 2 or down.shape[1] != hidden or up.shape[0] != hidden:
                fail(f"'{prefix}{proj}' LoRA has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}; "
                     f"the model's hidden size is {hidden} (expected (r, {hidden}) and ({hidden}, r)): "
                     "the file is for another model")
            if up.shape[1] != rank or (file_rank is not None and str(rank) != file_rank):
                fail(f"'{prefix}{proj}' LoRA ranks disagree: lora_down {tuple(down.shape)}, lora_up "
                     f"{tuple(up.shape)}" + (f", clear.rank={file_rank}" if file_rank is not None else "")
                     + " (the file is damaged or was edited)")
            if alpha.numel() != 1:
                fail(f"'{prefix}{proj}.alpha' has shape {tuple(alpha.shape)}; expected one number")
        if "spatial_weight" in names:
            if prefix + "processor.spatial_weight" in non_finite:
                fail(f"'{prefix}processor.spatial_weight' is not finite (corrupt file)")
            names["spatial_weight"] = _spatial_weight(names["spatial_weight"], prefix + "processor.spatial_weight", fail)
            down_factors.add(names["spatial_weight"].shape[0])
    with_sw = [layer for layer, names in layers.items() if "spatial_weight" in names]
    if with_sw and len(with_sw) != len(layers):
        lacking = sorted(set(layers) - set(with_sw))
        fail(f"only some layers have a spatial_weight (missing in e.g. {lacking[:3]}); a down-sampled "
             "CLEAR file has one per layer")
    if len(down_factors) > 1:
        fail(f"its spatial_weight sizes disagree across layers ({sorted(down_factors)}); one d per file")

    if lora:
        from comfy.weight_adapter.lora import LoRAAdapter

    def patch(names, proj, key_prefix):
        if not lora:
            return ("set", (names[f"{proj}.weight"],))
        down, up, alpha = names[f"{proj}.lora_down.weight"], names[f"{proj}.lora_up.weight"], names[f"{proj}.alpha"]
        loaded = {f"{key_prefix}{proj}.{p}" for p in ("lora_down.weight", "lora_up.weight", "alpha")}
        return LoRAAdapter(loaded, (up, down, float(alpha.reshape(())), None, None, None))  # + up @ down * alpha / r

    patches, spatial = {}, {}
    for (kind, i), names in layers.items():
        for proj in PROJECTIONS[kind]:
            key, offset = model_target(kind, i, proj, hidden)
            bias_key = key[:-len("weight")] + "bias"
            patches[key if offset is None else (key, offset)] = patch(names, proj, f"{_BLOCK_NAMES[kind]}.{i}.attn.")
            if f"{proj}.bias" in names:
                patches[bias_key if offset is None else (bias_key, offset)] = ("set", (names[f"{proj}.bias"],))
        if "spatial_weight" in names:
            spatial[(kind, i)] = names["spatial_weight"]
    down_factor = down_factors.pop() if down_factors else 1
    return CLEARWeights(path=path, patches=patches, spatial_weights=spatial, down_factor=down_factor,
                        format=fmt, family=meta.get("clear.family", "flux1"), metadata=meta, _tensors=source)


# ---------------------------------------------------------------------------
# Applying

def _patch_key(key):
    return key if isinstance(key, str) else key[0]


def apply_clear_weights(model_patcher, weights):
    """Add the CLEAR patches to an already-cloned ModelPatcher, first in each
    key's patch list (see the module docstring). CLEAR weights applied to this
    patcher before (a second CLEAR node in the chain) are replaced."""
    model_keys = set(model_patcher.model_state_dict())
    if missing := sorted({_patch_key(k) for k in weights.patches} - model_keys):
        raise CLEARWeightsError(f"CLEAR weight file {weights.path}: the model has no {missing[:3]}; "
                                "load the file against this model (load_clear_weights)")

    remove_clear_weights(model_patcher)
    before = {key: len(model_patcher.patches.get(key, [])) for key in map(_patch_key, weights.patches)}
    added = model_patcher.add_patches(weights.patches, 1.0, 1.0)  # appends, and renews patches_uuid
    assert len(added) == len(weights.patches)
    for key, n_before in before.items():
        current = model_patcher.patches[key]
        model_patcher.patches[key] = current[n_before:] + current[:n_before]  # ours first, in file order
    model_patcher.set_attachments(ATTACHMENT, weights)


def remove_clear_weights(model_patcher):
    """Take the CLEAR patches (and attachment) an earlier CLEAR node added off an
    already-cloned ModelPatcher; other patches (LoRAs) stay, in order."""
    previous = model_patcher.get_attachment(ATTACHMENT)
    if previous is None:
        return
    stale = {id(v) for v in previous.patches.values()}
    for key in {_patch_key(k) for k in previous.patches}:
        kept = [p for p in model_patcher.patches.get(key, []) if id(p[1]) not in stale]
        if kept:
            model_patcher.patches[key] = kept
        else:
            model_patcher.patches.pop(key, None)
    model_patcher.remove_attachments(ATTACHMENT)
    # ComfyUI re-patches a loaded model only when this id changes; without it the
    # removed weights would stay in a model still loaded from the earlier clone.
    model_patcher.patches_uuid = uuid.uuid4()
