"""make_shards images/s vs a bare decode + resize + encode + tar-write loop over the same photo files.

    python tools/bench.py shards [--images 300] [--reps 3]

Both sides do the same per-image work with the same helper (JPEG draft, convert, one bicubic resize + center crop
to the nearest bucket, JPEG q90 encode, tar member): the ratio measures the tool's own cost (listing, header
probe, shard plan, sidecars, manifest). Repetitions alternate ours / bare so CPU contention hits both alike.
"""
import argparse
import contextlib
import io
import os
import shutil
import statistics
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

PHOTOS = "/usr/share/backgrounds/mate/nature"


def photo_sources(folder: str = PHOTOS) -> list:
    """The wallpaper photos (Debian mate-backgrounds), decoded at 1/4 scale: ~400-640 px wide."""
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder} missing: apt-get install -y --no-install-recommends mate-backgrounds")
    out = []
    for f in sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png"))):
        im = Image.open(os.path.join(folder, f))
        im.draft("RGB", (im.width // 4, im.height // 4))
        out.append(im.convert("RGB"))
    return out


def random_crop(src: Image.Image, w: int, h: int, rng) -> Image.Image:
    """A w x h crop of `src` (scaled down first when the crop would not fit)."""
    s = min(1.0, src.width / w, src.height / h)
    cw, ch = int(w * s), int(h * s)
    x, y = rng.integers(0, src.width - cw + 1), rng.integers(0, src.height - ch + 1)
    return src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)


def make_photo_files(root: str, n: int, seed: int = 0, min_side: int = 200, max_side: int = 640,
                     photos: str = PHOTOS) -> None:
    """n JPEG crops (q90) of varied size and aspect ratio in 4 class folders."""
    rng = np.random.default_rng(seed)
    srcs = photo_sources(photos)
    for i in range(n):
        aspect = float(np.exp(rng.uniform(np.log(0.4), np.log(2.5))))
        side = int(rng.integers(min_side, max_side))
        w, h = int(side * np.sqrt(aspect)), int(side / np.sqrt(aspect))
        d = os.path.join(root, f"c{i % 4}")
        os.makedirs(d, exist_ok=True)
        random_crop(srcs[i % len(srcs)], w, h, rng).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def bare_loop(src: str, out_tar: str, resolution: int) -> int:
    """Decode + resize/crop + JPEG encode + tar write, one file after another, nothing else."""
    from dimscale.data.buckets import default_bucket_table, nearest_bucket
    from dimscale.data.images import resize_center_crop
    table = default_bucket_table(resolution)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(src) for f in fs)
    with tarfile.open(out_tar, "w") as tar:
        for i, path in enumerate(files):
            im = Image.open(path)
            im = resize_center_crop(im, *nearest_bucket(*im.size, table), 3)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return len(files)


def main(argv) -> dict:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="bench.py shards")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--photos", default=PHOTOS, help="folder of source photos to crop from")
    a = p.parse_args(argv)
    from tools.make_shards import main as make_shards
    tmp = tempfile.mkdtemp(prefix="bench_shards_")
    try:
        src = os.path.join(tmp, "src")
        make_photo_files(src, a.images, photos=a.photos)
        runs = {"ours": [], "bare": [], "ours_2_workers": []}  # (img/s, img per CPU-second)

        def timed(name, fn):
            t, c = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                fn()
            runs[name].append((a.images / (time.perf_counter() - t), a.images / (time.process_time() - c)))

        def tool(workers, shard_size):
            out = os.path.join(tmp, "out")
            assert make_shards([src, out, "--resolution", str(a.resolution), "--workers", str(workers),
                                "--shard-size", str(shard_size), "--no-progress"]) == 0
            shutil.rmtree(out)

        steps = [("ours", lambda: tool(1, 100)), ("bare", lambda: bare_loop(src, os.path.join(tmp, "bare.tar"),
                                                                             a.resolution)),
                 ("ours_2_workers", lambda: tool(2, 50))]
        for rep in range(a.reps):
            for name, fn in steps[rep % 3:] + steps[:rep % 3]:  # rotate the order: no side always runs first
                timed(name, fn)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    ratio = wall["ours"] / wall["bare"]
    return {"bench": "shards", "metric": "make_shards img/s (1 worker) / bare decode+resize+encode+tar loop img/s",
            "ratio": round(ratio, 3), "target": 0.9, "ok": ratio >= 0.9,
            "make_shards_img_s": round(wall["ours"], 1), "bare_loop_img_s": round(wall["bare"], 1),
            "make_shards_2_workers_img_s": round(wall["ours_2_workers"], 1),
            # images per CPU-second (--workers 1 runs in this process): the tool's own cost, whatever the load
            "cpu_ratio": round(cpu["ours"] / cpu["bare"], 3),
            "images": a.images, "reps": a.reps, "resolution": a.resolution, "cpus": os.cpu_count(),
            "loadavg": round(os.getloadavg()[0], 2),
            "runs_img_s": {k: [round(r[0], 1) for r in v] for k, v in runs.items()}}
