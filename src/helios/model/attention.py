"""Scaled dot-product attention through the fastest backend the device has.

On Hopper, PyTorch's cuDNN attention ran at about 580 TFLOP/s against 290-360 for its
FlashAttention-2 backend at Helios' sequence lengths, so it comes first where it exists.
"fa4" (FlashAttention-4's CuTe forward, `pip install flash-attn-4`) is a backend of its own outside
SDPA, for inference in half precision: a custom op, so compiled blocks and CUDA graphs keep it.
Layout in and out: (B, L, H, D).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - old torch
    SDPBackend = None
    sdpa_kernel = None

_BACKEND_NAMES = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}
FA4 = "fa4"  # not an SDPA backend: FlashAttention-4's forward, tried first when named first
_preferred: list[str] = ["cudnn", "flash", "efficient", "math"]


def set_attention_backends(names: list[str]) -> None:
    """Choose the attention backends to try on CUDA, in order of preference (e.g. ["flash", "math"], or
    ["fa4", "cudnn", ...]: FlashAttention-4 where it takes the inputs, else the SDPA ones after it)."""
    unknown = [n for n in names if n not in _BACKEND_NAMES and n != FA4]
    if unknown or not [n for n in names if n != FA4]:
        raise ValueError(f"unknown attention backend(s) {unknown}, or no SDPA backend to fall back on; "
                         f"choose from {[FA4, *_BACKEND_NAMES]}")
    if names[0] == FA4:
        missing = fa4_available()
        if missing is not None:
            raise RuntimeError(f"attention backend fa4 needs FlashAttention-4 (pip install flash-attn-4): {missing}")
    _preferred[:] = names


def fa4_available() -> str | None:
    """None if FlashAttention-4's CuTe interface imports, else why not."""
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception as e:  # not installed, or its compiler libraries are missing
        return f"{type(e).__name__}: {e}"
    return None


@torch.library.custom_op("helios::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-4's non-causal forward: (B, Lq, H, D), (B, Lk, H, D) x2 -> (B, Lq, H, D)."""
    from flash_attn.cute.interface import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


@fa4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _fa4_device(q: torch.Tensor) -> bool:
    return q.is_cuda


def _fa4_takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """FlashAttention-4 here: named first, CUDA, half precision, no gradient wanted (its forward only)."""
    return (_preferred[0] == FA4 and _fa4_device(q) and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)))


def _backend_context(device: torch.device):
    if device.type != "cuda" or sdpa_kernel is None:
        return contextlib.nullcontext()
    backends = [getattr(SDPBackend, _BACKEND_NAMES[n]) for n in _preferred
                if n in _BACKEND_NAMES and hasattr(SDPBackend, _BACKEND_NAMES[n])]
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without set_priority: the set is still restricted, order is torch's own
        return sdpa_kernel(backends)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (non-causal) attention. q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D)."""
    if _fa4_takes(q, k):
        return fa4_attention(q, k, v)
    with _backend_context(q.device):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# attention with its log-sum-exp, for merging partial results (ring attention)

_lse_unsupported: set[tuple[str, str, torch.dtype]] = set()  # (backend, device type, dtype) that raised


def _lse_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    aten = torch.ops.aten
    if name == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    if name == "cudnn":
        return aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    if name == "flash":
        return aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    if name == "efficient":
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    raise ValueError(name)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention`, plus the log-sum-exp of each query's scores: (B, Lq, H, D) and (B, Lq, H) float32.

    Partial results over disjoint key sets merge exactly with these (see `merge_partial`). Uses the
    fused kernels' own LSE output where one runs, else the explicit softmax (fine for small inputs).
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    lq = q.shape[1]
    names = (["cpu"] if q.device.type == "cpu" else [n for n in _preferred if n not in ("math", FA4)]
             if q.device.type == "cuda" else [])
    for name in names:
        key = (name, q.device.type, q.dtype)
        # cuDNN's kernel returned NaN (no error) for float32 on an H100: only half precision goes there.
        if key in _lse_unsupported or (name in ("cudnn", "flash") and q.dtype not in (torch.float16, torch.bfloat16)):
            continue
        try:
            out, lse = _lse_kernel(name, qt, kt, vt)
        except (RuntimeError, NotImplementedError):  # this kernel does not take these inputs: try the next
            _lse_unsupported.add(key)
            continue
        # Some kernels pad the LSE along the queries or add a trailing unit dimension.
        lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :lq].float()
        return out.transpose(1, 2), lse.transpose(1, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[..., None]), v.float()).to(q.dtype)
    return out, lse.transpose(1, 2)


def merge_partial(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets: softmax weights rescaled by exp(lse_i - lse).

    out/out_b: (B, L, H, D) (the result is float32), lse/lse_b: (B, L, H) float32.
    """
    new = torch.logaddexp(lse, lse_b)
    merged = out.float() * torch.exp(lse - new)[..., None] + out_b.float() * torch.exp(lse_b - new)[..., None]
    return merged, new


# ----------------------------------------------------------------------------------------------
# FP8 attention (Hopper): cuDNN's FP8 fused attention through its Python frontend (`nvidia-cudnn-frontend`)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
SOFTMAX_SCALE = 448.0  # the probabilities lie in [0, 1]: this maps them onto e4m3's whole range


def quantize_tensor(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor: (e4m3 values, float32 descale of shape (1, 1, 1, 1)), x ~= values * descale."""
    amax = x.abs().amax().float() if amax is None else amax.float()
    descale = (amax.clamp(min=1e-12) / FP8_MAX).reshape(1, 1, 1, 1)
    return (x.float() / descale.reshape(())).to(FP8), descale


def fp8_attention_emulated(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor,
                           dk: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """What `CudnnFp8Attention.run_quantized` computes, in float32 torch ops, dequantised: e4m3 (B, L, H, D)
    inputs with their descales. As in a flash kernel, the unnormalised probabilities exp(s - max) in (0, 1] are
    rounded to e4m3 at SOFTMAX_SCALE before the product with v, the row sums stay in float32, and the output
    is rounded to e4m3 at v's scale."""
    q, k, v = (t.float() * s.reshape(()) for t, s in ((q8, dq), (k8, dk), (v8, dv)))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    rowsum = p.sum(dim=-1, keepdim=True)
    p = (p * SOFTMAX_SCALE).to(FP8).float() / SOFTMAX_SCALE
    out = torch.einsum("bhqk,bkhd->bqhd", p / rowsum, v)
    return (out / dv.reshape(())).to(FP8).float() * dv.reshape(())


_fp8_kernel: "CudnnFp8Attention | None" = None


def fp8_attention_kernel() -> "CudnnFp8Attention":
    """The process's cuDNN FP8 attention (one handle, graphs per shape); raises if the frontend is missing."""
    global _fp8_kernel
    if _fp8_kernel is None:
        missing = cudnn_frontend_available()
        if missing is not None:
            raise RuntimeError(f"FP8 attention needs cuDNN's Python frontend (pip install nvidia-cudnn-frontend): "
                               f"{missing}")
        _fp8_kernel = CudnnFp8Attention()
    return _fp8_kernel


def cudnn_frontend_available() -> str | None:
    """None if cuDNN's Python frontend imports, else why not."""
    try:
        import cudnn  # noqa: F401
    except Exception as e:  # not installed, or its cuDNN library is missing
        return f"{type(e).__name__}: {e}"
    return None


class CudnnFp8Attention:
    """Full attention with e4m3 q, k, v, probabilities and output (cuDNN's FP8 flash attention).

    q, k, v (B, L, H, D) bf16 in, (B, Lq, H, D) in q's dtype out. Each input gets one scale from its max;
    the output's scale comes from max|v| (a softmax-weighted mean of v's rows never exceeds it), so nothing
    overflows and no scale history is kept. One cuDNN graph per shape, built on first use (not inside a CUDA
    graph capture: build each shape once before capturing). On Hopper cuDNN writes the output in FP8 only.
    """

    def __init__(self):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        self.graphs: dict[tuple, tuple] = {}
        self.softmax_scale = torch.full((1, 1, 1, 1), SOFTMAX_SCALE)
        self.softmax_descale = torch.full((1, 1, 1, 1), 1.0 / SOFTMAX_SCALE)

    def _graph(self, q: torch.Tensor, k: torch.Tensor):
        key = (tuple(q.shape), tuple(k.shape), q.device)
        if key in self.graphs:
            return self.graphs[key]
        cudnn = self.cudnn
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32,
                              handle=self.handle)

        def bhsd(name: str, shape: tuple[int, ...]):  # (B, L, H, D) memory seen as (B, H, L, D)
            b, s, h, d = shape
            return graph.tensor(name=name, dim=[b, h, s, d], stride=[s * h * d, d, h * d, 1], data_type=e4m3)

        tq, tk, tv = bhsd("q", tuple(q.shape)), bhsd("k", tuple(k.shape)), bhsd("v", tuple(k.shape))
        scalars = [graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
                   for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scalars[0], descale_k=scalars[1],
                                              descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                              scale_o=scalars[5], generate_stats=False,
                                              attn_scale=1.0 / q.shape[-1] ** 0.5, use_causal_mask=False,
                                              name="sdpa_fp8")
        b, s, h, d = q.shape
        o.set_output(True).set_dim([b, h, s, d]).set_stride([s * h * d, d, h * d, 1]).set_data_type(e4m3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        workspace = torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=q.device)
        amax_buffers = torch.empty(2, 1, 1, 1, 1, dtype=torch.float32, device=q.device)
        entry = (graph, (tq, tk, tv, *scalars, o, amax_s, amax_o), workspace, amax_buffers)
        self.graphs[key] = entry
        return entry

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        (q8, dq), (k8, dk), (v8, dv) = quantize_tensor(q), quantize_tensor(k), quantize_tensor(v)
        out = self.run_quantized(q8, k8, v8, dq, dk, dv)
        return (out.float() * dv.reshape(())).to(q.dtype)  # the output's range is v's

    def run_quantized(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor,
                      dk: torch.Tensor, dv: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The kernel alone: e4m3 inputs and their descales -> e4m3 output whose descale is dv (written into
        `out`, contiguous (B, L, H, D) e4m3, when given)."""
        graph, tensors, workspace, amax_buffers = self._graph(q8, k8)
        if self.softmax_scale.device != q8.device:
            self.softmax_scale, self.softmax_descale = self.softmax_scale.to(q8.device), self.softmax_descale.to(q8.device)
        out = torch.empty(q8.shape, dtype=FP8, device=q8.device) if out is None else out
        tq, tk, tv, sdq, sdk, sdv, sds, sss, sso, to, tamax_s, tamax_o = tensors
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream(q8.device).cuda_stream)
        graph.execute({tq: q8, tk: k8, tv: v8, sdq: dq, sdk: dk, sdv: dv, sds: self.softmax_descale,
                       sss: self.softmax_scale, sso: 1.0 / dv, to: out, tamax_s: amax_buffers[0],
                       tamax_o: amax_buffers[1]}, workspace, handle=self.handle)
        return out
