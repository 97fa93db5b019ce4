"""ComfyUI must start where Triton or CUDA is missing: importing the package
(as ComfyUI does at start-up) must not import Triton or ComfyUI internals."""

import subprocess
import sys
import textwrap


def test_package_imports_without_triton_and_imports_nothing_heavy():
    code = textwrap.dedent("""
        import sys
        import torch  # first: torch probes for Triton at import time on its own
        triton_before = "triton" in sys.modules

        class NoTriton:  # make `import triton` fail, as on a machine without it
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked by the test")
                return None

        sys.meta_path.insert(0, NoTriton())
        import comfyui_clear
        assert triton_before or "triton" not in sys.modules, "Triton imported at start-up"
        assert "comfy" not in sys.modules, "ComfyUI modules imported at start-up"
        assert isinstance(comfyui_clear.NODE_CLASS_MAPPINGS, dict)
        for name, cls in comfyui_clear.NODE_CLASS_MAPPINGS.items():
            assert name in comfyui_clear.NODE_DISPLAY_NAME_MAPPINGS, name

        # The op's torch path works without Triton, and auto picks it on CPU.
        from comfyui_clear.kernels import clear_attention, triton_supported
        q = torch.randn(1, 1, 2 + 9, 16)
        out = clear_attention(q, q, q, text_len=2, grid=(3, 3), window=2)
        assert out.shape == q.shape
        print("ok", sorted(comfyui_clear.NODE_CLASS_MAPPINGS))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")
