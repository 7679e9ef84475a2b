"""Real test data for the shard tool and the loader: Fashion-MNIST rows, wallpaper-photo crops, corrupt files."""
from __future__ import annotations

import gzip
import os
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/
from tools.benchmarks.shards import photo_sources as bench_photo_sources, random_crop  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"
PHOTOS = "/usr/share/backgrounds/mate/nature"
INSTALL = "apt-get install -y --no-install-recommends dataset-fashion-mnist mate-backgrounds"

# (w, h) of crops with a known nearest bucket in the default 64-px table (see test_make_shards).
KNOWN_ASPECTS = {(120, 120): "64x64", (200, 100): "92x44", (100, 200): "44x92", (240, 80): "112x36",
                 (160, 120): "72x56", (90, 270): "36x112"}
BAD_FILES = {"zero_byte": 1, "not_an_image": 1, "truncated": 1, "too_small": 1, "decompression_bomb": 1,
             "unreadable": 1}


def require_data() -> None:
    """Fail (not skip) with the install command: a skipped data test in CI hides a missing install step."""
    missing = [p for p in (FASHION, PHOTOS) if not os.path.isdir(p)]
    if missing:
        pytest.fail(f"test data missing: {missing}; install it with: {INSTALL}")


def fashion_labels(n: int) -> np.ndarray:
    """The first n Fashion-MNIST train labels, read independently of the tool."""
    with gzip.open(os.path.join(FASHION, "train-labels-idx1-ubyte.gz")) as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)[:n]


def fashion_images(n: int) -> np.ndarray:
    with gzip.open(os.path.join(FASHION, "train-images-idx3-ubyte.gz")) as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]


def photo_sources() -> list:
    require_data()
    return bench_photo_sources(PHOTOS)


def png_header_only(path: str, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (a decompression bomb as seen by a header check)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def make_photo_tree(root: str, n_random: int = 60, seed: int = 0, classes: int = 3, bad: bool = True) -> dict:
    """Class-folder tree of photo crops: known aspects, random sizes/aspects, odd modes, and corrupt files.

    Returns {"good": number of images that must be written, "known": {relative key: expected bucket}}.
    """
    rng = np.random.default_rng(seed)
    srcs = photo_sources()
    dirs = [os.path.join(root, f"class_{c}") for c in range(classes)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    known, good = {}, 0
    for i, ((w, h), bucket) in enumerate(KNOWN_ASPECTS.items()):
        random_crop(srcs[i % len(srcs)], w, h, rng).save(os.path.join(dirs[i % classes], f"known_{i}.jpg"), quality=90)
        known[f"class_{i % classes}/known_{i}"] = bucket
        good += 1
    for i in range(n_random):
        aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(3.5))))
        side = int(rng.integers(24, 220))
        w, h = max(16, int(side * np.sqrt(aspect))), max(16, int(side / np.sqrt(aspect)))
        im = random_crop(srcs[i % len(srcs)], w, h, rng)
        ext = "png" if i % 5 == 0 else "jpg"
        im.save(os.path.join(dirs[i % classes], f"crop_{i:03d}.{ext}"), **({"quality": int(rng.integers(60, 96))} if ext == "jpg" else {}))
        good += 1
    # Modes that must be converted, not skipped: CMYK, 16-bit grey, palette with transparency, RGBA, LA.
    base = random_crop(srcs[0], 96, 96, rng)
    base.convert("CMYK").save(os.path.join(dirs[0], "mode_cmyk.jpg"))
    ramp = (np.linspace(0, 65535, 96 * 96).reshape(96, 96)).astype(np.uint16)
    Image.fromarray(ramp).save(os.path.join(dirs[1], "mode_16bit.png"))  # I;16: must not clip to white
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.info["transparency"] = 0
    pal.save(os.path.join(dirs[2], "mode_palette.png"), transparency=0)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(os.path.join(dirs[0], "mode_rgba.png"))
    base.convert("LA").save(os.path.join(dirs[1], "mode_la.png"))
    good += 5
    if bad:
        d = dirs[2]
        open(os.path.join(d, "bad_zero.jpg"), "wb").close()
        with open(os.path.join(d, "bad_text.jpg"), "w") as f:
            f.write("this is not an image\n")
        buf = open(os.path.join(dirs[0], "known_0.jpg"), "rb").read()
        with open(os.path.join(d, "bad_truncated.jpg"), "wb") as f:
            f.write(buf[: len(buf) // 2])
        Image.new("RGB", (6, 6), (200, 10, 10)).save(os.path.join(d, "bad_tiny.png"))
        png_header_only(os.path.join(d, "bad_bomb.png"), 200_000, 200_000)
        os.symlink(os.path.join(d, "does_not_exist.jpg"), os.path.join(d, "bad_dangling.jpg"))
    return {"good": good, "known": known}


def run_make_shards(*args) -> int:
    """tools/make_shards.py in this process (its pool forks from here)."""
    from tools.make_shards import main
    return main([str(a) for a in args] + ["--no-progress"])
