"""Training checkpoints: sharded model / optimiser / EMA through ``torch.distributed.checkpoint``,
plus the loop state and every rank's RNG states, written atomically.

Layout of ``OUTPUT_DIR/checkpoints/step-00000500/``::

    dcp/                    model (trainable parameters only) + optimiser + EMA, sharded (DCP)
    trainer_state.pt        step, data position, LR schedule, world size, config (rank 0)
    rng-rank00000.pt        torch / CUDA / numpy / python RNG states of each rank

Everything is written into ``.tmp-step-...`` first and renamed when complete, so a crash at any
moment leaves either the previous checkpoints or the new one, never half of one; the newest
``keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

__all__ = ["list_checkpoints", "latest_checkpoint", "checkpoint_damage", "newest_intact_checkpoint",
           "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state"]

_NAME = re.compile(r"^step-(\d{8})$")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # the frozen base is re-read from model.init_from


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it saves 'in a single process' whenever no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def checkpoint_damage(path: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a file missing, unreadable or shorter than
    its index says), or None when it is intact. Reads the small files and the DCP index, not the
    tensors, and gives the same answer on every rank."""
    path = Path(path)
    for name in ("trainer_state.pt", "rng-rank00000.pt"):
        try:
            torch.load(path / name, weights_only=False)
        except FileNotFoundError:
            return f"{name} is missing"
        except Exception as e:  # a truncated pickle or zip raises many kinds
            return f"{name} is unreadable ({type(e).__name__})"
    try:
        metadata = dcp.FileSystemReader(str(path / "dcp")).read_metadata()
    except FileNotFoundError:
        return "dcp/.metadata is missing"
    except Exception as e:
        return f"dcp/.metadata is unreadable ({type(e).__name__})"
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, needed in sorted(sizes.items()):
        file = path / "dcp" / name
        if not file.is_file():
            return f"dcp/{name} is missing"
        if file.stat().st_size < needed:
            return f"dcp/{name} is truncated ({file.stat().st_size} of {needed} bytes)"
    return None


def newest_intact_checkpoint(root: str | Path, report=print) -> Path | None:
    """The newest checkpoint that is intact; each damaged newer one is reported (named, with what is
    wrong) and skipped. None when there are none at all; RuntimeError when every one is damaged."""
    damaged = []
    for _, path in reversed(list_checkpoints(root)):
        why = checkpoint_damage(path)
        if why is None:
            if damaged:
                report(f"resuming from {path}, the newest intact checkpoint")
            return path
        report(f"checkpoint {path} is damaged: {why}; trying the one before")
        damaged.append(f"{path.name} ({why})")
    if damaged:
        raise RuntimeError(f"no intact checkpoint in {root}: {', '.join(damaged)}; delete the damaged folders to "
                           "start again, or restore one")
    return None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _app_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None):
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    return {"model": model_sd, "optim": optim_sd, "ema": dict(ema or {})}


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over from a crash during an earlier save
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    with _quiet_single_process():
        dcp.save(_app_state(model, optimizer, ema), checkpoint_id=str(tmp / "dcp"))
    torch.save(rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    _barrier()
    if rank == 0:
        if final.exists():  # the same step saved before a crash and then redone
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Collective. Loads model / optimiser / EMA in place and this rank's RNG states; returns the
    loop state (``trainer_state.pt``)."""
    path = Path(path)
    state = _app_state(model, optimizer, ema)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path / "dcp"))
    result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k in trainable]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {path} does not fit the model built from the config: missing "
                           f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")
    if ema is not None:
        for k, v in state["ema"].items():
            if ema[k] is not v:
                ema[k].copy_(v)
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    rng = path / f"rng-rank{_rank():05d}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return trainer_state
