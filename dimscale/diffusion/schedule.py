"""Discrete DDPM noise schedule and training objective (docs/reference.md §3.1, §1.10).

Index convention (U-ViT / DiM `Schedule`): the network step n runs 1..T and
    alphas_cumprod[n - 1] = ᾱ_n = prod_{k<=n} (1 - β_k),     x_n = √ᾱ_n x0 + √(1 - ᾱ_n) ε.
The samplers see the same schedule in continuous time t = n / T (DPM-Solver's NoiseScheduleVP('discrete')):
log α_t is the piecewise-linear interpolation of ½ log ᾱ_n over the knots t_n = n / T, and the network gets T·t.
"""
from __future__ import annotations

import numpy as np
import torch

from dimscale.config import DiffusionConfig

_DEFAULT = DiffusionConfig()   # the schedule's defaults are the config's, defined once there


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through knots (xp increasing, fp); the end segments extend to ±inf."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class Schedule:
    """SD 'scaled-linear' betas, β_n = linspace(√β_start, √β_end, T)² (train_ldm_discrete.py L23), in float64."""

    def __init__(self, num_timesteps: int = _DEFAULT.num_timesteps, beta_start: float = _DEFAULT.beta_start,
                 beta_end: float = _DEFAULT.beta_end, noise_shift: float = _DEFAULT.noise_shift):
        if num_timesteps < 2 or not 0.0 < beta_start < beta_end < 1.0 or noise_shift <= 0:
            raise ValueError(f"Schedule(num_timesteps={num_timesteps}, beta_start={beta_start}, beta_end={beta_end}, "
                             f"noise_shift={noise_shift}): need num_timesteps >= 2, 0 < beta_start < beta_end < 1 "
                             f"and noise_shift > 0")
        self.num_timesteps = T = num_timesteps
        self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - self.betas, dim=0)
        # resolution shift (not in the paper; Hoogeboom et al. 2023 "simple diffusion" Sec. 3.1, SD3 Sec. 5.3.2):
        # SNR_n / shift², so a model at k times the resolution sees the noise level of its pretraining at step n
        self.alphas_cumprod = abar / (abar + noise_shift ** 2 * (1.0 - abar))  # [n - 1] -> ᾱ_n
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)          # [n - 1] -> SNR_n, decreasing
        self.t_knots = torch.arange(1, T + 1, dtype=torch.float64) / T        # t_n = n / T
        self.log_alpha_knots = 0.5 * torch.log(self.alphas_cumprod)           # log α at t_n

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        """Build from a DiffusionConfig, or the `diffusion` dict a snapshot records (defaults for missing keys)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d: getattr(cfg, k, d)
        keys = ("num_timesteps", "beta_start", "beta_end", "noise_shift")
        return cls(*(get(k, getattr(_DEFAULT, k)) for k in keys))

    # ---- continuous time t in [1/T, 1], as DPM-Solver's NoiseScheduleVP('discrete') ----

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log α_t, linear in t between the knots t_n = n / T."""
        return _interp(t.double(), self.t_knots.to(t.device), self.log_alpha_knots.to(t.device))

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ_t = √(1 - α_t²) (variance preserving)."""
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR λ_t = log α_t - log σ_t (DPM-Solver's time variable)."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_of_lam(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of lam(): log α = -½ log(1 + e^{-2λ}), then t by inverting the log α interpolation."""
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam, dtype=torch.float64), -2.0 * lam.double())
        return _interp(la, self.log_alpha_knots.flip(0).to(lam.device), self.t_knots.flip(0).to(lam.device))

    # ---- discrete steps n in 1..T ----

    def q_sample(self, x0: torch.Tensor, n: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_n = √ᾱ_n x0 + √(1 - ᾱ_n) ε for integer steps n (B,) in 1..T; x0, noise (B, ...)."""
        abar = self.alphas_cumprod.to(x0.device)[n.long() - 1].view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt().to(x0.dtype) * x0 + (1.0 - abar).sqrt().to(x0.dtype) * noise


def image_generators(seed: int, step: int, index) -> list:
    """One CPU generator per image, seeded by (seed, global step, place in the global batch): the noise of an
    image does not depend on which rank draws it or on the world size (a resume on other ranks trains the same)."""
    seeds = (np.random.SeedSequence([seed, step, int(q)]).generate_state(1, np.uint64)[0] for q in index)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw(generator, fn, batch: int, device: torch.device) -> torch.Tensor:
    """fn(generator, batch, generator's device) moved to `device`; for a list from image_generators, fn per image
    (a batch of one, each from its own generator) concatenated."""
    if isinstance(generator, list):
        return torch.cat([fn(g, 1, "cpu") for g in generator]).to(device)
    return fn(generator, batch, generator.device if generator is not None else device).to(device)


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by `null_class` with probability p (CFG training, docs/reference.md §1.10: p_uncond 0.1 / 0.15).

    The official code does this in the dataset (CFGDataset); we do it in the training step so data stays clean.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop_labels: p = {p} must be in [0, 1) (diffusion.p_uncond)")
    drop = draw(generator, lambda g, b, dev: torch.rand((b,), generator=g, device=dev), y.shape[0], y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def training_loss(model, x0: torch.Tensor, y: torch.Tensor, schedule: Schedule,
                  generator: torch.Generator | None = None, bf16_timesteps: bool = False,
                  min_snr_gamma: float = 0.0) -> torch.Tensor:
    """ε-prediction MSE (LSimple, docs/reference.md §3.1): n ~ U{1..T},
    loss = mean over all elements of (ε - ε_θ(x_n, n, y))².

    bf16_timesteps replicates the official quirk: `Schedule.sample` returns n in x0's dtype (bf16), so the
    network sees n rounded to steps of 2 above 256 and of 4 above 512; x_n itself uses the exact n. Off by default.
    min_snr_gamma > 0 weights each image's loss by min(SNR_n, γ) / SNR_n (Min-SNR-γ, Hang et al. 2023, eq. 9
    for ε-prediction): less weight on the nearly clean steps, which converges faster. 0 = LSimple, as the paper.
    """
    B, shape = x0.shape[0], x0.shape[1:]
    n = draw(generator, lambda g, b, dev: torch.randint(1, schedule.num_timesteps + 1, (b,), generator=g, device=dev),
             B, x0.device)
    noise = draw(generator, lambda g, b, dev: torch.randn((b, *shape), generator=g, device=dev, dtype=x0.dtype),
                 B, x0.device)
    x_n = schedule.q_sample(x0, n, noise)                     # (B, C, H, W)
    t = n.float()
    if bf16_timesteps:
        t = t.to(torch.bfloat16).float()
    eps = model(x_n, t, y)
    per_image = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)        # (B,)
    if min_snr_gamma > 0:
        snr = schedule.snr.to(x0.device)[n.long() - 1]
        per_image = per_image * snr.clamp(max=min_snr_gamma) / snr
    return per_image.mean()
