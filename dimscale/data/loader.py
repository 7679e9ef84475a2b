"""Streaming loader over tools/make_shards.py output: bucketed, rank/worker-split, exactly resumable.

    loader = build_loader(cfg.data, micro_batch=32, rank=rank, world_size=world, seed=cfg.train.seed)
    for batch in loader:            # {"x": (B, C, H, W) in [-1, 1], "y": (B,), "bucket": "256x256", "key": [...]}
        ...
        ckpt["data"] = loader.state_dict()          # small: a step counter and two ints per (lane, bucket)

Everything is a pure function of (seed, rank, step), so nothing random has to be saved
(docs/engineering-notes.md §B.8-B.12):
- Step s trains bucket `BucketSchedule.bucket(s)` on every rank (all ranks agree without talking).
- Batches are made in `lanes` (one per DataLoader worker; lane = s mod lanes). The DataLoader hands out batches
  round-robin over workers, so after restoring at step k, worker w serves lane (k + w) mod lanes.
- The samples of (bucket, rank, lane) form an endless stream over the shard sequence G = perm_0 + perm_1 + ...
  (perm_e: a seeded permutation of the bucket's shards for epoch e). Slot rank*lanes + lane reads G[slot::ranks*lanes]:
  within one pass the slots read disjoint shards, and no rank ever runs dry (resampling across epochs,
  docs/engineering-notes.md §B.8).
- Inside a shard, windows of `shuffle_buffer` samples are permuted (seeded by shard position and window), so a
  stream's position is two ints: (k-th shard of the stream, samples taken from it). Restoring opens the current
  shard and skips the taken samples as raw bytes (read, never decoded); earlier shards are not touched.
- A shard that fails to open or is cut short is skipped and counted; so is an undecodable sample.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
from collections import Counter

import numpy as np
import torch
from PIL import Image

from dimscale.data.buckets import BucketSchedule, parse_bucket_name, scaled_size, size_multiple
from dimscale.data.images import decode_image, write_planes
from dimscale.data.tario import bucket_member_limit, read_manifest, shard_samples, shard_urls  # noqa: F401

log = logging.getLogger("dimscale.data")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")


# ------------------------------------------------------------------------------------------------
# Manifest and bucket plan
# ------------------------------------------------------------------------------------------------

def plan_buckets(manifest: dict, data_cfg, micro_batch: int, world_size: int, lanes: int) -> tuple:
    """-> (names, probs, micro_batches, report lines) of the usable buckets; empty / under-filled ones are excluded."""
    table = data_cfg.buckets or {}
    unknown = sorted(set(table) - set(manifest["buckets"]))
    if unknown:
        raise ValueError(f"data.buckets names {unknown} that the shards do not have; "
                         f"available: {', '.join(b for b, e in manifest['buckets'].items() if e['count'])}")
    names, probs, mbs, report, empty = [], [], [], [], []
    for name, entry in manifest["buckets"].items():
        if table and name not in table:
            continue
        conf = table.get(name, {})
        bad = set(conf) - {"prob", "micro_batch"}
        if bad:
            raise ValueError(f"data.buckets['{name}'] has unknown keys {sorted(bad)}; use prob and micro_batch")
        mb, count = int(conf.get("micro_batch", micro_batch)), entry["count"]
        prob = float(conf.get("prob", count))
        if count == 0:
            empty.append(name)
            continue
        if prob <= 0:
            continue
        if count < mb * world_size:
            report.append(f"bucket {name}: under-filled ({count} images < micro_batch {mb} x {world_size} ranks), "
                          f"excluded; lower its micro_batch or write more images of this shape")
            continue
        if len(entry["shards"]) < world_size * lanes:
            report.append(f"bucket {name}: {len(entry['shards'])} shards < {world_size} ranks x {lanes} workers; "
                          f"streams share shards, so samples repeat sooner (write smaller shards)")
        names.append(name)
        probs.append(prob)
        mbs.append(mb)
    if empty:
        report.append(f"buckets with 0 images in the shards, excluded: {', '.join(empty)}")
    return names, probs, mbs, report


# ------------------------------------------------------------------------------------------------
# One bucket's endless sample stream for one (rank, lane) slot
# ------------------------------------------------------------------------------------------------

class ShardStream:
    """Raw samples of G[slot::n_slots]; state = [k, taken] (k-th shard of this stream, samples taken from it)."""

    def __init__(self, urls: list, slot: int, n_slots: int, seed: int, bucket_id: int, window: int,
                 state: list, skipped: Counter, max_member: int):
        self.urls, self.slot, self.n_slots, self.seed, self.bucket_id = urls, slot, n_slots, seed, bucket_id
        self.window, self.state, self.skipped, self.max_member = max(1, window), state, skipped, max_member
        self._it = None

    def shard_of(self, k: int) -> int:
        """Index into urls of this stream's k-th shard: position g of the epoch-concatenated permutations."""
        g = self.slot + k * self.n_slots
        n = len(self.urls)
        perm = np.random.default_rng([self.seed, self.bucket_id, g // n, 0x5A4D]).permutation(n)
        return int(perm[g % n])

    def _samples(self):
        """Raw samples from the current position on, advancing self.state; endless."""
        failed_in_a_row = 0
        while True:
            k, taken = self.state
            url = self.urls[self.shard_of(k)]
            ok = False
            try:
                for sample in self._windows(url, k, taken):
                    ok = True
                    self.state[1] += 1
                    yield sample
            except Exception as e:  # a truncated, corrupt, unopenable or hung shard is skipped and counted
                self.skipped[getattr(e, "reason", "corrupt_shard")] += 1
                log.warning("skipping the rest of shard %s: %s", url, str(e).split("\n")[0][:200])
            failed_in_a_row = 0 if ok or taken else failed_in_a_row + 1
            if failed_in_a_row > 2 * len(self.urls):
                raise RuntimeError(f"no shard of this bucket could be read ({len(self.urls)} tried, e.g. {url}); "
                                   f"check the shard paths or data.shard_url")
            self.state[:] = [k + 1, 0]

    def _windows(self, url: str, k: int, taken: int):
        """Samples of shard k in window-permuted order, skipping the first `taken` (read, not decoded)."""
        g = self.slot + k * self.n_slots
        raw = shard_samples(url, self.max_member, self.skipped)
        try:
            for w in itertools.count():
                chunk = list(itertools.islice(raw, self.window))
                if not chunk:
                    return
                start = w * self.window
                if start + len(chunk) <= taken:
                    continue
                order = np.random.default_rng([self.seed, self.bucket_id, g, w, 0x57]).permutation(len(chunk))
                for i in order[max(0, taken - start):]:
                    yield chunk[i]
        finally:
            raw.close()

    def next(self) -> dict:
        if self._it is None:
            self._it = self._samples()
        return next(self._it)


# ------------------------------------------------------------------------------------------------
# Batches of one lane (runs inside a DataLoader worker, or in the main process when num_workers=0)
# ------------------------------------------------------------------------------------------------

class LaneBatches(torch.utils.data.IterableDataset):
    """Batches of steps start, start+lanes, ... for lane start % lanes; worker w of a DataLoader takes start+w."""

    def __init__(self, spec: dict, start_step: int, lane_states: dict):
        self.spec, self.start_step, self.lane_states = spec, start_step, lane_states

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        yield from self.batches(self.start_step + worker)

    def batches(self, step: int):
        sp = self.spec
        lane = step % sp["lanes"]
        state = json.loads(json.dumps(self.lane_states.get(str(lane), {"streams": {}, "skipped": {}})))
        skipped = Counter(state["skipped"])
        schedule = BucketSchedule(sp["names"], sp["probs"], sp["micro_batches"], sp["seed"])
        slot = sp["rank"] * sp["lanes"] + lane
        streams = {name: ShardStream(sp["urls"][name], slot, sp["world_size"] * sp["lanes"], sp["seed"],
                                     sp["bucket_ids"][name], sp["window"], state["streams"].setdefault(name, [0, 0]),
                                     skipped, sp["max_member"][name])
                   for name in sp["names"]}
        while True:
            name, mb = schedule.bucket(step)
            xs, ys, keys = [], [], []
            while len(xs) < mb:
                sample = streams[name].next()
                try:
                    xs.append(self.decode_sample(sample, name))
                    ys.append(int(sample["cls"]))
                    keys.append(sample["__key__"])
                except Exception:  # undecodable image or missing field: skipped and counted
                    skipped["corrupt_sample"] += 1
            state["skipped"] = dict(skipped)
            yield {**self.collate(xs, step), "y": torch.tensor(ys, dtype=torch.long), "bucket": name, "key": keys,
                   "step": step, "_lane": lane, "_lane_state": json.loads(json.dumps(state))}
            step += sp["lanes"]

    def decode_sample(self, sample: dict, bucket: str):
        """-> Pillow image at the bucket's training size, or (8, h, w) float32 VAE moments."""
        if self.spec["latent"] == "moments":
            return np.load(io.BytesIO(sample["moments.npy"]), allow_pickle=False)
        tw, th = self.spec["sizes"][bucket]
        data = next(sample[k] for k in IMAGE_KEYS if k in sample)
        return decode_image(data, tw, th, self.spec["channels"])

    def collate(self, xs: list, step: int) -> dict:
        """Stack moments, or random-flip (seeded by rank and step) and stack pixels as uint8 (B, C, H, W)."""
        if self.spec["latent"] == "moments":
            return {"x": torch.from_numpy(np.stack(xs))}  # flipped moments != moments of the flipped image
        flip = np.zeros(len(xs), bool)
        if self.spec["random_flip"]:
            flip = np.random.default_rng([self.spec["seed"], self.spec["rank"], step, 0xF11]).random(len(xs)) < 0.5
        w, h = xs[0].size
        out = np.empty((len(xs), len(xs[0].getbands()), h, w), np.uint8)
        for i, (im, f) in enumerate(zip(xs, flip)):
            write_planes(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else im, out[i])
        # uint8 crosses the worker -> trainer pipe (4x less than float); the consumer makes floats
        return {"pixels": torch.from_numpy(out)}


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, H, W) in [-1, 1]."""
    return pixels.float().mul_(1 / 127.5).sub_(1.0)  # uint8 * float scalar takes a ~4x slower casting path


# ------------------------------------------------------------------------------------------------
# The loader the trainer holds
# ------------------------------------------------------------------------------------------------

class ShardLoader:
    """Endless iterable of batches with state_dict()/load_state_dict() and counts(); see the module docstring."""

    def __init__(self, data_cfg, micro_batch: int, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if data_cfg.channels not in (1, 3):
            raise ValueError(f"data.channels = {data_cfg.channels}; use 3 (RGB) or 1 (grey)")
        manifest, base = read_manifest(data_cfg.shards)
        lanes = max(1, data_cfg.num_workers)
        names, probs, mbs, report = plan_buckets(manifest, data_cfg, micro_batch, world_size, lanes)
        self.report = report
        if rank == 0:
            for line in report:
                log.warning(line)
        if not names:
            raise ValueError(f"no usable bucket in {data_cfg.shards}: " + "; ".join(report or ["no images"]))
        latent = data_cfg.latent
        if latent == "moments" and not manifest.get("latent"):
            raise ValueError(f"data.latent = 'moments' but {data_cfg.shards} holds no VAE moments; "
                             f"rerun tools/make_shards.py with --vae PATH, or set data.latent='none'")
        shard_res = manifest["resolution"]
        if data_cfg.resolution > shard_res or (latent == "moments" and data_cfg.resolution != shard_res):
            raise ValueError(f"data.resolution = {data_cfg.resolution} but the shards were written at {shard_res}; "
                             f"the loader only downsizes pixels (moments need equal sizes): write shards at "
                             f"--resolution {data_cfg.resolution}")
        multiple = size_multiple(data_cfg.resolution)
        self.manifest = manifest
        self.spec = {
            "names": names, "probs": probs, "micro_batches": mbs, "seed": seed, "rank": rank,
            "world_size": world_size, "lanes": lanes, "window": data_cfg.shuffle_buffer,
            "bucket_ids": {n: i for i, n in enumerate(manifest["buckets"])},
            "urls": {n: shard_urls(manifest["buckets"][n], base, data_cfg.shard_url) for n in names},
            "max_member": {n: bucket_member_limit(manifest, n) for n in names},
            "sizes": {n: scaled_size(*parse_bucket_name(n), shard_res, data_cfg.resolution, multiple) for n in names},
            "channels": data_cfg.channels, "latent": latent, "random_flip": data_cfg.random_flip,
        }
        self.num_workers = data_cfg.num_workers
        self.schedule = BucketSchedule(names, probs, mbs, seed)
        self.step = 0
        self.lane_states: dict = {}
        self.seen_bucket, self.seen_class = Counter(), Counter()

    def __iter__(self):
        dataset = LaneBatches(self.spec, self.step, self.lane_states)
        if self.num_workers > 0:
            # no pin_memory: the uint8 batch becomes a new float tensor here anyway
            batches = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
        else:
            batches = dataset.batches(self.step)
        for batch in batches:
            if batch["step"] != self.step:  # the DataLoader's round-robin order is what makes lanes line up
                raise RuntimeError(f"loader out of order: got step {batch['step']}, expected {self.step}")
            self.lane_states[str(batch.pop("_lane"))] = batch.pop("_lane_state")
            if "pixels" in batch:
                batch["x"] = to_model_input(batch.pop("pixels"))
            self.seen_bucket[batch["bucket"]] += len(batch["y"])
            self.seen_class.update(batch["y"].tolist())
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        """JSON-able: step, per-lane stream positions, skip counts and images seen (goes into the checkpoint)."""
        return {"version": 1, "step": self.step, "seed": self.spec["seed"], "rank": self.spec["rank"],
                "world_size": self.spec["world_size"], "lanes": self.spec["lanes"],
                "lane_states": json.loads(json.dumps(self.lane_states)),
                "seen_bucket": dict(self.seen_bucket), "seen_class": {str(k): v for k, v in self.seen_class.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly where `sd` was taken (same seed, world size and num_workers)."""
        for key in ("seed", "world_size", "lanes"):
            if sd[key] != self.spec[key]:
                name = {"lanes": "data.num_workers", "seed": "train.seed", "world_size": "the world size"}[key]
                raise ValueError(f"loader state was saved with {name} = {sd[key]}, this run has {self.spec[key]}; "
                                 f"exact resume needs the same value (restore it, or start the data stream afresh)")
        self.step = sd["step"]
        self.lane_states = json.loads(json.dumps(sd["lane_states"]))
        self.seen_bucket = Counter(sd["seen_bucket"])
        self.seen_class = Counter({int(k): v for k, v in sd["seen_class"].items()})

    def counts(self) -> dict:
        """Images seen per bucket and per class, and skips by reason, for the trainer's logs."""
        skipped = Counter()
        for state in self.lane_states.values():
            skipped.update(state["skipped"])
        return {"images": sum(self.seen_bucket.values()), "bucket": dict(self.seen_bucket),
                "class": dict(sorted(self.seen_class.items())), "skipped": dict(skipped)}


def build_loader(data_cfg, micro_batch: int, rank: int, world_size: int, seed: int) -> ShardLoader:
    """The shared contract: an endless, resumable loader of {"x", "y", "bucket"} batches for this rank."""
    return ShardLoader(data_cfg, micro_batch, rank, world_size, seed)
