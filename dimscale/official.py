"""Released checkpoints of the official DiM code (tyshiwo1/DiM-DiffusionMamba @292b228) -> dimscale snapshots.

An official `nnet_ema.pth` is a plain state dict under the official key names (mamba_2d.py `Mamba2DModel`).
`convert_state_dict` renames every key onto dimscale's DiM (one official key -> one dimscale key, same shape,
every dimscale key covered), reads the size from the tensor shapes (width, depth, patch, channels, classes,
pos-emb grid) and takes from the release table what shapes cannot tell (pad mode, skip-tune, sampling protocol).
Anything else stops with one `OfficialCheckpointError` line naming the first bad key and what the file looks like.
`convert_vae_state_dict` maps U-ViT's ldm-layout `autoencoder_kl_ema.pth` to a diffusers AutoencoderKL.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import warnings

import torch

from dimscale.config import ModelConfig

COMMIT = "292b2285de2f979cf5ac84ab90cbee20cdf1f2f3"
PREFIX = 2  # [t_tok, y_tok] rows at the front of the official `additional_embed`

_DPM = {"sampler": "dpm++", "steps": 50, "vae_scale": 0.18215}          # eval_ldm_discrete.py, DPM-Solver++ 50 NFE
_UG = {"sampler": "dpm", "steps": 50, "cfg_scale": 3.0, "vae_scale": 0.18215}  # plain DPM-Solver (predict_x0 False)

# name -> what the official config sets and the shapes cannot tell. `grid` is the token grid of the released
# file (an upsampling release reads the 512 fine-tuned file and resizes its pos-emb to m x grid at load).
RELEASES = {
    "imagenet256_H": {"config": "imagenet256_H_DiM", "width": 1536, "depth": 49, "in_channels": 4, "classes": 1000,
                      "grid": 16, "pad_mode": "lateral", "skip_tune": False, "resolution": 256,
                      "sampling": {**_DPM, "cfg_scale": 0.4}},
    "imagenet256_L": {"config": "imagenet256_L_DiM", "width": 1024, "depth": 49, "in_channels": 4, "classes": 1000,
                      "grid": 16, "pad_mode": "lateral", "skip_tune": False, "resolution": 256,
                      "sampling": {**_DPM, "cfg_scale": 0.4}},
    "imagenet512_H_ft": {"config": "imagenet512_H_DiM_ft", "width": 1536, "depth": 49, "in_channels": 4,
                         "classes": 1000, "grid": 32, "pad_mode": "rho_pad", "skip_tune": False, "resolution": 512,
                         "sampling": {**_DPM, "cfg_scale": 0.7}},
    "imagenet512_H_upsample": {"config": "imagenet512_H_DiM_upsample_test", "width": 1536, "depth": 49,
                               "in_channels": 4, "classes": 1000, "grid": 32, "pad_mode": "rho_pad",
                               "skip_tune": True, "resolution": 512,
                               "sampling": {**_UG, "upsample": {"factor": 2, "theta": 1.0, "eta": 0.3,
                                                                "official": True}}},
    "imagenet512_H_upsample_3x": {"config": "imagenet512_H_DiM_upsample_3x_test", "width": 1536, "depth": 49,
                                  "in_channels": 4, "classes": 1000, "grid": 32, "pad_mode": "rho_pad",
                                  "skip_tune": True, "resolution": 512,
                                  "sampling": {**_UG, "upsample": {"factor": 3, "theta": 1.0, "eta": 0.3,
                                                                   "official": True}}},
    # pixel-space continuous-time VP-SDE model (train.py / sde.py): dimscale's samplers do not run it
    "cifar10_S": {"config": "cifar10_S_DiM", "width": 512, "depth": 25, "in_channels": 3, "classes": 10,
                  "grid": 16, "pad_mode": "lateral", "skip_tune": False, "resolution": 32,
                  "sampling": {"sampler": "euler_maruyama_sde", "steps": 1000, "cfg_scale": 0.0,
                               "model_time": "t*999", "sde": "VPSDE(beta_min=0.1, beta_max=20)"}},
}

# official key (regex) -> dimscale key; the first full match wins
KEY_MAP = [
    (r"additional_embed", r"pos_embed"),
    (r"pos_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"transformer_blocks\.(\d+)\.scale_shift_table", r"blocks.\1.scale_shift_table"),
    (r"transformer_blocks\.(\d+)\.norm1\.norm\.weight", r"blocks.\1.norm.weight"),
    (r"transformer_blocks\.(\d+)\.attn1\.(A_log|D|(in_proj|x_proj|out_proj)\.weight|(conv1d|dt_proj)\.(weight|bias))",
     r"blocks.\1.mixer.\2"),
    (r"transformer_blocks\.(\d+)\.skip_linear\.((\d\.)?(weight|bias))", r"blocks.\1.skip_linear.\2"),
    (r"norm_out\.norm\.weight", r"norm_out.weight"),
    (r"adaln_single\.emb\.timestep_embedder\.linear_1\.(weight|bias)", r"t_mlp.0.\1"),
    (r"adaln_single\.emb\.timestep_embedder\.linear_2\.(weight|bias)", r"t_mlp.2.\1"),
    (r"adaln_single\.emb\.class_embedder\.embedding_table\.weight", r"class_emb.weight"),
    (r"adaln_single\.linear\.(weight|bias)", r"adaln_single.\1"),
    (r"label_emb\.weight", r"label_emb.weight"),
    (r"a4m_adapter\.pad_token_dec_split", r"sep_tokens"),
    (r"a4m_adapter\.pad_token", r"pad_token"),
    (r"a4m_adapter\.(first_smoother|last_smoother)\.(weight|bias)", r"\1.\2"),
    (r"proj_out_([12])\.(weight|bias)", r"proj_out_\1.\2"),
]
_KEY_MAP = [(re.compile(p), r) for p, r in KEY_MAP]


class OfficialCheckpointError(ValueError):
    """The file is not the official checkpoint asked for; the message names the first bad key and the fix."""


def map_key(key: str) -> str | None:
    """dimscale key of an official nnet key, or None when it is not one."""
    for pattern, repl in _KEY_MAP:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    return None


def load_official(path: str) -> dict:
    """The state dict in an official .pth (torch.load weights_only=True); one-line error for anything else."""
    if not os.path.isfile(path):
        raise OfficialCheckpointError(f"'{path}' does not exist; pass the official nnet_ema.pth (or nnet.pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: all mean "not a plain tensor state dict"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = ("a pickled object that weights_only loading refuses (not a plain state dict)"
                if "weights_only" in str(e) or "Unsupported global" in str(e) else "not a complete torch.save file "
                "(truncated or corrupt)")
        raise OfficialCheckpointError(f"cannot read '{path}': {what} ({first[:160]}); pass an official "
                                      f"state dict file (nnet_ema.pth, autoencoder_kl_ema.pth)") from None
    return check_state_dict(obj, path)


def check_state_dict(obj, where: str = "the file") -> dict:
    """`obj` if it is a dict of str -> Tensor, else a one-line error saying what it is instead."""
    if not isinstance(obj, dict):
        raise OfficialCheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict; pass the official "
                                      f"nnet_ema.pth (a dict of tensors)")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise OfficialCheckpointError(f"{where}: entry {k!r} is a {type(v).__name__}, not a tensor; this is not "
                                          f"a plain state dict (pass nnet_ema.pth, not a training-state file)")
    return obj


def _looks_like(sd: dict) -> str:
    """A few words on what a state dict that is not an official nnet looks like."""
    keys = list(sd)
    if any(k.startswith(("encoder.", "decoder.", "quant_conv")) for k in keys):
        return "an autoencoder (convert it with --vae)"
    if any(k.startswith("module.") for k in keys):
        return "a DDP-wrapped nnet (keys start with 'module.'); save the inner module's state dict"
    if "pos_embed" in sd and "patch_embed.weight" in sd:
        return "a dimscale state dict already"
    return f"not an official DiM nnet ({len(keys)} keys, first '{keys[0]}')" if keys else "an empty dict"


def _shape(sd: dict, key: str) -> tuple:
    if key not in sd:
        raise OfficialCheckpointError(f"missing key '{key}': the file has no official DiM nnet tensor of that name; "
                                      f"it looks like {_looks_like(sd)}")
    return tuple(sd[key].shape)


def describe(sd: dict) -> dict:
    """Size of an official nnet, read from its shapes: width, depth, patch, in_channels, classes, grid."""
    width, in_ch, patch, _ = _shape(sd, "pos_embed.proj.weight")
    rows = _shape(sd, "additional_embed")[1] - PREFIX
    grid = math.isqrt(max(rows, 0))
    if grid * grid != rows:
        raise OfficialCheckpointError(f"mis-shaped key 'additional_embed' {_shape(sd, 'additional_embed')}: "
                                      f"{rows} image rows are not a square grid")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    return {"width": width, "depth": len(blocks), "patch": patch, "in_channels": in_ch,
            "classes": _shape(sd, "label_emb.weight")[0] - 1, "grid": grid}


def _signature(rel: dict, grid: int) -> tuple:
    return rel["width"], rel["depth"], rel["in_channels"], rel["classes"], grid


def identify(size: dict) -> list[str]:
    """Releases whose released file (or deployed upsampling model) has exactly these sizes."""
    sig = (size["width"], size["depth"], size["in_channels"], size["classes"], size["grid"])
    out = []
    for name, rel in RELEASES.items():
        grids = [rel["grid"]] + ([rel["grid"] * rel["sampling"]["upsample"]["factor"]]
                                 if "upsample" in rel["sampling"] else [])
        if any(sig == _signature(rel, g) for g in grids):
            out.append(name)
    return out


def _what_it_is(size: dict, names: list[str]) -> str:
    side = RELEASES[names[0]]["resolution"] if names else None
    return (f"this is a {side} checkpoint: {size['grid'] ** 2 + PREFIX} pos-emb rows, width {size['width']}, "
            f"{size['in_channels']} input channels")


def pick_release(size: dict, release: str | None) -> str:
    """The release to convert as: `release` checked against the shapes, or the one the shapes identify."""
    names = identify(size)
    if release is not None and release not in RELEASES:
        raise OfficialCheckpointError(f"--release '{release}' is not a released config; choose one of: "
                                      f"{', '.join(RELEASES)}")
    if release is None:
        if len(names) == 1:
            return names[0]
        if names:
            raise OfficialCheckpointError(f"{_what_it_is(size, names)}; it serves several releases, pass "
                                          f"--release with one of: {', '.join(names)}")
        raise OfficialCheckpointError(f"a checkpoint of width {size['width']}, depth {size['depth']}, grid "
                                      f"{size['grid']}x{size['grid']} matches no released config; pass --release "
                                      f"NAME to say which config trained it ({', '.join(RELEASES)})")
    rel = RELEASES[release]
    if names and release not in names:
        raise OfficialCheckpointError(f"{_what_it_is(size, names)}; use --release {' or '.join(names)}, "
                                      f"not {release}")
    if size["in_channels"] != rel["in_channels"]:
        kind = "SD-VAE latent" if size["in_channels"] == 4 else "pixel"
        raise OfficialCheckpointError(f"mis-shaped key 'pos_embed.proj.weight': the file takes "
                                      f"{size['in_channels']} input channels (a {kind} model) but {release} has "
                                      f"{rel['in_channels']}; use a release with {size['in_channels']} channels")
    return release


def model_config(size: dict, release: str, grid: int) -> ModelConfig:
    """ModelConfig of the converted model: the zoo name of the release, sizes from the shapes when they differ."""
    from dimscale.models import MODEL_ZOO
    rel = RELEASES[release]
    name = {1536: "DiM-H/2", 1024: "DiM-L/2", 512: "DiM-S/2"}.get(size["width"], "DiM-T/2")
    zoo = MODEL_ZOO[name]
    return ModelConfig(name=name, in_channels=size["in_channels"], input_size=grid * size["patch"],
                       num_classes=size["classes"], pad_mode=rel["pad_mode"], skip_tune=rel["skip_tune"],
                       width=0 if size["width"] == zoo["width"] else size["width"],
                       depth=0 if size["depth"] == zoo["depth"] else size["depth"],
                       patch=0 if size["patch"] == zoo["patch"] else size["patch"])


def convert_state_dict(sd: dict, release: str | None = None) -> tuple[dict, ModelConfig, dict]:
    """(dimscale state dict, ModelConfig, snapshot meta) of an official nnet state dict; tensors may be on 'meta'.

    An upsampling release builds the model at m x the file's grid and resizes the pos-emb there once, bilinearly
    (official `load_pretrained_model`); its base-grid UG pass then sees that resized pos-emb resized back down.
    """
    from dimscale.models import build_model, resize_pos_embed
    check_state_dict(sd)
    mapped = {}
    for key, value in sd.items():
        new = map_key(key)
        if new is None:
            raise OfficialCheckpointError(f"unmapped key '{key}' {tuple(value.shape)}: not a key of the official "
                                          f"DiM nnet; the file looks like {_looks_like(sd)}")
        mapped[new] = value
    size = describe(sd)
    release = pick_release(size, release)
    rel = RELEASES[release]
    grid = size["grid"]
    up = rel["sampling"].get("upsample")
    if up and grid != rel["grid"] * up["factor"]:   # the released 512 file (or a tiny one): deploy at m x grid
        grid *= up["factor"]
        mapped["pos_embed"] = resize_pos_embed(mapped["pos_embed"], (grid, grid))
    cfg = model_config(size, release, grid)
    with torch.device("meta"):
        want = build_model(cfg).state_dict()
    inverse = {map_key(key): key for key in sd}
    for key, ref in want.items():
        if key not in mapped:
            raise OfficialCheckpointError(f"missing key: the file has no tensor for dimscale '{key}' {tuple(ref.shape)}"
                                          f" (a {size['width']}-wide, depth-{size['depth']} official nnet has one); "
                                          f"it looks like {_looks_like(sd)}")
        if tuple(mapped[key].shape) != tuple(ref.shape):
            raise OfficialCheckpointError(f"mis-shaped key '{inverse[key]}': file {tuple(mapped[key].shape)}, a "
                                          f"{release} model of the file's size needs {tuple(ref.shape)}")
    extra = sorted(set(mapped) - set(want))
    if extra:
        raise OfficialCheckpointError(f"unmapped key '{inverse[extra[0]]}' {tuple(mapped[extra[0]].shape)}: the "
                                      f"model built from the file's shapes has no such tensor")
    latent = rel["in_channels"] == 4
    sampling = json.loads(json.dumps(rel["sampling"]))
    base = grid // up["factor"] if up else grid                # the grid the release was trained at
    meta = {"data": {"resolution": base * size["patch"] * (8 if latent else 1),
                     "latent": "moments" if latent else "none", "vae_scale": 0.18215, "vae_path": "",
                     "channels": size["in_channels"]},
            "diffusion": {"num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                          "sampler": sampling["sampler"], "sample_steps": sampling["steps"],
                          "cfg_scale": sampling["cfg_scale"]},
            "sampling": sampling,
            "official": {"release": release, "config": f"configs/{rel['config']}.py", "commit": COMMIT},
            "images_seen": 0, "run": f"official-{release}"}
    return mapped, cfg, meta


def convert_file(path: str, out: str, release: str | None = None) -> dict:
    """Convert an official nnet .pth into the EMA snapshot folder `out` (atomic); returns the snapshot meta."""
    from dimscale.snapshot import save_snapshot
    state, cfg, meta = convert_state_dict(load_official(path), release)
    meta["official"]["source"] = os.path.abspath(path)
    save_snapshot(out, state, cfg, meta)
    return {"model": dataclasses.asdict(cfg), **meta}


# ---------------------------------------------------------------------------------------------------------------
# VAE: U-ViT's libs/autoencoder.py FrozenAutoencoderKL (ldm key layout) -> diffusers AutoencoderKL
# ---------------------------------------------------------------------------------------------------------------

def vae_ddconfig(sd: dict) -> dict:
    """The ldm ddconfig of an autoencoder state dict, read from its shapes (our own code: the file has no config
    and diffusers builds its config from the ldm yaml)."""
    ch = _vae_shape(sd, "encoder.conv_in.weight")[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = [_vae_shape(sd, f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in levels]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    attn = [k for k in sd if re.match(r"(en|de)coder\.(down|up)\.\d+\.attn\.", k)]
    if attn:
        raise OfficialCheckpointError(f"unmapped key '{attn[0]}': attention inside the down/up levels "
                                      f"(attn_resolutions) is not in the SD KL-f8 autoencoder")
    return {"double_z": True, "z_channels": _vae_shape(sd, "decoder.conv_in.weight")[1],
            "in_channels": _vae_shape(sd, "encoder.conv_in.weight")[1],
            "out_ch": _vae_shape(sd, "decoder.conv_out.weight")[0], "ch": ch, "ch_mult": ch_mult,
            "num_res_blocks": len(blocks), "embed_dim": _vae_shape(sd, "post_quant_conv.weight")[1],
            "attn_resolutions": [], "dropout": 0.0}


def _vae_shape(sd: dict, key: str) -> tuple:
    if key not in sd:
        like = "an official DiM nnet" if "additional_embed" in sd else _looks_like(sd)
        raise OfficialCheckpointError(f"missing key '{key}': not an ldm KL autoencoder state dict; it looks like "
                                      f"{like}")
    return tuple(sd[key].shape)


def convert_vae_state_dict(sd: dict, scale: float = 0.18215):
    """(diffusers AutoencoderKL, ddconfig) with the ldm weights; the key map is diffusers' own
    `convert_ldm_vae_checkpoint`, checked here for full coverage both ways."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    check_state_dict(sd)
    dd = vae_ddconfig(sd)
    original = {"model": {"params": {"scale_factor": scale, "first_stage_config": {"params": {"ddconfig": dd}}}}}
    with warnings.catch_warnings():                      # sample_size only sets the tiling size: SD's 256
        warnings.simplefilter("ignore")
        config = create_vae_diffusers_config_from_ldm(original, sd, image_size=256)
    converted = convert_ldm_vae_checkpoint(sd, config)
    if len(converted) != len(sd):                        # diffusers skips keys it does not know: name the first
        ptrs = {v.data_ptr() for v in converted.values()}
        left = [k for k in sd if sd[k].data_ptr() not in ptrs] or ["?"]
        raise OfficialCheckpointError(f"unmapped key '{left[0]}': diffusers' ldm VAE conversion covers "
                                      f"{len(converted)} of the file's {len(sd)} tensors")
    with torch.device("meta"):
        probe = AutoencoderKL(**{k: v for k, v in config.items()})
    want = probe.state_dict()
    for key, ref in want.items():
        if key not in converted:
            raise OfficialCheckpointError(f"missing key: no ldm tensor maps to diffusers '{key}' {tuple(ref.shape)}")
        if tuple(converted[key].shape) != tuple(ref.shape):
            raise OfficialCheckpointError(f"mis-shaped key for diffusers '{key}': {tuple(converted[key].shape)} vs "
                                          f"{tuple(ref.shape)}")
    extra = sorted(set(converted) - set(want))
    if extra:
        raise OfficialCheckpointError(f"unmapped key: diffusers AutoencoderKL has no '{extra[0]}'")
    vae = AutoencoderKL(**config)
    vae.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return vae.eval(), dd


def convert_vae_file(path: str, out: str, scale: float = 0.18215) -> dict:
    """Convert `autoencoder_kl_ema.pth` into the diffusers folder `out` (written next to it, then renamed)."""
    vae, dd = convert_vae_state_dict(load_official(path), scale)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return dd
