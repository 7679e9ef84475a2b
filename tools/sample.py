"""Sample a trained DiM from its EMA snapshot: a PNG grid, and optionally an ADM-layout .npz for FID.

    python tools/sample.py --snapshot runs/NAME/snapshots/latest --labels 207,360,387 --out grid.png
    python tools/sample.py --snapshot runs/NAME/snapshots/latest --num-images 64 --upsample 2 --npz-out s.npz

Defaults are the snapshot's recorded sampling protocol, else the official ones (docs/reference.md §4.1):
DPM-Solver++ with 50 NFE, CFG s = 0.4 in the U-ViT form ε = ε_c + s (ε_c - ε_u) (DiT's w = 1 + s). Sample i uses
seed `--seed + i`, so a sample is the same whatever the batch size. `--upsample 2|3` generates at 2x / 3x the
training resolution with Upsample Guidance (docs/reference.md §5.2). Latent models are decoded with the SD VAE
from a local diffusers folder (--vae). Images become uint8 as clamp(127.5 x + 128, 0, 255) truncated, DiT's sample_ddp.py convention.
The flags are the ones tools/fid.py shares (dimscale/generate.py add_sampling_args).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dimscale.generate import (ImageGenerator, add_sampling_args, deprecated_alias, labels_from_args,  # noqa: E402
                               make_grid, output_path_dir, protocol_from_args)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshot", default=None,
                   help="EMA snapshot folder written by the trainer (runs/NAME/snapshots/latest)")
    p.add_argument("snapshot_positional", nargs="?", default=None, help=argparse.SUPPRESS)  # old spelling
    add_sampling_args(p, num_default=16)
    p.add_argument("--batch-size", type=int, default=16, help="images per forward")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:i]'")
    p.add_argument("--out", default="samples.png", help="PNG grid path")
    p.add_argument("--nrow", type=int, default=0, help="images per grid row (default: ~sqrt(N))")
    p.add_argument("--npz-out", default="", help="also write uint8 NHWC images as arr_0 (ADM evaluator layout)")
    deprecated_alias(p, "--npz", "--npz-out", dest="npz_out")
    deprecated_alias(p, "--num", "--num-images", dest="num_images", type=int)
    args = p.parse_args(argv)
    if args.snapshot_positional:
        if args.snapshot:
            p.error("give the snapshot once, as --snapshot DIR")
        import warnings
        warnings.warn("a positional snapshot is deprecated; use --snapshot DIR", FutureWarning, stacklevel=2)
        args.snapshot = args.snapshot_positional
    if not args.snapshot:
        p.error("--snapshot DIR is required (an EMA snapshot folder, e.g. runs/NAME/snapshots/latest)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    gen = ImageGenerator.from_snapshot(args.snapshot, device, args.vae)
    try:
        labels = labels_from_args(gen, args)
        proto = protocol_from_args(gen, args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    seeds = [args.seed + i for i in range(len(labels))]

    images = []
    with tqdm(total=len(labels), desc=f"sampling {proto.sampler} x{proto.upsample}", unit="img") as bar:
        for i in range(0, len(labels), args.batch_size):
            images.append(gen(labels[i:i + args.batch_size], seeds[i:i + args.batch_size], proto))
            bar.update(len(images[-1]))
    images = np.concatenate(images)                                       # (N, H, W, C) uint8

    make_grid(images, args.nrow).save(output_path_dir(args.out))
    print(f"wrote {args.out}: {len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]}, "
          f"{proto.sampler} {proto.steps} NFE, cfg s={proto.cfg_scale}, upsample x{proto.upsample}")
    if args.npz_out:
        np.savez(output_path_dir(args.npz_out), arr_0=images)
        print(f"wrote {args.npz_out}: arr_0 {images.shape} uint8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
