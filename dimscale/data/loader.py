"""Streaming loader over tools/make_shards.py output: bucketed, one global data order, resumable on any world size.

    loader = build_loader(cfg.data, micro_batch=32, rank=rank, world_size=world, seed=cfg.train.seed,
                          accumulation=acc)
    for batch in loader:            # {"x": (B, C, H, W) uint8 pixels (dimscale.data.images.to_model_input makes
                                    #  them [-1, 1] on the device) or float32 VAE moments, "y": (B,),
                                    #  "bucket": "256x256", "key": [...],
        ...                         #  "step": global step, "index": [B places in the global batch]}
        ckpt["data"] = loader.state_dict()          # a global position: step + one cursor per bucket

Design: a global cursor per bucket (EDM2's global sample index, per bucket), not virtual slots. Which images
make up global step s is a function of (seed, s) alone, for any world size and data.num_workers:
- Step s trains bucket `BucketSchedule.bucket(s)`; its global batch is B = micro_batch(bucket) x M images, where
  M = world x accumulation = train.global_batch / train.micro_batch does not change with the world size.
- Bucket b's samples form one endless global sequence: shards in the order perm_0 + perm_1 + ... (perm_e: a
  seeded permutation of the bucket's shards for epoch e), each shard's samples permuted in windows of
  `shuffle_buffer`. The manifest's per-shard counts make position -> (shard, sample) plain arithmetic.
- Step s takes positions [cursor_b, cursor_b + B) of its bucket and moves the cursor on by B: one pass sees every
  sample once, whatever the world size, and no rank ever runs dry (epochs resample; unequal batch counts hang
  and resumed streams must not restart at batch 0: docs/engineering-notes.md §B.8-B.12).
- Place q of the global batch goes to rank q // (B / world); within a rank, micro-batch j of the step gets the
  j-th slice of micro_batch places. "The same global batch" = the same set of B keys, however it is split into
  micro-batches. Micro-batches start at multiples of micro_batch for every world size, so flips seeded by
  (step, first place) and the trainer's per-image noise seeded by `index` (q) are world-independent too.
- DataLoader workers take micro-batches round-robin (worker w: w, w + W, ...); each walks the schedule itself.
Why not virtual slots (mosaic streaming's canonical nodes): they tie world sizes to divisors of a fixed slot count
and keep one open shard stream per slot; a global cursor needs nothing but a step and a cursor per bucket.
Its cost: ranks share shards. A rank indexes each shard it touches by its tar headers (512 bytes per member) and
seeks past the members of other ranks' samples, so it never reads or decodes them; `bytes_read` counts it
(tools/bench.py loader reports bytes read per image delivered). Streams that cannot seek (pipe: URLs) are spooled
to a temporary file first, so each rank that touches such a shard reads all of it.
- A shard that fails to open or is cut short is counted once (per process) as corrupt_shard; a sample that
  does not decode is counted as corrupt_sample. Either way the place is filled by a stand-in: a seeded position
  in a later epoch (BucketSequence.replacement), a function of the position, so still world-independent.
"""
from __future__ import annotations

import bisect
import functools
import gc
import io
import itertools
import logging
import math
import mmap
import multiprocessing
import os
from collections import Counter, OrderedDict

import numpy as np
import torch
from PIL import Image

from dimscale.data.buckets import BucketSchedule, parse_bucket_name, scaled_size, size_multiple
from dimscale.data.images import decode_image, write_planes
from dimscale.data.tario import Shard, ShardError, bucket_member_limit, read_manifest, shard_urls

log = logging.getLogger("dimscale.data")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
STATE_VERSION = 2
IMAGE_BLOCKS_KEPT = 16  # a decode, a resize and a flip are live per image: 16 kept blocks are plenty
PREFETCH_FACTOR = 2  # micro-batches each DataLoader worker works ahead (torch's default)
SLOT_WAIT_S = 5.0  # a worker waiting for a free BatchSlots slot checks this often that the trainer is alive


# ------------------------------------------------------------------------------------------------
# Manifest and bucket plan
# ------------------------------------------------------------------------------------------------

def plan_buckets(manifest: dict, data_cfg, micro_batch: int, per_step: int) -> tuple:
    """-> (names, probs, micro_batches, report lines) of the usable buckets; empty / under-filled ones are excluded.

    per_step = world x accumulation micro-batches make one global step, so the plan never depends on the world size.
    """
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
        if count < mb * per_step:
            report.append(f"bucket {name}: under-filled ({count} images < its global batch of {mb * per_step} = "
                          f"micro_batch {mb} x {per_step} micro-batches per step), excluded; lower its micro_batch "
                          f"or write more images of this shape")
            continue
        names.append(name)
        probs.append(prob)
        mbs.append(mb)
    if empty:
        report.append(f"buckets with 0 images in the shards, excluded: {', '.join(empty)}")
    return names, probs, mbs, report


# ------------------------------------------------------------------------------------------------
# One bucket's global sample sequence: position -> (shard, sample), pure arithmetic on the manifest
# ------------------------------------------------------------------------------------------------

class BucketSequence:
    """Position p of bucket `bucket_id`'s endless sequence -> raw sample; keeps two shards open."""

    def __init__(self, urls: list, counts: list, seed: int, bucket_id: int, window: int, counter: Counter,
                 max_member: int):
        self.urls, self.counts, self.seed, self.bucket_id = urls, np.asarray(counts, np.int64), seed, bucket_id
        self.max_member = max_member  # tar members above this are skipped unread (dimscale/data/tario.py member_limit)
        self.window, self.counter, self.total = max(1, window), counter, int(np.sum(counts))
        self.open: OrderedDict = OrderedDict()
        self.bad: set = set()  # shards found damaged by this process: counted and logged once
        self.epoch = functools.lru_cache(maxsize=4)(self._epoch)
        self.window_order = functools.lru_cache(maxsize=64)(self._window_order)

    def _epoch(self, e: int) -> tuple:
        """(shard permutation, cumulative counts in that order) of epoch e, as lists (bisect: no numpy per image)."""
        perm = np.random.default_rng([self.seed, self.bucket_id, e, 0x5A4D]).permutation(len(self.urls))
        return perm.tolist(), np.cumsum(self.counts[perm]).tolist()

    def _window_order(self, e: int, g: int, w: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.bucket_id, e, g, w, 0x57]).permutation(n)

    def locate(self, p: int) -> tuple:
        """(shard index into urls, sample index inside the shard file) of position p."""
        e, o = divmod(p, self.total)
        perm, cum = self.epoch(e)
        g = bisect.bisect_right(cum, o)
        k = o - (cum[g - 1] if g else 0)
        w, j = divmod(k, self.window)
        wlen = min(self.window, int(self.counts[perm[g]]) - w * self.window)
        return perm[g], w * self.window + int(self.window_order(e, g, w, wlen)[j])

    def shard(self, i: int) -> Shard:
        if i not in self.open:
            if len(self.open) >= 2:
                self.open.popitem(last=False)[1].close()
            self.open[i] = Shard(self.urls[i], self.counter, self.max_member)
            if self.open[i].error is not None and i not in self.bad:
                self.bad.add(i)
                self.counter[self.open[i].skip_reason] += 1
                log.warning("skipping the unreadable part of shard %s: %s", self.urls[i],
                            str(self.open[i].error).split("\n")[0][:200])
        self.open.move_to_end(i)
        return self.open[i]

    def replacement(self, p: int, i: int) -> int:
        """The i-th stand-in for position p: a seeded position in epoch i after p's (any shard, any offset)."""
        offset = np.random.default_rng([self.seed, self.bucket_id, p, i, 0xBAD]).integers(self.total)
        return (p // self.total + i) * self.total + int(offset)

    def raw(self, p: int) -> dict:
        """Raw sample at position p; raises IndexError if the shard does not hold it (cut short or unreadable)."""
        i, k = self.locate(p)
        shard = self.shard(i)
        if k >= len(shard.samples):
            raise IndexError(k)
        return shard.sample(k)


# ------------------------------------------------------------------------------------------------
# Shared-memory slots the DataLoader workers write pixel batches into, reused batch after batch
# ------------------------------------------------------------------------------------------------

class BatchSlots:
    """Shared-memory buffers, PREFETCH_FACTOR + 1 per worker, that workers fill and the trainer's process empties.

    Why: a tensor a DataLoader worker returns lands in fresh shared memory every batch. The kernel zeroes and maps
    it page by page, a file descriptor per tensor travels over a socket, and both processes unmap and free it
    again: 10-20% of a 1-worker loader's time here (docs/engineering-notes.md §D.5). Made before the
    workers fork, the slots are mapped once. Worker w fills its slots in turn and sends only the slot's number;
    the trainer's process copies the pixels out (into pinned memory on CUDA: the copy pin_memory makes anyway) and
    releases the slot on w's semaphore, so a slot is never written while its pixels are still to be read. A worker
    has at most PREFETCH_FACTOR micro-batches in flight, so one more slot means it never waits.
    """

    def __init__(self, workers: int, nbytes: int):
        self.per_worker = PREFETCH_FACTOR + 1
        # anonymous MAP_SHARED memory: the fork-started workers share it; no file, no name, nothing left behind
        self.shared = mmap.mmap(-1, workers * self.per_worker * nbytes)
        self.memory = torch.frombuffer(self.shared, dtype=torch.uint8).view(workers * self.per_worker, nbytes)
        self.free = [multiprocessing.get_context("fork").Semaphore(self.per_worker) for _ in range(workers)]
        self.trainer_pid = os.getpid()
        self.turn = [0] * workers  # next slot of each worker, counted in the process that fills it

    def take(self, worker: int, shape: tuple) -> tuple:
        """(slot, uint8 array of `shape` on it) for worker `worker` to fill; waits until the slot is free."""
        while not self.free[worker].acquire(timeout=SLOT_WAIT_S):
            if os.getppid() != self.trainer_pid:  # never wait for a trainer that is gone
                raise RuntimeError("the loader's trainer process has exited")
        slot = worker * self.per_worker + self.turn[worker] % self.per_worker
        self.turn[worker] += 1
        return slot, self.memory[slot, :math.prod(shape)].view(shape).numpy()

    def copy_out(self, worker: int, slot: int, shape: tuple) -> torch.Tensor:
        """The trainer's side: copy slot's `shape` pixels into memory of this process, then free the slot."""
        x = torch.empty(shape, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        x.copy_(self.memory[slot, :math.prod(shape)].view(shape))
        self.free[worker].release()
        return x


# ------------------------------------------------------------------------------------------------
# Micro-batches of this rank (run inside DataLoader workers, or in the main process when num_workers=0)
# ------------------------------------------------------------------------------------------------

def walk_schedule(schedule: BucketSchedule, per_step: int, step: int, cursor: dict):
    """Yield (step, bucket, micro_batch, first position) from `step` on; cursor: {bucket: next position}."""
    cursor = dict(cursor)
    for s in itertools.count(step):
        name, mb = schedule.bucket(s)
        p = cursor.get(name, 0)
        cursor[name] = p + mb * per_step
        yield s, name, mb, p


class RankBatches(torch.utils.data.IterableDataset):
    """Micro-batches start, start + W, ... of this rank for worker w (start + w), W = max(1, num_workers)."""

    def __init__(self, spec: dict, start_step: int, cursor: dict, slots: BatchSlots | None = None):
        self.spec, self.start_step, self.cursor, self.slots = spec, start_step, cursor, slots

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        yield from self.batches(info.id if info is not None else 0)

    def batches(self, worker: int):
        sp = self.spec
        acc, world, lanes = sp["accumulation"], sp["world_size"], sp["lanes"]
        per_step = acc * world
        counter = Counter()
        schedule = BucketSchedule(sp["names"], sp["probs"], sp["micro_batches"], sp["seed"])
        seqs = {name: BucketSequence(sp["urls"][name], sp["counts"][name], sp["seed"], sp["bucket_ids"][name],
                                     sp["window"], counter, sp["max_member"][name]) for name in sp["names"]}
        micro = self.start_step * acc + worker
        for s, name, mb, p in walk_schedule(schedule, per_step, self.start_step, self.cursor):
            while micro // acc == s:
                q0 = (sp["rank"] * acc + micro % acc) * mb  # first place of this micro-batch in the global batch
                xs, ys, keys = [], [], []
                for q in range(q0, q0 + mb):
                    x, y, key = self.fill(seqs[name], p + q, name, counter)
                    xs.append(x)
                    ys.append(y)
                    keys.append(key)
                yield {**self.collate(xs, s, q0, worker), "y": ys, "bucket": name, "key": keys, "step": s,
                       "index": list(range(q0, q0 + mb)), "_micro": micro, "_counts": dict(counter)}
                counter.clear()
                micro += lanes

    def fill(self, seq: BucketSequence, p: int, bucket: str, counter: Counter) -> tuple:
        """(image, label, key) for position p; a missing or bad sample is replaced by a stand-in (replacement)."""
        for i in range(64 + 4 * len(seq.urls)):  # 64 tries find a good sample even if only 15% of them are
            try:
                sample = seq.raw(p if i == 0 else seq.replacement(p, i))
                return self.decode_sample(sample, bucket), int(sample["cls"]), sample["__key__"]
            except IndexError:  # the shard does not hold it (unreadable or cut short): counted when opened
                pass
            except ShardError as e:  # a member over the bound: skipped unread
                counter[e.reason] += 1
            except Exception:  # noqa: BLE001 - a cut, undecodable or incomplete sample: skipped and counted
                counter["corrupt_sample"] += 1
        raise RuntimeError(f"no shard of bucket {bucket} could be read ({len(seq.urls)} shards, e.g. "
                           f"{seq.urls[0]}); check the shard paths or data.shard_url")

    def decode_sample(self, sample: dict, bucket: str):
        """-> Pillow image at the bucket's training size, or (8, h, w) float32 VAE moments."""
        if self.spec["latent"] == "moments":
            return np.load(io.BytesIO(sample["moments.npy"]), allow_pickle=False)
        tw, th = self.spec["sizes"][bucket]
        data = next(sample[k] for k in IMAGE_KEYS if k in sample)
        return decode_image(data, tw, th, self.spec["channels"])

    def collate(self, xs: list, step: int, q0: int, worker: int) -> dict:
        """Stack moments, or random-flip (seeded by step and place in the global batch) and stack pixels as uint8.

        Pixels stay uint8 all the way to the device: 4x less to pass between processes and to copy to the GPU;
        the float conversion runs there. In a DataLoader worker they go into a shared slot (BatchSlots) and the
        batch names the slot instead of holding "x".
        """
        if self.spec["latent"] == "moments":
            return {"x": torch.from_numpy(np.stack(xs))}  # flipped moments != moments of the flipped image
        flip = np.zeros(len(xs), bool)
        if self.spec["random_flip"]:  # micro-batches start at multiples of micro_batch whatever the world size
            flip = np.random.default_rng([self.spec["seed"], step, q0, 0xF11]).random(len(xs)) < 0.5
        w, h = xs[0].size
        shape = (len(xs), len(xs[0].getbands()), h, w)
        if self.slots is not None:
            slot, out = self.slots.take(worker, shape)
            batch = {"_slot": (worker, slot, shape)}
        else:
            x = torch.empty(shape, dtype=torch.uint8)
            out, batch = x.numpy(), {"x": x}
        for i, (im, f) in enumerate(zip(xs, flip)):
            write_planes(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if f else im, out[i])
        return batch


def empty_slot(batch: dict, slots: BatchSlots) -> dict:
    """A worker's batch with its pixels copied out of their shared slot (freed for the worker's next batch)."""
    worker, slot, shape = batch.pop("_slot")
    batch["x"] = slots.copy_out(worker, slot, shape)
    return batch


def keep_image_blocks(worker_id: int) -> None:
    """DataLoader worker start: Pillow keeps freed image memory for the next image (its PILLOW_BLOCKS_MAX),
    instead of handing it back to malloc, which in a fresh worker can map and fault it anew for every image."""
    set_blocks_max = getattr(Image.core, "set_blocks_max", None)
    if set_blocks_max is not None:
        set_blocks_max(IMAGE_BLOCKS_KEPT)


# ------------------------------------------------------------------------------------------------
# The loader the trainer holds
# ------------------------------------------------------------------------------------------------

class ShardLoader:
    """Endless iterable of micro-batches with state_dict()/load_state_dict() and counts(); see the module docstring."""

    def __init__(self, data_cfg, micro_batch: int, rank: int, world_size: int, seed: int, accumulation: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if data_cfg.channels not in (1, 3):
            raise ValueError(f"data.channels = {data_cfg.channels}; use 3 (RGB) or 1 (grey)")
        manifest, base = read_manifest(data_cfg.shards)
        names, probs, mbs, report = plan_buckets(manifest, data_cfg, micro_batch, world_size * accumulation)
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
            "world_size": world_size, "accumulation": accumulation, "lanes": max(1, data_cfg.num_workers),
            "window": data_cfg.shuffle_buffer, "bucket_ids": {n: i for i, n in enumerate(manifest["buckets"])},
            "urls": {n: shard_urls(manifest["buckets"][n], base, data_cfg.shard_url) for n in names},
            "max_member": {n: bucket_member_limit(manifest, n) for n in names},
            "counts": {n: [s["count"] for s in manifest["buckets"][n]["shards"]] for n in names},
            "sizes": {n: scaled_size(*parse_bucket_name(n), shard_res, data_cfg.resolution, multiple) for n in names},
            "channels": data_cfg.channels, "latent": latent, "random_flip": data_cfg.random_flip,
        }
        self.num_workers = data_cfg.num_workers
        self.schedule = BucketSchedule(names, probs, mbs, seed)
        self.micro, self.cursor = 0, {}  # micro-batches taken; cursor: next position per bucket at step micro // acc
        self.seen_bucket, self.seen_class, self.skipped = Counter(), Counter(), Counter()

    @property
    def step(self) -> int:
        return self.micro // self.spec["accumulation"]

    def __iter__(self):
        acc = self.spec["accumulation"]
        start, first = self.step, self.micro
        slots = None
        if self.num_workers > 0 and self.spec["latent"] != "moments":  # room for the largest pixel micro-batch
            sizes, mbs = self.spec["sizes"], self.spec["micro_batches"]
            largest = max(mb * math.prod(sizes[name]) for name, mb in zip(self.spec["names"], mbs))
            slots = BatchSlots(self.num_workers, self.spec["channels"] * largest)
        dataset = RankBatches(self.spec, start, self.cursor, slots)
        if self.num_workers > 0:
            # pinned batches (moments here, pixels in BatchSlots.copy_out) make the trainer's
            # .to(device, non_blocking=True) a real async copy
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                 worker_init_fn=keep_image_blocks, prefetch_factor=PREFETCH_FACTOR,
                                                 multiprocessing_context="fork",  # BatchSlots are inherited
                                                 pin_memory=torch.cuda.is_available())
            gc.freeze()  # the forked workers' garbage collector leaves the trainer's objects alone: their pages
            try:         # stay shared with the trainer instead of being copied into every worker
                batches = iter(loader)  # the workers start here
            finally:
                gc.unfreeze()
        else:
            batches = dataset.batches(0)
        if slots is not None:  # every batch leaves its slot at once, also those dropped below
            batches = (empty_slot(b, slots) for b in batches)
        if first % acc:  # resumed mid-step: drop the micro-batches already taken
            batches = itertools.islice(batches, first % acc, None)
        plan = walk_schedule(self.schedule, acc * self.spec["world_size"], start, self.cursor)
        for batch in batches:
            if batch.pop("_micro") != self.micro:  # the DataLoader's round-robin order is what makes workers line up
                raise RuntimeError(f"loader out of order: expected micro-batch {self.micro}")
            self.skipped.update(batch.pop("_counts"))
            labels = batch["y"]  # a list from the worker: a tensor would travel in shared memory of its own
            batch["y"] = torch.tensor(labels, dtype=torch.long)
            self.seen_bucket[batch["bucket"]] += len(labels)
            self.seen_class.update(labels)
            self.micro += 1
            if self.micro % acc == 0:  # a step is complete: the cursor moves to the next step's positions
                s, name, mb, p = next(plan)
                self.cursor = {**self.cursor, name: p + mb * acc * self.spec["world_size"]}
            yield batch

    def state_dict(self) -> dict:
        """JSON-able: the global position (step, cursor per bucket) and this rank's counts; no world size in it.

        Off a step boundary (the trainer replaced non-finite micro-batches with later ones) it also holds
        "partial": [micro-batches taken into the step, world size]: exact on the same world size only.
        """
        acc = self.spec["accumulation"]
        sd = {"version": STATE_VERSION, "step": self.step, "seed": self.spec["seed"], "cursor": dict(self.cursor),
              "seen_bucket": dict(self.seen_bucket), "seen_class": {str(k): v for k, v in self.seen_class.items()},
              "skipped": dict(self.skipped)}
        if self.micro % acc:
            sd["partial"] = [self.micro % acc, self.spec["world_size"]]
        return sd

    def load_state_dict(self, sd) -> None:
        """Continue at the global position of `sd`, one state or the states of all ranks that saved it.

        Any world size and num_workers: the position is global. The counts of saved rank i go to rank i % world,
        so their sum over the ranks stays the run's total.
        """
        states = sd if isinstance(sd, list) else [sd]
        first = states[0]
        if first.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {first.get('version')} is not {STATE_VERSION} (written by an "
                             f"older dimscale, before the global data order); start the data stream afresh")
        if first["seed"] != self.spec["seed"]:
            raise ValueError(f"loader state was saved with train.seed = {first['seed']}, this run has "
                             f"{self.spec['seed']}; exact resume needs the same seed")
        if any((st["step"], st["cursor"]) != (first["step"], first["cursor"]) for st in states):
            raise ValueError("the saved loader states of the ranks disagree on the position; the checkpoint is damaged")
        acc, world = self.spec["accumulation"], self.spec["world_size"]
        self.micro, self.cursor = first["step"] * acc, dict(first["cursor"])
        taken, saved_world = first.get("partial", [0, world])
        if taken and saved_world == world:
            self.micro += taken
        elif taken:  # a part-taken step cannot be split anew: start at the next step
            s, name, mb, p = next(walk_schedule(self.schedule, acc * world, first["step"], self.cursor))
            self.micro, self.cursor = (s + 1) * acc, {**self.cursor, name: p + mb * acc * world}
            log.warning("loader: the checkpoint was taken %d micro-batches into step %d on %d ranks; on %d ranks "
                        "the data resumes at step %d", taken, s, saved_world, world, s + 1)
        mine = states if not isinstance(sd, list) else states[self.spec["rank"]::world]
        self.seen_bucket, self.seen_class, self.skipped = Counter(), Counter(), Counter()
        for st in mine:
            self.seen_bucket.update(st["seen_bucket"])
            self.seen_class.update({int(k): v for k, v in st["seen_class"].items()})
            self.skipped.update(st["skipped"])

    def counts(self) -> dict:
        """Images seen per bucket and per class, skips by reason and bytes read, for the trainer's logs."""
        skipped = {k: v for k, v in self.skipped.items() if k != "bytes_read"}
        return {"images": sum(self.seen_bucket.values()), "bucket": dict(self.seen_bucket),
                "class": dict(sorted(self.seen_class.items())), "skipped": skipped,
                "bytes_read": self.skipped.get("bytes_read", 0)}


def build_loader(data_cfg, micro_batch: int, rank: int, world_size: int, seed: int,
                 accumulation: int = 1) -> ShardLoader:
    """The shared contract: an endless, resumable loader of {"x", "y", "bucket"} micro-batches for this rank."""
    return ShardLoader(data_cfg, micro_batch, rank, world_size, seed, accumulation)
