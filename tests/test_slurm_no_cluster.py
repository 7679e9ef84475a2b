"""launchers/slurm.py where SLURM is not installed: a PATH without sbatch/srun, in a plain subprocess."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launchers", "slurm.py")
FT = os.path.join(REPO, "tests", "slurm", "configs", "slurm_ft.json")
FAKE = os.path.join(REPO, "tests", "slurm", "fake_trainer.py") + ":main"


def launch(tmp_path, *args, hide_slurm=True, timeout=120):
    bin_dir = tmp_path / "bin"  # nothing on PATH, so no sbatch, srun or squeue (python is called by its full path)
    bin_dir.mkdir(exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", DIMSCALE_TEST_TRAINER=FAKE, FAKE_STEP_S="0.05")
    if hide_slurm:
        env["PATH"] = str(bin_dir)
    return subprocess.run([sys.executable, LAUNCHER, "--set", f"out_dir={tmp_path / 'runs'}", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_sbatch_scripts_without_slurm(tmp_path):
    out = launch(tmp_path, "--dry-run", "--nodes", "2", FT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("#!/bin/bash") == 2 and "#SBATCH --nodes=2" in out.stdout
    assert "#SBATCH --dependency=afterok:JOBID_OF_slurm_pre" in out.stdout
    anywhere = launch(tmp_path, "--dry-run", "--nodes", "2", FT, hide_slurm=False)
    assert anywhere.stdout == out.stdout  # the same scripts as where SLURM is installed


def test_submission_without_slurm_fails_in_one_line(tmp_path):
    out = launch(tmp_path, "--nodes", "2", FT)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stdout + out.stderr
    assert "SLURM is not installed" in lines[0] and "--local" in lines[0]
    assert "submitted" not in out.stdout and not (tmp_path / "runs").exists()


def test_local_on_purpose_runs_the_chain_in_order(tmp_path):
    out = launch(tmp_path, "--local", "--time", "10", FT, "--set", "train.total_images=64", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"\[slurm_pre\] finished: .*'images_seen': 64", out.stdout), out.stdout
    assert re.search(r"\[slurm_ft\] finished: .*'images_seen': 64", out.stdout), out.stdout


@pytest.mark.parametrize("args", [["--set", "name=a\n#SBATCH --wrap=id"], ["--set", "out_dir=/tmp/x\ny"],
                                  ["--job-name", "x\n#SBATCH --wrap=id"]])
def test_control_characters_in_names_are_refused(tmp_path, args):
    out = launch(tmp_path, "--dry-run", FT, *args)
    assert out.returncode == 2 and "control character" in out.stderr, out.stdout + out.stderr
    assert "#SBATCH" not in out.stdout
