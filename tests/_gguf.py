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


def tiny_gguf_flux(quantized=lambda key: True, unquantized_as_f32=False):
    """The tiny FLUX (tests/flux_tiny.py) on ComfyUI-GGUF's ops: the block
    weights ``quantized(key)`` picks as Q8_0, the rest as stored, or as GGUF F32
    tensors (what its loader gives unquantized weights) with
    ``unquantized_as_f32``. Returns (ModelPatcher on the CPU, ComfyUI-GGUF's ops)."""
    import comfy.model_patcher
    import comfy.supported_models
    import flux_tiny
    import torch

    ops = import_comfyui_gguf().ops  # skips without gguf or ComfyUI-GGUF
    import gguf

    dense = flux_tiny.make_tiny_flux().model
    config = comfy.supported_models.Flux(flux_tiny.tiny_unet_config())
    config.set_inference_dtype(torch.float32, torch.float32)
    config.custom_operations = ops.GGMLOps
    model = config.get_model({})
    sd = {}
    for key, value in dense.diffusion_model.state_dict().items():
        if "blocks." in key and key.endswith(".weight") and value.dim() == 2:
            if quantized(key):
                q = gguf.quants.quantize(value.numpy(), gguf.GGMLQuantizationType.Q8_0)
                value = ops.GGMLTensor(torch.from_numpy(q), tensor_type=gguf.GGMLQuantizationType.Q8_0,
                                       tensor_shape=value.shape)
            elif unquantized_as_f32:
                value = ops.GGMLTensor(value, tensor_type=gguf.GGMLQuantizationType.F32, tensor_shape=value.shape)
        sd[key] = value
    model.diffusion_model.load_state_dict(sd, strict=False)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, cpu, cpu), ops
