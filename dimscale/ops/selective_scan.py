"""Selective scan (Mamba-1 S6) on any device: naive reference, pure-PyTorch blocked scan, dispatch to the
compiled CPU kernel (`scan_cpu`) and to mamba-ssm's CUDA kernels.

Semantics are those of mamba-ssm's `selective_scan_ref` (mamba_ssm/ops/selective_scan_interface.py), for real A:
    delta' = softplus(delta + delta_bias)                       (if delta_softplus)
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t         (ZOH for A, Euler for B; state fp32)
    y_t    = C_t . h_t + D u_t;   out = y * silu(z)
Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) ("variable", as Mamba-1 uses), (B, G, N, L) or
constant (D, N); D, delta_bias (D,). Output has u's dtype; last_state (B, D, N) is fp32.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from dimscale.ops import scan_cpu


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
# Fast pure-PyTorch path: a cache-blocked sequential scan with a hand-written, recomputing backward
# ------------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


def default_chunk(step_numel):
    """Time steps per block: one (T, B, N, D) fp32 block of ~1 MiB, about the L2 cache of one core."""
    return max(1, (1 << 18) // step_numel)


def _rows(M, s, e):
    """Time steps s:e of a time-major tensor; a constant (N, D) B or C is the same for every block."""
    return M if M.dim() == 2 else M[s:e]


def _steps(x, s, e):
    """Time steps s:e of a (B, D, L) tensor as a (T, B, 1, D) view; rows of D are contiguous (`_channels_last`)."""
    return x[:, :, s:e].permute(2, 0, 1).unsqueeze(2)


def _load(x, s, e):
    """Time steps s:e of a (B, D, L) tensor as a new contiguous fp32 (T, B, 1, D) block (row copies, no transpose)."""
    return x.new_empty(e - s, x.shape[0], 1, x.shape[1], dtype=torch.float32).copy_(_steps(x, s, e))


def _channels_last(x):
    """(B, D, L) with D contiguous in memory, as Mamba's in_proj makes it; others are transposed once, since a
    transposing copy costs ~5-10x a plain one on CPU."""
    return x if x is None or x.stride(1) == 1 else x.transpose(1, 2).contiguous().transpose(1, 2)


def _contract(v, x, over, like=None):
    """Sum of v * x over N ('n': v (T, B, N, 1) -> (T, B, 1, D)) or over D ('d': v (T, B, 1, D) -> `like`'s
    shape, (T, B, N, 1) when variable); batched matrix products that only read x when v varies per step."""
    T, batch, N, D = x.shape
    if over == "n":
        if v.dim() == 4 and v.shape[-1] == 1:
            return torch.bmm(v.reshape(T * batch, 1, N), x.view(T * batch, N, D)).view(T, batch, 1, D)
        return (x * v).sum(2, keepdim=True)
    if len(like) == 4 and like[-1] == 1:
        return torch.matmul(x, v.transpose(-1, -2))
    return (x * v).sum_to_size(like)


class _Block:
    """One block of T time steps, recomputed from the inputs: dt, u, dt*u (T, B, 1, D); decays a and states H
    (T, B, N, D) from the state h0 entering the block (docs/reference.md §1.6: ZOH for A, Euler for B).
    Blocks are contiguous: ops on contiguous operands are 2-10x faster than on strided views."""

    def __init__(self, s, e, u, delta, At2, Bt, bias, softplus, h0, a, H):
        self.raw = _load(delta, s, e)
        if bias is not None:
            self.raw += bias
        self.dt = F.softplus(self.raw) if softplus else self.raw
        self.u = _load(u, s, e)
        self.xu = self.dt * self.u
        self.a, self.H = a, H
        torch.mul(self.dt, At2, out=a).exp2_()                 # exp(dt A) as exp2(dt A log2 e): half the CPU time
        torch.mul(_rows(Bt, s, e), self.xu, out=H)             # b_t = B_t dt_t u_t
        prev = h0
        for a_t, h_t in zip(a.unbind(0), H.unbind(0)):         # h_t = a_t h_{t-1} + b_t: T in-cache steps
            h_t.addcmul_(a_t, prev)
            prev = h_t

    def y(self, Ck, Dv):
        """C_t . h_t + D u_t (T, B, 1, D): the scan output before the z gate."""
        y = _contract(Ck, self.H, "n")
        return y if Dv is None else y.addcmul_(self.u, Dv)


class _SelectiveScan(torch.autograd.Function):
    """The whole selective scan (softplus, scan, D skip, z gate) in blocks of T time steps.

    States are time-major (T, B, N, D), D innermost, so each of a block's T steps is one vectorised op over
    B*N*D, and a block's tensors (~1 MiB) stay in cache. Nothing of size (L, B, N, D) is materialised: only
    the state entering each block is kept, and the backward recomputes every block from it (as mamba-ssm's
    CUDA kernel does), runs the adjoint scan g_{t-1} += a_t g_t backwards through the block, and reduces it
    into all gradients at once. u, delta, z: (B, D, L) over (B, L, D) memory (`_channels_last`); At: (N, D)
    fp32; Bt, Ct broadcastable to (L, B, N, D): (L, B, N, 1) variable, (L, B, N, D) grouped, (N, D) constant.
    """

    @staticmethod
    def forward(ctx, u, delta, At, Bt, Ct, Dv, z, bias, softplus, chunk):
        batch, D, L = u.shape
        T, N = min(chunk, L), At.shape[0]
        n_blocks = -(-L // T)
        At2 = At * LOG2E
        a_buf, H_buf = (u.new_empty(T, batch, N, D, dtype=torch.float32) for _ in range(2))
        starts = a_buf.new_empty(n_blocks + 1, batch, N, D)   # state entering each block; the last = final state
        starts[0].zero_()
        out = a_buf.new_empty(batch, L, D).transpose(1, 2)    # (B, D, L) over (B, L, D) memory: rows per step
        for k in range(n_blocks):
            s, e = k * T, min(L, k * T + T)
            blk = _Block(s, e, u, delta, At2, Bt, bias, softplus, starts[k], a_buf[:e - s], H_buf[:e - s])
            starts[k + 1].copy_(blk.H[-1])
            y = blk.y(_rows(Ct, s, e), Dv)
            if z is not None:
                y.mul_(F.silu(_load(z, s, e)))
            _steps(out, s, e).copy_(y)
        ctx.save_for_backward(u, delta, At, Bt, Ct, Dv, z, bias, starts)
        ctx.softplus, ctx.chunk = softplus, T
        return out, starts[-1].clone()

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, At, Bt, Ct, Dv, z, bias, starts = ctx.saved_tensors
        T, (batch, D, L), N = ctx.chunk, u.shape, At.shape[0]
        At2, gout = At * LOG2E, _channels_last(gout)
        a_buf, H_buf, G_buf = (u.new_empty(T, batch, N, D, dtype=torch.float32) for _ in range(3))
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dAt, dB, dC = torch.zeros_like(At), torch.zeros_like(Bt), torch.zeros_like(Ct)
        dD = torch.zeros_like(Dv) if Dv is not None else None
        dbias = torch.zeros_like(bias) if bias is not None else None
        carry = glast                                          # dLoss/d(the last state of the block being done)
        for k in reversed(range(starts.shape[0] - 1)):
            s, e = k * T, min(L, k * T + T)
            a, H, G = a_buf[:e - s], H_buf[:e - s], G_buf[:e - s]
            Bk, Ck, h0 = _rows(Bt, s, e), _rows(Ct, s, e), starts[k]
            blk = _Block(s, e, u, delta, At2, Bt, bias, ctx.softplus, h0, a, H)
            gy = _load(gout, s, e)                             # dLoss/d out -> dLoss/dy (y = C . h)
            if z is not None:
                zk = _load(z, s, e)
                _steps(dz, s, e).copy_(torch.ops.aten.silu_backward(gy * blk.y(Ck, Dv), zk))
                gy.mul_(F.silu(zk))
            gu = gy * Dv if Dv is not None else torch.zeros_like(gy)
            if Dv is not None:
                dD += (gy * blk.u).sum((0, 1, 2))
            torch.mul(Ck, gy, out=G)                           # direct dLoss/dh_t = C_t gy_t
            if carry is not None:
                G[-1] += carry
            Gs, As = G.unbind(0), a.unbind(0)
            for t in range(e - s - 1, 0, -1):                  # adjoint scan: g_{t-1} += a_t g_t
                Gs[t - 1].addcmul_(As[t], Gs[t])
            carry = As[0] * Gs[0]                              # a_s g_s flows into the previous block's last state
            dxu = _contract(Bk, G, "n")                        # (T, B, 1, D)
            gB, gC = _contract(blk.xu, G, "d", Bk.shape), _contract(gy, H, "d", Ck.shape)
            for grad, part in ((dB, gB), (dC, gC)):
                if grad.dim() == 2:
                    grad += part
                else:
                    grad[s:e] = part
            a.mul_(G)                                          # x_t = a_t g_t h_{t-1} = dLoss/d(dt_t A)
            a[1:].mul_(H[:-1])
            a[0].mul_(h0)
            dAt += torch.mul(a, blk.dt, out=H).sum((0, 1))
            ddt = torch.mul(a, At, out=G).sum(2, keepdim=True).addcmul_(dxu, blk.u)
            gu.addcmul_(dxu, blk.dt)
            if ctx.softplus:
                ddt.mul_(torch.sigmoid(blk.raw))               # softplus' = sigmoid
            if bias is not None:
                dbias += ddt.sum((0, 1, 2))
            _steps(du, s, e).copy_(gu)
            _steps(ddelta, s, e).copy_(ddt)
        return du, ddelta, dAt, dB, dC, dD, dz, dbias, None, None


def _time_major(M, dim):
    """B/C as (L, B, N, 1) (variable), (L, B, N, D) (grouped) or (N, D) (constant), fp32."""
    M = _expand_BC(M, dim)                                      # (B, 1 or D, N, L) or (D, N)
    return M.t().contiguous() if M.dim() == 2 else M.permute(3, 0, 2, 1).contiguous()


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk_size=None):
    """Same result as `selective_scan_ref`, computed block by block in fp32 (`_SelectiveScan`)."""
    _check(u, delta, A, B, C)
    with torch.autocast(device_type=u.device.type, enabled=False):  # the SSM runs in fp32 (Mamba README)
        f32 = lambda x: None if x is None else x.float()
        T = chunk_size or default_chunk(u.shape[0] * A.shape[0] * A.shape[1])
        u, delta, z = _channels_last(u), _channels_last(delta), _channels_last(z)
        out, last = _SelectiveScan.apply(u, delta, A.float().t().contiguous(), _time_major(B, A.shape[0]),
                                         _time_major(C, A.shape[0]), f32(D), z, f32(delta_bias), delta_softplus, T)
    out = out.to(u.dtype)                                       # as selective_scan_ref: output in u's dtype
    return (out, last.transpose(1, 2)) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# Dispatch: mamba-ssm's CUDA kernels or the Triton kernels on CUDA, the C kernel on CPU, else pure PyTorch
# ------------------------------------------------------------------------------------------------

SCAN_BACKENDS = ("auto", "cuda", "triton", "cpu", "chunked", "ref")   # the choices of model.scan_backend
_CUDA_OPS = None
_TRITON = None
_RESOLVED = {}        # (backend, device type) -> backend: plain dict lookups, so torch.compile traces through


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


def triton_ops():
    """The `triton_scan` module (Triton kernels as custom ops), or None when triton does not import."""
    global _TRITON
    if _TRITON is None:
        try:
            from dimscale.ops import triton_scan
            _TRITON = triton_scan
        except ImportError:
            _TRITON = False
    return _TRITON or None


def triton_interpreted() -> bool:
    """Triton's CPU interpreter is on (it must be set before triton is imported, so it is read from the env)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result   # run eagerly even under torch.compile: it builds, imports and prints
def _resolve(backend, dev):
    """The backend for `resolve_backend` (uncached)."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"scan backend '{backend}' is not one of {', '.join(SCAN_BACKENDS)}")
    if backend == "auto" and dev == "cuda":
        choice = "cuda" if cuda_kernels() else "triton" if triton_ops() else "chunked"
        why = {"cuda": "mamba-ssm imports", "triton": "mamba-ssm does not import; triton does",
               "chunked": "neither mamba-ssm nor triton imports: the slow pure-PyTorch scan"}[choice]
        print(f"dimscale: selective scan on CUDA uses backend '{choice}' ({why})", file=sys.stderr, flush=True)
        return choice
    if backend == "auto":
        return "cpu" if dev == "cpu" and scan_cpu.available() else "chunked"
    if backend == "cuda" and not (dev == "cuda" and cuda_kernels()):
        raise RuntimeError("scan backend 'cuda' needs CUDA tensors and mamba-ssm (pip install 'dimscale[cuda]'); "
                           "use model.scan_backend=auto or chunked on this machine")
    if backend == "triton" and dev != "cuda" and not triton_interpreted():
        raise ValueError(f"scan backend 'triton' on {dev} tensors is not one of the usable ones here: it needs CUDA "
                         "tensors, or TRITON_INTERPRET=1 set before start (Triton's slow CPU interpreter, for tests)")
    if backend == "triton" and not triton_ops():
        raise RuntimeError("scan backend 'triton' needs triton (pip install triton; CUDA builds of torch ship it)")
    if backend == "cpu" and not (dev == "cpu" and scan_cpu.available()):
        raise RuntimeError("scan backend 'cpu' needs CPU tensors and a C compiler to build the kernel "
                           "(apt-get install gcc, or set CC); use model.scan_backend=auto or chunked")
    return backend


def resolve_backend(backend, device):
    """'auto' -> on CUDA tensors 'cuda' (mamba-ssm) if it imports, else 'triton', else 'chunked', saying once
    which; on CPU 'cpu' (the compiled kernel) where it builds, else 'chunked' (pure PyTorch). Explicit choices
    are checked. Resolved once per (backend, device type)."""
    key = (backend, torch.device(device).type)
    if key not in _RESOLVED:
        choice = _resolve(*key)
        _RESOLVED[key] = _RESOLVED[(choice, key[1])] = choice   # the choice resolves to itself: no 2nd lookup
    return _RESOLVED[key]


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, backend="auto"):
    """Selective scan through the backend chosen by `resolve_backend` (same arguments as mamba-ssm's). The C
    and Triton kernels cover Mamba-1's case (real A, variable ungrouped B and C); other cases take the chunked
    scan."""
    backend = resolve_backend(backend, u.device)
    if backend == "cuda":
        return cuda_kernels()[0](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "cpu" and not scan_cpu.supports(u, A, B, C) or backend == "triton" and not \
            triton_ops().supports(u, A, B, C):
        backend = "chunked"
    fn = {"ref": selective_scan_ref, "cpu": scan_cpu.selective_scan_cpu, "chunked": selective_scan_chunked,
          "triton": triton_ops().selective_scan_triton if backend == "triton" else None}[backend]
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
