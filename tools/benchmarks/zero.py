"""Per-rank bytes of parameters, gradients and optimizer state under ZeRO stages 0-3, world size 2 (CPU, gloo).

    python tools/bench.py zero [--model DiM-S/2] [--res 8] [--precision fp32]

Each stage builds the trainer's engine (dimscale.engine.build_engine) on 2 spawned ranks, runs one micro-batch
forward + backward (gradients measured before the step) and one optimizer step (optimizer state measured after).
Bytes are counted from the tensors themselves, each storage once: parameters = what the module holds
(`ds_tensor` slices under ZeRO-3); gradients = `.grad` plus the optimizer's gradient/bucket buffers;
optimizer = everything else the DeepSpeed optimizer holds (Adam moments, fp32 master copies).
Target: stage 3 total <= 0.55 x stage 0 total (ideal 1/world = 0.5).
"""
import argparse
import multiprocessing
import os
import socket

import torch


def parse(argv):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="bench.py zero")
    p.add_argument("--model", default="DiM-S/2")
    p.add_argument("--res", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    return p.parse_args(argv)


def _tensors(obj, path, depth, out, seen_objs):
    """(path, tensor) pairs reachable from obj through attributes, lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        return
    if depth == 0 or id(obj) in seen_objs or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return
    seen_objs.add(id(obj))
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed.runtime"):
        items = vars(obj).items()
    else:
        return
    for key, value in items:
        if isinstance(value, torch.nn.Module):
            continue  # the model itself is counted as parameters
        name = key if isinstance(key, (str, int)) else type(key).__name__  # optimizer state is keyed by tensors
        _tensors(value, f"{path}.{name}", depth - 1, out, seen_objs)


class Bytes:
    """Bytes per category on this rank, each storage counted once (the first category that claims it wins)."""

    def __init__(self):
        self.seen, self.sizes = set(), {"params": 0, "grads": 0, "optimizer": 0}

    def add(self, kind, t):
        storage = t.untyped_storage()
        if t.numel() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.sizes[kind] += storage.nbytes()


def is_grad_buffer(path: str) -> bool:
    return any(s in path.lower() for s in ("grad", "ipg"))


def _worker(rank, port, stage, args, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from dimscale import distributed, engine as engine_setup, train
    from dimscale.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from dimscale.diffusion import Schedule, training_loss
    distributed.init(0)
    cfg = RunConfig(model=ModelConfig(name=args.model, in_channels=1, input_size=args.res, num_classes=10),
                    data=DataConfig(resolution=args.res),
                    train=TrainConfig(global_batch=2, micro_batch=1, zero_stage=stage, precision=args.precision))
    engine = engine_setup.build_engine(cfg, train.build_model(cfg), world_size=2)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(1, 1, args.res, args.res, generator=gen), torch.randint(0, 10, (1,), generator=gen)
    engine.backward(training_loss(engine, x, y, Schedule(), generator=gen))

    count = Bytes()
    for p in engine.module.parameters():
        count.add("params", p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
        if p.grad is not None:
            count.add("grads", p.grad)
    found = []
    _tensors(engine.optimizer, "opt", 4, found, set())
    for path, t in found:  # gradient partitions and reduce buckets live in the ZeRO optimizer
        if is_grad_buffer(path):
            count.add("grads", t)
    engine.step()
    found = []
    _tensors(engine.optimizer, "opt", 4, found, set())
    for path, t in found:  # Adam moments and fp32 master partitions
        if not is_grad_buffer(path):
            count.add("optimizer", t)
    sizes = count.sizes
    results.put((rank, {**sizes, "total": sum(sizes.values()),
                        "param_count": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())}))
    results.close()
    results.join_thread()
    os._exit(0)  # skip gloo/DeepSpeed teardown


def run_stage(stage, args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, port, stage, args, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return dict(results.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            p.kill()


def main(argv):
    args = parse(argv)
    stages = {s: run_stage(s, args) for s in range(4)}
    per_rank = {f"stage{s}": {k: max(r[k] for r in ranks.values()) for k in ("params", "grads", "optimizer", "total")}
                for s, ranks in stages.items()}
    ratio = per_rank["stage3"]["total"] / per_rank["stage0"]["total"]
    return {"bench": "zero", "metric": "per-rank bytes (params + grads + optimizer state), stage 3 / stage 0, world 2",
            "ratio": round(ratio, 4), "target": 0.55, "ok": ratio <= 0.55,
            "per_rank_bytes": per_rank, "param_count": stages[0][0]["param_count"], "model": args.model,
            "precision": args.precision, "world_size": 2}
