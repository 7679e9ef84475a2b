"""dimscale.data loader on real shards: buckets, exact resume, ranks x workers splits, corrupt shards, pipe: URLs."""
import contextlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import FASHION, fashion_labels, make_photo_tree, require_data, run_make_shards
from dimscale.config import DataConfig
from dimscale.data import BucketSchedule, build_loader


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """400 Fashion-MNIST rows at 32x32, grey PNG, 8 shards of 50."""
    require_data()
    out = tmp_path_factory.mktemp("fashion_shards")
    assert run_make_shards(FASHION, out, "--resolution", 32, "--format", "png", "--limit", 400,
                           "--shard-size", 50, "--workers", 2) == 0
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """~90 photo crops in 9 aspect buckets at 64 px, several small shards per bucket."""
    src = tmp_path_factory.mktemp("photo_src")
    make_photo_tree(str(src), n_random=80, seed=1, bad=False)
    out = tmp_path_factory.mktemp("photo_shards")
    assert run_make_shards(src, out, "--resolution", 64, "--shard-size", 4, "--workers", 2) == 0
    return out


def test_fashion_batches_downscaled_grey_to_rgb(fashion):
    cfg = DataConfig(shards=str(fashion), resolution=16, channels=3, num_workers=0, shuffle_buffer=16)
    batches = take(build_loader(cfg, 8, 0, 1, seed=0), 3)
    labels = fashion_labels(400)
    for b in batches:
        x = b["x"]
        assert x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8 and b["bucket"] == "32x32"
        assert x.min() < 128 < x.max()  # pixels stay uint8 until the device (to_model_input)
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey replicated
        assert b["y"].tolist() == [int(labels[int(k)]) for k in b["key"]]


def test_bucket_sequence_is_shared_by_ranks_and_proportional(photos):
    cfg = DataConfig(shards=str(photos), resolution=64, num_workers=0)
    loaders = [build_loader(cfg, 2, r, 2, seed=3) for r in (0, 1)]
    steps = [take(lo, 12) for lo in loaders]
    assert [b["bucket"] for b in steps[0]] == [b["bucket"] for b in steps[1]]  # every step, same bucket on all ranks
    assert set(steps[0][0]["key"]).isdisjoint(steps[1][0]["key"])
    manifest = loaders[0].manifest
    counts = {n: e["count"] for n, e in manifest["buckets"].items() if e["count"] >= 4}
    sched = BucketSchedule(list(counts), list(counts.values()), [2] * len(counts), seed=3)
    drawn = Counter(sched.bucket(s)[0] for s in range(6000))
    total = sum(counts.values())
    for name, c in counts.items():
        assert abs(drawn[name] / 6000 - c / total) < 0.025, name
    assert [sched.bucket(s) for s in range(50)] == [BucketSchedule(list(counts), list(counts.values()), [2] * len(counts), 3).bucket(s) for s in range(50)]


def test_configured_bucket_table_and_underfilled_buckets(photos, fashion):
    manifest = json.load(open(photos / "manifest.json"))
    big = max((n for n in manifest["buckets"] if n != "64x64"), key=lambda n: manifest["buckets"][n]["count"])
    small = min((n for n, e in manifest["buckets"].items() if e["count"]), key=lambda n: manifest["buckets"][n]["count"])
    table = {big: {"prob": 3.0, "micro_batch": 4}, "64x64": {"prob": 1.0, "micro_batch": 2},
             small: {"prob": 1.0, "micro_batch": 999}}
    cfg = DataConfig(shards=str(photos), resolution=64, num_workers=0, buckets=table)
    loader = build_loader(cfg, 5, 0, 1, seed=0)
    assert any(small in line and "under-filled" in line for line in loader.report)
    batches = take(loader, 40)
    got = Counter(b["bucket"] for b in batches)
    assert set(got) == {big, "64x64"} and got[big] > got["64x64"]
    assert all(b["x"].shape[0] == table[b["bucket"]]["micro_batch"] for b in batches)
    w, h = (int(v) for v in big.split("x"))
    assert all(b["x"].shape[2:] == (h, w) for b in batches if b["bucket"] == big)
    # an empty bucket named in the table is reported; nothing usable is an error, never a hang
    cfg = DataConfig(shards=str(fashion), resolution=32, num_workers=0,
                     buckets={"32x32": {"micro_batch": 4}, "36x28": {"prob": 1.0}})
    assert any("36x28" in line and "0 images" in line for line in build_loader(cfg, 4, 0, 1, 0).report)
    cfg = DataConfig(shards=str(fashion), resolution=32, num_workers=0, buckets={"32x32": {"micro_batch": 300}})
    with pytest.raises(ValueError, match="no usable bucket"):
        build_loader(cfg, 4, 0, 2, 0)
    with pytest.raises(ValueError, match="available"):
        build_loader(DataConfig(shards=str(fashion), buckets={"9x9": {}}), 4, 0, 1, 0)


def test_exact_resume_with_two_workers(photos):
    cfg = DataConfig(shards=str(photos), resolution=64, num_workers=2, shuffle_buffer=2)
    full = take(build_loader(cfg, 3, 0, 1, seed=7), 13)
    first = build_loader(cfg, 3, 0, 1, seed=7)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able and small
    assert len(json.dumps(state)) < 4000
    resumed = build_loader(cfg, 3, 0, 1, seed=7)
    resumed.load_state_dict(state)
    rest = take(resumed, 8)
    assert len({b["bucket"] for b in full}) > 2
    for a, b in zip(full[5:], rest):
        assert a["bucket"] == b["bucket"] and a["key"] == b["key"] and torch.equal(a["y"], b["y"])
        assert torch.equal(a["x"], b["x"])  # decode, resize and flips identical too
    whole = build_loader(cfg, 3, 0, 1, seed=7)
    take(whole, 13)
    assert resumed.counts()["bucket"] == whole.counts()["bucket"] and resumed.counts()["class"] == whole.counts()["class"]
    assert "world_size" not in state and "lanes" not in state  # a global position only
    with pytest.raises(ValueError, match="train.seed"):
        build_loader(cfg, 3, 0, 1, seed=8).load_state_dict(state)


def test_held_batches_keep_their_pixels_while_worker_slots_are_refilled(photos):
    """Workers write pixels into reused shared slots (BatchSlots); batches the consumer holds must not change."""
    in_process = take(build_loader(DataConfig(shards=str(photos), resolution=64, num_workers=0, shuffle_buffer=2),
                                   3, 0, 1, seed=3), 24)
    for workers in (1, 2):  # 24 batches: each worker's 3 slots are refilled 4 to 8 times while all are held
        cfg = DataConfig(shards=str(photos), resolution=64, num_workers=workers, shuffle_buffer=2)
        held = take(build_loader(cfg, 3, 0, 1, seed=3), 24)
        for a, b in zip(in_process, held):
            assert a["key"] == b["key"] and torch.equal(a["y"], b["y"]) and torch.equal(a["x"], b["x"])


def test_a_worker_waiting_for_a_slot_gives_up_when_the_trainer_is_gone(monkeypatch):
    from dimscale.data import loader as loader_module
    monkeypatch.setattr(loader_module, "SLOT_WAIT_S", 0.05)
    slots = loader_module.BatchSlots(workers=1, nbytes=12)
    taken = [slots.take(0, (1, 3, 2, 2))[0] for _ in range(slots.per_worker)]
    assert taken == [0, 1, 2]  # each slot once, in turn
    slots.copy_out(0, 0, (1, 3, 2, 2))
    assert slots.take(0, (1, 3, 2, 2))[0] == 0  # the freed slot comes round again
    slots.trainer_pid = -1  # as seen from a worker whose trainer has exited
    with pytest.raises(RuntimeError, match="trainer process has exited"):
        slots.take(0, (1, 3, 2, 2))


def global_steps(shards, world, acc, workers, steps, states=None, micro_batch=1, seed=5):
    """{global step: [(key, place, bucket, x)]} over all ranks of a world (in one process), and the loaders."""
    cfg = DataConfig(shards=str(shards), resolution=64, num_workers=workers, shuffle_buffer=3)
    loaders = [build_loader(cfg, micro_batch, r, world, seed, accumulation=acc) for r in range(world)]
    out = {}
    for lo in loaders:
        if states is not None:
            lo.load_state_dict(states)
        first = lo.step
        for b in take(lo, steps * acc):
            assert first <= b["step"] < first + steps
            out.setdefault(b["step"], []).extend(zip(b["key"], b["index"], [b["bucket"]] * len(b["key"]), b["x"]))
    return out, loaders


def test_one_two_three_ranks_draw_the_same_images_per_global_step(photos):
    """Global step s is the same set of keys (same places, same pixels) for 1, 2 or 3 ranks and any num_workers."""
    one, _ = global_steps(photos, 1, 6, 0, 14)
    runs = [global_steps(photos, 2, 3, 2, 14)[0], global_steps(photos, 3, 2, 1, 14)[0]]
    assert len({v[0][2] for v in one.values()}) >= 2  # several buckets take part
    for run in runs:
        assert sorted(run) == sorted(one) == list(range(14))
        for s in one:
            assert sorted(e[:3] for e in run[s]) == sorted(e[:3] for e in one[s]) and len(run[s]) == 6
            ref = {e[0]: e[3] for e in one[s]}
            assert all(torch.equal(ref[k], x) for k, _, _, x in run[s])  # same decode and flip
    by_bucket = {}
    for s in sorted(one):
        by_bucket.setdefault(one[s][0][2], []).extend(e[0] for e in one[s])
    manifest = json.load(open(photos / "manifest.json"))
    for name, keys in by_bucket.items():  # within one pass over a bucket no key comes twice
        n = manifest["buckets"][name]["count"]
        assert len(set(keys[:n])) == len(keys[:n]), name


def test_resume_on_another_world_size_and_num_workers(photos):
    """2 ranks x 2 workers stop after 5 steps; 3 ranks x 1 worker go on: the uninterrupted key sequence."""
    whole, _ = global_steps(photos, 1, 6, 0, 12)
    before, loaders = global_steps(photos, 2, 3, 2, 5)
    states = json.loads(json.dumps([lo.state_dict() for lo in loaders]))
    after, resumed = global_steps(photos, 3, 2, 1, 7, states=states)
    assert sorted(before) == list(range(5)) and sorted(after) == list(range(5, 12))
    for s, run in (*before.items(), *after.items()):
        assert sorted(e[:3] for e in run) == sorted(e[:3] for e in whole[s])
    total = Counter()
    for lo in resumed:
        total.update(lo.counts()["bucket"])
    assert sum(total.values()) == 12 * 6  # images seen carried over: the saved ranks' counts spread, not lost


def _rank_keys(shards, rank, queue):
    """One rank in its own process: 20 steps (one pass) + 4 more, reporting keys, batch sizes and images seen."""
    cfg = DataConfig(shards=shards, resolution=32, channels=1, num_workers=2, shuffle_buffer=20)
    loader = build_loader(cfg, 10, rank, 2, seed=11)
    batches = take(loader, 20 + 4)  # 20 steps = one pass (2 shards x 50 per rank and worker), then resampling
    queue.put((rank, [b["key"] for b in batches], [b["bucket"] for b in batches], loader.counts()["images"]))


def test_two_ranks_two_workers_one_pass_sees_each_sample_once(fashion):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    ranks = [ctx.Process(target=_rank_keys, args=(str(fashion), r, queue)) for r in (0, 1)]
    for p in ranks:
        p.start()
    results = dict((r, rest) for r, *rest in (queue.get(timeout=120) for _ in ranks))
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0][1] == results[1][1]  # same bucket at every step
    keys = []
    for rank, (batch_keys, _, images) in results.items():
        assert all(len(k) == 10 for k in batch_keys) and images == 240  # no rank runs dry after the pass
        keys += [k for b in batch_keys[:20] for k in b]
    assert len(keys) == 400 and len(set(keys)) == 400  # all 400 samples, none twice


def test_truncated_and_garbage_shards_are_skipped(fashion, tmp_path):
    for f in os.listdir(fashion):
        shutil.copy(fashion / f, tmp_path / f)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".tar"))
    cut = tmp_path / shards[1]
    data = cut.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.4) + 100])  # cut inside a member
    (tmp_path / shards[2]).write_bytes(np.random.default_rng(0).bytes(20000))
    cfg = DataConfig(shards=str(tmp_path), resolution=32, channels=1, num_workers=0, shuffle_buffer=8)
    loader = build_loader(cfg, 10, 0, 1, seed=0)
    batches = take(loader, 45)  # more than one pass over 8 shards
    assert all(b["x"].shape == (10, 1, 32, 32) for b in batches)
    skipped = loader.counts()["skipped"]
    assert skipped["corrupt_shard"] >= 2
    keys = {int(k) for b in batches for k in b["key"]}
    assert not keys & set(range(100, 150))  # the garbage shard held samples 100..149
    assert keys & set(range(50, 60))  # the start of the truncated shard was still used


def test_pipe_url_template_matches_local(fashion):
    local = DataConfig(shards=str(fashion), resolution=32, channels=1, num_workers=0)
    piped = DataConfig(shards=str(fashion), resolution=32, channels=1, num_workers=0,
                       shard_url=f"pipe:cat {fashion}/{{shard}}")
    for a, b in zip(take(build_loader(local, 6, 0, 1, 5), 4), take(build_loader(piped, 6, 0, 1, 5), 4)):
        assert a["key"] == b["key"] and torch.equal(a["x"], b["x"])


def test_vae_moments_written_and_loaded(tmp_path, fashion):
    """--vae stores posterior moments next to each image; latent='moments' batches them per bucket, unflipped."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from dimscale.diffusion.vae import encode_moments, load_vae
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")  # random weights, /8 like the SD VAE
    make_photo_tree(str(tmp_path / "src"), n_random=14, seed=2, bad=False)
    assert run_make_shards(tmp_path / "src", tmp_path / "shards", "--resolution", 64, "--format", "png",
                           "--buckets", "64x64,96x48", "--vae", tmp_path / "vae", "--vae-batch", 4,
                           "--workers", 2) == 0
    manifest = json.load(open(tmp_path / "shards" / "manifest.json"))
    assert manifest["latent"]["key"] == "moments.npy"
    cfg = DataConfig(shards=str(tmp_path / "shards"), resolution=64, latent="moments", num_workers=0)
    batch = take(build_loader(cfg, 2, 0, 1, seed=0), 6)
    vae = load_vae(str(tmp_path / "vae"))
    pngs = {}
    for f in os.listdir(tmp_path / "shards"):
        if f.endswith(".tar"):
            with tarfile.open(tmp_path / "shards" / f) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".png"):
                        pngs[m.name.split(".")[0]] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
    for b in batch:
        w, h = (int(v) for v in b["bucket"].split("x"))
        assert b["x"].shape == (2, 8, h // 8, w // 8) and b["x"].dtype == torch.float32
        pixels = torch.from_numpy(np.stack([pngs[k] for k in b["key"]])).permute(0, 3, 1, 2).float() / 127.5 - 1
        tol = 1e-2 if torch.cuda.is_available() else 1e-4  # make_shards encodes on the GPU when there is one (TF32)
        torch.testing.assert_close(b["x"], encode_moments(vae, pixels).float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="moments need equal sizes"):
        build_loader(DataConfig(shards=str(tmp_path / "shards"), resolution=32, latent="moments"), 2, 0, 1, 0)
    with pytest.raises(ValueError, match="--vae"):
        build_loader(DataConfig(shards=str(fashion), resolution=32, latent="moments"), 2, 0, 1, 0)


# ------------------------------------------------------------------------------------------------
# Hostile shards (dimscale/data/tario.py): huge members, FIFOs, hung pipes, manifest names that are not data
# ------------------------------------------------------------------------------------------------

class Hung(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code under test swallows it."""


@contextlib.contextmanager
def deadline(seconds):
    def fire(*_):
        raise Hung(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def copy_shards(src, dst, manifest_edit=None):
    for f in os.listdir(src):
        shutil.copy(src / f, dst / f)
    if manifest_edit:
        m = json.load(open(dst / "manifest.json"))
        manifest_edit(m)
        json.dump(m, open(dst / "manifest.json", "w"))
    return sorted(f for f in os.listdir(dst) if f.endswith(".tar"))


def peak_rss_mb() -> float:
    return int([ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]) / 1024


def test_oversized_member_is_skipped_without_reading_it(fashion, tmp_path):
    shards = copy_shards(fashion, tmp_path)
    # shard 1 becomes: one real sample, then a 600 MB member (sparse on disk), then the end marker
    first = tarfile.open(fashion / shards[1]).getmembers()[0].name.split(".")[0]
    with tarfile.open(fashion / shards[1]) as src, open(tmp_path / shards[1], "wb") as out:
        for m in src.getmembers()[:3]:
            info = tarfile.TarInfo(m.name)
            info.size = m.size
            out.write(info.tobuf(tarfile.USTAR_FORMAT) + src.extractfile(m).read() + b"\0" * (-m.size % 512))
        huge = tarfile.TarInfo("000099999.png")
        huge.size = 600 << 20
        out.write(huge.tobuf(tarfile.USTAR_FORMAT))
        out.seek(huge.size, os.SEEK_CUR)
        out.write(b"\0" * 1024)
    cfg = DataConfig(shards=str(tmp_path), resolution=32, channels=1, num_workers=0, shuffle_buffer=8)
    loader = build_loader(cfg, 10, 0, 1, seed=0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak RSS
    before = peak_rss_mb()
    batches = take(loader, 40)  # one pass is 36 batches: shard 1 is read
    assert peak_rss_mb() - before < 200, "the oversized member was read into memory"
    assert loader.counts()["skipped"]["oversized_member"] >= 1
    keys = {b for batch in batches for b in batch["key"]}
    assert first in keys and "000099999" not in keys


def test_fifo_shard_is_skipped_not_waited_on(fashion, tmp_path):
    shards = copy_shards(fashion, tmp_path)
    os.remove(tmp_path / shards[3])
    os.mkfifo(tmp_path / shards[3])  # nobody ever writes: open() for reading would block forever
    cfg = DataConfig(shards=str(tmp_path), resolution=32, channels=1, num_workers=0, shuffle_buffer=8)
    loader = build_loader(cfg, 10, 0, 1, seed=0)
    with deadline(60):
        take(loader, 40)
    assert loader.counts()["skipped"]["not_a_file"] >= 1


def test_shard_open_has_a_timeout_and_kills_the_command(fashion, tmp_path, monkeypatch):
    from dimscale.data import tario
    monkeypatch.setattr(tario, "OPEN_TIMEOUT_S", 1.0)
    shards = copy_shards(fashion, tmp_path)
    slow = shards[2]
    cfg = DataConfig(shards=str(tmp_path), resolution=32, channels=1, num_workers=0, shuffle_buffer=8,
                     shard_url=f"pipe:case {{shard}} in {slow}) sleep 37.25;; esac; cat {tmp_path}/{{shard}}")
    loader = build_loader(cfg, 10, 0, 1, seed=0)
    with deadline(60):
        batches = take(loader, 40)
    assert loader.counts()["skipped"]["shard_timeout"] >= 1
    keys = {int(k) for b in batches for k in b["key"]}
    assert not keys & set(range(100, 150)) and keys & set(range(150, 200))  # shard 2 held samples 100..149
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", "sleep 37.25"], capture_output=True, text=True).stdout.split()
    assert not left, f"the timed-out pipe command is still running: {left}"


@pytest.mark.parametrize("bad", ["x.tar; touch MARKER #", "../../etc/passwd", "/dev/zero", "$(touch MARKER)"])
def test_manifest_shard_names_are_refused_not_run(fashion, tmp_path, monkeypatch, bad):
    from dimscale.metrics.sources import open_source
    monkeypatch.chdir(tmp_path)  # a relative MARKER lands here
    data = tmp_path / "shards"
    data.mkdir()
    copy_shards(fashion, data, lambda m: m["buckets"]["32x32"]["shards"].__setitem__(0, {"url": bad, "count": 50}))
    cfg = DataConfig(shards=str(data), resolution=32, channels=1, num_workers=0,
                     shard_url=f"pipe:cat {data}/{{shard}}")
    with deadline(60), pytest.raises(ValueError, match="refused") as e:
        take(build_loader(cfg, 10, 0, 1, seed=0), 40)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="refused"):  # the FID shard source reads manifests the same way
        open_source(str(data))
    assert not (tmp_path / "MARKER").exists()


def test_bad_samples_are_replaced_the_same_way_on_any_world_size(fashion, tmp_path):
    """A cut shard's missing places get the same stand-ins for 1 rank and 2 ranks: the global batch stays equal."""
    for f in os.listdir(fashion):
        shutil.copy(fashion / f, tmp_path / f)
    cut = tmp_path / sorted(f for f in os.listdir(tmp_path) if f.endswith(".tar"))[0]
    cut.write_bytes(cut.read_bytes()[:20000])  # ~15 of its 50 samples left, the last one cut inside a member
    cfg = DataConfig(shards=str(tmp_path), resolution=32, channels=1, num_workers=0, shuffle_buffer=8)
    steps = {}
    for world, acc in ((1, 2), (2, 1)):
        for rank in range(world):
            loader = build_loader(cfg, 10, rank, world, seed=0, accumulation=acc)
            for b in take(loader, 20 * acc):
                steps.setdefault((world, b["step"]), []).extend(b["key"])
            assert loader.counts()["skipped"].get("corrupt_shard", 0) <= 1  # counted once per process
    assert all(len(steps[(1, s)]) == 20 and sorted(steps[(1, s)]) == sorted(steps[(2, s)]) for s in range(20))
    keys = [k for s in range(20) for k in steps[(1, s)]]  # one pass of 400 places, ~35 of them stand-ins
    assert 330 <= len(set(keys)) < 400


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_index_reads_ustar_gnu_and_pax_names(tmp_path, fmt):
    """Other WebDataset writers use pax or GNU long-name headers (webdataset's TarWriter: pax)."""
    from dimscale.data.tario import Shard
    long_key = "d" * 70 + "/" + "k" * 80 + "é"          # over ustar's 100-byte name field, and not ASCII
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for key, payload in (("a/000001", b"one"), (long_key, b"two")):
            for ext, data in (("png", payload), ("cls", b"3")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard = Shard(str(path), Counter(), max_member=1 << 20)
    assert shard.error is None
    assert [k for k, _ in shard.samples] == ["a/000001", long_key]
    assert shard.sample(1) == {"__key__": long_key, "png": b"two", "cls": b"3"}


def test_uint8_pixels_become_minus_one_to_one_in_model_inputs():
    """The loader hands uint8 pixels on; the trainer's ModelInputs makes them x / 127.5 - 1 on the device."""
    from dimscale.diffusion.vae import ModelInputs
    inputs = ModelInputs(DataConfig(shards="unused", latent="none"), in_channels=3, device=torch.device("cpu"))
    pixels = torch.tensor([0, 51, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2).repeat(2, 3, 1, 1)
    x = inputs(pixels, None)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 2, 2)
    assert torch.equal(x, pixels.float() / 127.5 - 1)
    assert x.min() == -1.0 and x.max() == 1.0
