"""SD-VAE helpers shared by the trainer, tools/make_shards.py and tools/sample.py (docs/reference.md §3.3).

Latent models train on z = scale · (μ + σ ε) with scale 0.18215, drawn fresh from the stored VAE moments.
The VAE is a diffusers AutoencoderKL loaded from a local folder (nothing downloads at run time).
"""
from __future__ import annotations

import os

import torch

from dimscale.config import VAE_FACTOR, VAE_SCALE  # noqa: F401  (re-exported: the VAE's constants)
from dimscale.data.images import to_model_input


def load_vae(path: str, device: str | torch.device = "cpu"):
    """AutoencoderKL from a local diffusers folder (config.json + weights), frozen, in eval mode."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"VAE folder '{path}' is missing or has no config.json; pass --vae PATH (or data.vae_path) pointing to a "
            f"local diffusers AutoencoderKL folder, e.g. one written by AutoencoderKL.save_pretrained "
            f"(the SD VAE 'stabilityai/sd-vae-ft-ema' saved locally)")
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL  # late: importing diffusers is slow
    try:
        vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"VAE folder '{path}' could not be loaded as a diffusers AutoencoderKL ({e}); "
                                f"pass --vae PATH to a valid local AutoencoderKL folder") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, x: torch.Tensor) -> torch.Tensor:
    """Posterior moments [μ, log σ²] (B, 2·4, H/8, W/8) of images x (B, 3, H, W) in [-1, 1] (what shards store)."""
    return vae.encode(x).latent_dist.parameters


def sample_latent(moments: torch.Tensor, scale: float = VAE_SCALE, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = scale · (μ + σ ε) from moments (B, 2C, h, w); log σ² clamped to [-30, 20] as diffusers/LDM do."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    from dimscale.diffusion.schedule import draw
    shape = mean.shape[1:]
    noise = draw(generator, lambda g, b, dev: torch.randn((b, *shape), generator=g, device=dev, dtype=mean.dtype),
                 mean.shape[0], mean.device)
    return scale * (mean + std * noise)


@torch.no_grad()
def decode(vae, z: torch.Tensor, scale: float = VAE_SCALE) -> torch.Tensor:
    """Images (B, 3, H, W), nominally in [-1, 1], from scaled latents z (B, 4, h, w)."""
    return vae.decode(z / scale).sample


class ModelInputs:
    """Turns a loader batch into the model input x0 for data.latent in {'none', 'moments', 'online'}."""

    def __init__(self, data_cfg, in_channels: int, device: torch.device):
        self.data, self.in_channels, self.device, self.vae = data_cfg, in_channels, device, None
        if data_cfg.latent == "online":
            self.vae = load_vae(data_cfg.vae_path, device)  # frozen, eval, no grad

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # the loader's pixels, made [-1, 1] here, on the device
            x = to_model_input(x)
        if self.data.latent == "online":  # docs/reference.md §3.3 (256): encode under no_grad, then sample
            x = encode_moments(self.vae, x.to(next(self.vae.parameters()).dtype))
        if self.data.latent != "none":  # a fresh posterior sample scale * (mu + sigma * eps) (docs/reference.md §3.3)
            return sample_latent(x.float(), self.data.vae_scale, generator)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the loader gives {x.shape[1]}-channel images but model.in_channels = "
                             f"{self.in_channels}; make them agree")
        return x.float()
