"""Bad configs fail in the config or path check, before any process group: one line, once, exit code 2."""
import json
import shutil
import subprocess
import sys

import pytest

from test_train_dist import CONFIG, REPO, clean_env, fmnist_shards, free_port


def bad_snapshot(tmp):
    """A snapshot folder with weights but no snapshot.json."""
    folder = tmp / "snap"
    folder.mkdir()
    (folder / "ema.safetensors").write_bytes(b"\0" * 16)
    return ["--set", f"init.snapshot={folder}"]


def evil_manifest(tmp):
    """Shards whose manifest names a shard with a shell command in it, read through a pipe: template."""
    shards = tmp / "shards"
    shutil.copytree(fmnist_shards(), shards)
    m = json.loads((shards / "manifest.json").read_text())
    m["buckets"]["16x16"]["shards"][0]["url"] = f"x.tar; touch {tmp}/MARKER #"
    (shards / "manifest.json").write_text(json.dumps(m))
    return ["--set", f"data.shards={shards}", "--set", f"data.shard_url=pipe:cat {shards}/{{shard}}"]


CASES = {  # name: (config file bytes or None for the tiny CPU config, --set overrides or a builder, message)
    "top_level_array": (b"[1, 2]", [], "holds a JSON list; a config is a JSON object"),
    "not_utf8": (b'{"name": "caf\xe9"}', [], "is not UTF-8 text"),
    "negative_lr": (None, ["train.lr=-1e-4"], "train.lr = -0.0001 must be a positive number"),
    "zero_lr": (None, ["train.lr=0"], "train.lr = 0.0 must be a positive number"),
    "betas_type": (None, ['train.betas=["a", "b"]'], "train.betas = ['a', 'b'] must be two numbers in [0, 1)"),
    "resolution_above_shards": (None, ["data.resolution=32", "model.input_size=32"], "shards were written at 16"),
    "resolution_zero": (None, ["data.resolution=0"], "data.resolution = 0 must be a positive"),
    "unknown_bucket": (None, ['data.buckets={"99x99": {"prob": 1}}'], "data.buckets names ['99x99']"),
    "channels_2": (None, ["data.channels=2", "model.in_channels=2"], "data.channels = 2; use 3 (RGB) or 1"),
    "bucket_micro_batch_0": (None, ['data.buckets={"16x16": {"micro_batch": 0}}'],
                             "data.buckets['16x16'].micro_batch = 0 must be a positive integer"),
    "snapshot_without_json": (None, bad_snapshot, "is not an EMA snapshot folder (no snapshot.json)"),
    "in_channels_vs_data": (None, ["model.in_channels=3"], "model.in_channels = 3 but the loader gives"),
    "log_every_0": (None, ["train.log_every_steps=0"], "train.log_every_steps = 0 must be positive"),
    "num_classes_too_few": (None, ["model.num_classes=5"], "set model.num_classes=10"),
    "sample_count_0": (None, ["train.sample_count=0"], "train.sample_count = 0 must be positive"),
    "shell_in_manifest": (None, evil_manifest, "is refused: shard urls must be relative paths"),
}


def command(tmp, case):
    content, sets, _ = CASES[case]
    config = str(CONFIG)
    if content is not None:
        config = str(tmp / "bad.json")
        (tmp / "bad.json").write_bytes(content)
    args = ["--config", config, "--set", f"data.shards={fmnist_shards()}", "--set", f"out_dir={tmp}/runs"]
    for s in (sets(tmp) if callable(sets) else [a for s in sets for a in ("--set", s)]):
        args.append(s)
    return args


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_before_any_process_group(tmp_path, case):
    proc = subprocess.run([sys.executable, "dimscale/train.py", *command(tmp_path, case)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("config error: "), proc.stderr[-3000:]
    assert CASES[case][2] in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "MARKER").exists()


def test_bad_config_under_torchrun_is_said_once_with_exit_code_2(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "dimscale/train.py",
           *command(tmp_path, "zero_lr")]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("config error: ") == 1, proc.stderr[-3000:]
    assert "config error: train.lr = 0.0 must be a positive number" in proc.stderr
    # torchrun itself exits 1 on any failed rank; its report names the ranks' own exit code, rank 0 first
    root_cause = proc.stderr.split("Root Cause")[1]
    assert "rank      : 0" in root_cause and "exitcode  : 2" in root_cause, proc.stderr[-3000:]
    assert 'dimscale/train.py", line' not in proc.stderr  # no traceback from the trainer


def test_write_json_atomic_never_leaves_a_partial_file(tmp_path):
    """A failed write keeps the old file whole and leaves no temporary behind (the launcher reads done.json while
    rank 0 writes it)."""
    from dimscale.config import write_json_atomic
    path = tmp_path / "done.json"
    write_json_atomic(str(path), {"images_seen": 64})
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"images_seen": object()})  # json.dump fails half-way through
    assert json.loads(path.read_text()) == {"images_seen": 64}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.json"]
