"""The `helios` command line: generate, eval, serve, train."""

from __future__ import annotations

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
    then: list[str] = typer.Option([], "--then", help="Prompt change 'CHUNK:prompt' (repeatable)."),
    blend: int = typer.Option(0, "--blend", help="Blend prompt changes over this many chunks."),
    fps: int = typer.Option(24, "--fps"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16"),
) -> None:
    """Generate a video from a prompt (and optionally an image or a video)."""
    import torch

    from helios.engine.components import ModelFolderError
    from helios.engine.pipeline import InputError, load_pipeline, plan_frames
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
    except (InputError, PromptScheduleError) as e:
        fail(str(e))
    model = model or default_model()
    device = pick_device(device)
    torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        fail(f"--dtype must be auto, float32 or bfloat16, got {dtype}")
    try:
        pipe = load_pipeline(model, dtype=torch_dtype, device=device)
    except (ModelFolderError, ValueError) as e:
        fail(str(e))
    height, width = height or pipe.default_size[0], width or pipe.default_size[1]
    try:
        start = _read_start(image, video, height, width)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if plan.note:
        typer.echo(plan.note, err=True)

    try:
        settings = pipe.resolve_settings(preset, steps=steps, guidance_scale=guidance)
    except (InputError, ValueError) as e:
        fail(str(e))
    per_chunk = settings.total_steps
    bar = _progress(plan.chunks * per_chunk + (per_chunk if settings.amplify_first_chunk else 0))
    t0 = time.perf_counter()
    written = 0
    try:
        from helios.engine.video_io import VideoWriter

        with VideoWriter(out, fps=fps) as writer:
            chunks = pipe.stream(schedule, num_frames=frames, height=height, width=width, settings=settings,
                                 negative_prompt=negative, seed=seed,
                                 on_step=lambda *_: bar.update(1), **start)
            for chunk in chunks:
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


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)


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


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
