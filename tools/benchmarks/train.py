"""Trainer step images/s under DeepSpeed vs a plain PyTorch loop: same model, batch, loss, AdamW, clipping and EMA.

    python tools/bench.py train [--model DiM-T/2] [--res 16] [--batch 16] [--stage 2] [--steps 5] [--reps 5]

One process (a world of one, gloo on CPU). Repetitions alternate DeepSpeed / plain so CPU contention hits both
alike; medians. Target: DeepSpeed overhead <= 10%, i.e. ratio = ds_images_per_s / plain_images_per_s >= 0.9.
"""
import argparse
import copy
import statistics
import time

import torch


def parse(argv):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="bench.py train")
    p.add_argument("--model", default="DiM-T/2")
    p.add_argument("--res", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage of the DeepSpeed side")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed repetition")
    p.add_argument("--reps", type=int, default=5)
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    from dimscale import distributed, engine as engine_setup, train
    from dimscale.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from dimscale.diffusion import Schedule, training_loss
    from dimscale.ema import EMA

    _, local_rank, _ = distributed.environment()
    device = distributed.init(local_rank)
    cfg = RunConfig(model=ModelConfig(name=args.model, in_channels=3, input_size=args.res, num_classes=10),
                    data=DataConfig(resolution=args.res),
                    train=TrainConfig(global_batch=args.batch, micro_batch=args.batch, zero_stage=args.stage,
                                      precision=args.precision, warmup_images=0))
    t = cfg.train
    model = train.build_model(cfg).to(device)
    plain = copy.deepcopy(model)
    engine = engine_setup.build_engine(cfg, model, world_size=1)
    plain_opt = torch.optim.AdamW(engine_setup.param_groups(plain, t.weight_decay, t.no_decay_marked), lr=t.lr,
                                  betas=tuple(t.betas), eps=t.eps)
    ema_ds, ema_plain = EMA(engine.module, t.ema_decay), EMA(plain, t.ema_decay)
    schedule = Schedule()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.res, args.res, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def ds_steps():
        for _ in range(args.steps):
            loss = training_loss(engine, x, y, schedule, generator=gen)
            engine.backward(loss)
            engine.step()
            ema_ds.update(engine.module)

    def plain_steps():
        for _ in range(args.steps):
            with autocast:
                loss = training_loss(plain, x, y, schedule, generator=gen)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), t.grad_clip)
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
            ema_plain.update(plain)

    ds_steps(), plain_steps()  # warm-up: allocator, autograd graphs, optimizer state
    ds_rates, plain_rates = [], []
    for _ in range(args.reps):
        for fn, rates in ((ds_steps, ds_rates), (plain_steps, plain_rates)):
            start = time.perf_counter()
            fn()
            rates.append(args.steps * args.batch / (time.perf_counter() - start))
    ds, base = statistics.median(ds_rates), statistics.median(plain_rates)
    ratio = ds / base
    return {"bench": "train", "metric": "ds_images_per_s / plain_images_per_s (same model, batch, AdamW, clip, EMA)",
            "ratio": round(ratio, 4), "target": 0.9, "ok": ratio >= 0.9,
            "ds_images_per_s": round(ds, 2), "plain_images_per_s": round(base, 2),
            "ds_runs": [round(r, 2) for r in ds_rates], "plain_runs": [round(r, 2) for r in plain_rates],
            "model": args.model, "res": args.res, "batch": args.batch, "zero_stage": args.stage,
            "precision": args.precision, "steps_per_rep": args.steps, "reps": args.reps,
            "device": str(device), "threads": torch.get_num_threads()}
