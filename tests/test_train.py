"""dimscale/train.py in one process (bad configs, finetune from a snapshot, non-finite losses) and the ZeRO-3 EMA."""
import json
import math
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_train_dist import CONFIG, REPO, clean_env, exit_now, fmnist_shards, free_port, losses, overrides


@pytest.fixture
def one_process(monkeypatch):
    """A world of one for in-process main(): fresh port, env restored afterwards."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra intra-op threads only contend on a shared CPU

    def run(argv):
        from dimscale import train
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        return train.main(argv)
    yield run
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Bad configs: one clear line, exit code 2, before any process group starts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sets, world, message", [
    (["train.lrr=1"], 1, "unknown config key 'train.lrr'"),
    (["train.micro_batch=four"], 1, "train.micro_batch: expected an integer"),
    (["train.global_batch=16", "train.micro_batch=3"], 2, "not divisible by train.micro_batch x world size = 3 x 2"),
    (["data.latent=online", "data.vae_path=/some/vae", "data.channels=1"], 1, "set data.channels=3"),
    (["data.shards=/nonexistent/shards"], 1, "no shards found"),
    (["model.name=DiM-Z/9"], 1, "model.name 'DiM-Z/9' is not in the zoo"),
    (["diffusion.min_snr_gamma=-1"], 1, "diffusion.min_snr_gamma = -1.0 must be >= 0"),
    (["model.scan_backend=tpu"], 1, "model.scan_backend = 'tpu' is not one of"),
])
def test_bad_config_is_rejected_with_a_clear_line(one_process, monkeypatch, capsys, sets, world, message):
    import torch.distributed as dist
    group_before = dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = ["--config", str(CONFIG), "--set", f"data.shards={fmnist_shards()}"]
    for s in sets:
        argv += ["--set", s]
    assert one_process(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err
    assert dist.is_initialized() == group_before  # failed before starting a process group


def test_bad_config_on_the_command_line():
    proc = subprocess.run([sys.executable, "dimscale/train.py", "--config", str(CONFIG), "--set", "train.zero_stage=5"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: train.zero_stage = 5; DeepSpeed ZeRO stages are 0, 1, 2 or 3"


def test_slurm_and_plain_environments_map_to_rank_and_world(monkeypatch):
    from dimscale.config import ConfigError
    from dimscale.distributed import environment as distributed_env
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(ConfigError, match="MASTER_ADDR/MASTER_PORT are not set"):
        distributed_env()
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed_env() == (3, 1, 4)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distributed_env() == (0, 0, 1) and int(os.environ["MASTER_PORT"]) > 0  # plain python: a world of one


# ------------------------------------------------------------------------------------------------
# Finetune from a snapshot made at another resolution (weak-to-strong, docs/reference.md §3.4)
# ------------------------------------------------------------------------------------------------

def test_finetune_initialises_from_a_snapshot_at_another_resolution(one_process, tmp_path):
    from dimscale.config import ModelConfig
    from dimscale.models import adapt_state_dict, build_model
    shards = fmnist_shards()
    pre = overrides(shards, tmp_path, "pre", total_images=48, ema_decay=0.5, snapshot_every_images=48, micro_batch=8)
    assert one_process(["--config", str(CONFIG), *pre]) == 0
    snap = tmp_path / "pre" / "snapshots" / "latest"
    meta = json.loads((snap / "snapshot.json").read_text())
    assert meta["data"]["resolution"] == 8 and meta["images_seen"] == 48

    # lr = 1e-30 (lr = 0 is a config error) moves no weight by a representable step: the online weights stay
    # where the snapshot put them; bf16 autocast must not round them either
    # also exercised here: the sample grid (fixed seeds/classes) and wandb offline, which needs no network
    ft = overrides(shards, tmp_path, "ft", total_images=16, lr=1e-30, warmup_images=0, precision="bf16", zero_stage=1,
                   snapshot_every_images=16, micro_batch=8, sample_every_images=16, sample_count=4, wandb="offline")
    assert one_process(["--config", str(CONFIG), *ft, "--set", f"init.snapshot={snap}", "--set", "data.resolution=16",
                        "--set", "model.input_size=16", "--set", "diffusion.sample_steps=2"]) == 0
    from PIL import Image
    with Image.open(tmp_path / "ft" / "samples" / "img000000000016.png") as grid:
        assert grid.size == (2 + 2 * 18, 2 + 2 * 18)  # 2x2 grid of 16x16 images with 2-pixel gaps
    assert list((tmp_path / "ft" / "wandb").glob("offline-run-*"))
    expected = adapt_state_dict(load_file(snap / "ema.safetensors"),
                                build_model(ModelConfig(**{**meta["model"], "input_size": 16})))
    got = load_file(tmp_path / "ft" / "snapshots" / "latest" / "ema.safetensors")
    assert got.keys() == expected.keys()
    resized = [k for k in got if got[k].shape != load_file(snap / "ema.safetensors")[k].shape]
    assert resized, "no tensor changed shape between 8x8 and 16x16: the test does not exercise pos-emb resizing"
    for k in got:
        assert torch.equal(got[k], expected[k].float()), k
    assert all(loss == loss for _, loss in losses(tmp_path / "ft"))  # bf16 run trains with finite losses


# ------------------------------------------------------------------------------------------------
# SD-VAE latent space: moments stored in the shards, or encoded on the fly (docs/reference.md §3.3)
# ------------------------------------------------------------------------------------------------

def test_latent_training_from_moments_and_online_vae(one_process, tmp_path, capsys):
    """Latent runs train from stored moments and from an online VAE; snapshots sample at 4x8x8."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from PIL import Image
    from data_fixtures import make_photo_tree, run_make_shards
    from dimscale.snapshot import model_input_shape, read_snapshot
    torch.manual_seed(0)
    vae = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(vae)  # random weights, /8 like the SD VAE
    make_photo_tree(str(tmp_path / "src"), n_random=10, seed=3, bad=False)  # 21 photos in 3 class folders
    # one square bucket: the model's pos-emb is allocated for an 8x8 latent grid
    assert run_make_shards(tmp_path / "src", tmp_path / "shards", "--resolution", 64, "--format", "png",
                           "--buckets", "64x64", "--vae", vae, "--vae-batch", 8, "--shard-size", 8,
                           "--workers", 1) == 0
    model = ["--set", "model.in_channels=4", "--set", "model.input_size=8", "--set", "model.num_classes=3",
             "--set", "data.resolution=64", "--set", "data.channels=3", "--set", "diffusion.sample_steps=2"]

    # moments: sample grids need the VAE to decode; without data.vae_path that is a config error, not a crash mid-run
    bad = overrides(str(tmp_path / "shards"), tmp_path, "bad", total_images=8, global_batch=4, micro_batch=2,
                    sample_every_images=8)
    assert one_process(["--config", str(CONFIG), *bad, *model, "--set", "data.latent=moments"]) == 2
    assert "data.vae_path = ''" in capsys.readouterr().err
    for latent in ("moments", "online"):
        args = overrides(str(tmp_path / "shards"), tmp_path, latent, total_images=8, global_batch=4, micro_batch=2,
                         ckpt_every_images=8, snapshot_every_images=8, sample_every_images=8, sample_count=4)
        assert one_process(["--config", str(CONFIG), *args, *model, "--set", f"data.latent={latent}",
                            "--set", f"data.vae_path={vae}"]) == 0, latent
        curve = losses(tmp_path / latent)
        assert [s for s, _ in curve] == [1, 2] and all(math.isfinite(v) for _, v in curve), curve
        state, meta = read_snapshot(str(tmp_path / latent / "snapshots" / "latest"))
        assert model_input_shape(meta) == ((4, 8, 8), True) and meta["images_seen"] == 8
        assert meta["data"]["vae_path"] == str(vae)  # tools/sample.py and tools/fid.py decode with it by default
        assert state["proj_out_2.weight"].shape[0] == 2 * 2 * 4  # DiM-T/2 predicts 2x2 patches of 4 channels
        with Image.open(tmp_path / latent / "samples" / "img000000000008.png") as grid:
            assert grid.size == (2 + 2 * 66, 2 + 2 * 66) and grid.mode == "RGB"  # VAE-decoded 64x64 RGB


# ------------------------------------------------------------------------------------------------
# Non-finite losses: skipped and counted; N in a row stops the run, the last good checkpoint stays
# ------------------------------------------------------------------------------------------------

def nan_losses_at(monkeypatch, step: int, count: int) -> None:
    """Fault injection: the first `count` micro-batch losses of optimizer step `step` (0-based) become NaN."""
    from dimscale import train
    real, calls = train.training_loss, {"n": 0}

    def loss_fn(engine, *args, **kwargs):
        loss = real(engine, *args, **kwargs)
        # steps taken so far = optimizer steps DeepSpeed has done (skipped micro-batches never reach it)
        if engine.global_steps == step and calls["n"] < count:
            calls["n"] += 1
            return loss * float("nan")
        return loss
    monkeypatch.setattr(train, "training_loss", loss_fn)


def test_nonfinite_losses_are_skipped_then_stop_the_run(one_process, monkeypatch, tmp_path, capsys):
    shards = fmnist_shards()
    nan_losses_at(monkeypatch, 2, 2)  # two bad micro-batches at step 2, then fine
    args = overrides(shards, tmp_path, "skip", total_images=64, max_nonfinite_in_a_row=3, ckpt_every_images=0,
                     micro_batch=8)
    assert one_process(["--config", str(CONFIG), *args]) == 0
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["nonfinite_skipped"] == 2
    assert all(r["loss"] == r["loss"] for r in rows)

    nan_losses_at(monkeypatch, 2, 100)  # never recovers
    args = overrides(shards, tmp_path, "stop", total_images=64, max_nonfinite_in_a_row=3, ckpt_every_images=16,
                     micro_batch=8)
    assert one_process(["--config", str(CONFIG), *args]) == 1
    assert "3 non-finite losses in a row" in capsys.readouterr().err
    latest = tmp_path / "stop" / "checkpoints" / "latest"
    assert json.loads((latest / "trainer.json").read_text())["images_seen"] == 32  # steps 1-2 were good


# ------------------------------------------------------------------------------------------------
# EMA under ZeRO-3 (2 real ranks) = EMA of the gathered full parameters = EMA under ZeRO-0 (ZeRO-3 sharing
# its fp32 master with the parameter partitions)
# ------------------------------------------------------------------------------------------------

def _ema_worker(rank, port, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    from dimscale import distributed, engine as engine_setup, train
    from dimscale.config import load_config
    from dimscale.diffusion import Schedule, training_loss
    from dimscale.ema import EMA
    distributed.init(0)
    out = {}
    for stage in (3, 0):
        cfg = load_config(str(CONFIG), [f"train.zero_stage={stage}", "train.precision=fp32", "train.global_batch=8",
                                        "train.micro_batch=4", "train.lr=1e-2", "train.warmup_images=0"], world_size=2)
        engine = engine_setup.build_engine(cfg, train.build_model(cfg), world_size=2)
        named = list(engine.module.named_parameters())
        ema = EMA(engine.module, decay=0.5)
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            reference = {n: p.detach().clone().double() for n, p in named}
        initial = {n: t.float() for n, t in reference.items()}
        gen = torch.Generator().manual_seed(1234 + rank)
        for _ in range(3):
            x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
            engine.backward(training_loss(engine, x, y, Schedule(), generator=gen))
            engine.step()
            ema.update(engine.module)
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                for n, p in named:
                    reference[n] = 0.5 * reference[n] + 0.5 * p.detach().double()
        # numpy: plain pickles (torch tensors would travel as shared memory the exiting worker takes with it)
        opt = engine.optimizer
        out[stage] = {"sharded": sum(p.numel() for _, p in named) == 0,
                      "master_shared": [m.data_ptr() == lp.data_ptr() for lp, m in zip(
                          getattr(opt, "fp16_partitioned_groups_flat", []), getattr(opt, "fp32_partitioned_groups_flat", []))],
                      "ema": {n: t.numpy() for n, t in ema.shadow.items()},
                      "initial": {n: t.numpy() for n, t in initial.items()},
                      "reference": {n: t.float().numpy() for n, t in reference.items()}}
    results.put((rank, out))
    exit_now(results)


def test_ema_under_zero3_equals_the_ema_of_gathered_parameters():
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_ema_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        outs = dict(results.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            p.kill()
    outs = {r: {s: {k: {n: torch.from_numpy(a) for n, a in v.items()} if isinstance(v, dict) else v
                    for k, v in d.items()} for s, d in o.items()} for r, o in outs.items()}
    z3, z0 = outs[0][3], outs[0][0]
    assert z3["sharded"] and not z0["sharded"]  # ZeRO-3 really partitioned the weights
    assert z3["master_shared"] and all(z3["master_shared"])  # fp32 params: no second fp32 "master" copy per rank
    for name, ema in z3["ema"].items():
        assert ema.numel() > 0 and ema.dtype == torch.float32
        torch.testing.assert_close(ema, z3["reference"][name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ema, z0["ema"][name], rtol=1e-4, atol=1e-6)  # same run under ZeRO-0
        torch.testing.assert_close(ema, outs[1][3]["ema"][name], rtol=0, atol=0)  # both ranks hold the same EMA
    assert any(not torch.allclose(z3["ema"][n], z3["initial"][n]) for n in z3["ema"]), "the EMA never moved"


# ------------------------------------------------------------------------------------------------
# A full disk while checkpointing: one line that says so, the previous checkpoint intact and resumable
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (needs root, as CI runs); unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(one_process, small_disk, capsys):
    shards = fmnist_shards()
    first = overrides(shards, small_disk, "full", total_images=32, ckpt_every_images=16, micro_batch=8)
    assert one_process(["--config", str(CONFIG), *first]) == 0
    ckpts = small_disk / "full" / "checkpoints"
    size = sum(f.stat().st_size for f in (ckpts / "latest").iterdir())
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - size // 2))   # room for half a checkpoint
    more = overrides(shards, small_disk, "full", total_images=64, ckpt_every_images=16, micro_batch=8)
    capsys.readouterr()
    assert one_process(["--config", str(CONFIG), *more]) == 1
    err = capsys.readouterr().err
    assert "is full" in err and "checkpoint (" in err and "is intact" in err, err
    assert "iostream error" not in err and "Traceback" not in err
    assert os.readlink(ckpts / "latest") == "img000000000032"
    assert not [p for p in ckpts.iterdir() if p.name.startswith("tmp-")]   # the partial write was removed
    filler.unlink()
    assert one_process(["--config", str(CONFIG), *more]) == 0              # resumes from the intact one
    assert json.loads((small_disk / "full" / "done.json").read_text())["images_seen"] == 64


def test_skipped_inputs_show_in_the_status_line_metrics_and_final_record(one_process, tmp_path, capsys):
    import shutil
    shards = tmp_path / "shards"
    shutil.copytree(fmnist_shards(), shards)
    for tar in shards.glob("*.tar"):          # every shard cut inside a member after ~15% of its samples
        data = tar.read_bytes()
        tar.write_bytes(data[: int(len(data) * 0.15) + 100])
    args = overrides(str(shards), tmp_path, "skips", total_images=96, ckpt_every_images=0, micro_batch=8)
    args += ["--set", "data.shuffle_buffer=8"]   # windows of 8: a cut shard still yields its first samples
    assert one_process(["--config", str(CONFIG), *args]) == 0
    rows = [json.loads(line) for line in (tmp_path / "skips" / "metrics.jsonl").read_text().splitlines()]
    changed = [r for r in rows if "skipped_inputs" in r]
    assert changed and changed[0]["skipped"] == {"corrupt_shard": changed[0]["skipped_inputs"]}
    assert " skipped " in capsys.readouterr().out
    done = json.loads((tmp_path / "skips" / "done.json").read_text())
    assert done["skipped_inputs"]["corrupt_shard"] == changed[-1]["skipped_inputs"] >= 1
