"""Classifier-free guidance, and Upsample Guidance for sampling above the training resolution
(docs/reference.md §1.10, §5.2).

Both wrap a denoiser into `eps_fn(x, t)`, where t (B,) is continuous time in (0, 1] and the network sees T·t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dimscale.diffusion.schedule import Schedule


def cfg_denoiser(model, labels: torch.Tensor, cfg_scale: float, num_timesteps: int = 1000):
    """ε(x, t) with CFG in the U-ViT form ε = ε_c + s (ε_c - ε_u) (eval_ldm_discrete.py `cfg_nnet`).

    DiT / most papers write the same thing as ε_u + w (ε_c - ε_u) with w = 1 + s, so the official s = 0.4 (256)
    and 0.7 (512) are DiT's w = 1.4 and 1.7. Unlike the official code, the conditional and unconditional passes run
    as one batched forward of 2B (labels, then `model.null_class`). s = 0 skips the unconditional pass.
    """
    null = torch.full_like(labels, model.null_class)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_model = t * num_timesteps                                          # (B,) U-ViT: model gets N·t
        if cfg_scale == 0:
            return model(x, t_model, labels)
        eps = model(torch.cat([x, x]), torch.cat([t_model, t_model]), torch.cat([labels, null]))  # (2B, C, H, W)
        eps_c, eps_u = eps.chunk(2)
        return eps_c + cfg_scale * (eps_c - eps_u)

    return eps_fn


def downsample(x: torch.Tensor, m: int) -> torch.Tensor:
    """D_m: m x m average pooling, (B, C, mH, mW) -> (B, C, H, W)."""
    return F.avg_pool2d(x, m)


def upsample(x: torch.Tensor, m: int) -> torch.Tensor:
    """U_m: nearest-neighbour upsampling, (B, C, H, W) -> (B, C, mH, mW)."""
    return F.interpolate(x, scale_factor=m, mode="nearest")


def ug_tau(schedule: Schedule, t: torch.Tensor, m: int, official: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, τ) of docs/reference.md §5.2: ᾱ_t is the discrete ᾱ at floor(T t); τ = n*/T with n* on the 1..T
    grid minimising |SNR_n - m² SNR(t)|, clamped to τ <= t. We keep τ on the same n/T grid the network was trained on.
    official=True reproduces `make_ufg_nnet` as coded (ug.json): floor of the float32 product t·T, and τ = n*/(T-1)
    (its grid index i maps to 1 - i/(T-1) while its SNR is read at step T-1-i), so the network sees n*·T/(T-1)."""
    T = schedule.num_timesteps
    acp, snr = schedule.alphas_cumprod.to(t.device), schedule.snr.to(t.device)
    n_t = (t.float() * T).long() if official else torch.floor(t.double() * T).long()
    n_t = n_t.clamp(1, T)
    abar_t = acp[n_t - 1]                                                    # (B,)
    target = m ** 2 * abar_t / (1.0 - abar_t)                                # m² SNR(t): pooled noise has 1/m² variance
    n_tau = (snr[None, :] - target[:, None]).abs().argmin(dim=1) + 1         # (B,)
    tau = torch.minimum(n_tau.double() / (T - 1 if official else T), t.double())
    return abar_t, tau


def upsample_guidance(eps_fn, schedule: Schedule, m: int, theta: float = 1.0, eta: float = 0.3, t_max: float = 1.0,
                      official: bool = False):
    """Wrap eps_fn for an m-times larger grid (Upsample Guidance, arXiv 2404.01709; official `make_ufg_nnet`,
    docs/reference.md §5.2):

        ε = ε_hi + w_t U_m( ε_lo / m - D_m(ε_hi) ),   ε_lo = eps_fn(D_m(x_t) / √P, τ),   P = ᾱ_t + (1 - ᾱ_t) / m²,
        w_t = θ · 1[t >= (1 - η) t_max].

    D_m(x_t) carries the noise at 1/m² variance, i.e. looks like a base-resolution sample at SNR m² SNR(t) (hence τ);
    dividing by √P restores unit variance. With θ = 0 this is exactly plain sampling at the high resolution.
    official=True uses the official code's time values for τ (see ug_tau); off by default.
    """
    if m < 1 or int(m) != m:
        raise ValueError(f"upsample factor m = {m} must be a positive integer (the official configs use 2 and 3)")

    def ug_eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_hi = eps_fn(x, t)                                                # (B, C, mH, mW)
        w = theta * (t >= (1.0 - eta) * t_max).to(x.dtype)                   # (B,)
        if m == 1 or not bool((w != 0).any()):
            return eps_hi
        abar_t, tau = ug_tau(schedule, t, m, official)
        P = (abar_t + (1.0 - abar_t) / m ** 2).to(x.dtype).view(-1, 1, 1, 1)
        eps_lo = eps_fn(downsample(x, m) / P.sqrt(), tau.to(t.dtype))       # (B, C, H, W) at the base grid
        return eps_hi + w.view(-1, 1, 1, 1) * upsample(eps_lo / m - downsample(eps_hi, m), m)

    return ug_eps_fn
