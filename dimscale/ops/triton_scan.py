"""Triton kernels for CUDA (and Triton's CPU interpreter, TRITON_INTERPRET=1): the Mamba-1 selective scan forward
and backward, and the depthwise causal conv1d, as `torch.library` custom ops (compile-ready, no graph breaks).

Scan semantics are those of `selective_scan_ref` (selective_scan.py) for real A and variable B, C (B, N, L):
one program owns a batch row and BD channels (the lanes) and walks the sequence in chunks of T steps. Inside a
chunk the recurrence h_t = a_t h_{t-1} + b_t is a `tl.associative_scan` of affine maps over (BD, N, T) in
registers; the state entering each chunk is saved (B, K+1, D, N), the last slot being the final state. The
backward recomputes each chunk from its entering state (as mamba-ssm's CUDA kernel and our C kernel do), runs
the adjoint g_t = C_t gy_t + a_{t+1} g_{t+1} as a reverse scan, and reduces all gradients in the same pass.
TRITON_INTERPRET must be set before this module is imported: `triton.jit` reads it when the kernels are defined.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from dimscale.ops.library import register_scan_autograd

BD, T = 8, 16             # channels per program, time steps per chunk (GPU); (BD * N * T) fp32 live per tensor
BD_CONV, T_CONV = 32, 64  # channels and time steps per causal-conv program


@triton.jit
def _affine(a1, b1, a2, b2):
    """Compose h -> a1 h + b1, then h -> a2 h + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))   # torch's threshold 20


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_bdl(ptr, b, d, t, sb, sd, sl, mask):
    """(BD, T) fp32 tile of a (B, D, L) tensor with strides (sb, sd, sl)."""
    return tl.load(ptr + b * sb + d[:, None] * sd + t[None, :] * sl, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk(u_ptr, dt_ptr, bias_ptr, A, B_ptr, C_ptr, b, d, n, t, dm, nm, L, s_u, s_dt, s_bc, HAS_BIAS: tl.constexpr,
           SOFTPLUS: tl.constexpr):
    """One chunk's inputs: u, raw delta (+ bias), dt (BD, T), B_t, C_t (N, T), decays a and inputs x (BD, N, T)."""
    m2 = dm[:, None] & (t < L)[None, :]
    u = _load_bdl(u_ptr, b, d, t, s_u[0], s_u[1], s_u[2], m2)
    raw = _load_bdl(dt_ptr, b, d, t, s_dt[0], s_dt[1], s_dt[2], m2)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)[:, None]
    dt = _softplus(raw) if SOFTPLUS else raw
    dt = tl.where(m2, dt, 0.0)                                   # padded steps: a = 1, x = 0 (state carried)
    mn = nm[:, None] & (t < L)[None, :]
    off = b * s_bc[0] + n[:, None] * s_bc[1] + t[None, :] * s_bc[2]
    Bt = tl.load(B_ptr + off, mask=mn, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + off, mask=mn, other=0.0).to(tl.float32)
    a = tl.exp(dt[:, None, :] * A[:, :, None])
    x = (dt * u)[:, None, :] * Bt[None, :, :]
    return u, raw, dt, Bt, Ct, a, x, m2


@triton.jit
def _scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, st_ptr,
                     L, Dm, N, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
                     sbc_b, sbc_n, sbc_l, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    b, pd = tl.program_id(0), tl.program_id(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    n, j = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_T)
    dm, nm = d < Dm, n < N
    mdn = dm[:, None] & nm[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mdn, other=0.0)            # (BD, BN) fp32
    Dv = tl.load(D_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_D else 0.0
    K = tl.cdiv(L, BLOCK_T)
    st = st_ptr + b * (K + 1) * Dm * N + d[:, None] * N + n[None, :]                 # states (B, K+1, D, N)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for k in range(0, K):
        tl.store(st + k * Dm * N, h, mask=mdn)
        t = k * BLOCK_T + j
        u, raw, dt, Bt, Ct, a, x, m2 = _chunk(u_ptr, dt_ptr, bias_ptr, A, B_ptr, C_ptr, b, d, n, t, dm, nm, L,
                                              (su_b, su_d, su_l), (sdt_b, sdt_d, sdt_l), (sbc_b, sbc_n, sbc_l),
                                              HAS_BIAS, SOFTPLUS)
        pa, pb = tl.associative_scan((a, x), 2, _affine)
        H = pb + pa * h[:, :, None]                                                   # (BD, BN, T) states
        y = tl.sum(H * Ct[None, :, :], axis=1) + Dv[:, None] * u if HAS_D else tl.sum(H * Ct[None, :, :], axis=1)
        if HAS_Z:
            z = _load_bdl(z_ptr, b, d, t, sz_b, sz_d, sz_l, m2)
            y = y * z * _sigmoid(z)
        tl.store(out_ptr + b * so_b + d[:, None] * so_d + t[None, :] * so_l,
                 y.to(out_ptr.dtype.element_ty), mask=m2)
        h = tl.sum(tl.where(j[None, None, :] == BLOCK_T - 1, H, 0.0), axis=2)         # state after the chunk
    tl.store(st + K * Dm * N, h, mask=mdn)


@triton.jit
def _scan_bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, st_ptr, go_ptr, gl_ptr,
                     gu_ptr, gdt_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,
                     L, Dm, N, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sg_b, sg_d, sg_l,
                     sr_b, sr_d, sr_l, sbc_b, sbc_n, sbc_l, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_GLAST: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Gradients: du, ddelta, dz (B, D, L) with strides sr; dA, dD, dbias per batch row (B, D, N), (B, D), (B, D);
    dB, dC per channel block (n_blocks, B, N, L); the caller sums the partials."""
    b, pd = tl.program_id(0), tl.program_id(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    n, j = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_T)
    dm, nm = d < Dm, n < N
    mdn = dm[:, None] & nm[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mdn, other=0.0)
    Dv = tl.load(D_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    K = tl.cdiv(L, BLOCK_T)
    st = st_ptr + b * (K + 1) * Dm * N + d[:, None] * N + n[None, :]
    carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)   # dL/dh at the chunk's end, from later steps
    if HAS_GLAST:
        carry = tl.load(gl_ptr + b * Dm * N + d[:, None] * N + n[None, :], mask=mdn, other=0.0)
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for kk in range(0, K):
        k = K - 1 - kk
        t = k * BLOCK_T + j
        h0 = tl.load(st + k * Dm * N, mask=mdn, other=0.0)
        u, raw, dt, Bt, Ct, a, x, m2 = _chunk(u_ptr, dt_ptr, bias_ptr, A, B_ptr, C_ptr, b, d, n, t, dm, nm, L,
                                              (su_b, su_d, su_l), (sdt_b, sdt_d, sdt_l), (sbc_b, sbc_n, sbc_l),
                                              HAS_BIAS, SOFTPLUS)
        pa, pb = tl.associative_scan((a, x), 2, _affine)
        H = pb + pa * h0[:, :, None]                                                  # recomputed states
        gy = _load_bdl(go_ptr, b, d, t, sg_b, sg_d, sg_l, m2)
        if HAS_Z:                                                                     # out = y silu(z)
            y = tl.sum(H * Ct[None, :, :], axis=1) + Dv[:, None] * u if HAS_D else tl.sum(H * Ct[None, :, :], 1)
            z = _load_bdl(z_ptr, b, d, t, sz_b, sz_d, sz_l, m2)
            sz = _sigmoid(z)
            tl.store(gz_ptr + b * sr_b + d[:, None] * sr_d + t[None, :] * sr_l,
                     (gy * y * sz * (1.0 + z * (1.0 - sz))).to(gz_ptr.dtype.element_ty), mask=m2)
            gy = gy * z * sz
        # decay of the next step, a_{t+1}; 1 at the chunk's last step (the carry enters there) and past L
        nxt = (j < BLOCK_T - 1) & (t + 1 < L)
        raw_n = _load_bdl(dt_ptr, b, d, t + 1, sdt_b, sdt_d, sdt_l, dm[:, None] & nxt[None, :]) + bias[:, None] \
            if HAS_BIAS else _load_bdl(dt_ptr, b, d, t + 1, sdt_b, sdt_d, sdt_l, dm[:, None] & nxt[None, :])
        dt_n = _softplus(raw_n) if SOFTPLUS else raw_n
        alpha = tl.where(nxt[None, None, :], tl.exp(dt_n[:, None, :] * A[:, :, None]), 1.0)
        ga, gs = tl.associative_scan((alpha, Ct[None, :, :] * gy[:, None, :]), 2, _affine, reverse=True)
        G = gs + ga * carry[:, :, None]                                               # dL/dh_t (BD, BN, T)
        carry = tl.sum(tl.where(j[None, None, :] == 0, a * G, 0.0), axis=2)           # into the previous chunk
        X = G * (H - x)                                                               # dL/d(dt A) = g a h_{t-1}
        gA += tl.sum(X * dt[:, None, :], axis=2)
        gxu = tl.sum(G * Bt[None, :, :], axis=1)                                      # dL/d(dt u) (BD, T)
        gdt = tl.sum(X * A[:, :, None], axis=1) + gxu * u
        gu = gxu * dt + gy * Dv[:, None] if HAS_D else gxu * dt
        if SOFTPLUS:
            gdt = gdt * _sigmoid(raw)                                                 # softplus' = sigmoid
        gdt = tl.where(m2, gdt, 0.0)
        gbias += tl.sum(gdt, axis=1)
        gD += tl.sum(gy * u, axis=1)
        off = b * sr_b + d[:, None] * sr_d + t[None, :] * sr_l
        tl.store(gu_ptr + off, gu.to(gu_ptr.dtype.element_ty), mask=m2)
        tl.store(gdt_ptr + off, gdt.to(gdt_ptr.dtype.element_ty), mask=m2)
        mn = nm[:, None] & (t < L)[None, :]
        part = ((pd * tl.num_programs(0) + b) * N + n[:, None]) * L + t[None, :]       # (n_blocks, B, N, L)
        tl.store(gB_ptr + part, tl.sum(G * (dt * u)[:, None, :], axis=0), mask=mn)
        tl.store(gC_ptr + part, tl.sum(H * gy[:, None, :], axis=0), mask=mn)
    tl.store(gA_ptr + b * Dm * N + d[:, None] * N + n[None, :], gA, mask=mdn)
    if HAS_D:
        tl.store(gD_ptr + b * Dm + d, gD, mask=dm)
    if HAS_BIAS:
        tl.store(gbias_ptr + b * Dm + d, gbias, mask=dm)


def _blocks(N, chunk):
    """Block sizes: powers of two; `chunk` (a power of two) is the time block."""
    if chunk & (chunk - 1):
        raise ValueError(f"triton scan: chunk {chunk} must be a power of two")
    return dict(BLOCK_D=BD, BLOCK_N=triton.next_power_of_2(N), BLOCK_T=chunk)


def _empty_bdl(u, dtype=None):
    """(B, D, L) buffer over (B, L, D) memory, the layout Mamba's out_proj reads."""
    return u.new_empty(u.shape[0], u.shape[2], u.shape[1], dtype=dtype or u.dtype).transpose(1, 2)


@torch.library.custom_op("dimscale::scan_triton_fwd", mutates_args=())
def scan_triton_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: Optional[torch.Tensor], z: Optional[torch.Tensor], bias: Optional[torch.Tensor], softplus: bool,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, D, L) in u's dtype and the state entering every chunk plus the last (B, K+1, D, N) fp32.
    u, delta, z (B, D, L) any strides; A (D, N) fp32; B, C (B, N, L); D, bias (D,) fp32."""
    batch, Dm, L = u.shape
    N = A.shape[1]
    out, states = _scan_triton_fwd_fake(u, delta, A, B, C, D, z, bias, softplus, chunk)
    zz, blk, A = z if z is not None else u, _blocks(N, chunk), A.contiguous()
    _scan_fwd_kernel[(batch, triton.cdiv(Dm, blk["BLOCK_D"]))](
        u, delta, A, B, C, D if D is not None else A, zz, bias if bias is not None else A, out, states,
        L, Dm, N, *u.stride(), *delta.stride(), *zz.stride(), *out.stride(), *B.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus, **blk)
    return out, states


@scan_triton_fwd.register_fake
def _scan_triton_fwd_fake(u, delta, A, B, C, D, z, bias, softplus, chunk):
    if B.stride() != C.stride():
        raise ValueError("triton scan: B and C must have the same strides")
    n_chunks = -(-u.shape[2] // chunk)
    return _empty_bdl(u), u.new_empty(u.shape[0], n_chunks + 1, u.shape[1], A.shape[1], dtype=torch.float32)


@torch.library.custom_op("dimscale::scan_triton_bwd", mutates_args=())
def scan_triton_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: Optional[torch.Tensor], z: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    states: torch.Tensor, gout: torch.Tensor, glast: Optional[torch.Tensor], softplus: bool,
                    chunk: int) -> list[torch.Tensor]:
    """[du, ddelta, dA, dB, dC, dD, dz, dbias]; the entries for absent D, z, bias are empty tensors."""
    batch, Dm, L = u.shape
    N = A.shape[1]
    blk = _blocks(N, chunk)
    n_blocks = triton.cdiv(Dm, blk["BLOCK_D"])
    gu, gdelta = _empty_bdl(u), _empty_bdl(u, delta.dtype)
    gz = _empty_bdl(u, z.dtype) if z is not None else gu
    f32 = dict(dtype=torch.float32, device=u.device)
    gA = torch.empty(batch, Dm, N, **f32)
    gB, gC = torch.empty(n_blocks, batch, N, L, **f32), torch.empty(n_blocks, batch, N, L, **f32)
    gD, gbias = torch.zeros(batch, Dm, **f32), torch.zeros(batch, Dm, **f32)
    zz, A = z if z is not None else u, A.contiguous()
    _scan_bwd_kernel[(batch, n_blocks)](
        u, delta, A, B, C, D if D is not None else A, zz, bias if bias is not None else A,
        states.contiguous(), gout, glast.contiguous() if glast is not None else A, gu, gdelta, gz,
        gA, gB, gC, gD, gbias, L, Dm, N, *u.stride(), *delta.stride(), *zz.stride(), *gout.stride(),
        *gu.stride(), *B.stride(), HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
        HAS_GLAST=glast is not None, SOFTPLUS=softplus, **blk)
    return [gu, gdelta, gA.sum(0).to(A.dtype), gB.sum(0).to(B.dtype), gC.sum(0).to(C.dtype),
            gD.sum(0).to(D.dtype) if D is not None else u.new_empty(0), gz if z is not None else u.new_empty(0),
            gbias.sum(0).to(bias.dtype) if bias is not None else u.new_empty(0)]


@scan_triton_bwd.register_fake
def _(u, delta, A, B, C, D, z, bias, states, gout, glast, softplus, chunk):
    new = lambda x: x.new_empty(x.shape) if x is not None else u.new_empty(0)  # noqa: E731  (as the sums)
    return [_empty_bdl(u), _empty_bdl(u, delta.dtype), new(A), new(B), new(C), new(D),
            _empty_bdl(u, z.dtype) if z is not None else u.new_empty(0), new(bias)]


register_scan_autograd(scan_triton_fwd, scan_triton_bwd)


def supports(u, A, B, C) -> bool:
    """The kernel's case: real A, variable ungrouped B and C (B, N, L), as Mamba-1 and DiM use."""
    return not A.is_complex() and A.dim() == 2 and B.dim() == 3 and C.dim() == 3


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, chunk=T):
    """Same result as `selective_scan_ref` for `supports(...)` inputs, through the Triton kernels."""
    if not supports(u, A, B, C):
        raise ValueError("the triton scan takes real (d_inner, d_state) A and (batch, d_state, L) B and C; got "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}; use selective_scan_fn, which falls back")
    vec = lambda x: None if x is None else x.float().contiguous()  # noqa: E731
    with torch.autocast(device_type=u.device.type, enabled=False):  # the SSM runs in fp32 (Mamba README)
        out, states = scan_triton_fwd(u, delta, A.float().contiguous(), B, C.expand_as(B), vec(D), z,
                                      vec(delta_bias), bool(delta_softplus), chunk)
    return (out, states[:, -1]) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# Depthwise causal conv1d (Mamba's short convolution, width W), optional SiLU: forward and backward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _conv_pre(x_ptr, w_ptr, b_ptr, b, d, t, dm, L, sx_b, sx_d, sx_l, W: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pre-activation sum_k w_k x_{t-W+1+k} (+ bias) at times t, (BD, BT) fp32; zero where t is outside [0, L)."""
    acc = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(W):
        src = t - (W - 1 - k)
        xk = _load_bdl(x_ptr, b, d, src, sx_b, sx_d, sx_l, dm[:, None] & ((src >= 0) & (src < L))[None, :])
        acc += tl.load(w_ptr + d * W + k, mask=dm, other=0.0).to(tl.float32)[:, None] * xk
    return tl.where(((t >= 0) & (t < L))[None, :], acc, 0.0)


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, L, Dm, sx_b, sx_d, sx_l, so_b, so_d, so_l, W: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    b, pd, pt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d, t = pd * BLOCK_D + tl.arange(0, BLOCK_D), pt * BLOCK_T + tl.arange(0, BLOCK_T)
    dm = d < Dm
    y = _conv_pre(x_ptr, w_ptr, b_ptr, b, d, t, dm, L, sx_b, sx_d, sx_l, W, HAS_BIAS, BLOCK_D, BLOCK_T)
    if SILU:
        y = y * _sigmoid(y)
    tl.store(out_ptr + b * so_b + d[:, None] * so_d + t[None, :] * so_l, y.to(out_ptr.dtype.element_ty),
             mask=dm[:, None] & (t < L)[None, :])


@triton.jit
def _conv_grad_pre(x_ptr, w_ptr, b_ptr, g_ptr, b, d, t, dm, L, sx_b, sx_d, sx_l, sg_b, sg_d, sg_l,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """dL/d(pre-activation) at times t (BD, BT); zero outside [0, L)."""
    g = _load_bdl(g_ptr, b, d, t, sg_b, sg_d, sg_l, dm[:, None] & ((t >= 0) & (t < L))[None, :])
    if SILU:
        p = _conv_pre(x_ptr, w_ptr, b_ptr, b, d, t, dm, L, sx_b, sx_d, sx_l, W, HAS_BIAS, BLOCK_D, BLOCK_T)
        s = _sigmoid(p)
        g = g * s * (1.0 + p * (1.0 - s))                                   # silu'
    return g


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, g_ptr, gx_ptr, gw_ptr, gb_ptr, L, Dm, sx_b, sx_d, sx_l, sg_b, sg_d, sg_l,
                     sr_b, sr_d, sr_l, W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """dx (strides sr); dw (B, n_tblocks, D, W) and dbias (B, n_tblocks, D) partials, summed by the caller."""
    b, pd, pt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d, t = pd * BLOCK_D + tl.arange(0, BLOCK_D), pt * BLOCK_T + tl.arange(0, BLOCK_T)
    dm = d < Dm
    gx = tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
    for k in tl.static_range(W):                                             # x_t feeds out_{t + W-1-k} via w_k
        gp = _conv_grad_pre(x_ptr, w_ptr, b_ptr, g_ptr, b, d, t + (W - 1 - k), dm, L, sx_b, sx_d, sx_l, sg_b, sg_d,
                            sg_l, W, HAS_BIAS, SILU, BLOCK_D, BLOCK_T)
        gx += tl.load(w_ptr + d * W + k, mask=dm, other=0.0).to(tl.float32)[:, None] * gp
    tm = dm[:, None] & (t < L)[None, :]
    tl.store(gx_ptr + b * sr_b + d[:, None] * sr_d + t[None, :] * sr_l, gx.to(gx_ptr.dtype.element_ty), mask=tm)
    gp = _conv_grad_pre(x_ptr, w_ptr, b_ptr, g_ptr, b, d, t, dm, L, sx_b, sx_d, sx_l, sg_b, sg_d, sg_l, W, HAS_BIAS,
                        SILU, BLOCK_D, BLOCK_T)
    part = (b * tl.num_programs(2) + pt) * Dm + d
    for k in tl.static_range(W):
        src = t - (W - 1 - k)
        xk = _load_bdl(x_ptr, b, d, src, sx_b, sx_d, sx_l, dm[:, None] & ((src >= 0) & (src < L))[None, :])
        tl.store(gw_ptr + part * W + k, tl.sum(gp * xk, axis=1), mask=dm)
    if HAS_BIAS:
        tl.store(gb_ptr + part, tl.sum(gp, axis=1), mask=dm)


def _conv_grid(x, block_t):
    return (x.shape[0], triton.cdiv(x.shape[1], BD_CONV), triton.cdiv(x.shape[2], block_t))


@torch.library.custom_op("dimscale::causal_conv1d_triton_fwd", mutates_args=())
def causal_conv1d_triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
                             block_t: int) -> torch.Tensor:
    """x (B, D, L) any strides, weight (D, W), bias (D,) -> (B, D, L) in x's dtype over (B, L, D) memory."""
    out, w = _empty_bdl(x), weight.contiguous()
    _conv_fwd_kernel[_conv_grid(x, block_t)](x, w, bias if bias is not None else w, out, x.shape[2], x.shape[1],
                                             *x.stride(), *out.stride(), W=w.shape[1], HAS_BIAS=bias is not None,
                                             SILU=silu, BLOCK_D=BD_CONV, BLOCK_T=block_t)
    return out


@causal_conv1d_triton_fwd.register_fake
def _(x, weight, bias, silu, block_t):
    return _empty_bdl(x)


@torch.library.custom_op("dimscale::causal_conv1d_triton_bwd", mutates_args=())
def causal_conv1d_triton_bwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gout: torch.Tensor,
                             silu: bool, block_t: int) -> list[torch.Tensor]:
    """[dx, dweight, dbias] (dbias empty without a bias)."""
    grid, w = _conv_grid(x, block_t), weight.contiguous()
    gx = _empty_bdl(x)
    gw = torch.empty(x.shape[0], grid[2], x.shape[1], w.shape[1], dtype=torch.float32, device=x.device)
    gb = torch.empty(x.shape[0], grid[2], x.shape[1], dtype=torch.float32, device=x.device)
    _conv_bwd_kernel[grid](x, w, bias if bias is not None else w, gout, gx, gw, gb, x.shape[2], x.shape[1],
                           *x.stride(), *gout.stride(), *gx.stride(), W=w.shape[1], HAS_BIAS=bias is not None,
                           SILU=silu, BLOCK_D=BD_CONV, BLOCK_T=block_t)
    return [gx, gw.sum((0, 1)).to(weight.dtype), gb.sum((0, 1)).to(bias.dtype) if bias is not None else gx.new_empty(0)]


@causal_conv1d_triton_bwd.register_fake
def _(x, weight, bias, gout, silu, block_t):
    return [_empty_bdl(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape) if bias is not None
            else x.new_empty(0)]


def _conv_setup(ctx, inputs, output):
    x, weight, bias, silu, block_t = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.block_t = silu, block_t


def _conv_backward(ctx, gout):
    x, weight, bias = ctx.saved_tensors
    gx, gw, gb = causal_conv1d_triton_bwd(x, weight, bias, gout, ctx.silu, ctx.block_t)
    return gx, gw, gb if bias is not None else None, None, None


causal_conv1d_triton_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


def causal_conv1d_triton(x, weight, bias=None, activation=None, block_t=T_CONV):
    """Same result as `causal_conv1d_ref` (x (B, D, L), weight (D, W), bias (D,)) through the Triton kernels."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    return causal_conv1d_triton_fwd(x, weight, bias, activation is not None, block_t)
