"""ComfyUI-CLEAR: CLEAR local attention for FLUX (arXiv 2412.16112).

ComfyUI imports this folder as a custom node package. Nothing heavy happens
here: no Triton, no CUDA, no ComfyUI modules beyond what the nodes need when
they run, so ComfyUI starts on any machine.
"""

# pytest imports this file as a plain module (no parent package) when the
# checkout's folder name is not an identifier, e.g. ComfyUI-CLEAR; ComfyUI and
# pip import it as a package.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
