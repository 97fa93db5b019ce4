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
