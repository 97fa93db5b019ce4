"""A real ComfyUI server with this package in custom_nodes/: the node is listed
in /object_info, and a prompt that loads a FLUX file (real width, one double and
one single block, fp8 weights), patches it with CLEAR and saves it runs; the
saved weights are the CLEAR ones."""

import json
import time
import urllib.request

import pytest
import torch

from _comfy_server import running_server

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    import flux_tiny

    base = tmp_path_factory.mktemp("comfy_base")
    (base / "models" / "diffusion_models").mkdir(parents=True)
    (base / "models" / "clear").mkdir()
    flux_tiny.write_flux_checkpoint(base / "models" / "diffusion_models" / "tiny_flux.safetensors")
    clear_sd = flux_tiny.write_clear_file(base / "models" / "clear" / "clear_local_16.safetensors",
                                          hidden=3072, depth=1, depth_single=1)
    with running_server(comfyui, base) as url:
        yield url, base, clear_sd


def test_node_is_listed_with_its_inputs(server):
    url, base, _ = server
    info = _get(url + "/object_info/CLEARAttentionPatch")["CLEARAttentionPatch"]
    assert info["display_name"] == "CLEAR Attention Patch"
    required = info["input"]["required"]
    assert list(required) == ["model", "weights", "window_size", "down_factor", "proportional_attention",
                              "rope_ntk_factor"]
    assert "clear_local_16.safetensors" in required["weights"][0]
    assert "none (training-free)" in required["weights"][0]
    for node in ("CLEARAttentionPatch", "CLEARTokenChunking", "CLEARMultiGPUSplit"):  # one menu, every output told
        info = _get(url + f"/object_info/{node}")[node]
        assert info["category"] == "model/patch/CLEAR"
        assert len(info["output_tooltips"]) == len(info["output"]) == 1 and info["output_tooltips"][0]
    assert "Import times for custom nodes" in (base / "server.log").read_text()
    assert "IMPORT FAILED" not in (base / "server.log").read_text()


def test_templates_come_in_reading_order_and_models_clear_exists(server):
    from comfyui_clear.nodes.templates import ORDER

    url, base, _ = server
    for route in ("/workflow_templates", "/api/workflow_templates"):  # ComfyUI's reply is in directory order
        assert _get(url + route)["ComfyUI-CLEAR"] == list(ORDER)
    assert (base / "models" / "clear").is_dir()


def test_prompt_with_the_node_runs_and_saves_clear_weights(server):
    url, base, clear_sd = server
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLEARAttentionPatch", "inputs": {
            "model": ["1", 0], "weights": "clear_local_16.safetensors", "window_size": 0, "down_factor": 0,
            "proportional_attention": True, "rope_ntk_factor": 10.0}},
        "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "clear_test/patched"}},
    }
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        prompt_id = json.loads(r.read())["prompt_id"]
    for _ in range(600):
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    status = history[prompt_id]["status"]
    assert status["status_str"] == "success", json.dumps(status)[-2000:]

    from safetensors.torch import load_file

    saved = [p for p in (base / "output" / "clear_test").iterdir() if p.suffix == ".safetensors"]
    sd = load_file(str(saved[0]))
    qkv = next(v for k, v in sd.items() if k.endswith("double_blocks.0.img_attn.qkv.weight")).float()
    want = torch.cat([clear_sd[f"transformer_blocks.0.attn.{n}.weight"] for n in ("to_q", "to_k", "to_v")]).float()
    # fp8 e4m3 keeps 3 mantissa bits: one rounding is within 1/16 relative (+ subnormals)
    assert ((qkv - want).abs() <= want.abs() / 16 + 2 ** -9).all()
