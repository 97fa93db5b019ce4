"""Tiny stand-ins for the distillation command line's tests, and a launcher
that runs the command line with them (``python tests/_distill_cli_tiny.py
train ...``, also under torchrun).

- Diffusion model: a tiny FLUX.1 (tests/flux_tiny.py) saved as a safetensors
  file; ComfyUI's own loader reads it, flux_tiny.detect_as_tiny makes its
  model detection accept the tiny width.
- Text encoders: ComfyUI's real FLUX.1 text encoder classes (CLIP-L + T5-XXL,
  DualCLIPLoader 'flux') at a tiny width (context 64 = the tiny FLUX's
  context_in_dim, pooled 32 = its vec_in_dim), through ComfyUI's load_clip:
  only their configs are overridden, with the model_options keys ComfyUI's
  text encoders read (``model_config`` for CLIP-L, ``t5xxl_model_config``)."""

import os
import sys

import torch

TINY_CLIP_L = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, projection_dim=32)
TINY_T5 = dict(d_model=64, d_ff=128, d_kv=32, num_heads=2, num_layers=1)


def tiny_text_encoder_options():
    return {"model_config": dict(TINY_CLIP_L), "clip_l_model_config": dict(TINY_CLIP_L),
            "t5xxl_model_config": dict(TINY_T5)}


def write_tiny_text_encoders(folder, seed=5):
    """clip_l and t5xxl files of ComfyUI's FLUX.1 text encoder at the tiny width; returns their paths."""
    import comfy.text_encoders.flux
    from safetensors.torch import save_file

    model = comfy.text_encoders.flux.FluxClipModel(model_options=tiny_text_encoder_options())
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for name, part in (("clip_l_tiny.safetensors", model.clip_l), ("t5xxl_tiny.safetensors", model.t5xxl)):
        sd = {k: (torch.randn(v.shape, generator=gen) / v.shape[-1] ** 0.5 if v.dim() > 1
                  else 1.0 + 0.1 * torch.randn(v.shape, generator=gen)).float()
              for k, v in part.transformer.state_dict().items()}
        path = os.path.join(folder, name)
        save_file(sd, path)
        paths.append(path)
    return paths


def write_tiny_flux(path, seed=3):
    from flux_tiny import make_tiny_flux
    from safetensors.torch import save_file

    save_file(make_tiny_flux(seed=seed).model.diffusion_model.state_dict(), str(path))  # float32: fast on CPUs
    return str(path)


def install(monkeypatch):
    """ComfyUI's loaders accept the tiny files (ComfyUI importable first)."""
    import comfy.sd
    from flux_tiny import detect_as_tiny

    detect_as_tiny(monkeypatch)
    real = comfy.sd.load_clip

    def load_clip(ckpt_paths, embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                  model_options={}, **kwargs):
        return real(ckpt_paths, embedding_directory, clip_type, {**tiny_text_encoder_options(), **model_options},
                    **kwargs)

    monkeypatch.setattr(comfy.sd, "load_clip", load_clip)


def cancel_after_first_step():
    """Test hook (CLEAR_TEST_CANCEL_RANK): this worker alone sees ComfyUI's
    interrupt after its first training step, as when Ctrl-C reaches one
    torchrun worker before the others."""
    import comfy.model_management as mm

    from comfyui_clear.nodes import distill

    real_step = distill._Trainer.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        mm.interrupt_current_processing(True)
        return out

    distill._Trainer.step = step


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import logging

    import pytest

    from comfyui_clear.nodes import distill_cli

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # before ComfyUI's import sets up its own

    distill_cli.setup_comfyui(distill_cli.find_comfyui(None), cpu=True)
    install(pytest.MonkeyPatch())
    if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("CLEAR_TEST_CANCEL_RANK"):
        cancel_after_first_step()
    sys.exit(distill_cli.main())
