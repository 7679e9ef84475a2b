"""EMA snapshots: the weights that sampling and FID load, without DeepSpeed (EDM2's snapshot/checkpoint split).

A snapshot is a folder:
    ema.safetensors   fp32 EMA weights of the DiM (keys of DiM.state_dict())
    snapshot.json     {"model": ModelConfig dict, "data": {...resolution, latent, vae_scale},
                       "diffusion": DiffusionConfig dict, "images_seen": int, "run": name, ...}
Optional entries, written by tools/convert_official.py for a released official checkpoint:
    "sampling": the protocol sampling defaults to (explicit flags still win), as the official eval config sets it:
        {"sampler": "dpm++" | "dpm" | "ddim" (or an official one dimscale does not run, e.g. "euler_maruyama_sde"),
         "steps": NFE, "cfg_scale": U-ViT s (eps_c + s (eps_c - eps_u); DiT w = 1 + s), "vae_scale": 0.18215,
         "upsample": {"factor": m, "theta": θ, "eta": η, "official": bool (official UG time values)}  (optional)}
    "official": {"release", "config", "commit", "source"}: where the weights came from.
An upsampling release's model is built at m x the trained grid (data.resolution is the trained one), so its
high-res pass sees the stored pos-emb and the base-grid pass a resize of it.
It is written under a temporary name and renamed into place, so a crash never leaves half a snapshot.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from dimscale.config import VAE_FACTOR, ModelConfig, from_dict

WEIGHTS, META = "ema.safetensors", "snapshot.json"


def save_snapshot(folder: str, state_dict: dict, model_cfg: ModelConfig | dict, meta: dict | None = None) -> str:
    """Write `state_dict` (fp32, contiguous) and its config into `folder` atomically; returns the folder."""
    import dataclasses
    model = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, META), "w") as f:
        json.dump({"model": model, **(meta or {})}, f, indent=2)
    old = folder.rstrip("/") + ".old"
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def run_meta(cfg, images_seen: int) -> dict:
    """What a trainer's snapshot records beside the model config: data layout, diffusion config, progress."""
    import dataclasses
    d = cfg.data
    return {"data": {"resolution": d.resolution, "latent": d.latent, "vae_scale": d.vae_scale,
                     "vae_path": d.vae_path, "channels": cfg.model.in_channels},
            "diffusion": dataclasses.asdict(cfg.diffusion), "images_seen": images_seen, "run": cfg.name}


def read_snapshot(folder: str) -> tuple[dict, dict]:
    """(state_dict, meta) of a snapshot folder; a clear error if it is not one."""
    wpath, mpath = os.path.join(folder, WEIGHTS), os.path.join(folder, META)
    if not (os.path.isfile(wpath) and os.path.isfile(mpath)):
        raise FileNotFoundError(f"'{folder}' is not an EMA snapshot (needs {WEIGHTS} and {META}); "
                                f"pass a folder written by dimscale/train.py, e.g. runs/NAME/snapshots/latest")
    with open(mpath) as f:
        meta = json.load(f)
    return load_file(wpath), meta


def load_snapshot(folder: str, device: str | torch.device = "cpu", **model_overrides):
    """Build the DiM a snapshot describes and load its EMA weights; returns (model in eval mode, meta)."""
    from dimscale.models import build_model
    state, meta = read_snapshot(folder)
    cfg = from_dict(ModelConfig, {**meta["model"], **model_overrides})
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def recorded_sampling(meta: dict) -> dict:
    """The sampling protocol a snapshot records, flat in dimscale/generate.py SamplingProtocol's field names
    (sampler, steps, cfg_scale, upsample, ug_theta, ug_eta, ug_official): its "sampling" block, and its training
    diffusion.cfg_scale when the block has none; fields it does not record are left out."""
    proto = meta.get("sampling", {})
    up = proto.get("upsample", {})
    flat = {"sampler": proto.get("sampler"), "steps": proto.get("steps"), "cfg_scale": proto.get("cfg_scale"),
            "upsample": up.get("factor"), "ug_theta": up.get("theta"), "ug_eta": up.get("eta"),
            "ug_official": up.get("official")}
    if flat["cfg_scale"] is None:
        flat["cfg_scale"] = meta.get("diffusion", {}).get("cfg_scale")
    return {k: v for k, v in flat.items() if v is not None}


def model_input_shape(meta: dict) -> tuple[tuple[int, int, int], bool]:
    """((C, H, W) the model samples at, is_latent) from snapshot meta: training pixels, or /8 in SD-VAE latents."""
    mcfg, data = meta["model"], meta.get("data", {})
    latent = data.get("latent", "none") != "none"
    side = data["resolution"] // VAE_FACTOR if latent and "resolution" in data else data.get("resolution", mcfg["input_size"])
    return (mcfg["in_channels"], side, side), latent
