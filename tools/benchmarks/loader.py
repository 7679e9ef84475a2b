"""Loader images/s (read shards, decode, resize, flip, collate) vs a plain decode + resize loop over the same JPEGs.

    python tools/bench.py loader [--images 512] [--passes 3] [--reps 5]

Data: photo crops sharded at 256 px (JPEG q90, one 256x256 bucket), read at 192 px so every image is decoded
and resized. The floor decodes the same JPEG bytes from memory with the same helper in one plain loop (no tar,
no batching) and yields uint8 arrays, as the loader does. Each measurement covers `passes` passes over the
images. A repetition runs floor / 1 worker / 2 workers back to back (order rotated), so a machine whose speed
drifts (shared cores) hits the three alike; the ratios are the median of the per-repetition ratios. The floor and
the 1-worker loader (its worker and the process it feeds) run on the same one CPU, so on a host whose virtual
CPUs differ in speed the ratio compares pipelines, not CPUs; 2 workers get every CPU.
Targets: 1 worker >= 0.9 x floor; 2 workers >= 1.7 x 1 worker (needs two otherwise idle cores).
bytes_read_per_image(_4_ranks): shard bytes read per image delivered with 1 (4) ranks, vs the shards' own size.
"""
import argparse
import contextlib
import io
import os
import resource
import shutil
import statistics
import tarfile
import tempfile
import time

import torch

from tools.benchmarks.shards import PHOTOS, make_photo_files


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (DataLoader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def on_cpus(cpus: set):
    """Run the block (and the worker processes it starts) on `cpus` only."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pinned(fn, cpus: set):
    def run():
        with on_cpus(cpus):
            return fn()
    return run


def floor_loop(jpegs: list, side: int, passes: int) -> tuple:
    """(img/s, img per CPU-second) of decode + resize + asarray, one image after another."""
    from dimscale.data.images import decode
    t, c = time.perf_counter(), cpu_seconds()
    for _ in range(passes):
        for data in jpegs:
            decode(data, side, side, 3)
    n = passes * len(jpegs)
    return n / (time.perf_counter() - t), n / (cpu_seconds() - c)


def loader_rate(shards: str, side: int, workers: int, batches: int, micro_batch: int) -> tuple:
    """(img/s after the first 2 batches, img per CPU-second of the whole run incl. worker start-up)."""
    from dimscale.config import DataConfig
    from dimscale.data import build_loader
    cfg = DataConfig(shards=shards, resolution=side, num_workers=workers, shuffle_buffer=64)
    c = cpu_seconds()
    it = iter(build_loader(cfg, micro_batch, rank=0, world_size=1, seed=0))
    for _ in range(2):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * micro_batch / (time.perf_counter() - t)
    del it  # joins the workers, so their CPU time is counted
    return rate, (batches + 2) * micro_batch / (cpu_seconds() - c)


def bytes_per_image(shards: str, side: int, world: int, batches: int, micro_batch: int) -> float:
    """Shard bytes read per image delivered, summed over the ranks of a world (headers, samples, spooling)."""
    from dimscale.config import DataConfig
    from dimscale.data import build_loader
    cfg = DataConfig(shards=shards, resolution=side, num_workers=0, shuffle_buffer=64)
    read = images = 0
    for rank in range(world):
        loader = build_loader(cfg, micro_batch // world, rank=rank, world_size=world, seed=0, accumulation=1)
        it = iter(loader)
        for _ in range(batches):
            next(it)
        read, images = read + loader.counts()["bytes_read"], images + loader.counts()["images"]
    return read / images


def main(argv) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="bench.py loader")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--passes", type=int, default=3, help="passes over the images per measurement")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--side", type=int, default=192)
    p.add_argument("--photos", default=PHOTOS, help="folder of source photos to crop from")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from tools.make_shards import main as make_shards
    tmp = tempfile.mkdtemp(prefix="bench_loader_")
    try:
        make_photo_files(os.path.join(tmp, "src"), a.images, min_side=256, max_side=700, photos=a.photos)
        shards = os.path.join(tmp, "shards")
        with contextlib.redirect_stdout(io.StringIO()):
            make_shards([os.path.join(tmp, "src"), shards, "--resolution", "256", "--buckets", "256x256",
                         "--shard-size", "64", "--workers", "2", "--no-progress"])
        jpegs = []
        for f in sorted(os.listdir(shards)):
            if f.endswith(".tar"):
                with tarfile.open(os.path.join(shards, f)) as tar:
                    jpegs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
        batches = a.passes * len(jpegs) // a.micro_batch
        runs = {"floor": [], "one": [], "two": []}
        one_cpu, every_cpu = {min(os.sched_getaffinity(0))}, os.sched_getaffinity(0)
        steps = [("floor", pinned(lambda: floor_loop(jpegs, a.side, a.passes), one_cpu)),
                 ("one", pinned(lambda: loader_rate(shards, a.side, 1, batches, a.micro_batch), one_cpu)),
                 ("two", pinned(lambda: loader_rate(shards, a.side, 2, batches, a.micro_batch), every_cpu))]
        for rep in range(a.reps):
            for name, fn in steps[rep % 3:] + steps[:rep % 3]:  # rotate the order: no side always runs first
                runs[name].append(fn())
        # the shard-sharing cost of the global data order: every rank indexes the shards it touches
        shard_bytes = sum(os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards) if f.endswith(".tar"))
        per_image = {w: bytes_per_image(shards, a.side, w, len(jpegs) // a.micro_batch, a.micro_batch)
                     for w in (1, 4)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    ratio = statistics.median(o[0] / f[0] for o, f in zip(runs["one"], runs["floor"]))
    scaling = statistics.median(t[0] / o[0] for t, o in zip(runs["two"], runs["one"]))
    return {"bench": "loader", "metric": "loader img/s with 1 worker / plain decode+resize loop img/s",
            "ratio": round(ratio, 3), "target": 0.9, "ok": ratio >= 0.9 and scaling >= 1.7,
            "scaling_2_workers": round(scaling, 3), "scaling_target": 1.7,
            "floor_img_s": round(wall["floor"], 1), "loader_1_worker_img_s": round(wall["one"], 1),
            "loader_2_workers_img_s": round(wall["two"], 1),
            # images per CPU-second: what the pipeline costs, independent of how busy the machine is
            "cpu_ratio_1_worker": round(cpu["one"] / cpu["floor"], 3),
            "floor_img_per_cpu_s": round(cpu["floor"], 1), "loader_img_per_cpu_s": round(cpu["one"], 1),
            "bytes_read_per_image": round(per_image[1]), "bytes_read_per_image_4_ranks": round(per_image[4]),
            "shard_bytes_per_image": round(shard_bytes / len(jpegs)),
            "images": len(jpegs), "passes": a.passes, "micro_batch": a.micro_batch, "side": a.side, "reps": a.reps,
            "cpus": os.cpu_count(), "loadavg": round(os.getloadavg()[0], 2),
            "runs_img_s": {k: [round(r[0], 1) for r in v] for k, v in runs.items()}}
