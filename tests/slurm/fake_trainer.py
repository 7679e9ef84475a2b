"""Test-only stand-in for dimscale.train.main(argv, on_preempt): same files, same exit codes, no model.

Selected with DIMSCALE_TEST_TRAINER=tests/slurm/fake_trainer.py:main. A "step" sleeps FAKE_STEP_S seconds and
adds train.global_batch images; a real gloo group checks the launcher's RANK/WORLD_SIZE/MASTER_* mapping and
agrees on stop signals at step boundaries exactly as the trainer does. Its "loss" falls with the images the
weights have seen, counting those of the init snapshot, so a finetune from a snapshot starts lower.
"""
import argparse
import json
import os
import signal
import time

import torch
import torch.distributed as dist

from dimscale.config import load_config, save_config
from dimscale.snapshot import save_snapshot


def _atomic_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def main(argv=None, on_preempt=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(args.config, args.set, world)
    dist.init_process_group("gloo", rank=rank, world_size=world)  # env:// from the launcher
    t, run = cfg.train, cfg.run_dir
    os.makedirs(run, exist_ok=True)
    if rank == 0:
        save_config(cfg, os.path.join(run, "config.json"))
    ckpt = os.path.join(run, "checkpoints", "latest", "state.json")
    state = {"images_seen": 0, "init_images": 0}
    if os.path.isfile(ckpt):
        state = json.load(open(ckpt))
        if rank == 0:  # same line as dimscale/train.py, which the tests parse
            print(f"[{cfg.name}] resumed from {os.path.dirname(ckpt)} at {state['images_seen']} images", flush=True)
    elif cfg.init.snapshot:
        state["init_images"] = json.load(open(os.path.join(cfg.init.snapshot, "snapshot.json")))["images_seen"]
        if rank == 0:
            print(f"[{cfg.name}] initialised from snapshot {cfg.init.snapshot}", flush=True)
    stop = {"sig": 0}
    previous = {s: signal.signal(s, lambda n, f: stop.update(sig=n))
                for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}

    def save():
        if rank == 0:
            _atomic_json(ckpt, state)
        dist.barrier()

    def snapshot():
        if rank == 0:
            save_snapshot(os.path.join(run, "snapshots", "latest"), {"w": torch.zeros(1)}, cfg.model,
                          {"images_seen": state["images_seen"], "run": cfg.name})

    step_s = float(os.environ.get("FAKE_STEP_S", "0.3"))
    try:
        while state["images_seen"] < t.total_images:
            time.sleep(step_s)
            before = state["images_seen"]
            state["images_seen"] += t.global_batch
            flag = torch.tensor([float(stop["sig"]), float(rank)])
            dist.all_reduce(flag)
            assert flag[1].item() == world * (world - 1) / 2  # every rank took part
            loss = 1.0 / (1.0 + (state["init_images"] + state["images_seen"]) / t.total_images)
            if rank == 0:
                with open(os.path.join(run, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"images_seen": state["images_seen"], "loss": loss, "world": world,
                                        "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
            if flag[0].item() > 0:
                save()
                if rank == 0 and on_preempt is not None:
                    on_preempt({"run_dir": run, "checkpoint": os.path.dirname(ckpt), "images_seen": state["images_seen"]})
                return 3
            if state["images_seen"] // t.ckpt_every_images > before // t.ckpt_every_images:
                save()
        save()
        snapshot()
        if rank == 0:
            _atomic_json(os.path.join(run, "done.json"), {"images_seen": state["images_seen"]})
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        dist.destroy_process_group()
