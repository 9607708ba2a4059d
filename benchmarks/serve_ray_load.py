"""Load test of helios.serve.ray on the CPU: N clients against CPU engine replicas of the bundled model.

    python benchmarks/serve_ray_load.py --clients 20 --engines 2 --minutes 10 --out benchmarks/results/x.json

Each client loops over a mix of jobs until the time is up: an HTTP job polled to the end and its mp4
checked; a live WebSocket session steered mid-stream and read to the end (every frame counted); a
live session whose client hangs up after the first chunk; an HTTP job cancelled while it runs; a
video made through /v1/videos with the openai client. At the end: every job's final state, jobs
"lost" (no final state, or a state that contradicts what the client did), finished videos that are
not complete, and the replicas' memory (RSS and private/USS) when idle before and after the load.
"Idle before" is measured after warm-up jobs (each kind of request, once per engine replica), so
that model caches, thread pools, allocator pools and Ray's streaming buffers exist by then.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

SIZE = {"height": 64, "width": 64, "steps": 1}
FINAL = ("done", "stopped", "cancelled", "failed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_processes() -> list[psutil.Process]:
    """The application's Ray worker processes (engine replicas and the ingress)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:helios:" in part for part in (p.info["cmdline"] or [])):
            out.append(p)
    return out


def memory() -> dict:
    """RSS and private memory (USS) of the replicas, in all and per process."""
    rss = uss = 0
    each = {}
    for p in replica_processes():
        try:
            info = p.memory_full_info()
            name = next(part for part in p.cmdline() if "ServeReplica:helios:" in part).split(":")[-1]
        except (psutil.NoSuchProcess, psutil.AccessDenied, StopIteration):
            continue
        rss, uss = rss + info.rss, uss + info.uss
        each[f"{name} (pid {p.pid})"] = round(info.uss / 2**20, 1)
    return {"rss_mib": round(rss / 2**20, 1), "private_mib": round(uss / 2**20, 1), "private_by_process": each}


class Client:
    def __init__(self, url: str, index: int, results: list, lock: threading.Lock, tmp: Path):
        self.url, self.index, self.results, self.lock, self.tmp = url, index, results, lock, tmp
        self.http = httpx.Client(base_url=url, timeout=120)
        self.http.headers["X-Helios-Client"] = self.http.get("/api/config").json()["client"]
        self.rng = random.Random(index)

    def record(self, kind: str, state: str, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.results.append({"client": self.index, "kind": kind, "state": state, "ok": ok, "detail": detail})

    def poll(self, job: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.http.get(f"/api/jobs/{job}").json()
            if status.get("state") in FINAL or time.monotonic() > deadline:
                return status
            time.sleep(0.5)

    def complete_video(self, job: str, frames: int) -> bool:
        from helios.engine.video_io import video_info

        r = self.http.get(f"/api/jobs/{job}/video")
        if r.status_code != 200:
            return False
        path = self.tmp / f"{self.index}-{job[-8:]}.mp4"
        path.write_bytes(r.content)
        try:
            return video_info(path).frames == frames
        finally:
            path.unlink(missing_ok=True)

    # ---- the mix ------------------------------------------------------------------------------
    def http_job(self) -> None:
        frames = self.rng.choice([33, 66, 99])
        r = self.http.post("/api/jobs", json={"prompt": "a red circle", "frames": frames, **SIZE})
        if r.status_code != 202:
            return self.record("http", f"refused {r.status_code}", r.status_code in (429, 503), r.text[:200])
        job = r.json()
        end = self.poll(job["job"])
        ok = end.get("state") == "done" and self.complete_video(job["job"], job["frames_total"])
        self.record("http", end.get("state", "?"), ok, end.get("error") or "")

    def http_cancel(self) -> None:
        r = self.http.post("/api/jobs", json={"prompt": "to be cancelled", "frames": 33 * 8, **SIZE})
        if r.status_code != 202:
            return self.record("cancel", f"refused {r.status_code}", r.status_code in (429, 503), r.text[:200])
        job = r.json()["job"]
        time.sleep(self.rng.uniform(0.5, 4))
        self.http.delete(f"/api/jobs/{job}")
        end = self.poll(job)
        # Cancelled (or, if it was quicker than the cancel, done): never failed, never stuck.
        self.record("cancel", end.get("state", "?"), end.get("state") in ("cancelled", "done"), end.get("error") or "")

    def live(self, steer: bool, hang_up: bool) -> None:
        from websockets.sync.client import connect

        kind = "hang-up" if hang_up else "live"
        frames_total = 33 * self.rng.choice([2, 3, 4])
        headers = {"X-Helios-Client": self.http.headers["X-Helios-Client"]}
        with connect(self.url.replace("http", "ws") + "/ws", additional_headers=headers, max_size=None,
                     open_timeout=60) as ws:
            ws.send(json.dumps({"type": "start", "prompt": "a red circle", "frames": frames_total, **SIZE}))
            first = json.loads(ws.recv(timeout=120))
            if first["type"] != "accepted":
                return self.record(kind, f"refused {first.get('status')}", first.get("status") in (429, 503),
                                   first.get("error", ""))
            job, frames, steered = first["job"], 0, False
            while True:
                m = ws.recv(timeout=900)
                if isinstance(m, bytes):
                    frames += 1
                    if hang_up and frames >= 33:
                        break
                    if steer and not steered and frames >= 33:
                        ws.send(json.dumps({"type": "steer", "prompt": "a blue square"}))
                        steered = True
                    continue
                m = json.loads(m)
                if m["type"] == "end":
                    ok = m["state"] == "done" and frames == m["frames_total"]
                    return self.record(kind, m["state"], ok, m.get("error") or "")
        end = self.poll(job, timeout=60)  # the hang-up: the job must end as cancelled
        self.record(kind, end.get("state", "?"), end.get("state") in ("cancelled", "done"), end.get("error") or "")

    def openai_video(self) -> None:
        import warnings

        import openai

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120,
                               default_headers={"X-Helios-Client": self.http.headers["X-Helios-Client"]})
        try:
            video = client.videos.create(prompt="a red circle", seconds="1", size="64x64", extra_body={"steps": 1})
        except openai.APIStatusError as e:
            return self.record("openai", f"refused {e.status_code}", e.status_code in (429, 503), str(e)[:200])
        deadline = time.monotonic() + 900
        while (video := client.videos.retrieve(video.id)).status not in ("completed", "failed"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        ok = video.status == "completed" and self.complete_video(video.id, 33)
        self.record("openai", video.status, ok, str(video.error or ""))

    def run(self, until: float) -> None:
        actions = [self.http_job, self.http_cancel, lambda: self.live(True, False), lambda: self.live(False, True),
                   self.openai_video]
        while time.monotonic() < until:
            action = self.rng.choice(actions)
            try:
                action()
            except Exception as e:  # a client-side error is a lost job
                self.record("error", type(e).__name__, False, str(e)[:300])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import ray
    from ray import serve

    from helios.serve.limits import Limits
    from helios.serve.ray import build_app

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="helios-load-"))
    ray.init(num_cpus=args.engines + 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    limits = Limits(max_queue=64, stall_timeout_s=120)
    serve.run(build_app(engines=args.engines, threads=1, workdir=str(workdir), limits=limits),
              name="helios", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    results: list = []
    lock = threading.Lock()
    try:
        # "Idle" is the server once it has served each kind of request on each engine (model caches,
        # thread pools, allocator pools, Ray's streaming buffers all exist by then).
        warm = Client(url, -1, results, lock, workdir)
        for _ in range(args.engines):
            for action in (warm.http_job, lambda: warm.live(True, False), lambda: warm.live(False, True),
                           warm.http_cancel, warm.openai_video):
                action()
        time.sleep(5)
        idle_before = memory()
        print(f"idle before: {idle_before}", flush=True)
        t0 = time.monotonic()
        until = t0 + args.minutes * 60
        clients = [Client(url, i, results, lock, workdir) for i in range(args.clients)]
        threads = [threading.Thread(target=c.run, args=(until,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        peak = {k: idle_before[k] for k in ("rss_mib", "private_mib")}
        while any(t.is_alive() for t in threads):
            time.sleep(15)
            now = memory()
            peak = {k: max(peak[k], now[k]) for k in ("rss_mib", "private_mib")}
            with lock:
                counts = Counter(r["state"] for r in results)
            print(f"{time.monotonic() - t0:6.0f} s  {dict(counts)}  {now['rss_mib']} / {now['private_mib']} MiB",
                  flush=True)
        elapsed = time.monotonic() - t0
        time.sleep(10)  # the finished jobs' memory goes back (the workers' gc runs after each job)
        idle_after = memory()
    finally:
        serve.shutdown()
        ray.shutdown()
    load = [r for r in results if r["client"] >= 0]
    summary = {
        "machine": f"{os.cpu_count()} CPU cores (shared), {round(psutil.virtual_memory().total / 2**30)} GiB",
        "date": time.strftime("%Y-%m-%d"), "clients": args.clients, "warm_up_jobs": len(results) - len(load),
        "engines": args.engines,
        "seconds": round(elapsed), "jobs": len(load), "by_kind": dict(Counter(r["kind"] for r in load)),
        "states": dict(Counter(r["state"] for r in load)),
        "lost_or_wrong": [r for r in load if not r["ok"]],
        "done_videos_complete": sum(1 for r in load if r["ok"] and r["state"] in ("done", "completed")),
        "memory": {"idle_before": idle_before, "peak": peak, "idle_after": idle_after,
                   "rss_growth": round(idle_after["rss_mib"] / idle_before["rss_mib"] - 1, 4),
                   "private_growth": round(idle_after["private_mib"] / idle_before["private_mib"] - 1, 4)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "lost_or_wrong"}, indent=1))
    print(f"lost or wrong: {len(summary['lost_or_wrong'])}")
    sys.exit(1 if summary["lost_or_wrong"] else 0)


if __name__ == "__main__":
    main()
