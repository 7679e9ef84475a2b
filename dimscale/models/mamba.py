"""Mamba-1 mixer with mamba-ssm's parameter names (mamba_ssm/modules/mamba_simple.py `Mamba`), so a state dict
moves unchanged between this pure-PyTorch path and mamba-ssm's fused CUDA path (docs/reference.md §1.6, §1.9)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dimscale.ops import causal_conv1d_fn, cuda_kernels, resolve_backend, selective_scan_fn, triton_ops


class Mamba(nn.Module):
    """Selective SSM block: in_proj -> causal conv + SiLU -> x_proj (dt, B, C) -> scan, gated by SiLU(z) -> out_proj."""

    def __init__(self, d_model, d_state=16, d_conv=3, expand=2, dt_rank="auto", dt_min=1e-3, dt_max=0.1,
                 dt_init_floor=1e-4, conv_bias=True, bias=False, scan_backend="auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.A_log._no_weight_decay = True  # mamba-ssm's marks (the official recipe ignores them, docs/reference.md §3.2)
        self.D._no_weight_decay = True
        self.dt_init_range = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba init (docs/reference.md §1.9): dt_proj.weight ~ U(+-dt_rank^-0.5), softplus(dt_proj.bias) log-uniform in
        [dt_min, dt_max], A = -[1..N] per channel (S4D-real), D = 1."""
        dt_min, dt_max, floor = self.dt_init_range
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D.fill_(1.0)

    def forward(self, hidden):
        """(B, L, d_model) -> (B, L, d_model)."""
        xz = self.in_proj(hidden).transpose(1, 2)                                   # (B, 2*d_inner, L)
        A = -torch.exp(self.A_log.float())                                          # (d_inner, N), fp32
        backend = resolve_backend(self.scan_backend, hidden.device)
        if backend == "cuda":                                                       # fused mamba-ssm kernel
            _, mamba_inner_fn = cuda_kernels()
            return mamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                  self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, A, None, None,
                                  self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        x, z = xz.chunk(2, dim=1)                                                   # (B, d_inner, L) each
        conv = triton_ops().causal_conv1d_triton if backend == "triton" else causal_conv1d_fn  # custom ops: compile
        x = conv(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        x_dbl = self.x_proj(x.transpose(1, 2))                                      # (B, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)                      # (B, d_inner, L), bias in scan
        y = selective_scan_fn(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True, backend=backend)
        return self.out_proj(y.transpose(1, 2))                                     # y has x's dtype
