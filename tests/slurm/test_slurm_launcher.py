"""launchers/slurm.py against the real local SLURM cluster (tests/slurm/cluster/up.sh; README in ../shared/slurm).

Every test submits real jobs through the launcher's command line and waits on sacct. The trainer is the real
dimscale.train on tiny Fashion-MNIST shards when the package is complete; otherwise (or with
DIMSCALE_TEST_TRAINER set) the test-only stand-in tests/slurm/fake_trainer.py, which keeps the same contract.
The configs (tests/slurm/configs) use DiM-T/2 with the attention mixer: a CPU Mamba step is ~20x slower, and
these tests are about processes, signals and requeues, not the mixer. The time-limit run starts early (module
fixture) and is checked last, so its requeue overlaps the other tests.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(REPO, "launchers", "slurm.py")
PRE, FT = os.path.join(HERE, "configs", "slurm_pre.json"), os.path.join(HERE, "configs", "slurm_ft.json")
FASHION = "/usr/share/datasets/fashion-mnist"
FAKE = os.path.join(HERE, "fake_trainer.py") + ":main"


def _cluster_problem() -> str:
    if shutil.which("sinfo") is None:
        return "no SLURM client (sinfo) here; start the local cluster as root: bash tests/slurm/cluster/up.sh"
    out = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%t"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return f"the local SLURM cluster is not answering ({out.stderr.strip()}); run bash tests/slurm/cluster/up.sh"
    return ""


if _cluster_problem():
    pytest.skip(_cluster_problem(), allow_module_level=True)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def _real_trainer_problem() -> str:
    """Why the real trainer cannot run here ('' if it can)."""
    if os.environ.get("DIMSCALE_TEST_TRAINER"):
        return "DIMSCALE_TEST_TRAINER is set"
    try:
        importlib.import_module("dimscale.train").main
        importlib.import_module("dimscale.models").MODEL_ZOO
        importlib.import_module("dimscale.data").build_loader
        importlib.import_module("dimscale.diffusion").training_loss
    except Exception as e:  # the package is still being written
        return f"dimscale trainer not importable yet: {e!r}"
    if not os.path.isfile(os.path.join(REPO, "tools", "make_shards.py")) or not os.path.isdir(FASHION):
        return "tools/make_shards.py or the Fashion-MNIST data is missing"
    return ""


@pytest.fixture(scope="module")
def trainer():
    """Environment and overrides every launch uses: the real trainer + tiny shards, or the stand-in."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    # not pytest's tmp_path: other pytest sessions on this machine prune it while our jobs still write there
    root = pathlib.Path(tempfile.mkdtemp(prefix="dimscale-slurm-test-", dir="/tmp"))
    problem = _real_trainer_problem()
    if problem:
        print(f"\nslurm tests use the stand-in trainer: {problem}")
        env.update(DIMSCALE_TEST_TRAINER=os.environ.get("DIMSCALE_TEST_TRAINER") or FAKE,
                   FAKE_STEP_S=os.environ.get("FAKE_STEP_S", "0.25"))
        shards = str(root / "no_shards")
    else:
        shards = str(root / "shards")
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_shards.py"), FASHION, shards,
                        "--resolution", "16", "--format", "png", "--limit", "512", "--shard-size", "256",
                        "--workers", "1", "--no-progress"], check=True, env=env, capture_output=True)
    yield {"env": env, "root": root, "sets": [f"data.shards={shards}"], "real": not problem}
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], capture_output=True)
    if not os.environ.get("DIMSCALE_KEEP_TEST_RUNS"):
        shutil.rmtree(root, ignore_errors=True)


SUBMITTED = []  # every job these tests submitted, cancelled at the end if still queued


def launch(trainer, *args, check=True, timeout=120) -> subprocess.CompletedProcess:
    """Run the launcher's command line as a user would."""
    cmd = [sys.executable, LAUNCHER, *args] + [a for s in trainer["sets"] for a in ("--set", s)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=trainer["env"], cwd=REPO, timeout=timeout)
    SUBMITTED.extend(job_ids(out.stdout).values())
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def job_ids(stdout: str) -> dict:
    """{stage name: job id} from the launcher's 'submitted job N' lines."""
    return dict(re.findall(r"\[(\S+)\] submitted job (\d+)", stdout))


def sacct_state(job: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    return out.stdout.strip().split("\n")[0].split(" ")[0]


def wait_done(jobs, timeout: float, run_dir: str = "") -> None:
    """Wait until every job has left the queue for good; fail with its log if one did not complete."""
    deadline, pending = time.time() + timeout, set(jobs)
    while pending and time.time() < deadline:
        for j in list(pending):
            if sacct_state(j) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
                pending.discard(j)
        time.sleep(1)
    for j in jobs:
        state = sacct_state(j)
        assert state == "COMPLETED", f"job {j} is {state}:\n{job_log(run_dir, j) if run_dir else ''}"


def job_log(run_dir: str, job: str) -> str:
    """Rank 0's stdout and stderr over every restart (submitit opens them in append mode)."""
    text = ""
    for path in sorted(glob.glob(os.path.join(run_dir, "slurm", job, f"{job}_0_log.*"))):
        with open(path) as f:
            text += f.read()
    return text


def metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def wait_images(run_dir: str, images: int, timeout: float) -> int:
    """Block until the run has logged at least `images` images seen; returns the last logged count."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics(run_dir)
        if m and m[-1]["images_seen"] >= images:
            return m[-1]["images_seen"]
        time.sleep(0.5)
    raise AssertionError(f"{run_dir} did not reach {images} images in {timeout} s: {metrics(run_dir)[-3:]}")


def assert_resumed(run_dir: str, log: str, total: int, batch: int, ckpt_every: int) -> list:
    """The run was restarted at least once, every restart continued from a checkpoint no older than the last
    periodic one (images-seen continues), and it ended at total. Returns the resume points."""
    restarts = [int(r) for r in re.findall(r"\[launcher [\d:]+\] stage \S+ job \S+ restart (\d+)", log)]
    assert max(restarts) >= 1, f"never restarted:\n{log}"
    return assert_continues(run_dir, log, total, batch, ckpt_every)


def assert_continues(run_dir: str, log: str, total: int, batch: int, ckpt_every: int) -> list:
    """Every rerun in the log continued from a checkpoint no older than the last periodic one, up to total."""
    resumes = [m["images_seen"] for m in metrics(run_dir) if m.get("event") == "resumed"]
    assert resumes and min(resumes) > 0, f"never resumed from a checkpoint:\n{log}"
    seen, prev = [m["images_seen"] for m in metrics(run_dir) if "event" not in m], 0
    for v in seen:
        if v != prev + batch:  # a rerun starts over from its checkpoint
            start = v - batch
            assert start in resumes, f"images {prev} -> {v}: no resume from {start} in the log"
            assert (prev // ckpt_every) * ckpt_every <= start <= prev, f"lost progress: {prev} -> resumed at {start}"
        prev = v
    assert seen[-1] == total
    with open(os.path.join(run_dir, "done.json")) as f:
        assert json.load(f)["images_seen"] == total
    return resumes


def cfg_train(path: str) -> dict:
    with open(path) as f:
        return json.load(f)["train"]


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

RATE = {}  # images/s of a 2-rank tiny run, measured by the chain test; sizes the time-limit run


def run_seconds(job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    parts = [int(x) for x in re.search(r"RunTime=(?:\d+-)?([\d:]+)", out).group(1).split(":")]
    return sum(v * 60 ** i for i, v in enumerate(reversed(parts)))


def drive_time_limit(job: str, run_dir: str, first_images: int, report: dict) -> None:
    """Once the job trained past its first checkpoint, cut its time limit so SLURM's --signal fires within
    ~30 s (remaining <= signal delay + 30 s) and the limit would then kill it; after the requeue, restore
    10 minutes so the rerun finishes. Runs in a thread while the other tests go on."""
    try:
        wait_images(run_dir, first_images, timeout=300)
        limit_min = run_seconds(job) // 60 + 2  # 60-120 s left: signal at the next check, kill >= 60 s later
        subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit_min}"], check=True)
        report["limit_min"] = limit_min
        deadline = time.time() + 150
        while "requeued job" not in job_log(run_dir, job) and time.time() < deadline:
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True)
    except Exception as e:  # re-raised by the test
        report["error"] = e


@pytest.fixture(scope="module")
def time_limit_run(trainer):
    """A run that hits a (shortened) time limit: started early, checked by the last test."""
    out_dir, t = trainer["root"] / "timelimit", cfg_train(PRE)
    rate = RATE.get("images_per_s") or (t["global_batch"] / float(trainer["env"].get("FAKE_STEP_S", 0.1)))
    first = t["ckpt_every_images"] + 2 * t["global_batch"]
    # still training when the signal comes (<= 30 s after the limit is cut; other tests' load only slows it)
    total = t["global_batch"] * int((first + rate * 40) / t["global_batch"])
    out = launch(trainer, PRE, "--stage", "pretrain", "--nodes", "1", "--tasks-per-node", "2", "--time", "10",
                 "--signal-delay-s", "90", "--sbatch", "nodelist=node2", "--set", f"out_dir={out_dir}",
                 "--set", "name=timelimit", "--set", f"train.total_images={total}")
    (job,) = job_ids(out.stdout).values()
    run_dir, report = str(out_dir / "timelimit"), {}
    driver = threading.Thread(target=drive_time_limit, args=(job, run_dir, first, report), daemon=True)
    driver.start()
    return {"job": job, "run_dir": run_dir, "total": total, "driver": driver, "report": report}


def test_bad_requests_fail_at_submission(trainer):
    out = launch(trainer, FT, "--nodes", "2", "--set", "train.global_batch=33", check=False)
    assert out.returncode == 2
    assert "config error" in out.stderr and "global_batch" in out.stderr
    assert "submitted job" not in out.stdout
    out = launch(trainer, PRE, "--nodes", "3", "--set", "train.global_batch=48", "--set",
                 f"out_dir={trainer['root'] / 'refused'}", check=False)  # the cluster has 2 nodes
    assert out.returncode == 2 and "sbatch refused" in out.stderr and "submitted job" not in out.stdout, out


def test_chain_dry_run_matches_then_completes_from_snapshot(trainer):
    out_dir = trainer["root"] / "chain"
    args = [FT, "--nodes", "2", "--time", "10", "--cpus-per-task", "1", "--mem-gb-per-task", "2", "--partition",
            "debug", "--sbatch", "comment=dimscale-test", "--job-name", "t-chain", "--set", f"out_dir={out_dir}"]
    dry = launch(trainer, *args, "--dry-run").stdout
    assert "submitted job" not in dry and not os.path.exists(out_dir)
    for flag in ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--mem=2GB", "--partition=debug",
                 "--comment=dimscale-test", "--time=10", "--requeue", "--dependency=afterok:JOBID_OF_slurm_pre"):
        assert f"#SBATCH {flag}\n" in dry, flag
    blocks = {name: (argv, script) for name, argv, script in
              re.findall(r"== \[(\S+)\] run folder .*?\ntrainer argv: (.*?)\n(#!/bin/bash.*?)(?=\n== |\Z)", dry, re.S)}

    out = launch(trainer, *args).stdout
    jobs = job_ids(out)
    assert list(jobs) == ["slurm_pre", "slurm_ft"], out
    for name, job in jobs.items():  # what --dry-run printed is what sbatch got
        argv, script = blocks[name]
        folder = out_dir / name / "slurm" / job
        with open(folder / f"{job}_submission.sh") as f:
            submitted = f.read().rstrip("\n")
        assert submitted == script.replace("JOBID_OF_slurm_pre", jobs["slurm_pre"]).rstrip("\n")
        import submitit
        task = submitit.core.utils.DelayedSubmission.load(folder / f"{job}_submitted.pkl").function
        assert task.stage.argv == json.loads(argv)
    assert f"afterok:{jobs['slurm_pre']}" in open(out_dir / "slurm_ft" / "slurm" / jobs["slurm_ft"] /
                                                  f"{jobs['slurm_ft']}_submission.sh").read()
    wait_done(list(jobs.values()), timeout=240)

    pre, ft = metrics(str(out_dir / "slurm_pre")), metrics(str(out_dir / "slurm_ft"))
    if "images_per_s" in pre[-1]:
        RATE["images_per_s"] = sorted(m["images_per_s"] for m in pre)[len(pre) // 2]
    assert "world 2" in job_log(str(out_dir / "slurm_pre"), jobs["slurm_pre"])
    assert pre[-1]["images_seen"] == cfg_train(PRE)["total_images"]
    assert ft[-1]["images_seen"] == cfg_train(FT)["total_images"]
    # the finetune starts from the pretrain's EMA snapshot: its first loss is well below a fresh model's
    assert ft[0]["loss"] < 0.8 * pre[0]["loss"], (pre[:2], ft[:2])
    assert str(out_dir / "slurm_pre" / "snapshots" / "latest") in json.dumps(task.stage.argv)

    status = launch(trainer, "status", FT, "--set", f"out_dir={out_dir}").stdout
    assert re.search(r"slurm_pre\s+finished", status) and re.search(r"slurm_ft\s+finished", status), status
    status = launch(trainer, "status", str(out_dir / "slurm_ft")).stdout
    ft_total = cfg_train(FT)["total_images"]
    assert re.search(rf"slurm_ft\s+finished\s+images {ft_total}/{ft_total}", status), status

    again = launch(trainer, *args).stdout  # resubmitting a finished chain runs nothing
    assert "submitted job" not in again and "nothing to submit" in again, again


def two_node_run_past_a_checkpoint(trainer, name: str) -> tuple:
    """Submit the pretraining stage on both nodes and wait until it has trained past its first checkpoint."""
    out_dir, t = trainer["root"] / name, cfg_train(PRE)
    out = launch(trainer, PRE, "--stage", "pretrain", "--nodes", "2", "--time", "10", "--sbatch", "nodelist=node[1-2]",
                 "--set", f"out_dir={out_dir}", "--set", f"name={name}")
    (job,) = job_ids(out.stdout).values()
    run_dir = str(out_dir / name)
    wait_images(run_dir, t["ckpt_every_images"] + 2 * t["global_batch"], timeout=180)
    return job, run_dir, t


def test_scontrol_requeue_resumes_from_latest(trainer, time_limit_run):  # time-limit job runs alongside
    job, run_dir, t = two_node_run_past_a_checkpoint(trainer, "requeue")
    subprocess.run(["scontrol", "requeue", job], check=True)  # no USR2: SIGTERM, then SIGKILL after KillWait
    wait_done([job], timeout=180, run_dir=run_dir)
    assert_resumed(run_dir, job_log(run_dir, job), t["total_images"], t["global_batch"], t["ckpt_every_images"])


def test_preemption_by_urgent_partition_resumes(trainer):
    out_dir, t = trainer["root"] / "preempt", cfg_train(PRE)
    out = launch(trainer, PRE, "--stage", "pretrain", "--nodes", "1", "--tasks-per-node", "2", "--time", "10",
                 "--sbatch", "nodelist=node1", "--set", f"out_dir={out_dir}", "--set", "name=preempt")
    (job,) = job_ids(out.stdout).values()
    run_dir = str(out_dir / "preempt")
    wait_images(run_dir, t["ckpt_every_images"] + 2 * t["global_batch"], timeout=180)
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-w", "node1", "-n", "1", "-c", "8",
                             "-o", "/dev/null", "--wrap", "sleep 1"], capture_output=True, text=True, check=True)
    wait_done([job, urgent.stdout.strip()], timeout=240, run_dir=run_dir)
    log = job_log(run_dir, job)
    assert "requeued job" in log or "not requeuing" in log, log  # the trainer saved and the launcher acted
    assert_resumed(run_dir, log, t["total_images"], t["global_batch"], t["ckpt_every_images"])


def test_master_port_stays_below_the_ephemeral_range():
    from dimscale.distributed import master_port  # what launchers/slurm.py gives each job
    ports = {master_port(str(job), restart) for job in range(0, 200000, 7) for restart in range(3)}
    assert min(ports) >= 20000 and max(ports) < 32768
    assert master_port("31591", 0) != master_port("31591", 1) != master_port("31592", 0)


def test_local_executor_runs_the_chain(trainer):
    out_dir = trainer["root"] / "local"
    out = launch(trainer, FT, "--local", "--tasks-per-node", "2", "--time", "10", "--set", f"out_dir={out_dir}",
                 "--set", "train.total_images=64", timeout=300).stdout
    assert re.search(r"\[slurm_pre\] finished: .*'images_seen': 64", out), out
    assert re.search(r"\[slurm_ft\] finished: .*'images_seen': 64", out), out
    ft_log = "".join(open(p).read() for p in glob.glob(str(out_dir / "slurm_ft" / "slurm" / "*" / "*_0_log.out")))
    assert f"initialised from snapshot {out_dir / 'slurm_pre' / 'snapshots' / 'latest'}" in ft_log, ft_log


def test_time_limit_requeues_and_completes(trainer, time_limit_run):
    job, run_dir, t = time_limit_run["job"], time_limit_run["run_dir"], cfg_train(PRE)
    time_limit_run["driver"].join(timeout=400)
    assert "error" not in time_limit_run["report"], time_limit_run["report"]
    wait_done([job], timeout=300, run_dir=run_dir)
    log = job_log(run_dir, job)
    assert "requeued job" in log and "state was RUNNING" in log, log  # saved on USR2, before the limit
    assert_resumed(run_dir, log, time_limit_run["total"], t["global_batch"], t["ckpt_every_images"])


def test_queued_chain_is_said_to_be_queued_not_finished(trainer):
    out_dir = trainer["root"] / "held"
    sets = ["--set", f"out_dir={out_dir}"]
    first = launch(trainer, PRE, "--sbatch", "hold", "--time", "10", *sets).stdout  # held: stays PENDING
    (job,) = job_ids(first).values()
    try:
        again = launch(trainer, PRE, "--time", "10", *sets).stdout
        assert f"job {job} is already PENDING: not submitted again" in again, again
        assert "every stage has finished" not in again and "already in the queue: slurm_pre" in again, again
        status = launch(trainer, "status", PRE, *sets).stdout
        assert f"job {job} PENDING" in status and "finished" not in status, status
    finally:
        subprocess.run(["scancel", job], capture_output=True)


def squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def test_requeued_onto_fewer_nodes_resumes(trainer):
    """A --nodes 2 job is requeued, comes back on 1 node (the pending job reshaped, as an admin or a smaller
    free partition would) and completes: DeepSpeed state and data order reshard, images-seen continues."""
    job, run_dir, t = two_node_run_past_a_checkpoint(trainer, "renode")
    subprocess.run(["scontrol", "requeuehold", job], check=True)  # SIGTERM now; pending and held afterwards
    deadline = time.time() + 120
    while squeue_state(job) != "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1", "ReqNodeList=node1"], check=True)
    subprocess.run(["scontrol", "release", job], check=True)
    wait_done([job], timeout=240, run_dir=run_dir)
    log = job_log(run_dir, job)
    assert re.search(r"restart 0 on .* world 2:", log) and re.search(r"restart 1 on .* world 1:", log), log
    if trainer["real"]:
        assert [(m["saved_world_size"], m["world_size"]) for m in metrics(run_dir) if m.get("event") == "resumed"] \
            == [(2, 1)], log
        assert {m["world_size"] for m in metrics(run_dir) if "event" not in m} == {1, 2}
    assert_resumed(run_dir, log, t["total_images"], t["global_batch"], t["ckpt_every_images"])


def test_chain_resubmitted_with_other_nodes_resumes(trainer):
    """The same stage cancelled on 2 nodes and submitted again with --nodes 1 continues from checkpoints/latest."""
    out_dir, t = trainer["root"] / "resubmit", cfg_train(PRE)
    common = [PRE, "--stage", "pretrain", "--time", "10", "--set", f"out_dir={out_dir}", "--set", "name=resubmit"]
    (job,) = job_ids(launch(trainer, *common, "--nodes", "2", "--sbatch", "nodelist=node[1-2]").stdout).values()
    run_dir = str(out_dir / "resubmit")
    wait_images(run_dir, t["ckpt_every_images"] + 2 * t["global_batch"], timeout=180)
    subprocess.run(["scancel", job], check=True)
    deadline = time.time() + 120
    while squeue_state(job) and time.time() < deadline:
        time.sleep(0.5)
    (job2,) = job_ids(launch(trainer, *common, "--nodes", "1").stdout).values()
    wait_done([job2], timeout=240, run_dir=run_dir)
    log = job_log(run_dir, job) + job_log(run_dir, job2)
    assert "world 2:" in job_log(run_dir, job) and "world 1:" in job_log(run_dir, job2), log
    if trainer["real"]:
        assert [(m["saved_world_size"], m["world_size"]) for m in metrics(run_dir) if m.get("event") == "resumed"] \
            == [(2, 1)], log
    assert_continues(run_dir, log, t["total_images"], t["global_batch"], t["ckpt_every_images"])
