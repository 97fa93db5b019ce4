"""Modelled GPU memory of one FLUX.1 step, dense vs token-chunked blocks.

    python bench/memory_model.py                 # table, 1K-8K, bf16 activations
    python bench/memory_model.py --chunk 16384
    python bench/memory_model.py --down 4        # CLEAR _down_4: + its pooled keys and values

Per block: ``block_activation_bytes`` of nodes/token_chunking.py (the tensors
the block's code holds at each point; bench/block_memory.py measures it).
Per step: the largest block peak plus what the model holds around the blocks
(the block's input sequence, RoPE's float32 table, the sampler's latents),
the weights, and a fixed CUDA context/workspace allowance.
"""

import argparse

from comfyui_clear.nodes.token_chunking import TEXT_TOKENS, block_activation_bytes

HIDDEN, HEAD_DIM = 3072, 128
PARAMS = 11.9e9                       # FLUX.1 transformer
SINGLE_BLOCK_PARAMS = 3072 * (3 * 3072 + 12288) + (3072 + 12288) * 3072 + 3 * 3072 * 3072
CUDA_CONTEXT = 0.8e9                  # context, cuBLAS/cuDNN workspaces (typical, not measured here)
GB = 1e9


def step_peak_bytes(image_px, chunk=None, itemsize=2, weights="fp8-streamed", batch=1, text=TEXT_TOKENS,
                    down_factor=1):
    """Modelled peak bytes of one sampling step at image_px x image_px.
    weights: "fp8-resident" (all 11.9 GB on the GPU) or "fp8-streamed" (low-VRAM:
    each block's fp8 weights copied in and cast to bf16 as it runs, two in flight)."""
    grid = image_px // 16
    tokens = text + grid * grid
    blocks = max(block_activation_bytes(kind, tokens, itemsize, chunk, batch, text, down_factor=down_factor)
                 for kind in ("double", "single"))
    sequence = batch * tokens * HIDDEN * itemsize            # the block input (txt | img)
    rope = batch * tokens * HEAD_DIM // 2 * 4 * 4             # EmbedND output, float32 2x2 per frequency
    latents = 8 * batch * 16 * (image_px // 8) ** 2 * 4       # sampler x, noise, denoised, model in/out (float32)
    if weights == "fp8-resident":
        w = PARAMS * 1 + SINGLE_BLOCK_PARAMS * 2             # + one layer cast to bf16 at a time (bounded by a block)
    else:
        w = 2 * SINGLE_BLOCK_PARAMS * (1 + 2)                 # fp8 copy + bf16 cast, two blocks in flight
    return {"blocks": blocks, "around": sequence + rope + latents, "weights": w,
            "total": blocks + sequence + rope + latents + w + CUDA_CONTEXT}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, default=8192, help="tokens per chunk of the chunked rows")
    parser.add_argument("--down", type=int, default=1, help="CLEAR down_factor (4: the _down_4 weights' pooled keys)")
    a = parser.parse_args()
    print("| image | tokens | block peak dense | block peak chunked | step, fp8 streamed: dense | chunked | step, fp8 resident: dense | chunked |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for px in (1024, 2048, 4096, 6144, 8192):
        d, c = step_peak_bytes(px, down_factor=a.down), step_peak_bytes(px, a.chunk, down_factor=a.down)
        dr = step_peak_bytes(px, weights="fp8-resident", down_factor=a.down)
        cr = step_peak_bytes(px, a.chunk, weights="fp8-resident", down_factor=a.down)
        tokens = TEXT_TOKENS + (px // 16) ** 2
        print(f"| {px // 1024}K | {tokens} | {d['blocks'] / GB:.1f} GB | {c['blocks'] / GB:.1f} GB | "
              f"{d['total'] / GB:.1f} GB | {c['total'] / GB:.1f} GB | {dr['total'] / GB:.1f} GB | {cr['total'] / GB:.1f} GB |")


if __name__ == "__main__":
    main()
