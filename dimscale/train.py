"""Train a DiM with DeepSpeed ZeRO: one script for every launcher.

    deepspeed --num_gpus 8 dimscale/train.py --config configs/dim_h_256.json --set train.zero_stage=3
    torchrun --nproc_per_node 8 dimscale/train.py --config configs/dim_h_256.json
    srun python dimscale/train.py --config configs/dim_h_256.json       (SLURM_PROCID/... -> RANK/...)
    python dimscale/train.py --config configs/dim_t_cpu.json            (one process)

The recipe is docs/reference.md §3: ε-prediction DDPM, AdamW(betas 0.99/0.99, eps 1e-15, wd 0.03), linear warmup
then constant LR, grad clip 1.0, EMA 0.9999. Budgets are in images, so the GPU count never changes the recipe.
Writes out_dir/name/: config.json, metrics.jsonl, checkpoints/latest (full state, resumed automatically),
snapshots/latest (EMA, loadable without DeepSpeed), samples/*.png. Exit codes: 0 done, 1 failed, 2 bad config,
3 preempted (a checkpoint was saved; rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import math
import os
import resource
import signal
import socket
import sys
import time
import warnings

if __package__ in (None, ""):  # `python dimscale/train.py`: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from dimscale import checkpoint
from dimscale.config import ConfigError, RunConfig, load_config, save_config, to_dict
from dimscale.ema import EMA

PREEMPTED = 3
# gloo's collectives warn on every call about renamed functions that DeepSpeed still uses
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)


class TrainError(RuntimeError):
    """A problem found while starting or running; the message says what to do. main() prints it and returns 1."""
SSM_PARAM_NAMES = ("A_log", ".D", "dt_proj")  # kept in fp32 (Mamba README "Precision"; docs/engineering-notes.md §B.18)


# ------------------------------------------------------------------------------------------------
# Distributed environment: every launcher ends up as RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun/deepspeed, else SLURM, else a single local process."""
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
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])


def init_distributed(local_rank: int) -> torch.device:
    """Start the process group (nccl on CUDA, gloo on CPU) once; returns this rank's device."""
    import deepspeed
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
        # The CPU accelerator JIT-compiles a shared-memory op (35-70 s) that only inference_all_reduce uses
        # (docs/engineering-notes.md §E.1); importlib because `deepspeed.comm.torch` as an attribute is the torch package.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    if cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# Config checks that need the filesystem (types and combinations are checked by dimscale.config)
# ------------------------------------------------------------------------------------------------

def check_paths(cfg: RunConfig) -> None:
    """Fail before any process group starts if shards or the init snapshot are missing."""
    shards = cfg.data.shards
    manifest = os.path.join(shards, "manifest.json") if os.path.isdir(shards) else shards
    if "://" not in shards and not shards.startswith("pipe:") and not os.path.isfile(manifest):
        raise ConfigError(f"data.shards = '{shards}': no shards found (no manifest.json there); "
                          f"write them with tools/make_shards.py and point data.shards at the output folder")
    d = cfg.data
    # latent runs need the VAE to encode (online) or to decode sample grids: fail now, not at the first grid
    if d.latent != "none" and (d.latent == "online" or cfg.train.sample_every_images > 0) \
            and not os.path.isfile(os.path.join(d.vae_path, "config.json")):
        why = "encodes images with it" if d.latent == "online" else "decodes sample grids with it"
        raise ConfigError(f"data.vae_path = '{d.vae_path}' is not a diffusers AutoencoderKL folder (no config.json); "
                          f"data.latent = '{d.latent}' {why}: point it at the VAE the shards were written with"
                          + ("" if d.latent == "online" else ", or set train.sample_every_images=0"))
    if cfg.init.snapshot and not os.path.isfile(os.path.join(cfg.init.snapshot, "ema.safetensors")):
        raise ConfigError(f"init.snapshot = '{cfg.init.snapshot}' is not an EMA snapshot folder (no ema.safetensors); "
                          f"pass the pretraining run's snapshots/latest, or '' to start from scratch")


def deepspeed_config(cfg: RunConfig, world_size: int, num_params: int) -> dict:
    """The DeepSpeed JSON for this run. bf16 = torch autocast over fp32 parameters, see the note below."""
    t = cfg.train
    accumulation = t.global_batch // (t.micro_batch * world_size)
    # DeepSpeed's default 5e8-element buckets are persistent buffers (2 GB fp32 under ZeRO-3, whatever the model);
    # size them to the model, at most the 5e7 usual for billion-parameter runs.
    bucket = min(50_000_000, max(num_params // 8, 2**20))
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.global_batch,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,  # our own status line replaces DeepSpeed's
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": t.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                              "overlap_comm": True,   # ZeRO-2: fewer per-step stalls (bench train 0.87-0.91 -> 0.91-0.95)
                              "stage3_prefetch_bucket_size": bucket,
                              # tiny debug models: partition every parameter so ZeRO-3 is really exercised
                              "stage3_param_persistence_threshold": 0 if t.zero_stage == 3 else 10**5},
        "checkpoint": {"tag_validation": "FAIL"},
    }
    # bf16: DeepSpeed's "bf16" mode casts the whole module to bf16 and flattens same-dtype buffers, so it cannot
    # keep the SSM parameters (A_log, D, dt_proj) in fp32 as the Mamba authors require (docs/engineering-notes.md §B.18).
    # DeepSpeed's torch_autocast keeps every parameter, gradient and optimizer state in fp32 and runs the matmuls
    # and convs in bf16 (the AMP setup the Mamba README recommends); the model's scan itself runs in fp32.
    if t.precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_marked: bool) -> list[dict]:
    """One group (official: decay everything, docs/reference.md §3.2), or two with `_no_weight_decay` params undecayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_decay_marked:
        return [{"params": params, "weight_decay": weight_decay}]
    skip = [p for p in params if getattr(p, "_no_weight_decay", False)]
    keep = [p for p in params if not getattr(p, "_no_weight_decay", False)]
    return [{"params": keep, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def warmup_constant(warmup_steps: int):
    """LR factor: linear warmup from 0, then constant (U-ViT's customized_lr_scheduler, docs/reference.md §3.2)."""
    return lambda step: min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


def build_model(cfg: RunConfig):
    """The DiM, seeded identically on every rank, optionally initialised from an EMA snapshot (docs/reference.md §3.4)."""
    from dimscale.models import adapt_state_dict, build_model as build_dim
    from dimscale.snapshot import read_snapshot
    torch.manual_seed(cfg.train.seed)
    model = build_dim(cfg.model)
    if cfg.init.snapshot:
        state, _ = read_snapshot(cfg.init.snapshot)
        # weak-to-strong: EMA weights of the low-res stage, pos-emb resized to this grid (DiM issue #9)
        model.load_state_dict(adapt_state_dict(state, model))
    return model


def build_engine(cfg: RunConfig, model: torch.nn.Module, world_size: int):
    """DeepSpeed engine with AdamW (torch implementation: no JIT build) and the warmup-then-constant schedule."""
    import deepspeed
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay, t.no_decay_marked), lr=t.lr,
                                  betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    warmup_steps = math.ceil(t.warmup_images / t.global_batch)
    ds_config = deepspeed_config(cfg, world_size, num_params=sum(p.numel() for p in model.parameters()))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(warmup_steps)))
    share_zero3_master(engine)
    return engine


def share_zero3_master(engine) -> None:
    """Let ZeRO-3's fp32 master partitions be the (already fp32) parameter partitions instead of copies of them.

    Our parameters stay fp32 (bf16 is autocast), so ZeRO-3's "master" copy duplicates each partition: P/world
    bytes per rank for nothing. DeepSpeed means to share them in that case (stage3.py, _create_fp32_partitions:
    "we don't need another copy of the weights") but compares `tensor.device` with a device-name string, which
    is never equal in current torch, so it copies. Pointing the master at the partition's storage is what that
    branch does; the optimizer keeps its tensor objects, the post-step copy master -> partition becomes a no-op.
    Stages 0-2 have no such attributes: nothing to do.
    """
    opt = engine.optimizer
    for low, master in zip(getattr(opt, "fp16_partitioned_groups_flat", []),
                           getattr(opt, "fp32_partitioned_groups_flat", [])):
        if (low.dtype == master.dtype and low.device == master.device and low.shape == master.shape
                and low.data_ptr() != master.data_ptr()):
            master.data = low.data


# ------------------------------------------------------------------------------------------------
# Model inputs: pixels, VAE moments in the shards, or encoded on the fly
# ------------------------------------------------------------------------------------------------

class Inputs:
    """Turns a loader batch into the model input x0 for cfg.data.latent in {'none', 'moments', 'online'}."""

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.device, self.vae = cfg, device, None
        if cfg.data.latent == "online":
            from dimscale.diffusion.vae import load_vae
            self.vae = load_vae(cfg.data.vae_path, device)  # frozen, eval, no grad

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from dimscale.diffusion.vae import encode_moments, sample_latent
        x = x.to(self.device, non_blocking=True)
        d = self.cfg.data
        if d.latent == "online":  # docs/reference.md §3.3, 256 px: encode on the fly under no_grad, then sample as moments
            x = encode_moments(self.vae, x.to(next(self.vae.parameters()).dtype))
        if d.latent != "none":  # a fresh posterior sample scale * (mu + sigma * eps) each time (docs/reference.md §3.3)
            return sample_latent(x.float(), d.vae_scale, generator)
        if x.shape[1] != self.cfg.model.in_channels:
            raise TrainError(f"the loader gives {x.shape[1]}-channel images but model.in_channels = "
                             f"{self.cfg.model.in_channels}; make them agree")
        return x.float()


# ------------------------------------------------------------------------------------------------
# Logging: status line, metrics.jsonl, wandb, sample grids (rank 0)
# ------------------------------------------------------------------------------------------------

def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class Logger:
    """Rank 0 writes metrics.jsonl, prints a status line and forwards to wandb (online/offline/off)."""

    def __init__(self, cfg: RunConfig, rank: int, resumed_images: int):
        self.rank0, self.cfg, self.wandb = rank == 0, cfg, None
        if not self.rank0:
            return
        self.file = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a")
        if cfg.train.wandb != "off":
            import wandb
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=cfg.name, dir=cfg.run_dir,
                                    config=to_dict(cfg), mode=cfg.train.wandb, resume="allow",
                                    id=cfg.name.replace("/", "_"))

    def log(self, record: dict, total_images: int) -> None:
        if not self.rank0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        eta_s = (total_images - record["images_seen"]) / max(record["images_per_s"], 1e-9)
        print(f"[{self.cfg.name}] img {record['images_seen']}/{total_images} step {record['step']} "
              f"loss {record['loss']:.4f} lr {record['lr']:.2e} gnorm {record['grad_norm']:.3f} "
              f"{record['images_per_s']:.1f} img/s {record['step_time_s'] * 1e3:.0f} ms/step "
              f"mem {record['mem_gib']:.2f} GiB eta {eta_s / 3600:.2f} h", flush=True)
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def image(self, path: str, step: int) -> None:
        if self.rank0 and self.wandb is not None:
            import wandb
            self.wandb.log({"samples": wandb.Image(path)}, step=step)

    def close(self) -> None:
        if self.rank0:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def write_samples(cfg: RunConfig, ema_state: dict, images_seen: int, device: torch.device) -> str:
    """Sample a grid from the EMA weights with fixed classes and seeds (comparable across the run); rank 0."""
    from dimscale.diffusion import Schedule, sample
    from dimscale.models import build_model as build_dim
    model = build_dim(cfg.model).to(device).eval()
    model.load_state_dict(ema_state)
    n = cfg.train.sample_count
    labels = torch.arange(n, device=device) % cfg.model.num_classes
    side = cfg.data.resolution // 8 if cfg.data.latent != "none" else cfg.data.resolution
    dif = cfg.diffusion
    x = sample(model, labels, (cfg.model.in_channels, side, side), sampler=dif.sampler, steps=dif.sample_steps,
               cfg_scale=dif.cfg_scale, seeds=list(range(n)),
               schedule=Schedule.from_config(dif), device=device)
    if cfg.data.latent != "none":
        from dimscale.diffusion.vae import decode, load_vae
        x = decode(load_vae(cfg.data.vae_path, device), x, cfg.data.vae_scale)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:  # tools/ sits next to the package in the checkout
        sys.path.append(repo)
    from tools.sample import make_grid, to_uint8  # the one grid writer, shared with tools/sample.py
    path = os.path.join(cfg.run_dir, "samples", f"img{images_seen:012d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    make_grid(to_uint8(x), nrow=math.ceil(math.sqrt(n))).save(path)
    return path


# ------------------------------------------------------------------------------------------------
# Preemption: signals set a flag; the ranks agree on it at the next step boundary
# ------------------------------------------------------------------------------------------------

class StopFlag:
    """SIGTERM / SIGUSR1 / SIGUSR2 -> save at the next step boundary and exit 3 (SLURM preemption, timeouts)."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: the caller handles signals
            pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _call_on_preempt(on_preempt, info: dict) -> None:
    if on_preempt is None:
        return
    takes_arg = len(inspect.signature(on_preempt).parameters) > 0
    on_preempt(info) if takes_arg else on_preempt()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="JSON file in configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-4")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None, on_preempt=None) -> int:
    """Train one stage; 0 = finished, 3 = preempted with a checkpoint saved (rerun to resume)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rank, local_rank, world_size = distributed_env()
        cfg = load_config(args.config, args.set, world_size)
        check_paths(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    # The process group stays up when we return: DeepSpeed caches its groups, so a second main() in the same
    # process (a launcher running stages in-process, tests) must reuse it rather than re-create it.
    device = init_distributed(local_rank)
    try:
        return train(cfg, rank, world_size, device, on_preempt)
    except TrainError as e:
        print(f"[{cfg.name}] rank {rank}: {e}", file=sys.stderr, flush=True)
        return 1


def train(cfg: RunConfig, rank: int, world_size: int, device: torch.device, on_preempt=None) -> int:
    from dimscale.data import build_loader
    from dimscale.diffusion import Schedule, drop_labels, training_loss

    t = cfg.train
    run_dir = cfg.run_dir
    ckpt_dir, snap_dir = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "snapshots")
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        checkpoint.clean_partial(ckpt_dir)
        save_config(cfg, os.path.join(run_dir, "config.json"))
    dist.barrier()

    model = build_model(cfg)
    engine = build_engine(cfg, model, world_size)
    ema = EMA(engine.module, t.ema_decay)
    loader = build_loader(cfg.data, t.micro_batch, rank, world_size, t.seed)
    # one generator per rank for diffusion noise, timesteps, label drops and posterior samples
    noise_gen = torch.Generator(device=device).manual_seed(t.seed * 100_003 + rank)
    state = {"images_seen": 0, "step": 0, "nonfinite_skipped": 0}

    try:
        resumed = checkpoint.load_latest(engine, ckpt_dir)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if resumed is not None:
        trainer_state, rank_state, ema_state = resumed
        state.update({k: trainer_state[k] for k in state})
        ema.load_state_dict(ema_state)
        loader.load_state_dict(rank_state["loader"])
        checkpoint.set_rng_state(rank_state["rng"])
        noise_gen.set_state(rank_state["noise_rng"])
        if rank == 0:
            print(f"[{cfg.name}] resumed from {checkpoint.latest_path(ckpt_dir)} at {state['images_seen']} images",
                  flush=True)
    elif cfg.init.snapshot and rank == 0:
        print(f"[{cfg.name}] initialised from snapshot {cfg.init.snapshot}", flush=True)

    schedule = Schedule.from_config(cfg.diffusion)
    inputs = Inputs(cfg, device)
    null_class = engine.module.null_class
    accumulation = engine.gradient_accumulation_steps()

    def save_checkpoint():
        rank_state = {"loader": loader.state_dict(), "rng": checkpoint.rng_state(), "noise_rng": noise_gen.get_state()}
        return checkpoint.save(engine, ckpt_dir, state["images_seen"], dict(state), rank_state,
                               ema.state_dict(engine.module), t.keep_checkpoints)

    def save_ema_snapshot():
        if rank == 0:
            from dimscale.snapshot import save_snapshot
            d = cfg.data
            meta = {"data": {"resolution": d.resolution, "latent": d.latent, "vae_scale": d.vae_scale,
                             "vae_path": d.vae_path, "channels": cfg.model.in_channels},
                    "diffusion": dataclasses.asdict(cfg.diffusion), "images_seen": state["images_seen"],
                    "run": cfg.name}
            save_snapshot(os.path.join(snap_dir, "latest"), ema.state_dict(engine.module), cfg.model, meta)

    def crossed(every: int, before: int) -> bool:
        return every > 0 and state["images_seen"] // every > before // every

    if state["images_seen"] >= t.total_images:
        if rank == 0:
            print(f"[{cfg.name}] already finished ({state['images_seen']} images); nothing to do", flush=True)
        return 0

    logger = Logger(cfg, rank, state["images_seen"])
    batches = iter(loader)
    nonfinite_in_a_row, window = 0, {"loss": 0.0, "steps": 0, "images": 0, "t0": time.time()}
    engine.train()
    with StopFlag() as stop:
        while state["images_seen"] < t.total_images:
            step_start, step_loss, step_images = time.time(), 0.0, 0
            micro = 0
            while micro < accumulation:
                batch = next(batches)
                x0 = inputs(batch["x"], noise_gen)
                y = drop_labels(batch["y"].to(device), cfg.diffusion.p_uncond, null_class, noise_gen)
                loss = training_loss(engine, x0, y, schedule, generator=noise_gen,
                                     bf16_timesteps=cfg.diffusion.bf16_timesteps,
                                     min_snr_gamma=cfg.diffusion.min_snr_gamma)
                loss = maybe_inject_nonfinite(loss, state)
                finite = torch.isfinite(loss.detach()).float().reshape(1)  # on the device: nccl needs CUDA tensors
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # all ranks drop a bad micro-batch together
                if finite.item() == 0.0:
                    # No backward, no engine.step(): the micro-batch never happened, no update from it
                    state["nonfinite_skipped"] += 1
                    nonfinite_in_a_row += 1
                    if nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
                        latest = checkpoint.latest_path(ckpt_dir) or "none yet"
                        if rank == 0:
                            print(f"[{cfg.name}] stopping: {nonfinite_in_a_row} non-finite losses in a row at "
                                  f"{state['images_seen']} images; last good checkpoint: {latest}. Lower train.lr, "
                                  f"use train.precision=fp32 or check the data", file=sys.stderr, flush=True)
                        logger.close()
                        return 1
                    continue
                nonfinite_in_a_row = 0
                engine.backward(loss)
                grad_norm = local_grad_norm(engine) if engine.is_gradient_accumulation_boundary() else None
                engine.step()
                step_loss += loss.item()
                step_images += batch["x"].shape[0]
                micro += 1
            ema.update(engine.module)  # optimizer steps only, gathered under ZeRO-3 (docs/engineering-notes.md §B.21)

            # one all-reduce per step: summed loss, images, and whether any rank got a stop signal
            totals = torch.tensor([step_loss / accumulation, float(step_images), float(stop.signum)],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            before = state["images_seen"]
            state["images_seen"] += int(totals[1].item())
            state["step"] += 1
            window["loss"] += totals[0].item() / world_size
            window["steps"] += 1
            window["images"] += int(totals[1].item())

            if state["step"] % t.log_every_steps == 0 or state["images_seen"] >= t.total_images:
                elapsed = time.time() - window["t0"]
                gn = engine.get_global_grad_norm() if grad_norm is None else grad_norm
                logger.log({"step": state["step"], "images_seen": state["images_seen"],
                            "loss": window["loss"] / window["steps"], "lr": engine.get_lr()[0],
                            "grad_norm": float(gn) if gn is not None else float("nan"),
                            "images_per_s": window["images"] / elapsed, "step_time_s": time.time() - step_start,
                            "mem_gib": memory_gib(device), "nonfinite_skipped": state["nonfinite_skipped"]},
                           t.total_images)
                window = {"loss": 0.0, "steps": 0, "images": 0, "t0": time.time()}

            done = state["images_seen"] >= t.total_images
            if totals[2].item() > 0:  # some rank was signalled: save, tell the launcher, exit resumable
                path = save_checkpoint()
                if rank == 0:
                    print(f"[{cfg.name}] preempted: checkpoint {path} at {state['images_seen']} images; "
                          f"rerun to resume", flush=True)
                    _call_on_preempt(on_preempt, {"run_dir": run_dir, "checkpoint": path,
                                                  "images_seen": state["images_seen"]})
                logger.close()
                return PREEMPTED
            if done or crossed(t.ckpt_every_images, before):
                save_checkpoint()
            if done or crossed(t.snapshot_every_images, before):
                save_ema_snapshot()
            if crossed(t.sample_every_images, before) and rank == 0:
                logger.image(write_samples(cfg, ema.state_dict(engine.module), state["images_seen"], device),
                             state["step"])
    if rank == 0:
        with open(os.path.join(run_dir, "done.json"), "w") as f:
            json.dump({"images_seen": state["images_seen"], "step": state["step"]}, f)
        print(f"[{cfg.name}] finished: {state['images_seen']} images, snapshot {os.path.join(snap_dir, 'latest')}",
              flush=True)
    logger.close()
    return 0


def local_grad_norm(engine) -> float | None:
    """Gradient norm before clipping for ZeRO-0 (DeepSpeed reports none there); None lets the engine report it."""
    if engine.zero_optimization_stage() > 0:
        return None
    sq = sum(float(p.grad.float().pow(2).sum()) for p in engine.module.parameters() if p.grad is not None)
    return math.sqrt(sq)


_injected = {"count": 0}


def maybe_inject_nonfinite(loss: torch.Tensor, state: dict) -> torch.Tensor:
    """Test hook: DIMSCALE_TEST_NAN='S:K' makes rank 0's first K micro-batch losses at step S (0-based) NaN."""
    spec = os.environ.get("DIMSCALE_TEST_NAN")
    if spec and dist.get_rank() == 0:
        step, count = (int(v) for v in spec.split(":"))
        if state["step"] == step and _injected["count"] < count:
            _injected["count"] += 1
            return loss * float("nan")
    return loss


if __name__ == "__main__":
    sys.exit(main())
