"""Selective scan (Mamba-1 S6) on any device: naive reference, fast two-level CPU scan, CUDA dispatch.

Semantics are those of mamba-ssm's `selective_scan_ref` (mamba_ssm/ops/selective_scan_interface.py), for real A:
    delta' = softplus(delta + delta_bias)                       (if delta_softplus)
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t         (ZOH for A, Euler for B; state fp32)
    y_t    = C_t . h_t + D u_t;   out = y * silu(z)
Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) ("variable", as Mamba-1 uses), (B, G, N, L) or
constant (D, N); D, delta_bias (D,). Output has u's dtype; last_state (B, D, N) is fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check(u, delta, A, B, C):
    """Clear errors for shape/dtype mistakes, naming the argument and the expected layout."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective scan: u and delta must both be (batch, d_inner, L); got {tuple(u.shape)} "
                         f"and {tuple(delta.shape)}")
    if A.is_complex():
        raise NotImplementedError("selective scan: complex A is not supported on the pure-PyTorch path; "
                                  "DiM/Mamba-1 use real A = -exp(A_log)")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective scan: A must be (d_inner={u.shape[1]}, d_state); got {tuple(A.shape)}")
    for name, M in (("B", B), ("C", C)):
        if M.dim() not in (2, 3, 4):
            raise ValueError(f"selective scan: {name} must be (D, N), (B, N, L) or (B, G, N, L); got {tuple(M.shape)}")


def _discretize(u, delta, A, B, D, z, delta_bias, delta_softplus):
    """fp32 copies of the inputs with delta bias/softplus applied; B, C broadcast helpers are left to callers."""
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def _expand_BC(M, dim):
    """Variable B/C as (B, D or 1, N, L) fp32; constant (D, N) is returned as is (fp32)."""
    M = M.float()
    if M.dim() == 3:
        return M[:, None]                                        # (B, 1, N, L)
    if M.dim() == 4:
        return M.repeat_interleave(dim // M.shape[1], dim=1)     # groups -> (B, D, N, L)
    return M


def _finish(y, u, D, z, dtype_in):
    """out = (y + D u) * silu(z), cast back to the input dtype (as selective_scan_ref does)."""
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Naive sequential scan, one time step per Python iteration: the ground truth for tests."""
    _check(u, delta, A, B, C)
    dtype_in = u.dtype
    u, delta = _discretize(u, delta, A, B, D, z, delta_bias, delta_softplus)
    A = A.float()
    Bv, Cv = _expand_BC(B, A.shape[0]), _expand_BC(C, A.shape[0])
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))                              # (B, D, L, N)
    if Bv.dim() == 2:
        dBu = torch.einsum("bdl,dn,bdl->bdln", delta, Bv, u)
    else:
        dBu = torch.einsum("bdl,bdnl->bdln", delta * u, Bv.expand(-1, u.shape[1], -1, -1))
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])                                  # (B, D, N) fp32 state
    # unbind instead of mamba-ssm's dA[:, :, i]: same values, but its backward is one stack (O(L)) instead of
    # L full-size zero tensors (O(L^2) memory traffic: 200 s at L=1024 on 2 cores)
    Cs = Cv.expand(-1, u.shape[1], -1, -1).unbind(-1) if Cv.dim() == 4 else None
    ys = []
    for i, (dA_i, dBu_i) in enumerate(zip(dA.unbind(2), dBu.unbind(2))):
        h = dA_i * h + dBu_i
        ys.append(torch.einsum("bdn,dn->bd", h, Cv) if Cs is None else (h * Cs[i]).sum(-1))
    y = torch.stack(ys, dim=2)                                                            # (B, D, L)
    out = _finish(y, u, D, z, dtype_in)
    return (out, h) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# Fast pure-PyTorch path: a two-level linear scan with a hand-written backward
# ------------------------------------------------------------------------------------------------

def _two_level_scan(a, b, chunk, reverse=False):
    """h_t = a_t h_{t-1} + b_t over dim 0 of (L, M) tensors (reversed in time if `reverse`), h_{-1} = 0.

    Level 1 runs every chunk of `chunk` steps in parallel (one Python step per position in a chunk) to get the
    chunk-end states from a zero start; level 2 is a short sequential pass over the chunk boundaries
    (carry_c = P_c carry_{c-1} + s_c, P_c = product of the chunk's a); level 3 replays the chunks from their
    true start states. Only products of a in [0, 1] appear: no exp of positive numbers, no division.
    """
    L, M = a.shape
    nc = -(-L // chunk)
    if nc * chunk != L:  # pad with the identity step (a=1, b=0): it leaves the state unchanged
        a = torch.cat([a, a.new_ones(nc * chunk - L, M)])
        b = torch.cat([b, b.new_zeros(nc * chunk - L, M)])
    a, b = a.view(nc, chunk, M), b.view(nc, chunk, M)
    steps = range(chunk - 1, -1, -1) if reverse else range(chunk)
    chunks = range(nc - 1, -1, -1) if reverse else range(nc)
    s = a.new_zeros(nc, M)                                       # level 1: local chunk-end states (nc, M)
    for t in steps:
        s = torch.addcmul(b[:, t], a[:, t], s)
    P = a.prod(dim=1)                                            # (nc, M) decay across each chunk
    start = torch.empty_like(s)                                  # level 2: true state entering each chunk
    carry = a.new_zeros(M)
    for c in chunks:
        start[c] = carry
        carry = torch.addcmul(s[c], P[c], carry)
    h = torch.empty_like(b)                                      # level 3: replay from the true start states
    prev = start
    for t in steps:
        torch.addcmul(b[:, t], a[:, t], prev, out=h[:, t])
        prev = h[:, t]
    return h.view(nc * chunk, M)[:L]


def _outer_or_mul(x, y, variable):
    """x * y broadcast to (L, B, N, D); a batched outer product (BLAS) when B/C vary with time."""
    return torch.matmul(x, y) if variable else x * y


class _SelectiveScanCore(torch.autograd.Function):
    """y_t = C_t . h_t, h_t = exp(dt_t A) h_{t-1} + xu_t B_t, with a hand-written backward (the adjoint scan
    g_t = dh_t + a_{t+1} g_{t+1}) so autograd never sees the (L, B, N, D) broadcasts.

    Layout is time-major with the channel dim D innermost, (L, B, N, D), so every full-size op is a
    contiguous, vectorised loop over D. dt, xu: (L, B, 1, D); At: (N, D); Bt, Ct: (L, B, N, 1) when
    variable ("matmul" path) or anything broadcastable to (L, B, N, D).
    """

    @staticmethod
    def forward(ctx, dt, xu, At, Bt, Ct, chunk):
        variable = Bt.dim() == 4 and Bt.shape[-1] == 1 and Ct.dim() == 4 and Ct.shape[-1] == 1
        a = torch.exp(dt * At).contiguous()                                     # (L, B, N, D), in (0, 1]
        b = _outer_or_mul(Bt, xu, variable).contiguous()                        # (L, B, N, D)
        L = a.shape[0]
        h = _two_level_scan(a.view(L, -1), b.view(L, -1), chunk).view(a.shape)
        y = torch.matmul(Ct.transpose(-1, -2), h) if variable else (h * Ct).sum(2, keepdim=True)  # (L, B, 1, D)
        ctx.save_for_backward(dt, xu, At, Bt, Ct, a, h)
        ctx.chunk, ctx.variable = chunk, variable
        return y, h[-1]

    @staticmethod
    def backward(ctx, gy, glast):
        dt, xu, At, Bt, Ct, a, h = ctx.saved_tensors
        variable, L = ctx.variable, a.shape[0]
        gy = gy.contiguous()
        gh = _outer_or_mul(Ct, gy, variable).contiguous()                       # (L, B, N, D) dLoss/dh_t, direct
        if glast is not None:
            gh[-1] += glast
        a_next = torch.cat([a[1:], a.new_zeros(1, *a.shape[1:])])               # a_{t+1}; nothing after the end
        g = _two_level_scan(a_next.view(L, -1), gh.view(L, -1), ctx.chunk, reverse=True).view(a.shape)
        del a_next, gh
        if variable:
            dC = torch.matmul(h, gy.transpose(-1, -2))                          # (L, B, N, 1)
            dB = torch.matmul(g, xu.transpose(-1, -2))
            dxu = torch.matmul(Bt.transpose(-1, -2), g)                         # (L, B, 1, D)
        else:
            dC = (h * gy).sum_to_size(Ct.shape)
            dB = (g * xu).sum_to_size(Bt.shape)
            dxu = (g * Bt).sum(2, keepdim=True)
        dlog = torch.empty_like(g)                                              # dLoss/d(dt A) = g_t h_{t-1} a_t
        dlog[0] = 0
        torch.mul(g[1:], h[:-1], out=dlog[1:])
        dlog *= a
        ddt = (dlog * At).sum(2, keepdim=True)                                  # (L, B, 1, D)
        dAt = (dlog * dt).sum((0, 1))                                           # (N, D)
        return ddt, dxu, dAt, dB, dC, None


def default_chunk(L):
    """Chunk length ~ sqrt(L): balances the T in-chunk steps against the L/T boundary steps."""
    return max(4, int(round(math.sqrt(L))))


def _time_major(M, dim):
    """B/C as (L, B, N, 1) (variable), (L, B, N, D) (grouped) or (N, D) (constant), fp32."""
    M = _expand_BC(M, dim)                                      # (B, 1 or D, N, L) or (D, N)
    return M.t().contiguous() if M.dim() == 2 else M.permute(3, 0, 2, 1).contiguous()


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk_size=None):
    """Same result as `selective_scan_ref`, computed with the two-level scan (time-major, fp32)."""
    _check(u, delta, A, B, C)
    dtype_in = u.dtype
    with torch.autocast(device_type=u.device.type, enabled=False):  # the SSM runs in fp32 (Mamba README)
        u, delta = _discretize(u, delta, A, B, D, z, delta_bias, delta_softplus)
        L = u.shape[2]
        dt = delta.permute(2, 0, 1).contiguous().unsqueeze(2)                           # (L, B, 1, D)
        xu = (delta * u).permute(2, 0, 1).contiguous().unsqueeze(2)                      # (L, B, 1, D)
        y, last = _SelectiveScanCore.apply(dt, xu, A.float().t().contiguous(), _time_major(B, A.shape[0]),
                                           _time_major(C, A.shape[0]), chunk_size or default_chunk(L))
        out = _finish(y.squeeze(2).permute(1, 2, 0), u, D, z, dtype_in)               # (B, D, L)
    return (out, last.transpose(1, 2)) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# Dispatch: mamba-ssm's CUDA kernels when present, else the pure-PyTorch paths
# ------------------------------------------------------------------------------------------------

_CUDA_OPS = None


def cuda_kernels():
    """mamba-ssm's (selective_scan_fn, mamba_inner_fn) or None; imported lazily, never on a CPU-only path."""
    global _CUDA_OPS
    if _CUDA_OPS is None:
        try:
            if not torch.cuda.is_available():
                raise ImportError("no CUDA")
            import selective_scan_cuda  # noqa: F401  (mamba-ssm's extension; absent without CUDA)
            from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn as ssf
            _CUDA_OPS = (ssf, mamba_inner_fn)
        except Exception:
            _CUDA_OPS = False
    return _CUDA_OPS or None


def resolve_backend(backend, device):
    """'auto' -> 'cuda' on CUDA tensors with mamba-ssm importable, else 'chunked'; checks explicit choices."""
    if backend not in ("auto", "cuda", "chunked", "ref"):
        raise ValueError(f"scan backend '{backend}' is not one of auto, cuda, chunked, ref")
    is_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "cuda" if is_cuda and cuda_kernels() else "chunked"
    if backend == "cuda" and not (is_cuda and cuda_kernels()):
        raise RuntimeError("scan backend 'cuda' needs CUDA tensors and mamba-ssm (pip install 'dimscale[cuda]'); "
                           "use model.scan_backend=auto or chunked on this machine")
    return backend


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, backend="auto"):
    """Selective scan through the backend chosen by `resolve_backend` (same arguments as mamba-ssm's)."""
    backend = resolve_backend(backend, u.device)
    if backend == "cuda":
        return cuda_kernels()[0](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    fn = selective_scan_ref if backend == "ref" else selective_scan_chunked
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
