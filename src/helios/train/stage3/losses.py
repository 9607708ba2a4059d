"""Stage 3's losses: (c) DMD, (d) the critic's flow matching, (e) the GAN terms (official
``utils_helios_post``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from helios.sampling.schedulers import flow_to_x0
from helios.sampling.pyramid import noise_like

from ..timesteps import TimestepConfig, dmd_sigma_table, noise_at_timestep, sample_dmd_timesteps
from .config import DistillConfig, GANConfig
from .critic import History, ScoreCritic

__all__ = ["SigmaTable", "sigma_table", "sample_timesteps", "dmd_loss", "critic_flow_loss", "gan_crop", "gan_loss",
           "generator_gan_loss", "discriminator_loss"]


@dataclass
class SigmaTable:
    """Stage-3 re-noise table: ``sigmas = linspace(1, 1/1000, 1000)`` shifted by the dynamic factor of
    the critic input, ``timesteps = 1000 sigmas``, and that factor (also the timestep-sampling shift)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    shift: float


def sigma_table(latent_shape: Sequence[int], cfg: TimestepConfig) -> SigmaTable:
    """For a critic input of ``latent_shape`` (B, C, T, H, W) (official: ``(1, 16, 9, H, W)``)."""
    s, t, m = dmd_sigma_table((1, *latent_shape[1:]), cfg)
    return SigmaTable(s, t, m)


def sample_timesteps(batch: int, table: SigmaTable, spec: dict[str, Any], cfg: DistillConfig, step: int,
                     rng: torch.Generator | None) -> torch.Tensor:
    return sample_dmd_timesteps(batch, shift=table.shift, sample_type=spec.get("sample_type", "uniform"),
                                alpha=float(spec.get("alpha", 4.0)), beta=float(spec.get("beta", 1.5)),
                                global_step=step, dynamic_step=int(spec.get("decay_steps", 500)),
                                min_step=cfg.min_step, max_step=cfg.max_step, generator=rng)


def _renoise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             table: SigmaTable) -> tuple[torch.Tensor, torch.Tensor]:
    xt, s = noise_at_timestep(x0, noise, t, table.sigmas, table.timesteps)
    return xt.to(x0.dtype), s.to(x0.device)


def dmd_loss(critic: ScoreCritic, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, table: SigmaTable,
             text: torch.Tensor, negative_text: torch.Tensor, history: History, real_guidance_scale: float = 3.0,
             fake_guidance_scale: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Official ``compute_distribution_matching_loss`` / ``compute_kl_grad`` (no gradient to the critic):

        x_t = (1 - s_t) x0 + s_t eps;  f = x0(fake(x_t));  r = rc + g (rc - ru)  (cond / negative prompt)
        grad = (f - r) / mean_{c,t,h,w} |x0 - r|  (nan -> 0);   L = 0.5 MSE(x0, (x0 - grad).detach())  in float64
    """
    with torch.no_grad():
        xt, s = _renoise(x0.detach(), noise, t, table)
        tt = t.to(x0.device)
        neg = negative_text.expand_as(text) if negative_text.shape[0] != text.shape[0] else negative_text
        fake = flow_to_x0(critic.fake(xt, tt, text, history), xt, s)
        if fake_guidance_scale != 0.0:
            fu = flow_to_x0(critic.fake(xt, tt, neg, history), xt, s)
            fake = fake + (fake - fu) * fake_guidance_scale
        real = flow_to_x0(critic.real(xt, tt, text, history), xt, s)
        if real_guidance_scale != 0.0:
            ru = flow_to_x0(critic.real(xt, tt, neg, history), xt, s)
            real = real + (real - ru) * real_guidance_scale
        norm = (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((fake - real) / norm)
    loss = 0.5 * F.mse_loss(x0.double(), (x0.double() - grad.double()).detach())
    return loss, {"dmd_grad_norm": float(grad.abs().mean())}


def critic_flow_loss(critic: ScoreCritic, x0_fake: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                     table: SigmaTable, text: torch.Tensor, history: History) -> torch.Tensor:
    """Fake-score denoising loss: ``mean (fake(x_t, t) - (eps - x0))^2`` on detached generator samples."""
    x0_fake = x0_fake.detach()
    xt, _ = _renoise(x0_fake, noise, t, table)
    v = critic.fake(xt, t.to(xt.device), text, history)
    return torch.mean((v.float() - (noise - x0_fake).float()) ** 2)


def gan_crop(x: torch.Tensor, scale: float, rng: torch.Generator | None,
             corners: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Random (H*scale) x (W*scale) crop per sample (official ``gan_crop_video_spatial``); returns the
    crops and their corners (pass ``corners`` to cut the same windows again)."""
    B, _, _, H, W = x.shape
    h, w = int(H * scale), int(W * scale)
    if corners is None:
        tops = torch.randint(0, H - h + 1, (B,), generator=rng).tolist()
        lefts = torch.randint(0, W - w + 1, (B,), generator=rng).tolist()
        corners = list(zip(tops, lefts))
    return torch.stack([x[i, :, :, a:a + h, c:c + w] for i, (a, c) in enumerate(corners)]), corners


def gan_loss(logits: torch.Tensor, label: int) -> torch.Tensor:
    """Official ``cal_gan_loss``: ``mean softplus(label * logits)`` over the batch and all heads
    (label 1: push logits down, -1: push them up). Real samples get low logits, fakes high."""
    return F.softplus(logits.float() * label).mean()


class _InputGradLoss(torch.autograd.Function):
    """Official ``Gan_D_Loss_With_Cached_Grad``: the loss and its gradient w.r.t. the input are computed
    in the forward (the critic's activations are freed right away); backward only hands that gradient on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            loss = fn(xd)
            (g,) = torch.autograd.grad(loss, xd)
        ctx.save_for_backward(g)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (g,) = ctx.saved_tensors
        return g * grad_output, None


def generator_gan_loss(critic: ScoreCritic, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       table: SigmaTable, text: torch.Tensor, history: History, crop_scale: float,
                       rng: torch.Generator | None) -> torch.Tensor:
    """``L_G = mean softplus(D(crop(renoise(x0, t))))``: gradient to x0 (hence G) only, never to the critic."""
    xt, _ = _renoise(x0, noise, t, table)  # differentiable in x0
    crop, _ = gan_crop(xt, crop_scale, rng)
    tt = t.to(x0.device)
    with critic.frozen():
        return _InputGradLoss.apply(crop, lambda c: gan_loss(critic.logits(c, tt, text, history), 1))


def discriminator_loss(critic: ScoreCritic, x0_fake: torch.Tensor, x0_real: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, table: SigmaTable, text: torch.Tensor, history: History, gan: GANConfig,
                       rng: torch.Generator | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic GAN loss (official ``_critic_loss``, GAN part): fake and real re-noised with the same eps and
    t, random crops, one batched D forward over [fake, real, real + sigma_r1 n]:

        L = d_w [mean softplus(-D(fake)) + mean softplus(D(real))] + r1_w MSE(D(real), D(real + 0.1 n))
    """
    xf, _ = _renoise(x0_fake.detach(), noise, t, table)
    xr, _ = _renoise(x0_real.to(x0_fake.dtype), noise, t, table)
    cf, _ = gan_crop(xf, gan.crop_scale, rng)
    cr, corners = gan_crop(xr, gan.crop_scale, rng)
    cp, _ = gan_crop(xr, gan.crop_scale, rng, corners if gan.r1_same_crop else None)
    cp = cp + gan.r1_sigma * noise_like(cp, rng)
    B = x0_fake.shape[0]
    rep = {k: torch.cat([v] * 3) for k, v in history.items()}
    logits = critic.logits(torch.cat([cf, cr, cp]), t.to(xf.device).repeat(3), torch.cat([text] * 3), rep)
    lf, lr, lp = logits[:B], logits[B:2 * B], logits[2 * B:]
    d_fake = gan_loss(lf, -1) * gan.d_weight
    d_real = gan_loss(lr, 1) * gan.d_weight
    r1 = gan.r1_weight * F.mse_loss(lr.float(), lp.float())
    loss = d_fake + d_real + r1
    return loss, {"gan_d_loss": float((d_fake + d_real).detach()), "r1_loss": float(r1.detach()),
                  "d_real_logit": float(lr.detach().mean()), "d_fake_logit": float(lf.detach().mean())}
