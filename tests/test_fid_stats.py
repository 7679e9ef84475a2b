"""Metric arithmetic: Fréchet distance, float64 accumulation, IS, precision/recall, reference .npz formats."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from dimscale.metrics.sources import NpzSource, my_batches
from dimscale.metrics.stats import FeatureStats, frechet_distance, precision_recall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.fid import check_reference, read_reference  # noqa: E402


def scipy_frechet(mu1, s1, mu2, s2):
    """Independent float64 reference: pytorch-fid's formula with scipy's sqrtm of Σ1Σ2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 48)) @ rng.normal(size=(48, 48))
    b = rng.normal(size=(300, 48)) * 1.5 + 0.3
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
    assert ref > 1
    assert abs(ours - ref) <= 1e-6 * ref
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * ref          # a distribution to itself
    with pytest.raises(ValueError, match="same detector"):
        frechet_distance(mu1, s1, mu2[:10], s2[:10, :10])


def test_feature_stats_float64_matches_numpy_cov():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 16)).astype(np.float32) * 3 + 100    # large mean: float32 sums would lose digits
    stats = FeatureStats(16)
    for start, stop in my_batches(len(x), 32, 0, 1):
        stats.update(torch.from_numpy(x[start:stop]), torch.arange(start, stop))
    mu, sigma = stats.mean_cov()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-9)


def test_my_batches_cover_every_index_once():
    for world in (1, 2, 3, 8):
        got = sorted(i for r in range(world) for a, b in my_batches(103, 10, r, world) for i in range(a, b))
        assert got == list(range(103))


def test_inception_score_known_answers():
    K = 10
    # confident and evenly spread over K classes -> IS = K; all the same prediction -> IS = 1
    spread = FeatureStats(2, num_classes=K, is_split=1000)
    logits = 50.0 * torch.eye(K).repeat(20, 1)                        # 200 samples, one-hot-like
    spread.update(torch.randn(200, 2), torch.arange(200), logits)
    assert spread.inception_score()[0] == pytest.approx(K, rel=1e-6)
    same = FeatureStats(2, num_classes=K)
    same.update(torch.randn(50, 2), torch.arange(50), torch.randn(1, K).repeat(50, 1))
    assert same.inception_score()[0] == pytest.approx(1.0, abs=1e-9)
    # splits are fixed index blocks (ADM: 5000): split 0 sees 2 classes, split 1 sees 5 -> mean 3.5, std 1.5
    two = FeatureStats(2, num_classes=K, is_split=10)
    two.update(torch.randn(20, 2), torch.arange(20), 50.0 * torch.eye(K)[[0, 1] * 5 + [0, 1, 2, 3, 4] * 2])
    mean, std = two.inception_score()
    assert (mean, std) == (pytest.approx(3.5, rel=1e-6), pytest.approx(1.5, rel=1e-6))


def test_inception_score_matches_direct_formula():
    torch.manual_seed(0)
    logits = torch.randn(60, 7, dtype=torch.float64) * 2
    stats = FeatureStats(1, num_classes=7, is_split=25)
    for start in range(0, 60, 8):                                   # batches cut across split boundaries
        stats.update(torch.zeros(len(logits[start:start + 8]), 1), torch.arange(start, min(start + 8, 60)),
                     logits[start:start + 8])
    scores = []
    for s in range(0, 60, 25):                                      # ADM evaluator.py compute_inception_score
        p = torch.softmax(logits[s:s + 25], 1).numpy()
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    assert stats.inception_score()[0] == pytest.approx(float(np.mean(scores)), rel=1e-10)


def test_precision_recall_known_answers():
    ref = torch.arange(10, dtype=torch.float64)[:, None]           # points 0..9 on a line
    # k=3 radius of each reference point (3rd nearest other point): 3 for the ends 0 and 9, 2 elsewhere
    inside = torch.tensor([[4.5], [0.0], [9.0], [2.2]])
    outside = torch.tensor([[100.0], [-20.0], [50.0], [13.0]])     # 13 is 4 > 3 away from 9
    p, r = precision_recall(ref, torch.cat([inside, outside]), k=3)
    assert p == 0.5
    assert r == 1.0           # the sample at 0 has 3rd-neighbour radius 9 (to 9.0): its ball holds every reference
    # samples bunched at 0..1.5: radii 1.5, 1, 1, 1.5 -> balls reach up to 3, so references 0..3 are recalled
    p, r = precision_recall(ref, torch.tensor([[0.0], [0.5], [1.0], [1.5]]), k=3)
    assert (p, r) == (1.0, 0.4)
    assert precision_recall(ref, ref, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(ref[:3], ref, k=3)


def test_adm_and_pytorch_fid_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=8), np.cov(rng.normal(size=(50, 8)), rowvar=False)
    imgs = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, arr_0=imgs)            # ADM reference batch layout
    np.savez_compressed(tmp_path / "adm_z.npz", mu=mu, sigma=sigma, arr_0=imgs)
    np.savez(tmp_path / "pfid.npz", mu=mu.astype(np.float32), sigma=sigma)     # pytorch-fid --save-stats layout
    for name in ("adm.npz", "adm_z.npz"):
        ref = read_reference(str(tmp_path / name))
        assert ref["has_images"] and ref["protocol"] is None
        np.testing.assert_array_equal(ref["mu"], mu)
        src = NpzSource(str(tmp_path / name))                   # uncompressed is memory-mapped, compressed read
        assert isinstance(src.images, np.memmap) == (name == "adm.npz")
        got, labels = src.load(1, 4)
        assert labels is None and torch.equal(torch.stack(got), torch.from_numpy(imgs[1:4]).permute(0, 3, 1, 2))
    ref = read_reference(str(tmp_path / "pfid.npz"))
    assert not ref["has_images"] and ref["mu"].dtype == np.float64
    np.testing.assert_allclose(ref["sigma"], sigma)
    proto = {"detector": "x", "feature_dim": 8, "detector_sha256": "a", "resize": "tf1"}
    check_reference(ref, proto, "pfid.npz")                       # no protocol: accepted
    with pytest.raises(ValueError, match="same --detector"):
        check_reference(ref, dict(proto, feature_dim=2048), "pfid.npz")
    np.savez(tmp_path / "ours.npz", mu=mu, sigma=sigma, protocol=np.array(json.dumps(dict(proto, detector_sha256="b"))))
    with pytest.raises(ValueError, match="recompute it"):
        check_reference(read_reference(str(tmp_path / "ours.npz")), proto, "ours.npz")


def test_missing_inception_weights_offline_names_file_and_place(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "hub"), OMP_NUM_THREADS="1")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fid.py"), "eval", "--samples",
                          str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--offline"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "pt_inception-2015-12-05-6726825d.pth" in out.stderr
    assert os.path.join(str(tmp_path / "hub"), "hub", "checkpoints") in out.stderr or \
        os.path.join(str(tmp_path / "hub"), "checkpoints") in out.stderr
    assert "--inception PATH" in out.stderr
