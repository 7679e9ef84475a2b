"""Eager vs torch.compile (inductor) DiM train step on CPU: same model, batch, loss and AdamW step.

    python tools/bench.py compile [--model DiM-T/2] [--res 16] [--batch 8] [--steps 5] [--reps 3] [--threads 1]

The compiled copy goes through `dimscale.models.compile_model` (what model.compile=true does in training); its
compile time (the first step) is reported apart. Repetitions alternate eager / compiled; medians.
ratio = compiled images/s / eager images/s (no target yet: reported, ok is always true when both run).
"""
import argparse
import copy
import statistics
import time

import torch


def main(argv):
    p = argparse.ArgumentParser(prog="bench.py compile")
    p.add_argument("--model", default="DiM-T/2")
    p.add_argument("--res", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    from dimscale.config import ModelConfig
    from dimscale.diffusion import Schedule, training_loss
    from dimscale.models import build_model, compile_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(name=a.model, in_channels=3, input_size=a.res, num_classes=10, compile=True)
    models = {"eager": build_model(cfg)}
    models["compiled"] = compile_model(copy.deepcopy(models["eager"]), cfg)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    schedule, gen = Schedule(), torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.res, a.res, generator=gen)
    y = torch.randint(0, 10, (a.batch,), generator=gen)

    def steps(k, n):
        for _ in range(n):
            training_loss(models[k], x, y, schedule, generator=gen).backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)

    start = time.perf_counter()
    steps("compiled", 1)                                    # compiles the forward and the backward
    compile_s = time.perf_counter() - start
    steps("eager", 1)
    rates = {k: [] for k in models}
    for _ in range(a.reps):
        for k in models:
            start = time.perf_counter()
            steps(k, a.steps)
            rates[k].append(a.steps * a.batch / (time.perf_counter() - start))
    eager, compiled = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
    return {"bench": "compile", "metric": "compiled / eager DiM train-step images/s on CPU (inductor)",
            "ratio": round(compiled / eager, 3), "target": None, "ok": True,
            "eager_images_per_s": round(eager, 2), "compiled_images_per_s": round(compiled, 2),
            "compile_s": round(compile_s, 1), "eager_runs": [round(r, 2) for r in rates["eager"]],
            "compiled_runs": [round(r, 2) for r in rates["compiled"]], "model": a.model, "res": a.res,
            "batch": a.batch, "steps_per_rep": a.steps, "threads": a.threads}
