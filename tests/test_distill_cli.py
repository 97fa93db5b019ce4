"""The distillation command line (nodes/distill_cli.py): --help without
ComfyUI, one clear message per bad argument, both subcommands end to end on
the CPU through ComfyUI's own loaders (tiny FLUX.1 and tiny real text
encoders, see tests/_distill_cli_tiny.py), and several processes under a real
torchrun (gloo) training the same weights as one process at twice the batch."""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
CLI_FILE = os.path.join(REPO, "nodes", "distill_cli.py")
LAUNCHER = os.path.join(TESTS, "_distill_cli_tiny.py")
PYPATH = os.path.join(REPO, ".pypath")  # comfyui_clear -> this checkout (as in the README's test command)
PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen, top view", "an old map on a desk"]
# train settings shared by the single-process and the torchrun run (tiny, fast)
TRAIN = ["--steps", "2", "--mode", "lora", "--rank", "4", "--window-size", "2", "--optimizer", "adamw",
         "--learning-rate", "1e-2", "--checkpoint-every", "100", "--preview-every", "100", "--seed", "7"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["PYTHONPATH"] = os.pathsep.join([PYPATH, TESTS])
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


# ---------------------------------------------------------------- no ComfyUI needed

def test_help_as_a_file_needs_no_comfyui(tmp_path):
    """python custom_nodes/<pack>/nodes/distill_cli.py teacher-data --help, in a
    process where neither the package nor ComfyUI is importable."""
    env = _env()
    env.pop("PYTHONPATH")
    r = subprocess.run([sys.executable, CLI_FILE, "teacher-data", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--model" in r.stdout and "--comfyui" in r.stdout and "--clip" in r.stdout


@pytest.mark.parametrize("sub", ["teacher-data", "train"])
def test_help_as_a_module_imports_no_comfyui(monkeypatch, capsys, sub):
    """python -m comfyui_clear.nodes.distill_cli <sub> --help imports nothing of ComfyUI."""
    import runpy

    before = set(sys.modules)
    monkeypatch.setattr(sys, "argv", ["distill_cli", sub, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("comfyui_clear.nodes.distill_cli", run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and ("--clip" in out) == (sub == "teacher-data")
    assert ("--grad-accum" in out) == (sub == "train")
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("comfy", "folder_paths", "nodes")}


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "m", "--dataset", "d", "--output", "o", "--rank", "0"], "--rank must be at least 1"),
    (["train", "--model", "m", "--dataset", "d", "--output", "o", "--loss-attn", "-1"], "--loss-attn cannot be"),
    (["teacher-data", "--model", "m", "--dataset", "d", "--clip", "a", "--width", "1000"], "multiples of 16"),
    (["teacher-data", "--model", "m", "--dataset", "d", "--clip", "a", "b", "c"], "one text encoder file"),
    (["train", "--model", "m", "--dataset", "d", "--output", "o", "--comfyui", "/nonexistent"],
     "is not a ComfyUI checkout"),
])
def test_bad_arguments_one_message(capsys, argv, message):
    from comfyui_clear.nodes import distill_cli

    assert distill_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_finds_comfyui_from_custom_nodes(tmp_path, monkeypatch):
    """The pack inside <ComfyUI>/custom_nodes/ needs no --comfyui; --comfyui wins; else COMFYUI_PATH."""
    from comfyui_clear.nodes import distill_cli

    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "comfy" / "model_patcher.py").write_text("")
    pack = comfy / "custom_nodes" / "ComfyUI-CLEAR"
    pack.mkdir(parents=True)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setattr(distill_cli, "PACK_ROOT", str(pack))
    assert distill_cli.find_comfyui(None) == str(comfy)
    monkeypatch.setattr(distill_cli, "PACK_ROOT", str(tmp_path / "elsewhere"))
    with pytest.raises(distill_cli.CLEARCommandLineError, match="--comfyui PATH"):
        distill_cli.find_comfyui(None)
    monkeypatch.setenv("COMFYUI_PATH", str(comfy))
    assert distill_cli.find_comfyui(None) == str(comfy)


def test_dataset_names_and_paths(comfyui, tmp_path):
    import folder_paths

    from comfyui_clear.nodes import distill_cli

    assert distill_cli.dataset_folder("mine") == os.path.join(folder_paths.get_output_directory(), "clear_teacher",
                                                              "mine")
    assert distill_cli.dataset_folder(str(tmp_path / "x")) == str(tmp_path / "x")


def test_ctrl_c_is_comfyuis_interrupt(comfyui):
    """First Ctrl-C sets ComfyUI's interrupt (the trainer checkpoints and stops at
    its next step), as does SIGTERM; a second Ctrl-C aborts; the previous
    handlers come back."""
    import comfy.model_management as mm

    from comfyui_clear.nodes import distill_cli

    before = signal.getsignal(signal.SIGINT)
    with distill_cli.interrupt_on_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(mm.InterruptProcessingException):
            mm.throw_exception_if_processing_interrupted()
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun stopping its workers: the interrupt again, no abort
        with pytest.raises(mm.InterruptProcessingException):
            mm.throw_exception_if_processing_interrupted()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def files(comfyui, tmp_path_factory):
    """Tiny model, tiny real text encoders, a prompt list; ComfyUI's loaders patched to accept them."""
    import _distill_cli_tiny as tiny

    base = tmp_path_factory.mktemp("distill_cli")
    monkeypatch = pytest.MonkeyPatch()
    tiny.install(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a busy machine (47 s -> 11 s here)
    prompts = base / "prompts.txt"
    prompts.write_text("# a comment line\n" + "\n".join(PROMPTS) + "\n\n")
    yield dict(base=base, model=tiny.write_tiny_flux(base / "flux_tiny.safetensors"),
               clip=tiny.write_tiny_text_encoders(str(base)), prompts=str(prompts))
    monkeypatch.undo()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(files):
    """teacher-data through the command line (in-process)."""
    from comfyui_clear.nodes import distill_cli

    folder = files["base"] / "teacher"
    argv = ["teacher-data", "--comfyui", os.environ["COMFYUI_PATH"], "--cpu", "--model", files["model"],
            "--clip", *files["clip"], "--prompts", files["prompts"], "--dataset", str(folder), "--count", "4",
            "--width", "128", "--height", "128", "--steps", "2", "--guidance", "3.5", "--seed", "11"]
    assert distill_cli.main(argv) == 0
    return folder


def test_teacher_data_end_to_end(files, dataset):
    """The folder holds what the node would write: the prompts in order, seeds
    seed + i, the run's settings, and the conditioning of ComfyUI's own text
    encoders as loaded from the files."""
    import comfy.sd

    from comfyui_clear.nodes.distill_data import TeacherDataset

    data = TeacherDataset(str(dataset))
    assert len(data) == 4 and data.family == "flux1" and tuple(data.latent_shape) == (16, 16, 16)
    clip = comfy.sd.load_clip(files["clip"], clip_type=comfy.sd.CLIPType.FLUX)
    for i in range(4):
        s = data[i]
        assert (s["prompt"], s["seed"], s["guidance"]) == (PROMPTS[i], 11 + i, 3.5)
        context, pooled = clip.encode_from_tokens(clip.tokenize(PROMPTS[i]), return_pooled=True)
        torch.testing.assert_close(s["context"].reshape(context.shape), context.float())
        torch.testing.assert_close(s["pooled"].reshape(pooled.shape), pooled.float())
        assert torch.isfinite(s["latent"]).all() and s["latent"].std() > 0


def test_teacher_data_wrong_text_encoder_count(files, capsys):
    from comfyui_clear.nodes import distill_cli

    argv = ["teacher-data", "--cpu", "--model", files["model"], "--clip", files["clip"][0],
            "--dataset", str(files["base"] / "unused")]
    assert distill_cli.main(argv) == 1
    assert "needs 2 text encoder file(s)" in capsys.readouterr().err


def test_missing_model_file(files, dataset, capsys):
    from comfyui_clear.nodes import distill_cli

    argv = ["train", "--cpu", "--model", "no_such_model.safetensors", "--dataset", str(dataset), "--output", "o"]
    assert distill_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "'no_such_model.safetensors' not found" in err and "models/diffusion_models" in err


def _read_weights(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def single_run(files, dataset):
    """train through the command line, one process, batch 2."""
    from comfyui_clear.nodes import distill_cli

    out = files["base"] / "single" / "tiny_clear"
    argv = ["train", "--cpu", "--model", files["model"], "--dataset", str(dataset), "--output", str(out),
            "--batch-size", "2", *TRAIN]
    assert distill_cli.main(argv) == 0
    return _read_weights(str(out) + ".safetensors")


def test_train_end_to_end(single_run):
    tensors, meta = single_run
    assert meta["clear.steps"] == "2" and meta["clear.family"] == "flux1" and meta["clear.rank"] == "4"
    assert any(k.endswith(".lora_up.weight") and v.abs().max() > 0 for k, v in tensors.items())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_weights(path, single_run):
    """Tolerance: float32 rounding of DDP's gradient all-reduce (sum order)
    through AdamW, whose first steps move each weight by about +-lr whatever
    its gradient's size, so an element whose gradient is near AdamW's eps
    (1e-8) turns a rounding difference into up to ~lr * 1e-2: measured at most
    2.1e-4 (one element in 1024; ComfyUI 0.3.64), relative norm 1e-4. Ranks
    that trained on the wrong samples differ by ~lr = 1e-2 on most elements."""
    tensors, meta = _read_weights(path)
    single, single_meta = single_run
    assert sorted(tensors) == sorted(single) and meta["clear.steps"] == single_meta["clear.steps"]
    for key, value in tensors.items():
        torch.testing.assert_close(value, single[key], rtol=0, atol=1e-3, msg=key)
        assert (value - single[key]).norm() <= 1e-3 * single[key].norm(), key


def _two_workers(argv, logs, **env):
    """Two processes of the command line (the tiny launcher) with the environment
    torchrun gives its workers (gloo on 127.0.0.1); their exit codes and output.
    Fresh processes, not forks of this one: autograd's worker threads do not
    survive a fork once this process has run a backward."""
    port = _free_port()
    procs = []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in range(2):
        worker_env = _env(COMFYUI_PATH=os.environ["COMFYUI_PATH"], RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          **env)
        with open(logs / f"rank{rank}.log", "w") as log:  # a file, not a pipe: a full pipe would stall a rank
            procs.append(subprocess.Popen([sys.executable, LAUNCHER, *argv], cwd=REPO, env=worker_env, stdout=log,
                                          stderr=subprocess.STDOUT))
    for p in procs:
        try:
            p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    output = "\n".join(f"--- rank {rank}:\n" + (logs / f"rank{rank}.log").read_text()[-3000:] for rank in range(2))
    return [p.returncode for p in procs], output


def test_two_processes_equal_one_at_twice_the_batch(files, dataset, single_run):
    """Two gloo processes with torchrun's environment, batch 1 each == one
    process at batch 2: the same trained weights after 2 steps. The command
    line sets up the process group, the trainer wraps its loss in DDP and
    shards the samples; rank 0 alone writes."""
    out = files["base"] / "workers" / "tiny_clear"
    argv = ["train", "--cpu", "--model", files["model"], "--dataset", str(dataset), "--output", str(out),
            "--batch-size", "1", *TRAIN]
    codes, output = _two_workers(argv, files["base"] / "workers_logs")
    assert codes == [0, 0], output
    assert sorted(os.listdir(out.parent)) == ["tiny_clear.safetensors", "tiny_clear.state.pt"]
    _assert_same_weights(str(out) + ".safetensors", single_run)


def test_an_interrupt_on_one_rank_stops_every_rank(files, dataset):
    """Ctrl-C reaching one torchrun worker before the other (here rank 1 alone
    sees ComfyUI's interrupt after its first step): both stop after the same
    step (a rank stopping alone would leave the other waiting in DDP's
    all-reduce) and rank 0 saves the checkpoint of that step."""
    out = files["base"] / "cancelled" / "tiny_clear"
    argv = ["train", "--cpu", "--model", files["model"], "--dataset", str(dataset), "--output", str(out),
            "--batch-size", "1", *TRAIN]
    codes, output = _two_workers(argv, files["base"] / "cancelled_logs", CLEAR_TEST_CANCEL_RANK="1")
    assert codes == [130, 130], output
    assert sorted(os.listdir(out.parent)) == ["tiny_clear.state.pt"]
    assert torch.load(str(out) + ".state.pt", weights_only=False)["step"] == 1


@pytest.mark.slow  # two fresh processes import torch and ComfyUI: about a minute on 2 busy cores
def test_torchrun_two_processes_equal_one_at_twice_the_batch(files, dataset, single_run):
    """The user's launch: a real torchrun --nproc_per_node 2 (gloo on 127.0.0.1)
    of the command line (tests/_distill_cli_tiny.py: it, with the tiny-model
    loaders), batch 1 per process == one process at batch 2."""
    out = files["base"] / "torchrun" / "tiny_clear"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), LAUNCHER,
           "train", "--cpu", "--model", files["model"], "--dataset", str(dataset), "--output", str(out),
           "--batch-size", "1", *TRAIN]
    r = subprocess.run(cmd, cwd=REPO, env=_env(COMFYUI_PATH=os.environ["COMFYUI_PATH"]), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "CLEAR Distill step 2/2" in r.stderr
    _assert_same_weights(str(out) + ".safetensors", single_run)


def test_ctrl_c_checkpoints_and_the_rerun_resumes(files, dataset, single_run, monkeypatch, capsys):
    """Ctrl-C after step 1 (a real SIGINT to this process, sent from the
    progress hook): the command stops with status 130 after saving a
    checkpoint and writes no weights; the same command again resumes and
    ends with the weights of the uninterrupted run."""
    from comfyui_clear.nodes import distill_cli

    def hook(label):
        def press_ctrl_c(value, total, preview=None, node_id=None):
            if value == 1:
                os.kill(os.getpid(), signal.SIGINT)
        return press_ctrl_c

    out = files["base"] / "interrupted" / "tiny_clear"
    argv = ["train", "--cpu", "--model", files["model"], "--dataset", str(dataset), "--output", str(out),
            "--batch-size", "2", *TRAIN]
    with monkeypatch.context() as m:
        m.setattr(distill_cli, "_progress_hook", hook)
        assert distill_cli.main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert sorted(os.listdir(out.parent)) == ["tiny_clear.state.pt"]
    assert torch.load(str(out) + ".state.pt", weights_only=True)["step"] == 1
    assert distill_cli.main(argv) == 0
    _assert_same_weights(str(out) + ".safetensors", single_run)


def test_text_encoder_types(files, monkeypatch, capsys):
    """FLUX.1: two files as DualCLIPLoader 'flux'; FLUX.2 (Klein, [dev]): one file
    as CLIPLoader 'flux2', or one clear error on a ComfyUI without that type."""
    import comfy.sd

    from comfyui_clear.nodes import distill_cli

    calls = []
    monkeypatch.setattr(comfy.sd, "load_clip", lambda ckpt_paths, **kw: calls.append((ckpt_paths, kw["clip_type"])))
    distill_cli.load_text_encoder(files["clip"], "flux1")
    assert calls == [(files["clip"], comfy.sd.CLIPType.FLUX)]
    with pytest.raises(distill_cli.CLEARCommandLineError, match="flux2 model needs 1 text encoder"):
        distill_cli.load_text_encoder(files["clip"], "flux2")
    if hasattr(comfy.sd.CLIPType, "FLUX2"):
        distill_cli.load_text_encoder(files["clip"][:1], "flux2")
        assert calls[-1] == (files["clip"][:1], comfy.sd.CLIPType.FLUX2)
    else:  # 0.3.64
        with pytest.raises(distill_cli.CLEARCommandLineError, match="no 'flux2' text encoder type"):
            distill_cli.load_text_encoder(files["clip"][:1], "flux2")


def test_model_by_name_in_models_folder(files, monkeypatch):
    """--model takes a file name of models/diffusion_models, as UNETLoader lists it."""
    import folder_paths

    from comfyui_clear.nodes import distill_cli

    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(files["base"])], folder_paths.supported_pt_extensions))
    assert distill_cli._resolve_file("diffusion_models", "flux_tiny.safetensors", "Diffusion model",
                                     "--model") == files["model"]


def test_train_defaults_are_the_nodes():
    """train's options default to CLEAR Distill's inputs (both from DistillSettings), every field mapped."""
    import dataclasses

    from comfyui_clear.nodes import distill_cli
    from comfyui_clear.nodes.distill import DistillSettings

    args = distill_cli.build_parser().parse_args(["train", "--model", "m", "--dataset", "d", "--output", "o"])
    assert dataclasses.asdict(distill_cli.settings_from_args(args)) == dataclasses.asdict(DistillSettings())
    args = distill_cli.build_parser().parse_args(["train", "--model", "m", "--output", "o", "--rank", "8",
                                                  "--loss-attn", "0.25", "--grad-accum", "4", "--seed", "3"])
    settings = distill_cli.settings_from_args(args)
    assert (settings.rank, settings.loss_attn, settings.grad_accum, settings.seed) == (8, 0.25, 4, 3)
