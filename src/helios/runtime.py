"""Process setup shared by generation, serving and training: devices and dtypes, the process group, seeds.

Nothing here is a model: `cli`, `serve` and `train` come here for the process, and to `helios.model` only
for models.
"""

from __future__ import annotations

import atexit
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("helios")

__all__ = ["DTYPES", "broadcast_seed", "init_distributed", "launched_world_size", "local_device",
           "no_multicast_env", "resolve_dtype", "seeded_generator", "use_deterministic_kernels"]

DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """--dtype for a device: auto is bfloat16 on CUDA, float32 elsewhere."""
    dtypes = {"auto": torch.bfloat16 if str(device).startswith("cuda") else torch.float32,
              "float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name}")
    return dtypes[name]


def local_device(preference: str = "auto") -> torch.device:
    """This process's device for "auto" (CUDA when available), "cuda" or "cpu": under torchrun cuda:$LOCAL_RANK."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (well mixed: neighbouring keys are unrelated)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def no_multicast_env() -> None:
    """NVLink multicast (NVLS) off for NCCL and symmetric memory: the machines are shared, and
    multicast objects are a scarce per-node resource. Must run before NCCL is initialised."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"


def launched_world_size() -> int:
    """The world size torchrun launched this process with (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | None = None, *, rank: int | None = None, world_size: int | None = None,
                     init_method: str | None = None) -> torch.device:
    """Initialise the default process group and return this rank's device.

    device: "cuda" (NCCL, one GPU per local rank) or "cpu" (gloo, for tests); default cuda if available.
    Without rank/world_size the group comes from torchrun's environment and rank r uses
    cuda:$LOCAL_RANK. With them (processes a server starts itself, helios.serve.engines) `device`
    is this rank's own device, e.g. "cuda:3", and the ranks meet at `init_method` (e.g. "file:///...").
    """
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    explicit = rank is not None
    if cuda:
        no_multicast_env()
        local = torch.device(device) if explicit else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if local.index is None:
            local = torch.device("cuda", 0)
        torch.cuda.set_device(local)
    else:
        local = torch.device("cpu")
    if not dist.is_initialized():
        where = {"init_method": init_method, "rank": rank, "world_size": world_size} if explicit else {}
        dist.init_process_group("nccl" if cuda else "gloo", device_id=local if cuda else None, **where)
        atexit.register(_destroy)  # NCCL warns at exit about a group left alive
    return local


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_seed(seed: int, group: dist.ProcessGroup | None = None) -> int:
    """Rank 0's seed on every rank (a random seed must still give all ranks the same noise)."""
    t = torch.tensor([seed], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return int(t.item())


def use_deterministic_kernels() -> dict[str, bool]:
    """Kernel choices that do not depend on timing (`load_pipeline(deterministic=True)`), so that runs and memory
    plans repeat each other's frames. Process-wide; call it before anything is compiled. Returns what was set.

    - Inductor's reductions with one block size each, chosen by rule: a reduction's block size sets its
      summation order, and timing several on the device picked different ones in different processes
      (R0_BLOCK 8192 in one, 2048 in the next: docs/memory.md). Inductor's deterministic mode does this, but
      it does not last: Dynamo restores `torch.use_deterministic_algorithms`' state after tracing each frame,
      and that call also sets Inductor's flag, so every graph after the first was compiled without it (found in
      the generated kernels' metadata, H100, 2026-12-06). The two settings that decide a reduction's block
      size are set as well, and nothing resets them: the reduction-config filter forced on, and no scaling
      of a reduction's block at run time (`dynamic_scale_rblock`, which adds smaller blocks and times them).
    - cuDNN's benchmark mode off (PyTorch's default, made sure of): each convolution's algorithm then comes
      from cuDNN's heuristics, a function of shapes, dtypes, layout and device, the same every run.
      `torch.backends.cudnn.deterministic` is left alone: forward convolutions are already deterministic for
      a given algorithm (the non-deterministic ones are backward kernels with atomics), and the flag could
      only narrow the heuristics' list, possibly dropping the Hopper kernels the VAE decode relies on.

    Eager kernels are untouched (`torch.use_deterministic_algorithms` is not turned on: it would change them).
    """
    import torch._inductor.config as inductor

    done = {"cudnn_benchmark_off": True}
    torch.backends.cudnn.benchmark = False
    if hasattr(inductor, "deterministic"):  # not in older torch
        inductor.deterministic = True
        done["inductor_deterministic"] = True
    tests = getattr(inductor, "test_configs", None)
    if tests is not None and hasattr(tests, "force_filter_reduction_configs"):
        tests.force_filter_reduction_configs = True
        done["inductor_one_reduction_config"] = True
    if hasattr(inductor, "dynamic_scale_rblock"):
        inductor.dynamic_scale_rblock = False
        done["inductor_no_rblock_scaling"] = True
    if "inductor_one_reduction_config" not in done:
        log.warning("this torch %s cannot fix Inductor's reduction block sizes; compiled kernels may differ "
                    "between runs", torch.__version__)
    return done


def use_expandable_segments() -> bool:
    """Let the CUDA caching allocator grow its segments in place rather than keep many fixed-size ones, so
    that under a memory budget (the inference plans, stage 3's host-memory options) the reserved memory stays
    near what is allocated: at 24 GB, fixed segments reserved 2.9 GiB over the 21.1 GiB allocated (an H100,
    2026-12-06). A setting already in PYTORCH_CUDA_ALLOC_CONF is kept. Returns whether they are on."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" in conf:
        return "expandable_segments:True" in conf.replace(" ", "")
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None or not torch.cuda.is_available():
        return False
    try:
        setter("expandable_segments:True")
    except RuntimeError as e:  # a platform without them (e.g. no virtual memory management): fixed segments
        log.warning("expandable CUDA memory segments unavailable (%s); reserved memory may exceed the budget", e)
        return False
    return True
