"""tools/sample.py end to end on an EMA snapshot of a tiny real DiM (DiM-T/2), pixel and latent space, 1x and 2x."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dimscale.config import ModelConfig  # noqa: E402
from dimscale.snapshot import save_snapshot  # noqa: E402

models = pytest.importorskip("dimscale.models", reason="dimscale.models (DiM) not available yet")
from dimscale.generate import to_uint8  # noqa: E402
from tools.sample import main  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_snapshot(folder, in_channels, resolution, latent="none", seed=0):
    """Write a DiM-T/2 EMA snapshot with random (non-zero) weights, as the trainer would."""
    side = resolution // 8 if latent != "none" else resolution
    cfg = ModelConfig(name="DiM-T/2", in_channels=in_channels, input_size=side, num_classes=10)
    torch.manual_seed(seed)
    model = models.build_model(cfg)
    with torch.no_grad():                      # zero-initialised heads / pos-emb would make every sample equal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    data = {"resolution": resolution, "latent": latent, "vae_scale": 0.18215}
    save_snapshot(str(folder), model.state_dict(), cfg, {"data": data, "images_seen": 0, "run": "test"})
    return model


def test_to_uint8_convention():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5]).view(1, 1, 1, 5)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 255, 255]      # clamp(127.5 x + 128, 0, 255), truncated


def test_pixel_snapshot_grid_npz_and_2x(tmp_path):
    model = tiny_snapshot(tmp_path / "snap", in_channels=3, resolution=8)
    common = ["--snapshot", str(tmp_path / "snap"), "--labels", "1,7,3", "--steps", "3", "--seed", "5", "--cfg-scale", "0.4"]
    assert main(common + ["--out", str(tmp_path / "g.png"), "--npz-out", str(tmp_path / "s.npz")]) == 0
    grid = Image.open(tmp_path / "g.png")
    assert grid.mode == "RGB" and grid.size == (2 + 2 * 10, 2 + 2 * 10)     # 3 images, 2 per row, 2 px padding
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 8, 8, 3)
    assert len({a.tobytes() for a in arr}) == 3
    # the tool is the library: same seeds (seed + i) and labels give the same images, whatever the batch size
    from dimscale.diffusion import sample
    ref = sample(model.eval(), torch.tensor([1, 7, 3]), (3, 8, 8), steps=3, cfg_scale=0.4, seeds=[5, 6, 7])
    assert np.abs(to_uint8(ref).astype(int) - arr.astype(int)).max() <= 1
    assert main(common + ["--batch-size", "1", "--out", str(tmp_path / "b.png"), "--npz-out", str(tmp_path / "b.npz")]) == 0
    assert np.abs(np.load(tmp_path / "b.npz")["arr_0"].astype(int) - arr.astype(int)).max() <= 1
    # 2x the training resolution with the same weights (Upsample Guidance)
    assert main(common + ["--upsample", "2", "--out", str(tmp_path / "g2.png"), "--npz-out", str(tmp_path / "s2.npz")]) == 0
    assert np.load(tmp_path / "s2.npz")["arr_0"].shape == (3, 16, 16, 3)
    assert Image.open(tmp_path / "g2.png").size == (2 + 2 * 18, 2 + 2 * 18)


def test_grey_pixel_model_random_labels(tmp_path):
    tiny_snapshot(tmp_path / "snap", in_channels=1, resolution=8)
    assert main(["--snapshot", str(tmp_path / "snap"), "--num-images", "2", "--steps", "2", "--cfg-scale", "0",
                 "--out", str(tmp_path / "g.png"), "--npz-out", str(tmp_path / "s.npz")]) == 0
    assert Image.open(tmp_path / "g.png").mode == "L"
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 8, 8, 1)


def test_latent_snapshot_decodes_with_vae(tmp_path):
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    tiny_snapshot(tmp_path / "snap", in_channels=4, resolution=64, latent="moments")   # latent grid 8x8
    args = ["--snapshot", str(tmp_path / "snap"), "--labels", "0,9", "--steps", "2", "--out", str(tmp_path / "g.png"),
            "--npz-out", str(tmp_path / "s.npz")]
    with pytest.raises(FileNotFoundError, match="--vae PATH"):
        main(args + ["--vae", str(tmp_path / "missing")])
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                  latent_channels=4, norm_num_groups=8, layers_per_block=1).save_pretrained(tmp_path / "vae")
    assert main(args + ["--vae", str(tmp_path / "vae")]) == 0
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (2, 8, 8, 3) and arr.dtype == np.uint8                       # tiny VAE: no downsampling


def test_snapshot_written_by_the_trainer(tmp_path):
    """The trainer's own EMA snapshot (a 2-step run of dimscale/train.py) samples at 1x and at 2x."""
    import json
    import subprocess
    from test_train_dist import CONFIG, REPO, clean_env, fmnist_shards
    sets = {"data.shards": fmnist_shards(), "out_dir": str(tmp_path), "name": "t", "data.resolution": 8,
            "model.input_size": 8, "data.num_workers": 0, "train.total_images": 32, "train.global_batch": 16,
            "train.micro_batch": 16, "train.warmup_images": 0, "train.snapshot_every_images": 32,
            "train.ckpt_every_images": 0, "train.sample_every_images": 0, "diffusion.noise_shift": 2}
    cmd = [sys.executable, "dimscale/train.py", "--config", str(CONFIG)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    snap = str(tmp_path / "t" / "snapshots" / "latest")
    channels = json.loads((tmp_path / "t" / "snapshots" / "latest" / "snapshot.json").read_text())["model"]["in_channels"]
    for m, side in ((1, 8), (2, 16)):
        npz = str(tmp_path / f"s{m}.npz")
        assert main(["--snapshot", snap, "--num-images", "4", "--steps", "4", "--upsample", str(m), "--out", str(tmp_path / f"g{m}.png"),
                     "--npz-out", npz]) == 0
        arr = np.load(npz)["arr_0"]
        assert arr.shape == (4, side, side, channels) and len({a.tobytes() for a in arr}) == 4
        assert Image.open(tmp_path / f"g{m}.png").size == (2 + 2 * (side + 2),) * 2
    # the snapshot records its noise schedule and sampling uses it: without the record, other samples
    import shutil
    meta = json.loads((tmp_path / "t" / "snapshots" / "latest" / "snapshot.json").read_text())
    assert meta["diffusion"]["noise_shift"] == 2
    plain = tmp_path / "plain"
    shutil.copytree(snap, plain)
    (plain / "snapshot.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "diffusion"}))
    assert main(["--snapshot", str(plain), "--num-images", "4", "--steps", "4", "--out", str(tmp_path / "p.png"),
                 "--npz-out", str(tmp_path / "p.npz"), "--cfg-scale", str(meta["diffusion"]["cfg_scale"])]) == 0
    assert not np.array_equal(np.load(tmp_path / "p.npz")["arr_0"], np.load(tmp_path / "s1.npz")["arr_0"])
