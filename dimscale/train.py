"""Train a DiM with DeepSpeed ZeRO: one script for every launcher.

    deepspeed --num_gpus 8 dimscale/train.py --config configs/dim_h_256.json --set train.zero_stage=3
    torchrun --nproc_per_node 8 dimscale/train.py --config configs/dim_h_256.json
    srun python dimscale/train.py --config configs/dim_h_256.json       (SLURM_PROCID/... -> RANK/...)
    python dimscale/train.py --config configs/dim_t_cpu.json            (one process)

The recipe is docs/reference.md §3: ε-prediction DDPM, AdamW(betas 0.99/0.99, eps 1e-15, wd 0.03), linear warmup
then constant LR, grad clip 1.0, EMA 0.9999. Budgets are in images, so the GPU count never changes the recipe.
Writes out_dir/name/: config.json, metrics.jsonl, checkpoints/latest (full state, resumed automatically),
snapshots/latest (EMA, loadable without DeepSpeed), samples/*.png, done.json. Exit codes: 0 done, 1 failed,
2 bad config, 3 preempted (a checkpoint was saved; rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import signal
import sys
import time
import warnings
import zlib

if __package__ in (None, ""):  # `python dimscale/train.py`: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from dimscale import checkpoint, distributed
from dimscale.config import ConfigError, RunConfig, check_paths, load_config, save_config, write_json_atomic
from dimscale.data import build_loader
from dimscale.diffusion import Schedule, drop_labels, training_loss
from dimscale.diffusion.schedule import image_generators
from dimscale.diffusion.vae import ModelInputs
from dimscale.ema import EMA
from dimscale.engine import build_engine, local_grad_norm
from dimscale.logger import RunLogger, memory_gib
from dimscale.snapshot import META, run_meta, save_snapshot

PREEMPTED = 3
# gloo's collectives warn on every call about renamed functions that DeepSpeed still uses
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)


class TrainError(RuntimeError):
    """A problem found while starting or running; the message says what to do. main() prints it and returns 1."""


@dataclasses.dataclass
class TrainState:
    """What the loop counts; saved in every checkpoint's trainer.json."""
    images_seen: int = 0
    step: int = 0
    nonfinite_skipped: int = 0       # micro-batches dropped for a non-finite loss (all ranks together)


@dataclasses.dataclass
class SavePolicy:
    """When to write what, in images seen: checkpoints (resume), EMA snapshots (sampling) and sample grids.
    The last step always writes a checkpoint and a snapshot."""
    ckpt_every: int
    snapshot_every: int
    sample_every: int
    total: int

    def due(self, before: int, after: int) -> tuple[bool, bool, bool]:
        """(checkpoint, snapshot, samples) for a step that took images_seen from `before` to `after`."""
        def crossed(every: int) -> bool:
            return every > 0 and after // every > before // every
        done = after >= self.total
        return done or crossed(self.ckpt_every), done or crossed(self.snapshot_every), crossed(self.sample_every)


@dataclasses.dataclass
class StepResult:
    loss: float                      # this rank's mean micro-batch loss
    images: int                      # this rank's images
    grad_norm: float | None          # None: ask the engine (ZeRO reports it)
    keys_crc: int = 0                # sum of crc32 of this rank's image keys: which images trained


class NonFiniteLosses(RuntimeError):
    """Too many non-finite losses in a row: the run stops, its last good checkpoint stays."""


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


# ------------------------------------------------------------------------------------------------
# The parts of a run
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything one training stage holds; built on every rank."""
    cfg: RunConfig
    rank: int
    world_size: int
    device: torch.device
    engine: object
    ema: EMA
    loader: object                   # global data order: step s's images depend on the seed and s alone
    inputs: ModelInputs
    schedule: Schedule
    logger: RunLogger
    state: TrainState = dataclasses.field(default_factory=TrainState)
    nonfinite_in_a_row: int = 0

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.run_dir, "checkpoints")

    @property
    def snapshot_dir(self) -> str:
        return os.path.join(self.cfg.run_dir, "snapshots", "latest")


def build_model(cfg: RunConfig) -> torch.nn.Module:
    """The DiM, seeded identically on every rank, optionally initialised from an EMA snapshot (docs/reference.md §3.4)."""
    from dimscale.models import adapt_state_dict, build_model as build_dim, compile_model
    from dimscale.snapshot import read_snapshot
    torch.manual_seed(cfg.train.seed)
    model = build_dim(cfg.model)
    if cfg.init.snapshot:
        state, _ = read_snapshot(cfg.init.snapshot)
        # weak-to-strong: EMA weights of the low-res stage, pos-emb resized to this grid (DiM issue #9)
        model.load_state_dict(adapt_state_dict(state, model))
    return compile_model(model, cfg.model)   # model.compile: in place, state-dict keys unchanged


def build_run(cfg: RunConfig, rank: int, world_size: int, device: torch.device) -> Run:
    t = cfg.train
    engine = build_engine(cfg, build_model(cfg), world_size)
    accumulation = t.global_batch // (t.micro_batch * world_size)
    return Run(cfg=cfg, rank=rank, world_size=world_size, device=device, engine=engine,
               ema=EMA(engine.module, t.ema_decay),
               loader=build_loader(cfg.data, t.micro_batch, rank, world_size, t.seed, accumulation),
               inputs=ModelInputs(cfg.data, cfg.model.in_channels, device),
               schedule=Schedule.from_config(cfg.diffusion), logger=RunLogger(cfg, rank))


def lock_run_folder(cfg: RunConfig, rank: int, device: torch.device) -> checkpoint.RunLock:
    """Rank 0 locks the run folder; every rank learns whether another trainer holds it (collective)."""
    lock = checkpoint.RunLock(cfg.run_dir)
    holder = lock.acquire() if rank == 0 else None
    held = torch.tensor([0.0 if holder is None else 1.0], device=device)
    dist.all_reduce(held)
    if held.item() > 0:
        raise TrainError(f"another trainer ({holder}) is running in {cfg.run_dir}: one trainer per run folder. "
                         f"Wait for it to end or stop it, then rerun" if rank == 0 else "")
    return lock


def resume(run: Run) -> None:
    """Restore the latest checkpoint, if any: engine, EMA, loader position, RNG streams, counters."""
    try:
        resumed = checkpoint.load_latest(run.engine, run.ckpt_dir)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if resumed is None:
        if run.cfg.init.snapshot and run.rank == 0:
            print(f"[{run.cfg.name}] initialised from snapshot {run.cfg.init.snapshot}", flush=True)
        return
    trainer_state, rank_state, ema_state = resumed
    run.state = TrainState(**{f.name: trainer_state[f.name] for f in dataclasses.fields(TrainState)})
    run.ema.load_state_dict(ema_state)
    try:
        run.loader.load_state_dict(rank_state["loader"])  # a global position: any world size, any num_workers
    except ValueError as e:
        raise TrainError(str(e)) from None
    if rank_state["rng"] is not None:  # the same ranks as before; the training noise is keyed by image anyway
        checkpoint.set_rng_state(rank_state["rng"])
    run.logger.event({"event": "resumed", "images_seen": run.state.images_seen, "step": run.state.step,
                      "checkpoint": checkpoint.latest_path(run.ckpt_dir),
                      "saved_world_size": trainer_state.get("world_size"), "world_size": run.world_size})


# ------------------------------------------------------------------------------------------------
# One optimizer step, and what is written between steps
# ------------------------------------------------------------------------------------------------

def train_step(run: Run, batches) -> StepResult:
    """Gradient accumulation over this rank's micro-batches, one optimizer step, one EMA update.

    A micro-batch whose loss is non-finite on any rank is dropped on every rank (no backward, no step: it never
    happened); `train.max_nonfinite_in_a_row` of them in a row raise NonFiniteLosses. Noise, timesteps, label
    drops and posterior samples come from one generator per image, keyed by (seed, global step, place in the
    global batch), so a resume on another world size trains on exactly the same draws.
    """
    cfg, engine, dif = run.cfg, run.engine, run.cfg.diffusion
    accumulation = engine.gradient_accumulation_steps()
    loss_sum, images, grad_norm, micro, crc = 0.0, 0, None, 0, 0
    while micro < accumulation:
        batch = next(batches)
        gens = image_generators(cfg.train.seed, batch["step"], batch["index"])
        y = drop_labels(batch["y"].to(run.device), dif.p_uncond, engine.module.null_class, gens)
        x0 = run.inputs(batch["x"], gens)
        loss = training_loss(engine, x0, y, run.schedule, generator=gens,
                             bf16_timesteps=dif.bf16_timesteps, min_snr_gamma=dif.min_snr_gamma)
        finite = torch.isfinite(loss.detach()).float().reshape(1)  # on the device: nccl needs CUDA tensors
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0.0:
            run.state.nonfinite_skipped += 1
            run.nonfinite_in_a_row += 1
            if run.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                raise NonFiniteLosses(f"{run.nonfinite_in_a_row} non-finite losses in a row at "
                                      f"{run.state.images_seen} images")
            continue
        run.nonfinite_in_a_row = 0
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            grad_norm = local_grad_norm(engine)
        engine.step()
        loss_sum += loss.item()
        images += batch["x"].shape[0]
        crc += sum(zlib.crc32(k.encode()) for k in batch["key"])
        micro += 1
    run.ema.update(engine.module)  # after the optimizer step only (docs/engineering-notes.md §B.21), gathered weights under ZeRO-3
    return StepResult(loss=loss_sum / accumulation, images=images, grad_norm=grad_norm, keys_crc=crc)


def save_checkpoint(run: Run) -> str:
    """Collective: the full state of every rank under checkpoints/, published as `latest`."""
    rank_state = {"loader": run.loader.state_dict(), "rng": checkpoint.rng_state()}
    try:
        return checkpoint.save(run.engine, run.ckpt_dir, run.state.images_seen, dataclasses.asdict(run.state),
                               rank_state, run.ema.state_dict(run.engine.module), run.cfg.train.keep_checkpoints)
    except checkpoint.CheckpointWriteError as e:
        raise TrainError(str(e)) from None


def save_ema_snapshot(run: Run) -> None:
    """Collective under ZeRO-3 (the EMA gathers); rank 0 writes snapshots/latest."""
    ema_state = run.ema.state_dict(run.engine.module)
    if run.rank == 0:
        save_snapshot(run.snapshot_dir, ema_state, run.cfg.model, run_meta(run.cfg, run.state.images_seen))


def write_samples(run: Run) -> str:
    """Rank 0: a grid from the EMA weights with fixed classes (i mod classes) and seeds, comparable over the run."""
    from dimscale.generate import ImageGenerator, class_labels, make_grid
    from dimscale.models import build_model as build_dim
    cfg, n = run.cfg, run.cfg.train.sample_count
    model = build_dim(cfg.model).to(run.device).eval()
    model.load_state_dict(run.ema.state_dict(run.engine.module))
    meta = {"model": dataclasses.asdict(cfg.model), **run_meta(cfg, run.state.images_seen)}
    gen = ImageGenerator(model, meta, run.device)
    proto = gen.protocol(sampler=cfg.diffusion.sampler, steps=cfg.diffusion.sample_steps)
    images = gen(class_labels("balanced", n, gen.num_classes, 0), list(range(n)), proto)
    path = os.path.join(cfg.run_dir, "samples", f"img{run.state.images_seen:012d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    make_grid(images).save(path)
    return path


def skipped_inputs(run: Run) -> dict:
    """Collective: bad shards and samples skipped by all ranks' loaders so far, by reason."""
    mine = run.loader.counts()["skipped"]
    everyone = [None] * run.world_size
    dist.all_gather_object(everyone, mine)
    total: dict = {}
    for counts in everyone:
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))


def finish(run: Run) -> None:
    """Collective: whatever a finished stage still owes after its final checkpoint (a kill may have come between):
    the final EMA snapshot and done.json, so a finished stage never leaves an older snapshot behind."""
    snap_json, snap_images = os.path.join(run.snapshot_dir, META), None
    if os.path.isfile(snap_json):
        with open(snap_json) as f:
            snap_images = json.load(f)["images_seen"]
    if snap_images != run.state.images_seen:
        save_ema_snapshot(run)
    skipped = skipped_inputs(run)
    if run.rank == 0:
        write_json_atomic(os.path.join(run.cfg.run_dir, "done.json"),
                          {**dataclasses.asdict(run.state), "skipped_inputs": skipped,
                           "snapshot": os.path.abspath(run.snapshot_dir)}, indent=None)
        print(f"[{run.cfg.name}] finished: {run.state.images_seen} images, snapshot {run.snapshot_dir}"
              + (f", skipped inputs {skipped}" if skipped else ""), flush=True)


def _call_on_preempt(on_preempt, info: dict) -> None:
    if on_preempt is None:
        return
    takes_arg = len(inspect.signature(on_preempt).parameters) > 0
    on_preempt(info) if takes_arg else on_preempt()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def train(cfg: RunConfig, rank: int, world_size: int, device: torch.device, on_preempt=None) -> int:
    """Train one stage from its latest checkpoint (or from scratch) to train.total_images; 0, 1 or 3."""
    t = cfg.train
    if rank == 0:
        os.makedirs(os.path.join(cfg.run_dir, "checkpoints"), exist_ok=True)
    dist.barrier()
    lock = lock_run_folder(cfg, rank, device)
    run = None
    try:
        if rank == 0:
            checkpoint.clean_partial(os.path.join(cfg.run_dir, "checkpoints"))
            save_config(cfg, os.path.join(cfg.run_dir, "config.json"))
        run = build_run(cfg, rank, world_size, device)
        resume(run)
        state, policy = run.state, SavePolicy(t.ckpt_every_images, t.snapshot_every_images,
                                              t.sample_every_images, t.total_images)
        batches, window, skipped_before = iter(run.loader), Window(), 0
        run.engine.train()
        with StopFlag() as stop:
            while state.images_seen < t.total_images:
                step_start = time.time()
                result = train_step(run, batches)
                # one all-reduce per step: loss, images, any rank's stop signal, inputs skipped so far, key crcs
                totals = torch.tensor([result.loss, float(result.images), float(stop.signum),
                                       float(sum(run.loader.counts()["skipped"].values())), float(result.keys_crc)],
                                      dtype=torch.float64, device=device)  # crc sums stay exact below 2**53
                dist.all_reduce(totals)
                before = state.images_seen
                state.images_seen += int(totals[1].item())
                state.step += 1
                window.add(totals[0].item() / world_size, int(totals[1].item()), int(totals[4].item()))
                if state.step % t.log_every_steps == 0 or state.images_seen >= t.total_images:
                    record = window.record(run, result, step_start)
                    if int(totals[3].item()) != skipped_before:   # shown when it changes
                        skipped_before = int(totals[3].item())
                        record.update(skipped_inputs=skipped_before, skipped=skipped_inputs(run))
                    run.logger.step(record)
                    window = Window()
                if totals[2].item() > 0:  # some rank was signalled: save, tell the launcher, exit resumable
                    path = save_checkpoint(run)
                    if rank == 0:
                        print(f"[{cfg.name}] preempted: checkpoint {path} at {state.images_seen} images; "
                              f"rerun to resume", flush=True)
                        _call_on_preempt(on_preempt, {"run_dir": cfg.run_dir, "checkpoint": path,
                                                      "images_seen": state.images_seen})
                    return PREEMPTED
                ckpt, snapshot, samples = policy.due(before, state.images_seen)
                if ckpt:
                    save_checkpoint(run)
                if snapshot:
                    save_ema_snapshot(run)
                if samples and rank == 0:
                    run.logger.image(write_samples(run), state.step)
        finish(run)
        return 0
    except NonFiniteLosses as e:
        if rank == 0:
            latest = checkpoint.latest_path(os.path.join(cfg.run_dir, "checkpoints")) or "none yet"
            print(f"[{cfg.name}] stopping: {e}; last good checkpoint: {latest}. Lower train.lr, use "
                  f"train.precision=fp32 or check the data", file=sys.stderr, flush=True)
        return 1
    finally:
        if run is not None:
            run.logger.close()
        lock.release()


class Window:
    """Loss and throughput since the last logged step."""

    def __init__(self):
        self.loss, self.steps, self.images, self.keys_crc, self.t0 = 0.0, 0, 0, 0, time.time()

    def add(self, loss: float, images: int, keys_crc: int) -> None:
        self.loss += loss
        self.steps += 1
        self.images += images
        self.keys_crc += keys_crc

    def record(self, run: Run, result: StepResult, step_start: float) -> dict:
        gn = run.engine.get_global_grad_norm() if result.grad_norm is None else result.grad_norm
        return {"step": run.state.step, "images_seen": run.state.images_seen, "loss": self.loss / self.steps,
                "lr": run.engine.get_lr()[0], "grad_norm": float(gn) if gn is not None else float("nan"),
                "images_per_s": self.images / (time.time() - self.t0), "step_time_s": time.time() - step_start,
                "mem_gib": memory_gib(run.device), "nonfinite_skipped": run.state.nonfinite_skipped,
                # which images the window's global batches held (sum of crc32 of their keys), on how many ranks
                "keys_crc": self.keys_crc, "world_size": run.world_size}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="JSON file in configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-4")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None, on_preempt=None) -> int:
    """Train one stage; 0 = finished, 3 = preempted with a checkpoint saved (rerun to resume)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rank, local_rank, world_size = distributed.environment()
        cfg = load_config(args.config, args.set, world_size)
        check_paths(cfg)
    except ConfigError as e:
        # every rank finds the same problem: rank 0 says it; the others leave a moment later, so that a launcher
        # (torchrun) sees rank 0 end first and does not kill it before the line is out
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"config error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(2)
        return 2
    if distributed.started_by_agent():
        distributed.die_with_parent()   # a SIGKILLed torchrun / deepspeed agent takes its ranks with it
    device = distributed.init(local_rank)
    try:
        return train(cfg, rank, world_size, device, on_preempt)
    except TrainError as e:
        if str(e):
            print(f"[{cfg.name}] rank {rank}: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():   # stop gloo's / nccl's threads before the interpreter tears down
        dist.destroy_process_group()
    sys.exit(code)
