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
