"""FID, Inception Score and precision/recall of generated samples against a reference, on any number of ranks.

    python tools/fid.py eval --snapshot runs/NAME/snapshots/latest --num-images 50000 --ref VIRTUAL_imagenet256.npz
    torchrun --nproc_per_node 8 -- tools/fid.py eval --snapshot ... --ref ...   (also deepspeed, srun)
    python tools/fid.py eval --samples samples.npz --ref ref.npz --pr           (an .npz, image folder or shards)
    python tools/fid.py ref data/shards/val --out ref.npz --keep-images 10000   (mu, sigma [, arr_0 for P/R])
    python tools/fid.py eval --snapshot ... --ref ref_fcd.npz --detector classifier:fmnist.safetensors  (NOT FID)

Every rank generates (or reads) its own global batches: batch k holds sample indices [kB, (k+1)B) and goes to
rank k % world, sample i uses seed `--seed + i` and label `labels[i]` (drawn once from `--seed`; the sampling
flags and their defaults are tools/sample.py's, from dimscale/generate.py), so the sample
set and every batch are the same on 1 or 64 ranks. Ranks accumulate float64 Σx and Σxxᵀ and all-reduce them
(EDM2 pattern); no image leaves its rank unless --npz-out asks for the ADM evaluator file.
Reference files: ADM reference batches (mu, sigma, arr_0) and pytorch-fid stats (mu, sigma); `ref` writes the same
layout plus a `protocol` entry naming the detector, so a mismatched reference is refused.
Conventions (recorded in the output): images -> uint8 as clamp(127.5x+128) truncated (DiT sample_ddp.py, =
round((x+1)·127.5), docs/engineering-notes.md §B.26); CFG s in the U-ViT form ε = ε_c + s(ε_c - ε_u), DiT/ADM w = 1 + s
(docs/reference.md §1.10); resize to 299 with TF1 bilinear by default (= TF / torch-fidelity), or pytorch-fid's.
The output is one JSON line (rank 0): metrics and the full protocol.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dimscale import distributed  # noqa: E402
from dimscale.distributed import comm_device, sum_all  # noqa: E402
from dimscale.generate import (CFG_CONVENTION, UINT8, ImageGenerator, add_sampling_args,  # noqa: E402
                               deprecated_alias, labels_from_args, protocol_from_args)
from dimscale.metrics.inception import RESIZE_MODES, load_inception, sha256_file  # noqa: E402
from dimscale.metrics.sources import iter_source, my_batches, open_source  # noqa: E402
from dimscale.metrics.stats import FeatureStats, all_gather_rows, frechet_distance, precision_recall  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--detector", default="inception",
                       help="'inception' (FID) or 'classifier:PATH' (offline demo stand-in: NOT FID)")
        q.add_argument("--inception", default="", help="path of the Inception weights file (default: torch hub cache)")
        q.add_argument("--resize", default="tf1", choices=RESIZE_MODES,
                       help="resize to 299: tf1 = TF/ADM/torch-fidelity bilinear; pytorch-fid = F.interpolate")
        q.add_argument("--offline", action="store_true", help="never try to download the Inception weights")
        q.add_argument("--batch-size", type=int, default=32, help="images per global batch (one rank's forward)")
        q.add_argument("--device", default="auto", help="'auto' (cuda:LOCAL_RANK if present), 'cpu' or 'cuda'")
        q.add_argument("--json-out", default="", help="also write the JSON record here (rank 0)")
        q.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="metrics of samples against a reference", allow_abbrev=False)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--snapshot", help="EMA snapshot folder: generate the samples on every rank")
    src.add_argument("--samples", help="samples: .npz (arr_0 NHWC uint8), image folder, shards, or idx:test")
    e.add_argument("--ref", required=True, help="reference: stats .npz (mu, sigma[, arr_0]) or an image source")
    add_sampling_args(e, num_default=0)   # --num-images 0: 50000 generated / every image read
    deprecated_alias(e, "--num-samples", "--num-images", dest="num_images", type=int)
    e.add_argument("--pr", action="store_true", help="also precision/recall (k=3) against the reference's arr_0")
    e.add_argument("--pr-ref-num", type=int, default=10000, help="reference images used for precision/recall")
    e.add_argument("--npz-out", default="", help="also gather the samples to rank 0 as arr_0 (ADM evaluator)")
    e.add_argument("--stats-out", default="", help="also write the samples' stats (mu, sigma, protocol) .npz")
    common(e)

    r = sub.add_parser("ref", help="reference statistics of an image source", allow_abbrev=False)
    r.add_argument("source", help=".npz (arr_0), image folder, WebDataset shards, or idx:train|test")
    r.add_argument("--out", required=True, help="output .npz: mu, sigma, protocol [, arr_0]")
    r.add_argument("--num-images", type=int, default=0, help="use the first N images only (default: all)")
    r.add_argument("--keep-images", type=int, default=0,
                   help="also store the first N images as arr_0 (P/R, ADM layout)")
    deprecated_alias(r, "--images", "--keep-images", dest="keep_images", type=int)
    common(r)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Ranks and detector
# ------------------------------------------------------------------------------------------------

def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world, device): the env of torchrun/deepspeed/srun; a plain gloo or nccl group when world > 1."""
    rank, local_rank, world = distributed.environment()
    device = distributed.init(local_rank, world, deepspeed=False, device_arg=device_arg)
    return rank, world, device


def load_detector(spec: str, args, device, rank: int):
    """Inception (rank 0 fetches the weights first, EDM-style) or the demo classifier."""
    if spec.startswith("classifier:"):
        from dimscale.metrics.classifier import load_classifier
        return load_classifier(spec.split(":", 1)[1], device)
    if spec != "inception":
        raise ValueError(f"--detector {spec!r}: use 'inception' or 'classifier:PATH'")
    if rank != 0 and dist.is_initialized():
        dist.barrier()                                       # wait for rank 0's download, if any
    model = load_inception(args.inception or None, args.resize, device, offline=args.offline)
    if rank == 0 and dist.is_initialized():
        dist.barrier()
    return model


def detector_protocol(det, args) -> dict:
    is_fid = det.name.startswith("inception")
    return {"detector": det.name, "feature_dim": det.dim, "detector_sha256": det.weights_sha256,
            "resize": args.resize if is_fid else "grey, bilinear antialias to 28x28",
            "metric_name": "FID" if is_fid else "FCD (Frechet distance in classifier features; NOT FID)"}


@torch.no_grad()
def features(det, images: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector outputs of a list of uint8 (C, H, W): stacked when the sizes agree, else image by image."""
    if all(im.shape == images[0].shape for im in images):
        return det(torch.stack(images).to(device))
    outs = [det(im[None].to(device)) for im in images]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def accumulate(det, batches, stats: FeatureStats, device, progress, world: int, keep_images: list | None = None,
               label_hits: torch.Tensor | None = None, keep_below: int | None = None) -> float:
    """Run the detector over this rank's batches into `stats` (and keep images of index < keep_below if asked)."""
    t0 = time.time()
    for indices, images, labels in batches:
        feats, logits = features(det, images, device)
        stats.update(feats, indices, logits)
        if label_hits is not None and labels is not None:        # classifier accuracy on intended labels
            known = labels >= 0                                      # shards without 'cls' give -1
            label_hits += torch.tensor([(logits.argmax(1).cpu()[known] == labels[known]).sum().item(),
                                        known.sum().item()], dtype=torch.float64)
        if keep_images is not None and (keep_below is None or indices.min() < keep_below):
            sel = indices < (keep_below if keep_below is not None else indices.max() + 1)
            keep_images.append((indices[sel], torch.stack(images)[sel]))
        if progress is not None:   # other ranks progress alike; count them so the bar shows the global img/s
            step = len(indices) * world
            progress.update(step if progress.total is None else min(step, progress.total - progress.n))
    return time.time() - t0


# ------------------------------------------------------------------------------------------------
# Samples from a snapshot
# ------------------------------------------------------------------------------------------------

def generated_batches(args, rank: int, world: int, device, proto: dict):
    """Yield this rank's (indices, uint8 images, labels) generated from the EMA snapshot."""
    gen = ImageGenerator.from_snapshot(args.snapshot, device, args.vae)
    labels = labels_from_args(gen, args)      # all N, drawn once from --seed, then sliced per batch
    sampling = protocol_from_args(gen, args)
    h, w, c = gen.output_shape(sampling)
    proto.update(checkpoint=os.path.abspath(args.snapshot),
                 checkpoint_sha256=sha256_file(os.path.join(args.snapshot, "ema.safetensors")),
                 images_seen=gen.meta.get("images_seen"), model=gen.meta["model"].get("name"),
                 **dataclasses.asdict(sampling), cfg_convention=CFG_CONVENTION, seed=args.seed,
                 seeds=f"seed + i for sample i in [0, {args.num_images})", labels=args.labels, uint8=UINT8,
                 sample_shape=[c, h, w] if not gen.latent else "VAE-decoded",
                 vae=gen.vae_path if gen.latent else None)
    for start, stop in my_batches(args.num_images, args.batch_size, rank, world):
        images = torch.from_numpy(gen(labels[start:stop], [args.seed + i for i in range(start, stop)], sampling))
        yield torch.arange(start, stop), list(images.permute(0, 3, 1, 2)), labels[start:stop]    # (C, H, W) uint8


# ------------------------------------------------------------------------------------------------
# Reference statistics
# ------------------------------------------------------------------------------------------------

def read_reference(path: str) -> dict:
    """mu, sigma (and arr_0, protocol if present) of an ADM reference batch / pytorch-fid / our .npz."""
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if not {"mu", "sigma"} <= keys:
            raise ValueError(f"{path} has no mu/sigma (keys {sorted(keys)}); compute them with "
                             f"`python tools/fid.py ref SOURCE --out REF.npz`, or pass an image source as --ref")
        ref = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
        ref["protocol"] = json.loads(str(z["protocol"])) if "protocol" in keys else None
    ref["has_images"] = "arr_0" in keys
    return ref


def check_reference(ref: dict, proto: dict, path: str):
    """Refuse statistics of another detector: their Fréchet distance is meaningless."""
    if ref["mu"].shape != (proto["feature_dim"],):
        raise ValueError(f"--ref {path}: mu has {ref['mu'].shape[0]} dims but {proto['detector']} gives "
                         f"{proto['feature_dim']}; compute the reference with the same --detector")
    theirs = ref["protocol"]
    if theirs and (theirs.get("detector") != proto["detector"] or theirs.get("detector_sha256") != proto["detector_sha256"]
                   or theirs.get("resize") != proto["resize"]):
        raise ValueError(f"--ref {path} was computed with detector {theirs.get('detector')} "
                         f"(sha256 {str(theirs.get('detector_sha256'))[:12]}, resize {theirs.get('resize')}), this run "
                         f"uses {proto['detector']} (sha256 {str(proto['detector_sha256'])[:12]}, resize "
                         f"{proto['resize']}); recompute it with `tools/fid.py ref` and the same flags")


def source_stats(det, source, args, rank, world, device, num, keep=False, desc="reference"):
    """All-reduced FeatureStats of an image source (this rank's batches only)."""
    stats = FeatureStats(det.dim, keep_features=keep)
    bar = tqdm(total=num, unit="img", desc=desc, disable=rank != 0 or args.no_progress, mininterval=1)
    seconds = accumulate(det, iter_source(source, args.batch_size, rank, world, num), stats, device, bar, world)
    bar.close()
    return stats.all_reduce(), seconds


def source_len(source, num: int) -> int | None:
    """Images to use: all of the source, or the first `num`; None when unknown (shards without a manifest)."""
    try:
        n = len(source)
    except TypeError:
        return num or None
    return min(n, num) if num else n


def gather_images(kept: list, rank: int) -> np.ndarray | None:
    """All ranks' kept (indices, uint8 images) -> rank 0 as (N, H, W, C) in index order."""
    idx = torch.cat([i for i, _ in kept]) if kept else torch.zeros(0, dtype=torch.long)
    imgs = torch.cat([x for _, x in kept]) if kept else None
    if dist.is_initialized():       # a rank with no images still needs the (C, H, W) to pad its share
        shape = torch.tensor(imgs.shape[1:] if imgs is not None else (0, 0, 0), device=comm_device())
        dist.all_reduce(shape, op=dist.ReduceOp.MAX)
        imgs = imgs if imgs is not None else torch.zeros((0, *shape.tolist()), dtype=torch.uint8)
        idx, imgs = all_gather_rows(idx, imgs)
    elif imgs is None:
        imgs = torch.zeros((0, 1, 1, 1), dtype=torch.uint8)
    return imgs[torch.argsort(idx)].permute(0, 2, 3, 1).numpy() if rank == 0 else None


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------

def cmd_ref(args, rank, world, device, det, proto) -> dict:
    source = open_source(args.source)
    num = source_len(source, args.num_images)
    kept = [] if args.keep_images else None
    stats = FeatureStats(det.dim)
    bar = tqdm(total=num, unit="img", desc="reference", disable=rank != 0 or args.no_progress, mininterval=1)
    batches = iter_source(source, args.batch_size, rank, world, num)
    seconds = accumulate(det, batches, stats, device, bar, world, kept, keep_below=args.keep_images)
    bar.close()
    stats.all_reduce()
    mu, sigma = stats.mean_cov()
    arr = gather_images(kept, rank) if kept is not None else None
    record = {"command": "ref", "source": args.source, "num_images": int(stats.n.item()), **proto,
              "world_size": world, "feature_seconds": seconds, "out": args.out}
    if rank == 0:
        extra = {"arr_0": arr} if arr is not None else {}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        np.savez(args.out, mu=mu, sigma=sigma, protocol=np.array(json.dumps(record)), **extra)
    return record


def cmd_eval(args, rank, world, device, det, proto) -> dict:
    t_start = time.time()
    is_fid = det.name.startswith("inception")
    # reference first: a wrong file should fail before any sampling
    ref_is_stats = args.ref.endswith(".npz") and "mu" in np.load(args.ref, allow_pickle=False).files
    if ref_is_stats:
        ref = read_reference(args.ref)
        check_reference(ref, proto, args.ref)
        ref_sha = sha256_file(args.ref)
    else:   # an image source: one pass gives the statistics and, with --pr, the features P/R needs
        ref_src = open_source(args.ref)
        ref_stats, _ = source_stats(det, ref_src, args, rank, world, device, source_len(ref_src, 0),
                                    keep=args.pr, desc="reference")
        ref = dict(zip(("mu", "sigma"), ref_stats.mean_cov()), has_images=True, stats=ref_stats)
        ref_sha = sha256_file(args.ref) if os.path.isfile(args.ref) else None

    record = {"command": "eval", "ref": os.path.abspath(args.ref), "ref_sha256": ref_sha, **proto}
    if args.snapshot:
        args.num_images = args.num_images or 50000
        batches = generated_batches(args, rank, world, device, record)
        num = args.num_images
    else:
        source = open_source(args.samples)
        num = source_len(source, args.num_images)
        batches = iter_source(source, args.batch_size, rank, world, num)
        record.update(samples=os.path.abspath(args.samples) if ":" not in args.samples[:4] else args.samples,
                      samples_sha256=sha256_file(args.samples) if os.path.isfile(args.samples) else None,
                      uint8="as stored")
    stats = FeatureStats(det.dim, num_classes=det.num_classes if is_fid else 0, keep_features=args.pr)
    hits = torch.zeros(2, dtype=torch.float64) if not is_fid else None
    kept = [] if args.npz_out else None
    bar = tqdm(total=num, unit="img", desc="samples", disable=rank != 0 or args.no_progress, mininterval=1)
    if dist.is_initialized():
        dist.barrier()            # time the parallel feature phase, not the ranks' start-up skew
    t_feat, cpu_feat = time.time(), time.process_time()
    accumulate(det, batches, stats, device, bar, world, kept, hits)
    bar.close()
    stats.all_reduce()
    seconds, cpu_seconds = time.time() - t_feat, time.process_time() - cpu_feat
    mu, sigma = stats.mean_cov()
    n = int(stats.n.item())
    metrics = {"fid" if is_fid else "fcd_not_fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"])}
    if is_fid:
        metrics["inception_score"], metrics["inception_score_std"] = stats.inception_score()
    if hits is not None:
        hits = sum_all(hits)
        metrics["classifier_accuracy"] = hits[0].item() / hits[1].item() if hits[1] > 0 else None
    if args.pr:
        if not ref.get("has_images"):
            raise ValueError(f"--pr needs reference images: {args.ref} has no arr_0 (write one with "
                             f"`tools/fid.py ref SOURCE --keep-images 10000`)")
        pr_src = open_source(args.ref)
        pr_num = source_len(pr_src, args.pr_ref_num)
        if "stats" in ref:     # the reference pass already kept its features: the first pr_num of them
            ref_feats = ref["stats"].gathered_features()[:pr_num]
        else:
            ref_feats = source_stats(det, pr_src, args, rank, world, device, pr_num, keep=True,
                                     desc="P/R reference")[0].gathered_features()
        metrics["precision"], metrics["recall"] = precision_recall(ref_feats, stats.gathered_features(), k=3)
        record["pr_protocol"] = f"k=3 nearest-neighbour manifolds (ADM evaluator), {pr_num} reference images"
    if args.npz_out:
        arr = gather_images(kept, rank)
        if rank == 0:
            np.savez(args.npz_out, arr_0=arr)
            record["npz_out"] = os.path.abspath(args.npz_out)
    if args.stats_out and rank == 0:
        np.savez(args.stats_out, mu=mu, sigma=sigma, n=np.array(n), protocol=np.array(json.dumps(record)))
    record.update(metrics=metrics, num_samples=n, world_size=world, feature_seconds=seconds,
                  feature_cpu_seconds_rank0=cpu_seconds,
                  images_per_s=n / seconds if seconds > 0 else None, wall_seconds=time.time() - t_start)
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world, device = setup_distributed(args.device)
    t0 = time.time()
    det = load_detector(args.detector, args, device, rank)
    proto = detector_protocol(det, args)
    record = (cmd_ref if args.cmd == "ref" else cmd_eval)(args, rank, world, device, det, proto)
    record["total_wall_seconds"] = time.time() - t0
    if rank == 0:
        line = json.dumps(record)
        if args.json_out:
            with open(args.json_out, "w") as f:
                f.write(line + "\n")
        print(line, flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
