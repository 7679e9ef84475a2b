"""Training checkpoints: the full state, written under a temporary name and published as `latest` atomically.

run_dir/checkpoints/
    img000000012800/          one checkpoint, named by images seen
        <DeepSpeed files>     module, optimizer shards, LR schedule (engine.save_checkpoint)
        ema.safetensors       fp32 EMA weights (rank 0)
        trainer.json          images seen, steps, counters (rank 0)
        rank00000.pt          per-rank loader state and RNG states (tensors and plain Python values only)
    latest -> img000000012800 a symlink, swapped with os.replace: a reader sees the old or the new one, never half
    tmp-img000000025600/      a write in progress (or killed mid-way); ignored, and removed at the next start

A kill at any moment leaves `latest` pointing at a complete checkpoint
(tests/test_train_dist.py::test_kill_during_checkpoint_write_keeps_a_loadable_latest).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

LATEST = "latest"
_NAME = re.compile(r"^img(\d{12})$")


def checkpoint_name(images_seen: int) -> str:
    return f"img{images_seen:012d}"


def latest_path(ckpt_dir: str) -> str | None:
    """Folder of the newest complete checkpoint, or None."""
    link = os.path.join(ckpt_dir, LATEST)
    return os.path.realpath(link) if os.path.isdir(link) else None


def clean_partial(ckpt_dir: str) -> None:
    """Remove writes that a crash interrupted (rank 0, before training starts)."""
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            if name.startswith("tmp-") or name == LATEST + ".tmp":
                path = os.path.join(ckpt_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


# ------------------------------------------------------------------------------------------------
# RNG states (torch, CUDA, numpy, python): restored so a resumed run draws the same noise, bit for bit
# ------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------

def save(engine, ckpt_dir: str, images_seen: int, trainer_state: dict, rank_state: dict,
         ema_state: dict, keep: int) -> str:
    """Write a checkpoint on every rank (collective) and make it `latest`; returns its folder."""
    rank = dist.get_rank()
    name = checkpoint_name(images_seen)
    tmp_tag = "tmp-" + name
    engine.save_checkpoint(ckpt_dir, tag=tmp_tag, client_state={"images_seen": images_seen}, save_latest=False)
    tmp = os.path.join(ckpt_dir, tmp_tag)
    torch.save(rank_state, os.path.join(tmp, f"rank{rank:05d}.pt"))
    if rank == 0:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in ema_state.items()},
                  os.path.join(tmp, "ema.safetensors"))
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump({**trainer_state, "images_seen": images_seen, "world_size": dist.get_world_size()}, f)
    pause = os.environ.get("DIMSCALE_TEST_PAUSE_IN_CKPT_WRITE")  # test hook 'IMAGES:SECONDS': widen the kill window
    if pause and int(pause.split(":")[0]) == images_seen:
        time.sleep(float(pause.split(":")[1]))
    dist.barrier()  # every rank's files are on disk before the checkpoint is published
    final = os.path.join(ckpt_dir, name)
    if rank == 0:
        missing = [r for r in range(dist.get_world_size()) if not os.path.isfile(os.path.join(tmp, f"rank{r:05d}.pt"))]
        if missing:
            raise RuntimeError(f"checkpoint {tmp}: ranks {missing} wrote no state; "
                               f"is {ckpt_dir} on a filesystem all nodes share?")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        link_tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
        if os.path.lexists(link_tmp):
            os.remove(link_tmp)
        os.symlink(name, link_tmp)
        os.replace(link_tmp, os.path.join(ckpt_dir, LATEST))  # the atomic publish
        _prune(ckpt_dir, keep, name)
    dist.barrier()
    return final


def _prune(ckpt_dir: str, keep: int, newest: str) -> None:
    """Keep the newest `keep` checkpoints (never the one `latest` names)."""
    names = sorted(n for n in os.listdir(ckpt_dir) if _NAME.match(n))
    for n in names[:-max(keep, 1)]:
        if n != newest:
            shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)


def load_latest(engine, ckpt_dir: str):
    """Restore the engine from `latest`; returns (trainer_state, rank_state, ema_state), or None if there is none."""
    path = latest_path(ckpt_dir)
    if path is None:
        return None
    with open(os.path.join(path, "trainer.json")) as f:
        trainer_state = json.load(f)
    world = dist.get_world_size()
    if trainer_state["world_size"] != world:
        raise ValueError(f"checkpoint {path} was written by {trainer_state['world_size']} ranks but this run has "
                           f"{world}; resume with the same number of ranks (or start a new run name)")
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=os.path.basename(path))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    rank_state = torch.load(os.path.join(path, f"rank{dist.get_rank():05d}.pt"), map_location="cpu",
                            weights_only=True)
    return trainer_state, rank_state, load_file(os.path.join(path, "ema.safetensors"))
