"""Write WebDataset tar shards grouped by resolution bucket, then manifest.json (atomically, last).

    python tools/make_shards.py /data/imagenet/train shards/in256 --resolution 256 --workers 16
    python tools/make_shards.py /usr/share/datasets/fashion-mnist shards/fmnist32 --resolution 32 --format png
    python tools/make_shards.py photos/ shards/photos --labels labels.csv --num-jobs 4 --job-index 0

Inputs: a class-subfolder tree (ImageNet train layout; class index = sorted folder names), a flat folder plus a
labels file (CSV `file,label` or JSON {file: label}), or an IDX folder (Fashion-MNIST, Debian dataset-fashion-mnist).

How a run is laid out, so that reruns resume and machines never collide:
1. List the inputs, sorted by key. Read every image header (not the pixels) to get its size; a file that fails here
   is skipped and counted by reason. The bucket of each image is the nearest aspect ratio in the bucket table.
2. Each bucket's images, in key order, are cut into shards of --shard-size: shard `{bucket}-{i:05d}.tar` is a pure
   function of that fixed slice, so job j of --num-jobs writes shards j, j+J, ... and a rerun keeps finished shards.
3. A shard is written as .tmp, its sidecar `.json` (counts, skips, hash of its inputs) is written, then the tar is
   renamed: a shard is finished iff the tar exists and its sidecar's input hash matches.
4. Whichever job finds every shard finished writes manifest.json (all jobs compute the same one).
Bad inputs never stop the run; the exit code is non-zero only when nothing usable was written.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimscale.config import write_json_atomic  # noqa: E402
from dimscale.data.buckets import bucket_name, nearest_bucket, parse_bucket_table  # noqa: E402
from dimscale.data.images import read_idx, resize_center_crop, to_mode, to_model_input, upright_size  # noqa: E402

TOOL_VERSION = "1.0"
if sys.platform.startswith("linux"):
    # Keep ~256 kB image buffers off mmap/munmap: Pillow's decode path is ~2x faster (docs/engineering-notes.md §D.4).
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD
    _libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
Image.MAX_IMAGE_PIXELS = None  # we apply --max-pixels ourselves, so a bomb is counted rather than raised
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Record:
    """One input image: a file path, or row `index` of an IDX array file."""
    key: str
    label: int
    path: str
    index: int = -1


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------

def list_class_tree(root: str) -> tuple:
    """ImageNet layout root/CLASS/.../file -> records, {class name: index} (index = sorted folder order)."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise SystemExit(f"error: '{root}' has no class subfolders; for a flat folder pass --labels FILE")
    records = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames.sort()
            for f in sorted(filenames):
                if not f.startswith("."):
                    path = os.path.join(dirpath, f)
                    records.append(Record(os.path.splitext(os.path.relpath(path, root))[0], label, path))
    return unique_keys(records), {c: i for i, c in enumerate(classes)}


def unique_keys(records: list) -> list:
    """Files that share a stem (anim.gif, anim.png, anim.webp) keep their extension in the key, so keys are unique."""
    stems = Counter(r.key for r in records)
    for r in records:
        if stems[r.key] > 1:
            r.key += os.path.splitext(r.path)[1]
    return records


def read_labels_file(path: str) -> dict:
    """CSV (`file,label` rows, optional header) or JSON ({file: label} or [{"file":..,"label":..}]) -> {file: label}."""
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, list):
            data = {d["file"]: d["label"] for d in data}
        return {str(k): str(v) for k, v in data.items()}
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if rows and rows[0][0].strip().lower() in ("file", "filename", "path", "image"):
        rows = rows[1:]
    bad = [r for r in rows if len(r) < 2]
    if bad:
        raise SystemExit(f"error: labels file '{path}' row {bad[0]} needs two columns: file,label")
    return {r[0].strip(): r[1].strip() for r in rows}


def list_labeled_folder(root: str, labels_path: str) -> tuple:
    """Flat folder + labels file -> records; integer labels are kept, names get indices in sorted order."""
    labels = read_labels_file(labels_path)
    names = sorted(set(labels.values()))
    if all(n.lstrip("-").isdigit() for n in names):
        class_map = {n: int(n) for n in sorted(names, key=int)}
    else:
        class_map = {n: i for i, n in enumerate(names)}
    records = [Record(os.path.splitext(f)[0], class_map[lab], os.path.join(root, f)) for f, lab in labels.items()]
    return sorted(unique_keys(records), key=lambda r: r.key), class_map


def list_idx(root: str, split: str) -> tuple:
    """Fashion-MNIST / MNIST IDX folder -> records over `split` ('train', 't10k' or 'all')."""
    records = []
    for sp in (["train", "t10k"] if split == "all" else [split]):
        images = os.path.join(root, f"{sp}-images-idx3-ubyte.gz")
        read_idx(images)  # load before the pool forks, so workers share the pixels instead of re-reading them
        labels = read_idx(os.path.join(root, f"{sp}-labels-idx1-ubyte.gz"))
        records += [Record(f"{sp}-{i:05d}", int(lab), images, i) for i, lab in enumerate(labels)]
    names = FASHION_MNIST_CLASSES if "fashion" in os.path.abspath(root).lower() else [str(i) for i in range(10)]
    return records, {n: i for i, n in enumerate(names)}


def is_idx_folder(root: str) -> bool:
    return os.path.isdir(root) and any(f.endswith("-images-idx3-ubyte.gz") for f in os.listdir(root))


# ------------------------------------------------------------------------------------------------
# Per image: probe the header, then decode / convert / resize / encode
# ------------------------------------------------------------------------------------------------

def probe(rec: Record, min_size: int, max_pixels: int) -> tuple:
    """(w, h, None) from the header only, or (None, None, skip reason)."""
    if rec.index >= 0:
        h, w = read_idx(rec.path).shape[1:3]
    else:
        try:
            if os.path.getsize(rec.path) == 0:
                return None, None, "zero_byte"
            with Image.open(rec.path) as im:
                w, h = upright_size(im)  # EXIF-rotated photos are bucketed as they are displayed
        except Exception as e:  # any failure on one file is that file's skip reason, never the run's end
            return None, None, skip_reason(e)
    if w * h > max_pixels:
        return None, None, "decompression_bomb"
    if min(w, h) < min_size:
        return None, None, "too_small"
    return w, h, None


def skip_reason(e: Exception) -> str:
    """A per-file exception -> the reason it is counted under."""
    if isinstance(e, UnidentifiedImageError):
        return "not_an_image"
    if isinstance(e, Image.DecompressionBombError):
        return "decompression_bomb"
    if isinstance(e, (OSError, SyntaxError, ValueError)):
        return "unreadable"
    if isinstance(e, NotImplementedError):  # e.g. a DDS pixel format Pillow does not decode
        return "unsupported_format"
    return f"error_{type(e).__name__}"


def load_image(rec: Record, keep_bytes: bool) -> tuple:
    """(lazily opened Pillow image, original file bytes when `keep_bytes`, else None; None for IDX rows)."""
    if rec.index >= 0:
        return Image.fromarray(read_idx(rec.path)[rec.index]), None
    if not keep_bytes:  # let Pillow read the file itself: no extra copy of every input
        return Image.open(rec.path), None
    with open(rec.path, "rb") as f:
        raw = f.read()
    return Image.open(io.BytesIO(raw)), raw


def encode(im: Image.Image, fmt: str, quality: int) -> tuple:
    """-> (extension, bytes)."""
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, "JPEG", quality=quality)
    else:
        im.save(buf, "PNG", compress_level=4)
    return fmt, buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------

@dataclass
class ShardSpec:
    """A fixed, sorted slice of one bucket's records."""
    name: str
    bucket: tuple
    records: list   # [(record index in the sorted input list, Record, (w, h))]

    def input_hash(self) -> str:
        h = hashlib.sha1()
        for idx, rec, size in self.records:
            # keys of non-UTF-8 file names hold surrogates (os.fsdecode): hash their original bytes
            h.update(f"{idx}|{rec.key}|{rec.label}|{size}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def plan_shards(ok: list, table: list, shard_size: int) -> list:
    """Group (index, record, size) by nearest bucket, in key order, and cut each group into shards."""
    by_bucket = {b: [] for b in table}
    for item in ok:
        by_bucket[nearest_bucket(*item[2], table)].append(item)
    shards = []
    for b, items in by_bucket.items():
        for i in range(0, len(items), shard_size):
            shards.append(ShardSpec(f"{bucket_name(*b)}-{i // shard_size:05d}", b, items[i:i + shard_size]))
    return shards


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member with fixed metadata (mtime 0, root-less), so a shard's bytes depend only on its inputs."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    pad = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * pad


def process_shard(spec: ShardSpec, opts: dict, keep_pixels: bool = False) -> tuple:
    """Decode, convert, resize + center-crop and encode every image of a shard -> (samples, pixels, skipped)."""
    samples, pixels, skipped = [], [], Counter()
    tw, th = spec.bucket
    for idx, rec, (w, h) in spec.records:
        try:
            im, raw = load_image(rec, keep_bytes=opts["format"] == "orig")
            if opts["format"] == "orig" and raw is not None:
                im.load()  # prove the file decodes fully; the loader resizes at read time
                ext, data = (im.format or "img").lower().replace("jpeg", "jpg"), raw
                out = resize_center_crop(im, tw, th, opts["channels"]) if keep_pixels else None
            else:
                out = resize_center_crop(im, tw, th, opts["channels"])
                ext, data = encode(out, "png" if opts["format"] == "orig" else opts["format"], opts["quality"])
        except (OSError, SyntaxError, ValueError) as e:
            skipped["truncated" if "truncat" in str(e) or "broken" in str(e) else "corrupt"] += 1
            continue
        except Exception as e:  # whatever else one file raises (NotImplementedError, ...): skipped and counted
            skipped[skip_reason(e)] += 1
            continue
        meta = {"key": rec.key, "label": rec.label, "orig_size": [w, h], "bucket": bucket_name(tw, th)}
        samples.append({"__key__": f"{idx:09d}", ext: data, "cls": str(rec.label).encode(),
                        "json": json.dumps(meta).encode()})
        if keep_pixels:
            a = np.asarray(to_mode(out, 3))  # the VAE takes RGB, grey included
            pixels.append(a)
    return samples, pixels, skipped


def write_shard(out_dir: str, spec: ShardSpec, samples: list, skipped: Counter) -> dict:
    """tar -> .tmp, sidecar json, then rename: the tar appears only when complete."""
    path = os.path.join(out_dir, spec.name + ".tar")
    with open(path + ".tmp", "wb") as f:
        size = 0
        for s in samples:
            for ext, data in s.items():
                if ext != "__key__":
                    size += f.write(tar_member(f"{s['__key__']}.{ext}", data))
        # end of archive: two zero blocks, padded to a whole 10 kB record as tarfile does
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-(size + 2 * tarfile.BLOCKSIZE) % tarfile.RECORDSIZE)))
    side = {"shard": spec.name + ".tar", "bucket": bucket_name(*spec.bucket), "count": len(samples),
            "inputs": len(spec.records), "input_hash": spec.input_hash(), "skipped": dict(skipped),
            "classes": dict(Counter(int(s["cls"]) for s in samples))}
    write_json_atomic(path[:-4] + ".json", side, indent=1)
    os.replace(path + ".tmp", path)
    return side


def finished(out_dir: str, spec: ShardSpec):
    """The sidecar of a finished shard, or None."""
    tar, side = os.path.join(out_dir, spec.name + ".tar"), os.path.join(out_dir, spec.name + ".json")
    if not (os.path.exists(tar) and os.path.exists(side)):
        return None
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if meta.get("input_hash") == spec.input_hash() else None


# Worker side: options are set once per process (fork inherits them; spawn gets them via the initializer).
_OPTS: dict = {}


def _init_worker(opts: dict) -> None:
    _OPTS.update(opts)


def _probe_one(rec: Record) -> tuple:
    return probe(rec, _OPTS["min_size"], _OPTS["max_pixels"])


def _do_shard(spec: ShardSpec) -> tuple:
    """Pool task: a whole shard. With a VAE the main process encodes latents and writes the tar."""
    samples, pixels, skipped = process_shard(spec, _OPTS, keep_pixels=bool(_OPTS.get("vae")))
    if _OPTS.get("vae"):
        return spec, samples, pixels, skipped, None
    return spec, None, None, None, write_shard(_OPTS["out"], spec, samples, skipped)


# ------------------------------------------------------------------------------------------------
# Optional VAE moments (dimscale.diffusion.vae, written by the diffusion owner)
# ------------------------------------------------------------------------------------------------

def load_vae_encoder(path: str):
    """-> encode(pixels list of (H, W, 3) uint8) -> list of (8, h, w) float32 moments, batched, GPU if present."""
    try:
        import torch
        from dimscale.diffusion.vae import encode_moments, load_vae
    except ImportError as e:
        raise SystemExit(f"error: --vae needs dimscale.diffusion.vae (load_vae, encode_moments): {e}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = load_vae(path, device)

    def encode_batch(pixels: list, batch: int) -> list:
        out = []
        for i in range(0, len(pixels), batch):
            x = to_model_input(torch.from_numpy(np.stack(pixels[i:i + batch])).to(device).permute(0, 3, 1, 2))
            with torch.no_grad():
                out += list(encode_moments(vae, x).float().cpu().numpy())
        return out
    return encode_batch


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="class-subfolder tree, flat folder (with --labels) or IDX folder (Fashion-MNIST)")
    p.add_argument("out", help="output folder for shards and manifest.json")
    p.add_argument("--labels", default="", help="labels file (CSV file,label or JSON) for a flat folder")
    p.add_argument("--split", default="train", choices=["train", "t10k", "all"], help="IDX split")
    p.add_argument("--resolution", type=int, default=256, help="base side; the default bucket table keeps area ~ side^2")
    p.add_argument("--buckets", default="", help="bucket table 'WxH,WxH,...' (default: aspect table for --resolution)")
    p.add_argument("--format", default="jpg", choices=["jpg", "png", "orig"], help="stored image encoding")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--channels", type=int, default=0, choices=[0, 1, 3], help="0 = 1 for IDX (grey) else 3")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--min-size", type=int, default=-1, help="skip images with a shorter side (default resolution/4)")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="larger images count as decompression bombs")
    p.add_argument("--limit", type=int, default=0, help="use only the first N inputs in key order (0 = all)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="processes")
    p.add_argument("--num-jobs", type=int, default=1, help="machines sharing the work (disjoint shards)")
    p.add_argument("--job-index", type=int, default=0, help="this machine's index in [0, num-jobs)")
    p.add_argument("--vae", default="", help="local diffusers AutoencoderKL folder: also store latent moments")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not 0 <= a.job_index < a.num_jobs:
        p.error(f"--job-index {a.job_index} must be in [0, --num-jobs={a.num_jobs})")
    if a.shard_size <= 0 or a.resolution <= 0:
        p.error("--shard-size and --resolution must be positive")
    return a


def list_inputs(a) -> tuple:
    """-> (records sorted by key, class map, source description)."""
    if not os.path.exists(a.src):
        raise SystemExit(f"error: input '{a.src}' does not exist")
    if is_idx_folder(a.src):
        records, class_map = list_idx(a.src, a.split)
        kind = "idx"
    elif a.labels:
        records, class_map = list_labeled_folder(a.src, a.labels)
        kind = "labels"
    else:
        records, class_map = list_class_tree(a.src)
        kind = "class_folders"
    records.sort(key=lambda r: r.key)
    if a.limit:
        records = records[:a.limit]
    return records, class_map, {"kind": kind, "path": os.path.abspath(a.src), "labels": a.labels,
                                "split": a.split if kind == "idx" else None}


def build_manifest(a, out, shards, table, class_map, source, probe_skips, opts) -> dict:
    """Manifest from every shard's sidecar; None if some shard (maybe another job's) is not finished."""
    sides = [finished(out, s) for s in shards]
    if any(s is None for s in sides):
        return None
    skipped = Counter(probe_skips)
    buckets = {}
    for b in table:
        buckets[bucket_name(*b)] = {"size": list(b), "count": 0, "shards": []}
    for side in sides:
        skipped.update(side["skipped"])
        entry = buckets[side["bucket"]]
        entry["shards"].append({"url": side["shard"], "count": side["count"]})
        entry["count"] += side["count"]
    class_counts = Counter()
    for side in sides:
        class_counts.update({int(k): v for k, v in side["classes"].items()})
    return {"format": "dimscale-shards", "tool_version": TOOL_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source, "options": opts, "resolution": a.resolution, "channels": opts["channels"],
            "image_format": opts["format"], "latent": {"kind": "moments", "vae": a.vae, "key": "moments.npy"} if a.vae else None,
            "bucket_table": [list(b) for b in table], "buckets": buckets, "class_map": class_map,
            "num_classes": len(class_map), "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
            "total": sum(b["count"] for b in buckets.values()), "skipped": dict(sorted(skipped.items()))}


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    from tqdm import tqdm
    t0 = time.time()
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create the output folder '{a.out}': {e.strerror}") from None
    records, class_map, source = list_inputs(a)
    table = parse_bucket_table(a.buckets, a.resolution)
    channels = a.channels or (1 if source["kind"] == "idx" else 3)
    opts = {"resolution": a.resolution, "format": a.format, "quality": a.quality, "channels": channels,
            "shard_size": a.shard_size, "min_size": a.min_size if a.min_size >= 0 else a.resolution // 4,
            "max_pixels": a.max_pixels, "limit": a.limit, "num_inputs": len(records), "vae": a.vae}
    worker_opts = dict(opts, out=a.out)
    _init_worker(worker_opts)
    pool = mp.get_context("fork").Pool(a.workers, _init_worker, (worker_opts,)) if a.workers > 1 else None
    imap = pool.imap if pool else map

    # 1. headers -> sizes -> buckets -> shard plan (identical on every job)
    sizes = list(tqdm(imap(_probe_one, records, **({"chunksize": 64} if pool else {})), total=len(records),
                      unit="file", desc="headers", disable=a.no_progress, mininterval=1))
    probe_skips = Counter(reason for _, _, reason in sizes if reason)
    ok = [(i, rec, (w, h)) for i, (rec, (w, h, reason)) in enumerate(zip(records, sizes)) if not reason]
    shards = plan_shards(ok, table, a.shard_size)
    mine = shards[a.job_index::a.num_jobs]
    todo = [s for s in mine if finished(a.out, s) is None]

    # 2. this job's unfinished shards, in parallel; images/s in the progress bar
    encode_vae = load_vae_encoder(a.vae) if a.vae and todo else None
    bar = tqdm(total=sum(len(s.records) for s in todo), unit="img", desc="shards", disable=a.no_progress,
               mininterval=1, smoothing=0.1)
    try:  # per-file failures are counted inside the workers; what reaches here is the output folder failing
        for spec, samples, pixels, skipped, side in (imap(_do_shard, todo) if pool else map(_do_shard, todo)):
            if encode_vae is not None:
                for s, m in zip(samples, encode_vae(pixels, a.vae_batch)):
                    s["moments.npy"] = npy_bytes(m)
                write_shard(a.out, spec, samples, skipped)
            bar.update(len(spec.records))
    except OSError as e:
        raise SystemExit(f"error: writing shards to '{a.out}' failed: {e.strerror or e}; finished shards are "
                         f"kept, rerun the same command once it is writable") from None
    bar.close()
    if pool:
        pool.close()
        pool.join()

    # 3. summary of this job's shards; manifest when every job's shards are done
    sides = [finished(a.out, s) for s in mine]
    written = sum(s["count"] for s in sides if s)
    skips = Counter(probe_skips)
    for s in sides:
        skips.update(s["skipped"] if s else {})
    manifest = build_manifest(a, a.out, shards, table, class_map, source, probe_skips, opts)
    if manifest is not None:
        write_json_atomic(os.path.join(a.out, "manifest.json"), manifest, indent=1)
    print_summary(a, shards, mine, todo, sides, skips, written, manifest, time.time() - t0)
    return 0 if written > 0 else 1


def print_summary(a, shards, mine, todo, sides, skips, written, manifest, seconds) -> None:
    """Per-bucket shards/samples of this job, skip counts by reason, and where the manifest is."""
    per_bucket = {}
    for spec, side in zip(mine, sides):
        n, c = per_bucket.get(spec.name.rsplit("-", 1)[0], (0, 0))
        per_bucket[spec.name.rsplit("-", 1)[0]] = (n + 1, c + (side["count"] if side else 0))
    print(f"\n{'bucket':>12} {'shards':>7} {'images':>9}")
    for b, (n, c) in per_bucket.items():
        print(f"{b:>12} {n:>7} {c:>9}")
    print(f"{'total':>12} {len(mine):>7} {written:>9}   ({len(mine) - len(todo)} shards kept from an earlier run, "
          f"job {a.job_index}/{a.num_jobs}, {seconds:.1f} s)")
    for reason, n in sorted(skips.items()):
        print(f"{'skipped':>12} {reason:>18} {n:>6}")
    if manifest is not None:
        print(f"manifest: {os.path.join(a.out, 'manifest.json')} ({manifest['total']} images)")
    else:
        print(f"manifest: not yet; {sum(finished(a.out, s) is None for s in shards)} shards of other jobs are "
              f"unfinished (the last job to finish writes it; rerun any job to retry)")
    if written == 0:
        print("error: nothing usable was written", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
