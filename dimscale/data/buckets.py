"""Resolution buckets: the (w, h) table, nearest-aspect assignment, and the per-step bucket schedule.

Write time (tools/make_shards.py): each image goes to the bucket whose aspect ratio is nearest in log space
(SDXL / PixArt-alpha aspect tables). Train time (loader.py): the bucket of step s is a pure function of
(seed, s), so every rank trains on the same bucket at every step and a resumed run replays the same sequence.
Per-bucket probability and micro-batch follow Open-Sora's bucket_config (docs/engineering-notes.md §A.3, §B.12).
"""
from __future__ import annotations

import math

import numpy as np

# Aspect ratios w/h of the default table: portrait 1:3 ... landscape 3:1 (PixArt's table spans 1:4 ... 4:1;
# the extremes hold almost no photos, docs/engineering-notes.md §D.1).
DEFAULT_ASPECTS = (1 / 3, 1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0, 3.0)


def bucket_name(w: int, h: int) -> str:
    return f"{w}x{h}"


def parse_bucket_name(name: str) -> tuple:
    """'320x192' -> (320, 192)."""
    try:
        w, h = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise ValueError(f"bucket '{name}' is not of the form WIDTHxHEIGHT (e.g. 256x256)") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"bucket '{name}' has a non-positive side")
    return w, h


def size_multiple(resolution: int) -> int:
    """Bucket sides are multiples of this: 16 px at 256 (latent 32, patch 2), 2 px for tiny pixel-space runs."""
    return max(2, resolution // 16)


def default_bucket_table(resolution: int) -> list:
    """[(w, h), ...] with area ~ resolution^2 and sides multiple of size_multiple(resolution), square first."""
    m = size_multiple(resolution)
    table = []
    for ar in sorted(DEFAULT_ASPECTS, key=lambda a: abs(math.log(a))):
        w = max(m, round(resolution * math.sqrt(ar) / m) * m)
        h = max(m, round(resolution / math.sqrt(ar) / m) * m)
        if (w, h) not in table:
            table.append((w, h))
    return table


def parse_bucket_table(spec: str, resolution: int) -> list:
    """'' -> default table; '256x256,320x192' -> that list."""
    if not spec:
        return default_bucket_table(resolution)
    return [parse_bucket_name(s.strip()) for s in spec.split(",") if s.strip()]


def nearest_bucket(w: int, h: int, table: list) -> tuple:
    """The table entry whose aspect ratio is nearest to w/h in log space (ties: earlier entry)."""
    target = math.log(w / h)
    return min(table, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def scaled_size(w: int, h: int, shard_resolution: int, resolution: int, multiple: int) -> tuple:
    """Bucket size when training at `resolution` from shards written at `shard_resolution` (downscale only)."""
    if resolution == shard_resolution:
        return w, h
    f = resolution / shard_resolution
    return max(multiple, round(w * f / multiple) * multiple), max(multiple, round(h * f / multiple) * multiple)


class BucketSchedule:
    """Which bucket step s trains on: a categorical draw seeded by (seed, s); identical on every rank."""

    def __init__(self, names: list, probs: list, micro_batches: list, seed: int):
        if not names:
            raise ValueError("no usable bucket: every bucket was empty or under-filled (see the warnings above)")
        p = np.asarray(probs, dtype=np.float64)
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"bucket probabilities must be >= 0 with a positive sum, got {list(probs)}")
        self.names, self.micro_batches, self.seed = list(names), list(micro_batches), seed
        self.cdf = np.cumsum(p / p.sum())

    def index(self, step: int) -> int:
        # One uniform per step from a counter-based generator: no state to save, O(1) to jump to any step.
        u = np.random.default_rng([self.seed, step, 0xB0C7E7]).random()
        return min(int(np.searchsorted(self.cdf, u, side="right")), len(self.names) - 1)

    def bucket(self, step: int) -> tuple:
        """(name, micro_batch) of step `step`."""
        i = self.index(step)
        return self.names[i], self.micro_batches[i]
