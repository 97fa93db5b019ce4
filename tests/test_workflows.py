"""The bundled workflows: well-formed UI graphs (no ComfyUI needed), valid
prompts for a real ComfyUI with this package loaded, and executed end to end
through ComfyUI's executor with test-sized model files."""

import asyncio
import copy
import importlib.util
import json
import os

import pytest
import torch

from conftest import REPO_ROOT

WORKFLOW_DIR = os.path.join(REPO_ROOT, "workflows")
NAMES = sorted(f for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json"))
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
DISTILL = "CLEAR FLUX distill.json"  # teacher data + CLEAR Distill: no CLEAR file to download, nothing saved
COMFY_CLI = "comfy-cli converts UI workflows to prompts (pip install comfy-cli)"


def _load(name):
    with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def check_graph(workflow):
    """Problems in a UI-format graph's structure (links, slots, types)."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, type_ in workflow["links"]:
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id} joins missing nodes {src} -> {dst}")
            continue
        outputs, inputs = nodes[src]["outputs"], nodes[dst]["inputs"]
        if src_slot >= len(outputs) or link_id not in (outputs[src_slot].get("links") or []):
            problems.append(f"link {link_id}: output slot {src_slot} of node {src} does not list it")
        elif outputs[src_slot]["type"] != type_:
            problems.append(f"link {link_id}: output type {outputs[src_slot]['type']} != {type_}")
        if dst_slot >= len(inputs) or inputs[dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: input slot {dst_slot} of node {dst} does not hold it")
        elif inputs[dst_slot]["type"] != type_:
            problems.append(f"link {link_id}: input type {inputs[dst_slot]['type']} != {type_}")
    return problems


def test_workflow_set_and_reading_order():
    from comfyui_clear.nodes.templates import ORDER, in_reading_order

    assert NAMES == ["CLEAR FLUX 1K text to image.json", "CLEAR FLUX 4K hires + ControlNet.json",
                     "CLEAR FLUX 4K hires + LoRA.json", "CLEAR FLUX 4K hires.json",
                     "CLEAR FLUX 8K hires + 2 GPUs.json", "CLEAR FLUX 8K hires.json", "CLEAR FLUX distill.json"]
    assert sorted(name + ".json" for name in ORDER) == NAMES  # every template has its place in the dialog
    spec = importlib.util.spec_from_file_location("workflows_build", os.path.join(WORKFLOW_DIR, "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert list(build.SPECS) == list(ORDER)
    # the server's directory-order reply, reordered: ours only, whatever our folder is called
    shuffled = {"other-pack": ["b", "a"], "clear-attention": list(reversed(ORDER)) + ["extra"]}
    assert in_reading_order(shuffled) == {"other-pack": ["b", "a"], "clear-attention": list(ORDER) + ["extra"]}


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_a_wellformed_ui_graph(name):
    wf = _load(name)
    assert wf["version"] == 0.4 and wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    assert check_graph(wf) == []
    types = [n["type"] for n in wf["nodes"]]
    if name == DISTILL:  # teacher data -> distil -> previews; the result goes to models/clear
        assert {"CLEARTeacherData", "CLEARDistill", "PreviewImage"} <= set(types)
    else:
        assert "CLEARAttentionPatch" in types and "SaveImage" in types
    notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1
    for folder in ("diffusion_models", "text_encoders", "vae") + (() if name == DISTILL else ("clear",)):
        assert f"`models/{folder}/`" in notes[0]["widgets_values"][0]
    if name == DISTILL:  # notes on time and memory (issue 27.9)
        assert "**Time**" in notes[0]["widgets_values"][0] and "**Memory**" in notes[0]["widgets_values"][0]


TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above its pos


def _bounds(node):
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, w, h + TITLE_H


def _overlap(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("name", NAMES)
def test_layout_has_no_overlaps_and_fits_a_1080p_window(name):
    """The frontend renders nodes at these sizes (tests/test_browser.py checks
    that); here: no two overlap, each node but the note sits inside one stage group, and the
    frontend's fit view (0.75 x the window / the graph) stays above the zoom
    where it stops drawing text (8 px font minimum / 14 px text = 0.57)."""
    wf = _load(name)
    boxes = [(n.get("title", n["type"]), _bounds(n)) for n in wf["nodes"]]
    assert [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if _overlap(ba, bb)] == []
    groups = [g["bounding"] for g in wf["groups"]]
    for title, (x, y, w, h) in boxes:
        if title == "Read me":  # the note stands on its own
            continue
        inside = [g for g in groups if g[0] <= x and g[1] <= y and x + w <= g[0] + g[2] and y + h <= g[1] + g[3]]
        assert len(inside) == 1, title
    assert [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:] if _overlap(a, b)] == []
    x0 = min(b[0] for _, b in boxes)
    y0 = min(b[1] for _, b in boxes)
    width = max(b[0] + b[2] for _, b in boxes) - x0
    height = max(b[1] + b[3] for _, b in boxes) - y0
    assert 0.75 * min(1920 / width, 1080 / height) >= 0.6, (width, height)


def test_layout_checker_catches_an_overlap():
    wf = _load("CLEAR FLUX 4K hires.json")
    a, b = wf["nodes"][0], wf["nodes"][1]
    assert not _overlap(_bounds(a), _bounds(b))
    b["pos"] = [a["pos"][0] + 10, a["pos"][1] + a["size"][1] - 5]
    assert _overlap(_bounds(a), _bounds(b))


@pytest.mark.parametrize("name", NAMES)
def test_every_model_file_has_a_download_entry(name):
    """What the frontend's missing-models check reads: properties.models
    entries whose name is one of the node's widget values."""
    wf = _load(name)
    listed = {}
    for n in wf["nodes"]:
        for m in n["properties"].get("models", []):
            assert m["name"] in n["widgets_values"], (n["type"], m)
            assert m["url"].startswith("https://huggingface.co/") and "/resolve/main/" in m["url"], m
            listed[m["name"]] = m
    want = {"flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"}
    if name != DISTILL:  # the distill workflow makes its CLEAR file
        clear = next(n for n in wf["nodes"] if n["type"] == "CLEARAttentionPatch")["widgets_values"][0]
        assert listed[clear] == {"name": clear, "directory": "clear",
                                 "url": f"https://huggingface.co/Huage001/CLEAR/resolve/main/{clear}"}
        want.add(clear)
    if any(n["type"] == "ControlNetLoader" for n in wf["nodes"]):
        want.add("FLUX.1-dev-ControlNet-Union-Pro.safetensors")
    assert set(listed) == want  # the LoRA is the user's own: explained in the note, no download


@pytest.mark.parametrize("name", NAMES)
def test_every_template_has_a_jpeg_thumbnail(name):
    Image = pytest.importorskip("PIL.Image", reason="pip install pillow (it comes with matplotlib, a test extra)")

    path = os.path.join(WORKFLOW_DIR, name[:-5] + ".jpg")  # what the Templates dialog requests
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == (512, 512)


def test_graph_checker_catches_broken_links():
    wf = _load("CLEAR FLUX 4K hires.json")
    broken = copy.deepcopy(wf)
    broken["links"][0][5] = "IMAGE" if broken["links"][0][5] != "IMAGE" else "LATENT"
    assert check_graph(broken)
    broken = copy.deepcopy(wf)
    broken["links"][1][3] = 999
    assert check_graph(broken)


@pytest.mark.parametrize("name", NAMES)
def test_committed_json_is_what_build_py_writes(name):
    spec = importlib.util.spec_from_file_location("clear_workflow_build", os.path.join(WORKFLOW_DIR, "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
        assert f.read() == build.render(name), "run: python workflows/build.py"


# ---------------------------------------------------------------------------
# With ComfyUI

MODEL_FILES = {
    "diffusion_models": ["flux1-dev.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors"],
    "vae": ["ae.safetensors"],
    "loras": ["my_flux_lora.safetensors"],
    "controlnet": ["FLUX.1-dev-ControlNet-Union-Pro.safetensors"],
    "clear": ["clear_local_16.safetensors"],
}


@pytest.fixture(scope="module")
def comfy(comfyui, tmp_path_factory):
    """ComfyUI's node registry with the core extras and this package loaded as
    ComfyUI loads a custom node; model folders in a temp dir."""
    pytest.importorskip("comfy_cli", reason=COMFY_CLI)
    import folder_paths
    import nodes

    base = tmp_path_factory.mktemp("wf_models")
    for folder, files in MODEL_FILES.items():
        (base / folder).mkdir()
        folder_paths.add_model_folder_path(folder, str(base / folder), is_default=True)
        for f in files:
            (base / folder / f).touch()
    custom = tmp_path_factory.mktemp("custom_nodes")
    os.symlink(REPO_ROOT, custom / "ComfyUI-CLEAR")
    loop = asyncio.new_event_loop()
    loop.run_until_complete(nodes.init_builtin_extra_nodes())
    assert loop.run_until_complete(nodes.load_custom_node(str(custom / "ComfyUI-CLEAR")))
    assert "CLEARAttentionPatch" in nodes.NODE_CLASS_MAPPINGS
    yield nodes, base, loop
    loop.close()


def _object_info(nodes):
    info = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        info[name] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                      "output": list(getattr(cls, "RETURN_TYPES", ())),
                      "output_node": getattr(cls, "OUTPUT_NODE", False)}
    return info


def to_api(nodes, workflow):
    """The frontend's UI -> API conversion (comfy-cli's implementation)."""
    convert_ui_to_api = pytest.importorskip("comfy_cli.workflow_to_api", reason=COMFY_CLI).convert_ui_to_api

    unknown = {n["type"] for n in workflow["nodes"]} - set(nodes.NODE_CLASS_MAPPINGS) - UI_ONLY
    if unknown:
        raise ValueError(f"unknown node types {sorted(unknown)}")
    info = _object_info(nodes)
    for n in workflow["nodes"]:  # every linked input must be an input of the node
        if n["type"] in info:
            known = {k for section in info[n["type"]]["input_order"].values() for k in section}
            if bad := {i["name"] for i in n["inputs"]} - known:
                raise ValueError(f"node {n['id']} {n['type']}: no inputs named {sorted(bad)}")
    return convert_ui_to_api(workflow, info)


def validate(loop, prompt):
    import execution

    return loop.run_until_complete(execution.validate_prompt("test", prompt, None))


@pytest.mark.comfyui
@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_a_valid_prompt_in_real_comfyui(comfy, name):
    nodes, _, loop = comfy
    if name == DISTILL and "CLEARDistill" not in nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("CLEARDistill (nodes/distill.py) is not in this tree yet")
    prompt = to_api(nodes, _load(name))
    assert any(v["class_type"] in ("CLEARAttentionPatch", "CLEARTeacherData") for v in prompt.values())
    if name == DISTILL:  # the teacher data feeds the trainer, which trains the loaded model
        by_type = {v["class_type"]: v for v in prompt.values()}
        assert by_type["CLEARDistill"]["inputs"]["dataset"][0] in prompt
        assert by_type["CLEARDistill"]["inputs"]["model"] == by_type["CLEARTeacherData"]["inputs"]["model"]
    valid, error, outputs, node_errors = validate(loop, prompt)
    assert valid, (error, node_errors)
    assert outputs


@pytest.mark.comfyui
@pytest.mark.parametrize("mutation", ["node_type", "input_name", "model_file", "widget_value"])
def test_validation_catches_broken_workflows(comfy, mutation):
    nodes, _, loop = comfy
    wf = _load("CLEAR FLUX 4K hires.json")
    clear = next(n for n in wf["nodes"] if n["type"] == "CLEARAttentionPatch")
    if mutation == "node_type":
        clear["type"] = "CLEARAttentionPatchV2"
    elif mutation == "input_name":
        clear["inputs"][0]["name"] = "unet"
    elif mutation == "model_file":
        next(n for n in wf["nodes"] if n["type"] == "VAELoader")["widgets_values"] = ["missing_vae.safetensors"]
    else:
        clear["widgets_values"][1] = -3  # window_size below its minimum
    try:
        prompt = to_api(nodes, wf)
    except ValueError:
        return
    valid, *_ = validate(loop, prompt)
    assert not valid


# ---------------------------------------------------------------------------
# Execution with test-sized files

class _TestConditioning:
    """Stands in for DualCLIPLoader + CLIPTextEncode: FLUX's T5-XXL has a fixed
    4.7B-parameter architecture, too big to build at test size on a CPU."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 8})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    def make(self, tokens):
        gen = torch.Generator().manual_seed(tokens)
        return ([[torch.randn(1, tokens, 4096, generator=gen) * 0.5,
                  {"pooled_output": torch.randn(1, 768, generator=gen)}]],)


def _write_vae(path):
    """A FLUX VAE file with random weights: ComfyUI detects the architecture from the keys."""
    import comfy.ldm.models.autoencoder
    from safetensors.torch import save_file

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.ldm.models.autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for k, v in vae.state_dict().items():  # scaled like a trained net, so nothing overflows
        if v.dim() > 1:
            v = torch.randn(v.shape, generator=gen) / (v[0].numel() ** 0.5)
        else:
            v = torch.ones(v.shape) if "norm" in k and k.endswith("weight") else torch.zeros(v.shape)
        sd[k] = v.to(torch.bfloat16).contiguous()
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def runnable(comfy):
    """Real files: a FLUX at the real width with 1 double + 1 single block (fp8),
    CLEAR weights for it, a FLUX VAE, and a LoRA for it."""
    import flux_tiny
    from safetensors.torch import save_file

    nodes, base, loop = comfy
    flux_tiny.write_flux_checkpoint(base / "diffusion_models" / "flux1-dev.safetensors")
    flux_tiny.write_clear_file(base / "clear" / "clear_local_16.safetensors", hidden=3072, depth=1, depth_single=1)
    _write_vae(base / "vae" / "ae.safetensors")
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for module, rows in (("double_blocks_0_img_attn_qkv", 9216), ("single_blocks_0_linear1", 21504)):
        lora[f"lora_unet_{module}.lora_up.weight"] = torch.randn(rows, 4, generator=gen) * 0.01
        lora[f"lora_unet_{module}.lora_down.weight"] = torch.randn(4, 3072, generator=gen) * 0.01
    save_file(lora, str(base / "loras" / "my_flux_lora.safetensors"))
    nodes.NODE_CLASS_MAPPINGS["TestFluxConditioning"] = _TestConditioning
    yield comfy
    del nodes.NODE_CLASS_MAPPINGS["TestFluxConditioning"]


def _shrink(prompt, base_size, target):
    """Test sizes: tiny images, 2 steps; text encoders replaced (see _TestConditioning)."""
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "DualCLIPLoader":
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            prompt[node_id] = {"class_type": "TestFluxConditioning", "inputs": {"tokens": 8}}
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=base_size, height=base_size)
        elif kind == "ImageScale":
            inputs.update(width=target, height=target)
        elif kind == "KSampler":
            inputs["steps"] = 2 if inputs["denoise"] == 1.0 else 3  # 0.7 of 3 -> 2 steps run
        elif kind in ("VAEEncodeTiled", "VAEDecodeTiled"):
            inputs.update(tile_size=128, overlap=32)
        elif kind == "SaveImage":
            inputs["filename_prefix"] = "clear_test/" + inputs["filename_prefix"]
    return prompt


def _execute(nodes, prompt):
    import folder_paths

    from _comfy_server import execute, prompt_executor

    executor = prompt_executor()
    execute(executor, prompt)
    return executor.history_result["outputs"], folder_paths.get_output_directory()


@pytest.mark.comfyui
@pytest.mark.slow
@pytest.mark.parametrize("name,base_size,target", [
    ("CLEAR FLUX 1K text to image.json", 64, None),
    ("CLEAR FLUX 4K hires.json", 64, 160),
    ("CLEAR FLUX 4K hires + LoRA.json", 64, 128),
    ("CLEAR FLUX 8K hires + 2 GPUs.json", 64, 96),  # CPU-only ComfyUI: the two bands run as threads
])
def test_workflow_executes_at_test_size(runnable, name, base_size, target):
    Image = pytest.importorskip("PIL.Image", reason="pip install pillow (ComfyUI's requirements)")

    from comfyui_clear.nodes import band_split

    nodes, _, loop = runnable
    prompt = _shrink(to_api(nodes, _load(name)), base_size, target)
    valid, error, _, node_errors = validate(loop, prompt)
    assert valid, (error, node_errors)
    if "GPUs" in name and not band_split.has_engine():  # ComfyUI < 0.33: the node stops (its message:
        with pytest.raises(AssertionError, match="'node_type': 'CLEARMultiGPUSplit'"):  # test_band_split.py)
            _execute(nodes, prompt)
        return
    outputs, out_dir = _execute(nodes, prompt)
    saved = [img for out in outputs.values() for img in out.get("images", [])]
    assert len(saved) == 1
    image = Image.open(os.path.join(out_dir, saved[0]["subfolder"], saved[0]["filename"]))
    assert image.size == (target or base_size,) * 2
    import numpy as np
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    assert pixels.std() > 1.0, "a flat image: NaN or zeros somewhere in the graph"


# ---------------------------------------------------------------------------
# Errors as the UI shows them

class _TestNotFluxModel:
    """A MODEL whose diffusion model is not FLUX (the tiny FLUX with its
    diffusion model object-patched away): every CLEAR node refuses it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "make"

    def make(self):
        import flux_tiny

        model = flux_tiny.make_tiny_flux()
        model.add_object_patch("diffusion_model", torch.nn.Identity())
        return (model,)


class _TestModelSink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True

    def take(self, model):
        return ()


@pytest.mark.comfyui
@pytest.mark.parametrize("node,inputs,error", [
    ("CLEARAttentionPatch", {"weights": "none (training-free)", "window_size": 0, "down_factor": 0,
                             "proportional_attention": False, "rope_ntk_factor": 1.0}, "CLEARPatchError"),
    ("CLEARTokenChunking", {"chunk_tokens": 0}, "TokenChunkingError"),
    ("CLEARMultiGPUSplit", {"gpus": 2}, "BandSplitError"),
])
def test_ui_error_names_the_exception_class(comfy, monkeypatch, node, inputs, error):
    """Through ComfyUI's real PromptExecutor with the package loaded as ComfyUI
    loads it: the execution_error the UI shows names the class. Before, its
    exception_type was the module's name, a file path, glued to it
    ('/.../custom_nodes/ComfyUI-CLEAR.nodes.clear_patch.CLEARPatchError')."""
    import execution

    from comfyui_clear.nodes import band_split, clear_patch, hub, token_chunking, weights
    from comfyui_clear.nodes.compat import prompt_executor

    nodes, _, _ = comfy
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestNotFluxModel", _TestNotFluxModel)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestModelSink", _TestModelSink)

    class Server:
        client_id = None
        last_node_id = None
        sockets_metadata = {}

        def send_sync(self, *args, **kwargs):
            pass

    executor = prompt_executor(Server())
    prompt = {"1": {"class_type": "TestNotFluxModel", "inputs": {}},
              "2": {"class_type": node, "inputs": {"model": ["1", 0], **inputs}},
              "3": {"class_type": "TestModelSink", "inputs": {"model": ["2", 0]}}}
    executor.execute(prompt, "test-error", {}, ["3"])
    assert not executor.success
    ((_, shown),) = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert shown["node_type"] == node and shown["exception_type"] == error, shown["exception_type"]
    assert shown["exception_message"].startswith(("CLEAR", "FLUX"))
    for cls in (clear_patch.CLEARPatchError, token_chunking.TokenChunkingError, band_split.BandSplitError,
                weights.CLEARWeightsError, hub.CLEARDownloadError):
        assert execution.full_type_name(cls) == cls.__name__
