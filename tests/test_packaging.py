"""What a registry install gets: pyproject.toml's metadata as comfy-cli reads it
(`comfy node publish`), the dependency lists (requirements.txt for
ComfyUI-Manager, pyproject.toml for the registry and pip) agreeing, and the
files `comfy node pack` would ship (git-tracked files minus .comfyignore).
No ComfyUI needed."""

import os
import subprocess
import zipfile

import pytest

from conftest import REPO_ROOT

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml with tomllib")
from packaging.requirements import Requirement  # noqa: E402  (pytest's own dependency)
from packaging.utils import canonicalize_name  # noqa: E402


def _pyproject():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _normalized(lines):
    out = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out.add((canonicalize_name(req.name), str(req.specifier), str(req.marker or "")))
    return out


def test_requirements_txt_and_pyproject_dependencies_agree():
    with open(os.path.join(REPO_ROOT, "requirements.txt"), encoding="utf-8") as f:
        from_txt = _normalized(f)
    from_toml = _normalized(_pyproject()["project"]["dependencies"])
    assert from_txt == from_toml, {"only requirements.txt": from_txt - from_toml,
                                   "only pyproject.toml": from_toml - from_txt}


def test_ci_installs_with_the_constraints_file():
    with open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(REPO_ROOT, "constraints.txt"), encoding="utf-8") as f:
        pins = _normalized(f)
    assert {name for name, _, _ in pins} >= {"torch", "torchvision", "torchaudio"}
    assert "-c constraints.txt" in ci and "-c constraints.txt" in readme  # one pin for both, nothing to drift
    assert "torch==" not in ci


def test_registry_metadata_as_comfy_cli_reads_it():
    config_parser = pytest.importorskip("comfy_cli.registry.config_parser", reason="pip install comfy-cli (test extra)")
    config = config_parser.extract_node_configuration(os.path.join(REPO_ROOT, "pyproject.toml"))
    project, comfy = config.project, config.tool_comfy
    assert "comfyui" not in project.name.lower()  # the registry's naming guidance
    assert project.supported_os and project.supported_accelerators  # valid classifiers (invalid ones read as [])
    assert project.urls.documentation and project.urls.issues and project.urls.repository
    assert comfy.display_name and comfy.publisher_id
    # the icon URL points at a file of this repository, within the registry's limits (800x400, SVG/PNG/JPG/GIF)
    prefix = project.urls.repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy.icon.startswith(prefix), comfy.icon
    icon = os.path.join(REPO_ROOT, comfy.icon[len(prefix):])
    Image = pytest.importorskip("PIL.Image", reason="pip install pillow (it comes with matplotlib, a test extra)")
    with Image.open(icon) as im:
        assert im.format in ("PNG", "JPEG", "GIF") and im.width <= 800 and im.height <= 400


def test_comfy_node_pack_ships_the_node_and_no_development_files(tmp_path, monkeypatch):
    file_utils = pytest.importorskip("comfy_cli.file_utils", reason="pip install comfy-cli (test extra)")
    try:
        tracked = subprocess.run(["git", "-C", REPO_ROOT, "ls-files"], capture_output=True, text=True).stdout.split()
    except OSError:
        tracked = []
    if not tracked:  # without git, comfy-cli would zip the whole folder (venvs included)
        pytest.skip("not a git checkout: `comfy node pack` packs git-tracked files")
    monkeypatch.chdir(REPO_ROOT)
    archive = tmp_path / "node.zip"
    file_utils.zip_files(str(archive))  # what `comfy node pack` runs
    names = zipfile.ZipFile(archive).namelist()
    assert not [n for n in names if n.split("/")[0] in ("tests", "bench", ".ci")], names
    assert not [n for n in names if n.startswith("workflows/") and n.endswith(".py")]
    for needed in ("__init__.py", "nodes/__init__.py", "nodes/clear_patch.py", "kernels/__init__.py",
                   "pyproject.toml", "requirements.txt", "LICENSE", "README.md"):
        assert needed in names
    assert {n for n in names if n.startswith("workflows/") and n.endswith(".json")}
    assert len([n for n in names if n.startswith("workflows/") and n.endswith(".jpg")]) == \
        len([n for n in names if n.startswith("workflows/") and n.endswith(".json")])
