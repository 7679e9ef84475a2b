"""GPU check: dimscale's CUDA path on one GPU in one run (about 8 minutes including installs).

    python tools/gpu_check.py --prepare-wheels .gpu_wheels     # here, with a package index: fetch what it installs
    python tools/gpu_check.py --wheels .gpu_wheels [--out gpu_check.jsonl] [--only scan,model,...] [--budget-s 450]

Written for a machine like our GPU one (one H200, CUDA 13, torch 2.11, Triton 3.6, no internet, none of
deepspeed/webdataset/submitit/wandb/diffusers): the trainer's packages are installed from the --wheels folder
(never torch, which stays as installed). One JSON line per check, printed and appended to --out:
  setup   what was installed; device, torch, triton
  scan    Triton scan vs selective_scan_ref on CUDA (fwd and every gradient, fp32 and bf16), and its fwd+bwd time
          vs the chunked scan at B=2, d_inner 512 and 3072, N=16, L 1024/4096/16384 (target >= 10x at L=4096)
  model   DiM vs the attention mixer (SDPA) at equal width and depth, bf16 fwd+bwd per image, token grids 16..128,
          at DiM-S/2 and DiM-H/2 widths: the crossover grid (target: DiM faster from 64x64 up)
  train   dimscale/train.py on 1 GPU through DeepSpeed (nccl, bf16, ZeRO-2), DiM-S/2 on synthetic 32x32 inputs
          (16x16 tokens, the grid of 32x32 latents), ~50 steps: img/s, peak memory, finite loss; model.compile off/on
  memory  DiM-H/2 peak memory and img/s of a bf16 train step at the micro-batches of configs/dim_h_{256,512}.json
  mamba   mamba-ssm / causal-conv1d built from sdists in --wheels for this GPU only, in the background while the
          others run (needs nvcc); their scan vs the Triton one when the build finished within the budget
Without CUDA every GPU check prints a line saying it was skipped and why.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CHECKS = ("scan", "model", "train", "memory", "mamba")
# what the trainer imports beyond torch (and their dependencies); torch, triton and numpy come with the machine
TRAIN_PACKAGES = ["deepspeed", "webdataset", "safetensors", "pillow", "tqdm"]
BUILD_PACKAGES = ["setuptools", "wheel", "ninja", "packaging", "einops"]
SDISTS = ["mamba-ssm", "causal-conv1d"]
START = time.time()
OUT = None


def report(**kw):
    """Print one JSON line and append it to --out."""
    kw["t_s"] = round(time.time() - START, 1)
    line = json.dumps(kw)
    print(line, flush=True)
    if OUT:
        with open(OUT, "a") as f:
            f.write(line + "\n")


def pip(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, **kw)


def prepare_wheels(folder, pythons):
    """Download (here, with an index) the wheels the GPU machine installs offline, for each Python version."""
    os.makedirs(folder, exist_ok=True)
    for py in pythons:
        r = pip("download", "-q", "-d", folder, "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
                "--platform", "manylinux_2_28_x86_64", "--python-version", py, *BUILD_PACKAGES,
                "hjson", "msgpack", "py-cpuinfo", "pydantic", "psutil", "braceexpand", "pyyaml", "safetensors",
                "pillow", "tqdm", "webdataset", "--no-deps")
        print(f"python {py}: {'ok' if r.returncode == 0 else r.stderr.strip()[-300:]}", flush=True)
        for dep in ("pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"):
            pip("download", "-q", "-d", folder, "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
                "--python-version", py, "--no-deps", dep)
    r = pip("download", "-q", "-d", folder, "--no-deps", "--no-binary=:all:", "deepspeed", *SDISTS)  # sdists
    print(f"sdists: {'ok' if r.returncode == 0 else r.stderr.strip()[-300:]}", flush=True)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*")))
    print(f"{folder}: {len(os.listdir(folder))} files, {size / 2**20:.1f} MiB", flush=True)


def install(folder):
    """Offline installs from `folder`; torch is pinned to the installed build so pip never replaces it."""
    import torch
    if not folder or not os.path.isdir(folder):
        report(check="setup_install", ok=False, note=f"no --wheels folder ({folder!r}); train needs deepspeed")
        return
    cons = os.path.join(tempfile.mkdtemp(), "constraints.txt")
    with open(cons, "w") as f:
        f.write(f"torch=={torch.__version__}\n")
    base = ["install", "-q", "--no-index", "--find-links", folder, "-c", cons]
    steps = [pip(*base, *BUILD_PACKAGES),
             pip(*base, *TRAIN_PACKAGES[1:]),
             pip(*base, "--no-build-isolation", "deepspeed", env={**os.environ, "DS_BUILD_OPS": "0"})]
    report(check="setup_install", ok=all(r.returncode == 0 for r in steps),
           errors=[r.stderr.strip()[-400:] for r in steps if r.returncode])


def start_mamba_build(folder):
    """Background build of causal-conv1d and mamba-ssm for this GPU's arch only; returns the process or None."""
    import torch
    if not glob.glob(os.path.join(folder or "", "mamba_ssm-*.tar.gz")):
        report(check="mamba", skipped="no mamba-ssm sdist in --wheels")
        return None
    major, minor = torch.cuda.get_device_capability()
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", "MAX_JOBS": str(os.cpu_count() or 8),
           "MAMBA_FORCE_BUILD": "TRUE", "CAUSAL_CONV1D_FORCE_BUILD": "TRUE"}
    log = open(os.path.join(tempfile.gettempdir(), "dimscale_mamba_build.log"), "w")
    return subprocess.Popen([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", folder,
                             "--no-build-isolation", "--no-deps", *SDISTS], env=env, stdout=log, stderr=log)


def cuda_time(fn, reps=5, warmup=1):
    """Median seconds of fn() on the GPU."""
    import torch
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


def scan_inputs(B, D, L, N=16, dtype=None, seed=0):
    """Mamba-1 scan inputs on CUDA as leaf tensors; u, delta, z (B, D, L) over (B, L, D) memory as in Mamba."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    bdl = lambda: r(B, L, D).to(dtype or torch.float32).transpose(1, 2)  # noqa: E731
    xs = dict(u=bdl(), delta=bdl() - 3.0, A=-torch.arange(1.0, N + 1, device="cuda").repeat(D, 1),
              B=r(B, N, L).to(dtype or torch.float32), C=r(B, N, L).to(dtype or torch.float32), D=r(D), z=bdl(),
              delta_bias=0.1 * r(D))
    return {k: v.requires_grad_() for k, v in xs.items()}


def fwd_bwd(fn, xs):
    """(out, last state, grads) of one forward + backward with a fixed weighting."""
    import torch
    for v in xs.values():
        v.grad = None
    out, last = fn(**xs, delta_softplus=True, return_last_state=True)
    w = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    ((out.float() * w).sum() + last.sum()).backward()
    return out.detach(), last.detach(), {k: v.grad.detach().clone() for k, v in xs.items()}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def check_scan(budget):
    import torch
    from dimscale.ops import selective_scan_chunked, selective_scan_ref
    from dimscale.ops.triton_scan import selective_scan_triton
    for dtype in (torch.float32, torch.bfloat16):
        xs = scan_inputs(2, 512, 1024, dtype=dtype)
        ref = fwd_bwd(selective_scan_ref, xs)
        got = fwd_bwd(selective_scan_triton, xs)
        errs = {"out": rel_err(got[0], ref[0]), "last": rel_err(got[1], ref[1]),
                **{k: rel_err(got[2][k], ref[2][k]) for k in ref[2]}}
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        report(check="scan_triton_vs_ref", dtype=str(dtype), L=1024, d_inner=512, max_rel_err=errs,
               ok=bool(max(errs.values()) <= tol), tol=tol)
    for D in (512, 3072):
        for L in (1024, 4096, 16384):
            if budget() < 60:
                report(check="scan_speed", d_inner=D, L=L, skipped="time budget")
                continue
            xs = scan_inputs(2, D, L)
            tri = cuda_time(lambda: fwd_bwd(selective_scan_triton, xs), reps=5)
            chk = cuda_time(lambda: fwd_bwd(selective_scan_chunked, xs), reps=1, warmup=0 if L > 4096 else 1)
            report(check="scan_speed", B=2, d_inner=D, N=16, L=L, triton_s=round(tri, 5), chunked_s=round(chk, 4),
                   speedup=round(chk / tri, 1), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
            del xs
            torch.cuda.empty_cache()


def check_model(budget, depths):
    import torch
    from dimscale.models import DiM
    for width, depth in ((512, depths[0]), (1536, depths[1])):
        rows, crossover = [], None
        for grid in (16, 32, 64, 128):
            if budget() < 45:
                rows.append({"grid": grid, "skipped": "time budget"})
                continue
            row = {"grid": grid}
            for mixer in ("mamba", "attention"):
                torch.manual_seed(0)
                m = DiM(in_channels=4, input_size=2 * grid, num_classes=1000, width=width, depth=depth, patch=2,
                        mixer=mixer, scan_backend="triton").cuda().train()
                B = max(1, 2048 // (grid * grid)) if width <= 512 else 1
                x = torch.randn(B, 4, 2 * grid, 2 * grid, device="cuda")
                t, y = torch.full((B,), 500.0, device="cuda"), torch.zeros(B, dtype=torch.long, device="cuda")

                def step():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        m(x, t, y).float().mean().backward()
                try:
                    row[mixer + "_ms_per_image"] = round(1e3 * cuda_time(step, reps=3) / B, 3)
                except torch.OutOfMemoryError:
                    row[mixer + "_ms_per_image"] = None
                del m
                torch.cuda.empty_cache()
            if row.get("mamba_ms_per_image") and row.get("attention_ms_per_image"):
                row["attention_over_dim"] = round(row["attention_ms_per_image"] / row["mamba_ms_per_image"], 3)
            rows.append(row)
        for row in reversed(rows):                 # smallest grid from which DiM is faster on every larger grid
            if row.get("attention_over_dim", 0) <= 1:
                break
            crossover = row["grid"]
        report(check="model_dim_vs_attention_bf16", width=width, depth=depth, rows=rows, crossover_grid=crossover,
               target="DiM faster from grid 64 up", ok=bool(crossover is not None and crossover <= 64))


def make_shards(folder):
    """Synthetic 32x32 RGB class-folder images -> shards with tools/make_shards.py; returns the shard folder."""
    import numpy as np
    from PIL import Image
    src, out = os.path.join(folder, "images"), os.path.join(folder, "shards")
    rng = np.random.default_rng(0)
    for c in range(10):
        os.makedirs(os.path.join(src, f"class{c}"), exist_ok=True)
        for i in range(64):
            img = (rng.random((32, 32, 3)) * 40 + c * 20).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(src, f"class{c}", f"{i}.png"))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_shards.py"), src, out, "--resolution", "32",
                    "--format", "png"], check=True, capture_output=True, text=True)
    return out


def check_train(budget, steps):
    folder = tempfile.mkdtemp(prefix="dimscale_gpu_")
    shards = make_shards(folder)
    for compile_on in (False, True):
        if budget() < (150 if compile_on else 60):
            report(check="train_ds_bf16_zero2", compile=compile_on, skipped="time budget")
            continue
        cfg = {"name": f"gpu_check_compile{int(compile_on)}", "out_dir": folder,
               "model": {"name": "DiM-S/2", "in_channels": 3, "input_size": 32, "num_classes": 10,
                         "scan_backend": "triton", "compile": compile_on},
               "data": {"shards": shards, "resolution": 32, "latent": "none", "channels": 3, "num_workers": 2},
               "train": {"total_images": 64 * steps, "global_batch": 64, "micro_batch": 64, "precision": "bf16",
                         "zero_stage": 2, "ckpt_every_images": 10**9, "snapshot_every_images": 10**9,
                         "sample_every_images": 0, "log_every_steps": 10, "wandb": "off"}}
        path = os.path.join(folder, cfg["name"] + ".json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        t0 = time.time()
        r = subprocess.run([sys.executable, os.path.join(ROOT, "dimscale", "train.py"), "--config", path],
                           capture_output=True, text=True, timeout=max(30, budget() - 20),
                           env={**os.environ, "PYTHONPATH": ROOT})
        metrics = [json.loads(line) for p in glob.glob(os.path.join(folder, cfg["name"], "**", "metrics.jsonl"),
                                                       recursive=True) for line in open(p)]
        last = metrics[-1] if metrics else {}
        report(check="train_ds_bf16_zero2", compile=compile_on, rc=r.returncode, wall_s=round(time.time() - t0, 1),
               steps=last.get("step"), images_per_s=last.get("images_per_s"), mem_gib=last.get("mem_gib"),
               loss=last.get("loss"), finite=bool(metrics) and all(m["loss"] == m["loss"] for m in metrics),
               ok=r.returncode == 0 and bool(metrics), log_tail=(r.stdout + r.stderr)[-600:])


def check_memory(budget):
    import torch
    from dimscale.config import load_config
    from dimscale.models import build_model
    for name in ("dim_h_256", "dim_h_512"):
        if budget() < 45:
            report(check="memory_dim_h", config=name, skipped="time budget")
            continue
        cfg = load_config(os.path.join(ROOT, "configs", f"{name}.json"), overrides=["model.scan_backend=triton"])
        side, mb = cfg.data.resolution // 8, cfg.train.micro_batch
        torch.manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        model = build_model(cfg.model).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(mb, 4, side, side, device="cuda")
        t, y = torch.rand(mb, device="cuda") * 1000, torch.randint(0, 1000, (mb,), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, t, y).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        try:
            sec = cuda_time(step, reps=3)
            report(check="memory_dim_h", config=name, latent=side, micro_batch=mb, grad_checkpointing=
                   cfg.model.grad_checkpointing, images_per_s=round(mb / sec, 2),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   note="fp32 weights + AdamW under bf16 autocast, one process (not DeepSpeed's bf16 + ZeRO shards)")
        except torch.OutOfMemoryError as e:
            report(check="memory_dim_h", config=name, micro_batch=mb, ok=False, error=str(e)[:200])
        del model, opt
        torch.cuda.empty_cache()


def check_mamba(proc, budget):
    import torch
    if proc is None:
        return
    try:
        proc.wait(timeout=max(1, budget() - 30))
    except subprocess.TimeoutExpired:
        proc.kill()
        report(check="mamba", ok=False, note="build did not finish within the budget")
        return
    from dimscale.ops import cuda_kernels, selective_scan_ref
    from dimscale.ops.triton_scan import selective_scan_triton
    if proc.returncode != 0 or not cuda_kernels():
        log = open(os.path.join(tempfile.gettempdir(), "dimscale_mamba_build.log")).read()
        report(check="mamba", ok=False, rc=proc.returncode, log_tail=log[-800:])
        return
    ssm = lambda **kw: cuda_kernels()[0](**kw)  # noqa: E731
    xs = scan_inputs(2, 512, 4096)
    ref = fwd_bwd(selective_scan_ref, scan_inputs(2, 512, 1024))
    got = fwd_bwd(ssm, scan_inputs(2, 512, 1024))
    report(check="mamba", ok=True, mamba_vs_ref_max_rel=max(rel_err(got[2][k], ref[2][k]) for k in ref[2]),
           mamba_s=cuda_time(lambda: fwd_bwd(ssm, xs)), triton_s=cuda_time(lambda: fwd_bwd(selective_scan_triton, xs)),
           L=4096, d_inner=512, peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def main():
    global OUT
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawTextHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--prepare-wheels", metavar="DIR", help="download the wheels and sdists into DIR, then exit")
    p.add_argument("--python-versions", nargs="+", default=["3.10", "3.11", "3.12", "3.13"])
    p.add_argument("--wheels", default=os.path.join(ROOT, ".gpu_wheels"), help="folder made by --prepare-wheels")
    p.add_argument("--out", default="gpu_check.jsonl")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--budget-s", type=float, default=450, help="stop starting new measurements after this")
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--model-depths", type=int, nargs=2, default=[25, 9], help="depth at the S and H widths")
    a = p.parse_args()
    if a.prepare_wheels:
        return prepare_wheels(a.prepare_wheels, a.python_versions)
    OUT = a.out
    only = set(a.only.split(","))
    if only - set(CHECKS):
        p.error(f"--only: unknown checks {sorted(only - set(CHECKS))}; choose from {','.join(CHECKS)}")
    import torch
    budget = lambda: a.budget_s - (time.time() - START)  # noqa: E731
    if not torch.cuda.is_available():
        for name in sorted(only):
            report(check=name, skipped="no CUDA device visible: every check of this tool needs one")
        return
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report(check="setup", device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton_version,
           cuda=torch.version.cuda, python=sys.version.split()[0])
    if only & {"train", "mamba"}:
        install(a.wheels)
    proc = start_mamba_build(a.wheels) if "mamba" in only else None
    for name, fn in (("scan", lambda: check_scan(budget)), ("model", lambda: check_model(budget, a.model_depths)),
                     ("train", lambda: check_train(budget, a.train_steps)), ("memory", lambda: check_memory(budget)),
                     ("mamba", lambda: check_mamba(proc, budget))):
        if name in only:
            try:
                fn()
            except Exception as e:                     # one failing check must not hide the others
                report(check=name, ok=False, error=f"{type(e).__name__}: {str(e)[:500]}")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
