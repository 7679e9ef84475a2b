"""GPU smoke check and benchmarks: the CUDA path of dimscale in one short run.

    python tools/gpu_check.py [--part pytorch|kernels|all] [--out results.json]

- pytorch: DiM on CUDA with the pure-PyTorch chunked scan (fp32 CPU-vs-CUDA agreement, bf16 fwd+bwd), chunked
  vs naive scan on the GPU.
- kernels: needs mamba-ssm + causal-conv1d (pip install 'dimscale[cuda]'): their CUDA selective scan vs our
  reference (fwd+bwd), a DiM with scan_backend='cuda' vs 'chunked' on the same weights, and DiM vs the attention
  mixer (equal width and depth) fwd+bwd time per image on token grids 16x16..128x128, with the crossover grid.
Prints one JSON line per check and writes them all to --out.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimscale.config import ModelConfig  # noqa: E402
from dimscale.models import build_model  # noqa: E402
from dimscale.ops import cuda_kernels, selective_scan_chunked, selective_scan_ref  # noqa: E402

RESULTS = []


def report(**kw):
    """Print and keep one result record."""
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def cuda_time(fn, reps=5, warmup=2):
    """Median seconds of fn() on the GPU (synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def scan_inputs(B=2, D=512, N=16, L=4096, seed=0):
    """Random Mamba-1 scan inputs on CUDA, fp32, requiring grad."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u, delta, z = r(B, D, L), 0.5 * r(B, D, L), r(B, D, L)
    A = -torch.exp(0.5 * r(D, N))
    Bm, Cm, Dv, bias = r(B, N, L), r(B, N, L), r(D), 0.1 * r(D)
    return [t.requires_grad_() for t in (u, delta, A, Bm, Cm, Dv, z, bias)]


def fwd_bwd(fn, inputs):
    """Output and input gradients of one fwd+bwd through a scan function."""
    for t in inputs:
        t.grad = None
    u, delta, A, Bm, Cm, Dv, z, bias = inputs
    y = fn(u, delta, A, Bm, Cm, Dv, z, bias, True)
    y.backward(torch.ones_like(y))
    return y.detach(), [t.grad.detach().clone() for t in inputs]


def part_pytorch():
    """DiM with the pure-PyTorch scan on CUDA."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="DiM-T/2", in_channels=4, input_size=16, num_classes=10, scan_backend="chunked")
    model = build_model(cfg).eval()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.tensor([3, 10])
    with torch.no_grad():
        out_cpu = model(x, t, y)
        out_gpu = model.cuda()(x.cuda(), t.cuda(), y.cuda()).cpu()
    report(check="dim_t_cpu_vs_cuda_fp32", max_abs_diff=(out_cpu - out_gpu).abs().max().item(),
           ok=bool(torch.allclose(out_cpu, out_gpu, atol=1e-4, rtol=1e-4)))

    cfg = ModelConfig(name="DiM-S/2", in_channels=4, input_size=32, num_classes=1000, scan_backend="chunked")
    model = build_model(cfg).cuda().train()
    x = torch.randn(8, 4, 32, 32, device="cuda")
    t = torch.randint(1, 1001, (8,), device="cuda").float()
    y = torch.randint(0, 1001, (8,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, t, y).float().pow(2).mean()
        loss.backward()
        return loss
    sec = cuda_time(step, reps=3)
    report(check="dim_s_bf16_fwd_bwd_chunked_cuda", batch=8, latent=32, sec_per_step=sec,
           finite=bool(torch.isfinite(step()).item()), mem_gib=torch.cuda.max_memory_allocated() / 2**30)

    inputs = scan_inputs(L=1024)
    chunked = lambda *a: selective_scan_chunked(*a[:7], delta_bias=a[7], delta_softplus=a[8])  # noqa: E731
    ref = lambda *a: selective_scan_ref(*a[:7], delta_bias=a[7], delta_softplus=a[8])  # noqa: E731
    yc, gc = fwd_bwd(chunked, inputs)
    yr, gr = fwd_bwd(ref, inputs)
    report(check="scan_chunked_vs_ref_cuda_L1024", y_max_abs=(yc - yr).abs().max().item(),
           grad_max_rel=max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(gc, gr)),
           chunked_s=cuda_time(lambda: fwd_bwd(chunked, inputs), reps=3),
           ref_s=cuda_time(lambda: fwd_bwd(ref, inputs), reps=1, warmup=0))


def part_kernels():
    """mamba-ssm's CUDA kernels against our reference, and DiM vs attention speed."""
    ops = cuda_kernels()
    if not ops:
        report(check="mamba_ssm_import", ok=False, note="selective_scan_cuda / mamba_ssm not importable")
        return model_bench()
    cuda_scan = lambda *a: ops[0](*a[:7], delta_bias=a[7], delta_softplus=a[8])  # noqa: E731
    ref = lambda *a: selective_scan_ref(*a[:7], delta_bias=a[7], delta_softplus=a[8])  # noqa: E731
    chunked = lambda *a: selective_scan_chunked(*a[:7], delta_bias=a[7], delta_softplus=a[8])  # noqa: E731
    inputs = scan_inputs(L=4096)
    yk, gk = fwd_bwd(cuda_scan, inputs)
    yr, gr = fwd_bwd(ref, inputs)
    report(check="scan_cuda_kernel_vs_ref_L4096_fp32", y_max_abs=(yk - yr).abs().max().item(),
           grad_max_rel=max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(gk, gr)),
           kernel_s=cuda_time(lambda: fwd_bwd(cuda_scan, inputs)),
           chunked_s=cuda_time(lambda: fwd_bwd(chunked, inputs), reps=3))

    torch.manual_seed(0)
    base = dict(name="DiM-S/2", in_channels=4, input_size=32, num_classes=1000)
    m_fast = build_model(ModelConfig(**base, scan_backend="cuda")).cuda().eval()
    m_slow = build_model(ModelConfig(**base, scan_backend="chunked")).cuda().eval()
    m_slow.load_state_dict(m_fast.state_dict())
    x, t, y = torch.randn(4, 4, 32, 32, device="cuda"), torch.full((4,), 500.0, device="cuda"), \
        torch.arange(4, device="cuda")
    with torch.no_grad():
        a, b = m_fast(x, t, y), m_slow(x, t, y)
    report(check="dim_s_cuda_kernels_vs_chunked_fp32", max_abs_diff=(a - b).abs().max().item(),
           rel=((a - b).norm() / b.norm()).item())
    model_bench()


def model_bench():
    """DiM vs the attention mixer (same skeleton, width and depth), bf16 fwd+bwd per image, grids 16..128."""
    backend = "cuda" if cuda_kernels() else "chunked"
    rows, crossover = [], None
    for grid in (16, 32, 64, 128):
        row = {"grid": grid}
        for mixer in ("mamba", "attention"):
            torch.manual_seed(0)
            m = build_model(ModelConfig(name="DiM-S/2", in_channels=4, input_size=2 * grid, num_classes=1000,
                                        mixer=mixer, scan_backend=backend)).cuda().train()
            B = max(1, 64 // grid)
            x = torch.randn(B, 4, 2 * grid, 2 * grid, device="cuda")
            t = torch.full((B,), 500.0, device="cuda")
            y = torch.zeros(B, dtype=torch.long, device="cuda")

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    m(x, t, y).float().mean().backward()
            row[mixer + "_ms_per_image"] = 1e3 * cuda_time(step, reps=3) / B
            torch.cuda.empty_cache()
        row["attention_over_dim"] = row["attention_ms_per_image"] / row["mamba_ms_per_image"]
        if crossover is None and row["attention_over_dim"] > 1:
            crossover = grid
        rows.append(row)
        print(json.dumps(row), flush=True)
    report(check="model_dim_vs_attention_cuda_bf16", model="DiM-S/2 (width 512, depth 25)", scan=backend, rows=rows,
           crossover_grid=crossover)


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("pytorch", "kernels", "all"), default="all")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible")
    report(check="device", name=torch.cuda.get_device_name(), torch=torch.__version__)
    if a.part in ("pytorch", "all"):
        part_pytorch()
    if a.part in ("kernels", "all"):
        part_kernels()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
