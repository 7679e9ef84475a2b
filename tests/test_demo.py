"""tools/demo.py end to end at toy size (--small): the real shards, 2-rank DeepSpeed runs, sampler and metric."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def run_demo(*args, timeout=1700):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "tools/demo.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_configs_validate_for_two_ranks():
    from dimscale.config import load_config
    pre = load_config(os.path.join(ROOT, "configs/demo_pretrain_16.json"), world_size=2)
    fin = load_config(os.path.join(ROOT, "configs/demo_finetune_32.json"), world_size=2)
    assert (pre.data.resolution, fin.data.resolution) == (16, 32)      # weak-to-strong: 16 -> 32
    assert pre.train.zero_stage == fin.train.zero_stage == 2
    assert fin.init.after_stage == pre.name and pre.model.name == fin.model.name
    assert pre.model.num_classes == fin.model.num_classes == 10


def test_demo_missing_dataset_names_the_apt_package(tmp_path):
    proc = run_demo("--small", "--out", str(tmp_path / "d"), "--idx", str(tmp_path / "nowhere"), timeout=120)
    assert proc.returncode != 0
    assert "apt-get install" in proc.stderr and "dataset-fashion-mnist" in proc.stderr
    assert not (tmp_path / "d" / "shards").exists()                   # failed before doing any work


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~3 min on an idle 2-core machine; generous for a loaded CI box
def test_demo_small_end_to_end(tmp_path):
    if not os.path.isfile(os.path.join(FASHION_MNIST, "train-images-idx3-ubyte.gz")):
        pytest.fail("Fashion-MNIST missing: apt-get install -y --no-install-recommends dataset-fashion-mnist")
    out = tmp_path / "demo"
    proc = run_demo("--small", "--out", str(out), "--docs-images", str(tmp_path / "docs"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    art = summary["artifacts"]
    for path in art.values():                                          # every artifact exists and is printed
        assert os.path.exists(path), path
        assert path in proc.stdout

    manifest = json.loads(open(art["shards"]).read())                  # --small shards 2000 images at 32x32
    assert manifest["total"] == 2000 and manifest["resolution"] == 32 and manifest["channels"] == 1
    assert manifest["num_classes"] == 10 and len(manifest["class_counts"]) == 10
    snap_pre, snap_fin = (json.loads(open(os.path.join(art[k], "snapshot.json")).read())
                          for k in ("pretrain_snapshot", "finetune_snapshot"))
    assert snap_pre["data"]["resolution"] == 16 and snap_fin["data"]["resolution"] == 32
    assert snap_pre["images_seen"] >= 256 and snap_fin["images_seen"] >= 128
    assert snap_pre["model"]["input_size"] == 16 and snap_fin["model"]["input_size"] == 32
    fin_cfg = json.loads(open(os.path.join(art["finetune_run"], "config.json")).read())
    assert fin_cfg["init"]["snapshot"] == art["pretrain_snapshot"]    # finetune started from the pretrain's EMA
    assert os.listdir(art["wandb_offline"])                             # wandb ran, offline

    # grids: 10 columns of 32x32 (one per class), and 64x64 tiles from Upsample Guidance, not blank, not NaN
    g32, g64 = (np.asarray(Image.open(art[k])) for k in ("grid_32", "grid_64_upsampled"))
    assert g32.shape[1] == 2 + 10 * (32 + 2)
    assert g64.shape[0] == 2 + 64 + 2
    for g in (g32, g64):
        assert g.std() > 5
    assert (tmp_path / "docs" / "demo_grid_32.png").is_file()
    assert (tmp_path / "docs" / "demo_grid_16_pretrain.png").is_file()

    metric = json.loads(open(art["metric"]).read())                  # tools/fid.py's record, 2 ranks
    assert metric["world_size"] == 2 and metric["num_samples"] == 20 and metric["labels"] == "balanced"
    assert metric["metrics"]["fcd_not_fid"] >= 0 and 0.0 <= metric["metrics"]["classifier_accuracy"] <= 1.0
    assert summary["accuracy"] == metric["metrics"]["classifier_accuracy"]
    assert "accuracy" in proc.stdout and "not FID" in proc.stdout
