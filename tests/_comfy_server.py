"""ComfyUI's prompt execution for tests: a real server (main.py on a free
127.0.0.1 port), or its PromptExecutor in-process as main.py's prompt worker
runs it (torch.inference_mode, ComfyUI's output cache)."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO_ROOT


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(comfyui, base, module="ComfyUI-CLEAR"):
    """Start ComfyUI from the checkout ``comfyui`` with ``base`` as its base
    directory and this checkout as custom_nodes/<module>; yield its URL once it
    answers, and stop it afterwards. Its log is base/server.log."""
    (base / "custom_nodes").mkdir(exist_ok=True)
    os.symlink(REPO_ROOT, base / "custom_nodes" / module)
    log_path = base / "server.log"
    url = f"http://127.0.0.1:{free_port()}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
             "--base-directory", str(base)],
            cwd=comfyui, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 300  # a cold start on 2 busy cores can take minutes
        while proc.poll() is None and time.time() < deadline:
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=5).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not start or exited:\n" + log_path.read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _ServerStub:
    """What PromptExecutor uses of ComfyUI's PromptServer."""
    client_id = None
    last_node_id = None
    sockets_metadata = {}

    def send_sync(self, *args, **kwargs):
        pass


def prompt_executor():
    """An in-process PromptExecutor with ComfyUI's classic cache (0.3.64's
    default, --cache-classic on 0.33): a prompt queued again on it reuses the
    outputs of every node whose inputs did not change."""
    from comfyui_clear.nodes.compat import prompt_executor as make

    return make(_ServerStub())


def execute(executor, prompt, prompt_id="test-prompt"):
    """Run an API prompt's output nodes as the prompt worker does; fails with
    ComfyUI's error message. Returns the ids of the nodes served from cache."""
    import nodes

    outputs = [k for k, v in prompt.items() if getattr(nodes.NODE_CLASS_MAPPINGS[v["class_type"]], "OUTPUT_NODE", False)]
    executor.execute(prompt, prompt_id, {}, outputs)
    event, data = executor.status_messages[-1]
    assert executor.success, (event, {k: data.get(k) for k in ("node_type", "exception_type", "exception_message")})
    return next(data["nodes"] for event, data in executor.status_messages if event == "execution_cached")
