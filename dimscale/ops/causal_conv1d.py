"""Depthwise causal conv1d (Mamba's short convolution): a reference, a fast channels-last path, the CUDA kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_activation(activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """x (B, D, L), weight (D, W), bias (D,): out_t = sum_k w_k x_{t-W+1+k} (left zero pad W-1), optional SiLU."""
    _check_activation(activation)
    L, W = x.shape[-1], weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                   padding=W - 1, groups=x.shape[1])[..., :L]
    return F.silu(out) if activation else out


def causal_conv1d_shifted(x, weight, bias=None, activation=None):
    """Same result as `causal_conv1d_ref` as W shifted multiply-adds over (B, L, D) memory.

    Mamba's in_proj leaves x as a transposed view of (B, L, D) memory; a depthwise conv over that layout is
    3 vectorised passes (W = 3), while F.conv1d on CPU first transposes and then runs a slow depthwise kernel.
    The output is again (B, D, L) over (B, L, D) memory, the layout the selective scan reads fastest.
    """
    _check_activation(activation)
    L, W = x.shape[-1], weight.shape[-1]
    xp = F.pad(x.transpose(1, 2), (0, 0, W - 1, 0))                       # (B, L + W - 1, D), zeros first
    w = weight.to(x.dtype)
    out = xp[:, W - 1:] * w[:, W - 1] if bias is None else torch.addcmul(bias.to(x.dtype), xp[:, W - 1:], w[:, W - 1])
    for k in range(W - 1):                                                 # tap k reads x_{t - (W - 1 - k)}
        out = torch.addcmul(out, xp[:, k:k + L], w[:, k])
    return (F.silu(out) if activation else out).transpose(1, 2)


_CUDA_CONV = None


def _cuda_conv():
    """The conv for CUDA tensors: our Triton kernel, else causal-conv1d's extension, else the shifted one."""
    global _CUDA_CONV
    if _CUDA_CONV is None:
        from dimscale.ops.selective_scan import triton_ops
        if triton_ops():
            _CUDA_CONV = triton_ops().causal_conv1d_triton
        else:
            try:
                from causal_conv1d import causal_conv1d_fn as ext
                _CUDA_CONV = lambda x, w, b, activation: ext(x, w, b, activation=activation)  # noqa: E731
            except ImportError:
                _CUDA_CONV = causal_conv1d_shifted
    return _CUDA_CONV


def causal_conv1d_fn(x, weight, bias=None, activation=None):
    """On CUDA the Triton kernel (or causal-conv1d's, without triton); on CPU `causal_conv1d_shifted`."""
    return (_cuda_conv() if x.is_cuda else causal_conv1d_shifted)(x, weight, bias, activation)
