"""Teacher data for CLEAR distillation: the user's own model samples a prompt
list at the training resolution, and each sample (the sampler's latent and the
text conditioning the family uses) lands in a folder as one safetensors file.
The trainer (nodes/distill.py) reads the folder through TeacherDataset.

Layout of a dataset folder:
- ``dataset.json``: {"format": 1, "family", "fingerprint", "width", "height",
  "latent_shape": [C, h, w], "steps", "guidance" (null without a guidance
  input), "count"}, written when generation starts and checked on resume;
- ``sample_{index:06d}.safetensors``: ``latent`` (1, C, h, w) float32 as the
  sampler returned it (before ``latent_format.process_in``), ``context``
  (1, T, D) float32, ``pooled`` (1, P) float32 where the family has a pooled
  vector; string metadata ``clear.dataset`` = "1", ``prompt``, ``seed``,
  ``guidance`` ("" without a guidance input), ``width``, ``height``,
  ``steps``, ``family``.
Files are written to a temporary name and renamed, so a sample file is whole
or absent: an interrupted run resumes at the first missing sample."""

import json
import logging
import os
import re

import torch

from .runtime import CATEGORY, ui_error

log = logging.getLogger(__name__)

FORMAT = 1
INDEX_FILE = "dataset.json"
SAMPLE_RE = re.compile(r"^sample_(\d{6,})\.safetensors$")
ENCODE_AHEAD = 16  # prompts encoded per text-encoder pass during generation
DATASET_TYPE = "CLEAR_DATASET"  # ComfyUI type between the teacher-data node and the trainer: the folder path


@ui_error
class CLEARDataError(ValueError):
    """A teacher dataset that cannot be written or read; the message says how to fix it."""


def sample_name(index):
    return f"sample_{index:06d}.safetensors"


def _atomic_write(path, write):
    """write(tmp_path), then rename over ``path``: readers never see half a file."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _float32(name, tensor, dims):
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims or tensor.shape[0] != 1:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise CLEARDataError(f"teacher sample '{name}' must be a tensor of {dims} dimensions with batch 1; got {shape}.")
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


def write_sample(folder, index, latent, context, pooled, meta):
    """Write sample ``index`` into ``folder`` (atomically); returns its path.
    ``meta``: prompt, seed, guidance (None or "" without a guidance input),
    width, height, steps, family (stored as strings)."""
    from safetensors.torch import save_file

    tensors = {"latent": _float32("latent", latent, 4), "context": _float32("context", context, 3)}
    if pooled is not None:
        tensors["pooled"] = _float32("pooled", pooled, 2)
    metadata = {key: "" if value is None else str(value) for key, value in meta.items()}
    metadata["clear.dataset"] = str(FORMAT)
    os.makedirs(folder, exist_ok=True)
    return _atomic_write(os.path.join(folder, sample_name(index)),
                         lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_index(folder, info):
    """Write ``dataset.json`` (atomically); ``info`` without "format"."""
    os.makedirs(folder, exist_ok=True)
    text = json.dumps({"format": FORMAT, **info}, indent=1)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    return _atomic_write(os.path.join(folder, INDEX_FILE), write)


def read_index(folder):
    """dataset.json of ``folder`` as a dict; CLEARDataError if absent, unreadable or of another format."""
    path = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(path):
        raise CLEARDataError(
            f"'{folder}' is not a CLEAR teacher dataset (no {INDEX_FILE}). Generate one with the "
            "'CLEAR Distill: Teacher Data' node (or `distill_cli teacher-data`) and connect its dataset output.")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CLEARDataError(f"cannot read {path} ({e}); delete the folder and generate the teacher data again.") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise CLEARDataError(
            f"{path} has dataset format {found!r}; this version of CLEAR reads format {FORMAT}. Generate the "
            "teacher data again with this version (or update ComfyUI-CLEAR).")
    missing = [k for k in ("family", "fingerprint", "width", "height", "latent_shape") if k not in info]
    if missing:
        raise CLEARDataError(f"{path} lacks {', '.join(missing)}; delete the folder and generate the teacher data again.")
    return info


def sample_files(folder):
    """{index: path} of the complete sample files in ``folder``."""
    found = {}
    for name in os.listdir(folder):
        m = SAMPLE_RE.match(name)
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    return dict(sorted(found.items()))


def _guidance(text):
    return None if text in (None, "", "None") else float(text)


class TeacherDataset:
    """The samples of a teacher-data folder, checked when opened (headers only:
    the tensors load in __getitem__). Raises CLEARDataError for a missing or
    empty folder, a folder without dataset.json or samples, another format,
    an unreadable sample, or latents of different shapes."""

    def __init__(self, folder):
        from safetensors import safe_open

        folder = os.fspath(folder) if folder is not None else ""
        if not folder or not os.path.isdir(folder):
            raise CLEARDataError(
                f"teacher dataset folder '{folder}' does not exist. Generate the data with the 'CLEAR Distill: "
                "Teacher Data' node first, or give the path of a folder it wrote.")
        if not os.listdir(folder):
            raise CLEARDataError(
                f"teacher dataset folder '{folder}' is empty. Run the 'CLEAR Distill: Teacher Data' node "
                "(count > 0) to fill it.")
        info = read_index(folder)
        self.folder = folder
        self.info = info
        self.family = info["family"]
        self.fingerprint = info["fingerprint"]
        self.latent_shape = tuple(info["latent_shape"])
        self.guidance = info.get("guidance")
        self.width, self.height = info["width"], info["height"]
        self.files = list(sample_files(folder).values())
        if not self.files:
            raise CLEARDataError(
                f"teacher dataset '{folder}' has no samples yet ({INDEX_FILE} only: generation stopped before "
                "the first sample). Run the 'CLEAR Distill: Teacher Data' node again with the same settings to "
                "generate them.")
        self.meta = []
        for path in self.files:
            try:
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                    keys = set(f.keys())
                    shape = tuple(f.get_slice("latent").get_shape()) if "latent" in keys else None
            except Exception as e:  # safetensors raises its own errors for truncated or foreign files
                raise CLEARDataError(
                    f"cannot read teacher sample {path} ({e}). Delete that file and run the 'CLEAR Distill: "
                    "Teacher Data' node again with the same settings: it regenerates missing samples.") from e
            if meta.get("clear.dataset") != str(FORMAT) or "context" not in keys or shape is None:
                raise CLEARDataError(
                    f"{path} is not a CLEAR teacher sample of format {FORMAT} (clear.dataset="
                    f"{meta.get('clear.dataset')!r}, tensors {sorted(keys)}). Remove it from the folder or "
                    "generate the teacher data again.")
            if len(shape) != 4 or tuple(shape[1:]) != self.latent_shape:
                raise CLEARDataError(
                    f"teacher samples differ in latent shape: {path} has {list(shape)}, the dataset "
                    f"{[1, *self.latent_shape]} ({INDEX_FILE}). A dataset holds one resolution and one model: "
                    "generate samples of another size or model into a new dataset_name.")
            self.meta.append(meta)
        count = info.get("count")
        if isinstance(count, int) and len(self.files) < count:
            log.info("CLEAR teacher dataset %s: %d of %d samples (generation did not finish; training uses those "
                     "present)", folder, len(self.files), count)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from safetensors.torch import load_file

        path, meta = self.files[i], self.meta[i]
        try:
            tensors = load_file(path)
        except Exception as e:
            raise CLEARDataError(f"cannot read teacher sample {path} ({e}); delete it and regenerate.") from e
        return {"latent": tensors["latent"], "context": tensors["context"], "pooled": tensors.get("pooled"),
                "guidance": _guidance(meta.get("guidance")), "seed": int(meta.get("seed", 0)),
                "prompt": meta.get("prompt", "")}


# ---------------------------------------------------------------------------
# Generation

def _fingerprint(diffusion_model):
    """The model's shape fingerprint as trained CLEAR files record it."""
    from .weights import model_fingerprint

    return model_fingerprint(diffusion_model)


def _teacher_model(model):
    """The FLUX-class diffusion model of ``model``, which must run its own attention."""
    import comfy.ldm.flux.model

    from .clear_patch import _is_clear_override

    diffusion_model = model.get_model_object("diffusion_model")
    if not isinstance(diffusion_model, comfy.ldm.flux.model.Flux):
        raise CLEARDataError(
            f"CLEAR distillation needs a FLUX-class model; got {type(diffusion_model).__name__} (FLUX.1, its "
            "fine-tunes, FLUX.2 [dev] and Klein are FLUX-class). Connect the output of a FLUX model loader.")
    override = model.model_options.get("transformer_options", {}).get("optimized_attention_override")
    if _is_clear_override(override):
        raise CLEARDataError(
            "the teacher data must come from the model with its own (dense) attention, but this model has "
            "the CLEAR Attention Patch on it. Connect the model loader's output (with your LoRAs, if you "
            "want them distilled in) directly to 'CLEAR Distill: Teacher Data'.")
    return diffusion_model


def _checked_size(width, height, ratio, patch):
    step = ratio * patch
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < step or value % step:
            raise CLEARDataError(
                f"{name}={value} must be a positive multiple of {step} (one token of this model); the "
                "authors train at 1024 x 1024.")


def _progress_reporter(progress, total, model):
    """report(value, total, x0=None). ``progress`` may be a callable
    progress(value, total), an object with ComfyUI ProgressBar's
    update_absolute, or None: a ProgressBar, which shows in the UI with a
    preview of the sample being made and lets the user's interrupt through."""
    previewer = None
    if progress is None:
        import comfy.utils

        progress = comfy.utils.ProgressBar(total)
        try:
            import latent_preview  # ComfyUI's (in its root folder); absent when driven from plain Python

            previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        except Exception:  # previews are a nicety: never fail generation for them
            previewer = None
    if not hasattr(progress, "update_absolute"):
        return lambda value, total_, x0=None: progress(value, total_)
    bar = progress

    def report(value, total_, x0=None):
        preview = None
        if previewer is not None and x0 is not None:
            preview = previewer.decode_latent_to_preview_image("JPEG", x0)
        bar.update_absolute(value, total_, preview)

    return report


def _index_info(family, fingerprint, width, height, latent_shape, steps, guidance, count, base_model):
    info = {"family": family, "fingerprint": fingerprint, "width": width, "height": height,
            "latent_shape": list(latent_shape), "steps": steps, "guidance": guidance, "count": count}
    if base_model:
        info["base_model"] = base_model
    return info


def _resume_index(folder, new):
    """The dataset.json to write for this run: ``new`` on a fresh folder; on a
    folder with data, the recorded one (count raised to the new count) after
    checking it is the same model and resolution."""
    path = os.path.join(folder, INDEX_FILE)
    if not os.path.exists(path):
        if os.path.isdir(folder) and sample_files(folder):
            raise CLEARDataError(
                f"'{folder}' holds teacher samples but no {INDEX_FILE}; choose a new dataset_name, or delete "
                "the folder to start over.")
        return new
    old = read_index(folder)
    diffs = [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in ("family", "fingerprint", "width", "height",
                                                                    "latent_shape") if old.get(key) != new[key]]
    if diffs:
        raise CLEARDataError(
            f"teacher dataset '{folder}' was generated with another model or resolution ({'; '.join(diffs)}). "
            "Resuming would mix them: choose a new dataset_name, or delete the folder to start over.")
    if new.get("base_model") and old.get("base_model") and new["base_model"] != old["base_model"]:
        log.warning("CLEAR teacher data: '%s' was started with other weights of the same shape (base model "
                    "%s, now %s); new samples come from the model connected now.", folder, old["base_model"],
                    new["base_model"])
    for key in ("steps", "guidance"):
        if old.get(key) != new[key]:
            log.warning("CLEAR teacher data: '%s' was started with %s=%r; the new samples use %r (each sample "
                        "records its own).", folder, key, old.get(key), new[key])
    return {**old, "count": max(int(old.get("count") or 0), new["count"])}


PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill_prompts.txt")


def prompt_list(text=""):
    """The prompts of ``text``, one per line (blank lines and lines starting
    with # skipped); empty ``text``: the shipped list (distill_prompts.txt)."""
    if not text or not text.strip():
        with open(PROMPTS_FILE, encoding="utf-8") as f:
            text = f.read()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _conditioning(clip, prompt, guidance):
    """[[context, {...}]] as CLIPTextEncode (+ FluxGuidance where the model takes guidance) make it."""
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    if guidance is not None:
        cond = [[c, {**extra, "guidance": guidance}] for c, extra in cond]
    return cond


def generate_teacher_data(model, clip, prompts, folder, count, width, height, steps, guidance, seed,
                          sampler_name="euler", scheduler="simple", progress=None):
    """Sample ``model`` (a ComfyUI MODEL, as the user connected it: no CLEAR)
    ``count`` times at width x height through ComfyUI's own sampler, sample i
    with prompt ``prompts[i % len(prompts)]`` (a list, or text with one per
    line; encoded by ``clip`` as CLIPTextEncode does) and seed
    ``seed + i``, cfg 1 and ``guidance`` for models with a guidance input;
    each sample goes to ``folder`` as it finishes. Samples already in the
    folder are kept (resume). Returns ``folder``."""
    import time

    import comfy.model_management
    import comfy.sample

    from .weights import base_model_hash

    if isinstance(prompts, str):  # text, one prompt per line (as the node's input)
        prompts = prompt_list(prompts) if prompts.strip() else []
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise CLEARDataError("the prompt list is empty; give at least one prompt (one per line), or leave the "
                             "prompts input empty for the shipped list.")
    for name, value, low in (("count", count, 1), ("steps", steps, 1)):
        if not isinstance(value, int) or value < low:
            raise CLEARDataError(f"{name}={value!r} must be an integer of at least {low}.")
    diffusion_model = _teacher_model(model)
    if clip is None or not hasattr(clip, "tokenize"):
        raise CLEARDataError("the clip input holds no text encoder (a checkpoint without one?); load the model's "
                             "text encoders (FLUX.1: DualCLIPLoader, type flux) and connect them.")
    family = _family(diffusion_model)
    latent_format = model.get_model_object("latent_format")
    ratio = getattr(latent_format, "spacial_downscale_ratio", 8)
    _checked_size(width, height, ratio, diffusion_model.patch_size)
    takes_guidance = bool(getattr(diffusion_model.params, "guidance_embed", False))
    guidance = float(guidance) if takes_guidance else None
    pooled_used = getattr(diffusion_model.params, "vec_in_dim", None) is not None
    latent_shape = (latent_format.latent_channels, height // ratio, width // ratio)

    folder = os.fspath(folder)
    info = _resume_index(folder, _index_info(family, _fingerprint(diffusion_model), width, height, latent_shape,
                                             steps, guidance, count, base_model_hash(model)))
    write_index(folder, info)
    done = set(sample_files(folder))
    todo = [i for i in range(count) if i not in done]
    report = _progress_reporter(progress, count * steps, model)
    report((count - len(todo)) * steps, count * steps)
    log.info("CLEAR teacher data: %d of %d samples to generate into %s (%dx%d, %d steps, %s)", len(todo), count,
             folder, width, height, steps, "no guidance input" if guidance is None else f"guidance {guidance:g}")

    start = time.monotonic()
    conds = {}
    for n, i in enumerate(todo):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if i not in conds:  # the text encoder runs for the next ENCODE_AHEAD samples at once, so that where
            conds = {j: _conditioning(clip, prompts[j % len(prompts)], guidance)  # it and the model do not
                     for j in todo[n:n + ENCODE_AHEAD]}  # fit the GPU together they swap once per chunk
        prompt, cond = prompts[i % len(prompts)], conds.pop(i)
        context, extra = cond[0][0], cond[0][1]
        pooled = extra.get("pooled_output") if pooled_used else None
        if pooled_used and pooled is None:
            raise CLEARDataError("this model takes a pooled text vector (FLUX.1's CLIP-L), which the CLIP input "
                                 "did not give; load FLUX.1's text encoders (DualCLIPLoader, type flux).")
        latent = torch.zeros((1, *latent_shape))
        noise = comfy.sample.prepare_noise(latent, seed + i)
        base = (count - len(todo) + n) * steps

        def callback(step, x0, x, total_steps, base=base):
            report(base + step + 1, count * steps, x0)

        samples = comfy.sample.sample(model, noise, steps, 1.0, sampler_name, scheduler, cond, cond, latent,
                                      denoise=1.0, callback=callback, disable_pbar=True, seed=seed + i)
        write_sample(folder, i, samples, context, pooled,
                     {"prompt": prompt, "seed": seed + i, "guidance": guidance, "width": width, "height": height,
                      "steps": steps, "family": family})
        report(base + steps, count * steps)
        elapsed = time.monotonic() - start
        log.info("CLEAR teacher data: sample %d/%d (seed %d) done, %.1f s/sample, about %.0f min left", i + 1,
                 count, seed + i, elapsed / (n + 1), elapsed / (n + 1) * (len(todo) - n - 1) / 60)
    return folder


def _family(diffusion_model):
    from .clear_patch import flux_family

    return flux_family(diffusion_model)


# ---------------------------------------------------------------------------
# The node

FOLDER = "clear_teacher"  # under ComfyUI's output directory


def teacher_folder(dataset_name):
    """Folder of ``dataset_name``: ``<output>/clear_teacher/<name>``, or the name itself if absolute."""
    name = (dataset_name or "").strip() if isinstance(dataset_name, str) else ""
    if not name:
        raise CLEARDataError("dataset_name is empty; give the dataset a name (a folder under "
                             f"output/{FOLDER}/) or an absolute folder path.")
    if os.path.isabs(name):
        return os.path.normpath(name)
    if ".." in name.replace("\\", "/").split("/"):
        raise CLEARDataError(f"dataset_name '{name}' leaves output/{FOLDER}/ ('..'); give a plain name or an "
                             "absolute folder path.")
    import folder_paths

    return os.path.normpath(os.path.join(folder_paths.get_output_directory(), FOLDER, name))


class CLEARTeacherData:
    DESCRIPTION = (
        "Step 1 of distilling CLEAR weights for your own FLUX model (FLUX.1, fine-tunes, FLUX.2 Klein or [dev]): "
        "the model, as you connect it and without CLEAR, generates `count` images over a prompt list at the "
        "training resolution, and each sample's latent and text conditioning is saved to "
        "output/clear_teacher/<dataset_name>. Takes as long as generating that many images. Resumable: queue it "
        "again with the same settings and it continues where it stopped. Connect `dataset` to CLEAR Distill.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (DATASET_TYPE,)
    RETURN_NAMES = ("dataset",)
    OUTPUT_TOOLTIPS = ("The dataset folder (a path). Connect it to CLEAR Distill's dataset input.",)
    OUTPUT_NODE = True
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The FLUX model to distil CLEAR for, straight from its loader (with your "
                                           "LoRAs if you want them in the teacher; not through the CLEAR Attention "
                                           "Patch)."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoders (FLUX.1: DualCLIPLoader, type flux)."}),
            "dataset_name": ("STRING", {"default": "flux_teacher", "tooltip": (
                f"Folder under output/{FOLDER}/ (or an absolute path). An existing dataset of the same model and "
                "size is resumed or extended.")}),
            "count": ("INT", {"default": 1000, "min": 1, "max": 100000, "tooltip": (
                "Number of samples. The CLEAR authors used 10K; 2K-8K suits an overnight run. Each costs one "
                "image generation.")}),
            "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                              "tooltip": "Training resolution (the authors: 1024 x 1024)."}),
            "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                               "tooltip": "Training resolution (the authors: 1024 x 1024)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": (
                "Sampling steps (euler, simple schedule, cfg 1): 20 for FLUX.1-dev and FLUX.2 [dev]; 4 for "
                "FLUX.1-schnell and FLUX.2 Klein (step-distilled models).")}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": (
                "FLUX guidance, for models with a guidance input (FLUX.1-dev, FLUX.2 [dev]); schnell and Klein "
                "have none and ignore it.")}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 48, "tooltip": "Sample i uses seed + i."}),
        }, "optional": {
            "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": (
                "One prompt per line (# starts a comment line); sample i uses line i, cycling. Empty: the "
                f"{len(prompt_list())} prompts shipped with CLEAR.")}),
        }}

    @classmethod
    def IS_CHANGED(cls, dataset_name=None, count=None, **kwargs):
        """The samples missing from a dataset that has some: the node runs
        again (and fills the gaps) after a sample was deleted; a complete
        dataset and a new one look alike, so a finished run stays cached (and
        CLEAR Distill after it)."""
        try:
            folder = teacher_folder(dataset_name)
            if not os.path.isdir(folder):
                return ""
            have = sample_files(folder)
            missing = [i for i in range(count) if i not in have] if have else []
            return repr(missing) if missing else ""
        except Exception:
            return float("nan")

    def generate(self, model, clip, dataset_name, count, width, height, steps, guidance, seed, prompts=""):
        folder = teacher_folder(dataset_name)
        return (generate_teacher_data(model, clip, prompt_list(prompts), folder, count, width, height, steps,
                                      guidance, seed),)


NODE_CLASS_MAPPINGS = {"CLEARTeacherData": CLEARTeacherData}
NODE_DISPLAY_NAME_MAPPINGS = {"CLEARTeacherData": "CLEAR Distill: Teacher Data"}
