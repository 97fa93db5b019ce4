"""Peak memory of one attention implementation on CPU, in its own process.

    python _attention_peak.py clear|comfyui '[[B, H, D, T, h, w, r, d], ...]'

Prints one JSON line per case: live tensor bytes at the peak (LiveBytes) and
the rise of the resident set (RSSPeak) over the call. ``comfyui`` runs
ComfyUI's own ``optimized_attention`` (COMFYUI_PATH, CPU), the call FLUX makes
(dense: it ignores window r and down_factor d).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import LiveBytes, RSSPeak  # noqa: E402


def _comfyui_attention():
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.ldm.modules.attention as attention
    fn = attention.optimized_attention

    def run(q, k, v, T, grid, r, d):
        return fn(q, k, v, q.shape[1], skip_reshape=True, skip_output_reshape=True)
    return run, fn.__name__


def _clear_attention():
    from comfyui_clear.kernels import clear_attention

    def run(q, k, v, T, grid, r, d):
        return clear_attention(q, k, v, text_len=T, grid=grid, window=r, down_factor=d, backend="torch")
    return run, "clear_attention (torch)"


def main():
    impl, cases = sys.argv[1], json.loads(sys.argv[2])
    run, name = _comfyui_attention() if impl == "comfyui" else _clear_attention()
    gen = torch.Generator().manual_seed(0)
    warm = torch.randn(1, 1, 2 + 8 * 8, 16, generator=gen)
    with LiveBytes():  # load kernels, thread pools and the tracker's own imports before measuring
        run(warm, warm, warm, 2, (8, 8), 3, 2)
    for B, H, D, T, h, w, r, d in cases:
        q, k, v = (torch.randn(B, H, T + h * w, D, generator=gen) for _ in range(3))
        with RSSPeak() as rss, LiveBytes() as live:
            out = run(q, k, v, T, (h, w), r, d)
        assert out.shape == q.shape and torch.isfinite(out).all()
        print(json.dumps({"case": [B, H, D, T, h, w, r, d], "attention": name,
                          "live": live.peak, "rss": rss.rise}), flush=True)
        del q, k, v, out


if __name__ == "__main__":
    main()
