"""Shared test setup. ComfyUI-dependent tests use the ``comfyui`` fixture, which
skips with a visible reason unless COMFYUI_PATH points at a ComfyUI checkout."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _comfyui_path():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None, "COMFYUI_PATH is not set (point it at a ComfyUI checkout to run the ComfyUI tests; see README)"
    if not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        return None, f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/model_patcher.py)"
    return path, None


@pytest.fixture(scope="session")
def comfyui():
    """Make ComfyUI importable in-process on the CPU; returns its folder."""
    path, why = _comfyui_path()
    if path is None:
        pytest.skip(why)
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401
    # ComfyUI's own `utils` package must win over comfy/utils.py, which
    # nodes.py puts on sys.path (main.py imports it first for the same reason).
    import utils.install_util  # noqa: F401
    return path
