"""Submit a DiM training chain (low-res pretrain -> high-res finetune) to SLURM through submitit.

    python launchers/slurm.py --nodes 8 --gpus-per-node 8 configs/dim_h_512.json
    python launchers/slurm.py --dry-run configs/dim_h_512.json       # print what would be submitted
    python launchers/slurm.py status configs/dim_h_512.json           # where each stage stands

The config names the stage it follows (`init.after_stage`, a config next to it); each earlier stage is
submitted first and the next one depends on it (afterok) and starts from its EMA snapshot
(`<run>/snapshots/latest`, passed as `--set init.snapshot=...`). Stages that already finished are skipped.

Preemption and time limits (docs/engineering-notes.md §B.23, §B.24): SLURM sends USR2 (`--signal`) to every task. The
trainer (dimscale/train.py) catches USR1/USR2/TERM, all ranks agree at the next step boundary, save
`checkpoints/latest`, call `on_preempt` on rank 0 and return 3. Only then, after the save is complete on
every rank, rank 0 requeues the job (`scontrol requeue`); the requeued job runs the same task, which resumes
from `latest` because the trainer always does, on whatever number of nodes it comes back with (the task count
follows the allocation; the trainer reshards checkpoints and keeps the global data order). An external
`scontrol requeue`/preemption kill sends SIGTERM and no USR2: the job is already being requeued, so rank 0
only exits, and the rerun resumes from the last checkpoint the trainer managed to write (the SIGTERM save if
it fits in KillWait, else the last periodic one).
A USR2 that arrives before the trainer has installed its handlers reaches submitit's, which calls
StageTask.checkpoint() and requeues at once: nothing new to save yet. Nothing here ever points at a numbered
checkpoint (MAE's requeue bug, docs/engineering-notes.md §B.24). `--local` runs the same tasks through submitit's local
executor, one stage after the other.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import submitit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python launchers/slurm.py` puts launchers/ first on sys.path, not the repo
    sys.path.insert(0, REPO)

from dimscale import distributed  # noqa: E402
from dimscale.config import ConfigError, load_config  # noqa: E402

TRAINER = "dimscale.train:main"
TEST_TRAINER_ENV = "DIMSCALE_TEST_TRAINER"  # test-only: 'path/to/file.py:main' replaces the real trainer
EXIT_PREEMPTED = 3                          # trainer contract: checkpoint saved, resumable
DONE_FILE = "done.json"                     # written by the trainer when a stage reaches total_images
JOBS_FILE = "slurm_jobs.jsonl"              # one line per submission of a stage, read by `status`
REQUEUE_STATES = ("RUNNING", "SIGNALING", "TIMEOUT", "PREEMPTED")  # the job is not already being requeued/cancelled


# ------------------------------------------------------------------------------------------------
# The chain of stages
# ------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    """One training stage: a config, its run folder, and the trainer arguments that run it."""
    name: str
    config: str                       # absolute path of the JSON config
    run_dir: str                      # absolute out_dir/name
    total_images: int
    argv: list = field(default_factory=list)
    after: str = ""                   # name of the stage this one starts from ('' = none)


def plan_chain(config: str, overrides: list, world_size: int | None) -> list:
    """Stages to run, earliest first, following `init.after_stage`; every config is validated here."""
    chain, path, seen = [], os.path.abspath(config), set()
    while True:
        if path in seen:
            raise ConfigError(f"init.after_stage forms a loop through '{path}'; fix the after_stage chain")
        seen.add(path)
        cfg = load_config(path, overrides, world_size)  # config errors fail here, on the login node
        chain.insert(0, (path, cfg))
        if not cfg.init.after_stage:
            break
        prev = os.path.join(os.path.dirname(path), cfg.init.after_stage + ".json")
        if not os.path.isfile(prev):
            raise ConfigError(f"{os.path.basename(path)}: init.after_stage = '{cfg.init.after_stage}' but "
                              f"{prev} does not exist; put that stage's config next to this one")
        path = prev
    stages = []
    for path, cfg in chain:
        run_dir = os.path.abspath(cfg.run_dir)
        # absolute out_dir so a job does not depend on the directory it was submitted from
        argv = ["--config", path] + [a for o in overrides for a in ("--set", o)]
        argv += ["--set", f"out_dir={os.path.abspath(cfg.out_dir)}"]
        after = stages[-1].name if stages else ""
        if after:
            argv += ["--set", f"init.snapshot={snapshot_dir(stages[-1].run_dir)}"]
        stages.append(Stage(cfg.name, path, run_dir, cfg.train.total_images, argv, after))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages {names} share a run name; give each config its own 'name'")
    return stages


def select_stages(stages: list, which: str | None) -> list:
    """`--stage pretrain|finetune|NAME`: the one stage to run, else all of them."""
    if not which:
        return stages
    alias = {"pretrain": stages[0].name, "finetune": stages[-1].name}
    name = alias.get(which, which)
    picked = [s for s in stages if s.name == name]
    if not picked:
        raise ConfigError(f"--stage {which}: no such stage; choose pretrain, finetune or one of "
                          f"{', '.join(s.name for s in stages)}")
    return picked


def snapshot_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "snapshots", "latest")


def stage_progress(stage: Stage) -> dict:
    """What the run folder says: images seen (trainer's done.json, else the newest EMA snapshot), whether that
    reaches the stage's total_images (so raising the budget reruns it), whether a checkpoint exists."""
    seen = None
    for path in (os.path.join(stage.run_dir, DONE_FILE), os.path.join(snapshot_dir(stage.run_dir), "snapshot.json")):
        if os.path.isfile(path):
            with open(path) as f:
                seen = max(seen or 0, int(json.load(f).get("images_seen", 0)))
    return {"done": seen is not None and seen >= stage.total_images, "images_seen": seen,
            "total_images": stage.total_images,
            "checkpoint": os.path.exists(os.path.join(stage.run_dir, "checkpoints", "latest"))}


# ------------------------------------------------------------------------------------------------
# What runs inside each task
# ------------------------------------------------------------------------------------------------

def distributed_env(env: submitit.JobEnvironment) -> dict:
    """SLURM (or local) task layout -> the torch.distributed env:// variables."""
    return distributed.task_env(env.hostnames, env.raw_job_id, env.global_rank, env.local_rank, env.num_tasks,
                                env.num_nodes, env.node)


def load_trainer(spec: str):
    """'package.module:function' or '/path/file.py:function' -> the callable."""
    module, func = spec.rsplit(":", 1)
    if module.endswith(".py"):
        spec_ = importlib.util.spec_from_file_location(os.path.basename(module)[:-3], module)
        mod = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    return getattr(mod, func)


def log(msg: str) -> None:
    print(f"[launcher {datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def slurm_job_state(job_id: str) -> str:
    """JobState of a job as slurmctld sees it now ('' if unknown)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else ""


@dataclass
class StageTask:
    """The submitit callable: one instance per stage, run by every task of the job (and by its reruns)."""
    stage: Stage
    trainer: str = TRAINER
    max_requeues: int = 50

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        os.environ.update(distributed_env(env))
        rank, restart = env.global_rank, int(os.environ.get("SLURM_RESTART_COUNT", 0))
        progress = stage_progress(self.stage)
        if rank == 0:
            log(f"stage {self.stage.name} job {env.job_id} restart {restart} on {env.hostnames} "
                f"world {env.num_tasks}: {progress}")
        if progress["done"]:  # a requeue that lands after the end, or a rerun of a finished chain
            return {"rank": rank, "rc": 0, "skipped": True, **progress}
        saved = {}  # rank 0: the trainer's on_preempt info, once every rank's checkpoint files are written
        rc = load_trainer(self.trainer)(list(self.stage.argv), on_preempt=lambda info=None: saved.update(info or {}))
        if rc == 0:
            return {"rank": rank, "rc": 0, "skipped": False, **stage_progress(self.stage)}
        if rc == EXIT_PREEMPTED:
            self._requeue_or_exit(env, rank, restart, saved)
        raise RuntimeError(f"stage {self.stage.name}: trainer exited with code {rc} on rank {rank}; "
                           f"see this job's log")

    def _requeue_or_exit(self, env, rank: int, restart: int, saved: dict) -> None:
        """The trainer saved on every rank and returned 3; rank 0 now requeues (once) and every task leaves
        without a result file, so submitit keeps waiting for the rerun."""
        if rank != 0:
            raise SystemExit(0)  # exit 0: a non-zero exit could make srun (KillOnBadExit) kill rank 0 mid-requeue
        what = f"checkpoint {saved.get('checkpoint', '?')} at {saved.get('images_seen', '?')} images saved"
        if env.cluster != "slurm":
            log(f"{what}; the local executor restarts the task")
            env._requeue(self.max_requeues - restart)  # local executor: exits with its requeue code
        state = slurm_job_state(env.job_id)
        if state not in REQUEUE_STATES:
            # scontrol requeue / preemption kill / scancel: SLURM already decided what happens next
            log(f"{what}; job state {state}: not requeuing")
            raise SystemExit(0)
        if restart >= self.max_requeues:
            raise RuntimeError(f"stage {self.stage.name} was requeued {restart} times (--max-requeues); "
                               f"resubmit the same command to continue from checkpoints/latest")
        out = subprocess.run(["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=60)
        # a failure here means SLURM is already ending the job (it turned COMPLETING meanwhile): nothing to add
        log(f"{what}; requeued job {env.job_id} (state was {state}, restart {restart})" if out.returncode == 0
            else f"{what}; scontrol requeue failed ({out.stderr.strip()}): SLURM is ending the job")
        raise SystemExit(0)

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on USR2 if the trainer has not installed its handlers yet: rerun as is."""
        return submitit.helpers.DelayedSubmission(self)


# ------------------------------------------------------------------------------------------------
# Submission
# ------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                epilog="status: python launchers/slurm.py status <config.json | run folder>")
    p.add_argument("config", help="JSON config of the last stage (e.g. configs/dim_h_512.json)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU")
    p.add_argument("--tasks-per-node", type=int, default=0, help="tasks per node without GPUs (CPU runs)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem-gb-per-task", type=float, default=None)
    p.add_argument("--time", type=int, default=60 * 24, help="time limit per job, minutes")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, e.g. --sbatch exclude=node7 (repeatable)")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 this many seconds before the time limit (save + requeue must fit)")
    p.add_argument("--max-requeues", type=int, default=50)
    p.add_argument("--job-name", default="dimscale", help="prefix; the stage name is appended")
    p.add_argument("--output", default=None, help="submitit log folder (default <run folder>/slurm/%%j)")
    p.add_argument("--stage", default=None, help="run one stage only: pretrain, finetune or a stage name")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="config override passed to every stage's trainer (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    p.add_argument("--local", action="store_true", help="run the chain here through submitit's local executor")
    args = p.parse_args(argv)
    if args.gpus_per_node and args.tasks_per_node and args.tasks_per_node != args.gpus_per_node:
        p.error(f"--tasks-per-node {args.tasks_per_node} != --gpus-per-node {args.gpus_per_node}: "
                f"the launcher runs one task per GPU; drop --tasks-per-node")
    args.tasks_per_node = args.gpus_per_node or args.tasks_per_node or 1
    if args.local and args.nodes != 1:
        p.error("--local runs on this machine only: use --nodes 1")
    if not args.local and args.signal_delay_s >= args.time * 60:
        p.error(f"--signal-delay-s {args.signal_delay_s} is not below the time limit (--time {args.time} min): "
                f"the job would be signalled at start; lower it or raise --time")
    for key in ("job_name", "output", "partition", "account", "qos", "constraint", "sbatch", "config"):
        for value in getattr(args, key) if key == "sbatch" else [getattr(args, key)]:
            if value is not None and re.search(r"[\x00-\x1f\x7f]", value):
                p.error(f"--{key.replace('_', '-')} {value!r} holds a control character (it would split the "
                        f"#SBATCH lines); remove it")
    for kv in args.sbatch:
        if "=" not in kv and not re.fullmatch(r"[\w-]+", kv):
            p.error(f"--sbatch '{kv}' is not KEY=VALUE or a flag name (e.g. --sbatch exclusive)")
    return args


def sbatch_extra(args) -> dict:
    """`--sbatch k=v` options plus what the chain needs: requeue-able, dependents die with a failed stage."""
    extra = {"requeue": True, "kill-on-invalid-dep": "yes"}
    for kv in args.sbatch:
        k, _, v = kv.partition("=")
        extra[k.strip().lstrip("-")] = v if v else True
    return extra


def slurm_installed() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


class _SbatchWriter(submitit.SlurmExecutor):
    """submitit's SLURM executor where SLURM is not installed: it writes the sbatch script (--dry-run), never submits
    (submitit's own refuses to start without srun)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


class _DryRun:
    """What submission_text() needs of an AutoExecutor: its inner SLURM executor, parameters translated alike."""

    def __init__(self, folder: str, params: dict, max_requeues: int):
        self._executor = _SbatchWriter(folder, max_num_timeout=max_requeues)
        generic = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        specific = {k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")}
        self._executor.update_parameters(**self._executor._convert_parameters(generic), **specific)


def make_executor(args, stage: Stage, dependency: str = ""):
    """A submitit executor with this stage's SLURM (or local) parameters."""
    folder = args.output or os.path.join(stage.run_dir, "slurm", "%j")
    dry_run_here = args.dry_run and not args.local and not slurm_installed()
    ex = None if dry_run_here else submitit.AutoExecutor(folder=folder, cluster="local" if args.local else "slurm",
                                                         slurm_max_num_timeout=args.max_requeues)
    params = dict(name=f"{args.job_name}-{stage.name}", nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                  timeout_min=args.time)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb_per_task:
        params["mem_gb"] = args.mem_gb_per_task * args.tasks_per_node  # sbatch --mem is per node
    if not args.local:
        params.update(slurm_signal_delay_s=args.signal_delay_s, slurm_additional_parameters=sbatch_extra(args))
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(args, key):
                params[f"slurm_{key}"] = getattr(args, key)
        if dependency:
            params["slurm_dependency"] = dependency
        # A requeued job may come back on other nodes than it was submitted with (the pending job reshaped with
        # scontrol update, a smaller free share): sbatch froze SLURM_NTASKS at submission, so derive the task
        # count from this allocation; the trainer then resumes on the new world size (checkpoints reshard).
        tasks = f"$((SLURM_JOB_NUM_NODES * {int(args.tasks_per_node)}))"
        params["slurm_setup"] = [f"export SLURM_NTASKS={tasks} SLURM_NPROCS={tasks}"]
    if dry_run_here:  # the same sbatch script as on a cluster, printed anywhere
        return _DryRun(folder, params, args.max_requeues)
    ex.update_parameters(**params)
    return ex


def submission_text(ex) -> str:
    """The exact sbatch script submitit will write for this executor."""
    inner = ex._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


def trainer_spec() -> str:
    return os.environ.get(TEST_TRAINER_ENV) or TRAINER


def record_job(stage: Stage, job, log_folder: str) -> None:
    os.makedirs(stage.run_dir, exist_ok=True)
    with open(os.path.join(stage.run_dir, JOBS_FILE), "a") as f:
        f.write(json.dumps({"job_id": job.job_id, "submitted": time.time(), "stdout": str(job.paths.stdout),
                            "folder": log_folder}) + "\n")


def last_job(stage: Stage) -> dict | None:
    path = os.path.join(stage.run_dir, JOBS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def queued_state(job_id: str) -> str:
    """squeue state of a job still in the queue ('' once it left it or without SLURM)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    except FileNotFoundError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def submit(args) -> int:
    world = args.nodes * args.tasks_per_node
    stages = select_stages(plan_chain(args.config, args.overrides, world), args.stage)
    if args.stage and stages[0].after:
        snap = snapshot_dir(os.path.join(os.path.dirname(stages[0].run_dir), stages[0].after))
        if not os.path.isfile(os.path.join(snap, "snapshot.json")) and not args.dry_run:
            raise ConfigError(f"--stage {args.stage} starts from {snap}, which does not exist yet; "
                              f"run stage '{stages[0].after}' first (or drop --stage)")
    if not args.dry_run and not args.local and not slurm_installed():
        raise ConfigError("SLURM is not installed here (no sbatch/srun on PATH): nothing submitted; add --local to "
                          "run the chain on this machine through submitit's local executor, or --dry-run to print "
                          "the sbatch scripts")
    task_trainer, prev_job, jobs, queued = trainer_spec(), None, [], []
    for stage in stages:
        progress = stage_progress(stage)
        if progress["done"]:
            print(f"[{stage.name}] already finished ({progress['images_seen']} images): not submitted")
            prev_job = None
            continue
        if not args.dry_run and not args.local:
            running = last_job(stage)
            state = queued_state(running["job_id"]) if running else ""
            if state:
                print(f"[{stage.name}] job {running['job_id']} is already {state}: not submitted again")
                queued.append(f"{stage.name} (job {running['job_id']} {state})")
                prev_job = running["job_id"]
                continue
        dependency = ""
        if prev_job is not None and not args.local:
            dependency = f"afterok:{prev_job}"
        ex = make_executor(args, stage, dependency)
        task = StageTask(stage, task_trainer, args.max_requeues)
        if args.dry_run:
            print(f"== [{stage.name}] run folder {stage.run_dir}" + (f", after {stage.after}" if stage.after else ""))
            print("trainer argv: " + json.dumps(stage.argv))
            if args.local:
                print("local executor: " + json.dumps(ex._executor.parameters, sort_keys=True))
            else:
                print(submission_text(ex).rstrip("\n"))
            prev_job = f"JOBID_OF_{stage.name}"  # stands for the id sbatch will give
            continue
        if not args.local:
            _pickle_by_value()
        job = ex.submit(task)
        record_job(stage, job, str(ex._executor.folder))
        jobs.append(job)
        print(f"[{stage.name}] submitted job {job.job_id}" + (f" ({dependency})" if dependency else ""))
        print(f"    log:    {job.paths.stdout}")
        follow = f"tail -F {shlex.quote(str(job.paths.stdout))}"
        print(f"    follow: {follow}" + ("" if args.local else f"  |  squeue -j {job.job_id}"))
        prev_job = job.job_id
        if args.local:  # the local executor has no dependencies: run the chain in order
            while not job.done():
                time.sleep(1)
            try:
                print(f"[{stage.name}] finished: {job.results()[0]}")
            except submitit.core.utils.UncompletedJobError as e:  # FailedJobError is a subclass
                print(f"[{stage.name}] failed, later stages not run: {e}\n    log: {job.paths.stdout}", file=sys.stderr)
                return 1
    if not jobs and not args.dry_run:
        print(f"nothing new submitted: already in the queue: {', '.join(queued)}; see `python launchers/slurm.py "
              f"status {args.config}`" if queued else "nothing to submit: every stage has finished")
    return 0


def _pickle_by_value() -> None:
    """Jobs must unpickle StageTask even if `launchers` is not importable there: ship this module by value."""
    import cloudpickle
    mod = sys.modules[__name__]
    if __name__ != "__main__":
        cloudpickle.register_pickle_by_value(mod)


# ------------------------------------------------------------------------------------------------
# status
# ------------------------------------------------------------------------------------------------

def status(target: str, overrides: list) -> int:
    """Print one line per stage: finished / in the queue / checkpointed / not started."""
    if os.path.isdir(target):
        cfg_path = os.path.join(target, "config.json")
        if not os.path.isfile(cfg_path):
            print(f"error: {target} has no config.json; pass a run folder written by dimscale/train.py "
                  f"or the stage's config file", file=sys.stderr)
            return 2
        with open(cfg_path) as f:
            total = json.load(f).get("train", {}).get("total_images", 0)
        stages = [Stage(os.path.basename(os.path.abspath(target)), cfg_path, os.path.abspath(target), total)]
    else:
        stages = plan_chain(target, overrides, None)
    for stage in stages:
        p, job = stage_progress(stage), last_job(stage)
        state = queued_state(job["job_id"]) if job else ""
        if p["done"]:
            where = "finished"
        elif state:
            where = f"job {job['job_id']} {state}"
        elif p["checkpoint"]:
            where = "stopped with a checkpoint (resubmit to continue)"
        else:
            where = "not started"
        seen = p["images_seen"] if p["images_seen"] is not None else 0
        print(f"{stage.name:<24} {where:<40} images {seen}/{stage.total_images}  {stage.run_dir}")
        if job:
            print(f"{'':<24} last job {job['job_id']}: tail -F {job['stdout']}")
    return 0


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "status":
            sp = argparse.ArgumentParser(allow_abbrev=False, prog="slurm.py status")
            sp.add_argument("target", help="config file or run folder")
            sp.add_argument("--set", action="append", default=[], dest="overrides")
            a = sp.parse_args(argv[1:])
            return status(a.target, a.overrides)
        return submit(parse_args(argv))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as e:
        print(f"sbatch refused the job: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
