"""Download of the published CLEAR weights from the Hugging Face Hub.

Goes through ``huggingface_hub.hf_hub_download`` (auth token, proxies, Hub
redirects and Xet storage come with it) into the user's ``models/clear``
folder. Behaviour we rely on, checked in huggingface_hub's
``_hf_hub_download_to_local_dir``:

- the bytes go to ``<dest>/.cache/huggingface/download/*.incomplete`` and are
  renamed onto ``<dest>/<name>`` only when complete (same volume, so the final
  name appears atomically and a partial file never carries it);
- a dropped connection is resumed with an HTTP Range request: huggingface_hub
  >= 1.0 does it inside the call (5 retries, from whole 10 MB chunks); older
  versions end the call with the error, keep the ``.incomplete`` file and
  resume it on the next run.

``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when the download starts (not
when huggingface_hub was imported), so a mirror set after start-up is honoured.
Offline, huggingface_hub would retry a refused connection for ~20 s and log
every retry (twice under ComfyUI's logging); a TCP connect probe to the
endpoint (or its proxy) first fails in at most a few seconds with one message.
Retry warnings of our own transfers are collapsed into one line of ours, and a
failed attempt leaves no lock file behind (only an ``.incomplete`` file, kept
for resuming).
Progress goes to ComfyUI's progress bar (which is also where a user's cancel
is raised: that exception is passed through untouched) and to the log. Only
huggingface_hub >= 1.0 takes a ``tqdm_class``; with older versions (what
ComfyUI's transformers 4.x pins) the download runs in a worker thread and this
thread reports the size of its ``.incomplete`` file instead.
"""

import glob
import inspect
import logging
import os
import re
import shutil
import socket
import sys
import threading
import urllib.parse
import urllib.request

from .runtime import ui_error

REPO_ID = "Huage001/CLEAR"
REVISION = "main"
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 5.0  # DNS + TCP connect; a reachable Hub answers in well under a second

log = logging.getLogger(__name__)


@ui_error
class CLEARDownloadError(RuntimeError):
    """A published CLEAR file could not be downloaded; the message says where to put it by hand."""


def _endpoint():
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def file_url(name, endpoint=None):
    return f"{(endpoint or _endpoint()).rstrip('/')}/{REPO_ID}/resolve/{REVISION}/{name}"


def _offline():
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _writable(folder):
    """Whether a file can be created in ``folder`` (or, missing, in its nearest existing parent)."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return os.access(folder, os.W_OK | os.X_OK)


def _manual_hint(name, dest_dir, url):
    hint = (f"Download it by hand from {url} (repo page: https://huggingface.co/{REPO_ID}) "
            f"and save it as {os.path.join(os.path.abspath(dest_dir), name)}, then run the workflow again.")
    if not _writable(dest_dir):
        hint = (f"{os.path.abspath(dest_dir)} is read-only. Add a `clear:` entry with a writable folder to "
                "ComfyUI's extra_model_paths.yaml (e.g. under `comfyui:`, `clear: /path/to/writable/clear`) and "
                "restart ComfyUI: CLEAR searches that folder first and downloads into it. Or "
                + hint[0].lower() + hint[1:])
    return hint


def _probe_target(endpoint):
    """(host, port) a connection to ``endpoint`` opens first: its proxy when the
    environment sets one for it (as huggingface_hub's HTTP client honours)."""
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme) or urllib.request.getproxies().get("all")
    if proxy and host and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = p.hostname, p.port or (1080 if p.scheme.startswith("socks") else 80)
    return host, port


def _unreachable(endpoint, timeout=PROBE_TIMEOUT_S):
    """None when a TCP connection to the endpoint opens within ``timeout``, else
    the reason. Runs in a thread so a hanging DNS lookup is bounded too."""
    try:
        host, port = _probe_target(endpoint)
    except ValueError:  # a malformed HF_ENDPOINT or proxy: let huggingface_hub report it
        return None
    if not host:
        return None
    outcome = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = exc

    probe = threading.Thread(target=connect, name="clear-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout + 1.0)
    if outcome.get("ok"):
        return None
    error = outcome.get("error")
    reason = f"{type(error).__name__}: {error}" if error else f"no answer within {timeout:.0f} s"
    return f"connecting to {host}:{port}: {reason}"


# huggingface_hub's retry warnings (request backoff in utils._http, resumed
# transfers in file_download; the wording differs between versions)
_RETRY_LOGGERS = ("huggingface_hub.utils._http", "huggingface_hub.file_download")
_RETRY_MESSAGE = re.compile(r"retr|resume|thrown while requesting|error while downloading", re.IGNORECASE)


class _RetriesLoggedOnce(logging.Filter):
    """Drops huggingface_hub's retry warnings that come from this download (its
    calling thread or our worker thread) and logs the first one once as ours."""

    def __init__(self, name):
        super().__init__()
        self.name_ = name
        self.owner = threading.get_ident()
        self.logged = False

    def filter(self, record):
        if record.thread != self.owner and not (record.threadName or "").startswith("clear-download-"):
            return True
        if not _RETRY_MESSAGE.search(record.getMessage()):
            return True
        if not self.logged:
            self.logged = True
            log.warning("CLEAR: connection problem while downloading %s (%s); huggingface_hub is retrying",
                        self.name_, " ".join(record.getMessage().split()))
        return False


def _remove_debris(dest_dir, name, cache_existed):
    """After a failed download: remove huggingface_hub's lock file for ``name``,
    and the whole ``.cache`` folder when this call created it and holds no
    ``.incomplete`` file to resume from."""
    cache = os.path.join(dest_dir, ".cache")
    download = os.path.join(cache, "huggingface", "download")
    partial = glob.glob(os.path.join(glob.escape(download), "**", "*.incomplete"), recursive=True)
    try:
        if not cache_existed and not partial:
            shutil.rmtree(cache)
        elif os.path.isfile(os.path.join(download, name + ".lock")):
            os.remove(os.path.join(download, name + ".lock"))
    except OSError:  # tidying up only: never hide the download error
        pass


def _is_comfy_interrupt(exc):
    """A user's cancel raised by ComfyUI's progress hook: must propagate as is."""
    mm = sys.modules.get("comfy.model_management")
    return mm is not None and isinstance(exc, getattr(mm, "InterruptProcessingException", ()))


def _comfy_progress_callback():
    """(done, total) -> None updating ComfyUI's progress bar, or None outside ComfyUI."""
    try:
        import comfy.utils
    except ImportError:
        return None
    bar = comfy.utils.ProgressBar(1)

    def update(done, total):
        bar.update_absolute(done, total=max(int(total or 0), done, 1))
    return update


def _progress_tqdm_class(callback):
    """A tqdm subclass that also reports bytes to ``callback``. huggingface_hub
    instantiates it per transfer (twice for Xet files: network + reconstruction),
    so each instance reports its own counts; ``name`` (passed by some versions)
    is accepted and dropped because vanilla tqdm rejects it."""
    from tqdm.auto import tqdm

    class _ProgressTqdm(tqdm):
        def __init__(self, *args, name=None, **kwargs):
            self._clear_done = int(kwargs.get("initial") or 0)
            self._clear_total = kwargs.get("total")
            super().__init__(*args, **kwargs)
            callback(self._clear_done, self._clear_total)

        def update(self, n=1):
            result = super().update(n)
            self._clear_done += int(n or 0)
            callback(self._clear_done, self._clear_total or self.total)
            return result

    return _ProgressTqdm


def _takes_tqdm_class(function):
    try:
        return "tqdm_class" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _file_size(kwargs):
    """Size announced by the Hub, or None (hf_hub_download reports the errors)."""
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(kwargs["repo_id"], kwargs["filename"], revision=kwargs["revision"], endpoint=kwargs["endpoint"])
        return get_hf_file_metadata(url).size
    except Exception:
        return None


def _download_polling_progress(hf_hub_download, kwargs, callback, interval=0.25):
    """Run hf_hub_download in a worker thread; report the growth of its
    ``.incomplete`` file (under local_dir/.cache/huggingface/download) from this
    thread, so a cancel raised by the progress bar stops the wait here."""
    total = _file_size(kwargs)
    outcome = {}

    def work():
        try:
            outcome["path"] = hf_hub_download(**kwargs)
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name=f"clear-download-{kwargs['filename']}", daemon=True)
    worker.start()
    pattern = os.path.join(glob.escape(kwargs["local_dir"]), ".cache", "huggingface", "download", "**", "*.incomplete")
    done = 0
    try:
        while worker.is_alive():
            worker.join(interval)
            partial = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            if partial:
                done = max(done, os.path.getsize(max(partial, key=os.path.getmtime)))
            callback(done, total)
    except BaseException:
        log.warning("CLEAR: stopped waiting for %s; the transfer finishes in the background and the file "
                    "appears in %s when complete", kwargs["filename"], kwargs["local_dir"])
        raise
    if "error" in outcome:
        raise outcome["error"]
    size = os.path.getsize(outcome["path"]) if os.path.isfile(outcome["path"]) else done
    callback(size, total or size)
    return outcome["path"]


def download_published(name, dest_dir, *, on_progress=None):
    """Download ``name`` from the CLEAR Hub repo into ``dest_dir``; returns its path.

    A file already at ``dest_dir/name`` is returned without touching the network.
    ``on_progress(done_bytes, total_bytes)`` defaults to ComfyUI's progress bar.
    Raises CLEARDownloadError (offline, missing file, failed transfer) with the
    URL and the place to put the file by hand.
    """
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise CLEARDownloadError(f"'{name}' is not a file name of the {REPO_ID} repository (no folders allowed).")
    dest_dir = os.path.abspath(dest_dir)
    final_path = os.path.join(dest_dir, name)
    if os.path.isfile(final_path):
        return final_path
    url = file_url(name)
    if _offline():
        raise CLEARDownloadError(
            f"CLEAR weights {name} are not in {dest_dir} and HF_HUB_OFFLINE is set, so they were not "
            f"downloaded. {_manual_hint(name, dest_dir, url)}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise CLEARDownloadError(
            f"huggingface_hub is not installed, so {name} cannot be downloaded "
            f"(pip install huggingface_hub). {_manual_hint(name, dest_dir, url)}") from exc

    endpoint = _endpoint()
    unreachable = _unreachable(endpoint)
    if unreachable:
        raise CLEARDownloadError(
            f"CLEAR weights {name} are not in {dest_dir} and the Hub at {endpoint} cannot be reached "
            f"({unreachable}). No network? {_manual_hint(name, dest_dir, url)}")

    try:
        os.makedirs(dest_dir, exist_ok=True)
    except OSError as exc:
        raise CLEARDownloadError(f"Could not create {dest_dir} for CLEAR weights {name} ({exc}). "
                                 f"{_manual_hint(name, dest_dir, url)}") from exc
    callback = on_progress or _comfy_progress_callback()
    kwargs = dict(repo_id=REPO_ID, filename=name, revision=REVISION, local_dir=dest_dir, endpoint=endpoint)
    log.info("CLEAR: downloading %s from %s into %s", name, url, dest_dir)
    cache_existed = os.path.isdir(os.path.join(dest_dir, ".cache"))
    retries = _RetriesLoggedOnce(name)
    for logger_name in _RETRY_LOGGERS:
        logging.getLogger(logger_name).addFilter(retries)
    try:
        if callback is None:
            path = hf_hub_download(**kwargs)
        elif _takes_tqdm_class(hf_hub_download):
            path = hf_hub_download(**kwargs, tqdm_class=_progress_tqdm_class(callback))
        else:
            path = _download_polling_progress(hf_hub_download, kwargs, callback)
    except Exception as exc:
        if _is_comfy_interrupt(exc):
            raise
        _remove_debris(dest_dir, name, cache_existed)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        if len(reason) > 500:
            reason = reason[:500] + "..."
        raise CLEARDownloadError(
            f"Could not download CLEAR weights {name} from {url} ({reason}). "
            f"{_manual_hint(name, dest_dir, url)}") from exc
    finally:
        for logger_name in _RETRY_LOGGERS:
            logging.getLogger(logger_name).removeFilter(retries)
    path = os.path.abspath(path)
    if os.path.normcase(path) != os.path.normcase(final_path) or not os.path.isfile(path):
        raise CLEARDownloadError(f"huggingface_hub returned {path} for {name}, expected {final_path}. "
                                 f"{_manual_hint(name, dest_dir, url)}")
    log.info("CLEAR: saved %s (%.1f MB)", final_path, os.path.getsize(final_path) / 2**20)
    return final_path
