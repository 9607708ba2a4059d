"""Context (sequence) parallel inference: one forward's tokens spread over the ranks of a process group.

Each rank keeps an even slice of the history tokens and an even slice of the noisy tokens:

    rank r:  [ history[h_r : h_r+1] | noisy[n_r : n_r+1] ]

Everything in a block except self-attention acts on each token by itself (norms, per-segment
modulation and gating with the rank's local history count, the FFN, the noisy tokens' text
cross-attention against the replicated text K/V), so it runs unchanged on the local tokens.
Self-attention is full and bidirectional with per-token RoPE, hence indifferent to the order of
the tokens, and the ranks exchange tokens for it in one of two ways:

* Ulysses (default where the head count divides the world size): one all-to-all turns
  "my tokens, all heads" into "all tokens, my heads", attention runs on whole sequences, and a
  second all-to-all sends the results back. Two collectives per layer.
* Ring (any head count): K/V slices travel around the ring; each rank attends its queries to every
  slice in turn and merges the partial results by log-sum-exp. N-1 point-to-point steps per layer,
  each overlapped with the attention of the slice already there.

After the last block each rank projects its noisy tokens and one all-gather per forward hands
every rank the whole prediction, so every rank runs the same sampler on the same latents (the
ranks draw the same noise from the same seed).

Uneven token counts are sent with per-rank split sizes (all_to_all_single) or padded (all_gather);
only operations that gloo also has are used, so the CPU tests run the very same code as NCCL.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from helios.model.attention import attention, attention_with_lse, merge_partial

if TYPE_CHECKING:
    from helios.model.transformer import HeliosTransformer, TokenLayout

STRATEGIES = ("auto", "ulysses", "ring")


def even_split(n: int, parts: int, extra_first: bool = True) -> list[int]:
    """Sizes of `parts` contiguous slices of n that differ by at most one; the larger ones first or last."""
    base, extra = divmod(n, parts)
    sizes = [base + (i < extra) for i in range(parts)]
    return sizes if extra_first else sizes[::-1]


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


class ContextParallel:
    """The communication of context-parallel inference for one process group (set on a model by
    `enable_context_parallel`). Stateless between forwards: the split plan comes from the layout."""

    def __init__(self, heads: int, group: dist.ProcessGroup | None = None, strategy: str = "auto"):
        if not dist.is_initialized():
            raise RuntimeError("context parallelism needs torch.distributed initialised (see init_distributed)")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if strategy == "auto":
            strategy = "ulysses" if heads % self.world == 0 else "ring"
        if strategy == "ulysses" and heads % self.world:
            raise ValueError(f"Ulysses attention splits the {heads} heads over {self.world} ranks; "
                             "it needs a head count divisible by the world size (use strategy='ring')")
        self.strategy = strategy
        self.heads = heads
        # Token counts (all, noisy) of every rank in the current forward: set by split, read by the attention.
        self._counts: list[int] = []
        self._noisy_counts: list[int] = []

    def __repr__(self) -> str:
        return f"ContextParallel({self.strategy}, rank {self.rank} of {self.world})"

    # ---- tokens -----------------------------------------------------------------------------
    def split(self, x: torch.Tensor, layout: "TokenLayout") -> tuple[torch.Tensor, "TokenLayout"]:
        """This rank's tokens of x (B, L, D) and their layout (RoPE rows, local history count)."""
        nh = layout.num_history
        nn_ = x.shape[1] - nh
        if nn_ < self.world:
            raise ValueError(f"{nn_} noisy tokens cannot be split over {self.world} ranks")
        # Extra history tokens go to the first ranks and extra noisy ones to the last: totals stay even.
        hs, ns = even_split(nh, self.world, True), even_split(nn_, self.world, False)
        self._counts = [h + n for h, n in zip(hs, ns)]
        self._noisy_counts = ns
        h0, n0 = _starts(hs)[self.rank], nh + _starts(ns)[self.rank]
        h1, n1 = h0 + hs[self.rank], n0 + ns[self.rank]

        def local(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[:, h0:h1], t[:, n0:n1]], dim=1)

        return local(x), replace(layout, cos=local(layout.cos), sin=local(layout.sin), num_history=h1 - h0,
                                 parallel=self)

    def gather_noisy(self, y: torch.Tensor) -> torch.Tensor:
        """Every rank's noisy-token outputs (B, n_r, C) -> the whole noisy sequence (B, N, C), on every rank."""
        longest = max(self._noisy_counts)
        padded = torch.nn.functional.pad(y, (0, 0, 0, longest - y.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)  # equal sizes: gloo has no uneven all_gather
        return torch.cat([p[:, :n] for p, n in zip(parts, self._noisy_counts)], dim=1)

    # ---- self-attention ---------------------------------------------------------------------
    @torch.compiler.disable  # collectives stay eager; compiled blocks break the graph here
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the local queries to the keys/values of all ranks. (B, L_r, H, D) in and out."""
        if self.strategy == "ulysses":
            return self._ulysses(q, k, v)
        return self._ring(q, k, v)

    def _ulysses(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, lr, h, d = q.shape
        n, hn, counts = self.world, h // self.world, self._counts
        # Send head group j of my tokens to rank j; chunks are (L_i, 3, B, Hn, D) so that what arrives,
        # concatenated in rank order, is already the whole sequence. One copy into the send buffer.
        send = q.new_empty(n, lr, 3, b, hn, d)
        for i, t in enumerate((q, k, v)):
            send[:, :, i].copy_(t.unflatten(2, (n, hn)).permute(2, 1, 0, 3, 4))
        recv = q.new_empty(sum(counts) * 3 * b * hn * d)
        per_token = 3 * b * hn * d
        dist.all_to_all_single(recv, send.view(-1), [c * per_token for c in counts], [lr * per_token] * n,
                               group=self.group)
        qkv = recv.view(-1, 3, b, hn, d).permute(1, 2, 0, 3, 4)  # (3, B, L, Hn, D)
        out = attention(qkv[0], qkv[1], qkv[2])  # (B, L, Hn, D): my heads, all tokens
        # And back: tokens of rank i (all of my heads) to rank i.
        send = out.permute(1, 0, 2, 3).contiguous()
        recv = q.new_empty(n * lr * b * hn * d)
        per_token = b * hn * d
        dist.all_to_all_single(recv, send.view(-1), [lr * per_token] * n, [c * per_token for c in counts],
                               group=self.group)
        return recv.view(n, lr, b, hn, d).permute(2, 1, 0, 3, 4).reshape(b, lr, h, d)

    def _ring(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, rank, counts = self.world, self.rank, self._counts
        nxt, prv = (rank + 1) % n, (rank - 1) % n
        if self.group is not None:  # P2P takes global ranks
            nxt, prv = dist.get_global_rank(self.group, nxt), dist.get_global_rank(self.group, prv)
        kv = torch.stack([k, v]).contiguous()  # (2, B, L_j, H, D): the slice travelling around
        out = lse = None
        for step in range(n):
            pending = []
            if step < n - 1:  # start passing this slice on before attending to it
                incoming = kv.new_empty((2, kv.shape[1], counts[(rank - step - 1) % n], *kv.shape[3:]))
                pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, self.group),
                                                  dist.P2POp(dist.irecv, incoming, prv, self.group)])
            part, part_lse = attention_with_lse(q, kv[0], kv[1])
            out, lse = (part.float(), part_lse) if out is None else merge_partial(out, lse, part, part_lse)
            for req in pending:
                req.wait()
            if pending:
                kv = incoming
        return out.to(q.dtype)


def enable_context_parallel(model: "HeliosTransformer", group: dist.ProcessGroup | None = None,
                            strategy: str = "auto") -> ContextParallel:
    """Make every forward of `model` run context-parallel over `group` (default: the whole world).

    Every rank must hold the same weights and call the model with the same inputs; every rank gets
    the whole output. Returns the ContextParallel object (also `model.context_parallel`).
    """
    cp = ContextParallel(model.config.num_attention_heads, group, strategy)
    model.context_parallel = cp
    return cp


def disable_context_parallel(model: "HeliosTransformer") -> None:
    model.context_parallel = None
