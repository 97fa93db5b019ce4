"""Writes the bundled workflow JSONs (UI format, as ComfyUI saves them).

The graphs are code so that the five workflows stay consistent; the test
suite checks that the committed JSONs are what this script writes.
Run: python workflows/build.py   (then python workflows/thumbnails.py)

ComfyUI lists custom-node templates by file name only (no titles or
descriptions: both frontends show the name as the card's title), so the
file names are the titles.

Layout: every node gets the size the ComfyUI frontend renders it at (the
frontend grows a node to its computeSize(), so sizes below are at least that,
measured in frontends 1.27.10 and 1.49.6; tests/test_browser.py checks it) and
is placed in a column of its stage's group; groups sit left to right. No
saved view: the frontend then fits the graph to the window on load, which at
1920x1080 stays above the zoom where it stops drawing text.
"""

import json
import os
import re
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

FLUX_FILES = {
    "unet": ("flux1-dev.safetensors", "diffusion_models",
             "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"),
    "clip_l": ("clip_l.safetensors", "text_encoders",
               "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "t5": ("t5xxl_fp16.safetensors", "text_encoders",
           "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "vae": ("ae.safetensors", "vae",
            "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"),
}
CLEAR_URL = "https://huggingface.co/Huage001/CLEAR/resolve/main/{}"
LORA_FILE = "my_flux_lora.safetensors"
CONTROLNET_FILE = "FLUX.1-dev-ControlNet-Union-Pro.safetensors"
# The repo publishes it as diffusion_pytorch_model.safetensors; the dialog saves it under our name.
CONTROLNET_URL = ("https://huggingface.co/Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro/resolve/main/"
                  "diffusion_pytorch_model.safetensors")
PROMPT = ("A sweeping alpine valley at golden hour, a wooden village with smoking chimneys along a winding river, "
          "pine forests, snow-capped peaks, crisp air, ultra detailed, sharp focus, photograph")
SEED = 42
LN3 = 1.0986  # ModelSamplingFlux with max_shift = base_shift = ln 3: a fixed flow shift of 3

# Rendered body size (w, h) per node type, >= the frontend's computeSize() in
# 1.27.10 and 1.49.6 (the title bar, TITLE_H, sits above a node's pos).
SIZES = {
    "UNETLoader": (320, 82), "DualCLIPLoader": (320, 130), "VAELoader": (320, 58),
    "LoraLoaderModelOnly": (320, 82), "ControlNetLoader": (320, 58), "SetUnionControlNetType": (300, 58),
    "ControlNetApplyAdvanced": (300, 186), "CLIPTextEncode": (300, 130), "FluxGuidance": (300, 58),
    "ConditioningZeroOut": (300, 26), "EmptySD3LatentImage": (300, 106), "KSampler": (300, 262),
    "VAEDecode": (300, 46), "ImageScale": (300, 130), "VAEEncodeTiled": (300, 150),
    "ModelSamplingFlux": (300, 130), "CLEARAttentionPatch": (300, 154), "VAEDecodeTiled": (300, 150),
    "SaveImage": (300, 300), "PreviewImage": (300, 300),
    "CLEARTeacherData": (400, 420), "CLEARDistill": (340, 490),
}
DEFAULT_SIZE = (300, 58)  # one input and one widget, e.g. a model -> model node with one setting
TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT
GAP = 20  # between nodes in a column, and between columns
GROUP_HEADER, GROUP_PAD, GROUP_GAP = 44, 12, 24
NOTE_W = 420  # MarkdownNote: renders markdown at 10 px in a 400 px wide box at this width

# LiteGraph's own group colours (light enough for the group titles to read)
COLORS = {"models": "#88A", "prompt": "#b58b2a", "base": "#8A8", "upscale": "#a1309b", "clear": "#3f789e",
          "decode": "#A88", "controlnet": "#b06634"}
DISTILL_OUTPUT = "clear_local_16_mymodel"  # CLEAR Distill's output_name: models/clear/<this>.safetensors


def note_height(text):
    """The MarkdownNote height that fits `text` with little room to spare:
    wrapped lines and paragraphs, with the line and paragraph heights fitted
    to what frontend 1.49.6 renders (1.27.10 needs ~35 px less);
    tests/test_browser.py checks the fit. One paragraph per source line: the
    frontend's markdown editor drops the space at a line break after `code` or
    **bold**, so the notes never hard-wrap."""
    lines = paragraphs = 0
    for line in text.strip().split("\n"):
        plain = re.sub(r"[*`]", "", line)
        if not plain.strip() or plain.startswith("## "):
            continue
        item = re.match(r"^(- |\d+\. )", plain)
        paragraphs += not item
        lines += len(textwrap.wrap(plain, 66 if item else 74))
    return round(9.1 * lines + 20.6 * paragraphs + 37 + 36)


class Graph:
    """A UI-format graph: nodes with widget values, typed links between slots,
    and groups (one per stage) that hold columns of nodes."""

    def __init__(self):
        self.nodes, self.links, self.groups = [], [], []

    def add(self, type_, widgets=(), inputs=(), outputs=(), title=None, models=None):
        """inputs: (name, type, (node, slot) or None); outputs: (name, type)."""
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": [0, 0], "size": list(SIZES.get(type_, DEFAULT_SIZE)),
                "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        if models:
            node["properties"]["models"] = [{"name": n, "url": u, "directory": d} for n, d, u in models]
        for name, type_in, source in inputs:
            link = None
            if source is not None:
                link = len(self.links) + 1
                src, slot = source
                self.links.append([link, src["id"], slot, node["id"], len(node["inputs"]), type_in])
                src["outputs"][slot]["links"].append(link)
            node["inputs"].append({"name": name, "type": type_in, "link": link})
        for slot, (name, type_out) in enumerate(outputs):
            node["outputs"].append({"name": name, "type": type_out, "links": [], "slot_index": slot})
        self.nodes.append(node)
        return node

    def model_node(self, type_, widgets, model, title=None):
        """A MODEL -> MODEL node (a patch) fed by `model`."""
        return self.add(type_, widgets, inputs=[("model", "MODEL", (model, 0))], outputs=[("MODEL", "MODEL")],
                        title=title)

    def note(self, text):
        node = self.add("MarkdownNote", [text.strip() + "\n"], title="Read me")
        node["size"] = [NOTE_W, note_height(text)]
        return node

    def layout(self, stages):
        """stages: left to right, each (title, color key, [column of nodes, ...])
        or a list of such stages stacked top to bottom in one column."""
        x = 0
        for slot in stages:
            stack = slot if isinstance(slot, list) else [slot]
            y, width = 0, 0
            for title, color, columns in stack:
                w, h = self._group(title, color, columns, x, y)
                y += h + GROUP_GAP
                width = max(width, w)
            x += width + GROUP_GAP

    def _group(self, title, color, columns, x0, y0):
        """Places columns of nodes left to right in a group (no group drawn when title is None)."""
        x, bottom = x0 + GROUP_PAD, y0
        for column in columns:
            y = y0 + GROUP_HEADER + TITLE_H
            for node in column:
                node["pos"] = [x, y]
                y += node["size"][1] + TITLE_H + GAP
            x += max(n["size"][0] for n in column) + GAP
            bottom = max(bottom, y - TITLE_H - GAP)
        w, h = x - GAP + GROUP_PAD - x0, bottom + GROUP_PAD - y0
        if title is not None:
            self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, w, h],
                                "color": COLORS[color], "font_size": 24, "flags": {}})
        return w, h

    def to_json(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {}, "extra": {}, "version": 0.4}


def _loaders(g):
    unet = g.add("UNETLoader", [FLUX_FILES["unet"][0], "default"], outputs=[("MODEL", "MODEL")],
                 title="FLUX → models/diffusion_models", models=[FLUX_FILES["unet"]])
    clip = g.add("DualCLIPLoader", [FLUX_FILES["clip_l"][0], FLUX_FILES["t5"][0], "flux", "default"],
                 outputs=[("CLIP", "CLIP")], title="CLIP → models/text_encoders",
                 models=[FLUX_FILES["clip_l"], FLUX_FILES["t5"]])
    vae = g.add("VAELoader", [FLUX_FILES["vae"][0]], outputs=[("VAE", "VAE")], title="VAE → models/vae",
                models=[FLUX_FILES["vae"]])
    return unet, clip, vae


def _prompt(g, clip, guidance):
    text = g.add("CLIPTextEncode", [PROMPT], inputs=[("clip", "CLIP", (clip, 0))],
                 outputs=[("CONDITIONING", "CONDITIONING")], title="Prompt")
    positive = g.add("FluxGuidance", [guidance], inputs=[("conditioning", "CONDITIONING", (text, 0))],
                     outputs=[("CONDITIONING", "CONDITIONING")])
    negative = g.add("ConditioningZeroOut", [], inputs=[("conditioning", "CONDITIONING", (text, 0))],
                     outputs=[("CONDITIONING", "CONDITIONING")], title="Negative: none (FLUX)")
    return text, positive, negative


def _clear(g, model, weights, proportional, ntk):
    return g.add("CLEARAttentionPatch", [weights, 0, 0, proportional, ntk], inputs=[("model", "MODEL", (model, 0))],
                 outputs=[("MODEL", "MODEL")], models=[(weights, "clear", CLEAR_URL.format(weights))])


def _ksampler(g, model, positive, negative, latent, steps, denoise, title=None):
    return g.add("KSampler", [SEED, "fixed", steps, 1.0, "euler", "simple", denoise],
                 inputs=[("model", "MODEL", (model, 0)), ("positive", "CONDITIONING", positive),
                         ("negative", "CONDITIONING", negative), ("latent_image", "LATENT", (latent, 0))],
                 outputs=[("LATENT", "LATENT")], title=title)


MODELS_NOTE = """**Files** (ComfyUI offers a download for each missing one):
- `models/diffusion_models/` flux1-dev.safetensors
- `models/text_encoders/` clip_l.safetensors, t5xxl_fp16.safetensors (t5xxl_fp8_e4m3fn works too)
- `models/vae/` ae.safetensors
- `models/clear/` {clear}: downloads from huggingface.co/Huage001/CLEAR on the first run; offline, put it there yourself"""


def clear_flux_1k(weights):
    g = Graph()
    unet, clip, vae = _loaders(g)
    patched = _clear(g, unet, weights, False, 1.0)
    text, positive, negative = _prompt(g, clip, 3.5)
    latent = g.add("EmptySD3LatentImage", [1024, 1024, 1], outputs=[("LATENT", "LATENT")])
    sampled = _ksampler(g, patched, (positive, 0), (negative, 0), latent, 20, 1.0)
    image = g.add("VAEDecode", [], inputs=[("samples", "LATENT", (sampled, 0)), ("vae", "VAE", (vae, 0))],
                  outputs=[("IMAGE", "IMAGE")])
    save = g.add("SaveImage", ["CLEAR_1k"], inputs=[("images", "IMAGE", (image, 0))])
    note = g.note(f"""## CLEAR text to image, 1024 x 1024

The simplest use of **CLEAR Attention Patch**: FLUX.1-dev's attention becomes CLEAR local attention (each image token sees the image tokens within 16 tokens = 256 px, plus all text tokens) with the distilled `{weights}` weights.

At 1K CLEAR is about as fast as full attention: this workflow checks the setup. For speed use the 4K and 8K workflows.

{MODELS_NOTE.format(clear=weights)}

**Tune**: `weights` (clear_local_8 is faster and more local, clear_local_32 closer to full attention), steps, guidance (FluxGuidance 3.5).
""")
    g.layout([(None, None, [[note]]),
              [("Models", "models", [[unet, clip, vae]]), ("Prompt", "prompt", [[text, positive, negative]])],
              ("Text to image at 1024² with CLEAR", "clear", [[patched, latent], [sampled]]),
              ("Decode and save", "decode", [[image, save]])])
    return g


def clear_flux_hires(target, clear_file, lora=False, controlnet=False, after_clear=()):
    """The reference high-resolution recipe: base image with the unpatched
    model, upscale, then SDEdit at the target size with the CLEAR model.
    after_clear: (node type, widget values) of MODEL -> MODEL nodes to put
    between the CLEAR patch and the high-resolution sampler, in order."""
    g = Graph()
    unet, clip, vae = _loaders(g)
    model = unet
    loaders = [unet, clip, vae]
    if lora:
        model = g.add("LoraLoaderModelOnly", [LORA_FILE, 1.0], inputs=[("model", "MODEL", (unet, 0))],
                      outputs=[("MODEL", "MODEL")], title="Your LoRA → models/loras")
        loaders.insert(1, model)
    text, base_positive, negative = _prompt(g, clip, 3.5)

    # 1. base image at 1024 x 1024 with the model as it is
    base_latent = g.add("EmptySD3LatentImage", [1024, 1024, 1], outputs=[("LATENT", "LATENT")])
    base = _ksampler(g, model, (base_positive, 0), (negative, 0), base_latent, 20, 1.0)
    base_image = g.add("VAEDecode", [], inputs=[("samples", "LATENT", (base, 0)), ("vae", "VAE", (vae, 0))],
                       outputs=[("IMAGE", "IMAGE")])

    # 2. upscale to the target and encode it (tiled: the VAE would not fit at 4K-8K otherwise)
    upscaled = g.add("ImageScale", ["lanczos", target, target, "disabled"],
                     inputs=[("image", "IMAGE", (base_image, 0))], outputs=[("IMAGE", "IMAGE")])
    hires_latent = g.add("VAEEncodeTiled", [1024, 64, 64, 8],
                         inputs=[("pixels", "IMAGE", (upscaled, 0)), ("vae", "VAE", (vae, 0))],
                         outputs=[("LATENT", "LATENT")])

    # 3. SDEdit at the target size with CLEAR: fixed shift 3, guidance 7.5, NTK 10, proportional attention
    shifted = g.add("ModelSamplingFlux", [LN3, LN3, target, target], inputs=[("model", "MODEL", (model, 0))],
                    outputs=[("MODEL", "MODEL")], title="Fixed shift 3 (max = base = ln 3)")
    patched = _clear(g, shifted, clear_file, True, 10.0)
    clear_column = [shifted, patched]
    for type_, widgets in after_clear:
        patched = g.model_node(type_, widgets, patched)
        clear_column.append(patched)
    hires_positive = g.add("FluxGuidance", [7.5], inputs=[("conditioning", "CONDITIONING", (text, 0))],
                           outputs=[("CONDITIONING", "CONDITIONING")])
    clear_column.append(hires_positive)
    positive, negative_out = (hires_positive, 0), (negative, 0)
    controlnet_nodes = []
    if controlnet:
        cn = g.add("ControlNetLoader", [CONTROLNET_FILE], outputs=[("CONTROL_NET", "CONTROL_NET")],
                   title="ControlNet → models/controlnet", models=[(CONTROLNET_FILE, "controlnet", CONTROLNET_URL)])
        mode = g.add("SetUnionControlNetType", ["tile"], inputs=[("control_net", "CONTROL_NET", (cn, 0))],
                     outputs=[("CONTROL_NET", "CONTROL_NET")])
        applied = g.add("ControlNetApplyAdvanced", [0.6, 0.0, 0.6],
                        inputs=[("positive", "CONDITIONING", (hires_positive, 0)),
                                ("negative", "CONDITIONING", (negative, 0)),
                                ("control_net", "CONTROL_NET", (mode, 0)), ("image", "IMAGE", (upscaled, 0)),
                                ("vae", "VAE", (vae, 0))],
                        outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")])
        positive, negative_out = (applied, 0), (applied, 1)
        controlnet_nodes = [cn, mode, applied]
    hires = _ksampler(g, patched, positive, negative_out, hires_latent, 20, 0.7,
                      title=f"SDEdit {target}², denoise 0.7")
    image = g.add("VAEDecodeTiled", [1024, 64, 64, 8],
                  inputs=[("samples", "LATENT", (hires, 0)), ("vae", "VAE", (vae, 0))],
                  outputs=[("IMAGE", "IMAGE")])
    save = g.add("SaveImage", [f"CLEAR_{target // 1024}k"], inputs=[("images", "IMAGE", (image, 0))])

    size = f"{target // 1024}K"
    r = int(clear_file.split("_")[2].split(".")[0])
    extra = ""
    if lora:
        extra += f"""
**LoRA**: `{LORA_FILE}` is a placeholder: put your FLUX LoRA in `models/loras/` and pick it in the LoRA node (it has no download link, so the Missing Models dialog does not list it). Both passes use it. CLEAR replaces base weights and the LoRA adds on top, so LoRA before or after CLEAR gives the same model.
"""
    if controlnet:
        extra += f"""
**ControlNet**: Shakker-Labs FLUX.1-dev ControlNet Union Pro in mode *tile*, fed the upscaled base image, guides the high-resolution pass (strength 0.6, first 60% of the steps). Its own attention stays full: its weights were not distilled for CLEAR. Its repo names the file diffusion_pytorch_model.safetensors: save it as `models/controlnet/{CONTROLNET_FILE}`.
"""
    if any(type_ == "CLEARTokenChunking" for type_, _ in after_clear):
        extra += """
**Memory**: *FLUX Token Chunking* runs everything but attention over token chunks (same result), so this pass fits a 24 GB GPU (RTX 3090/4090) with fp8 or GGUF weights: modelled peak 13.8 GB instead of 26.7 GB (fp8 weights streamed; not yet measured on a GPU). chunk_tokens 0 sizes the chunks from free memory.
"""
    if any(type_ == "CLEARMultiGPUSplit" for type_, _ in after_clear):
        extra += """
**Multi-GPU**: *CLEAR Multi-GPU Split* runs each step of this pass across `gpus` GPUs (default 2), each computing a band of image rows: the same image as one GPU. Needs ComfyUI 0.23 or newer (its multi-GPU support), the full model on every GPU (core loaders), identical GPUs. Speed-up not yet measured on GPUs (modelled close to 2x on two GPUs). Set gpus to 1 to run on one GPU.
"""
    note = g.note(f"""## CLEAR {size}: {target} x {target} from a 1K base

The CLEAR paper's high-resolution recipe:
1. **Base** 1024 x 1024 with FLUX.1-dev as it is (20 steps, guidance 3.5).
2. **Upscale** to {target} x {target} (lanczos) and encode (tiled VAE).
3. **SDEdit at {size}** with the CLEAR model: denoise **0.7** of 20 steps (14 run), guidance **7.5**, `{clear_file}` (radius {r} tokens = {16 * r} px), proportional attention, RoPE NTK factor **10**, fixed time shift **3** (ModelSamplingFlux with max = base shift = ln 3: what the reference code runs; the usual resolution-dependent shift is far too strong at {size}).
4. **Decode** (tiled VAE) and save.

r = {r} is the paper's setting at 4K-8K: the layout comes from the base image, the pass refines detail with local context (attention FLOPs -99.5% at 8K).
{extra}
{MODELS_NOTE.format(clear=clear_file)}

**Tune**: denoise 0.6-0.8 (lower keeps the base image, higher adds detail), the prompt, `weights` (clear_local_8 faster, clear_local_32 closer to full attention). Sizes: multiples of 16.
""")
    upscale_stack = [(f"2. Upscale to {target}²", "upscale", [[upscaled, hires_latent]])]
    if controlnet:
        upscale_stack.append(("ControlNet tile", "controlnet", [controlnet_nodes]))
    g.layout([(None, None, [[note]]),
              [("Models", "models", [loaders]), ("Prompt", "prompt", [[text, base_positive, negative]])],
              ("1. Base 1024² (full attention)", "base", [[base_latent, base, base_image]]),
              upscale_stack,
              (f"3. {size} pass with CLEAR", "clear", [clear_column + [hires]]),
              ("4. Decode and save", "decode", [[image, save]])])
    return g


def clear_flux_distill():
    """Distil CLEAR weights for the user's own model: teacher data, then CLEAR
    Distill (LoRA r64 over an fp8 base: the 24 GB setting), previews shown."""
    g = Graph()
    unet = g.add("UNETLoader", [FLUX_FILES["unet"][0], "fp8_e4m3fn"], outputs=[("MODEL", "MODEL")],
                 title="Your FLUX → models/diffusion_models", models=[FLUX_FILES["unet"]])
    clip = g.add("DualCLIPLoader", [FLUX_FILES["clip_l"][0], FLUX_FILES["t5"][0], "flux", "default"],
                 outputs=[("CLIP", "CLIP")], title="CLIP → models/text_encoders",
                 models=[FLUX_FILES["clip_l"], FLUX_FILES["t5"]])
    vae = g.add("VAELoader", [FLUX_FILES["vae"][0]], outputs=[("VAE", "VAE")], title="VAE → models/vae (previews)",
                models=[FLUX_FILES["vae"]])
    # dataset_name, count, width, height, steps, guidance, seed (+ its control), prompts (empty: the shipped list)
    data = g.add("CLEARTeacherData", ["flux_teacher", 1000, 1024, 1024, 20, 3.5, 0, "fixed", ""],
                 inputs=[("model", "MODEL", (unet, 0)), ("clip", "CLIP", (clip, 0))],
                 outputs=[("dataset", "CLEAR_DATASET")])
    # output_name, window_size, down_factor, mode, rank, steps, batch_size, grad_accum, optimizer, learning_rate,
    # loss_fm, loss_distill, loss_attn, checkpoint_every, preview_every, seed (+ its control): the node's defaults
    distill = g.add("CLEARDistill", [DISTILL_OUTPUT, 16, 1, "lora", 64, 2000, 1, 1, "prodigy", 1.0, 1.0, 0.5, 0.5,
                                     250, 250, 0, "fixed"],
                    inputs=[("model", "MODEL", (unet, 0)), ("dataset", "CLEAR_DATASET", (data, 0)),
                            ("vae", "VAE", (vae, 0))],
                    outputs=[("weights", "STRING"), ("previews", "IMAGE")])
    previews = g.add("PreviewImage", [], inputs=[("images", "IMAGE", (distill, 1))],
                     title="Student | teacher | training-free")
    note = g.note(f"""## Distil CLEAR weights for your own FLUX model

Trains CLEAR attention weights for the model you load (a FLUX.1 fine-tune, FLUX.1-dev or schnell, FLUX.2 Klein or [dev]), the way the CLEAR authors distilled the published files for FLUX.1-dev. Queue it and leave it running overnight.

1. **Teacher data**: your model, as it is, generates `count` images over the shipped prompt list (or yours, one per line, in `prompts`) and saves their latents and text conditioning to `output/clear_teacher/flux_teacher`. Each sample costs one ordinary image generation (20 steps at 1024²; set `steps` to 4 for schnell or Klein).
2. **CLEAR Distill**: teaches CLEAR (radius 16 tokens = 256 px) to reproduce your model, as a rank-64 LoRA of the attention weights over the fp8 base; a preview (student, teacher, training-free CLEAR) every 250 steps. The result lands in `models/clear/{DISTILL_OUTPUT}.safetensors`: pick it in the CLEAR Attention Patch's `weights` (press R to refresh the list) in the 4K and 8K workflows.

**Time** (modelled, not yet measured on a GPU): on one RTX 4090, 1000 FLUX.1-dev samples take about as long as 1000 images (~8 h at ~30 s each); 2000 training steps a few hours more. Klein 4B: about a third. Both steps resume where they stopped: queue again with the same settings.

**Memory**: LoRA r64 on an fp8 base fits a 24 GB GPU for FLUX.1 (modelled ~19 GB); Klein 4B can also train `mode` full. CLEAR Distill checks free memory first and names the setting to lower.

**Files** (ComfyUI offers a download for each missing one):
- `models/diffusion_models/` your FLUX model (flux1-dev.safetensors here; weight_dtype fp8_e4m3fn)
- `models/text_encoders/` clip_l.safetensors, t5xxl_fp16.safetensors (FLUX.2: its own text encoder, loaded with its loader)
- `models/vae/` ae.safetensors, for the previews (optional)

**Tune**: `count` (the authors used 10K; 2K-8K is a good overnight run), `window_size` (the radius you will generate with), `rank`, `steps`. docs/distill.md has the details.
""")
    g.layout([(None, None, [[note]]),
              ("Models", "models", [[unet, clip, vae]]),
              ("1. Teacher data from your model", "base", [[data]]),
              ("2. Distil CLEAR", "clear", [[distill], [previews]])])
    return g


# File name (the template's title in ComfyUI) -> what it does, in reading order: the
# Templates dialog shows them in this order (nodes/templates.py ORDER, checked by the tests).
# target None: text to image at 1024; else the hires fix to target x target.
# after_clear: MODEL -> MODEL nodes (type, widget values) between the CLEAR patch and the hires sampler.
SPECS = {
    "CLEAR FLUX 1K text to image": dict(target=None, weights="clear_local_16.safetensors"),
    "CLEAR FLUX 4K hires": dict(target=4096, weights="clear_local_16.safetensors"),
    "CLEAR FLUX 4K hires + LoRA": dict(target=4096, weights="clear_local_16.safetensors", lora=True),
    "CLEAR FLUX 4K hires + ControlNet": dict(target=4096, weights="clear_local_16.safetensors", controlnet=True),
    "CLEAR FLUX 8K hires": dict(target=8192, weights="clear_local_16.safetensors",
                                after_clear=[("CLEARTokenChunking", [0])]),
    "CLEAR FLUX 8K hires + 2 GPUs": dict(target=8192, weights="clear_local_16.safetensors",
                                         after_clear=[("CLEARTokenChunking", [0]), ("CLEARMultiGPUSplit", [2])]),
    "CLEAR FLUX distill": dict(target=None, weights=None, distill=True),
}


def build(name):
    spec = dict(SPECS[name])
    target, weights = spec.pop("target"), spec.pop("weights")
    if spec.pop("distill", False):
        return clear_flux_distill()
    return clear_flux_1k(weights) if target is None else clear_flux_hires(target, weights, **spec)


WORKFLOWS = [name + ".json" for name in SPECS]


def render(name):
    return json.dumps(build(name[:-5]).to_json(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    for name in WORKFLOWS:
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            f.write(render(name))
        print("wrote", name)
