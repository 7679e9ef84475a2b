"""Depthwise causal conv1d (Mamba's short convolution): reference in PyTorch, causal-conv1d's kernel on CUDA."""
from __future__ import annotations

import torch.nn.functional as F


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """x (B, D, L), weight (D, W), bias (D,): out_t = sum_k w_k x_{t-W+1+k} (left zero pad W-1), optional SiLU."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    L, W = x.shape[-1], weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                   padding=W - 1, groups=x.shape[1])[..., :L]
    return F.silu(out) if activation else out


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """causal-conv1d's CUDA kernel when installed and x is on CUDA, else `causal_conv1d_ref`."""
    if x.is_cuda:
        try:
            from causal_conv1d import causal_conv1d_fn as cuda_fn
            return cuda_fn(x, weight, bias, activation=activation)
        except ImportError:
            pass
    return causal_conv1d_ref(x, weight, bias, activation)
