"""The run's record, written by rank 0: metrics.jsonl, a status line with images/s and ETA, wandb (online,
offline or off), and sample grids."""
from __future__ import annotations

import json
import os
import resource

import torch

from dimscale.config import RunConfig, to_dict


def memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocations, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class RunLogger:
    """Rank 0 appends records to metrics.jsonl, prints a status line and forwards to wandb; other ranks no-op."""

    def __init__(self, cfg: RunConfig, rank: int):
        self.rank0, self.cfg, self.wandb, self.file = rank == 0, cfg, None, None
        if not self.rank0:
            return
        self.file = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a")
        if cfg.train.wandb != "off":
            import wandb
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=cfg.name, dir=cfg.run_dir,
                                    config=to_dict(cfg), mode=cfg.train.wandb, resume="allow",
                                    id=cfg.name.replace("/", "_"))

    def event(self, record: dict) -> None:
        """A non-step record (a resume, skipped input, the end) in metrics.jsonl, and one line on stdout."""
        if not self.rank0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        print(f"[{self.cfg.name}] {record['event']}: " + " ".join(f"{k} {v}" for k, v in record.items()
                                                                   if k != "event"), flush=True)

    def step(self, record: dict) -> None:
        """One training record: metrics.jsonl, the status line, wandb."""
        if not self.rank0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        total = self.cfg.train.total_images
        eta_s = (total - record["images_seen"]) / max(record["images_per_s"], 1e-9)
        skipped = f" skipped {record['skipped_inputs']}" if record.get("skipped_inputs") else ""
        print(f"[{self.cfg.name}] img {record['images_seen']}/{total} step {record['step']} "
              f"loss {record['loss']:.4f} lr {record['lr']:.2e} gnorm {record['grad_norm']:.3f} "
              f"{record['images_per_s']:.1f} img/s {record['step_time_s'] * 1e3:.0f} ms/step "
              f"mem {record['mem_gib']:.2f} GiB{skipped} eta {eta_s / 3600:.2f} h", flush=True)
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def image(self, path: str, step: int) -> None:
        if self.rank0 and self.wandb is not None:
            import wandb
            self.wandb.log({"samples": wandb.Image(path)}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
