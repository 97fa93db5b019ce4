"""ComfyUI-GGUF (city96) for tests, imported from the checkout in
COMFYUI_GGUF_PATH as ComfyUI imports a custom node (a package, its __init__
run). Skips with a reason where it or the `gguf` package is absent."""

import importlib
import importlib.util
import os
import sys

import pytest

GGUF_PATH_VAR = "COMFYUI_GGUF_PATH"
MODULE = "comfyui_gguf_under_test"  # one module for every test file


def import_comfyui_gguf():
    path = os.environ.get(GGUF_PATH_VAR)
    if not path:
        pytest.skip(f"{GGUF_PATH_VAR} is not set (point it at a ComfyUI-GGUF checkout to run the GGUF tests)")
    if not os.path.isfile(os.path.join(path, "loader.py")):
        pytest.skip(f"{GGUF_PATH_VAR}={path} is not a ComfyUI-GGUF checkout (no loader.py)")
    pytest.importorskip("gguf")
    if MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(MODULE, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE] = module
        spec.loader.exec_module(module)
    for sub in ("nodes", "ops", "dequant", "loader", "tools.convert"):
        importlib.import_module(f"{MODULE}.{sub}")
    return sys.modules[MODULE]
