"""tools/fid.py on 1 and 2 real processes (torchrun, gloo) gives the same statistics and metrics.

Uses the small Fashion-MNIST classifier as the detector (Inception at 299 is ~8 img/s on CPU), which also tests
train_classifier / load_classifier / accuracy, the offline demo path.
"""
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dimscale.metrics.classifier import accuracy, load_classifier, train_classifier
from dimscale.metrics.sources import read_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID = os.path.join(ROOT, "tools", "fid.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fid(args, ranks: int = 1) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_port", str(free_port())] if ranks > 1 else [sys.executable]
    out = subprocess.run(launcher + [FID] + args + ["--no-progress"], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A trained classifier, 320 labelled samples (.npz), and the same 100 reference images as .npz and shards."""
    tmp = tmp_path_factory.mktemp("fid")
    x, y = read_idx(split="train")
    torch.set_num_threads(2)
    train_classifier(x[:2000], y[:2000], out=str(tmp / "clf.safetensors"), epochs=2, log=lambda *_: None)
    xt, yt = read_idx(split="test")
    np.savez(tmp / "samples.npz", arr_0=xt[:320, :, :, None], arr_1=yt[:320])
    np.savez(tmp / "ref.npz", arr_0=x[5000:5100, :, :, None])
    os.makedirs(tmp / "shards")
    for s in range(2):                           # two shards of 50, the make_shards member layout (png + cls)
        with wds.TarWriter(str(tmp / "shards" / f"b-{s:05d}.tar")) as w:
            for i in range(5000 + 50 * s, 5050 + 50 * s):
                buf = io.BytesIO()
                Image.fromarray(x[i]).save(buf, format="PNG")
                w.write({"__key__": f"{i:09d}", "png": buf.getvalue(), "cls": str(int(y[i])).encode()})
    # reference stats in the classifier's feature space, with the first 60 images as arr_0 for P/R
    rec = run_fid(["ref", str(tmp / "ref.npz"), "--out", str(tmp / "ref_stats.npz"), "--keep-images", "60",
                   "--detector", f"classifier:{tmp / 'clf.safetensors'}", "--batch-size", "24"])
    (tmp / "ref_record.json").write_text(json.dumps(rec))
    return tmp


def test_classifier_trains_saves_and_scores(data):
    model = load_classifier(str(data / "clf.safetensors"))
    xt, yt = read_idx(split="test")
    imgs = torch.from_numpy(xt[:400].copy())[:, None]
    acc = accuracy(model, imgs, yt[:400], batch=64)
    assert acc > 0.6                                               # chance is 0.1
    with torch.no_grad():
        preds = model(imgs)[1].argmax(1).numpy()
    assert acc == pytest.approx((preds == yt[:400]).mean())
    rgb = imgs.repeat(1, 3, 1, 1)                                  # 3-channel input: grey = channel mean
    assert accuracy(model, rgb, yt[:400]) == acc
    assert len(model.weights_sha256) == 64 and model.meta["train_images"] == 2000


def test_one_and_two_ranks_give_the_same_statistics_and_metrics(data):
    det = ["--detector", f"classifier:{data / 'clf.safetensors'}", "--batch-size", "24"]
    ref = json.loads((data / "ref_record.json").read_text())
    assert ref["num_images"] == 100 and "NOT FID" in ref["metric_name"]
    with np.load(data / "ref_stats.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], np.load(data / "ref.npz")["arr_0"][:60])
        assert json.loads(str(z["protocol"]))["detector_sha256"] == ref["detector_sha256"]
    common = ["eval", "--samples", str(data / "samples.npz"), "--ref", str(data / "ref_stats.npz"), "--pr"] + det
    one = run_fid(common + ["--stats-out", str(data / "s1.npz")])
    two = run_fid(common + ["--stats-out", str(data / "s2.npz"), "--npz-out", str(data / "gathered.npz")], ranks=2)
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["num_samples"] == two["num_samples"] == 320
    s1, s2 = np.load(data / "s1.npz"), np.load(data / "s2.npz")
    for key in ("mu", "sigma"):
        assert np.abs(s1[key] - s2[key]).max() <= 1e-10 * np.abs(s1[key]).max()
    m1, m2 = one["metrics"], two["metrics"]
    assert m1["fcd_not_fid"] > 0 and m1["fcd_not_fid"] == pytest.approx(m2["fcd_not_fid"], rel=1e-9)
    assert m1["classifier_accuracy"] == m2["classifier_accuracy"] > 0.6
    assert (m1["precision"], m1["recall"]) == (m2["precision"], m2["recall"])
    assert 0 < m1["precision"] <= 1 and 0 < m1["recall"] <= 1
    np.testing.assert_array_equal(np.load(data / "gathered.npz")["arr_0"], np.load(data / "samples.npz")["arr_0"])


def test_shards_on_two_ranks_match_the_npz_on_one(data):
    det = ["--detector", f"classifier:{data / 'clf.safetensors'}", "--batch-size", "16"]
    run_fid(["ref", str(data / "ref.npz"), "--out", str(data / "from_npz.npz")] + det)
    rec = run_fid(["ref", str(data / "shards"), "--out", str(data / "from_shards.npz")] + det, ranks=2)
    assert rec["num_images"] == 100 and rec["world_size"] == 2
    a, b = np.load(data / "from_npz.npz"), np.load(data / "from_shards.npz")
    np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-10, atol=1e-12)


def test_snapshot_samples_are_the_same_on_one_and_two_ranks(data):
    """Each rank generates its own share (seed + i, labels[i]); the set equals tools/sample.py's."""
    models = pytest.importorskip("dimscale.models", reason="dimscale.models (DiM) not available yet")
    from dimscale.config import ModelConfig
    from dimscale.snapshot import save_snapshot
    cfg = ModelConfig(name="DiM-T/2", in_channels=1, input_size=8, num_classes=10)
    torch.manual_seed(0)
    model = models.build_model(cfg)
    with torch.no_grad():                          # zero-initialised heads would make every sample equal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    snap = str(data / "snap")
    save_snapshot(snap, model.state_dict(), cfg, {"data": {"resolution": 8, "latent": "none"}, "images_seen": 7})
    common = ["eval", "--snapshot", snap, "--num-images", "12", "--steps", "2", "--seed", "3", "--batch-size", "3",
              "--ref", str(data / "ref_stats.npz"), "--detector", f"classifier:{data / 'clf.safetensors'}"]
    one = run_fid(common + ["--stats-out", str(data / "g1.npz"), "--npz-out", str(data / "g1_imgs.npz")])
    two = run_fid(common + ["--stats-out", str(data / "g2.npz"), "--npz-out", str(data / "g2_imgs.npz")], ranks=2)
    g1, g2 = np.load(data / "g1_imgs.npz")["arr_0"], np.load(data / "g2_imgs.npz")["arr_0"]
    assert g1.shape == (12, 8, 8, 1) and len({g.tobytes() for g in g1}) == 12
    np.testing.assert_array_equal(g1, g2)
    s1, s2 = np.load(data / "g1.npz"), np.load(data / "g2.npz")
    for key in ("mu", "sigma"):
        assert np.abs(s1[key] - s2[key]).max() <= 1e-10 * np.abs(s1[key]).max()
    assert one["metrics"]["fcd_not_fid"] == pytest.approx(two["metrics"]["fcd_not_fid"], rel=1e-9)
    assert one["metrics"]["classifier_accuracy"] == two["metrics"]["classifier_accuracy"]
    for rec in (one, two):        # the protocol travels with the numbers
        assert rec["steps"] == 2 and rec["seed"] == 3 and rec["sampler"] == "dpm++" and rec["cfg_scale"] == 0.4
        assert "1 + s" in rec["cfg_convention"] and rec["images_seen"] == 7 and len(rec["checkpoint_sha256"]) == 64
    # the same images as tools/sample.py with the same seed, labels and batches
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sample.py"), "--snapshot", snap, "--num-images", "12", "--steps",
                          "2", "--seed", "3", "--batch-size", "3", "--out", str(data / "grid.png"), "--npz-out",
                          str(data / "sample_tool.npz")], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_array_equal(np.load(data / "sample_tool.npz")["arr_0"], g1)


def test_an_image_source_reference_is_read_once_for_fid_and_pr(data, monkeypatch):
    """--ref an image source with --pr: one detector pass over the reference gives the stats and P/R features."""
    sys.path.insert(0, ROOT)
    import tools.fid as fid
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)        # restored afterwards: a plain process is a world of one
    passes, real = [], fid.source_stats
    monkeypatch.setattr(fid, "source_stats", lambda *a, **k: (passes.append(k.get("desc")), real(*a, **k))[1])
    det = ["--detector", f"classifier:{data / 'clf.safetensors'}", "--batch-size", "24", "--no-progress"]
    out = data / "pr_once.json"
    assert fid.main(["eval", "--samples", str(data / "samples.npz"), "--ref", str(data / "ref.npz"), "--pr",
                     "--pr-ref-num", "60", "--json-out", str(out)] + det) == 0
    assert passes == ["reference"]
    once = json.loads(out.read_text())["metrics"]
    # the stats file holds the same 100 images' statistics and the same first 60 images as arr_0
    stats = run_fid(["eval", "--samples", str(data / "samples.npz"), "--ref", str(data / "ref_stats.npz"), "--pr"]
                    + det[:-1])["metrics"]
    assert (once["precision"], once["recall"]) == (stats["precision"], stats["recall"])
    assert once["fcd_not_fid"] == pytest.approx(stats["fcd_not_fid"], rel=1e-6)  # stats file: stored sums
