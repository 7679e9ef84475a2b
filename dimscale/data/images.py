"""Image readers shared by tools/make_shards.py, the loader and the metrics: IDX files, decode, mode, resize + crop."""
from __future__ import annotations

import gzip
import io
import typing

import numpy as np
from PIL import Image, ImageOps

if typing.TYPE_CHECKING:  # torch is not needed to read images (tools/make_shards.py workers never import it)
    import torch

# Quality of the one resampling step. Pillow's JPEG draft (DCT-domain 1/2, 1/4, 1/8 downscale while decoding)
# runs first when the source is at least twice the target: much faster and close to an area filter.
RESAMPLE = Image.Resampling.BICUBIC
ORIENTATION = 0x0112       # EXIF tag: 1 = upright; 5-8 are stored with width and height swapped
_IDX_CACHE: dict = {}


def read_idx(path: str) -> np.ndarray:
    """IDX file (MNIST / Fashion-MNIST, optionally .gz) -> uint8 array (N, ...); cached per process (fork shares it)."""
    if path not in _IDX_CACHE:
        with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
        if len(raw) < 4 or raw[:3] != b"\0\0\x08":
            raise ValueError(f"{path} is not an IDX file of uint8 values (magic {raw[:4].hex()})")
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        _IDX_CACHE[path] = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return _IDX_CACHE[path]


def orientation(im: Image.Image) -> int:
    """EXIF orientation of an opened image (1 when absent); read from the header, no pixels decoded."""
    try:
        return int(im.getexif().get(ORIENTATION, 1))
    except Exception:  # a garbled EXIF block: treat the image as upright rather than lose it
        return 1


def upright_size(im: Image.Image) -> tuple:
    """(w, h) as displayed: EXIF orientations 5-8 swap the stored sides."""
    w, h = im.size
    return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to 'RGB' (channels=3) or 'L' (channels=1); alpha is composited onto white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grey: Pillow's convert('L') clips at 255 instead of scaling, so scale by hand.
        a = np.asarray(im, dtype=np.int64)
        peak = 65535 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        im = Image.fromarray((a * 255 // max(peak, 1)).clip(0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.asarray(im).clip(0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    want = "RGB" if channels == 3 else "L"
    return im if im.mode == want else im.convert(want)


def crop_box(w: int, h: int, tw: int, th: int) -> tuple:
    """Largest centered box of aspect tw:th inside a w x h image (left, top, right, bottom) in float pixels."""
    scale = max(tw / w, th / h)
    cw, ch = tw / scale, th / scale
    left, top = max(0.0, (w - cw) / 2), max(0.0, (h - ch) / 2)  # float rounding must not step outside
    return (left, top, min(float(w), left + cw), min(float(h), top + ch))


def resize_center_crop(im: Image.Image, tw: int, th: int, channels: int) -> Image.Image:
    """Decode `im` (lazily opened), turn it upright (EXIF), convert to RGB/L, scale to cover tw x th, center-crop."""
    turn = orientation(im)
    if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
        w, h = im.size
        sw, sh = (th, tw) if turn in (5, 6, 7, 8) else (tw, th)  # the target in stored (unrotated) pixels
        scale = max(sw / w, sh / h)
        im.draft("RGB" if channels == 3 else "L", (int(w * scale + 1), int(h * scale + 1)))
    if turn != 1:
        im = ImageOps.exif_transpose(im)  # a phone photo with Orientation=6 is stored sideways
    im = to_mode(im, channels)
    if im.size == (tw, th):
        return im
    return im.resize((tw, th), RESAMPLE, box=crop_box(*im.size, tw, th))


def decode_image(data: bytes, tw: int = 0, th: int = 0, channels: int = 3) -> Image.Image:
    """Encoded image bytes -> upright RGB / L Pillow image of exactly tw x th (tw = 0: at its own size)."""
    im = Image.open(io.BytesIO(data))
    if tw == 0:
        tw, th = upright_size(im)
    return resize_center_crop(im, tw, th, channels)


def decode(data: bytes, tw: int, th: int, channels: int) -> np.ndarray:
    """Encoded image bytes -> (th, tw, channels) uint8 array at the target size."""
    a = np.asarray(decode_image(data, tw, th, channels))
    return a[:, :, None] if a.ndim == 2 else a


def write_planes(im: Image.Image, out: np.ndarray) -> None:
    """Copy an RGB / L image into out (C, H, W) uint8, one band at a time (no HWC -> CHW transpose pass)."""
    for c, band in enumerate(im.getbands()):
        out[c] = np.frombuffer(im.tobytes("raw", band), np.uint8).reshape(out.shape[1:])


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, H, W) in [-1, 1]: x / 127.5 - 1 (what the VAE and the model take)."""
    return pixels.float().div_(127.5).sub_(1.0)
