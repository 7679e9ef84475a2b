"""Training checkpoints: the full state, written under a temporary name and published as `latest` atomically.

run_dir/checkpoints/
    img000000012800/          one checkpoint, named by images seen
        <DeepSpeed files>     module, optimizer shards, LR schedule (engine.save_checkpoint)
        ema.safetensors       fp32 EMA weights (rank 0)
        trainer.json          images seen, steps, counters (rank 0)
        rank00000.pt          per-rank loader state and RNG states (tensors and plain Python values only)
        universal/            DeepSpeed universal checkpoint, made from the above when another world size resumes
    latest -> img000000012800 a symlink, swapped with os.replace: a reader sees the old or the new one, never half
    tmp-img000000025600/      a write in progress (or killed mid-way); ignored, and removed at the next start

A kill at any moment leaves `latest` pointing at a complete checkpoint
(tests/test_train_dist.py::test_kill_during_checkpoint_write_keeps_a_loadable_latest). DeepSpeed's own files are
loaded with weights_only=True (`weights_only_loads`), so a crafted pickle in a checkpoint folder cannot run code.

Another world size (a requeue onto other nodes, another --nodes) resumes through DeepSpeed's own resharding:
ZeRO-0 keeps the whole optimizer state in mp_rank_00, which any world size loads as it is; ZeRO-1/2/3 shards are
turned into a universal checkpoint (deepspeed.checkpoint.ds_to_universal: one folder per parameter holding its
fp32 weights and Adam moments) once, by rank 0, and loaded with DeepSpeed's load_universal path, which slices each
parameter for the new partitioning. The EMA (one fp32 file) and the loader's global position need no resharding.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import io
import json
import os
import random
import re
import shutil
import socket

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

LATEST = "latest"
UNIVERSAL = "universal"
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

class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message says why and that the previous one is intact."""


def save(engine, ckpt_dir: str, images_seen: int, trainer_state: dict, rank_state: dict,
         ema_state: dict, keep: int) -> str:
    """Write a checkpoint on every rank (collective) and make it `latest`; returns its folder."""
    rank = dist.get_rank()
    name = checkpoint_name(images_seen)
    tmp = os.path.join(ckpt_dir, "tmp-" + name)
    try:
        engine.save_checkpoint(ckpt_dir, tag="tmp-" + name, client_state={"images_seen": images_seen},
                               save_latest=False)
        torch.save(rank_state, os.path.join(tmp, f"rank{rank:05d}.pt"))
        if rank == 0:
            save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in ema_state.items()},
                      os.path.join(tmp, "ema.safetensors"))
            with open(os.path.join(tmp, "trainer.json"), "w") as f:
                json.dump({**trainer_state, "images_seen": images_seen, "world_size": dist.get_world_size()}, f)
    except (OSError, RuntimeError) as e:
        raise CheckpointWriteError(_write_failure(ckpt_dir, tmp, e)) from None
    dist.barrier()  # every rank's files are on disk before the checkpoint is published
    final = os.path.join(ckpt_dir, name)
    if rank == 0:
        publish(ckpt_dir, tmp, name)
        _prune(ckpt_dir, keep, name)
    dist.barrier()
    return final


def _write_failure(ckpt_dir: str, tmp: str, e: Exception) -> str:
    """One line for a failed checkpoint write; torch.save reports a full disk as 'basic_ios::clear: iostream error'."""
    shutil.rmtree(tmp, ignore_errors=True)   # frees what the partial write took; it was never published
    previous = latest_path(ckpt_dir) or "none yet"
    free = shutil.disk_usage(ckpt_dir).free
    full = getattr(e, "errno", None) == errno.ENOSPC or "iostream error" in str(e) or free < 64 * 2**20
    if full:
        return (f"the disk holding {ckpt_dir} is full ({free / 2**20:.0f} MiB free): the checkpoint could not be "
                f"written. The previous checkpoint ({previous}) is intact; free space (or lower "
                f"train.keep_checkpoints) and rerun the same command to resume from it")
    return (f"writing a checkpoint in {ckpt_dir} failed ({type(e).__name__}: {e}); the previous checkpoint "
            f"({previous}) is intact; fix the cause and rerun the same command to resume from it")


def publish(ckpt_dir: str, tmp: str, name: str) -> None:
    """Rank 0: move the complete write into place and point `latest` at it with one atomic rename."""
    world = dist.get_world_size()
    missing = [r for r in range(world) if not os.path.isfile(os.path.join(tmp, f"rank{r:05d}.pt"))]
    if missing:
        raise RuntimeError(f"checkpoint {tmp}: ranks {missing} wrote no state; "
                           f"is {ckpt_dir} on a filesystem all nodes share?")
    final = os.path.join(ckpt_dir, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    link_tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
    if os.path.lexists(link_tmp):
        os.remove(link_tmp)
    os.symlink(name, link_tmp)
    os.replace(link_tmp, os.path.join(ckpt_dir, LATEST))  # the atomic publish


def _prune(ckpt_dir: str, keep: int, newest: str) -> None:
    """Keep the newest `keep` checkpoints (never the one `latest` names)."""
    names = sorted(n for n in os.listdir(ckpt_dir) if _NAME.match(n))
    for n in names[:-max(keep, 1)]:
        if n != newest:
            shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)


def to_universal(path: str) -> str:
    """Rank 0: convert the DeepSpeed files of checkpoint `path` into path/universal once (atomic); returns it."""
    out = os.path.join(path, UNIVERSAL)
    if os.path.isdir(out):
        return out
    from deepspeed.checkpoint import ds_to_universal
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=path, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)  # in-process, one worker: no process pool inside a training rank
    os.replace(tmp, out)
    return out


def load_latest(engine, ckpt_dir: str):
    """Restore the engine from `latest` on this or any other world size.

    Returns (trainer_state, rank_state, ema_state) or None if there is none. rank_state["loader"] is the list of
    every saved rank's loader state (ShardLoader.load_state_dict takes it for any world size); rank_state["rng"]
    is this rank's, and None when the world size changed (the ranks are not the same ones).
    """
    path = latest_path(ckpt_dir)
    if path is None:
        return None
    with open(os.path.join(path, "trainer.json")) as f:
        trainer_state = json.load(f)
    world, rank = dist.get_world_size(), dist.get_rank()
    saved_world = trainer_state["world_size"]
    if saved_world == world or engine.zero_optimization_stage() == 0:
        # ZeRO-0: module and whole optimizer state are in mp_rank_00, the same for every world size
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(ckpt_dir, tag=os.path.basename(path))
    else:
        if rank == 0:
            try:
                with weights_only_loads():
                    to_universal(path)
            except Exception as e:  # noqa: BLE001 - said once, then every rank stops below
                print(f"checkpoint {path}: DeepSpeed could not convert it to a universal checkpoint for the new "
                      f"world size ({saved_world} -> {world}): {e}", flush=True)
        dist.barrier()
        if not os.path.isdir(os.path.join(path, UNIVERSAL)):
            raise RuntimeError(f"checkpoint {path} was written by {saved_world} ranks and could not be resharded "
                               f"for {world}; resume with {saved_world} ranks")
        engine._config.load_universal_checkpoint = True  # read per call; the engine was built for a plain load
        try:
            with weights_only_loads():
                load_path, _ = engine.load_checkpoint(path, tag=UNIVERSAL)
        finally:
            engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    states = [torch.load(os.path.join(path, f"rank{r:05d}.pt"), map_location="cpu", weights_only=True)
              for r in range(saved_world)]
    rank_state = {"loader": [s["loader"] for s in states], "rng": states[rank]["rng"] if saved_world == world else None}
    return trainer_state, rank_state, load_file(os.path.join(path, "ema.safetensors"))


# ------------------------------------------------------------------------------------------------
# Safety: no pickle runs on resume, and one trainer per run folder
# ------------------------------------------------------------------------------------------------

def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed writes into its checkpoint files (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on files of every ZeRO stage)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside, DeepSpeed's included (they pass weights_only=False), runs with weights_only=True:
    tensors, containers and the few DeepSpeed types above load; any other pickled object is refused."""
    real_load = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    except Exception as e:  # noqa: BLE001 — name the refusal instead of a pickle traceback
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            raise ValueError(f"refusing to load a checkpoint file that holds pickled code or objects other than "
                             f"tensors ({str(e).splitlines()[0]}); the checkpoint folder was tampered with or is "
                             f"not dimscale's: delete it or move it away") from None
        raise
    finally:
        torch.load = real_load


class RunLock:
    """An exclusive lock on the run folder, held by rank 0 while it trains and released by the kernel when the
    process dies, so two trainers never write the same checkpoints."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "trainer.lock")
        self.fd = None

    def acquire(self) -> str | None:
        """Take the lock; None on success, else who holds it ('pid N on host H')."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing drops the flock
            self.fd = None
