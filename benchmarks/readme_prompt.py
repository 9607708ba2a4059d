"""The README's command, run as a user runs it, and what it draws: `helios generate PROMPT --out circles.mp4`
with the bundled model and its defaults, the video scored against the prompt (helios.eval.caption_adherence)
and every 12th frame as a picture for the README.

    python benchmarks/readme_prompt.py --json benchmarks/results/.../readme-prompt-adherence.json \
        --png docs/readme-prompt.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROMPT = "two red circles bouncing on a blue background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True, help="where the scores go")
    ap.add_argument("--png", type=Path, required=True, help="where the picture goes")
    ap.add_argument("--every", type=int, default=12, help="every n-th frame in the picture")
    args = ap.parse_args()
    from PIL import Image

    from helios.engine.video_io import read_video
    from helios.eval.metrics import caption_adherence

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "circles.mp4"
        command = [sys.executable, "-m", "helios.cli", "generate", PROMPT, "--out", str(video)]
        subprocess.run(command, check=True)  # the CLI's own progress shows on the terminal
        frames = read_video(video).numpy()
    scores = caption_adherence(frames, PROMPT)
    record = {"command": f'helios generate "{PROMPT}" --out circles.mp4 (the bundled model and its defaults)',
              "machine": f"{platform.machine()} CPU, {datetime.date.today().isoformat()}",
              "frames": int(len(frames)), **{k: float(v) for k, v in scores.items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(frames[::args.every]), axis=1)).save(args.png)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
