"""The DiM backbone, its attention baseline, and the named model zoo (docs/reference.md §2)."""
from __future__ import annotations

from dimscale.models.dim import DiM, resize_pos_embed
from dimscale.models.mamba import Mamba

# name -> width, depth, patch. S/L/H are the official configs; T is a tiny debug model for tests and demos.
MODEL_ZOO = {
    "DiM-T/2": {"width": 64, "depth": 5, "patch": 2},
    "DiM-S/2": {"width": 512, "depth": 25, "patch": 2},     # CIFAR-10 config, ~50.6M params
    "DiM-L/2": {"width": 1024, "depth": 49, "patch": 2},    # IN-256 L, ~386M
    "DiM-H/2": {"width": 1536, "depth": 49, "patch": 2},    # IN-256/512 H, ~862M (paper: 860M)
}


def build_model(cfg) -> DiM:
    """DiM for a ModelConfig (or a dict with its fields); the zoo name sets width, depth and patch."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    name = get("name")
    if name not in MODEL_ZOO:
        raise ValueError(f"model name '{name}' is not in the zoo; choose one of: {', '.join(MODEL_ZOO)}")
    return DiM(in_channels=get("in_channels", 4), input_size=get("input_size", 32),
               num_classes=get("num_classes", 1000), pad_mode=get("pad_mode", "lateral"),
               mixer=get("mixer", "mamba"), scan_backend=get("scan_backend", "auto"),
               grad_checkpointing=get("grad_checkpointing", False), **MODEL_ZOO[name])


def adapt_state_dict(state_dict: dict, model: DiM) -> dict:
    """Copy of `state_dict` whose pos-emb is resized (bilinear, prefix rows kept) to `model`'s grid, for
    finetuning from a snapshot of another resolution (official `load_pretrained_model`, docs/reference.md §3.4)."""
    out = dict(state_dict)
    want = model.pos_embed.shape
    have = out.get("pos_embed")
    if have is not None and have.shape != want:
        out["pos_embed"] = resize_pos_embed(have, (model.base_grid, model.base_grid))
    return out


__all__ = ["DiM", "Mamba", "MODEL_ZOO", "adapt_state_dict", "build_model", "resize_pos_embed"]
