"""Fused pieces of the transformer block that the compiled graph left apart (profiled on an H200, 2026-12-03).

Two custom ops, each opaque to torch.compile (it calls them as they are, between its own fused kernels):

* `rope_attention(qkv, ...)`: self-attention from the fused q/k/v projection's output. The RMS norm of q and
  of k across all heads and the rotary embedding run in one Triton pass over q and k (one program per token
  and tensor, float32 inside, rounded once to the activations' dtype); v goes to attention as a strided view
  of the projection's output, with no copy. Compiled, the same work was three kernels (the norm statistics,
  norm + RoPE + a stack, and a copy of v) at about a third of the card's bandwidth.
* `linear_gelu(x, w, b)`: the feed-forward up projection with its tanh-GELU applied in the GEMM's epilogue
  (cuBLASLt, through `torch._addmm_activation`), instead of a separate pass over the (tokens x 13824) output.

Both have plain torch implementations that run on the CPU (no Triton there) and are what the tests compare
against; on CUDA the torch path is used for inputs the kernel does not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from helios.model.attention import attention

try:  # Triton ships with CUDA builds of PyTorch; the CPU wheels have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


# ----------------------------------------------------------------------------------------------
# q/k RMS norm + RoPE (+ the history key gain), then attention


def qk_norm_rope_reference(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, eps: float, heads: int, num_history: int,
                           key_gain: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k), each (B, L, H, Dh) in qkv's dtype: the normalised, rotated heads, computed in float32."""
    q, k, _ = qkv.float().chunk(3, dim=-1)

    def norm_rope(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        pairs = x.unflatten(-1, (heads, -1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()
        return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)

    q, k = norm_rope(q, q_weight), norm_rope(k, k_weight)
    if key_gain is not None and num_history > 0:
        k = torch.cat([k[:, :num_history] * key_gain.float().view(1, 1, -1, 1), k[:, num_history:]], dim=1)
    return q.to(qkv.dtype), k.to(qkv.dtype)


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, eps: float, heads: int, num_history: int = 0,
                 key_gain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`qk_norm_rope_reference`, in one Triton kernel where it runs (CUDA, rows of the projection contiguous)."""
    if not _kernel_takes(qkv, cos, sin):
        return qk_norm_rope_reference(qkv, q_weight, k_weight, cos, sin, eps, heads, num_history, key_gain)
    return _qk_norm_rope_triton(qkv, q_weight, k_weight, cos, sin, eps, heads, num_history, key_gain)


def _qk_norm_rope_triton(qkv, q_weight, k_weight, cos, sin, eps, heads, num_history, key_gain):
    b, length, three_d = qkv.shape
    d = three_d // 3
    q = torch.empty(b, length, heads, d // heads, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty_like(q)
    gain = key_gain.float().contiguous() if key_gain is not None else q_weight  # unread without HAS_GAIN
    block = triton.next_power_of_2(d)
    _qk_norm_rope_kernel[(b * length, 2)](
        qkv, q_weight, k_weight, cos, sin, gain, q, k, length, num_history, qkv.stride(0), qkv.stride(1),
        cos.stride(0), cos.stride(1), float(eps), D=d, HALF_HEAD=d // heads // 2,
        HAS_GAIN=key_gain is not None and num_history > 0, BLOCK=block, num_warps=8)
    return q, k


def _kernel_takes(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (triton is not None and qkv.is_cuda and qkv.dim() == 3 and qkv.stride(2) == 1
            and cos.stride() == sin.stride() and cos.stride(2) == 1 and cos.dtype == torch.float32)


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(qkv_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, gain_ptr, q_ptr, k_ptr, L, num_history,
                             qkv_bs, qkv_ls, cos_bs, cos_ls, eps, D: tl.constexpr, HALF_HEAD: tl.constexpr,
                             HAS_GAIN: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # token, over B * L
        which = tl.program_id(1)  # 0: q, 1: k
        b = row // L
        pos = row % L
        src = qkv_ptr + b.to(tl.int64) * qkv_bs + pos.to(tl.int64) * qkv_ls + which * D
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        if which == 0:
            w = tl.load(wq_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w = tl.load(wk_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = x * inv * w
        # channel pairs (2i, 2i + 1) rotate by the token's angle i within each head
        x1, x2 = tl.split(tl.reshape(x, (BLOCK // 2, 2)))
        pair = tl.arange(0, BLOCK // 2)
        pmask = pair < D // 2
        angle = b.to(tl.int64) * cos_bs + pos.to(tl.int64) * cos_ls + (pair % HALF_HEAD)
        c = tl.load(cos_ptr + angle, mask=pmask, other=0.0)
        s = tl.load(sin_ptr + angle, mask=pmask, other=0.0)
        y1 = x1 * c - x2 * s
        y2 = x1 * s + x2 * c
        if HAS_GAIN:  # history keys only
            g = tl.load(gain_ptr + pair // HALF_HEAD, mask=pmask, other=1.0)
            g = tl.where((which == 1) & (pos < num_history), g, 1.0)
            y1 = y1 * g
            y2 = y2 * g
        y = tl.reshape(tl.join(y1, y2), (BLOCK,))
        dst = row.to(tl.int64) * D + cols
        if which == 0:
            tl.store(q_ptr + dst, y.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(k_ptr + dst, y.to(k_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("helios::rope_attention", mutates_args=())
def rope_attention(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, eps: float, heads: int, num_history: int,
                   key_gain: torch.Tensor | None) -> torch.Tensor:
    """Self-attention of the tokens whose fused projection is `qkv` (B, L, 3D) -> (B, L, D), before to_out."""
    q, k = qk_norm_rope(qkv, q_weight, k_weight, cos, sin, eps, heads, num_history, key_gain)
    v = qkv[..., 2 * q.shape[2] * q.shape[3]:].unflatten(-1, (heads, -1))
    return attention(q, k, v).reshape(qkv.shape[0], qkv.shape[1], -1)


@rope_attention.register_fake
def _(qkv, q_weight, k_weight, cos, sin, eps, heads, num_history, key_gain):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)


# ----------------------------------------------------------------------------------------------
# linear + tanh-GELU in the GEMM's epilogue


@torch.library.custom_op("helios::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias). On CUDA the GELU runs in cuBLASLt's epilogue (its GELU is the tanh form)."""
    if not x.is_cuda:  # the CPU's _addmm_activation applies the erf GELU: compute the tanh form explicitly
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
