"""ComfyUI-CLEAR: CLEAR local attention for FLUX (arXiv 2412.16112).

ComfyUI imports this folder as a custom node package. Nothing heavy happens
here: no Triton, no CUDA, no ComfyUI modules beyond what the nodes need when
they run, so ComfyUI starts on any machine.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
