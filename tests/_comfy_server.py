"""A real ComfyUI server for tests: main.py on a free 127.0.0.1 port."""

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
