"""The UI's regime (issue 26.2): each combination the suite samples through
comfy.sample, queued through ComfyUI's real PromptExecutor as the browser
queues it: nodes run under torch.inference_mode, outputs cached between
prompts. Each graph (ComfyUI's own loader, LoRA, sampler and latent nodes,
the CLEAR nodes, tiny FLUX files; tests/flux_tiny.py) is queued, queued again
with one setting changed, and once more unchanged. The executor's latents must
equal the same graph's nodes called directly outside inference mode (how the
rest of the suite runs them, against its oracles); the changed prompt must give
the changed graph's result, re-running only the nodes the change reaches; the
unchanged one must come wholly from ComfyUI's cache."""

import asyncio

import pytest
import torch

import flux_tiny
from _comfy_server import execute, prompt_executor

pytestmark = pytest.mark.comfyui

FREE = "none (training-free)"
MODEL_FILE = "tiny-flux.safetensors"
GGUF_FILE = "tiny-flux-Q8_0.gguf"
LORA_FILE = "tiny-flux-lora.safetensors"


class TestTinyConditioning:
    """Stands in for the text encoders: FLUX conditioning at the tiny size."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 5}), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    def make(self, tokens, seed):
        return (flux_tiny.conditioning(tokens, seed),)


class TestKeepLatent:
    """An output node keeping each latent it is given (ComfyUI runs only what
    output nodes need)."""
    kept = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True

    def keep(self, samples):
        TestKeepLatent.kept.append(samples["samples"])
        return {}


@pytest.fixture(scope="module")
def ui(comfyui, tmp_path_factory):
    """ComfyUI's node registry with the CLEAR nodes and the test nodes; model
    folders holding a tiny FLUX (float32 safetensors), the five published CLEAR
    files (their key names, the tiny model's size) and a LoRA for it."""
    import comfy.model_management
    import folder_paths
    import nodes
    from safetensors.torch import save_file

    from comfyui_clear.nodes import NODE_CLASS_MAPPINGS, band_split
    from comfyui_clear.nodes.weights import PUBLISHED
    from test_weights import make_lora

    monkeypatch = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("executor_models")
    for folder in ("diffusion_models", "clear", "loras"):
        (base / folder).mkdir()
        folder_paths.add_model_folder_path(folder, str(base / folder), is_default=True)
    sd = flux_tiny.make_tiny_flux(seed=3).model.diffusion_model.state_dict()
    save_file(sd, str(base / "diffusion_models" / MODEL_FILE))  # float32: bf16 matmuls are slow on CPUs
    save_file(make_lora()[0], str(base / "loras" / LORA_FILE))
    for seed, (name, (_, d)) in enumerate(PUBLISHED.items()):
        flux_tiny.write_clear_file(base / "clear" / name, down_factor=d, seed=40 + seed)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    for name, cls in {**NODE_CLASS_MAPPINGS, "TestTinyConditioning": TestTinyConditioning,
                      "TestKeepLatent": TestKeepLatent}.items():
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, name, cls)
    if not band_split.has_engine():  # 0.3.64 refuses the split (test_band_split.py); its bands still run on the CPU
        monkeypatch.setattr(band_split, "_require_engine", lambda: None)
    flux_tiny.detect_as_tiny(monkeypatch)
    yield base
    monkeypatch.undo()
    for folder in ("diffusion_models", "clear", "loras"):  # in place: ComfyUI-GGUF's unet_gguf shares the list
        folder_paths.folder_names_and_paths[folder][0].remove(str(base / folder))
    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def gguf_loader(ui):
    """ComfyUI-GGUF's Unet Loader (GGUF) node and a Q8_0 file of the tiny FLUX;
    skips, as the other GGUF tests do, without ComfyUI-GGUF or gguf."""
    import nodes

    from _gguf import import_comfyui_gguf
    from test_gguf import write_gguf

    G = import_comfyui_gguf()
    write_gguf(G, ui / "diffusion_models" / GGUF_FILE, "Q8_0", seed=3)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "UnetLoaderGGUF", G.nodes.UnetLoaderGGUF)
    yield
    monkeypatch.undo()


@pytest.fixture
def ran(monkeypatch):
    """What ran: "chunked" per chunked FLUX block, "split" per band-split exchange."""
    from comfyui_clear.kernels import band
    from comfyui_clear.nodes import token_chunking

    seen = []
    for kind in ("double", "single"):
        real = getattr(token_chunking, f"{kind}_block")
        monkeypatch.setattr(token_chunking, f"{kind}_block",
                            lambda *a, _real=real, **k: seen.append("chunked") or _real(*a, **k))
    init = band.Exchange.__init__
    monkeypatch.setattr(band.Exchange, "__init__", lambda self, *a, **k: seen.append("split") or init(self, *a, **k))
    return seen


def graph(weights="clear_local_8.safetensors", loader="default", window=0, down=0, proportional=False, ntk=1.0,
          lora=None, chunk=None, gpus=None, size=(160, 128)):
    """An API prompt: loader -> [LoRA] -> CLEAR -> [token chunking] -> [split] ->
    KSampler (one Euler step) -> TestKeepLatent. ``size`` in pixels (/16: the token grid)."""
    prompt = {"1": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": GGUF_FILE}} if loader == "gguf" else
              {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_FILE, "weight_dtype": loader}}}
    model = ["1", 0]
    if lora is not None:
        prompt["2"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": model, "lora_name": LORA_FILE, "strength_model": lora}}
        model = ["2", 0]
    prompt["3"] = {"class_type": "CLEARAttentionPatch", "inputs": {
        "model": model, "weights": weights, "window_size": window, "down_factor": down,
        "proportional_attention": proportional, "rope_ntk_factor": ntk}}
    model = ["3", 0]
    if chunk is not None:
        prompt["4"] = {"class_type": "CLEARTokenChunking", "inputs": {"model": model, "chunk_tokens": chunk}}
        model = ["4", 0]
    if gpus is not None:
        prompt["5"] = {"class_type": "CLEARMultiGPUSplit", "inputs": {"model": model, "gpus": gpus}}
        model = ["5", 0]
    prompt["6"] = {"class_type": "TestTinyConditioning", "inputs": {"tokens": 5, "seed": 4}}
    prompt["7"] = {"class_type": "EmptyLatentImage", "inputs": {"width": size[0], "height": size[1], "batch_size": 1}}
    prompt["8"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 7, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}}
    prompt["9"] = {"class_type": "TestKeepLatent", "inputs": {"samples": ["8", 0]}}
    return prompt


def queue(executor, prompt):
    """Validate and execute as the server and its prompt worker do: (latent or
    None when the output node did not run, ids of the nodes served from cache)."""
    import execution

    valid = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert valid[0], valid
    TestKeepLatent.kept.clear()
    cached = execute(executor, prompt)
    assert len(TestKeepLatent.kept) <= 1
    return (TestKeepLatent.kept.pop() if TestKeepLatent.kept else None), set(cached)


def run_directly(prompt):
    """The latent of the same graph with each node's function called in
    dependency order, outside inference mode, as the rest of the suite calls
    nodes (under no_grad: 0.3.64's fp8 weight patching fails with autograd on)."""
    import nodes

    assert not torch.is_inference_mode_enabled()
    results = {}

    def output(node_id):
        if node_id not in results:
            node = prompt[node_id]
            cls = nodes.NODE_CLASS_MAPPINGS[node["class_type"]]
            inputs = {k: output(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            results[node_id] = getattr(cls(), cls.FUNCTION)(**inputs)
        return results[node_id]

    with torch.no_grad():
        return output("8")[0]["samples"]


def unchanged(before, after):
    """Nodes of ``after`` whose inputs and upstream nodes are those of ``before``."""
    same = {}

    def check(node_id):
        if node_id not in same:
            node = after[node_id]
            same[node_id] = (before.get(node_id) == node and
                             all(check(v[0]) for v in node["inputs"].values() if isinstance(v, list)))
        return same[node_id]

    return {node_id for node_id in after if check(node_id)}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = {  # name: (the graph, the one setting changed for the re-queue)
    "clear_local_8": (dict(weights="clear_local_8.safetensors"), dict(weights="clear_local_8_down_4.safetensors")),
    # tall grids (rows x 6 columns) whose diagonal passes the radius: local attention, few tokens
    "clear_local_16": (dict(weights="clear_local_16.safetensors", size=(96, 288)), dict(proportional=True)),
    "clear_local_32": (dict(weights="clear_local_32.safetensors", size=(96, 544)), dict(window=20)),
    "clear_local_8_down_4": (dict(weights="clear_local_8_down_4.safetensors"), dict(window=3)),
    "clear_local_16_down_4": (dict(weights="clear_local_16_down_4.safetensors", size=(96, 288)),
                              dict(weights="clear_local_16.safetensors")),
    "training-free": (dict(weights=FREE, window=3, down=2), dict(down=4)),
    "token chunking": (dict(weights="clear_local_8_down_4.safetensors", chunk=16), dict(window=4)),
    "multi-GPU split": (dict(weights="clear_local_8_down_4.safetensors", gpus=2), dict(window=5)),
    "LoRA": (dict(weights="clear_local_16_down_4.safetensors", lora=1.0), dict(lora=0.5)),
    "fp8": (dict(weights="clear_local_8_down_4.safetensors", loader="fp8_e4m3fn"), dict(loader="default")),
    "GGUF": (dict(weights="clear_local_8_down_4.safetensors", loader="gguf"), dict(window=5)),
}


@pytest.mark.parametrize("case", CASES)
def test_queued_from_the_ui(ui, ran, request, case):
    """Queued, re-queued with one setting changed, re-queued unchanged, on one executor."""
    if case == "GGUF":
        request.getfixturevalue("gguf_loader")
    settings, change = CASES[case]
    first, second = graph(**settings), graph(**{**settings, **change})
    executor = prompt_executor()

    got, cached = queue(executor, first)
    assert cached == set() and got.is_inference()  # the regime at issue: every tensor made under inference_mode
    assert ("chunked" in ran, "split" in ran) == ("chunk" in settings, "gpus" in settings)  # the node really ran
    assert _rel(got, run_directly(first)) < 1e-6

    changed, cached = queue(executor, second)
    assert cached == unchanged(first, second) and "8" not in cached
    assert _rel(changed, run_directly(second)) < 1e-6
    assert _rel(changed, got) > 1e-4  # the setting matters: a stale result would be caught

    again, cached = queue(executor, second)
    assert again is None and cached == set(second)  # nothing ran: all from ComfyUI's cache
