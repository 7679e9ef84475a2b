"""Snapshot (or model in memory) -> uint8 images: the one image generator that tools/sample.py, tools/fid.py, the
trainer's sample grids and the demo all call (EDM2's generate_images).

    gen = ImageGenerator.from_snapshot("runs/NAME/snapshots/latest", device)
    proto = gen.protocol(steps=25)                      # unset fields: the snapshot's recorded protocol, then defaults
    images = gen(labels, seeds, proto)                  # (B, H, W, C) uint8
    make_grid(images, nrow=8).save("grid.png")

The model is built from the snapshot's recorded config, the noise schedule from its recorded diffusion config,
and the sampling protocol (sampler, NFE, guidance scale, Upsample Guidance) from its `sampling` record when it has
one. Latent models are decoded with the SD VAE; images become uint8 as clamp(127.5 x + 128, 0, 255) truncated.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image

from dimscale.diffusion import SAMPLERS, Schedule, sample
from dimscale.config import VAE_FACTOR, VAE_SCALE
from dimscale.snapshot import load_snapshot, model_input_shape, recorded_sampling

UINT8 = "clamp(127.5*x + 128, 0, 255) truncated (DiT sample_ddp.py; = round((x+1)*127.5))"
CFG_CONVENTION = "U-ViT: eps = eps_c + s*(eps_c - eps_u); DiT/ADM guidance w = 1 + s"


@dataclasses.dataclass
class SamplingProtocol:
    """How samples are drawn; defaults are the official evaluation's (docs/reference.md §4.1, §5.2)."""
    sampler: str = "dpm++"
    steps: int = 50                  # model evaluations (NFE)
    cfg_scale: float = 0.4           # U-ViT form eps = eps_c + s (eps_c - eps_u); DiT's w = 1 + s
    upsample: int = 1                # resolution factor over training's, with Upsample Guidance when > 1
    ug_theta: float = 1.0            # Upsample Guidance weight θ
    ug_eta: float = 0.3              # Upsample Guidance window: t >= 1 - η
    ug_official: bool = False        # the official code's UG time values (diffusion/guidance.py ug_tau)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C): clamp(127.5 x + 128, 0, 255), truncated (DiT convention)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int = 0, pad: int = 2) -> Image.Image:
    """uint8 (N, H, W, C) -> one PIL image, nrow images per row (default ~sqrt(N)), `pad` black pixels between."""
    N, H, W, C = images.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    ncol = math.ceil(N / nrow)
    grid = np.zeros((pad + ncol * (H + pad), pad + nrow * (W + pad), C), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return Image.fromarray(grid[..., 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")


def class_labels(spec: str, num: int, num_classes: int, seed: int) -> torch.Tensor:
    """'uniform' (randint from seed, DiM's sample.py), 'balanced' (i mod classes) or comma-separated class ids."""
    if spec == "uniform":
        return torch.randint(0, num_classes, (num,), generator=torch.Generator().manual_seed(seed))
    if spec == "balanced":
        return torch.arange(num) % num_classes
    try:
        labels = torch.tensor([int(v) for v in spec.split(",")], dtype=torch.long)
    except ValueError:
        labels = torch.zeros(0, dtype=torch.long)
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"--labels {spec!r}: use 'uniform', 'balanced' or comma-separated class ids in "
                         f"[0, {num_classes})")
    return labels


class ImageGenerator:
    """A DiM with its recorded config, schedule and (for latent models) VAE, turning (labels, seeds) into images."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: torch.device, vae_path: str = ""):
        self.model, self.meta, self.device = model, meta, torch.device(device)
        self.shape, self.latent = model_input_shape(meta)           # (C, H, W) the model samples at
        self.num_classes = meta["model"]["num_classes"]
        self.schedule = Schedule.from_config(meta.get("diffusion", {}))
        data = meta.get("data", {})
        self.vae_scale = data.get("vae_scale", VAE_SCALE)
        self.vae_path = vae_path or data.get("vae_path", "")
        self.vae = None
        if self.latent:   # load now: a missing VAE fails before any sampling, naming --vae PATH
            from dimscale.diffusion.vae import load_vae
            self.vae = load_vae(self.vae_path, self.device)

    @classmethod
    def from_snapshot(cls, folder: str, device, vae_path: str = "") -> "ImageGenerator":
        model, meta = load_snapshot(folder, device)
        return cls(model, meta, device, vae_path)

    def protocol(self, **overrides) -> SamplingProtocol:
        """The snapshot's recorded protocol (its `sampling` record, its training cfg_scale) under `overrides`
        (None = not given); official defaults for the rest."""
        recorded = recorded_sampling(self.meta)
        fields = {f.name for f in dataclasses.fields(SamplingProtocol)}
        given = {**recorded, **{k: v for k, v in overrides.items() if v is not None}}   # None = flag not given
        given = {k: v for k, v in given.items() if k in fields}
        proto = SamplingProtocol(**given)
        if proto.sampler not in SAMPLERS and overrides.get("sampler") is None:
            raise ValueError(f"this snapshot records the official sampler {proto.sampler!r} "
                             f"({self.meta.get('sampling', {}).get('sde', 'not a DDPM solver')}), which dimscale does "
                             f"not implement; pass --sampler {'/'.join(SAMPLERS)} to sample it anyway")
        if proto.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {proto.sampler!r} is not one of {', '.join(SAMPLERS)}")
        return proto

    def output_shape(self, proto: SamplingProtocol) -> tuple[int, int, int]:
        """(H, W, C) of the uint8 images this protocol gives."""
        c, h, w = self.shape
        if self.latent:
            return h * VAE_FACTOR * proto.upsample, w * VAE_FACTOR * proto.upsample, 3
        return h * proto.upsample, w * proto.upsample, c

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor, seeds: list, proto: SamplingProtocol) -> np.ndarray:
        """uint8 (B, H, W, C) images for labels (B,); sample i starts from the noise of seeds[i] alone."""
        x = sample(self.model, labels, self.shape, sampler=proto.sampler, steps=proto.steps,
                   cfg_scale=proto.cfg_scale, seeds=seeds, schedule=self.schedule, upsample_factor=proto.upsample,
                   ug_theta=proto.ug_theta, ug_eta=proto.ug_eta, ug_official=proto.ug_official,
                   device=self.device)
        if self.vae is not None:
            from dimscale.diffusion.vae import decode
            x = decode(self.vae, x, self.vae_scale)
        return to_uint8(x)


# ------------------------------------------------------------------------------------------------
# The sampling flags, one spelling for every tool
# ------------------------------------------------------------------------------------------------

class _Deprecated(argparse.Action):
    """An old flag spelling kept for one release: warns once and stores into the new flag's destination."""

    def __init__(self, option_strings, dest, new="", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated and will be removed; use {self.new}", FutureWarning,
                      stacklevel=2)
        setattr(namespace, self.dest, values)


def deprecated_alias(parser, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept `old` as a spelling of `new` (help hidden)."""
    parser.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS, **kwargs)


def add_sampling_args(p: argparse.ArgumentParser, num_default: int) -> None:
    """--num-images --labels --seed --sampler --steps --cfg-scale --upsample --ug-theta --ug-eta --vae, shared by
    tools/sample.py and tools/fid.py eval. Unset protocol flags: the snapshot's recorded ones."""
    p.add_argument("--num-images", type=int, default=num_default,
                   help=f"number of images (default {num_default or 'see above'}; with explicit --labels, one each)")
    p.add_argument("--labels", default="uniform",
                   help="'uniform' (randint from --seed), 'balanced' (image i has class i mod classes), "
                        "or comma-separated class ids, one image each")
    p.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i; labels drawn from seed")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: the snapshot's, else dpm++")
    p.add_argument("--steps", type=int, default=None, help="model evaluations (NFE); default: the snapshot's, else 50")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="U-ViT guidance s (DiT w = 1 + s); default: the snapshot's, else 0.4")
    p.add_argument("--upsample", type=int, default=None, choices=(1, 2, 3),
                   help="resolution factor over training's, with Upsample Guidance (default: the snapshot's, else 1)")
    p.add_argument("--ug-theta", type=float, default=None, help="Upsample Guidance weight θ (default 1.0)")
    p.add_argument("--ug-eta", type=float, default=None, help="Upsample Guidance window: t >= 1 - η (default 0.3)")
    p.add_argument("--vae", default="", help="local diffusers AutoencoderKL folder (latent models; default: "
                                             "the snapshot's data.vae_path)")


def protocol_from_args(gen: ImageGenerator, args) -> SamplingProtocol:
    return gen.protocol(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, upsample=args.upsample,
                        ug_theta=args.ug_theta, ug_eta=args.ug_eta)


def labels_from_args(gen: ImageGenerator, args) -> torch.Tensor:
    """The classes of all --num-images images (explicit ids set the count)."""
    return class_labels(args.labels, args.num_images, gen.num_classes, args.seed)


def output_path_dir(path: str) -> str:
    """Create the folder a file will be written into; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path
