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


def _discretize(u, delta, delta_bias, delta_softplus):
    """fp32 u and delta, delta with its bias and softplus applied."""
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
    with torch.autocast(device_type=u.device.type, enabled=False):  # fp32 state and math, as the kernels
        return _selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Body of `selective_scan_ref`, run with autocast off."""
    _check(u, delta, A, B, C)
    dtype_in = u.dtype
    u, delta = _discretize(u, delta, delta_bias, delta_softplus)
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

def _two_level_scan_(a, b, P, chunk, adjoint=False):
    """In place b <- h over dim 0 of contiguous (nc*chunk, M) tensors, every chunk scanned in parallel.

    forward: h_t = a_t h_{t-1} + b_t (h_{-1} = 0); adjoint (reversed time): h_t = b_t + a_{t+1} h_{t+1}.
    Level 1 runs all chunks at once (one Python step per position in a chunk) from a zero state; level 2 is a
    short sequential pass over chunk boundaries (carry = s_c + P_c carry, P_c (nc, M) = the chunk's total decay,
    given by the caller in closed form); level 3 replays the chunks from their true entry states, in place.
    Only products of a in [0, 1] appear: no exp of positive numbers, no division.
    """
    nc, M = a.shape[0] // chunk, a.shape[1]
    a, b = a.view(nc, chunk, M), b.view(nc, chunk, M)
    if adjoint:
        steps, chunks = range(chunk - 1, -1, -1), range(nc - 1, -1, -1)
        edge = torch.cat([a[1:, 0], a.new_zeros(1, M)])          # a_{t+1} across each chunk's end, (nc, M)
        coef = lambda t: edge if t == chunk - 1 else a[:, t + 1]
    else:
        steps, chunks = range(chunk), range(nc)
        coef = lambda t: a[:, t]
    s = None                                                     # level 1: local chunk states from zero
    for t in steps:
        s = b[:, t].clone() if s is None else torch.addcmul(b[:, t], coef(t), s, out=s)
    start = torch.empty_like(s)                                  # level 2: state entering each chunk
    carry = a.new_zeros(M)
    for c in chunks:
        start[c] = carry
        carry = torch.addcmul(s[c], P[c], carry)
    prev = start                                                 # level 3: replay, h written over b
    for t in steps:
        b[:, t].addcmul_(coef(t), prev)
        prev = b[:, t]
    return b.view(nc * chunk, M)


def _pad_time(x, Lp):
    """Zero-pad dim 0 (time) to Lp; tensors without a time dim ((N, D) constants) pass through."""
    if x.dim() < 4 or x.shape[0] == Lp:
        return x
    return torch.cat([x, x.new_zeros(Lp - x.shape[0], *x.shape[1:])])


def _contract(v, x, over, like=None):
    """Sum of v * x over N ('n': v (L, B, N, 1) -> (L, B, 1, D)) or over D ('d': v (L, B, 1, D) -> `like`'s
    shape, (L, B, N, 1) when variable); a read-only batched matmul when v is per time step, else mul + sum."""
    if over == "n":
        if v.dim() == 4 and v.shape[-1] == 1:
            return torch.matmul(v.transpose(-1, -2), x)
        return (x * v).sum(2, keepdim=True)
    if like is not None and len(like) == 4 and like[-1] == 1:
        return torch.matmul(x, v.transpose(-1, -2))
    return (x * v).sum_to_size(like)


class _SelectiveScanCore(torch.autograd.Function):
    """y_t = C_t . h_t, h_t = exp(dt_t A) h_{t-1} + xu_t B_t, with a hand-written backward (the adjoint scan
    g_t = dh_t + a_{t+1} g_{t+1}) so autograd never sees the (L, B, N, D) broadcasts.

    Layout is time-major with the channel dim D innermost, (L, B, N, D), so every full-size op is a
    contiguous, vectorised loop over D. On CPU these ops are bound by writing full-size tensors, so the
    contractions over N or D (y, dB, dC, dxu) are batched matmuls that only read them. dt, xu: (L, B, 1, D);
    At: (N, D); Bt, Ct broadcastable to (L, B, N, D): (L, B, N, 1) variable, (L, B, N, D) grouped, (N, D) constant.
    Time is zero-padded to a multiple of the chunk (dt = 0 gives a = 1, xu = 0 gives b = 0: identity steps).
    """

    @staticmethod
    def forward(ctx, dt, xu, At, Bt, Ct, chunk):
        L = dt.shape[0]
        Lp = -(-L // chunk) * chunk
        dt, xu, Bt, Ct = (_pad_time(x, Lp) for x in (dt, xu, Bt, Ct))
        a = (dt * At).contiguous().exp_()                                       # (Lp, B, N, D), in (0, 1]
        b = (Bt * xu).contiguous()                                              # (Lp, B, N, D)
        P = torch.exp(dt.view(Lp // chunk, chunk, *dt.shape[1:]).sum(1) * At)   # chunk decay, exp(A sum dt)
        h = _two_level_scan_(a.view(Lp, -1), b.view(Lp, -1), P.reshape(Lp // chunk, -1), chunk).view(a.shape)
        y = _contract(Ct, h, "n")                                               # (Lp, B, 1, D)
        ctx.save_for_backward(dt, xu, At, Bt, Ct, a, h)
        ctx.chunk, ctx.L = chunk, L
        return y[:L], h[L - 1]

    @staticmethod
    def backward(ctx, gy, glast):
        dt, xu, At, Bt, Ct, a, h = ctx.saved_tensors
        L, chunk = ctx.L, ctx.chunk
        Lp, nc = a.shape[0], a.shape[0] // chunk
        gy = _pad_time(gy.contiguous(), Lp)
        g = (Ct * gy).contiguous()                                              # (Lp, B, N, D) direct dLoss/dh_t
        if glast is not None:
            g[L - 1] += glast
        # adjoint chunk decay: a_{t+1} for t = 0..chunk-1 of chunk c = exp(A sum_{t=1..chunk-1} dt) * a_{c+1, 0}
        inner = torch.exp(dt.view(nc, chunk, *dt.shape[1:])[:, 1:].sum(1) * At)                  # (nc, B, N, D)
        edge = torch.cat([a.view(nc, chunk, *a.shape[1:])[1:, 0], a.new_zeros(1, *a.shape[1:])])
        g = _two_level_scan_(a.view(Lp, -1), g.view(Lp, -1), (inner * edge).reshape(nc, -1), chunk,
                             adjoint=True).view(a.shape)                        # g_t = dLoss/dh_t, total
        dC, dB = _contract(gy, h, "d", Ct.shape), _contract(xu, g, "d", Bt.shape)  # (Lp, B, N, 1) if variable
        dxu = _contract(Bt, g, "n")                                             # (Lp, B, 1, D)
        g[1:] *= h[:-1]                                                         # dLoss/d(dt A) = g_t h_{t-1} a_t
        g[0] = 0
        g *= a
        ddt = sum(g[:, :, n:n + 1] * At[n] for n in range(At.shape[0]))         # (Lp, B, 1, D), sum over N
        dAt = (g * dt).sum((0, 1))                                              # (N, D)
        cut = lambda x: x[:L] if x.dim() == 4 and x.shape[0] == Lp else x
        return cut(ddt), cut(dxu), dAt, cut(dB), cut(dC), None


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
        u, delta = _discretize(u, delta, delta_bias, delta_softplus)
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
