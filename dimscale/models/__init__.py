"""The DiM backbone, its attention baseline, and the named model zoo (docs/reference.md §2)."""
from __future__ import annotations

import torch

from dimscale.config import ModelConfig
from dimscale.models.dim import MIXERS, DiM, resize_pos_embed
from dimscale.models.layout import PAD_MODES
from dimscale.models.mamba import Mamba
from dimscale.ops import resolve_backend

# name -> width, depth, patch. S/L/H are the official configs; T is a tiny debug model for tests and demos.
MODEL_ZOO = {
    "DiM-T/2": {"width": 64, "depth": 5, "patch": 2},
    "DiM-S/2": {"width": 512, "depth": 25, "patch": 2},     # CIFAR-10 config, ~50.6M params
    "DiM-L/2": {"width": 1024, "depth": 49, "patch": 2},    # IN-256 L, ~386M
    "DiM-H/2": {"width": 1536, "depth": 49, "patch": 2},    # IN-256/512 H, ~862M (paper: 860M)
}


def model_size(cfg: ModelConfig) -> dict:
    """{"width", "depth", "patch"} of a ModelConfig: the zoo name's, each replaced by a nonzero field of the same
    name (checkpoints of other sizes, e.g. converted from the official code)."""
    if cfg.name not in MODEL_ZOO:
        raise ValueError(f"model name '{cfg.name}' is not in the zoo; choose one of: {', '.join(MODEL_ZOO)}")
    return {k: getattr(cfg, k) or v for k, v in MODEL_ZOO[cfg.name].items()}


def build_model(cfg: ModelConfig) -> DiM:
    """The DiM a ModelConfig describes; the zoo name sets width, depth and patch unless the config overrides them."""
    return DiM(in_channels=cfg.in_channels, input_size=cfg.input_size, num_classes=cfg.num_classes,
               pad_mode=cfg.pad_mode, mixer=cfg.mixer, scan_backend=cfg.scan_backend,
               grad_checkpointing=cfg.grad_checkpointing, skip_tune=cfg.skip_tune,
               skip_tune_param=tuple(cfg.skip_tune_param), **model_size(cfg))


def compile_model(model: DiM, cfg: ModelConfig, backend: str = "inductor") -> DiM:
    """`model.compile()` (in place: same module, same state-dict keys) when `cfg.compile` is on. The scan
    backend is resolved first, outside the traced code, for the device training will use."""
    if cfg.compile:
        resolve_backend(cfg.scan_backend, "cuda" if torch.cuda.is_available() else "cpu")
        model.compile(backend=backend)
    return model


def adapt_state_dict(state_dict: dict, model: DiM) -> dict:
    """Copy of `state_dict` whose pos-emb is resized (bilinear, prefix rows kept) to `model`'s grid, for
    finetuning from a snapshot of another resolution (official `load_pretrained_model`, docs/reference.md §3.4)."""
    out = dict(state_dict)
    want = model.pos_embed.shape
    have = out.get("pos_embed")
    if have is not None and have.shape != want:
        out["pos_embed"] = resize_pos_embed(have, (model.base_grid, model.base_grid))
    return out


__all__ = ["DiM", "MIXERS", "Mamba", "MODEL_ZOO", "PAD_MODES", "adapt_state_dict", "build_model", "compile_model",
           "model_size", "resize_pos_embed"]
