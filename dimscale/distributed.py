"""The distributed environment: every launcher (torchrun, deepspeed, srun, submitit, plain python) ends up as
RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, then one process group (nccl on CUDA, gloo on CPU).

Used by the trainer, tools/fid.py and launchers/slurm.py; the model code never imports it.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import re
import signal
import socket

import torch
import torch.distributed as dist

from dimscale.config import ConfigError


def free_port() -> int:
    """A TCP port that is free on this host now (single-node runs without a launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def master_port(job_id: str, restart: int) -> int:
    """A port per job (and per restart, so a rerun never races its predecessor's socket), in [20000, 32000):
    below Linux's ephemeral range (32768-60999), where any outgoing connection may already hold the port and
    rank 0's rendezvous store would fail to bind while the other ranks wait."""
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return 20000 + (digits * 16 + restart) % 12000


def task_env(hostnames: list, job_id: str, global_rank: int, local_rank: int, num_tasks: int, num_nodes: int,
             node: int) -> dict:
    """A SLURM (or submitit-local) task layout -> the env:// variables torch.distributed reads."""
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    return {"MASTER_ADDR": hostnames[0], "MASTER_PORT": str(master_port(job_id, restart)),
            "RANK": str(global_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(num_tasks),
            "LOCAL_WORLD_SIZE": str(num_tasks // max(num_nodes, 1)), "NODE_RANK": str(node)}


def environment() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun/deepspeed, else srun's SLURM_*, else a single local process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun: one task per GPU, MASTER_* set by the launcher
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError("running under SLURM but MASTER_ADDR/MASTER_PORT are not set; launch through "
                              "launchers/slurm.py or export them (first node of $SLURM_JOB_NODELIST, a free port)")
        env["RANK"], env["LOCAL_RANK"] = env["SLURM_PROCID"], env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    if "RANK" not in env:  # plain python: a world of one (DeepSpeed would otherwise try MPI discovery)
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])


def use_cuda(device_arg: str = "auto") -> bool:
    """CUDA when present and not turned off (DS_ACCELERATOR=cpu, --device cpu)."""
    return (torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
            and device_arg != "cpu")


def init(local_rank: int, world_size: int | None = None, deepspeed: bool = True,
         device_arg: str = "auto") -> torch.device:
    """Start the process group once (through DeepSpeed for the trainer, plain torch for tools); this rank's device.

    The group stays up after a run returns: DeepSpeed caches its groups, so a second run in the same process
    (a launcher running stages in-process, tests) reuses it rather than re-creating it.
    """
    cuda = use_cuda(device_arg)
    if not dist.is_initialized():
        if deepspeed:
            import deepspeed as ds
            if not cuda:
                os.environ["DS_ACCELERATOR"] = "cpu"
                # The CPU accelerator JIT-compiles a shared-memory op (35-70 s) that only inference_all_reduce
                # uses (docs/engineering-notes.md §D.1); importlib because `deepspeed.comm.torch` as an attribute is
                # the torch package.
                importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
            ds.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
        elif (world_size or 1) > 1:
            dist.init_process_group("nccl" if cuda else "gloo", rank=int(os.environ["RANK"]), world_size=world_size)
    if cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def comm_device() -> torch.device:
    """Where collectives need their tensors: this rank's GPU under nccl, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_all(t: torch.Tensor) -> torch.Tensor:
    """Sum of a small tensor over ranks (itself without a process group), returned on t's device."""
    if not dist.is_initialized():
        return t
    out = t.to(comm_device())
    dist.all_reduce(out)
    return out.to(t.device)


def started_by_agent() -> bool:
    """Whether a torchrun or deepspeed agent process started this rank (and watches it)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "CROSS_RANK" in os.environ


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the launcher agent) dies.

    torchrun starts ranks in sessions of their own, so a SIGKILL of the agent alone leaves them training; a
    rerun would then write the same checkpoints concurrently. Linux only (prctl PR_SET_PDEATHSIG); a no-op
    elsewhere. If the parent is already gone (re-parented to init) we exit at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(1)
