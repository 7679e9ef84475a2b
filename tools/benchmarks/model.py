"""DiM vs the attention-mixer baseline: forward+backward CPU time per image on token grids 16^2 .. 128^2.

`python tools/bench.py model [--grids 16 32 64 128] [--width 64] [--depth 3] [--reps 3] [--threads 1]`
Both models share the skeleton (dimscale.models.DiM, mixer='mamba' vs 'attention') at equal width and depth;
inputs are 4-channel latents of side 2*grid (patch 2), batch 1. Reps alternate between the two models and
medians are reported; the largest grid runs `--reps-long` times. Times are CPU seconds of this process
(time.process_time, one intra-op thread by default) because wall time on a shared machine mostly measures
the other tenants. ratio = attention / DiM time at 64x64 tokens (target > 1: DiM faster from 64x64 up,
the paper's claim for 1024^2 images); `crossover_grid` = smallest grid from which DiM stays faster.
"""
import argparse
import statistics
import time

import torch

from dimscale.models import DiM


def step_time(model, grid):
    """(cpu, wall) seconds of one forward+backward of a batch-1 input with `grid` x `grid` tokens."""
    g = torch.Generator().manual_seed(grid)
    x = torch.randn(1, 4, 2 * grid, 2 * grid, generator=g)
    t, y = torch.tensor([500.0]), torch.tensor([1])
    model.zero_grad(set_to_none=True)
    c0, w0 = time.process_time(), time.perf_counter()
    model(x, t, y).square().mean().backward()
    return time.process_time() - c0, time.perf_counter() - w0


def main(argv):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="bench.py model")
    p.add_argument("--grids", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--reps-long", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    models = {m: DiM(in_channels=4, input_size=32, num_classes=1000, width=a.width, depth=a.depth, patch=2,
                     mixer=m).train() for m in ("mamba", "attention")}
    for model in models.values():                                  # warm-up: one-time library costs
        step_time(model, 8)
    rows = {}
    for grid in a.grids:
        times = {m: [] for m in models}
        for _ in range(a.reps_long if grid == max(a.grids) else a.reps):
            for m, model in models.items():
                times[m].append(step_time(model, grid))
        med = {m: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for m, ts in times.items()}
        rows[grid] = {"dim_cpu_s": round(med["mamba"][0], 4), "attention_cpu_s": round(med["attention"][0], 4),
                      "dim_wall_s": round(med["mamba"][1], 4), "attention_wall_s": round(med["attention"][1], 4),
                      "attention_over_dim": round(med["attention"][0] / med["mamba"][0], 3),
                      "reps": len(times["mamba"])}
    crossover = None
    for grid in sorted(rows, reverse=True):      # smallest grid from which DiM is faster on every larger grid
        if rows[grid]["attention_over_dim"] <= 1.0:
            break
        crossover = grid
    ratio = rows[64]["attention_over_dim"] if 64 in rows else None
    return {"bench": "model", "metric": f"attention / DiM fwd+bwd CPU time per image at 64x64 tokens "
                                        f"(width {a.width}, depth {a.depth}, batch 1)",
            "ratio": ratio, "target": 1.0, "ok": bool(ratio is not None and ratio > 1.0 and crossover is not None
                                                      and crossover <= 64),
            "crossover_grid": crossover, "threads": a.threads, "per_grid": {str(g): r for g, r in rows.items()}}
