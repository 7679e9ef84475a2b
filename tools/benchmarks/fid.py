"""tools/fid.py feature throughput: the tool vs a bare loop over the same Inception, and 2 ranks vs 1.

    python tools/bench.py fid [--images 24] [--reps 3]

Weights: a BN-recalibrated random Inception in the pt_inception layout (the real file is not offline; the
compute is the same). Images: crops of real photos at 64x64 (resized to 299 inside the detector).
ratio = tool images/s / bare images/s, both in fresh 1-thread processes (target >= 0.95, i.e. overhead <= 5%);
the tool's images/s covers its whole feature phase (reading, detector, float64 sums, all-reduce); speedup = 2-rank images/s over
1-rank images/s, one thread per rank (target >= 1.7). Repetitions interleave ours and the baseline; medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FID = os.path.join(ROOT, "tools", "fid.py")


def photos(n: int, side: int = 64) -> np.ndarray:
    """uint8 (n, side, side, 3) crops of the mate-backgrounds photos, cycling over the files."""
    import glob
    from PIL import Image
    files = sorted(glob.glob("/usr/share/backgrounds/mate/**/*.jpg", recursive=True))
    if not files:
        sys.exit("no photos: apt-get install -y --no-install-recommends mate-backgrounds")
    rng, out = np.random.default_rng(0), []
    for i in range(n):
        with Image.open(files[i % len(files)]) as im:
            im.draft("RGB", (8 * side, 8 * side))
            im = im.convert("RGB")
            x, y = rng.integers(0, im.width - 2 * side), rng.integers(0, im.height - 2 * side)
            out.append(np.asarray(im.crop((x, y, x + 2 * side, y + 2 * side)).resize((side, side))))
    return np.stack(out)


def run_tool(args: list, ranks: int) -> dict:
    port = 29400 + (os.getpid() + int(time.time())) % 500
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                str(port)] if ranks > 1 else [sys.executable]
    out = subprocess.run(launcher + [FID] + args, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


BARE = """
import sys, time, numpy as np, torch
from dimscale.metrics.inception import load_inception
npz, weights, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = load_inception(weights)
imgs = torch.from_numpy(np.load(npz)["arr_0"]).permute(0, 3, 1, 2)
t0, c0 = time.perf_counter(), time.process_time()
with torch.no_grad():
    for i in range(0, len(imgs), batch):
        model(imgs[i:i + batch])
print(len(imgs) / (time.perf_counter() - t0), len(imgs) / (time.process_time() - c0))
"""


def run_bare(npz: str, weights: str, batch: int) -> tuple[float, float]:
    """(images per wall second, per CPU second) of a plain loop over the same Inception and images, in a fresh
    1-thread process."""
    out = subprocess.run([sys.executable, "-c", BARE, npz, weights, str(batch)], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def main(argv):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python tools/bench.py fid")
    p.add_argument("--images", type=int, default=24, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from dimscale.metrics.inception import WEIGHTS_NAME, standin_state_dict
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench_fid_")
    weights = os.path.join(tmp, WEIGHTS_NAME)
    imgs = photos(a.images + 8)
    torch.save(standin_state_dict(torch.from_numpy(imgs[-8:]).permute(0, 3, 1, 2).contiguous()), weights)
    np.savez(os.path.join(tmp, "s.npz"), arr_0=imgs[:a.images])
    ref = os.path.join(tmp, "ref.npz")
    rng = np.random.default_rng(0)
    np.savez(ref, mu=rng.normal(size=2048), sigma=np.eye(2048))       # stats-only reference: no extra compute
    tool_args = ["eval", "--samples", os.path.join(tmp, "s.npz"), "--ref", ref, "--inception", weights,
                 "--batch-size", str(a.batch_size), "--no-progress", "--offline"]

    # tool vs bare loop, each in a fresh process with one thread (both pay the same first-batch warm-up)
    tool_ips, bare_ips, one_ips, two_ips, tool_cpu, bare_cpu = [], [], [], [], [], []
    for _ in range(a.reps):
        rec = run_tool(tool_args, 1)
        tool_ips.append(rec["images_per_s"])
        tool_cpu.append(rec["num_samples"] / rec["feature_cpu_seconds_rank0"])
        wall, cpu = run_bare(os.path.join(tmp, "s.npz"), weights, a.batch_size)
        bare_ips.append(wall)
        bare_cpu.append(cpu)
    # 2 ranks vs 1 rank (one thread each), interleaved
    for _ in range(a.reps):
        one_ips.append(run_tool(tool_args, 1)["images_per_s"])
        two_ips.append(run_tool(tool_args, 2)["images_per_s"])
    tool, bare = statistics.median(tool_ips), statistics.median(bare_ips)
    one, two = statistics.median(one_ips), statistics.median(two_ips)
    ratio, speedup = tool / bare, two / one
    return {"bench": "fid", "metric": "feature images/s of tools/fid.py / bare loop over the same Inception (1 thread)",
            "ratio": round(ratio, 4), "target": 0.95, "ok": ratio >= 0.95,
            "tool_images_per_s": round(tool, 3), "bare_images_per_s": round(bare, 3),
            "speedup_2_ranks": round(speedup, 4), "speedup_target": 1.7, "speedup_ok": speedup >= 1.7,
            "one_rank_images_per_s": round(one, 3), "two_rank_images_per_s": round(two, 3),
            # images per CPU second of the 1-thread processes: the overhead with CPU contention factored out
            "ratio_cpu_time": round(statistics.median(tool_cpu) / statistics.median(bare_cpu), 4),
            "raw": {"tool": tool_ips, "bare": bare_ips, "one_rank": one_ips, "two_ranks": two_ips,
                    "tool_per_cpu_s": tool_cpu, "bare_per_cpu_s": bare_cpu},
            "images": a.images, "batch_size": a.batch_size, "reps": a.reps, "input_side": 64,
            "weights": "BN-recalibrated random Inception (pt_inception layout; not the FID weights)",
            "load_average": os.getloadavg()[0]}
