"""The Helios transformer: a Wan2.1-style DiT that denoises one chunk given a compressed history.

Sequence layout of one forward pass (tokens concatenated along the sequence):

    [ long history | mid history | short history | noisy chunk ]
      4x8x8 patch    2x4x4 patch   1x2x2 patch     1x2x2 patch   (latent units, with the default patch)

History tokens are clean context: they are modulated with timestep 0 (`zero_history_timestep`), skip
the text cross-attention (`guidance_cross_attn`), and only the noisy tokens are decoded by the head.
Module and parameter names follow the official checkpoints, so their state dicts load as they are
and LoRA target names carry over.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from helios.model.attention import attention
from helios.model.config import HeliosConfig
from helios.model.fp8 import ROW_MULTIPLE, Fp8Linear
from helios.model.rope import apply_rope, flatten_grid, pool_grid, rope_grid
from helios.model.transformer_kernels import gelu_quantize_rows, linear_gelu, rope_attention, rope_attention_fp8

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from helios.model.parallel import ContextParallel

# Parameters kept in float32 whatever the model dtype (they are small and precision-sensitive).
FP32_PARAMETERS = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "history_key_scale")


@dataclass
class TransformerOutput:
    sample: torch.Tensor


@dataclass
class TokenLayout:
    """Positions of one forward's tokens: constant across the denoising steps of a chunk stage."""

    cos: torch.Tensor  # (B, L, head_dim/2) float32
    sin: torch.Tensor
    num_history: int  # tokens before the noisy ones
    noisy_grid: tuple[int, int, int]  # (frames, height, width) of the noisy tokens
    parallel: "ContextParallel | None" = None  # set on a rank's local layout: self-attention spans all ranks


@dataclass
class TextContext:
    """Per-layer cross-attention keys/values of one prompt batch: computed once, reused every step."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    # Unique per context: a graphed forward (helios.model.graphs) copies the K/V into its buffers only when it changes.
    serial: int = field(default_factory=itertools.count().__next__)


# ----------------------------------------------------------------------------------------------
# building blocks


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] embedding of (possibly fractional) timesteps, (N,) -> (N, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class MLP2(nn.Module):
    """linear_1 -> activation -> linear_2 (names of the official time and text embedders)."""

    def __init__(self, d_in: int, d_out: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.linear_2 = nn.Linear(d_out, d_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(x)
        h = F.silu(h) if self.act == "silu" else F.gelu(h, approximate="tanh")
        return self.linear_2(h)


class ConditionEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = MLP2(freq_dim, dim, "silu")
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = MLP2(text_dim, dim, "gelu_tanh")

    def time(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) timesteps -> temb (N, dim) in `dtype`, and the six modulation vectors (N, 6, dim)."""
        emb = timestep_sinusoid(t, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(emb).to(dtype)
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))


class Proj(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)


class FeedForward(nn.Module):
    """Linear -> tanh-GELU -> Linear; `net.0.proj` / `net.2` are the official key names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([Proj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])
        # inference (fuse_projections_): bf16, the GELU in the up projection's GEMM epilogue; FP8, the GELU and
        # the down projection's row quantisation in one pass
        self.fused_gelu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.net[0].proj, self.net[2]
        if self.fused_gelu and type(up) is nn.Linear and up.bias is not None:
            return down(linear_gelu(x, up.weight, up.bias))
        if self.fused_gelu and isinstance(down, Fp8Linear):  # GELU + the down projection's quantisation
            h = up(x)
            rows = h.reshape(-1, h.shape[-1])
            xq, xs = gelu_quantize_rows(rows, ROW_MULTIPLE if h.is_cuda else 1)
            return down.forward_quantized(xq, xs, rows.shape[0], h.shape[:-1], h.dtype)
        return down(F.gelu(up(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head attention with RMSNorm on q and k across all heads."""

    def __init__(self, dim: int, heads: int, eps: float, amplify_history: bool = False,
                 history_scale_mode: str = "per_head"):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.amplify_history = amplify_history
        self.fused_kernels = False  # inference: q/k norm + RoPE + attention as one op (fuse_qkv_)
        self.fp8_attention = False  # with fused_kernels: e4m3 self-attention (helios.model.fp8.quantize_blocks_)
        if amplify_history:
            # Head-wise learnable gain on the history keys: 1 + sigmoid(theta) * (max_scale - 1).
            self.history_key_scale = nn.Parameter(torch.ones(heads if history_scale_mode == "per_head" else 1))
            self.max_scale = 10.0

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))

    def key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads_of(self.norm_k(self.to_k(context))), self.heads_of(self.to_v(context))

    def fuse_qkv_(self, kernels: bool = True) -> None:
        """Replace to_q/to_k/to_v by one (3D x D) projection: one GEMM instead of three (inference only).

        kernels: also run the q/k norm, RoPE and attention as one op (helios.model.transformer_kernels)."""
        self.fused_kernels = kernels
        if hasattr(self, "to_qkv"):
            return
        qkv = nn.Linear(self.to_q.in_features, 3 * self.to_q.out_features, device=self.to_q.weight.device,
                        dtype=self.to_q.weight.dtype)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
            qkv.bias.copy_(torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias]))
        self.to_qkv = qkv.requires_grad_(False)
        del self.to_q, self.to_k, self.to_v

    def history_gain(self) -> torch.Tensor:
        return 1.0 + torch.sigmoid(self.history_key_scale) * (self.max_scale - 1.0)

    def self_attention(self, x: torch.Tensor, layout: TokenLayout, queries_from: int = 0) -> torch.Tensor:
        """Attention of the tokens from `queries_from` on over all tokens of x: (B, L - queries_from, D)."""
        if self.fused_kernels and hasattr(self, "to_qkv") and layout.parallel is None:
            gain = self.history_gain() if self.amplify_history and layout.num_history > 0 else None
            args = (self.to_qkv(x), self.norm_q.weight, self.norm_k.weight, layout.cos, layout.sin, self.norm_q.eps,
                    self.heads, layout.num_history, gain)
            out_proj = self.to_out[0]
            queries = x[:, queries_from:]
            if self.fp8_attention and isinstance(out_proj, Fp8Linear):  # e4m3 output straight into to_out
                values, scales = rope_attention_fp8(*args, ROW_MULTIPLE if x.is_cuda else 1, queries_from)
                return out_proj.forward_quantized(values, scales, queries.shape[0] * queries.shape[1],
                                                  queries.shape[:2], x.dtype)
            return out_proj(rope_attention(*args, queries_from))
        if hasattr(self, "to_qkv"):
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
            q, k, v = self.heads_of(self.norm_q(q)), self.heads_of(self.norm_k(k)), self.heads_of(v)
        else:
            q = self.heads_of(self.norm_q(self.to_q(x)))
            k, v = self.key_value(x)
        q = apply_rope(q, layout.cos, layout.sin)
        k = apply_rope(k, layout.cos, layout.sin)
        if self.amplify_history and layout.num_history > 0:
            gain = self.history_gain()
            nh = layout.num_history
            k = torch.cat([(k[:, :nh] * gain.view(1, 1, -1, 1)).to(k.dtype), k[:, nh:]], dim=1)
        q = q[:, queries_from:]
        out = attention(q, k, v) if layout.parallel is None else layout.parallel.attention(q, k, v)
        return self.to_out[0](out.flatten(2))

    def cross_attention(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.heads_of(self.norm_q(self.to_q(x)))
        return self.to_out[0](attention(q, kv[0], kv[1]).flatten(2))


def per_token(values: torch.Tensor, nh: int, length: int) -> torch.Tensor:
    """(B, 2, D) [history, noisy] rows -> their (B, L, D) broadcast over the tokens of each segment.

    Used when compiling: a select by token index fuses into the consumer's kernel, where the concatenation
    of two segments' results made the compiled graph split a norm from its modulation."""
    history = (torch.arange(length, device=values.device) < nh)[:, None]
    return torch.where(history, values[:, :1], values[:, 1:])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, nh: int) -> torch.Tensor:
    """x * (1 + scale) + shift with one (shift, scale) for the history tokens and one for the noisy.

    shift/scale: (B, 2, D), row 0 for history, row 1 for noisy tokens.
    """
    if torch.compiler.is_compiling():
        return torch.addcmul(per_token(shift, nh, x.shape[1]), x, 1 + per_token(scale, nh, x.shape[1]))
    noisy = torch.addcmul(shift[:, 1:], x[:, nh:], 1 + scale[:, 1:])
    if nh == 0:
        return noisy
    return torch.cat([torch.addcmul(shift[:, :1], x[:, :nh], 1 + scale[:, :1]), noisy], dim=1)


def gated_add(residual: torch.Tensor, update: torch.Tensor, gate: torch.Tensor, nh: int) -> torch.Tensor:
    """residual + update * gate per segment, in float32, returned in residual's dtype."""
    r, u = residual.float(), update.float()
    if torch.compiler.is_compiling():
        return torch.addcmul(r, u, per_token(gate, nh, r.shape[1])).to(residual.dtype)
    noisy = torch.addcmul(r[:, nh:], u[:, nh:], gate[:, 1:])
    out = noisy if nh == 0 else torch.cat([torch.addcmul(r[:, :nh], u[:, :nh], gate[:, :1]), noisy], dim=1)
    return out.to(residual.dtype)


class Block(nn.Module):
    def __init__(self, cfg: HeliosConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.eps = eps
        self.attn1 = Attention(dim, cfg.num_attention_heads, eps, cfg.is_amplify_history, cfg.history_scale_mode)
        self.attn2 = Attention(dim, cfg.num_attention_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.guidance_cross_attn = cfg.guidance_cross_attn

    def layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)

    def cross_norm(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm2, nn.Identity):
            return x
        n = self.norm2
        return F.layer_norm(x.float(), x.shape[-1:], n.weight.float(), n.bias.float(), self.eps).to(x.dtype)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mod: torch.Tensor,
                layout: TokenLayout, keep_history: bool = True) -> torch.Tensor:
        """keep_history=False (the last block): the history tokens serve only as keys and values, and the
        result holds the noisy tokens alone, (B, L - num_history, D): the head never reads the rest."""
        # mod: (B, 2, 6, D) time projections for [history, noisy]; the table is added in float32.
        nh = layout.num_history
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table[:, None] + mod.float()).unbind(2)

        h = modulate(self.layer_norm(x), shift, scale, nh).to(x.dtype)
        if not keep_history and nh:
            update = self.attn1.self_attention(h, layout, queries_from=nh)
            x, nh = x[:, nh:], 0
        else:
            update = self.attn1.self_attention(h, layout)
        x = gated_add(x, update, gate, nh)

        if self.guidance_cross_attn:  # history tokens already carry the prompt: only noisy tokens read text
            noisy = x[:, nh:]
            update = self.attn2.cross_attention(self.cross_norm(noisy), kv)
            if torch.compiler.is_compiling():  # zero rows for the history: fuses with the next norm, no concat
                x = x + F.pad(update, (0, 0, nh, 0))
            else:
                x = torch.cat([x[:, :nh], noisy + update], dim=1) if nh else noisy + update
        else:
            x = x + self.attn2.cross_attention(self.cross_norm(x), kv)

        h = modulate(self.layer_norm(x), c_shift, c_scale, nh).to(x.dtype)
        return gated_add(x, self.ffn(h), c_gate, nh)


class OutputNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.eps = eps

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table + temb[:, None].float()).unbind(1)
        h = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)
        return torch.addcmul(shift[:, None], h, 1 + scale[:, None]).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# the model


class HeliosTransformer(nn.Module):
    def __init__(self, config: HeliosConfig):
        super().__init__()
        self.config = cfg = config
        dim, p = cfg.dim, cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=p, stride=p)
        if cfg.has_multi_term_memory_patch:
            self.patch_short = nn.Conv3d(cfg.in_channels, dim, kernel_size=p, stride=p)
            mid, long = tuple(2 * x for x in p), tuple(4 * x for x in p)
            self.patch_mid = nn.Conv3d(cfg.in_channels, dim, kernel_size=mid, stride=mid)
            self.patch_long = nn.Conv3d(cfg.in_channels, dim, kernel_size=long, stride=long)
        self.condition_embedder = ConditionEmbedder(dim, cfg.freq_dim, cfg.text_dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = OutputNorm(dim, cfg.eps)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(p))
        self.gradient_checkpointing = False
        self.context_parallel: ContextParallel | None = None  # see enable_context_parallel
        self.block_stream = None  # a helios.model.offload.BlockRing: blocks streamed from host memory
        self.last_block_noisy_only = True  # False: the last block computes the history's final states too

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    # ---- text -------------------------------------------------------------------------------
    def prepare_text(self, encoder_hidden_states: torch.Tensor) -> TextContext:
        """Project the prompt embeddings and compute every layer's cross-attention K/V once."""
        ctx = self.condition_embedder.text_embedder(encoder_hidden_states.to(self.dtype))
        return TextContext([blk.attn2.key_value(ctx) for blk in self.iter_blocks()])

    def iter_blocks(self):
        """The blocks in order; under weight streaming, each one's resident copy as its turn comes."""
        return iter(self.blocks) if self.block_stream is None else self.block_stream.blocks()

    # ---- token layout -----------------------------------------------------------------------
    def _history_terms(self, short, mid, long):
        """(name, latents, frame indices, conv, pooling factor in token units), in sequence order."""
        terms = []
        if long[0] is not None and long[1] is not None:
            terms.append(("long", long[0], long[1], 4))
        if mid[0] is not None and mid[1] is not None:
            terms.append(("mid", mid[0], mid[1], 2))
        if short[0] is not None and short[1] is not None:
            terms.append(("short", short[0], short[1], 1))
        if terms and not self.config.has_multi_term_memory_patch:
            raise ValueError("this transformer has no history patchifiers (has_multi_term_memory_patch=False) "
                             "but history latents were given")
        return terms

    def token_layout(self, noisy_shape: tuple[int, ...], indices_hidden_states: torch.Tensor | None,
                     history: list[tuple[str, torch.Tensor, torch.Tensor, int]]) -> TokenLayout:
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        b, _, f, hgt, wid = noisy_shape
        grid = (f // pt, hgt // ph, wid // pw)
        device = self.device
        if indices_hidden_states is None:
            indices_hidden_states = torch.arange(grid[0], device=device)[None].expand(b, -1)
        tables = []
        for _, lat, idx, factor in history:
            fine = rope_grid(idx.to(device), lat.shape[-2] // ph, lat.shape[-1] // pw, cfg.rope_dim, cfg.rope_theta)
            tables.append(flatten_grid(pool_grid(fine, factor)))
        tables.append(flatten_grid(rope_grid(indices_hidden_states.to(device), grid[1], grid[2], cfg.rope_dim,
                                             cfg.rope_theta)))
        table = torch.cat(tables, dim=1)
        half = cfg.attention_head_dim // 2
        num_history = table.shape[1] - grid[0] * grid[1] * grid[2]
        return TokenLayout(table[..., :half].contiguous(), table[..., half:].contiguous(), num_history, grid)

    def layout_for(self, hidden_shape: tuple[int, ...], indices_hidden_states: torch.Tensor | None = None,
                   **history: torch.Tensor) -> TokenLayout:
        """The TokenLayout of a forward with these shapes and `forward`'s history keyword arguments."""
        terms = self._history_terms(
            (history.get("latents_history_short"), history.get("indices_latents_history_short")),
            (history.get("latents_history_mid"), history.get("indices_latents_history_mid")),
            (history.get("latents_history_long"), history.get("indices_latents_history_long")))
        return self.token_layout(tuple(hidden_shape), indices_hidden_states, terms)

    def embed_tokens(self, hidden_states: torch.Tensor,
                     history: list[tuple[str, torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
        p = self.config.patch_size
        pieces = []
        for name, lat, _, factor in history:
            conv = getattr(self, f"patch_{name}")
            if factor > 1:  # coarse terms: replicate-pad the latents to whole patches
                k = tuple(factor * x for x in p)
                t, h, w = lat.shape[-3:]
                pad = ((-w) % k[2], (-h) % k[1], (-t) % k[0])
                if any(pad):
                    lat = F.pad(lat, (0, pad[0], 0, pad[1], 0, pad[2]), mode="replicate")
            pieces.append(conv(lat.to(conv.weight.dtype)).flatten(2).transpose(1, 2))
        emb = self.patch_embedding
        pieces.append(emb(hidden_states.to(emb.weight.dtype)).flatten(2).transpose(1, 2))
        return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | TextContext,
        indices_hidden_states: torch.Tensor | None = None,
        indices_latents_history_short: torch.Tensor | None = None,
        indices_latents_history_mid: torch.Tensor | None = None,
        indices_latents_history_long: torch.Tensor | None = None,
        latents_history_short: torch.Tensor | None = None,
        latents_history_mid: torch.Tensor | None = None,
        latents_history_long: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        layout: TokenLayout | None = None,
    ) -> TransformerOutput | tuple[torch.Tensor]:
        """Predict the flow (or x0) of the noisy chunk `hidden_states` (B, C, F, H, W).

        The keyword arguments are those of the reference `HeliosTransformer3DModel.forward`.
        `encoder_hidden_states` may be a `TextContext` from `prepare_text` and `layout` a
        `TokenLayout` from `token_layout`, so that work that is constant over the steps is done once.
        """
        cfg = self.config
        b = hidden_states.shape[0]
        history = self._history_terms((latents_history_short, indices_latents_history_short),
                                      (latents_history_mid, indices_latents_history_mid),
                                      (latents_history_long, indices_latents_history_long))
        if layout is None:
            layout = self.token_layout(tuple(hidden_states.shape), indices_hidden_states, history)
        text = encoder_hidden_states if isinstance(encoder_hidden_states, TextContext) else \
            self.prepare_text(encoder_hidden_states)

        x = self.embed_tokens(hidden_states, history)
        cp = self.context_parallel
        if cp is not None:  # from here on this rank holds its slice of the history and of the noisy tokens
            x, layout = cp.split(x, layout)

        # Time conditioning: (B, 2, 6, D) projections for [history, noisy]; history is clean (t = 0).
        t = torch.as_tensor(timestep, device=x.device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        temb, proj = self.condition_embedder.time(t, x.dtype)
        if cfg.zero_history_timestep:
            _, proj0 = self.condition_embedder.time(torch.zeros(1, dtype=t.dtype, device=t.device), x.dtype)
            mod = torch.stack([proj0.expand(b, -1, -1), proj], dim=1)
        else:
            mod = torch.stack([proj, proj], dim=1)

        # The last block computes the noisy tokens alone (nothing reads the history's final states), except
        # under context parallelism, where each rank holds a slice of both.
        keep_last = cp is not None or not self.last_block_noisy_only or not self.blocks
        last = len(self.blocks) - 1
        for i, (blk, kv) in enumerate(zip(self.iter_blocks(), text.kv)):
            keep = keep_last or i < last
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, kv, mod, layout, keep, use_reentrant=False)
            else:
                x = blk(x, kv, mod, layout, keep)

        if keep_last:
            x = x[:, layout.num_history:]
        x = self.proj_out(self.norm_out(x, temb))
        if cp is not None:
            x = cp.gather_noisy(x)
        out = self.unpatchify(x, layout.noisy_grid)
        return TransformerOutput(out) if return_dict else (out,)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], -1, f * pt, h * ph, w * pw)

    def enable_gradient_checkpointing(self, on: bool = True) -> None:
        self.gradient_checkpointing = on

    def enable_context_parallel(self, group: "ProcessGroup | None" = None, strategy: str = "auto") -> "ContextParallel":
        """Inference over the ranks of `group` (torch.distributed): see helios.model.parallel."""
        from helios.model.parallel import enable_context_parallel

        return enable_context_parallel(self, group, strategy)

    def fuse_projections_(self, kernels: bool = True) -> "HeliosTransformer":
        """Inference-only: fuse every self-attention's q/k/v projections (the state dict changes).

        kernels: also the fused ops of helios.model.transformer_kernels (q/k norm + RoPE + attention in one
        op, the feed-forward's GELU in its GEMM's epilogue)."""
        for blk in self.blocks:
            blk.attn1.fuse_qkv_(kernels)
            blk.ffn.fused_gelu = kernels
        return self

    def compile_blocks_(self, **options) -> "HeliosTransformer":
        """torch.compile each block (one graph shared by all 40, per token count): fuses the norms,
        modulation, RoPE and gating around the matmuls. Compiles lazily, on the first call per shape."""
        for blk in self.blocks:
            blk.compile(dynamic=False, **options)
        return self


def build_transformer(config: HeliosConfig, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> HeliosTransformer:
    """A transformer with freshly initialised weights, made directly on `device` in `dtype`.

    Built on the meta device first, so a 14B model never exists in float32 on the host;
    device="meta" returns shapes only.
    """
    with torch.device("meta"):
        model = HeliosTransformer(config)
    if str(device) == "meta":
        return model
    if dtype is not None:  # choose dtypes while still on meta: no float32 copy of a bf16 model ever exists
        cast_keeping_fp32(model, dtype)
    model.to_empty(device=device or "cpu")
    init_weights_(model)
    return model


@torch.no_grad()
def init_weights_(model: HeliosTransformer, std: float = 0.02) -> None:
    """Small-normal linear/conv weights, zero biases, unit norms (the torch default RNG decides the values)."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "scale_shift_table" in name:
            param.copy_(torch.randn(param.shape, device=param.device) / param.shape[-1] ** 0.5)
        elif "history_key_scale" in name or (leaf == "weight" and param.ndim == 1):
            param.fill_(1.0)
        elif leaf == "bias":
            param.zero_()
        else:
            param.normal_(0.0, std)


def cast_keeping_fp32(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    for name, param in model.named_parameters():
        target = torch.float32 if any(k in name for k in FP32_PARAMETERS) else dtype
        param.data = param.data.to(target)
    return model
