"""The FID Inception: the real weights file's key names and shapes, TF1 resize, and one tiny tool run.

The real pt_inception weights are not available offline (docs/engineering-notes.md §D.2), so the state dict is generated
here with the file's exact layout and batch-norm statistics re-estimated on real photos (a random Inception with
BN left at 0/1 gives ~1e-8 features and FID 0 everywhere). Inception at 299 on CPU is slow: a handful of images.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dimscale.metrics.inception import WEIGHTS_NAME, InceptionV3, load_inception, resize_tf1, standin_state_dict
from dimscale.metrics.stats import frechet_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = "/usr/share/backgrounds/mate"


def real_photos(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    """n uint8 (3, side, side) crops of the mate-backgrounds photos (a Makefile apt package)."""
    files = sorted(f for f in glob.glob(os.path.join(PHOTOS, "**", "*.jpg"), recursive=True))
    if not files:
        pytest.fail(f"no photos under {PHOTOS}: apt-get install -y --no-install-recommends mate-backgrounds")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        with Image.open(files[i % len(files)]) as im:
            im.draft("RGB", (4 * side, 4 * side))                     # JPEG DCT downscale: fast decode
            im = im.convert("RGB")
            x, y = rng.integers(0, im.width - 2 * side), rng.integers(0, im.height - 2 * side)
            out.append(np.asarray(im.crop((x, y, x + 2 * side, y + 2 * side)).resize((side, side), Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.set_num_threads(2)
    path = tmp_path_factory.mktemp("hub") / WEIGHTS_NAME
    torch.save(standin_state_dict(real_photos(6, seed=1)), path)
    return str(path)


def test_state_dict_has_the_real_files_layout():
    sd = InceptionV3().state_dict()
    # 94 conv+BN units x (conv.weight + 5 BN tensors) + fc.{weight,bias} = 566 tensors, as the real file
    assert len(sd) == 566
    assert sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked")) == 23885392
    expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1), "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
                "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7), "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
                "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
                "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)


def test_resize_tf1_known_answer():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    # TF1 align_corners=False: source = out * in/out = 0, .5, 1, 1.5 -> the last column/row clamp to the edge
    want = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float32)
    assert torch.equal(resize_tf1(x, 4)[0, 0], want)
    assert torch.equal(resize_tf1(torch.arange(25.0).view(1, 1, 5, 5), 5), torch.arange(25.0).view(1, 1, 5, 5))


def test_loads_weights_and_gives_2048_features(weights, tmp_path, monkeypatch):
    model = load_inception(weights)
    imgs = real_photos(2, side=48, seed=2)
    with torch.no_grad():
        pool, logits = model(imgs)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert pool.std() > 1e-2 and (pool >= 0).all()                 # not the degenerate 1e-8 of un-calibrated BN
    assert (pool[0] - pool[1]).abs().max() > 1e-3                  # different images, different features
    # files saved without num_batches_tracked (older torch) load too; a wrong file is refused by name
    sd = {k: v for k, v in torch.load(weights, weights_only=True).items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    with torch.no_grad():
        assert torch.equal(load_inception(str(tmp_path / "old.pth"))(imgs)[0], pool)
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys.*fc.bias"):
        load_inception(str(tmp_path / "bad.pth"))
    # the torch hub cache is found without a flag
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    os.makedirs(tmp_path / "th" / "hub" / "checkpoints")
    os.symlink(weights, tmp_path / "th" / "hub" / "checkpoints" / WEIGHTS_NAME)
    assert load_inception(offline=True).weights_sha256 == model.weights_sha256
    # pytorch-fid's resize is a different input pipeline: same weights, other features for non-299 inputs
    with torch.no_grad():
        assert not torch.allclose(load_inception(weights, resize="pytorch-fid")(imgs)[0], pool, atol=1e-4)


def run_fid_on_npz(samples: torch.Tensor, ref: torch.Tensor, weights: str, tmp_path) -> dict:
    """tools/fid.py eval of uint8 (N, C, H, W) samples against a reference, both as .npz; its JSON record."""
    np.savez(tmp_path / "s.npz", arr_0=samples.permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "r.npz", arr_0=ref.permute(0, 2, 3, 1).numpy())
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "fid.py"), "eval", "--samples",
                          str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--inception", weights,
                          "--batch-size", "4", "--no-progress", "--offline"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tool_fid_equals_bare_computation(weights, tmp_path):
    samples, ref = real_photos(3, side=40, seed=3), real_photos(3, side=40, seed=4)
    rec = run_fid_on_npz(samples, ref, weights, tmp_path)
    model = load_inception(weights)
    with torch.no_grad():
        fs, ls = model(samples)
        fr, _ = model(ref)
    fs, fr = fs.double().numpy(), fr.double().numpy()
    bare = frechet_distance(fs.mean(0), np.cov(fs, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))
    assert rec["metrics"]["fid"] == pytest.approx(bare, rel=1e-6) and bare > 0
    p = torch.softmax(ls.double(), 1)
    is_bare = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()).item()
    assert rec["metrics"]["inception_score"] == pytest.approx(is_bare, rel=1e-6)
    assert rec["resize"] == "tf1" and rec["num_samples"] == 3 and rec["world_size"] == 1
    assert rec["detector_sha256"] == model.weights_sha256 and rec["metric_name"] == "FID"


def test_grey_images_are_scored_as_their_rgb_copies(weights, tmp_path):
    """Sources hand out grey (B, 1, H, W) from grey npz files, idx: and grey models: Pillow's L -> RGB of each."""
    grey = real_photos(3, side=40, seed=5).float().mean(1, keepdim=True).round().to(torch.uint8)  # (3, 1, 40, 40)
    rgb = torch.from_numpy(np.stack([np.asarray(Image.fromarray(g[0].numpy(), "L").convert("RGB"))
                                     for g in grey])).permute(0, 3, 1, 2)
    model = load_inception(weights)
    with torch.no_grad():
        assert torch.equal(model(grey)[0], model(rgb)[0])
    ref = real_photos(3, side=40, seed=6)
    rec = run_fid_on_npz(grey, ref, weights, tmp_path)                                     # grey npz: (N, H, W, 1)
    with torch.no_grad():
        fs, fr = model(rgb)[0].double().numpy(), model(ref)[0].double().numpy()
    bare = frechet_distance(fs.mean(0), np.cov(fs, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))
    assert rec["metrics"]["fid"] == pytest.approx(bare, rel=1e-6)
