"""Typed run configuration: JSON files in configs/ -> validated dataclasses.

One module serves the trainer, the launcher and the tools. Every section is a dataclass; unknown keys,
wrong types and impossible combinations raise ConfigError with one line that names the key and the fix,
before any process group starts.

    cfg = load_config("configs/dim_h_512.json", overrides=["train.lr=1e-4", "model.name=DiM-S/2"])
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration problem; the message names the key and says how to fix it."""


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """The DiM backbone (dimscale/models/dim.py). Width/depth/patch come from the zoo name."""
    name: str = "DiM-S/2"            # zoo entry: DiM-T/2 (debug), DiM-S/2, DiM-L/2, DiM-H/2
    in_channels: int = 4             # 4 = SD-VAE latents, 3 = RGB pixels, 1 = grey pixels
    input_size: int = 32             # latent (or pixel) side the pos-emb is allocated for
    num_classes: int = 1000          # null class id for CFG = num_classes
    pad_mode: str = "lateral"        # 'lateral' (official 256) | 'rho_pad' (official 512 / upsampling)
    mixer: str = "mamba"             # 'mamba' | 'attention' (matched transformer baseline)
    scan_backend: str = "auto"       # "auto" | "cuda" (mamba-ssm) | "triton" | "cpu" (compiled C kernel) | "chunked" | "ref"
    grad_checkpointing: bool = False
    width: int = 0                   # > 0 replaces the zoo name's width (checkpoints of other sizes); 0 = the zoo's
    depth: int = 0                   # > 0 replaces the zoo name's depth (odd: block 0 + encoder + decoder halves)
    patch: int = 0                   # > 0 replaces the zoo name's patch size
    skip_tune: bool = False          # official skip-tune of the upsampling configs (docs/reference.md §1.7)
    skip_tune_param: tuple = (0.82, 1.0)  # official (top, bottom) skip-tune values
    compile: bool = False            # torch.compile the model for training (dimscale.models.compile_model)


@dataclass
class DiffusionConfig:
    """Discrete DDPM objective and sampling defaults (docs/reference.md §3.1, §4.1)."""
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    noise_shift: float = 1.0         # SNR_n / shift² (resolution shift, not in the paper): 2 = a 2x finetune's
    bf16_timesteps: bool = False     # official-code quirk: training timesteps rounded to bf16 (docs/reference.md §3.1)
    p_uncond: float = 0.1            # label -> null class probability (CFG training, docs/reference.md §1.10)
    min_snr_gamma: float = 0.0       # > 0: Min-SNR-γ loss weights (not in the paper; faster convergence); 0 = LSimple
    sampler: str = "dpm++"           # 'dpm++' | 'ddim' | 'dpm' (noise-prediction DPM-Solver, official UG)
    sample_steps: int = 50
    cfg_scale: float = 0.4           # U-ViT form eps = eps_c + s (eps_c - eps_u); DiT's w = 1 + s


VAE_SCALE = 0.18215   # SD's latent scale factor: z = 0.18215 · (μ + σ ε) (docs/reference.md §3.3)
VAE_FACTOR = 8        # SD's KL-f8 autoencoder: one latent pixel per 8x8 image pixels


@dataclass
class DataConfig:
    """Where the training images come from and how they become model inputs."""
    shards: str = ""                 # manifest.json of tools/make_shards.py, or a folder holding one
    resolution: int = 256            # image side in pixels at which this stage trains
    latent: str = "none"             # 'none' (pixel space) | 'moments' (VAE moments in shards) | 'online' (encode with VAE)
    vae_path: str = ""               # local diffusers AutoencoderKL folder (latent='online', sampling)
    vae_scale: float = VAE_SCALE
    buckets: dict = field(default_factory=dict)  # optional table: bucket name -> {"prob": p, "micro_batch": n}
    num_workers: int = 2
    random_flip: bool = True
    shuffle_buffer: int = 1000       # samples permuted together inside a shard (a window; resumable, no state)
    channels: int = 3                # model input channels in pixel space: grey shards are replicated to 3, RGB -> 1 is luma
    shard_url: str = ""              # '' = shards next to the manifest; else a template, e.g. 'pipe:curl -s https://host/x/{shard}'


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Budgets are in images (EDM2's kimg), not steps."""
    total_images: int = 1_000_000
    global_batch: int = 256
    micro_batch: int = 32            # per rank, per micro-step; accumulation = global / (micro * world)
    lr: float = 2e-4
    betas: tuple = (0.99, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.03
    no_decay_marked: bool = False    # exclude params marked _no_weight_decay (official: decay everything)
    warmup_images: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: str = "bf16"          # 'bf16' | 'fp32'
    zero_stage: int = 2
    seed: int = 0
    ckpt_every_images: int = 100_000
    keep_checkpoints: int = 3
    snapshot_every_images: int = 100_000
    sample_every_images: int = 100_000
    sample_count: int = 16           # grid of fixed seeds 0..n-1 and classes i % num_classes, comparable over the run
    log_every_steps: int = 10
    max_nonfinite_in_a_row: int = 10
    wandb: str = "off"               # 'online' | 'offline' | 'off'
    wandb_project: str = "dimscale"


@dataclass
class InitConfig:
    """Where a stage's weights start (weak-to-strong finetune, docs/reference.md §3.4)."""
    after_stage: str = ""            # config name of the stage this one follows (launcher chains them)
    snapshot: str = ""               # EMA snapshot folder to initialise from ('' = from scratch)


@dataclass
class RunConfig:
    """A whole training stage."""
    name: str = "run"
    out_dir: str = "runs"            # the run folder is out_dir/name
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out_dir, self.name)


# ------------------------------------------------------------------------------------------------
# Dict <-> dataclass with type checks
# ------------------------------------------------------------------------------------------------

def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check `value` against the annotated type; ints are accepted for floats, lists for tuples."""
    if typ is Any:
        return value
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__} {value!r}")
        return from_dict(typ, value, where)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if typ in (str, bool, dict, list) and not isinstance(value, typ):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from `data`; unknown keys are an error naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; value is parsed as JSON, else kept as a string."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    node[parts[-1]] = value


# ------------------------------------------------------------------------------------------------
# Validation of combinations that types cannot express
# ------------------------------------------------------------------------------------------------

def world_sizes_that_work(global_batch: int, micro_batch: int) -> str:
    """'world sizes that work: 1, 2, 3, 6' (those dividing global_batch / micro_batch), for error messages."""
    if global_batch % micro_batch:
        return f"no world size works while global_batch is not a multiple of micro_batch {micro_batch}"
    n = global_batch // micro_batch
    return "world sizes that work: " + ", ".join(str(w) for w in range(1, n + 1) if n % w == 0)


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> RunConfig:
    """Raise ConfigError for impossible settings; `world_size` enables the batch divisibility check."""
    from dimscale.models import MIXERS, MODEL_ZOO, PAD_MODES  # late import: config must load without torch work
    from dimscale.ops import SCAN_BACKENDS

    m, t, d, dif = cfg.model, cfg.train, cfg.data, cfg.diffusion
    for key in ("name", "out_dir"):
        if any(ord(c) < 32 or ord(c) == 127 for c in getattr(cfg, key)):  # a newline would split #SBATCH lines
            raise ConfigError(f"{key} = {getattr(cfg, key)!r} holds a control character (newline, tab, ...); "
                              f"use a plain name")
    if m.name not in MODEL_ZOO:
        raise ConfigError(f"model.name '{m.name}' is not in the zoo; choose one of: {', '.join(MODEL_ZOO)}")
    choices = {
        "model.pad_mode": (m.pad_mode, PAD_MODES),
        "model.mixer": (m.mixer, MIXERS),
        "model.scan_backend": (m.scan_backend, SCAN_BACKENDS),
        "data.latent": (d.latent, ("none", "moments", "online")),
        "train.precision": (t.precision, ("bf16", "fp32")),
        "train.wandb": (t.wandb, ("online", "offline", "off")),
        "diffusion.sampler": (dif.sampler, ("dpm++", "ddim", "dpm")),
    }
    for key, (val, ok) in choices.items():
        if val not in ok:
            raise ConfigError(f"{key} = '{val}' is not one of {', '.join(ok)}")
    for key in ("width", "depth", "patch"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key} = {getattr(m, key)} must be >= 0 (0 = the zoo entry's value)")
    if m.depth and m.depth % 2 == 0:
        raise ConfigError(f"model.depth = {m.depth} must be odd (block 0 + encoder half + decoder half)")
    if len(m.skip_tune_param) != 2 or not all(isinstance(v, (int, float)) for v in m.skip_tune_param):
        raise ConfigError(f"model.skip_tune_param = {list(m.skip_tune_param)} must be two numbers [top, bottom], "
                          f"e.g. [0.82, 1.0] (official)")
    if m.compile and m.scan_backend in ("chunked", "ref"):
        raise ConfigError(f"model.compile with model.scan_backend = '{m.scan_backend}': its Python loop over time "
                          "steps would be unrolled into the graph; use scan_backend auto, cpu or triton (custom ops)")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage = {t.zero_stage}; DeepSpeed ZeRO stages are 0, 1, 2 or 3")
    if not 0.0 <= dif.p_uncond < 1.0:
        raise ConfigError(f"diffusion.p_uncond = {dif.p_uncond} must be in [0, 1)")
    if dif.noise_shift <= 0:
        raise ConfigError(f"diffusion.noise_shift = {dif.noise_shift} must be > 0 (1 = the paper's schedule)")
    if dif.min_snr_gamma < 0:
        raise ConfigError(f"diffusion.min_snr_gamma = {dif.min_snr_gamma} must be >= 0 (0 turns Min-SNR weighting off)")
    if not 0.0 < t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay = {t.ema_decay} must be in (0, 1)")
    for key in ("total_images", "global_batch", "micro_batch", "log_every_steps", "sample_count"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key} = {getattr(t, key)} must be positive"
                              + (" (train.sample_every_images=0 turns grids off)" if key == "sample_count" else ""))
    if not t.lr > 0 or not math.isfinite(t.lr):
        raise ConfigError(f"train.lr = {t.lr} must be a positive number (e.g. 1e-4)")
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                    for b in t.betas):
        raise ConfigError(f"train.betas = {list(t.betas)} must be two numbers in [0, 1), e.g. [0.99, 0.99]")
    for key in ("eps", "weight_decay", "grad_clip", "warmup_images", "ckpt_every_images", "snapshot_every_images",
                "sample_every_images"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} = {getattr(t, key)} must be >= 0")
    if d.resolution <= 0:
        raise ConfigError(f"data.resolution = {d.resolution} must be a positive image side in pixels")
    if d.channels not in (1, 3):
        raise ConfigError(f"data.channels = {d.channels}; use 3 (RGB) or 1 (grey)")
    for name, conf in d.buckets.items():
        where = f"data.buckets['{name}']"
        if not isinstance(conf, dict) or set(conf) - {"prob", "micro_batch"}:
            raise ConfigError(f"{where} = {conf!r} must be an object with keys prob and/or micro_batch")
        mb, prob = conf.get("micro_batch", 1), conf.get("prob", 1)
        if isinstance(mb, bool) or not isinstance(mb, int) or mb <= 0:
            raise ConfigError(f"{where}.micro_batch = {mb!r} must be a positive integer")
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not prob >= 0:
            raise ConfigError(f"{where}.prob = {prob!r} must be a number >= 0")
    if world_size is not None and t.global_batch % (t.micro_batch * world_size) != 0:
        raise ConfigError(
            f"train.global_batch = {t.global_batch} is not divisible by train.micro_batch x world size = "
            f"{t.micro_batch} x {world_size}; {world_sizes_that_work(t.global_batch, t.micro_batch)}, "
            f"or set global_batch to a multiple of {t.micro_batch * world_size}")
    if d.latent == "online" and not d.vae_path:
        raise ConfigError("data.latent = 'online' needs data.vae_path: a local diffusers AutoencoderKL folder")
    if d.latent == "online" and d.channels != 3:
        raise ConfigError(f"data.latent = 'online' encodes RGB images with the SD VAE but data.channels = {d.channels}; "
                          f"set data.channels=3")
    patch = m.patch or MODEL_ZOO[m.name]["patch"]
    side = d.resolution // VAE_FACTOR if d.latent != "none" else d.resolution
    if side % patch:
        raise ConfigError(f"data.resolution = {d.resolution} gives a {side}-wide model input, not divisible "
                          f"by the patch size {patch}")
    expected_c = 4 if d.latent != "none" else None
    if expected_c is not None and m.in_channels != expected_c:
        raise ConfigError(f"model.in_channels = {m.in_channels} but SD-VAE latents have 4 channels")
    if d.latent == "none" and m.in_channels != d.channels:
        raise ConfigError(f"model.in_channels = {m.in_channels} but the loader gives data.channels = {d.channels} "
                          f"channel images; make them agree")
    if m.num_classes <= 0:
        raise ConfigError(f"model.num_classes = {m.num_classes} must be positive")
    return cfg


# ------------------------------------------------------------------------------------------------
# Checks that need the filesystem: the shards' manifest, the VAE, the init snapshot
# ------------------------------------------------------------------------------------------------

def check_paths(cfg: RunConfig) -> None:
    """Fail before any process group starts if shards or the init snapshot are missing or do not fit the config."""
    from dimscale.data import tario
    from dimscale.snapshot import META, WEIGHTS
    d = cfg.data
    shards = d.shards
    manifest_path = os.path.join(shards, "manifest.json") if os.path.isdir(shards) else shards
    if "://" not in shards and not shards.startswith("pipe:"):
        if not os.path.isfile(manifest_path):
            raise ConfigError(f"data.shards = '{shards}': no shards found (no manifest.json there); "
                              f"write them with tools/make_shards.py and point data.shards at the output folder")
        try:
            manifest, base = tario.read_manifest(manifest_path)
            for entry in manifest["buckets"].values():
                tario.shard_urls(entry, base, d.shard_url)  # names are data: refused here, never opened
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"data.shards: {e}") from None
        check_against_manifest(cfg, manifest)
    # latent runs need the VAE to encode (online) or to decode sample grids: fail now, not at the first grid
    if d.latent != "none" and (d.latent == "online" or cfg.train.sample_every_images > 0) \
            and not os.path.isfile(os.path.join(d.vae_path, "config.json")):
        why = "encodes images with it" if d.latent == "online" else "decodes sample grids with it"
        raise ConfigError(f"data.vae_path = '{d.vae_path}' is not a diffusers AutoencoderKL folder (no config.json); "
                          f"data.latent = '{d.latent}' {why}: point it at the VAE the shards were written with"
                          + ("" if d.latent == "online" else ", or set train.sample_every_images=0"))
    snap = cfg.init.snapshot
    missing = [f for f in (WEIGHTS, META) if snap and not os.path.isfile(os.path.join(snap, f))]
    if missing:
        raise ConfigError(f"init.snapshot = '{snap}' is not an EMA snapshot folder (no {' or '.join(missing)}); "
                          f"pass the pretraining run's snapshots/latest, or '' to start from scratch")


def check_against_manifest(cfg: RunConfig, manifest: dict) -> None:
    """The data section against what the shards hold: resolution, latents, bucket names, class ids."""
    d, m = cfg.data, cfg.model
    shard_res = manifest.get("resolution", 0)
    if d.resolution > shard_res or (d.latent == "moments" and d.resolution != shard_res):
        raise ConfigError(f"data.resolution = {d.resolution} but the shards were written at {shard_res}; the loader "
                          f"only downsizes pixels (moments need equal sizes): write shards at --resolution "
                          f"{d.resolution} or lower data.resolution")
    if d.latent == "moments" and not manifest.get("latent"):
        raise ConfigError(f"data.latent = 'moments' but {d.shards} holds no VAE moments; rerun "
                          f"tools/make_shards.py with --vae PATH, or set data.latent='none'")
    buckets = manifest.get("buckets", {})
    unknown = sorted(set(d.buckets) - set(buckets))
    if unknown:
        raise ConfigError(f"data.buckets names {unknown} that the shards do not have; available: "
                          f"{', '.join(b for b, e in buckets.items() if e.get('count'))}")
    labels = [int(k) for k in manifest.get("class_counts", {})]
    needed = max(manifest.get("num_classes", 0), max(labels, default=-1) + 1)
    if m.num_classes < needed:
        raise ConfigError(f"model.num_classes = {m.num_classes} but the shards hold class ids up to {needed - 1}; "
                          f"set model.num_classes={needed}")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def load_config(path: str, overrides: Optional[list] = None, world_size: Optional[int] = None) -> RunConfig:
    """Read a JSON config, apply `key=value` overrides, type-check and validate."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found; pass a JSON file from configs/ (e.g. configs/dim_t_cpu.json)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' holds a JSON {type(data).__name__}; a config is a JSON object "
                          f"{{\"model\": ..., \"train\": ...}}")
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for o in overrides or []:
        apply_override(data, o)
    cfg = from_dict(RunConfig, data)
    return validate(cfg, world_size)


def write_json_atomic(path: str, obj, indent: int | None = 2) -> None:
    """Write JSON under a temporary name, then rename: a reader (another rank, the launcher) sees the old file or
    the whole new one, never an empty or half-written one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config atomically."""
    write_json_atomic(path, to_dict(cfg))
