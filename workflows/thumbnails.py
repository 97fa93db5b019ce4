"""Draws each workflow's template thumbnail (<name>.jpg next to <name>.json,
the file and format ComfyUI's Templates dialog requests for custom nodes).

A thumbnail shows what the workflow computes, to scale: the output image as
FLUX's token grid (1 token = 16 px), the 1024² base it starts from, and the
CLEAR attention window of one token (a disc of radius r tokens) at that
resolution, with the stages below. No generated image is shown: none exists.
Run: python workflows/thumbnails.py [name ...]   (needs matplotlib)
"""

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyBboxPatch, Rectangle  # noqa: E402

import build  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE_PX, DPI = 512, 128
BG, FG, DIM, ACCENT, BASE = "#17191c", "#e8eaed", "#8a9099", "#4aa3ff", "#7bc47f"


def _radius(weights):
    return int(weights.split("_")[2].split(".")[0])


def _stage_row(ax, stages, w, gap, y, highlighted):
    """A centred row of rounded stage boxes joined by arrows; highlighted(stage) ones in the accent colour."""
    x = (1 - len(stages) * w - (len(stages) - 1) * gap) / 2
    for i, stage in enumerate(stages):
        color = ACCENT if highlighted(stage) else "#3a4048"
        ax.add_patch(FancyBboxPatch((x, y), w, 0.075, boxstyle="round,pad=0.004,rounding_size=0.015",
                                    facecolor=color, edgecolor="none"))
        ax.text(x + w / 2, y + 0.0375, stage, color=FG, fontsize=7.5, ha="center", va="center", weight="bold")
        if i < len(stages) - 1:
            ax.annotate("", xy=(x + w + gap - 0.005, y + 0.0375), xytext=(x + w + 0.005, y + 0.0375),
                        arrowprops=dict(arrowstyle="->", color=DIM, lw=1))
        x += w + gap


def draw(name, spec, path):
    target = spec["target"] or 1024
    r = _radius(spec["weights"])
    tokens = target // 16
    fig = plt.figure(figsize=(SIZE_PX / DPI, SIZE_PX / DPI), dpi=DPI, facecolor=BG)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")

    # the output image, to scale in tokens (the top band stays empty: cards put a badge there and crop it)
    x0, y0, side = 0.05, 0.17, 0.58
    ax.add_patch(Rectangle((x0, y0), side, side, facecolor="#22262b", edgecolor=DIM, lw=0.8))
    step = max(1, tokens // 16)  # grid line every `step` tokens
    for i in range(step, tokens, step):
        f = i / tokens
        ax.plot([x0 + f * side] * 2, [y0, y0 + side], color="#2c3137", lw=0.4)
        ax.plot([x0, x0 + side], [y0 + f * side] * 2, color="#2c3137", lw=0.4)
    if spec["target"]:
        b = side * 1024 / target
        ax.add_patch(Rectangle((x0, y0 + side - b), b, b, facecolor=BASE, alpha=0.35, edgecolor=BASE, lw=1))
        ax.text(x0 + 0.01, y0 + side - b - 0.012, "1K base", color=BASE, fontsize=7, va="top")
    # one query token and the tokens it attends to (disc of radius r tokens), to scale
    qx, qy = x0 + side * 0.62, y0 + side * 0.42
    ax.add_patch(Circle((qx, qy), side * r / tokens, facecolor=ACCENT, alpha=0.45, edgecolor=ACCENT, lw=1))
    ax.add_patch(Circle((qx, qy), max(side / tokens / 2, 0.004), color=FG))
    share = math.pi * r * r / (tokens * tokens)

    # legend, right of the image
    lx = 0.67
    ax.text(lx, 0.715, f"CLEAR {target // 1024}K", color=FG, fontsize=15, weight="bold", va="center")
    what = "text to image" if spec["target"] is None else "hires fix"
    what += "".join(f"\n+ {label}" for key, label in (("lora", "LoRA"), ("controlnet", "ControlNet tile"))
                    if spec.get(key))
    gpus = next((w[0] for t, w in spec.get("after_clear", ()) if t == "CLEARMultiGPUSplit"), 1)
    if gpus > 1:  # the row bands, one per GPU
        what += f"\n+ {gpus} GPUs (row bands)"
        for i in range(1, gpus):
            ax.plot([x0, x0 + side], [y0 + side * i / gpus] * 2, color=FG, lw=1, ls="--")
    ax.text(lx, 0.665, f"FLUX.1-dev\n{target} x {target}\n{what}", color=DIM, fontsize=7.5, va="top",
            linespacing=1.3)
    ax.text(lx, 0.47, f"{tokens}² tokens", color=FG, fontsize=8.5, weight="bold", va="center")
    ax.text(lx, 0.435, "(16 px each)", color=DIM, fontsize=7, va="center")
    ax.add_patch(Circle((lx + 0.018, 0.37), 0.016, facecolor=ACCENT, alpha=0.45, edgecolor=ACCENT))
    ax.text(lx + 0.045, 0.37, f"what one\ntoken sees", color=FG, fontsize=7, va="center")
    ax.text(lx, 0.32, f"r = {r} tokens\n= {16 * r} px\n{share:.1%} of the\nimage + the text", color=FG,
            fontsize=7, va="top", linespacing=1.3)

    # stages, bottom
    if spec["target"]:
        stages = ["base 1K", "upscale", f"CLEAR {target // 1024}K", "decode"]
    else:
        stages = ["CLEAR 1K", "decode"]
    w, gap, y = 0.19, 0.045, 0.05
    _stage_row(ax, stages, w, gap, y, lambda stage: stage.startswith("CLEAR"))
    fig.savefig(path, dpi=DPI, facecolor=BG, pil_kwargs={"quality": 88})
    plt.close(fig)


def draw_distill(name, spec, path):
    """Distillation: the teacher's dense attention (every token) next to the
    student's CLEAR window (a disc of radius 16 tokens) on the 1024² training
    grid, with the two steps and the file they leave."""
    tokens, r = 64, 16
    fig = plt.figure(figsize=(SIZE_PX / DPI, SIZE_PX / DPI), dpi=DPI, facecolor=BG)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.text(0.5, 0.8, "CLEAR distill", color=FG, fontsize=15, weight="bold", ha="center", va="center")
    ax.text(0.5, 0.745, "your FLUX model, 1024 x 1024 training", color=DIM, fontsize=7.5, ha="center", va="center")
    side, y0 = 0.36, 0.27
    for x0, label, local in ((0.07, "teacher: full attention", False), (0.57, "student: CLEAR r = 16", True)):
        ax.add_patch(Rectangle((x0, y0), side, side, facecolor=ACCENT if not local else "#22262b",
                               alpha=0.45 if not local else 1, edgecolor=DIM, lw=0.8))
        for i in range(4, tokens, 4):
            f = i / tokens
            ax.plot([x0 + f * side] * 2, [y0, y0 + side], color="#2c3137", lw=0.4)
            ax.plot([x0, x0 + side], [y0 + f * side] * 2, color="#2c3137", lw=0.4)
        qx, qy = x0 + side * 0.55, y0 + side * 0.45
        if local:
            ax.add_patch(Circle((qx, qy), side * r / tokens, facecolor=ACCENT, alpha=0.45, edgecolor=ACCENT, lw=1))
        ax.add_patch(Circle((qx, qy), side / tokens / 2 + 0.003, color=FG))
        ax.text(x0 + side / 2, y0 - 0.035, label, color=FG, fontsize=7.5, ha="center", va="center")
    ax.annotate("", xy=(0.56, y0 + side / 2), xytext=(0.44, y0 + side / 2),
                arrowprops=dict(arrowstyle="->", color=FG, lw=1.5))
    stages = ["teacher data", "distil", "models/clear"]
    w, gap, y = 0.24, 0.05, 0.06
    _stage_row(ax, stages, w, gap, y, lambda stage: stage == "distil")
    fig.savefig(path, dpi=DPI, facecolor=BG, pil_kwargs={"quality": 88})
    plt.close(fig)


if __name__ == "__main__":
    import sys

    only = sys.argv[1:]  # names to draw (default: all)
    for name, spec in build.SPECS.items():
        if only and name not in only:
            continue
        path = os.path.join(HERE, name + ".jpg")
        (draw_distill if spec.get("distill") else draw)(name, spec, path)
        print("wrote", os.path.basename(path))
