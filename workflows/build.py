"""Writes the bundled workflow JSONs (UI format, as ComfyUI saves them).

The graphs are code so that the five workflows stay consistent; the test
suite checks that the committed JSONs are what this script writes.
Run: python workflows/build.py
"""

import json
import os

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
LORA_FILE = "my_flux_lora.safetensors"
CONTROLNET_FILE = "FLUX.1-dev-ControlNet-Union-Pro.safetensors"
PROMPT = ("A sweeping alpine valley at golden hour, a wooden village with smoking chimneys along a winding river, "
          "pine forests, snow-capped peaks, crisp air, ultra detailed, sharp focus, photograph")
SEED = 42
LN3 = 1.0986  # ModelSamplingFlux with max_shift = base_shift = ln 3: a fixed flow shift of 3

MODEL_LIST = """```
ComfyUI/models/
├── diffusion_models/flux1-dev.safetensors
├── text_encoders/clip_l.safetensors
├── text_encoders/t5xxl_fp16.safetensors   (or t5xxl_fp8_e4m3fn.safetensors)
├── vae/ae.safetensors
└── clear/                                 (filled on first run: the CLEAR weights download from
                                            huggingface.co/Huage001/CLEAR; offline, put them here)
```"""


class Graph:
    """A UI-format graph: nodes with widget values, typed links between slots."""

    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, widgets=(), inputs=(), outputs=(), pos=(0, 0), size=(320, 120), title=None, models=None):
        """inputs: (name, type, (node, slot) or None); outputs: (name, type)."""
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
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

    def note(self, text, pos, size=(520, 700)):
        return self.add("MarkdownNote", [text], pos=pos, size=size, title="Read me")

    def to_json(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}},
                "version": 0.4}


def _loaders(g, x=0):
    unet = g.add("UNETLoader", [FLUX_FILES["unet"][0], "default"], outputs=[("MODEL", "MODEL")], pos=(x, 0),
                 models=[FLUX_FILES["unet"]])
    clip = g.add("DualCLIPLoader", [FLUX_FILES["clip_l"][0], FLUX_FILES["t5"][0], "flux", "default"],
                 outputs=[("CLIP", "CLIP")], pos=(x, 180), models=[FLUX_FILES["clip_l"], FLUX_FILES["t5"]])
    vae = g.add("VAELoader", [FLUX_FILES["vae"][0]], outputs=[("VAE", "VAE")], pos=(x, 360), models=[FLUX_FILES["vae"]])
    return unet, clip, vae


def _text(g, clip, guidance, x, y):
    text = g.add("CLIPTextEncode", [PROMPT], inputs=[("clip", "CLIP", (clip, 0))],
                 outputs=[("CONDITIONING", "CONDITIONING")], pos=(x, y), size=(400, 200))
    positive = g.add("FluxGuidance", [guidance], inputs=[("conditioning", "CONDITIONING", (text, 0))],
                     outputs=[("CONDITIONING", "CONDITIONING")], pos=(x + 440, y))
    negative = g.add("ConditioningZeroOut", [], inputs=[("conditioning", "CONDITIONING", (text, 0))],
                     outputs=[("CONDITIONING", "CONDITIONING")], pos=(x + 440, y + 160))
    return text, positive, negative


def _clear(g, model, weights, proportional, ntk, x, y):
    return g.add("CLEARAttentionPatch", [weights, 0, 0, proportional, ntk], inputs=[("model", "MODEL", (model, 0))],
                 outputs=[("MODEL", "MODEL")], pos=(x, y), size=(340, 200))


def _ksampler(g, model, positive, negative, latent, steps, denoise, x, y, title=None):
    return g.add("KSampler", [SEED, "fixed", steps, 1.0, "euler", "simple", denoise],
                 inputs=[("model", "MODEL", (model, 0)), ("positive", "CONDITIONING", (positive, 0)),
                         ("negative", "CONDITIONING", (negative, 0)), ("latent_image", "LATENT", (latent, 0))],
                 outputs=[("LATENT", "LATENT")], pos=(x, y), size=(320, 270), title=title)


def clear_flux_1k():
    g = Graph()
    unet, clip, vae = _loaders(g)
    patched = _clear(g, unet, "clear_local_16.safetensors", False, 1.0, 400, 0)
    _, positive, negative = _text(g, clip, 3.5, 400, 260)
    latent = g.add("EmptySD3LatentImage", [1024, 1024, 1], outputs=[("LATENT", "LATENT")], pos=(840, 480))
    sampled = _ksampler(g, patched, positive, negative, latent, 20, 1.0, 1300, 0)
    image = g.add("VAEDecode", [], inputs=[("samples", "LATENT", (sampled, 0)), ("vae", "VAE", (vae, 0))],
                  outputs=[("IMAGE", "IMAGE")], pos=(1660, 0))
    g.add("SaveImage", ["CLEAR_1k"], inputs=[("images", "IMAGE", (image, 0))], pos=(1900, 0), size=(400, 440))
    g.note(f"""# CLEAR, text to image at 1024 x 1024

The simplest use of **CLEAR Attention Patch**: FLUX.1-dev's attention is
replaced by CLEAR local attention (each image token sees the tokens within
16 tokens = 256 px, plus all text tokens) with the distilled
`clear_local_16` weights. At 1K CLEAR is about as fast as full attention; it is
here to check the setup. Use the 4K / 8K workflows for speed.

**Models**
{MODEL_LIST}

**Tune**: `weights` (clear_local_8 is faster and more local, clear_local_32
closer to full attention), steps, guidance (FluxGuidance 3.5).
""", pos=(-600, 0))
    return g


def clear_flux_hires(target, clear_file, lora=False, controlnet=False):
    """The reference high-resolution recipe: base image with the unpatched
    model, upscale, then SDEdit at the target size with the CLEAR model."""
    g = Graph()
    unet, clip, vae = _loaders(g)
    model = unet
    if lora:
        model = g.add("LoraLoaderModelOnly", [LORA_FILE, 1.0], inputs=[("model", "MODEL", (unet, 0))],
                      outputs=[("MODEL", "MODEL")], pos=(400, -200))
    text, base_positive, negative = _text(g, clip, 3.5, 400, 260)

    # 1. base image at 1024 x 1024 with the model as it is
    base_latent = g.add("EmptySD3LatentImage", [1024, 1024, 1], outputs=[("LATENT", "LATENT")], pos=(840, 480))
    base = _ksampler(g, model, base_positive, negative, base_latent, 20, 1.0, 1300, 0, title="Base 1024 (full attention)")
    base_image = g.add("VAEDecode", [], inputs=[("samples", "LATENT", (base, 0)), ("vae", "VAE", (vae, 0))],
                       outputs=[("IMAGE", "IMAGE")], pos=(1660, 0))

    # 2. upscale to the target and encode it (tiled: the VAE would not fit at 4K-8K otherwise)
    upscaled = g.add("ImageScale", ["lanczos", target, target, "disabled"],
                     inputs=[("image", "IMAGE", (base_image, 0))], outputs=[("IMAGE", "IMAGE")], pos=(1900, 0))
    hires_latent = g.add("VAEEncodeTiled", [1024, 64, 64, 8],
                         inputs=[("pixels", "IMAGE", (upscaled, 0)), ("vae", "VAE", (vae, 0))],
                         outputs=[("LATENT", "LATENT")], pos=(2240, 0))

    # 3. SDEdit at the target size with CLEAR: fixed shift 3, guidance 7.5, NTK 10, proportional attention
    shifted = g.add("ModelSamplingFlux", [LN3, LN3, target, target], inputs=[("model", "MODEL", (model, 0))],
                    outputs=[("MODEL", "MODEL")], pos=(1300, 400), title="Fixed shift 3 (max = base = ln 3)")
    patched = _clear(g, shifted, clear_file, True, 10.0, 1300, 600)
    hires_positive = g.add("FluxGuidance", [7.5], inputs=[("conditioning", "CONDITIONING", (text, 0))],
                           outputs=[("CONDITIONING", "CONDITIONING")], pos=(1660, 400))
    positive, negative_out = (hires_positive, 0), (negative, 0)
    if controlnet:
        cn = g.add("ControlNetLoader", [CONTROLNET_FILE], outputs=[("CONTROL_NET", "CONTROL_NET")], pos=(1660, 600),
                   models=[(CONTROLNET_FILE, "controlnet",
                            "https://huggingface.co/Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro")])
        cn = g.add("SetUnionControlNetType", ["tile"], inputs=[("control_net", "CONTROL_NET", (cn, 0))],
                   outputs=[("CONTROL_NET", "CONTROL_NET")], pos=(1660, 760))
        applied = g.add("ControlNetApplyAdvanced", [0.6, 0.0, 0.6],
                        inputs=[("positive", "CONDITIONING", (hires_positive, 0)),
                                ("negative", "CONDITIONING", (negative, 0)),
                                ("control_net", "CONTROL_NET", (cn, 0)), ("image", "IMAGE", (upscaled, 0)),
                                ("vae", "VAE", (vae, 0))],
                        outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")], pos=(2000, 600))
        positive, negative_out = (applied, 0), (applied, 1)
    hires = g.add("KSampler", [SEED, "fixed", 20, 1.0, "euler", "simple", 0.7],
                  inputs=[("model", "MODEL", (patched, 0)), ("positive", "CONDITIONING", positive),
                          ("negative", "CONDITIONING", negative_out),
                          ("latent_image", "LATENT", (hires_latent, 0))],
                  outputs=[("LATENT", "LATENT")], pos=(2580, 0), size=(320, 270),
                  title=f"SDEdit {target} with CLEAR (denoise 0.7)")
    image = g.add("VAEDecodeTiled", [1024, 64, 64, 8],
                  inputs=[("samples", "LATENT", (hires, 0)), ("vae", "VAE", (vae, 0))],
                  outputs=[("IMAGE", "IMAGE")], pos=(2940, 0))
    g.add("SaveImage", [f"CLEAR_{target // 1024}k"], inputs=[("images", "IMAGE", (image, 0))], pos=(3280, 0),
          size=(400, 440))

    size = f"{target // 1024}K"
    r = int(clear_file.split("_")[2].split(".")[0])
    extra = ""
    if lora:
        extra += f"""
**LoRA**: `models/loras/{LORA_FILE}` (rename to yours) through LoraLoaderModelOnly,
used by both passes. The CLEAR weights are a base-weight patch and the LoRA a
delta on top, so *LoRA -> CLEAR* and *CLEAR -> LoRA* give the same model.
"""
    if controlnet:
        extra += f"""
**ControlNet**: `models/controlnet/{CONTROLNET_FILE}` (Shakker-Labs FLUX.1-dev
ControlNet Union Pro, mode *tile*), fed the upscaled base image, guides the
high-resolution pass (strength 0.6, first 60% of the steps). The ControlNet's
own attention stays full attention: its weights were not distilled for CLEAR.
"""
    g.note(f"""# CLEAR, {size} ({target} x {target}) from a 1K base

The high-resolution recipe of the CLEAR paper, as a ComfyUI graph:

1. **Base**: 1024 x 1024 with FLUX.1-dev as it is (20 steps, guidance 3.5).
2. **Upscale** to {target} x {target} (lanczos), **tiled VAE encode**.
3. **SDEdit at {size}** with the patched model: denoise **0.7** of 20 steps
   (14 steps run), FLUX guidance **7.5**, CLEAR `{clear_file}`
   (radius {r} tokens = {16 * r} px), **proportional attention** on,
   **RoPE NTK factor 10**, and a **fixed time shift of 3**
   (ModelSamplingFlux with max_shift = base_shift = ln 3 = 1.0986: the static
   shift of FLUX.1-dev's scheduler config, which is what the reference code
   actually runs; the usual resolution-dependent shift is far too strong at
   {size}), then a **tiled VAE decode**.

Why r = {r}: the attention cost per token grows with r^2 while the image-level
structure already comes from the base image; r = 16 is the setting the paper
reports at 4K-8K (attention FLOPs cut by 99.5% at 8K). clear_local_8 is faster
again, clear_local_32 closer to full attention.
{extra}
**Models**
{MODEL_LIST}

**Tune**: denoise (0.6-0.8: lower keeps the base image, higher adds detail),
the prompt, `weights`. Sizes must be multiples of 16.
""", pos=(-600, 0))
    return g


WORKFLOWS = {
    "clear_flux_1k.json": clear_flux_1k,
    "clear_flux_4k.json": lambda: clear_flux_hires(4096, "clear_local_16.safetensors"),
    "clear_flux_8k.json": lambda: clear_flux_hires(8192, "clear_local_16.safetensors"),
    "clear_flux_4k_lora.json": lambda: clear_flux_hires(4096, "clear_local_16.safetensors", lora=True),
    "clear_flux_4k_controlnet.json": lambda: clear_flux_hires(4096, "clear_local_16.safetensors", controlnet=True),
}


def render(name):
    return json.dumps(WORKFLOWS[name]().to_json(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    for name in WORKFLOWS:
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            f.write(render(name))
        print("wrote", name)
