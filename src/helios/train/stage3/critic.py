"""The models of stage 3 besides the generator: LoRA on a plain transformer, the GAN heads, and the
critic (real score + fake score + discriminator over one frozen base)."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from helios.model.transformer import HeliosTransformer

from .config import GANConfig

__all__ = ["History", "lora_targets", "add_lora", "adapters_enabled", "scaled_head_blocks", "GANHead", "GANHeads",
           "ScoreCritic", "build_generator"]

History = dict[str, torch.Tensor]  # the transformer's history keyword arguments (latents + RoPE indices)


def lora_targets(model: nn.Module, extra: Sequence[str] = (), exclude: Sequence[str] = ("down", "up")) -> list[str]:
    """Official ``all-linear`` targets: every nn.Linear whose name has no ``norm`` (minus modules named
    in ``exclude``), plus ``extra`` module names (e.g. the memory patch Conv3d's)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + list(extra)
    return [n for n in dict.fromkeys(names) if "norm" not in n and n.rsplit(".", 1)[-1] not in set(exclude)]


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None,
             adapter_name: str = "default", dropout: float = 0.0) -> list[nn.Parameter]:
    """Inject a peft LoRA adapter (official ``init_lora_weights="gaussian"``: A ~ N(0, 1/r), B = 0, so
    the adapted model starts equal to the base). Freezes everything else; returns the LoRA parameters
    (float32, as the official ``cast_training_params``)."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                     init_lora_weights="gaussian", target_modules=list(targets or lora_targets(model)))
    inject_adapter_in_model(cfg, model, adapter_name=adapter_name)
    params = []
    for n, p in model.named_parameters():
        if f"lora_A.{adapter_name}." in n or f"lora_B.{adapter_name}." in n:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_enabled(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Switch every LoRA adapter of ``model`` on/off inside the block (peft's disable_adapters): with
    them off each adapted layer runs its base layer only, i.e. exactly the base model. peft's switch
    also flips the adapters' requires_grad; they are kept as the caller set them (a frozen critic must
    stay frozen, and gradient checkpointing must recompute with the flags of the original forward)."""
    layers = _tuner_layers(model)
    before = [not m.disable_adapters for m in layers]
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(enabled)
    for p, g in grads:
        p.requires_grad_(g)
    try:
        yield
    finally:
        for m, on in zip(layers, before):
            m.enable_adapters(on)
        for p, g in grads:
            p.requires_grad_(g)


def scaled_head_blocks(num_layers: int, blocks: Sequence[int] = (5, 15, 25, 35),
                       reference_layers: int = 40) -> tuple[int, ...]:
    """The official tap points (for 40 blocks) at the same relative depths of a ``num_layers`` model."""
    return tuple(sorted({min(num_layers - 1, round(b * num_layers / reference_layers)) for b in blocks}))


class GANHead(nn.Module):
    """Official ``Discriminator3DHead``: Conv3d(k3) -> 2x Conv3d(k4, s2) -> 2x Conv3d(k3, s(2,1,1)) ->
    Conv3d(k(1,3,3)), each + GroupNorm(32) + SiLU, global average pool, Linear -> one logit."""

    def __init__(self, in_channels: int, width: int = 768):
        super().__init__()
        convs = [nn.Conv3d(in_channels, width, 3, 1, 1), nn.Conv3d(width, width, 4, 2, 1),
                 nn.Conv3d(width, width, 4, 2, 1), nn.Conv3d(width, width, 3, (2, 1, 1), 1),
                 nn.Conv3d(width, width, 3, (2, 1, 1), 1), nn.Conv3d(width, width, (1, 3, 3), 1, (0, 1, 1))]
        layers: list[nn.Module] = []
        for c in convs:
            layers += [c, nn.GroupNorm(32, width), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Small models / latents: zero-pad (T, H, W) up to 4 so both stride-2 convs have an input;
        # never triggers at the official sizes (token grid 9 x 12 x 20 and up).
        pad = [p for d in (x.shape[4], x.shape[3], x.shape[2]) for p in (0, max(0, 4 - d))]
        if any(pad):
            x = F.pad(x, pad)
        return self.net(x.to(self.net[0].weight.dtype)).float()


class GANHeads(nn.Module):
    """One head per tapped block (``dim`` channels of noisy-token features) + one on the output."""

    def __init__(self, dim: int, out_channels: int, blocks: Sequence[int], final: bool = True, width: int = 768):
        super().__init__()
        if width % 32:
            raise ValueError(f"GAN head width must be a multiple of 32 (GroupNorm(32)), got {width}")
        self.blocks = tuple(int(b) for b in blocks)
        self.final = GANHead(out_channels, width) if final else None
        self.taps = nn.ModuleDict({str(b): GANHead(dim, width) for b in self.blocks})
        if self.final is None and not self.blocks:
            raise ValueError("GAN heads need at least one tapped block or the final head")

    def forward(self, output: torch.Tensor, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, n_heads) logits, the final head first (official order)."""
        logits = [self.final(output)] if self.final is not None else []
        logits += [self.taps[str(b)](features[b]) for b in self.blocks]
        return torch.cat(logits, dim=1)


class ScoreCritic(nn.Module):
    """The frozen base transformer with the critic LoRA (fake score) and the GAN heads.

    ``real(...)`` runs with the adapter off (= the frozen teacher), ``fake(...)`` with it on,
    ``logits(...)`` runs the fake score and the heads on its block features. Only the LoRA and the
    heads are trainable; the base stays frozen (and may be bfloat16)."""

    def __init__(self, base: HeliosTransformer, rank: int = 256, alpha: float | None = None,
                 gan: GANConfig | None = None, adapter_name: str = "critic"):
        super().__init__()
        self.transformer = base
        self.lora_parameters = add_lora(base, rank, alpha, lora_targets(base), adapter_name)
        n = base.config.num_layers
        self.heads: GANHeads | None = None
        if gan is not None and gan.enabled:
            bad = [b for b in gan.head_blocks if not 0 <= b < n]
            if bad:
                raise ValueError(f"GAN head blocks {bad} outside the model's {n} blocks "
                                 f"(use scaled_head_blocks({n}))")
            self.heads = GANHeads(base.config.dim, base.config.out_channels, gan.head_blocks, gan.final_head,
                                  gan.head_dim).to(base.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def fake(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, history: History) -> torch.Tensor:
        with adapters_enabled(self.transformer, True):
            return self.transformer(x, t, text, **history).sample

    def real(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, history: History) -> torch.Tensor:
        with adapters_enabled(self.transformer, False):
            return self.transformer(x, t, text, **history).sample

    def logits(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, history: History) -> torch.Tensor:
        """Discriminator logits (B, n_heads) of noisy latents ``x`` (fake score, adapter on)."""
        if self.heads is None:
            raise RuntimeError("this critic has no GAN heads (gan.enabled is false)")
        feats: dict[int, torch.Tensor] = {}
        pt, ph, pw = self.transformer.config.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        n = grid[0] * grid[1] * grid[2]

        def tap(idx: int):
            def hook(_module, _inputs, out):  # the block's noisy tokens -> (B, D, f, h, w)
                feats[idx] = out[:, -n:].transpose(1, 2).unflatten(2, grid)
            return hook

        handles = [self.transformer.blocks[b].register_forward_hook(tap(b)) for b in self.heads.blocks]
        try:
            out = self.fake(x, t, text, history)
        finally:
            for h in handles:
                h.remove()
        return self.heads(out, feats)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """No parameter of the critic records gradients inside the block (the generator's GAN step)."""
        params = self.trainable_parameters()
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def build_generator(init: HeliosTransformer, lora_rank: int | None = 256, lora_alpha: float | None = None,
                    memory_patches: bool = True,
                    copy_model: bool = True) -> tuple[HeliosTransformer, list[nn.Parameter]]:
    """The generator: its own transformer (a copy of ``init`` unless ``copy_model=False``), with LoRA on
    all linears (+ the memory patchifiers, official ``is_train_lora_multi_term_memory_patchg``) or, with
    ``lora_rank=None``, fully trainable (float32). Returns ``(model, trainable parameters)``."""
    g = copy.deepcopy(init) if copy_model else init
    if lora_rank is None:
        g.requires_grad_(True)
        for p in g.parameters():
            p.data = p.data.float()
        return g, list(g.parameters())
    patches = memory_patches and g.config.has_multi_term_memory_patch
    extra = ("patch_short", "patch_mid", "patch_long") if patches else ()
    return g, add_lora(g, lora_rank, lora_alpha, lora_targets(g, extra), "generator")
