"""Command line for CLEAR distillation, for runs left going overnight without
the ComfyUI server: generate the teacher's data, then train.

    python -m comfyui_clear.nodes.distill_cli teacher-data --model flux1-dev.safetensors \\
        --clip clip_l.safetensors t5xxl_fp16.safetensors --count 2000 --dataset my_flux
    python -m comfyui_clear.nodes.distill_cli train --model flux1-dev.safetensors \\
        --weight-dtype fp8_e4m3fn --dataset my_flux --output clear_local_8_myflux
    torchrun --nproc_per_node 4 custom_nodes/ComfyUI-CLEAR/nodes/distill_cli.py train ...

It runs as a module of the installed package or as a file inside
custom_nodes/<pack>/. Models load with ComfyUI's own loaders (UNETLoader,
DualCLIPLoader / CLIPLoader, VAELoader) from the ComfyUI checkout the pack sits
in (or --comfyui / COMFYUI_PATH); the work is done by the same functions the
nodes call (distill_data.generate_teacher_data, distill.distill). Under torchrun
each process trains on its own GPU as data parallel (DDP inside distill());
rank 0 writes files and prints progress. Ctrl-C stops after the current step
(the trainer saves a checkpoint first); a second Ctrl-C aborts at once."""

if __name__ == "__main__" and not __package__:
    # Run as a file (python custom_nodes/ComfyUI-CLEAR/nodes/distill_cli.py): the
    # pack's folder name need not be an identifier, so import the pack under its
    # package name from its location, and keep this folder (nodes/, whose module
    # names ComfyUI's own top-level modules could collide with) off sys.path.
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.abspath(__file__))
    _root = os.path.dirname(_here)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    if "comfyui_clear" not in sys.modules:
        _spec = importlib.util.spec_from_file_location(
            "comfyui_clear", os.path.join(_root, "__init__.py"), submodule_search_locations=[_root])
        _pack = importlib.util.module_from_spec(_spec)
        sys.modules["comfyui_clear"] = _pack
        _spec.loader.exec_module(_pack)
    from comfyui_clear.nodes.distill_cli import main as _main

    sys.exit(_main())

import argparse
import inspect
import logging
import os
import signal
import sys
from contextlib import contextmanager

from .runtime import ui_error

log = logging.getLogger("clear.distill_cli")
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # UNETLoader's choices
TEACHER_FOLDER = "clear_teacher"  # <ComfyUI output>/clear_teacher/<dataset name>, as the node


@ui_error
class CLEARCommandLineError(ValueError):
    """A command-line setting that cannot work; the message says which and how to fix it."""


# ---------------------------------------------------------------- arguments

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_clear.nodes.distill_cli",
        description="Distil CLEAR attention weights for your own FLUX-family model, on ComfyUI's model loading. "
                    "First 'teacher-data' (the unpatched model's samples), then 'train'. Several GPUs: "
                    "torchrun --nproc_per_node N <this> train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{teacher-data,train}", required=True)

    def common(p):
        p.add_argument("--comfyui", metavar="PATH",
                       help="ComfyUI checkout to load models with (default: the one this pack is installed in "
                            "under custom_nodes/, else $COMFYUI_PATH)")
        p.add_argument("--model", required=True, metavar="FILE",
                       help="diffusion model: a file in models/diffusion_models (as UNETLoader lists it) or a path")
        p.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="default",
                       help="as UNETLoader's weight_dtype: fp8_e4m3fn stores the frozen base in fp8")
        p.add_argument("--cpu", action="store_true", help="run on the CPU (automatic when there is no CUDA)")
        p.add_argument("--dataset", default="flux_teacher", metavar="NAME_OR_FOLDER",
                       help=f"teacher data folder: a name (in ComfyUI's output/{TEACHER_FOLDER}/) or a path")
        p.add_argument("--seed", type=int, default=0, help="base seed (sample i uses seed + i; training is "
                                                           "deterministic in it)")
        p.add_argument("-v", "--verbose", action="store_true", help="ComfyUI's debug logging")

    data = sub.add_parser(
        "teacher-data", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="sample the unpatched model over a prompt list and save latents + text conditioning",
        description="Sample the unpatched model (the teacher) over a prompt list at the training resolution and "
                    "save what training needs (latent, text conditioning) as one safetensors file per sample. "
                    "Resumable: run it again to continue or to grow --count.")
    common(data)
    data.add_argument("--clip", nargs="+", required=True, metavar="FILE",
                      help="text encoder file(s) in models/text_encoders or paths: FLUX.1 clip_l and t5xxl "
                           "(DualCLIPLoader 'flux'); FLUX.2 one file, Klein its Qwen3, [dev] its Mistral "
                           "(CLIPLoader 'flux2')")
    data.add_argument("--prompts", metavar="FILE",
                      help="prompt list, one per line, '#' lines skipped; sample i uses prompt i modulo the "
                           "list's length (default: the list shipped with the pack)")
    data.add_argument("--count", type=int, default=1000, help="number of samples (prompts are cycled)")
    data.add_argument("--width", type=int, default=1024, help="training resolution, pixels")
    data.add_argument("--height", type=int, default=1024, help="training resolution, pixels")
    data.add_argument("--steps", type=int, default=20,
                      help="sampling steps per sample: 20 for FLUX.1-dev and FLUX.2 [dev], 4 for schnell and Klein")
    data.add_argument("--guidance", type=float, default=3.5,
                      help="FLUX guidance (ignored by models without a guidance input: schnell, Klein)")
    data.add_argument("--sampler", default="euler", help="ComfyUI sampler name")
    data.add_argument("--scheduler", default="simple", help="ComfyUI scheduler name")

    train = sub.add_parser(
        "train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="distil CLEAR attention into the model's attention weights from teacher data",
        description="Train CLEAR attention weights (the authors' parameter set, LoRA or full) against the same "
                    "model with dense attention. Writes models/clear/<output>.safetensors, which the CLEAR "
                    "Attention Patch loads; checkpoints to <output>.state.pt and resumes from it. Several GPUs: "
                    "torchrun --nproc_per_node N ... train ...: the batch size is per GPU.")
    common(train)
    train.add_argument("--output", required=True, metavar="NAME",
                       help="output file name in models/clear (.safetensors added); a path with a folder is "
                            "used as given")
    train.add_argument("--vae", metavar="FILE", help="VAE (models/vae or a path): enables the previews")
    train.add_argument("--window-size", type=int, default=16, help="CLEAR radius in latent tokens")
    train.add_argument("--down-factor", type=int, default=1, help="CLEAR key pooling factor d (1: none)")
    train.add_argument("--mode", choices=("lora", "full"), default="lora", help="LoRA adapters or full weights")
    train.add_argument("--rank", type=int, default=64, help="LoRA rank")
    train.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    train.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    train.add_argument("--batch-size", type=int, default=1, help="samples per step per GPU")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--optimizer", choices=("prodigy", "adamw", "adamw8bit"), default="prodigy",
                       help="Prodigy (the authors' choice, needs prodigyopt), AdamW, or 8-bit AdamW (bitsandbytes)")
    train.add_argument("--learning-rate", type=float, default=1.0, help="1.0 for Prodigy; ~1e-4 for AdamW")
    train.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    train.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    train.add_argument("--loss-fm", type=float, default=1.0, help="weight of the flow-matching loss")
    train.add_argument("--loss-distill", type=float, default=0.5, help="weight of the student-vs-teacher loss")
    train.add_argument("--loss-attn", type=float, default=0.5, help="weight of the attention-output loss")
    train.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    train.add_argument("--preview-every", type=int, default=250, help="steps between previews (needs --vae)")
    train.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    return parser


def _check_args(args):
    """Range checks argparse cannot express, each one clear message."""
    positive = ["count", "width", "height", "steps"] if args.command == "teacher-data" else [
        "window_size", "down_factor", "rank", "steps", "batch_size", "grad_accum", "checkpoint_every",
        "preview_every"]
    for name in positive:
        if getattr(args, name) < 1:
            raise CLEARCommandLineError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    if args.command == "teacher-data":
        if args.width % 16 or args.height % 16:
            raise CLEARCommandLineError(f"--width and --height must be multiples of 16 (FLUX's latent patches); "
                                        f"got {args.width}x{args.height}.")
        if len(args.clip) > 2:
            raise CLEARCommandLineError("--clip takes one text encoder file (FLUX.2) or two (FLUX.1: clip_l and "
                                        f"t5xxl); got {len(args.clip)}.")
    else:
        for name in ("learning_rate", "loss_fm", "loss_distill", "loss_attn", "weight_decay", "grad_clip"):
            if getattr(args, name) < 0:
                raise CLEARCommandLineError(f"--{name.replace('_', '-')} cannot be negative.")


# ---------------------------------------------------------------- ComfyUI

def find_comfyui(explicit=None):
    """The ComfyUI checkout: --comfyui, else the one whose custom_nodes/ holds
    this pack, else $COMFYUI_PATH."""
    def is_comfyui(path):
        return bool(path) and os.path.isfile(os.path.join(path, "comfy", "model_patcher.py"))

    if explicit:
        if not is_comfyui(explicit):
            raise CLEARCommandLineError(f"--comfyui {explicit} is not a ComfyUI checkout (no comfy/model_patcher.py); "
                                        "pass the folder that holds ComfyUI's main.py.")
        return os.path.abspath(explicit)
    parent = os.path.dirname(PACK_ROOT)
    if os.path.basename(parent) == "custom_nodes" and is_comfyui(os.path.dirname(parent)):
        return os.path.dirname(parent)
    env = os.environ.get("COMFYUI_PATH")
    if is_comfyui(env):
        return os.path.abspath(env)
    raise CLEARCommandLineError(
        "ComfyUI not found: this pack is not inside a ComfyUI's custom_nodes/ folder and COMFYUI_PATH is "
        f"{'not a ComfyUI checkout' if env else 'not set'}. Pass --comfyui PATH (the folder with ComfyUI's main.py).")


def setup_comfyui(path, cpu):
    """Make ComfyUI importable as its main.py would set it up, without parsing
    our command line: default args (plus --cpu), model folders incl.
    extra_model_paths.yaml, models/clear registered."""
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)  # comfy.cli_args parses sys.argv at import otherwise
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True  # read when comfy.model_management is imported
    import comfy.model_management  # noqa: F401
    if cpu and comfy.model_management.get_torch_device().type != "cpu":
        raise CLEARCommandLineError("ComfyUI was already set up for a GPU in this process; --cpu cannot apply.")
    import utils.install_util  # noqa: F401  ComfyUI's utils package before comfy/utils.py shadows it (main.py does so)
    import folder_paths

    extra = os.path.join(path, "extra_model_paths.yaml")
    if os.path.isfile(extra):
        import utils.extra_config

        utils.extra_config.load_extra_path_config(extra)
    from . import weights

    weights.register_model_folder()
    return folder_paths


def _resolve_file(folder_key, name, what, option):
    import folder_paths

    if os.path.isfile(name):
        return os.path.abspath(name)
    path = folder_paths.get_full_path(folder_key, name)
    if path is None:
        raise CLEARCommandLineError(
            f"{what} '{name}' not found: {option} takes a path or a file name in ComfyUI's models/{folder_key} "
            f"({', '.join(folder_paths.get_folder_paths(folder_key)) or 'no folder registered'}).")
    return path


def dataset_folder(name):
    """A path as given; a bare name inside <ComfyUI output>/clear_teacher/ (the node's default)."""
    if os.sep in name or (os.altsep and os.altsep in name) or name in (".", "..") or os.path.isabs(name):
        return os.path.abspath(name)
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), TEACHER_FOLDER, name)


def load_model(name, weight_dtype):
    """The diffusion model as UNETLoader loads it."""
    import comfy.sd
    import torch

    options = {}
    if weight_dtype in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
        options["dtype"] = torch.float8_e4m3fn
        if weight_dtype == "fp8_e4m3fn_fast":
            options["fp8_optimizations"] = True
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    path = _resolve_file("diffusion_models", name, "Diffusion model", "--model")
    log.info("loading %s", path)
    return comfy.sd.load_diffusion_model(path, model_options=options)


def family_of(model):
    from .clear_patch import _flux_model, flux_family

    return flux_family(_flux_model(model))


CLIP_TYPES = {"flux1": ("flux", 2, "clip_l and t5xxl"), "flux2": ("flux2", 1, "its Qwen3 (Klein) or Mistral ([dev])")}


def load_text_encoder(names, family):
    """The text encoder(s) as DualCLIPLoader ('flux') / CLIPLoader ('flux2') load them."""
    import comfy.sd
    import folder_paths

    if family not in CLIP_TYPES:
        raise CLEARCommandLineError(f"Teacher data for a {family} model is not supported (FLUX.1 and FLUX.2 are).")
    type_name, count, recipe = CLIP_TYPES[family]
    if len(names) != count:
        raise CLEARCommandLineError(f"A {family} model needs {count} text encoder file(s) for --clip: {recipe}; "
                                    f"got {len(names)}.")
    clip_type = getattr(comfy.sd.CLIPType, type_name.upper(), None)
    if clip_type is None:
        raise CLEARCommandLineError(f"This ComfyUI has no '{type_name}' text encoder type; update ComfyUI.")
    paths = [_resolve_file("text_encoders", n, "Text encoder", "--clip") for n in names]
    log.info("loading text encoder(s) %s", ", ".join(paths))
    return comfy.sd.load_clip(ckpt_paths=paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=clip_type)


def load_vae(name):
    """As VAELoader loads a file."""
    import comfy.sd
    import comfy.utils

    path = _resolve_file("vae", name, "VAE", "--vae")
    sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    vae.throw_exception_if_invalid()
    return vae


# ---------------------------------------------------------------- processes

def distributed_context():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def distributed(cpu):
    """Under torchrun: this process's GPU (cuda:LOCAL_RANK, set before ComfyUI
    picks its device) and the process group (NCCL on CUDA, gloo on the CPU),
    destroyed on the way out whatever happens. Yields (rank, world size)."""
    rank, world, local_rank = distributed_context()
    if world == 1:
        yield rank, world
        return
    import torch
    import torch.distributed as dist

    options = {"backend": "gloo"}
    if not cpu:
        if local_rank >= torch.cuda.device_count():
            raise CLEARCommandLineError(
                f"torchrun started process {local_rank} on this machine, which has {torch.cuda.device_count()} "
                "GPU(s): set --nproc_per_node to the number of GPUs (or fewer).")
        torch.cuda.set_device(local_rank)
        options = {"backend": "nccl"}
        if "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3: bind NCCL to it
            options["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(**options)
    try:
        yield rank, world
    finally:
        dist.destroy_process_group()


def _console(rank, verbose):
    """Rank 0 logs at INFO with a console progress line; other ranks warnings only."""
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s %(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S")


def _progress_hook(label):
    """ComfyUI's global ProgressBar hook -> one console line (previews are for the UI)."""
    def hook(value, total, preview=None, node_id=None):
        if sys.stderr.isatty():  # one line, rewritten
            sys.stderr.write(f"\r{label}: {value}/{total}" + ("\n" if value >= total else ""))
        else:  # a log file: a line per update (ComfyUI's ProgressBar throttles them)
            sys.stderr.write(f"{label}: {value}/{total}\n")
        sys.stderr.flush()
    return hook


@contextmanager
def interrupt_on_ctrl_c():
    """Ctrl-C (SIGINT) or SIGTERM (what torchrun sends its workers when it is
    stopped) -> ComfyUI's interrupt, which the trainer and the sampler honour at
    their next step (the trainer saves a checkpoint first). A second Ctrl-C
    aborts at once; SIGTERM never does (under torchrun a Ctrl-C brings both)."""
    import comfy.model_management

    pressed = []

    def handler(signum, frame):
        if signum == signal.SIGINT and pressed:
            raise KeyboardInterrupt
        if not pressed:
            sys.stderr.write("\nStopping at the next step (training saves a checkpoint); Ctrl-C again to abort.\n")
        pressed.append(signum)
        comfy.model_management.interrupt_current_processing(True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- commands

def run_teacher_data(args, folder_paths, world):
    from . import distill_data

    if world > 1:
        raise CLEARCommandLineError("teacher-data runs in one process, on one GPU; start it without torchrun.")
    text = ""
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CLEARCommandLineError(
                f"Cannot read the prompt list --prompts {args.prompts}: {e.strerror}.") from None
        if not distill_data.prompt_list(text):
            raise CLEARCommandLineError(f"The prompt list {args.prompts} has no prompts (one per line).")
    prompt_list = distill_data.prompt_list(text)  # empty: the list shipped with the pack
    model = load_model(args.model, args.weight_dtype)
    clip = load_text_encoder(args.clip, family_of(model))
    folder = dataset_folder(args.dataset)
    out = distill_data.generate_teacher_data(
        model, clip, prompt_list, folder, args.count, args.width, args.height, args.steps, args.guidance,
        args.seed, sampler_name=args.sampler, scheduler=args.scheduler)
    log.info("teacher data: %s", out)
    return out


def settings_from_args(args):
    from .distill import DistillSettings

    return DistillSettings(
        window_size=args.window_size, down_factor=args.down_factor, mode=args.mode, rank=args.rank,
        alpha=args.alpha, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        optimizer=args.optimizer, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, loss_fm=args.loss_fm, loss_distill=args.loss_distill, loss_attn=args.loss_attn,
        checkpoint_every=args.checkpoint_every, preview_every=args.preview_every, seed=args.seed)


def run_train(args, folder_paths, world):
    from . import distill, distill_data

    dataset = distill_data.TeacherDataset(dataset_folder(args.dataset))
    model = load_model(args.model, args.weight_dtype)
    vae = load_vae(args.vae) if args.vae else None
    result = distill.distill(model, dataset, settings_from_args(args), args.output, resume=not args.no_resume,
                             vae=vae)
    log.info("trained weights: %s (%d steps, final loss %.6g)", result.path, result.steps, result.final_loss)
    return result


def main(argv=None):
    """Returns the exit status: 0 done, 1 a setting to fix, 130 interrupted.
    ``argv`` None: the process's command line, and logging to the console (a
    caller passing ``argv`` keeps its own logging)."""
    args = build_parser().parse_args(argv)
    rank, world, _ = distributed_context()
    if argv is None:
        _console(rank, args.verbose)
    try:
        _check_args(args)
        import torch

        cpu = args.cpu or not torch.cuda.is_available()
        comfyui = find_comfyui(args.comfyui)
        with distributed(cpu) as (rank, world):
            folder_paths = setup_comfyui(comfyui, cpu)
            import comfy.utils

            hook = comfy.utils.PROGRESS_BAR_HOOK
            if rank == 0:
                comfy.utils.set_progress_bar_global_hook(_progress_hook(args.command))
            try:
                with interrupt_on_ctrl_c():
                    run = run_teacher_data if args.command == "teacher-data" else run_train
                    run(args, folder_paths, world)
            finally:
                comfy.utils.set_progress_bar_global_hook(hook)
    except CLEARCommandLineError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\naborted.\n")
        return 130
    except BaseException as e:
        if type(e).__name__ == "InterruptProcessingException":
            sys.stderr.write("\nstopped; run the same command again to resume.\n")
            return 130
        if type(e).__module__ == "builtins" and type(e).__name__.startswith("CLEAR"):  # the pack's user errors
            sys.stderr.write(f"error: {e}\n")
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
