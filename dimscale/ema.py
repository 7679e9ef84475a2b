"""fp32 EMA of a model's weights that stays correct when DeepSpeed ZeRO-3 shards the parameters.

Under ZeRO-3 a rank holds only a flat slice of each parameter (`p.numel() == 0`), so an EMA built from
`p.data` would silently average empty tensors (docs/engineering-notes.md §B.21). We gather each chunk of parameters with
`deepspeed.zero.GatheredParameters` (a no-op on stages 0-2) and keep a full fp32 copy on every rank, so any
rank can write the snapshot and resume needs nothing but the copy in the checkpoint.
"""
from __future__ import annotations

import contextlib

import torch

GATHER_CHUNK_NUMEL = 64 * 2**20  # gather at most ~256 MB of fp32 weights at a time under ZeRO-3


def _gathered(params):
    """Context in which ZeRO-3 partitioned `params` hold their full data (read-only); a no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _full_numel(p):
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _chunks(named_params):
    """Split (name, param) pairs into chunks of at most GATHER_CHUNK_NUMEL elements (one param may exceed it)."""
    chunk, size = [], 0
    for name, p in named_params:
        if chunk and size + _full_numel(p) > GATHER_CHUNK_NUMEL:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, p))
        size += _full_numel(p)
    if chunk:
        yield chunk


class EMA:
    """shadow = decay * shadow + (1 - decay) * param, on optimizer steps only (docs/reference.md §3.2: 0.9999)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.copy_from(module)  # official code starts with ema_update(0): EMA = online weights

    @torch.no_grad()
    def copy_from(self, module: torch.nn.Module) -> None:
        """Set the EMA equal to the module's current (gathered) weights."""
        self._blend(module, 0.0)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """One EMA step; call it after each optimizer step that was applied, never per micro-batch."""
        self._blend(module, self.decay)

    def _blend(self, module, decay):
        for chunk in _chunks(module.named_parameters()):
            with _gathered([p for _, p in chunk]):
                for name, p in chunk:
                    full = p.detach().to(torch.float32)
                    if decay == 0.0 or name not in self.shadow:
                        self.shadow[name] = full.clone()
                    else:
                        self.shadow[name].lerp_(full.to(self.shadow[name].device), 1.0 - decay)

    def state_dict(self, module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """EMA weights keyed like module.state_dict(); buffers (not averaged) are copied from `module`."""
        out = {}
        if module is not None:
            out.update({k: b.detach().clone() for k, b in module.named_buffers() if b is not None})
        out.update(self.shadow)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters (first: {missing[0]}); "
                           f"the checkpoint belongs to another model")
        for name in self.shadow:
            self.shadow[name] = state[name].to(self.shadow[name].device, torch.float32).clone()
