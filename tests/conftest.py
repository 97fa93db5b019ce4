"""Shared test setup. ComfyUI-dependent tests use the ``comfyui`` fixture, which
skips with a visible reason unless COMFYUI_PATH points at a ComfyUI checkout.
Every test using it is marked ``comfyui`` (``pytest -m comfyui`` runs just
those). With CLEAR_REQUIRE_COMFYUI=1 (CI) a skipped ComfyUI test fails instead."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRE_COMFYUI = os.environ.get("CLEAR_REQUIRE_COMFYUI") == "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfyui" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfyui)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """CI runs every ComfyUI test: there, a skip (whatever its reason) is a failure."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_COMFYUI and report.skipped and item.get_closest_marker("comfyui") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CLEAR_REQUIRE_COMFYUI=1 but this ComfyUI test was skipped: {reason}"


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


@pytest.fixture
def clear_folders(comfyui, tmp_path, monkeypatch):
    """ComfyUI's folder_paths with an empty models/ under tmp_path and no
    models/clear registered yet (tests/test_weights.py, tests/test_hub.py)."""
    import folder_paths

    from comfyui_clear.nodes import weights

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.delitem(folder_paths.folder_names_and_paths, weights.FOLDER, raising=False)
    return folder_paths
