"""Sequence-mixing kernels: selective scan (Mamba-1) and causal conv1d; a compiled C scan and pure PyTorch on CPU,
Triton kernels or mamba-ssm on CUDA."""
from dimscale.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_shifted
from dimscale.ops.scan_cpu import selective_scan_cpu
from dimscale.ops.selective_scan import (SCAN_BACKENDS, cuda_kernels, default_chunk, resolve_backend,
                                         selective_scan_chunked, selective_scan_fn, selective_scan_ref, triton_ops)

__all__ = ["SCAN_BACKENDS", "causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_shifted", "cuda_kernels",
           "default_chunk", "resolve_backend", "selective_scan_chunked", "selective_scan_cpu", "selective_scan_fn",
           "selective_scan_ref", "triton_ops"]
