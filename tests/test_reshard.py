"""Resume on another world size with real processes: 2 ranks SIGKILLed -> 3 ranks (ZeRO-3), 3 -> 2 (ZeRO-2).

Shards with two buckets (square 8x8 and wide 12x6 Fashion-MNIST crops), data.num_workers=2 before the kill and 1
after, global batch 12 (micro-batch 2: accumulation 3 on 2 ranks, 2 on 3). Each run is compared with an
uninterrupted 1-rank run: the data order and the per-image noise depend on the global step alone, so the first
step after the resume has the same loss (same weights, same global batch) and later steps differ only by the
reduction order. The per-step keys_crc (sum of crc32 of the global batch's keys) must equal the reference's.
"""
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from test_train_dist import CONFIG, FMNIST, REPO, clean_env, free_port, overrides

pytestmark = pytest.mark.slow
STEPS = 8  # 96 images; checkpoints every 4 steps


@pytest.fixture(scope="module")
def two_bucket_shards(tmp_path_factory):
    """96 square and 96 wide (2:1) Fashion-MNIST crops -> buckets 8x8 and 12x6, shards of 16."""
    if not os.path.isdir(FMNIST):
        pytest.skip("dataset-fashion-mnist is not installed (make apt)")
    from data_fixtures import fashion_images, fashion_labels
    root = tmp_path_factory.mktemp("two_buckets")
    images, labels = fashion_images(192), fashion_labels(192)
    for i, (im, y) in enumerate(zip(images, labels)):
        d = root / "src" / f"c{y}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im if i % 2 else np.ascontiguousarray(im[7:21])).save(d / f"{i:04d}.png")
    out = root / "shards"
    subprocess.run([sys.executable, "tools/make_shards.py", str(root / "src"), str(out), "--resolution", "8",
                    "--buckets", "8x8,12x6", "--format", "png", "--shard-size", "16", "--workers", "1",
                    "--no-progress"], cwd=REPO, check=True, timeout=300, capture_output=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(b for b, e in manifest["buckets"].items() if e["count"] >= 12) == ["12x6", "8x8"]
    return str(out)


def args_for(shards, out_dir, zero, workers):
    return overrides(shards, out_dir, "run", zero_stage=zero, total_images=12 * STEPS, global_batch=12,
                     micro_batch=2, ckpt_every_images=48, lr=3e-3) + [
        "--set", f"data.num_workers={workers}", "--set", "model.mixer=attention", "--set", "model.input_size=8"]


def start(nproc, args, log):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "dimscale/train.py",
           "--config", str(CONFIG), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc, log, timeout=240):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise AssertionError(f"run timed out; log:\n{Path(log).read_text()[-3000:]}")
    assert rc == 0, f"exit {rc}; log:\n{Path(log).read_text()[-3000:]}"


def kill_all(proc):
    """SIGKILL the rank processes (and their DataLoader workers) by pid, then torchrun; check none survive."""
    victims = psutil.Process(proc.pid).children(recursive=True)
    assert victims, "no rank processes found"
    for p in victims:
        p.send_signal(signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(victims, timeout=30)
    assert not alive, f"processes survived SIGKILL: {alive}"


def rows(run_dir, events=False):
    """Step records of metrics.jsonl (or its event records: resumes)."""
    out = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if ("event" in r) == events]


@pytest.fixture(scope="module")
def reference(two_bucket_shards, tmp_path_factory):
    """Uninterrupted run on 1 rank (any world size gives the same global batches): {zero stage: {step: row}}."""
    out = {}
    for zero in (2, 3):
        d = tmp_path_factory.mktemp(f"ref{zero}")
        log = d / "log.txt"
        finish(start(1, args_for(two_bucket_shards, d, zero, 0), log), log)
        out[zero] = {r["step"]: r for r in rows(d / "run")}
        assert sorted(out[zero]) == list(range(1, STEPS + 1))
    return out


def expected_crcs(shards):
    """keys_crc per global step computed with the loader alone, in this process (1 rank, accumulation 6)."""
    from dimscale.config import DataConfig
    from dimscale.data import build_loader
    cfg = DataConfig(shards=shards, resolution=8, channels=1, num_workers=0, shuffle_buffer=256)
    it, crc = iter(build_loader(cfg, 2, 0, 1, seed=0, accumulation=6)), {}
    for _ in range(STEPS * 6):
        b = next(it)
        crc[b["step"] + 1] = crc.get(b["step"] + 1, 0) + sum(zlib.crc32(k.encode()) for k in b["key"])
    return crc


@pytest.mark.parametrize("zero, before, after", [(3, 2, 3), (2, 3, 2)])
def test_sigkill_then_resume_on_another_world_size(two_bucket_shards, reference, tmp_path, zero, before, after):
    log = tmp_path / "log.txt"
    proc = start(before, args_for(two_bucket_shards, tmp_path, zero, 2), log)
    metrics = tmp_path / "run" / "metrics.jsonl"
    end = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 6):  # past the step-4 checkpoint
        assert proc.poll() is None and time.time() < end, Path(log).read_text()[-3000:]
        time.sleep(0.05)
    kill_all(proc)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    assert json.loads((latest / "trainer.json").read_text())["images_seen"] == 48
    finish(start(after, args_for(two_bucket_shards, tmp_path, zero, 1), log), log)

    resumes = rows(tmp_path / "run", events=True)  # the run's record shows the resume and both world sizes
    assert [(r["event"], r["saved_world_size"], r["world_size"], r["step"]) for r in resumes] == \
        [("resumed", before, after, 4)]
    ref, crcs = reference[zero], expected_crcs(two_bucket_shards)
    got = rows(tmp_path / "run")
    resumed = got[next(i for i in range(1, len(got)) if got[i]["step"] <= got[i - 1]["step"]):]
    assert [r["step"] for r in resumed] == list(range(5, STEPS + 1)) and {r["world_size"] for r in resumed} == {after}
    for r in got:  # every global step, before and after the kill: the same images as uninterrupted
        assert r["keys_crc"] == ref[r["step"]]["keys_crc"] == crcs[r["step"]], f"step {r['step']}"
    gaps = {r["step"]: abs(r["loss"] - ref[r["step"]]["loss"]) / ref[r["step"]]["loss"] for r in resumed}
    print(f"\nZeRO-{zero} {before}->{after}: relative loss gap per step after the resume {gaps}; "
          f"largest {max(gaps.values()):.2e}")
    assert gaps[5] < 1e-5  # same weights, same global batch, same noise
    assert max(gaps.values()) < 1e-3  # only the reduction order differs
