"""The whole pipeline on real data in one command: Fashion-MNIST, shards, 16² pretrain, 32² finetune, grids, metric.

    python tools/demo.py                              # `make demo`: <= 15 min on 2 CPU cores, no GPU
    python tools/demo.py --small                      # the same pipeline at toy size (tests/test_demo.py)
    python tools/demo.py --docs-images docs/images    # also refresh the README's sample grids

Every stage is the project's own command line, run as a subprocess and printed, so the demo doubles as a
walkthrough (docs/reference.md §3.4 weak-to-strong, §5 training-free upsampling):
 1. tools/make_shards.py          Fashion-MNIST IDX files (Debian dataset-fashion-mnist) -> 32x32 grey PNG shards
 2. dimscale.metrics.classifier   a small Fashion-MNIST classifier, the offline stand-in detector (no Inception offline)
    tools/fid.py ref              and the reference statistics of the real shards in its feature space
 3. dimscale/train.py (pretrain)  2 ranks (torchrun, DeepSpeed ZeRO-2, gloo, wandb offline), the loader downsamples
 4. dimscale/train.py (finetune)  2 ranks at 32x32, initialised from the pretrain's EMA snapshot (pos-emb interpolated)
 5. tools/sample.py               a class-conditional 32x32 grid, and a 64x64 one with Upsample Guidance (--upsample 2)
 6. tools/fid.py eval (2 ranks)   Fréchet distance in the classifier's features + its accuracy on the model's own
                                  class-conditional samples (NOT FID; ~10% for noise, the demo's target is >= 60%),
                                  for the final 32x32 model, then the same for the 16x16 pretraining snapshot
Hyper-parameters live in configs/demo_pretrain_16.json and configs/demo_finetune_32.json; --small overrides them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
TARGET_ACCURACY = 0.60
STAGES = ("shards", "classifier", "reference", "pretrain_16", "finetune_32", "grid_32", "grid_64_upsampled",
          "grid_16_pretrain", "metric", "metric_pretrain_16")

# Sizes of the two modes; everything not listed here comes from the demo configs.
FULL = dict(shard_limit=0, clf_limit=0, clf_epochs=2, pretrain_images=None, finetune_images=None,
            grid_per_class=2, upsample_per_class=1, metric_samples=200, ref_images=10000, steps=None)
SMALL = dict(shard_limit=2000, clf_limit=2000, clf_epochs=1, pretrain_images=256, finetune_images=128,
             grid_per_class=1, upsample_per_class=0.2, metric_samples=20, ref_images=500, steps=4)


def parse_args(argv):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="folder for every artifact (shards, runs, grids, metrics)")
    p.add_argument("--small", action="store_true", help="fewer images and steps: the CI-sized end-to-end check")
    p.add_argument("--docs-images", default="", help="also copy the two grids here (docs/images for the README)")
    p.add_argument("--idx", default=FASHION_MNIST, help="Fashion-MNIST IDX folder")
    p.add_argument("--nproc", type=int, default=2, help="training ranks (processes)")
    p.add_argument("--from-stage", default=STAGES[0], choices=STAGES,
                   help="skip the stages before this one (their outputs in --out are reused)")
    return p.parse_args(argv)


def run(name: str, cmd: list, env: dict, log_dir: str, timings: dict, first: str = STAGES[0]) -> str:
    """Run one stage, echo its command, tee its output to log_dir/name.log; stop the demo with the log on failure."""
    log_path = os.path.join(log_dir, f"{name}.log")
    if STAGES.index(name) < STAGES.index(first):
        print(f"\n=== {name}: skipped (--from-stage {first}), reusing {log_path}", flush=True)
        with open(log_path) as f:
            return f.read()
    print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0, ru0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if not line.startswith(("\r",)) and "it/s]" not in line and "s/it]" not in line:
                print(f"  {line}", end="", flush=True)
        rc = proc.wait()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    timings[name] = round(time.time() - t0, 1)
    # CPU seconds of the stage's processes: on a shared machine, cpu_s / 2 estimates the stage's time on 2 idle cores
    cpu_seconds[name] = round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 1)
    if rc != 0:
        sys.exit(f"demo: stage '{name}' failed with exit code {rc}; full output in {log_path}")
    return "".join(lines)


cpu_seconds: dict = {}


def last_json(text: str) -> dict:
    """The last line of a command's output that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON record in the command's output")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    size = SMALL if args.small else FULL
    if not os.path.isfile(os.path.join(args.idx, "train-images-idx3-ubyte.gz")):
        sys.exit(f"demo: Fashion-MNIST not found in {args.idx}; install it with "
                 f"`apt-get install -y --no-install-recommends dataset-fashion-mnist` (or pass --idx FOLDER)")
    out = os.path.abspath(args.out)
    shards, runs, logs = (os.path.join(out, d) for d in ("shards", "runs", "logs"))
    for d in (out, logs):
        os.makedirs(d, exist_ok=True)
    py = sys.executable
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # One thread per training rank (2 ranks = 2 cores); single-process stages use every core.
    env_ranks = {**env, "OMP_NUM_THREADS": "1"}
    timings: dict = {}
    t_start = time.time()

    # 1. shards: 32x32 grey PNGs in one square bucket
    cmd = [py, "tools/make_shards.py", args.idx, shards, "--resolution", "32", "--buckets", "32x32",
           "--format", "png", "--channels", "1", "--workers", "2", "--no-progress"]
    if size["shard_limit"]:
        cmd += ["--limit", str(size["shard_limit"])]
    run("shards", cmd, env, logs, timings, args.from_stage)

    # 2. the stand-in detector, and the reference statistics of the real 32x32 shards in its feature space
    clf = os.path.join(out, "fmnist_classifier.safetensors")
    cmd = [py, "-m", "dimscale.metrics.classifier", "train", "--idx", args.idx, "--out", clf,
           "--epochs", str(size["clf_epochs"])]
    if size["clf_limit"]:
        cmd += ["--limit", str(size["clf_limit"])]
    run("classifier", cmd, env, logs, timings, args.from_stage)

    ref = os.path.join(out, "reference_fcd.npz")
    run("reference", [py, "tools/fid.py", "ref", shards, "--out", ref, "--num-images", str(size["ref_images"]),
                      "--detector", f"classifier:{clf}", "--no-progress"], env, logs, timings, args.from_stage)

    # 3-4. pretrain at 16x16, finetune at 32x32 from the pretrain's EMA snapshot (weak-to-strong, docs/reference.md §3.4)
    # torchrun, then `--` so that script options are never taken for abbreviations of torchrun's (--num)
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), "--"]
    launch = torchrun + ["dimscale/train.py"]
    common = ["--set", f"out_dir={runs}", "--set", f"data.shards={shards}", "--set", "train.wandb=offline"]
    pre = launch + ["--config", "configs/demo_pretrain_16.json"] + common
    if size["pretrain_images"]:
        pre += ["--set", f"train.total_images={size['pretrain_images']}", "--set", "train.warmup_images=64"]
    run("pretrain_16", pre, env_ranks, logs, timings, args.from_stage)
    pre_snap = os.path.join(runs, "demo_pretrain_16", "snapshots", "latest")
    fin = launch + ["--config", "configs/demo_finetune_32.json"] + common + ["--set", f"init.snapshot={pre_snap}"]
    if size["finetune_images"]:
        fin += ["--set", f"train.total_images={size['finetune_images']}", "--set", "train.warmup_images=64"]
    run("finetune_32", fin, env_ranks, logs, timings, args.from_stage)
    snap = os.path.join(runs, "demo_finetune_32", "snapshots", "latest")
    with open(os.path.join(ROOT, "configs", "demo_finetune_32.json")) as f:
        diffusion = json.load(f).get("diffusion", {})
    steps = str(size["steps"] or diffusion.get("sample_steps", 50))
    cfg_scale = str(diffusion.get("cfg_scale", 0.4))

    # 5. grids: one column per class (labels 0..9 repeated), at 32x32 and upsampled to 64x64
    grid32, grid64 = os.path.join(out, "grid_32.png"), os.path.join(out, "grid_64_upsampled.png")
    n32 = 10 * size["grid_per_class"]
    n64 = max(2, round(10 * size["upsample_per_class"]))
    sample = lambda snapshot, n: [py, "tools/sample.py", "--snapshot", snapshot, "--steps", steps, "--cfg-scale", cfg_scale,
                                  "--nrow", "10", "--labels", ",".join(str(i % 10) for i in range(n))]
    run("grid_32", sample(snap, n32) + ["--out", grid32], env, logs, timings, args.from_stage)
    run("grid_64_upsampled", sample(snap, n64) + ["--upsample", "2", "--seed", "1000", "--out", grid64], env, logs,
        timings, args.from_stage)
    grid16 = os.path.join(out, "grid_16_pretrain.png")                  # what the finetune starts from
    run("grid_16_pretrain", sample(pre_snap, n32) + ["--out", grid16], env, logs, timings, args.from_stage)

    # 6. the metric, on 2 ranks like a cluster FID: the model's class-balanced samples -> Fréchet classifier
    #    distance to the reference + the classifier's accuracy on the intended labels; then the same for the
    #    16x16 pretraining snapshot, which shows what the finetune keeps (or not yet) of it
    def evaluate(name: str, snapshot: str) -> tuple:
        json_out = os.path.join(out, f"{name}.json")
        record = last_json(run(name, torchrun + [
            "tools/fid.py", "eval", "--snapshot", snapshot, "--ref", ref, "--detector", f"classifier:{clf}",
            "--num-images", str(size["metric_samples"]), "--labels", "balanced", "--steps", steps, "--cfg-scale", cfg_scale,
            "--batch-size", "50", "--json-out", json_out, "--no-progress"], env_ranks, logs, timings, args.from_stage))
        return record.get("metrics", record), json_out

    metric, metric_json = evaluate("metric", snap)
    metric16, metric16_json = evaluate("metric_pretrain_16", pre_snap)
    accuracy = metric.get("classifier_accuracy")

    if args.docs_images:
        os.makedirs(args.docs_images, exist_ok=True)
        shutil.copy(grid32, os.path.join(args.docs_images, "demo_grid_32.png"))
        shutil.copy(grid64, os.path.join(args.docs_images, "demo_grid_64_upsampled.png"))
        shutil.copy(grid16, os.path.join(args.docs_images, "demo_grid_16_pretrain.png"))

    total = round(time.time() - t_start, 1)
    met = accuracy is not None and accuracy >= TARGET_ACCURACY
    summary = {"total_s": total, "stages_s": timings, "stages_cpu_s": cpu_seconds,
               "accuracy": accuracy, "target_accuracy": TARGET_ACCURACY,
               "target_met": met, "fcd_not_fid": metric.get("fcd_not_fid"),
               "small": args.small, "metric": metric, "metric_pretrain_16": metric16,
               "artifacts": {"shards": os.path.join(shards, "manifest.json"),
                             "pretrain_run": os.path.join(runs, "demo_pretrain_16"),
                             "pretrain_snapshot": pre_snap,
                             "finetune_run": os.path.join(runs, "demo_finetune_32"),
                             "finetune_snapshot": snap, "grid_32": grid32, "grid_64_upsampled": grid64,
                             "grid_16_pretrain": grid16,
                             "classifier": clf, "metric": metric_json, "metric_pretrain_16": metric16_json,
                             "logs": logs,
                             "wandb_offline": os.path.join(runs, "demo_finetune_32", "wandb")}}
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n=== demo done in %.0f s (%s)" % (total, ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())))
    print("    CPU seconds per stage: %s (total %.0f)" % (", ".join(f"{k} {v:.0f}" for k, v in cpu_seconds.items()),
                                                        sum(cpu_seconds.values())))
    for k, v in summary["artifacts"].items():
        print(f"  {k:18s} {v}")
    print(f"  {'summary':18s} {os.path.join(out, 'demo_summary.json')}")
    verdict = "meets" if met else "is BELOW"
    print(f"classifier accuracy on the model's class-conditional samples: {accuracy} "
          f"({verdict} the {TARGET_ACCURACY:.0%} target; ~10% for noise). Fréchet classifier distance: "
          f"{metric.get('fcd_not_fid')} (not FID)")
    print(f"the same on the 16x16 pretraining snapshot: accuracy {metric16.get('classifier_accuracy')}, "
          f"Fréchet classifier distance {metric16.get('fcd_not_fid')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
