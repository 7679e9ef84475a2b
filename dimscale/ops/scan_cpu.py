"""Compiled CPU selective scan: `csrc/selective_scan_cpu.c`, built on first use with the system C compiler.

mamba-ssm ships CUDA kernels only. On CPU the scan is the bulk of DiM's training step (~65% with the
pure-PyTorch `selective_scan_chunked`, whose time goes to per-step dispatch and unfused elementwise
passes), so this fused C loop is the default CPU path. It is built once per machine, cached under
`$DIMSCALE_CACHE` (default `~/.cache/dimscale`), and loaded with ctypes: no Python headers, ninja or
torch headers are needed, only `cc`. Without a compiler `available()` is False and dispatch keeps the
pure-PyTorch scan, which computes the same thing (tests compare both with `selective_scan_ref`).

The kernel does the whole of `selective_scan_ref` (real A, variable B and C) forward and backward;
the delta bias and softplus, the D skip and the z gate are fused in too (so the wrapper adds no full-size passes).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from dimscale.ops.library import register_scan_autograd

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.c"
LANES = 32        # channels per tile in the kernel (its W)
BLOCK = 64        # time steps per recomputed block in the backward (~128 KiB of states and decays per tile)
MAX_STATE = 64    # d_state the kernel's per-tile constants have room for (Mamba-1 uses 16)
# the kernel's compile-time sizes come from here, so Python and C cannot disagree
CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=gnu11",
          f"-DLANES={LANES}", f"-DMAX_STATE={MAX_STATE}"]
LOG2E = 1.4426950408889634

_LIB = None


def _cpu_id() -> str:
    """What -march=native depends on: the kernel built on one CPU may not run on another."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def _build() -> Path:
    """Compile the kernel into the cache (atomically: concurrent ranks may build at once) and return its path."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *CFLAGS]).encode() + _cpu_id().encode()).hexdigest()
    cache = Path(os.environ.get("DIMSCALE_CACHE", Path.home() / ".cache" / "dimscale")) / "kernels"
    lib = cache / f"selective_scan_cpu-{key[:16]}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lpthread"], check=True, capture_output=True,
                           text=True)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def _load():
    """The ctypes library, or False when it cannot be built here (warned once, with the fix)."""
    global _LIB
    if _LIB is None:
        try:
            lib = ctypes.CDLL(str(_build()))
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            lib.scan_forward.argtypes = [i64] * 5 + [ctypes.c_int] * 2 + [ptr] * 10
            lib.scan_backward.argtypes = [i64] * 5 + [ctypes.c_int] * 2 + [ptr] * 19
            lib.scan_forward.restype = lib.scan_backward.restype = None
            _LIB = lib
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            warnings.warn(f"the compiled CPU selective scan could not be built ({detail.strip()[:300]}); using the "
                          "slower pure-PyTorch scan. Fix: install a C compiler (apt-get install gcc) or set CC.")
            _LIB = False
    return _LIB or None


def available() -> bool:
    """True when the kernel is built (or builds now) and loads."""
    return _load() is not None


def supports(u, A, B, C) -> bool:
    """The kernel's case: CPU tensors, real A with d_state <= MAX_STATE, variable ungrouped B and C (B, N, L),
    as Mamba-1 and DiM use."""
    return (u.device.type == "cpu" and not A.is_complex() and A.dim() == 2 and A.shape[1] <= MAX_STATE
            and B.dim() == 3 and C.dim() == 3)


def _ptr(x):
    return None if x is None else ctypes.c_void_p(x.data_ptr())


def _threads(D: int) -> int:
    """Intra-op threads, at most one per tile of channels (and 256, the kernel's cap)."""
    return max(1, min(torch.get_num_threads(), -(-D // LANES), 256))


@torch.library.custom_op("dimscale::scan_cpu_fwd", mutates_args=(), device_types="cpu")
def scan_cpu_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: Optional[torch.Tensor], z: Optional[torch.Tensor], bias: Optional[torch.Tensor], softplus: bool,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole scan in the kernel. u, delta, z: (batch, L, D); A: (N, D); B, C: (batch, L, N); D, bias: (D,);
    all fp32, the optional ones None. Returns out (batch, L, D) and the state entering each block of `chunk`
    steps plus the last, (batch, K+1, N, D)."""
    u, delta, B, C, D, z, bias = (None if x is None else x.contiguous() for x in (u, delta, B, C, D, z, bias))
    batch, L, Dm = u.shape
    out, states = _scan_cpu_fwd_fake(u, delta, A, B, C, D, z, bias, softplus, chunk)
    A2 = (A * LOG2E).contiguous()                                # a local: it must outlive the call
    _load().scan_forward(batch, L, Dm, A.shape[0], chunk, _threads(Dm), int(softplus),
                         *map(_ptr, (u, delta, bias, A2, B, C, D, z, out, states)))
    return out, states


@scan_cpu_fwd.register_fake
def _scan_cpu_fwd_fake(u, delta, A, B, C, D, z, bias, softplus, chunk):
    batch, L, Dm = u.shape
    return u.new_empty(batch, L, Dm), u.new_empty(batch, -(-L // chunk) + 1, A.shape[0], Dm)


@torch.library.custom_op("dimscale::scan_cpu_bwd", mutates_args=(), device_types="cpu")
def scan_cpu_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: Optional[torch.Tensor], z: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 states: torch.Tensor, gout: torch.Tensor, glast: Optional[torch.Tensor], softplus: bool,
                 chunk: int) -> list[torch.Tensor]:
    """[du, ddelta, dA, dB, dC, dD, dz, dbias] in the layouts of `scan_cpu_fwd`; empty for absent D, z, bias."""
    u, delta, B, C, D, z, bias, states, gout, glast = (None if x is None else x.contiguous() for x in (
        u, delta, B, C, D, z, bias, states, gout, glast))
    batch, L, Dm = u.shape
    N, threads = A.shape[0], _threads(Dm)
    gu, gdelta, gA = torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A)
    gB, gC = (u.new_zeros(threads, batch, L, N) for _ in range(2))   # per-thread partial sums over D
    gD, gz, gbias = (None if x is None else torch.empty_like(x) for x in (D, z, bias))
    A2 = (A * LOG2E).contiguous()
    _load().scan_backward(batch, L, Dm, N, chunk, threads, int(softplus),
                          *map(_ptr, (u, delta, bias, A2, B, C, D, z, states, gout, glast,
                                      gu, gdelta, gA, gB, gC, gD, gz, gbias)))
    return [gu, gdelta, gA, gB.sum(0), gC.sum(0), *(u.new_empty(0) if g is None else g for g in (gD, gz, gbias))]


@scan_cpu_bwd.register_fake
def _(u, delta, A, B, C, D, z, bias, states, gout, glast, softplus, chunk):
    return [u.new_empty(u.shape), u.new_empty(u.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), *(u.new_empty(0) if x is None else x.new_empty(x.shape) for x in (D, z, bias))]


register_scan_autograd(scan_cpu_fwd, scan_cpu_bwd)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Same result as `selective_scan_ref` for `supports(...)` inputs, through the compiled kernel."""
    if not supports(u, A, B, C):
        raise ValueError("the CPU scan kernel takes CPU tensors, real (d_inner, d_state<=64) A and (batch, d_state, L) "
                         f"B and C; got A {tuple(A.shape)}, B {tuple(B.shape)}; use selective_scan_fn, which falls back")
    # (B, D, L) arguments as (B, L, D): free for Mamba's layout, whose projections are (B, L, D) in memory
    bld = lambda x: None if x is None else x.float().transpose(1, 2).contiguous()
    vec = lambda x: None if x is None else x.float().contiguous()
    with torch.autocast(device_type="cpu", enabled=False):     # the SSM runs in fp32 (Mamba README)
        out, states = scan_cpu_fwd(bld(u), bld(delta), A.float().t().contiguous(), bld(B), bld(C), vec(D), bld(z),
                                   vec(delta_bias), bool(delta_softplus), BLOCK)
    out = out.transpose(1, 2).to(u.dtype)                       # (B, D, L), in u's dtype as the reference
    return (out, states[:, -1].transpose(1, 2)) if return_last_state else out
