"""Real 2-rank CPU runs of dimscale/train.py (gloo): ZeRO stages, kill -9 + resume, kills mid-checkpoint, signals.

Ranks are real processes: torchrun subprocesses (killed with SIGKILL as a scheduler would) or spawned workers
that call train.main() in-process (as the SLURM launcher does). Tiny DiM-T/2 on 8x8 grey Fashion-MNIST.
"""
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "dim_t_cpu.json"
FMNIST = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------
# Helpers shared with tests/test_train.py
# ------------------------------------------------------------------------------------------------

def fmnist_shards() -> str:
    """16x16 Fashion-MNIST shards (1024 images), built once per machine with tools/make_shards.py."""
    if not os.path.isdir(FMNIST):
        pytest.skip("dataset-fashion-mnist is not installed (make apt)")
    out = os.path.join(tempfile.gettempdir(), "dimscale-test-fmnist16-v1")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        subprocess.run([sys.executable, "tools/make_shards.py", FMNIST, out, "--resolution", "16", "--format", "png",
                        "--limit", "1024", "--shard-size", "256", "--workers", "1", "--no-progress"],
                       cwd=REPO, check=True, timeout=300, capture_output=True)
    return out


def overrides(shards, out_dir, name, **train) -> list:
    """--set arguments for a tiny fp32 run logging every step (16 images per step, 2 micro-batches per rank)."""
    sets = {"data.shards": shards, "out_dir": str(out_dir), "name": name, "train.total_images": 128,
            "train.global_batch": 16, "train.micro_batch": 4, "train.log_every_steps": 1,
            "train.precision": "fp32", "train.ckpt_every_images": 32, "train.snapshot_every_images": 0,
            "data.num_workers": 0, **{f"train.{k}": v for k, v in train.items()}}
    args = []
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def losses(run_dir) -> list:
    """[(step, loss)] from metrics.jsonl, in file order (a resumed run repeats the steps after its checkpoint)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "event" not in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def torchrun(args, log_path, script="dimscale/train.py", **env) -> subprocess.Popen:
    """Start `torchrun --nproc_per_node 2 SCRIPT ...` in its own process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, "--config", str(CONFIG), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(**env), stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def run_processes(marker) -> list:
    """Pids of live processes (the torchrun agent and its ranks) whose command line names `marker` (the run's
    out_dir): torchrun starts ranks in sessions of their own, so a process-group kill misses them."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            state = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(marker) in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def kill_run(proc, marker) -> None:
    """SIGKILL the agent and every rank by pid, as a scheduler does, and wait until none is left."""
    for pid in run_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert_none_left(marker)


def assert_none_left(marker, timeout=20) -> None:
    end = time.time() + timeout
    while run_processes(marker) and time.time() < end:
        time.sleep(0.1)
    assert not run_processes(marker), f"processes outlived the run: {run_processes(marker)}"


def finish(proc, log_path, timeout=300) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"run timed out; log:\n{Path(log_path).read_text()[-3000:]}")
    assert rc == 0, f"exit {rc}; log:\n{Path(log_path).read_text()[-3000:]}"


def wait_until(predicate, proc, log_path, timeout=300) -> None:
    end = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before the awaited event; log:\n"
                                 f"{Path(log_path).read_text()[-3000:]}")
        if time.time() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _worker(rank, port, argvs, results, preempt_file):
    """One spawned rank: joins a world of 2 and calls train.main(argv) for each argv (the launcher's in-process use)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from dimscale import train
    from dimscale import distributed
    distributed.init(0)

    def on_preempt(info):
        Path(preempt_file).write_text(json.dumps(info))

    results.put((rank, [train.main(argv, on_preempt=on_preempt) for argv in argvs]))
    exit_now(results)


def exit_now(results):
    """Flush the result queue, then skip interpreter teardown (gloo/DeepSpeed threads can stall it for a minute)."""
    results.close()
    results.join_thread()
    os._exit(0)


def spawn_two(argvs, preempt_file="", timeout=400, while_running=None):
    """Run the argv list on 2 spawned ranks; returns {rank: [exit codes]}. while_running(procs) runs alongside."""
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, argvs, results, preempt_file)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        if while_running is not None:
            while_running(procs)
        out = {}
        for _ in procs:
            rank, rcs = results.get(timeout=timeout)
            out[rank] = rcs
        return out
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


# ------------------------------------------------------------------------------------------------
# ZeRO stages
# ------------------------------------------------------------------------------------------------

def test_each_zero_stage_trains_and_fp32_stages_agree(tmp_path):
    shards = fmnist_shards()
    argvs = [["--config", str(CONFIG), *overrides(shards, tmp_path, f"zero{s}", zero_stage=s, lr=3e-3,
                                                 warmup_images=32, ckpt_every_images=0, total_images=192,
                                                 snapshot_every_images=192)]
             for s in range(4)]
    rcs = spawn_two(argvs)
    assert rcs == {0: [0] * 4, 1: [0] * 4}
    curves = [[loss for _, loss in losses(tmp_path / f"zero{s}")] for s in range(4)]
    for s, curve in enumerate(curves):
        assert len(curve) == 12
        first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
        assert last < 0.8 * first, f"ZeRO-{s} did not learn: {curve}"
        # same seed, same data: fp32 stages 0-2 reduce identically, stage 3 within float rounding
        for i in range(3):
            assert curve[i] == pytest.approx(curves[0][i], rel=1e-5, abs=1e-6), f"ZeRO-{s} step {i}: {curve[:3]}"
    for s in range(4):
        snap = tmp_path / f"zero{s}" / "snapshots" / "latest" / "snapshot.json"
        assert json.loads(snap.read_text())["images_seen"] == 192


# ------------------------------------------------------------------------------------------------
# The DeepSpeed launcher (`deepspeed --num_gpus 2 dimscale/train.py`): --local_rank, env from launch.py
# ------------------------------------------------------------------------------------------------

def test_deepspeed_launcher_runs_two_ranks(tmp_path):
    """`deepspeed --num_gpus 2` on CPU starts two ranks that share the run and each train on half the images."""
    log = tmp_path / "log.txt"
    # on CPU the launcher counts NUMA nodes as devices: --num_gpus 2 asks for two ranks on this one node
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "dimscale/train.py", "--config", str(CONFIG),
           *overrides(fmnist_shards(), tmp_path, "ds", total_images=32, ckpt_every_images=0)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    finish(proc, log, timeout=300)  # a cold start may JIT-build DeepSpeed ops first
    assert [s for s, _ in losses(tmp_path / "ds")] == [1, 2]  # 16 images per step: 2 ranks x 2 micro-batches x 4
    latest = tmp_path / "ds" / "checkpoints" / "latest"
    assert json.loads((latest / "trainer.json").read_text())["world_size"] == 2
    for rank in (0, 1):
        loader = torch.load(latest / f"rank{rank:05d}.pt", weights_only=True)["loader"]
        assert loader["step"] == 2 and "world_size" not in loader  # a global position
        assert sum(loader["seen_bucket"].values()) == 16  # each rank drew its own half of the 32 images


# ------------------------------------------------------------------------------------------------
# kill -9 and resume: bitwise equal losses
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run: {step: loss}."""
    out = tmp_path_factory.mktemp("ref")
    log = out / "log.txt"
    finish(torchrun(overrides(fmnist_shards(), out, "ref"), log), log)
    curve = losses(out / "ref")
    assert [s for s, _ in curve] == list(range(1, 9))
    return dict(curve)


def resumed_at(run_dir) -> list:
    """images_seen of each resume the run recorded in metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["images_seen"] for r in map(json.loads, f) if r.get("event") == "resumed"]


def test_kill9_at_random_step_then_resume_is_bitwise_identical(tmp_path, reference):
    shards, log = fmnist_shards(), tmp_path / "log.txt"
    args = overrides(shards, tmp_path, "run")
    kill_at = random.Random(os.getpid()).randint(3, 7)  # after the first checkpoint (step 2), before the end
    proc = torchrun(args, log)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(losses(tmp_path / "run")) >= kill_at, proc, log)
    kill_run(proc, tmp_path)
    assert not (tmp_path / "run" / "done.json").exists()   # the kill really stopped the ranks mid-run
    finish(torchrun(args, log), log)
    assert_none_left(tmp_path)
    curve = losses(tmp_path / "run")
    assert len(resumed_at(tmp_path / "run")) == 1 and 0 < resumed_at(tmp_path / "run")[0] < 128
    assert len(curve) >= 8  # steps between the checkpoint and the kill appear twice
    assert {s for s, _ in curve} == set(range(1, 9))
    for step, loss in curve:
        assert loss == reference[step], f"step {step}: {loss!r} != {reference[step]!r} uninterrupted (kill at {kill_at})"


def test_kill_during_checkpoint_write_keeps_a_loadable_latest(tmp_path, reference):
    shards, log = fmnist_shards(), tmp_path / "log.txt"
    args = overrides(shards, tmp_path, "run")
    ckpts = tmp_path / "run" / "checkpoints"
    writing = ckpts / "tmp-img000000000064"
    # both ranks have written their share of the 2nd checkpoint and rank 0 sleeps before publishing it
    proc = torchrun(["--pause-before-publish", "64:120", *args], log, script="tests/fault_trainer.py")
    wait_until(lambda: (writing / "rank00000.pt").exists() and (writing / "rank00001.pt").exists(), proc, log)
    kill_run(proc, tmp_path)
    assert os.readlink(ckpts / "latest") == "img000000000032"
    assert json.loads((ckpts / "latest" / "trainer.json").read_text())["images_seen"] == 32
    finish(torchrun(args, log), log)  # resumes from the 32-image checkpoint and finishes
    assert_none_left(tmp_path)
    assert resumed_at(tmp_path / "run") == [32]
    assert not writing.exists()
    for step, loss in losses(tmp_path / "run"):
        assert loss == reference[step], f"step {step} after the interrupted checkpoint differs"
    assert sorted(p.name for p in ckpts.glob("img*")) == ["img000000000096", "img000000000128"]  # keep last 2


def test_kill_after_the_final_checkpoint_completes_the_stage_on_rerun(tmp_path, reference):
    """Killed between the final checkpoint and the final snapshot: the rerun writes what the stage still owes."""
    shards, log = fmnist_shards(), tmp_path / "log.txt"
    args = overrides(shards, tmp_path, "run", snapshot_every_images=64)
    proc = torchrun(["--die-after-publish", "128", *args], log, script="tests/fault_trainer.py")
    proc.wait(timeout=300)
    kill_run(proc, tmp_path)
    run = tmp_path / "run"
    assert json.loads((run / "checkpoints" / "latest" / "trainer.json").read_text())["images_seen"] == 128
    assert json.loads((run / "snapshots" / "latest" / "snapshot.json").read_text())["images_seen"] == 64  # stale
    assert not (run / "done.json").exists()
    finish(torchrun(args, log), log)
    assert_none_left(tmp_path)
    assert json.loads((run / "snapshots" / "latest" / "snapshot.json").read_text())["images_seen"] == 128
    assert json.loads((run / "done.json").read_text())["images_seen"] == 128
    ema = load_file(run / "checkpoints" / "latest" / "ema.safetensors")
    snap = load_file(run / "snapshots" / "latest" / "ema.safetensors")
    assert all(torch.equal(ema[k], snap[k]) for k in ema)   # the final snapshot is the final checkpoint's EMA


def test_a_second_trainer_on_the_same_run_is_refused_and_ranks_die_with_their_agent(tmp_path):
    shards, log, log2 = fmnist_shards(), tmp_path / "log.txt", tmp_path / "log2.txt"
    args = overrides(shards, tmp_path, "run", total_images=100_000, ckpt_every_images=0)
    proc = torchrun(args, log)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(losses(tmp_path / "run")) >= 1, proc, log)
    second = torchrun(args, log2)
    assert second.wait(timeout=300) != 0
    text = log2.read_text()
    assert text.count("another trainer (pid ") == 1 and "one trainer per run folder" in text, text[-2000:]
    assert proc.poll() is None                              # the first run goes on untouched
    ranks = [pid for pid in run_processes(tmp_path) if pid != proc.pid]
    assert len(ranks) == 2
    os.kill(proc.pid, signal.SIGKILL)                        # only the agent: its ranks must follow it
    proc.wait()
    assert_none_left(tmp_path)


# ------------------------------------------------------------------------------------------------
# Preemption signals: one rank signalled, all ranks save at the same step boundary, exit 3
# ------------------------------------------------------------------------------------------------

def test_sigusr1_on_one_rank_saves_everywhere_and_exits_3(tmp_path):
    shards = fmnist_shards()
    argv = ["--config", str(CONFIG), *overrides(shards, tmp_path, "pre", total_images=100_000, ckpt_every_images=0)]
    metrics, preempt_file = tmp_path / "pre" / "metrics.jsonl", tmp_path / "preempted.json"

    def signal_rank1(procs):
        end = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert time.time() < end and all(p.is_alive() for p in procs)
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGUSR1)  # only rank 1: rank 0 learns of it through the all-reduce

    assert spawn_two([argv], str(preempt_file), while_running=signal_rank1) == {0: [3], 1: [3]}
    info = json.loads(preempt_file.read_text())
    seen = json.loads((tmp_path / "pre" / "checkpoints" / "latest" / "trainer.json").read_text())["images_seen"]
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["images_seen"]
    assert info["images_seen"] == seen == last_logged > 0
    assert os.path.realpath(info["checkpoint"]) == os.path.realpath(tmp_path / "pre" / "checkpoints" / "latest")


# ------------------------------------------------------------------------------------------------
# Resume loads DeepSpeed's files with weights_only=True: every ZeRO stage resumes, a pickle payload is refused
# ------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this writes a marker file: what a crafted checkpoint would do on every rank."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_every_zero_stage_resumes_with_weights_only_loads_and_a_pickle_is_refused(tmp_path):
    shards = fmnist_shards()
    runs = []
    for s in range(4):
        first = overrides(shards, tmp_path, f"z{s}", zero_stage=s, total_images=32, ckpt_every_images=32)
        more = overrides(shards, tmp_path, f"z{s}", zero_stage=s, total_images=64, ckpt_every_images=32)
        runs += [["--config", str(CONFIG), *first], ["--config", str(CONFIG), *more]]
    assert spawn_two(runs) == {0: [0] * 8, 1: [0] * 8}
    for s in range(4):
        assert resumed_at(tmp_path / f"z{s}") == [32]
        assert json.loads((tmp_path / f"z{s}" / "done.json").read_text())["images_seen"] == 64

    # a crafted model-states file in `latest`: resuming must refuse it without running it
    latest = tmp_path / "z2" / "checkpoints" / "latest"
    marker = tmp_path / "marker.txt"
    model_file = next(latest.glob("mp_rank_00_model_states.pt"))
    state = torch.load(model_file, weights_only=True)
    state["payload"] = _Payload(str(marker))
    torch.save(state, model_file)
    again = overrides(shards, tmp_path, "z2", zero_stage=2, total_images=96, ckpt_every_images=32)
    log = tmp_path / "log.txt"
    proc = torchrun(again, log)
    assert proc.wait(timeout=300) != 0
    assert not marker.exists(), "the pickle in the checkpoint ran"
    assert "refusing to load a checkpoint file that holds pickled code" in log.read_text()
    assert_none_left(tmp_path)
