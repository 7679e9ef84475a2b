"""Selective scan fwd+bwd on CPU: the default CPU scan (the compiled kernel) vs the naive sequential reference.

`python tools/bench.py scan [--lengths 1024 4096] [--reps 3] [--ref-reps-long 1] [--threads 1]`
Shapes as one Mamba layer of DiM-S: B=2, d_inner=512, N=16 (delta softplus, D skip, z gate). Repetitions of
ours and the reference alternate so machine load hits both alike; medians are reported. The reference costs
~L Python steps forward and backward, so at the longest L it runs `--ref-reps-long` times only.
ratio = reference time / ours at the longest L (target >= 20); ok also needs max |ours - ref| <= 1e-4 (fp32).
The pure-PyTorch blocked scan (`selective_scan_chunked`, the fallback without a C compiler) is timed in the
same rounds and reported as `chunked_cpu_s` / `chunked_speedup`.
Times are CPU seconds of this process (time.process_time, one intra-op thread by default): on a shared
machine wall time mostly measures the other tenants; wall seconds are reported alongside.
"""
import argparse
import statistics
import time

import torch

from dimscale.ops import resolve_backend, selective_scan_chunked, selective_scan_fn, selective_scan_ref


def make_inputs(L, B=2, D=512, N=16, seed=0):
    """Leaf tensors shaped and laid out like Mamba-1's scan inputs (u, delta, z are transposed views of the
    (B, L, d_inner) projections); A = -exp(A_log) with the S4D-real init."""
    g = torch.Generator().manual_seed(seed)
    bdl = lambda: torch.randn(B, L, D, generator=g).transpose(1, 2)  # (B, D, L) over (B, L, D) memory, as in Mamba
    xs = dict(u=bdl(), delta=bdl() - 3.0,
              A=-torch.arange(1.0, N + 1).repeat(D, 1), B=torch.randn(B, N, L, generator=g),
              C=torch.randn(B, N, L, generator=g), D=torch.ones(D), z=bdl(),
              delta_bias=torch.rand(D, generator=g) - 2.0)
    return {k: v.requires_grad_() for k, v in xs.items()}


def fwd_bwd(fn, L):
    """CPU and wall seconds of one forward+backward; returns ((cpu, wall), output, grads)."""
    xs = make_inputs(L)
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(**xs, delta_softplus=True)
    out.backward(torch.ones_like(out))
    return (time.process_time() - c0, time.perf_counter() - w0), out.detach(), {k: v.grad for k, v in xs.items()}


def main(argv):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="bench.py scan")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ref-reps-long", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    backend = resolve_backend("auto", "cpu")                # 'cpu' (the kernel), or 'chunked' without a compiler
    for fn in (selective_scan_fn, selective_scan_chunked, selective_scan_ref):
        fwd_bwd(fn, 64)                                     # warm-up: one-time library and build costs
    res = {}
    for L in a.lengths:
        ref_reps = a.ref_reps_long if L == max(a.lengths) else a.reps
        ours, chunked, ref, err, gerr = [], [], [], 0.0, 0.0
        for r in range(max(a.reps, ref_reps)):
            t, out, grads = fwd_bwd(selective_scan_fn, L)
            ours.append(t)
            chunked.append(fwd_bwd(selective_scan_chunked, L)[0])
            if r < ref_reps:
                t, want, wgrads = fwd_bwd(selective_scan_ref, L)
                ref.append(t)
                err = max(err, (out - want).abs().max().item())
                gerr = max(gerr, max(((grads[k] - wgrads[k]).abs().max() / wgrads[k].abs().max().clamp_min(1e-12))
                                     .item() for k in grads))
        med = lambda ts, i: round(statistics.median(t[i] for t in ts), 4)
        res[L] = dict(ours_cpu_s=med(ours, 0), ref_cpu_s=med(ref, 0), chunked_cpu_s=med(chunked, 0),
                      ours_wall_s=med(ours, 1),
                      ref_wall_s=med(ref, 1), max_abs_err=err, max_rel_grad_err=gerr,
                      ours_reps=len(ours), ref_reps=len(ref))
        res[L]["speedup"] = round(res[L]["ref_cpu_s"] / res[L]["ours_cpu_s"], 2)
        res[L]["chunked_speedup"] = round(res[L]["ref_cpu_s"] / res[L]["chunked_cpu_s"], 2)
    Lmax = max(a.lengths)
    ratio = res[Lmax]["speedup"]
    max_err = max(r["max_abs_err"] for r in res.values())
    return {"bench": "scan", "metric": f"reference / default CPU scan ({backend}) fwd+bwd time at L={Lmax} "
                                       "(B=2, d_inner=512, N=16)",
            "ratio": ratio, "target": 20.0, "ok": bool(ratio >= 20.0 and max_err <= 1e-4),
            "backend": backend, "max_abs_err": max_err, "threads": a.threads,
            "per_length": {str(L): r for L, r in res.items()}}
