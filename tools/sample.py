"""Sample a trained DiM from its EMA snapshot: a PNG grid, and optionally an ADM-layout .npz for FID.

    python tools/sample.py runs/NAME/snapshots/latest --labels 207,360,387 --out grid.png
    python tools/sample.py runs/NAME/snapshots/latest --num 64 --upsample 2 --vae assets/sd-vae-ft-ema --npz s.npz

Defaults are the official ones (docs/reference.md §4.1): DPM-Solver++ with 50 NFE, CFG s = 0.4 in the U-ViT form
ε = ε_c + s (ε_c - ε_u) (DiT's w = 1 + s). Sample i uses seed `--seed + i`, so a sample is the same whatever the
batch size. `--upsample 2|3` generates at 2x / 3x the training resolution with Upsample Guidance (docs/reference.md §5.2).
Latent models (snapshot data.latent != 'none') are decoded with the SD VAE from a local diffusers folder (--vae).
Images become uint8 as clamp(127.5 x + 128, 0, 255) truncated, DiT's sample_ddp.py convention.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dimscale.diffusion import SAMPLERS, Schedule, sample  # noqa: E402
from dimscale.snapshot import load_snapshot, model_input_shape  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", help="EMA snapshot folder written by the trainer (runs/NAME/snapshots/latest)")
    p.add_argument("--labels", default="", help="comma-separated class ids, one image each (default: random)")
    p.add_argument("--num", type=int, default=16, help="number of images when --labels is not given")
    p.add_argument("--seed", type=int, default=0,
                   help="image i starts from the noise of seed + i; random labels are drawn from seed")
    p.add_argument("--steps", type=int, default=50, help="number of model evaluations (NFE)")
    p.add_argument("--sampler", default="dpm++", choices=sorted(SAMPLERS))
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="U-ViT guidance s (DiT w = 1 + s); default: the snapshot's diffusion.cfg_scale, else 0.4")
    p.add_argument("--upsample", type=int, default=1, choices=(1, 2, 3), help="resolution factor over training's")
    p.add_argument("--ug-theta", type=float, default=1.0, help="Upsample Guidance weight θ")
    p.add_argument("--ug-eta", type=float, default=0.3, help="Upsample Guidance window: t >= 1 - η")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="samples.png", help="PNG grid path")
    p.add_argument("--nrow", type=int, default=0, help="images per grid row (default: ~sqrt(N))")
    p.add_argument("--npz", default="", help="also write uint8 NHWC images as arr_0 (ADM evaluator layout)")
    p.add_argument("--vae", default="", help="local diffusers AutoencoderKL folder (latent models; default: "
                                             "the snapshot's data.vae_path)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:i]'")
    return p.parse_args(argv)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C): clamp(127.5 x + 128, 0, 255), truncated (DiT convention)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, pad: int = 2) -> Image.Image:
    """uint8 (N, H, W, C) -> one PIL image, nrow images per row, `pad` black pixels between them."""
    N, H, W, C = images.shape
    ncol = math.ceil(N / nrow)
    grid = np.zeros((pad + ncol * (H + pad), pad + nrow * (W + pad), C), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return Image.fromarray(grid[..., 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    model, meta = load_snapshot(args.snapshot, device)
    mcfg, data, diff = meta["model"], meta.get("data", {}), meta.get("diffusion", {})

    shape, latent = model_input_shape(meta)
    vae = None
    if latent:
        from dimscale.diffusion.vae import decode, load_vae
        vae = load_vae(args.vae or data.get("vae_path", ""), device)   # fail before sampling, naming --vae PATH

    num_classes = mcfg["num_classes"]
    if args.labels:
        labels = torch.tensor([int(v) for v in args.labels.split(",")], dtype=torch.long)
    else:
        labels = torch.randint(0, num_classes, (args.num,), generator=torch.Generator().manual_seed(args.seed))
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        sys.exit(f"--labels must be class ids in [0, {num_classes}); got {args.labels!r}")
    seeds = [args.seed + i for i in range(len(labels))]
    schedule = Schedule.from_config(diff)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else diff.get("cfg_scale", 0.4)

    images = []
    with tqdm(total=len(labels), desc=f"sampling {args.sampler} x{args.upsample}", unit="img") as bar:
        for i in range(0, len(labels), args.batch_size):
            x = sample(model, labels[i:i + args.batch_size], shape, sampler=args.sampler, steps=args.steps,
                       cfg_scale=cfg_scale, seeds=seeds[i:i + args.batch_size], schedule=schedule,
                       upsample_factor=args.upsample, ug_theta=args.ug_theta, ug_eta=args.ug_eta, device=device)
            if vae is not None:
                x = decode(vae, x, data.get("vae_scale", 0.18215))
            images.append(to_uint8(x))
            bar.update(len(x))
    images = np.concatenate(images)                                       # (N, H, W, C) uint8

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    make_grid(images, args.nrow or math.ceil(math.sqrt(len(images)))).save(args.out)
    print(f"wrote {args.out}: {len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]}, "
          f"{args.sampler} {args.steps} NFE, cfg s={cfg_scale}, upsample x{args.upsample}")
    if args.npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.npz)), exist_ok=True)
        np.savez(args.npz, arr_0=images)
        print(f"wrote {args.npz}: arr_0 {images.shape} uint8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
