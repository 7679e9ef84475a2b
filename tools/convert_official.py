"""Convert a released official DiM checkpoint (or its SD VAE) into what dimscale loads.

    python tools/convert_official.py nnet_ema.pth --release imagenet256_H --out runs/official/imagenet256_H
    python tools/convert_official.py autoencoder_kl_ema.pth --vae --out assets/sd-vae-uvit

The nnet becomes an EMA snapshot (tools/sample.py, tools/fid.py, init.snapshot) that records the release's model
settings and its official sampling protocol; --release may be left out when the shapes identify one release.
--vae turns U-ViT's ldm-layout autoencoder_kl_ema.pth into a diffusers AutoencoderKL folder (--vae PATH of the
other tools). Any problem: one line naming the first bad key and what the file looks like, exit 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dimscale.official import RELEASES, OfficialCheckpointError, convert_file, convert_vae_file  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="NNET_EMA_PTH", help="official nnet_ema.pth / nnet.pth (or, with --vae, "
                                                              "autoencoder_kl_ema.pth)")
    p.add_argument("--release", default=None, metavar="NAME",
                   help=f"released config that trained it: {', '.join(RELEASES)} (default: the one the shapes "
                        f"identify)")
    p.add_argument("--out", required=True, help="snapshot folder to write (a diffusers folder with --vae)")
    p.add_argument("--vae", action="store_true", help="convert the SD KL-f8 autoencoder instead of the nnet")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.vae:
            dd = convert_vae_file(args.checkpoint, args.out)
            print(f"wrote {args.out}: diffusers AutoencoderKL, ddconfig {json.dumps(dd)}")
        else:
            meta = convert_file(args.checkpoint, args.out, args.release)
            print(f"wrote {args.out}: {meta['official']['release']} as {meta['model']['name']} "
                  f"(input {meta['model']['input_size']}, {meta['model']['pad_mode']}), sampling "
                  f"{json.dumps(meta['sampling'])}")
    except OfficialCheckpointError as e:
        print(f"convert_official: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
