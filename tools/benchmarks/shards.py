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
    p = argparse.ArgumentParser(prog="bench.py shards")
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
        ours, bare, ours2, ours_cpu, bare_cpu = [], [], [], [], []
        for rep in range(a.reps):
            out = os.path.join(tmp, f"out{rep}")
            t, c = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                rc = make_shards([src, out, "--resolution", str(a.resolution), "--workers", "1",
                                  "--shard-size", "100", "--no-progress"])
            ours.append(a.images / (time.perf_counter() - t))
            ours_cpu.append(a.images / (time.process_time() - c))  # --workers 1 runs in this process
            assert rc == 0
            t, c = time.perf_counter(), time.process_time()
            n = bare_loop(src, os.path.join(tmp, f"bare{rep}.tar"), a.resolution)
            bare.append(n / (time.perf_counter() - t))
            bare_cpu.append(n / (time.process_time() - c))
            out2 = os.path.join(tmp, f"out2_{rep}")
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                make_shards([src, out2, "--resolution", str(a.resolution), "--workers", "2", "--shard-size", "50",
                             "--no-progress"])
            ours2.append(a.images / (time.perf_counter() - t))
            shutil.rmtree(out)
            shutil.rmtree(out2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med, med_bare = statistics.median(ours), statistics.median(bare)
    ratio = med / med_bare
    return {"bench": "shards", "metric": "make_shards img/s (1 worker) / bare decode+resize+encode+tar loop img/s",
            "ratio": round(ratio, 3), "target": 0.9, "ok": ratio >= 0.9,
            "make_shards_img_s": round(med, 1), "bare_loop_img_s": round(med_bare, 1),
            "make_shards_2_workers_img_s": round(statistics.median(ours2), 1),
            # images per CPU-second: the tool's own cost, independent of how busy the machine is
            "cpu_ratio": round(statistics.median(ours_cpu) / statistics.median(bare_cpu), 3),
            "images": a.images, "reps": a.reps, "resolution": a.resolution, "cpus": os.cpu_count(),
            "loadavg": round(os.getloadavg()[0], 2),
            "runs_img_s": {"ours": [round(v, 1) for v in ours], "bare": [round(v, 1) for v in bare],
                           "ours_2_workers": [round(v, 1) for v in ours2]}}
