"""Where the images for a metric come from, split over ranks so the result does not depend on the rank count.

Sources hand out uint8 images (C, H, W) with their global index and optional class label:
    NpzSource     .npz with arr_0 (N, H, W, C) uint8 (ADM evaluator / DiT sample_ddp format), labels from
                  arr_1 / labels if present; uncompressed members are memory-mapped, not loaded whole
    FolderSource  every image file under a folder, in sorted path order
    IdxSource     the Fashion-MNIST IDX files (/usr/share/datasets/fashion-mnist), the demo data
    ShardSource   WebDataset tar shards (tools/make_shards.py output), read in order
The images are cut into global batches of `batch` consecutive indices and batch k goes to rank k % world.
Every batch is therefore the same set of images whatever the world size, so the features (and the float64
sums, up to summation order) are the same on 1 or 64 ranks.
"""
from __future__ import annotations

import glob
import logging
import os
import zipfile
from collections import Counter

import numpy as np
import torch

from dimscale.data import tario
from dimscale.data.images import decode_image, read_idx as read_idx_file

log = logging.getLogger("dimscale.metrics")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def my_batches(num_images: int, batch: int, rank: int, world: int):
    """The global index ranges [start, stop) of the batches that belong to `rank`."""
    for k, start in enumerate(range(0, num_images, batch)):
        if k % world == rank:
            yield start, min(start + batch, num_images)


def rgb_tensor(data: bytes) -> torch.Tensor:
    """Encoded bytes -> uint8 (3, H, W) RGB at the image's own size (the package's one decoder)."""
    return torch.from_numpy(np.asarray(decode_image(data)).copy()).permute(2, 0, 1)


def _npz_member(path: str, key: str):
    """An array of an .npz: memory-mapped when stored uncompressed (np.savez), else read into memory."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)                                   # zip local file header
                name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
            if dtype.hasobject:
                raise ValueError(f"{path}:{key} holds Python objects; only plain arrays are read (no pickle)")
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    return np.load(path, allow_pickle=False)[key]


class NpzSource:
    """arr_0 (N, H, W, C) uint8 of an .npz (ADM reference batch, DiT/ADM sample file)."""

    def __init__(self, path: str):
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
        if "arr_0" not in keys:
            raise ValueError(f"{path} has no arr_0 (N, H, W, C) uint8 images (keys: {sorted(keys)}); "
                             "a stats-only file (mu, sigma) can be a reference but not an image source")
        self.path, self.images = path, _npz_member(path, "arr_0")
        if self.images.ndim != 4 or self.images.dtype != np.uint8 or self.images.shape[3] not in (1, 3):
            raise ValueError(f"{path}: arr_0 must be (N, H, W, 1|3) uint8, got {self.images.shape} {self.images.dtype}")
        label_key = next((k for k in ("arr_1", "labels") if k in keys), None)
        self.labels = np.load(path, allow_pickle=False)[label_key] if label_key else None
        if self.labels is not None and (self.labels.ndim != 1 or len(self.labels) != len(self.images)):
            self.labels = None                   # arr_1 of another meaning: ignore rather than mislabel

    def __len__(self):
        return len(self.images)

    def load(self, start: int, stop: int):
        x = torch.from_numpy(np.array(self.images[start:stop])).permute(0, 3, 1, 2)  # (B, C, H, W)
        y = None if self.labels is None else torch.from_numpy(self.labels[start:stop].astype(np.int64))
        return list(x), y


class FolderSource:
    """Every image under a folder (recursive, sorted paths); no labels."""

    def __init__(self, path: str):
        self.files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                            if f.lower().endswith(IMAGE_EXTS))
        if not self.files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {path}")

    def __len__(self):
        return len(self.files)

    def load(self, start: int, stop: int):
        imgs = []
        for f in self.files[start:stop]:
            with open(f, "rb") as fh:
                imgs.append(rgb_tensor(fh.read()))
        return imgs, None


def read_idx(folder: str = FASHION_MNIST, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST IDX files -> images (N, 28, 28) uint8, labels (N,) uint8."""
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [os.path.join(folder, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    if not all(os.path.isfile(p) for p in paths):
        raise FileNotFoundError(f"Fashion-MNIST not found at {folder}; install it with "
                                "`apt-get install -y --no-install-recommends dataset-fashion-mnist`")
    return read_idx_file(paths[0]), read_idx_file(paths[1])


class IdxSource:
    """Fashion-MNIST (grey, 28x28) as a source: `idx:train` or `idx:test`, optionally `idx:test:FOLDER`."""

    def __init__(self, split: str = "test", folder: str = FASHION_MNIST):
        self.images, self.labels = read_idx(folder, split)

    def __len__(self):
        return len(self.images)

    def load(self, start: int, stop: int):
        x = torch.from_numpy(self.images[start:stop].copy())[:, None]         # (B, 1, 28, 28)
        return list(x), torch.from_numpy(self.labels[start:stop].astype(np.int64))


def shard_urls(spec: str) -> tuple[list[str], list[int], int | None]:
    """Tar paths of a shard spec (make_shards manifest.json or its folder, a folder of .tar, a glob), their member
    size bounds, and the image count."""
    manifest = spec if spec.endswith(".json") else os.path.join(spec, "manifest.json")
    if os.path.isfile(manifest):
        m, base = tario.read_manifest(manifest)
        urls, limits = [], []
        for name, entry in m["buckets"].items():
            found = tario.shard_urls(entry, base, "")
            urls += found
            limits += [tario.bucket_member_limit(m, name)] * len(found)
        return urls, limits, m.get("total")
    urls = sorted(glob.glob(os.path.join(spec, "**", "*.tar"), recursive=True)) if os.path.isdir(spec) \
        else sorted(glob.glob(spec))
    if not urls:
        raise ValueError(f"no WebDataset shards at {spec} (expected manifest.json, a folder of .tar or a glob)")
    return urls, [tario.member_limit(tario.DEFAULT_MAX_PIXELS, 1)] * len(urls), None


class ShardSource:
    """Shards read in order; every rank walks the tar stream but decodes only its own batches.

    A shard that fails to open (in time) or is cut short is skipped and counted in `skipped`, like the loader.
    """

    sequential = True

    def __init__(self, spec: str):
        self.urls, self.limits, self.count = shard_urls(spec)
        self.skipped = Counter()

    def __len__(self):
        if self.count is None:
            raise TypeError("the image count of these shards is unknown (no manifest.json)")
        return self.count

    def samples(self):
        """Every sample of every shard, in order; unreadable shards and samples are skipped and counted."""
        for url, limit in zip(self.urls, self.limits):
            yield from tario.shard_samples(url, limit, self.skipped)

    def batches(self, batch: int, rank: int, world: int, limit: int | None = None):
        """Yield (start, images, labels) for this rank's global batches, in order."""
        # No node/worker splitting: the split is by global batch below, so all ranks see the same order.
        imgs, labels, start = [], [], 0
        for i, sample in enumerate(self.samples()):
            if limit is not None and i >= limit:
                break
            if (i // batch) % world == rank:
                key = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
                if key is None:
                    raise ValueError(f"shard sample {sample.get('__key__')} has no jpg/png/webp image "
                                     f"(keys {sorted(sample)}); latent-only shards cannot be a pixel reference")
                imgs.append(rgb_tensor(sample[key]))
                cls = sample.get("cls")
                labels.append(int(cls.decode() if isinstance(cls, bytes) else cls) if cls is not None else -1)
                if len(imgs) == 1:
                    start = i
            if imgs and (i + 1) % batch == 0 and (i // batch) % world == rank:
                yield start, imgs, torch.tensor(labels)
                imgs, labels = [], []
        if imgs:
            yield start, imgs, torch.tensor(labels)


def open_source(spec: str):
    """An image source from a path: .npz, a folder of images, shards (manifest/.tar/glob), or idx:train|test."""
    if spec.startswith("idx:"):
        parts = spec.split(":", 2)
        return IdxSource(parts[1] if len(parts) > 1 and parts[1] else "test", parts[2] if len(parts) > 2 else FASHION_MNIST)
    if spec.endswith(".npz"):
        return NpzSource(spec)
    if spec.endswith((".json", ".tar")) or "*" in spec or os.path.isfile(os.path.join(spec, "manifest.json")):
        return ShardSource(spec)
    if os.path.isdir(spec):
        if glob.glob(os.path.join(spec, "**", "*.tar"), recursive=True):
            return ShardSource(spec)
        return FolderSource(spec)
    raise FileNotFoundError(f"image source {spec!r} not found: pass an .npz (arr_0 NHWC uint8), an image folder, "
                            "WebDataset shards (manifest.json / folder of .tar / glob) or idx:test")


def iter_source(source, batch: int, rank: int, world: int, limit: int | None = None):
    """Yield (indices (B,), list of uint8 (C, H, W), labels (B,) or None) for this rank's batches."""
    if getattr(source, "sequential", False):
        for start, imgs, labels in source.batches(batch, rank, world, limit):
            yield torch.arange(start, start + len(imgs)), imgs, labels
        return
    n = len(source) if limit is None else min(limit, len(source))
    for start, stop in my_batches(n, batch, rank, world):
        imgs, labels = source.load(start, stop)
        yield torch.arange(start, stop), imgs, labels
