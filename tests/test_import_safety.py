"""ComfyUI must start where Triton or CUDA is missing: importing the package
(as ComfyUI does at start-up) must not import Triton or ComfyUI internals."""

import ast
import os
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


# ---------------------------------------------------------------------------
# Tests import optional packages only behind a guard (issue 26.4)

# Packages a test may find missing: the test extras (and pillow, which comes with
# them and with ComfyUI) that the package itself never imports. Not numpy:
# kernels/tiling.py imports it (it comes with torch's and ComfyUI's installs).
OPTIONAL = {"gguf", "playwright", "comfy_cli", "matplotlib", "triton", "PIL"}
CATCHES_IMPORT_ERROR = {None, "ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _calls(scope):
    """Calls that run when ``scope`` (a function or module) runs: not those in nested definitions."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        if isinstance(node, (*DEFS, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _name(call):
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _skip_target(call):
    """The package of ``pytest.importorskip("package...")``."""
    arg = call.args[0] if call.args else None
    if _name(call) == "importorskip" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value.split(".")[0]
    return None


def _catches_import_error(handler):
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any((k.id if isinstance(k, ast.Name) else None if k is None else "") in CATCHES_IMPORT_ERROR
               for k in kinds)


def unguarded_imports(sources):
    """``sources``: {module name: code}. "module:line package" for each import of
    an OPTIONAL package that can run with no guard before it. Guards: a try
    whose handler catches ImportError; ``pytest.importorskip(package)`` or a
    call of a function that runs one (also through other functions, e.g.
    ``import_comfyui_gguf()``), earlier in an enclosing function or at module
    level; a parameter named after such a function (a fixture)."""
    trees = {m: ast.parse(code) for m, code in sources.items()}
    defs = {}  # name -> [(module, function)]: a call resolves to its module's own, else any test module's
    for m, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, DEFS):
                defs.setdefault(node.name, []).append((m, node))

    def resolve(module, name):
        found = defs.get(name, [])
        return [f for m, f in found if m == module] or [f for _, f in found]

    guards = {id(f): {p for c in _calls(f) if (p := _skip_target(c))} for fs in defs.values() for _, f in fs}
    changed = True
    while changed:  # a function calling a guard guards the same packages
        changed = False
        for fs in defs.values():
            for m, f in fs:
                more = {p for c in _calls(f) for g in resolve(m, _name(c)) for p in guards[id(g)]} - guards[id(f)]
                if more:
                    guards[id(f)] |= more
                    changed = True

    def skips(module, call_or_name):
        name = call_or_name if isinstance(call_or_name, str) else _name(call_or_name)
        own = set() if isinstance(call_or_name, str) else {_skip_target(call_or_name)}
        return own | {p for g in resolve(module, name) for p in guards[id(g)]}

    problems = []
    for module, tree in trees.items():
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                packages = {a.name.split(".")[0] for a in node.names} & OPTIONAL
            elif isinstance(node, ast.ImportFrom) and not node.level:
                packages = {node.module.split(".")[0]} & OPTIONAL
            else:
                continue
            for package in packages:
                ok, in_function, child, scope = False, False, node, parents.get(node)
                while scope is not None and not ok:
                    if isinstance(scope, ast.Try) and child in scope.body:
                        ok = any(_catches_import_error(h) for h in scope.handlers)
                    elif isinstance(scope, (*DEFS, ast.Module)):
                        # module-level guards have run before any of its functions does
                        ok = any(package in skips(module, c) for c in _calls(scope)
                                 if c.lineno < node.lineno or in_function and scope is tree)
                        if scope is not tree:
                            params = scope.args.posonlyargs + scope.args.args + scope.args.kwonlyargs
                            ok = ok or any(package in skips(module, a.arg) for a in params)
                            in_function = True
                    child, scope = scope, parents.get(scope)
                if not ok:
                    problems.append(f"{module}:{node.lineno} {package}")
    return sorted(problems, key=lambda p: (p.split(":")[0], int(p.split(":")[1].split()[0])))


TESTS = os.path.dirname(os.path.abspath(__file__))


def test_tests_import_optional_packages_only_behind_a_guard():
    """The README's commands pass in a venv without gguf (or playwright, comfy-cli,
    matplotlib, Triton, pillow): every test needing one skips, saying so."""
    sources = {}
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py"):
            with open(os.path.join(TESTS, name), encoding="utf-8") as f:
                sources[name[:-3]] = f.read()
    assert unguarded_imports(sources) == []


def test_the_guard_check_finds_an_unguarded_import():
    """Issue 26.4's case (gguf imported before the helper that skips without it)
    is found; the guards the suite uses are accepted."""
    helper = textwrap.dedent("""
        import pytest
        def import_comfyui_gguf():
            pytest.importorskip("gguf")
        def ops():
            return import_comfyui_gguf()
    """)
    tests = textwrap.dedent("""
        import pytest
        from helper import import_comfyui_gguf, ops
        @pytest.fixture
        def G():
            return ops()
        def test_old_band_split():
            import gguf
            import_comfyui_gguf()
        def test_unguarded_module_helper():
            from matplotlib import pyplot
        def test_skip_first():
            import_comfyui_gguf()
            import gguf
        def test_fixture(G):
            import gguf.quants
        def test_try():
            try:
                import triton
            except ImportError:
                triton = None
        def test_try_wrong_error():
            try:
                import triton
            except ValueError:
                pass
        def test_importorskip():
            pytest.importorskip("playwright.sync_api", reason="why")
            from playwright.sync_api import sync_playwright
        def test_skip_in_a_nested_function_guards_nothing():
            def later():
                pytest.importorskip("PIL")
            from PIL import Image
    """)
    assert unguarded_imports({"helper": helper, "test_x": tests}) == [
        "test_x:8 gguf", "test_x:11 matplotlib", "test_x:24 triton", "test_x:33 PIL"]
    module_level = "import pytest\nimport numpy\ngguf = pytest.importorskip('gguf')\ndef test():\n    import gguf\n"
    assert unguarded_imports({"m": module_level}) == []
    assert unguarded_imports({"m": "import gguf\nimport pytest\npytest.importorskip('gguf')\n"}) == ["m:1 gguf"]
