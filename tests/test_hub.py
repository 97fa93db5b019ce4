"""Download of published CLEAR files through huggingface_hub against a real HTTP
server on 127.0.0.1 (tests/_hub_server.py). No ComfyUI needed, except for the
progress-bar/cancel test at the end. The endpoint is given through the
HF_ENDPOINT environment variable, which nodes/hub.py reads at call time."""

import os
import time

import pytest

from comfyui_clear.nodes import hub
from comfyui_clear.nodes.hub import CLEARDownloadError, download_published

from _hub_server import FakeHub, unused_port

NAME = "clear_local_8.safetensors"


@pytest.fixture
def payload():
    # > 2 x huggingface_hub's 10 MB read chunk: it only resumes from whole chunks
    return os.urandom(21_000_003)


@pytest.fixture
def fake_hub(payload, monkeypatch):
    with FakeHub({f"{hub.REPO_ID}/{NAME}": payload}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        yield server


def _visible_files(folder):
    """What a ComfyUI folder scan would list (hidden .cache excluded)."""
    return sorted(f for f in os.listdir(folder) if not f.startswith("."))


def test_download_lands_in_dest_with_right_bytes_and_is_not_repeated(fake_hub, payload, tmp_path):
    progress = []
    dest = tmp_path / "models" / "clear"
    path = download_published(NAME, str(dest), on_progress=lambda done, total: progress.append((done, total)))
    assert path == os.path.join(str(dest), NAME)
    with open(path, "rb") as f:
        assert f.read() == payload
    assert _visible_files(dest) == [NAME]
    assert len(fake_hub.gets()) == 1
    assert fake_hub.gets()[0][1] == f"/{hub.REPO_ID}/resolve/main/{NAME}"
    assert progress and progress[-1] == (len(payload), len(payload))

    n_requests = len(fake_hub.file_requests())
    assert download_published(NAME, str(dest)) == path
    assert len(fake_hub.file_requests()) == n_requests  # already there: no network at all


def test_dropped_connection_is_resumed_with_a_range_request(fake_hub, payload, tmp_path):
    fake_hub.cut = "once"
    try:  # huggingface_hub >= 1.0 resumes inside the call
        path = download_published(NAME, str(tmp_path), on_progress=lambda *a: None)
    except CLEARDownloadError:  # older versions keep the .incomplete file for the next run
        assert not (tmp_path / NAME).exists()
        path = download_published(NAME, str(tmp_path), on_progress=lambda *a: None)
    with open(path, "rb") as f:
        assert f.read() == payload
    ranges = [r[2] for r in fake_hub.gets()]
    assert ranges[0] is None and len(ranges) == 2
    start = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= len(payload) // 2  # resumed where the kept bytes end, not restarted


def test_progress_without_tqdm_class_polls_the_partial_file(fake_hub, payload, tmp_path, monkeypatch):
    # the path taken with huggingface_hub < 1.0, whose hf_hub_download has no tqdm_class
    monkeypatch.setattr(hub, "_takes_tqdm_class", lambda function: False)
    progress = []
    path = download_published(NAME, str(tmp_path), on_progress=lambda done, total: progress.append((done, total)))
    with open(path, "rb") as f:
        assert f.read() == payload
    assert progress[-1] == (len(payload), len(payload))
    assert all(0 <= done <= len(payload) for done, _ in progress)


def test_failed_transfer_leaves_no_final_file_and_a_retry_succeeds(fake_hub, payload, tmp_path):
    fake_hub.cut = "always"
    with pytest.raises(CLEARDownloadError) as err:
        download_published(NAME, str(tmp_path), on_progress=lambda *a: None)
    msg = str(err.value)
    assert f"{fake_hub.url}/{hub.REPO_ID}/resolve/main/{NAME}" in msg
    assert os.path.join(str(tmp_path), NAME) in msg
    assert not (tmp_path / NAME).exists()
    assert _visible_files(tmp_path) == []

    fake_hub.cut = None
    path = download_published(NAME, str(tmp_path), on_progress=lambda *a: None)
    with open(path, "rb") as f:
        assert f.read() == payload


def test_missing_file_on_the_hub_gives_manual_install_hint(fake_hub, tmp_path):
    name = "clear_local_16.safetensors"  # not served
    with pytest.raises(CLEARDownloadError) as err:
        download_published(name, str(tmp_path))
    msg = str(err.value)
    assert f"{fake_hub.url}/{hub.REPO_ID}/resolve/main/{name}" in msg
    assert "by hand" in msg and os.path.join(str(tmp_path), name) in msg
    assert os.listdir(tmp_path) == []  # no .cache/huggingface debris either


def _hub_retry_lines(caplog, capfd):
    """huggingface_hub's retry warnings, through logging or its own stderr handler."""
    records = [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")]
    err = capfd.readouterr().err
    return [m for m in records + err.splitlines()
            if any(w in m for w in ("Retrying", "thrown while requesting", "resume", "Error while downloading"))]


def test_nothing_listening_fails_fast_with_one_message_and_no_debris(monkeypatch, tmp_path, caplog, capfd):
    url = f"http://127.0.0.1:{unused_port()}"  # offline: the endpoint refuses connections
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    dest = tmp_path / "models" / "clear"
    dest.mkdir(parents=True)
    start = time.monotonic()
    with pytest.raises(CLEARDownloadError) as err:
        download_published(NAME, str(dest), on_progress=lambda *a: None)
    assert time.monotonic() - start < 3  # huggingface_hub alone backs off ~20 s
    msg = str(err.value)
    assert "cannot be reached" in msg and "No network?" in msg
    assert f"{url}/{hub.REPO_ID}/resolve/main/{NAME}" in msg and str(dest / NAME) in msg
    assert _hub_retry_lines(caplog, capfd) == []
    assert os.listdir(dest) == []  # not even huggingface_hub's .cache folder or a .lock file


def test_probe_goes_through_the_proxy_the_environment_sets(monkeypatch):
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert hub._probe_target("https://huggingface.co") == ("huggingface.co", 443)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert hub._probe_target("https://huggingface.co") == ("proxy.example", 3128)
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert hub._probe_target("https://huggingface.co") == ("huggingface.co", 443)


def test_dropped_transfers_log_one_retry_line_and_leave_no_lock(fake_hub, tmp_path, caplog, capfd):
    fake_hub.cut = "always"  # the stand-in Hub answers, then drops every transfer: huggingface_hub retries
    with pytest.raises(CLEARDownloadError):
        download_published(NAME, str(tmp_path), on_progress=lambda *a: None)
    assert _hub_retry_lines(caplog, capfd) == []
    ours = [r for r in caplog.records if r.name == hub.__name__ and "retrying" in r.getMessage()]
    assert len(ours) == 1, [r.getMessage() for r in caplog.records]
    # at most a partial file kept for resuming (older huggingface_hub), never a lock
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.name.endswith(".incomplete") for p in left), left


@pytest.mark.parametrize("name", ["../clear_local_8.safetensors", "sub/clear_local_8.safetensors", ""])
def test_names_with_folders_are_refused(name, tmp_path):
    with pytest.raises(CLEARDownloadError, match="file name"):
        download_published(name, str(tmp_path / "clear"))
    assert not (tmp_path / "clear").exists()


def test_offline_mode_does_not_touch_the_network(fake_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CLEARDownloadError, match="HF_HUB_OFFLINE") as err:
        download_published(NAME, str(tmp_path))
    assert os.path.join(str(tmp_path), NAME) in str(err.value)
    assert fake_hub.requests == []
    # but a file already in place is used
    (tmp_path / NAME).write_bytes(b"x")
    assert download_published(NAME, str(tmp_path)) == os.path.join(str(tmp_path), NAME)


def test_progress_reaches_comfyui_progress_bar_and_cancel_propagates(comfyui, fake_hub, payload, tmp_path, monkeypatch):
    import comfy.model_management
    import comfy.utils

    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    download_published(NAME, str(tmp_path / "a"))
    assert seen and seen[-1] == (len(payload), len(payload))

    def cancelling_hook(value, total, preview, node_id=None):
        if value > 0:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", cancelling_hook)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        download_published(NAME, str(tmp_path / "b"))
    final = tmp_path / "b" / NAME  # never a partial file under the final name
    assert not final.exists() or final.read_bytes() == payload


# --------------------------------------------------------------------------
# models/clear exists from ComfyUI's start (the README sends offline users there)

@pytest.fixture
def folder_paths(clear_folders):
    return clear_folders


def test_registering_the_folder_creates_it(folder_paths, tmp_path):
    from comfyui_clear.nodes import weights

    weights.register_model_folder()
    assert (tmp_path / "models" / "clear").is_dir()
    assert folder_paths.get_folder_paths("clear") == [str(tmp_path / "models" / "clear")]


def test_a_folder_that_cannot_be_created_does_not_stop_comfyui(folder_paths, tmp_path, monkeypatch):
    from comfyui_clear.nodes import weights

    (tmp_path / "locked").write_text("")  # a file where a folder would go: mkdir fails, also as root
    models = tmp_path / "locked" / "models"
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    weights.register_model_folder()  # no exception
    assert folder_paths.get_folder_paths("clear") == [str(models / "clear")]
    assert weights.weight_choices()[-1] == weights.TRAINING_FREE  # the node still lists its choices


def test_comfyui_loading_the_package_creates_the_folder(comfyui, tmp_path):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {comfyui!r})
        import folder_paths  # as ComfyUI's main.py does before loading custom nodes
        folder_paths.models_dir = {str(tmp_path / "models")!r}
        import comfyui_clear
        print(os.path.isdir(os.path.join(folder_paths.models_dir, "clear")))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "True"
