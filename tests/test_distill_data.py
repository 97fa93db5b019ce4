"""Teacher data for CLEAR distillation (nodes/distill_data.py): the dataset
format on real safetensors files (round trip, every bad folder refused with one
clear error), and generation through ComfyUI's real sampling on tiny FLUX
models (a sample == sampling the same model directly, resume, mismatched resume,
the user's model untouched)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_clear.nodes import distill_data as D


def _info(**over):
    return {"family": "flux1", "fingerprint": "hidden=256,heads=2,double=2,single=2,bias=1", "width": 64,
            "height": 48, "latent_shape": [16, 6, 8], "steps": 2, "guidance": 3.5, "count": 3, **over}


def _write(folder, index, latent_shape=(16, 6, 8), T=5, pooled=True, seed=0, guidance=3.5):
    gen = torch.Generator().manual_seed(100 + index)
    latent = torch.randn((1, *latent_shape), generator=gen)
    context = torch.randn((1, T, 64), generator=gen)
    vec = torch.randn((1, 32), generator=gen) if pooled else None
    meta = {"prompt": f"prompt {index}", "seed": seed + index, "guidance": guidance, "width": 64, "height": 48,
            "steps": 2, "family": "flux1"}
    D.write_sample(folder, index, latent, context, vec, meta)
    return latent, context, vec


# --------------------------------------------------------------------------
# format

def test_round_trip(tmp_path):
    D.write_index(tmp_path, _info())
    written = [_write(tmp_path, i, T=4 + i, seed=7) for i in range(3)]
    ds = D.TeacherDataset(tmp_path)
    assert len(ds) == 3
    assert (ds.family, ds.latent_shape, ds.guidance) == ("flux1", (16, 6, 8), 3.5)
    assert ds.fingerprint == _info()["fingerprint"]
    for i, (latent, context, vec) in enumerate(written):
        s = ds[i]
        assert torch.equal(s["latent"], latent) and torch.equal(s["context"], context)
        assert torch.equal(s["pooled"], vec)
        assert s["context"].shape == (1, 4 + i, 64)  # text length may differ per sample
        assert (s["seed"], s["prompt"], s["guidance"]) == (7 + i, f"prompt {i}", 3.5)
    # the file itself: the tensors and string metadata DESIGN_27 names
    from safetensors import safe_open
    with safe_open(str(tmp_path / "sample_000001.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"latent", "context", "pooled"}
    assert meta["clear.dataset"] == "1" and meta["seed"] == "8" and meta["guidance"] == "3.5"
    assert {"prompt", "width", "height", "steps", "family"} <= set(meta)
    assert json.loads((tmp_path / "dataset.json").read_text())["format"] == 1


def test_no_pooled_no_guidance(tmp_path):
    """FLUX.2 Klein: no pooled vector, no guidance input: stored as absent / ""."""
    D.write_index(tmp_path, _info(family="flux2", guidance=None, latent_shape=[128, 3, 4]))
    _write(tmp_path, 0, latent_shape=(128, 3, 4), pooled=False, guidance=None)
    ds = D.TeacherDataset(tmp_path)
    assert ds.guidance is None
    s = ds[0]
    assert s["pooled"] is None and s["guidance"] is None
    assert set(load_file(str(tmp_path / "sample_000000.safetensors"))) == {"latent", "context"}


def test_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half way leaves neither the sample nor a temporary file."""
    import safetensors.torch

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, 0)
    assert os.listdir(tmp_path) == []


def test_partial_dataset_and_temp_files_ignored(tmp_path):
    D.write_index(tmp_path, _info(count=10))
    _write(tmp_path, 0)
    _write(tmp_path, 2)
    (tmp_path / ".sample_000001.safetensors.123.tmp").write_bytes(b"partial")
    ds = D.TeacherDataset(tmp_path)
    assert len(ds) == 2 and ds[1]["prompt"] == "prompt 2"


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("no_index", "no dataset.json"),
    ("no_samples", "no samples"),
    ("format", "format 2"),
    ("bad_json", "cannot read"),
    ("mixed", "differ in latent shape"),
    ("unreadable", "cannot read teacher sample"),
    ("foreign", "not a CLEAR teacher sample"),
])
def test_bad_folders(tmp_path, case, match):
    folder = tmp_path / "ds"
    if case != "missing":
        folder.mkdir()
    if case not in ("missing", "empty", "no_index", "bad_json"):
        D.write_index(folder, _info())
    if case == "no_index":
        _write(folder, 0)
    if case == "format":
        (folder / "dataset.json").write_text(json.dumps({**_info(), "format": 2}))
        _write(folder, 0)
    if case == "bad_json":
        (folder / "dataset.json").write_text("{not json")
    if case == "mixed":
        _write(folder, 0)
        _write(folder, 1, latent_shape=(16, 8, 8))
    if case == "unreadable":
        _write(folder, 0)
        (folder / D.sample_name(1)).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    if case == "foreign":
        save_file({"latent": torch.zeros(1, 16, 6, 8)}, str(folder / D.sample_name(0)))
    with pytest.raises(D.CLEARDataError, match=match) as info:
        D.TeacherDataset(folder)
    assert type(info.value).__module__ == "builtins"  # @ui_error: the UI shows the bare class name
    assert len(str(info.value)) > 60  # says how to fix it, not just what


def test_write_rejects_bad_shapes(tmp_path):
    with pytest.raises(D.CLEARDataError, match="4 dimensions"):
        D.write_sample(tmp_path, 0, torch.zeros(16, 6, 8), torch.zeros(1, 3, 64), None, {})


# --------------------------------------------------------------------------
# generation through ComfyUI's sampler (tiny models)

class TinyClip:
    """Stands in for ComfyUI's CLIP: tokenize + encode_from_tokens_scheduled,
    deterministic per text. pooled=False: a FLUX.2-style encoder (no pooled
    vector, an attention mask the FLUX model does not use)."""

    def __init__(self, pooled=True):
        self.pooled = pooled
        self.calls = 0

    def tokenize(self, text):
        return {"l": [[(ord(c), 1.0) for c in text]]}

    def encode_from_tokens_scheduled(self, tokens):
        import zlib

        self.calls += 1
        text = "".join(chr(t) for t, _ in tokens["l"][0])
        gen = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        T = 3 + len(text) % 5
        context = torch.randn(1, T, 64, generator=gen)
        if self.pooled:
            return [[context, {"pooled_output": torch.randn(1, 32, generator=gen)}]]
        return [[context, {"pooled_output": None, "attention_mask": torch.ones(1, T)}]]


PROMPTS = ["a red fox in snow", "a lighthouse at dusk, oil painting", "the word CLEAR in neon letters"]
SIZE = 64  # FLUX.1: 8x8 latent, 4x4 tokens; Klein-shaped: 4x4 latent, 4x4 tokens


@pytest.fixture(scope="module")
def flux(comfyui):
    from flux_tiny import make_tiny_flux

    return make_tiny_flux(seed=0)


def _direct(model, sample, seed, steps=2, guidance="stored"):
    """ComfyUI's sampler on the stored conditioning, as KSampler runs it."""
    import comfy.sample

    extra = {}
    if sample["pooled"] is not None:
        extra["pooled_output"] = sample["pooled"]
    g = sample["guidance"] if guidance == "stored" else guidance
    if g is not None:
        extra["guidance"] = g
    cond = [[sample["context"], extra]]
    latent = torch.zeros_like(sample["latent"])
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, denoise=1.0,
                               disable_pbar=True, seed=seed)


def _generate(model, folder, clip=None, count=3, width=SIZE, height=SIZE, guidance=2.0, seed=40, **kw):
    return D.generate_teacher_data(model, clip or TinyClip(), PROMPTS[:2], folder, count, width, height, 2,
                                   guidance, seed, progress=kw.pop("progress", lambda v, t: None), **kw)


def test_sample_equals_direct_sampling_flux1(flux, tmp_path, monkeypatch):
    monkeypatch.setattr(D, "ENCODE_AHEAD", 2)  # prompts encoded two at a time: sample 2 from the second pass
    clip = TinyClip()
    _generate(flux, tmp_path, clip=clip)
    assert clip.calls == 3
    ds = D.TeacherDataset(tmp_path)
    assert len(ds) == 3 and ds.family == "flux1" and ds.latent_shape == (16, SIZE // 8, SIZE // 8)
    assert ds.guidance == 2.0
    assert ds.fingerprint == D._fingerprint(flux.get_model_object("diffusion_model"))
    for i in range(3):
        s = ds[i]
        assert s["prompt"] == PROMPTS[i % 2] and s["seed"] == 40 + i and s["guidance"] == 2.0
        assert s["pooled"].shape == (1, 32)
        if i:  # sample 0 is sample 2's prompt at another seed
            assert torch.equal(s["latent"], _direct(flux, s, 40 + i))
    # the stored guidance is the one sampled with (FLUX.1-dev takes it), and seeds differ per sample
    assert not torch.allclose(ds[1]["latent"], _direct(flux, ds[1], 41, guidance=3.5))
    assert not torch.allclose(ds[1]["latent"], _direct(flux, ds[1], 42))
    assert not torch.allclose(ds[0]["latent"], ds[2]["latent"])  # same prompt, seed + 2


def test_sample_equals_direct_sampling_klein(comfyui, tmp_path):
    from flux_tiny import available_families, make_tiny_family

    if "flux2" not in available_families():  # ComfyUI 0.3.64: FLUX.1 only (a skip would fail CI's ComfyUI runs)
        import comfy.supported_models
        assert not hasattr(comfy.supported_models, "Flux2")
        return
    klein, channels = make_tiny_family("flux2")
    _generate(klein, tmp_path, clip=TinyClip(pooled=False), count=1, guidance=3.5)
    ds = D.TeacherDataset(tmp_path)
    assert ds.family == "flux2" and ds.guidance is None and ds.latent_shape == (channels, SIZE // 16, SIZE // 16)
    assert json.loads((tmp_path / "dataset.json").read_text())["guidance"] is None
    s = ds[0]
    assert s["pooled"] is None and s["guidance"] is None
    assert torch.equal(s["latent"], _direct(klein, s, 40))


def test_resume_after_interrupt_equals_one_run(flux, tmp_path, monkeypatch):
    import comfy.model_management
    import comfy.sample

    whole = tmp_path / "whole"
    _generate(flux, whole, count=2)

    def interrupt_after_first(value, total):
        if value == 2:  # sample 0's last step: the user presses Cancel
            comfy.model_management.interrupt_current_processing(True)

    part = tmp_path / "part"
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _generate(flux, part, count=2, progress=interrupt_after_first)
    assert sorted(os.listdir(part)) == ["dataset.json", "sample_000000.safetensors"]

    calls = []
    real = comfy.sample.sample
    monkeypatch.setattr(comfy.sample, "sample", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
    _generate(flux, part, count=2)
    assert calls == [41]  # sample 0 kept, the rest generated
    for name in sorted(os.listdir(whole)):
        if name.endswith(".safetensors"):
            a, b = load_file(str(whole / name)), load_file(str(part / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((whole / "dataset.json").read_text()) == json.loads((part / "dataset.json").read_text())

    calls.clear()
    _generate(flux, part, count=3)  # a larger count extends the dataset
    assert calls == [42] and len(D.TeacherDataset(part)) == 3
    assert json.loads((part / "dataset.json").read_text())["count"] == 3


@pytest.mark.parametrize("change, match", [
    (dict(width=SIZE // 2), "width 64 -> 32"),
    ("other_model", "fingerprint"),
])
def test_mismatched_resume(flux, tmp_path, change, match):
    from flux_tiny import make_tiny_flux

    _generate(flux, tmp_path, count=1)
    if change == "other_model":
        model, change = make_tiny_flux(seed=0, hidden=128), {}
    else:
        model = flux
    with pytest.raises(D.CLEARDataError, match=match) as info:
        _generate(model, tmp_path, count=2, **change)
    assert "new dataset_name" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["dataset.json", "sample_000000.safetensors"]


def test_model_not_mutated(flux, tmp_path):
    import copy

    before_sd = {k: v.clone() for k, v in flux.model.state_dict().items()}
    before = (copy.copy(flux.model_options), dict(flux.object_patches), dict(flux.patches), flux.patches_uuid)
    _generate(flux, tmp_path, count=1)
    after_sd = flux.model.state_dict()
    assert before_sd.keys() == after_sd.keys() and all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    assert (flux.model_options, flux.object_patches, flux.patches, flux.patches_uuid) == before


def test_refuses_bad_input(flux, tmp_path):
    from comfyui_clear.nodes.clear_patch import patch_model
    from comfyui_clear.nodes.weights import TRAINING_FREE

    with pytest.raises(D.CLEARDataError, match="CLEAR Attention Patch on it"):
        _generate(patch_model(flux, TRAINING_FREE), tmp_path)
    not_flux = flux.clone()
    not_flux.add_object_patch("diffusion_model", torch.nn.Linear(2, 2))
    with pytest.raises(D.CLEARDataError, match="needs a FLUX-class model; got Linear"):
        _generate(not_flux, tmp_path)
    with pytest.raises(D.CLEARDataError, match="no text encoder"):
        D.generate_teacher_data(flux, None, PROMPTS, tmp_path, 1, SIZE, SIZE, 2, 3.5, 0)
    with pytest.raises(D.CLEARDataError, match="multiple of 16"):
        _generate(flux, tmp_path, width=120)
    with pytest.raises(D.CLEARDataError, match="prompt list is empty"):
        D.generate_teacher_data(flux, TinyClip(), ["", "  "], tmp_path, 1, SIZE, SIZE, 2, 3.5, 0)
    with pytest.raises(D.CLEARDataError, match="prompt list is empty"):
        D.generate_teacher_data(flux, TinyClip(), "# only a comment\n", tmp_path, 1, SIZE, SIZE, 2, 3.5, 0)
    with pytest.raises(D.CLEARDataError, match="pooled text vector"):
        _generate(flux, tmp_path, clip=TinyClip(pooled=False))
    assert not any(name.startswith("sample_") for name in os.listdir(tmp_path))


def test_prompt_lists():
    shipped = D.prompt_list("")
    assert 150 <= len(shipped) <= 300 and len(set(shipped)) == len(shipped)
    assert all(p.isascii() and 20 < len(p) < 200 for p in shipped)
    assert D.prompt_list("  \n") == shipped
    assert D.prompt_list("a cat\n\n# a comment\n  a dog  \n") == ["a cat", "a dog"]


# --------------------------------------------------------------------------
# the node, queued through ComfyUI's PromptExecutor as the UI queues it

class TestTinyClip:
    """A node giving the CLIP stand-in (the text encoders at the tiny size)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "make"

    def make(self):
        return (TinyClip(),)


def test_node_through_the_executor(comfyui, tmp_path, monkeypatch):
    import asyncio
    import copy

    import comfy.model_management
    import execution
    import folder_paths
    import nodes

    import flux_tiny
    from _comfy_server import execute, prompt_executor
    from comfyui_clear.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert NODE_DISPLAY_NAME_MAPPINGS["CLEARTeacherData"] == "CLEAR Distill: Teacher Data"
    models = tmp_path / "diffusion_models"
    models.mkdir()
    save_file(flux_tiny.make_tiny_flux(seed=3).model.diffusion_model.state_dict(), str(models / "tiny.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(models)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    for name, cls in {**NODE_CLASS_MAPPINGS, "TestTinyClip": TestTinyClip}.items():
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, name, cls)
    flux_tiny.detect_as_tiny(monkeypatch)
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "TestTinyClip", "inputs": {}},
        "3": {"class_type": "CLEARTeacherData", "inputs": {
            "model": ["1", 0], "clip": ["2", 0], "dataset_name": "tiny", "count": 2, "width": SIZE, "height": SIZE,
            "steps": 2, "guidance": 2.0, "seed": 40, "prompts": "\n".join(PROMPTS[:2])}},
    }
    folder = tmp_path / "output" / "clear_teacher" / "tiny"
    executor = prompt_executor()
    try:
        valid = asyncio.run(execution.validate_prompt("test", prompt, None))
        assert valid[0], valid
        execute(executor, copy.deepcopy(prompt))  # a fresh copy per queue, as the server's
        assert sorted(os.listdir(folder)) == ["dataset.json", "sample_000000.safetensors", "sample_000001.safetensors"]
        # what the executor made == generate_teacher_data on the same loaded model outside it
        model = nodes.UNETLoader().load_unet("tiny.safetensors", "default")[0]
        _generate(model, tmp_path / "direct", count=2)
        for name in ("sample_000000.safetensors", "sample_000001.safetensors"):
            a, b = load_file(str(folder / name)), load_file(str(tmp_path / "direct" / name))
            assert all(torch.equal(a[k], b[k]) for k in ("latent", "context", "pooled"))
        assert "3" in execute(executor, copy.deepcopy(prompt))  # all there: served from ComfyUI's cache
        os.remove(folder / "sample_000001.safetensors")
        assert "3" not in execute(executor, copy.deepcopy(prompt))  # a sample missing: the node runs and fills the gap
        assert torch.equal(load_file(str(folder / "sample_000001.safetensors"))["latent"],
                           load_file(str(tmp_path / "direct" / "sample_000001.safetensors"))["latent"])
    finally:
        comfy.model_management.unload_all_models()


def test_teacher_folder(comfyui, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    assert D.teacher_folder(" mine ") == str(tmp_path / "clear_teacher" / "mine")
    assert D.teacher_folder(str(tmp_path / "abs")) == str(tmp_path / "abs")
    for bad in ("", "  ", "../escape", "a/../../b"):
        with pytest.raises(D.CLEARDataError, match="dataset_name"):
            D.teacher_folder(bad)
