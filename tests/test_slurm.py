"""The sweep's cluster path against SLURM itself: the one-node cluster of `utils/slurm_one_node.sh` (which `.ci/run`
starts), a job array to its table, a sweep cancelled with `scancel` (or warned of its time limit) and submitted again, a
job that fails on the node.
Where no cluster runs, these tests skip with the reason the script gave; `pytest -m "not slurm"` leaves them out. The
squeue watcher (for a cluster without accounting) is also tested without a cluster, on squeue's answers."""

import contextlib
import glob
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from utils import benchmark
from utils.logs import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-steps", "1024", "--no-compile"]
STATE = os.environ.get("SLURM_ONE_NODE_DIR", "/var/tmp/slurm-one-node")


@pytest.fixture(scope="session")
def no_cluster() -> str:
    """Why no SLURM cluster with an idle node answers here (the start script's reason, if it left one), or ""."""
    if os.path.exists(f"{STATE}/unavailable"):
        return open(f"{STATE}/unavailable").read().strip()
    try:  # sinfo waits for a controller that does not answer: asked once
        states = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        states = ""
    up = {"idle", "mix", "alloc"} & set(states.split())
    return "" if up else "start one with `bash utils/slurm_one_node.sh start` (as root)"


@pytest.fixture
def cluster(no_cluster, tmp_path, monkeypatch):
    """The sweep's folder on a SLURM cluster (else the test skips, saying why), and the jobs' Python path: the job on the
    node unpickles `utils.benchmark.run_job`; the failing environment is in `tests/helpers`."""
    if no_cluster:
        pytest.skip(f"no SLURM cluster: {no_cluster}")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'tests')}")
    return tmp_path / "sweep"


def _sweep(sweep, *flags: str) -> list[str]:
    return [sys.executable, "-m", "utils.benchmark", "--launcher", "slurm", "--workers", "2", "--out-dir", str(sweep), *flags]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=170)


@pytest.mark.slurm
def test_a_sweep_runs_as_a_slurm_job_array(cluster):
    flags = ["--algos", "trefree", "ppo", "--env-ids", "InvertedPendulum-v5", "--seeds", "1", "--total-timesteps", "2048"]
    done = _run(_sweep(cluster, *flags, "--", *TINY))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(cluster / "done")) == [f"InvertedPendulum-v5__{a}_continuous__1" for a in ("ppo", "trefree")]
    assert len(glob.glob(str(cluster / "submitit" / "*_submission.sh"))) == 1  # one array of two jobs
    assert "2 jobs finished, 0 failed" in done.stdout and "| InvertedPendulum-v5 | ppo_continuous | 1 |" in done.stdout
    # without accounting: said once, and no sacct warning at each poll
    assert done.stderr.count("job states come from squeue") == 1 and "sacct" not in done.stderr.replace("(no sacct)", "")


@pytest.mark.slurm
def test_a_cancelled_or_timed_out_sweep_continues_each_job_in_its_run_folder(cluster):
    flags = ["--algos", "trefree", "ppo", "--env-ids", "InvertedPendulum-v5", "--seeds", "1", "--total-timesteps", "30720"]
    command = _sweep(cluster, *flags, "--checkpoint-interval", "1", "--", *TINY)
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(glob.glob(str(cluster / "runs" / "*" / "*.pt"))) < 2 and time.time() < deadline:  # both jobs running
        time.sleep(0.2)
    (submission,) = glob.glob(str(cluster / "submitit" / "*_submission.sh"))
    array = os.path.basename(submission).split("_")[0]
    subprocess.run(["scancel", f"{array}_0"], check=True)  # SIGTERM, then SIGKILL 30 s later
    subprocess.run(["scancel", "--signal=USR2", f"{array}_1"], check=True)  # as 90 s before the job's time limit
    out, err = first.communicate(timeout=120)
    assert first.returncode == 1 and "0 jobs finished, 2 failed" in out, err
    runs = sorted(glob.glob(str(cluster / "runs" / "*")))
    for name in ("ppo_continuous", "trefree_continuous"):  # each named in one line, stopped with its checkpoint
        line = next(line for line in err.splitlines() if line.startswith(f"InvertedPendulum-v5__{name}__1 failed: "))
        assert "exit code 143: stopped by SIGTERM at step " in line and "; continue with --resume runs/" in line
    assert not os.listdir(cluster / "done")

    again = _run(command)
    assert again.returncode == 0 and "2 jobs, 0 already done, 2 to run (slurm)" in again.stdout, again.stderr
    assert sorted(glob.glob(str(cluster / "runs" / "*"))) == runs  # no new folder: each job resumed in its own
    for run in runs:
        steps = [step for step, _ in read_scalars(run)["charts/SPS"]]
        assert steps == list(range(1024, 30720 + 1, 1024))  # strictly increasing, none repeated, to the requested total
        assert len(glob.glob(os.path.join(run, "events.out.tfevents.*"))) == 2


@pytest.mark.slurm
def test_a_job_that_fails_on_the_node_is_named_and_the_others_finish(cluster):
    # the NaNAfter job passes every check before submission and fails on the node (exit code 3: a numerical fault)
    flags = ["--algos", "ppo", "--env-ids", "InvertedPendulum-v5", "helpers:tests/NaNAfter-v0", "--total-timesteps", "2048"]
    done = _run(_sweep(cluster, *flags, "--seeds", "1", "--", *TINY))
    assert done.returncode == 1 and "1 jobs finished, 1 failed" in done.stdout, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if " failed: " in line]
    name = "helpers:tests-NaNAfter-v0__ppo_continuous__1"
    assert line.startswith(f"{name} failed: exit code 3: error: helpers:tests/NaNAfter-v0, iteration ")
    assert "the environment returned a non-finite observation" in line and line.endswith("NaNAfter-v0__ppo_continuous__1.log)")
    assert os.listdir(cluster / "done") == ["InvertedPendulum-v5__ppo_continuous__1"]


def test_the_squeue_watcher_reads_job_states(monkeypatch):
    """Without a cluster: squeue's answers (an array's tasks, one line each) become submitit's job states; a job squeue
    no longer lists has ended; a controller that does not answer changes nothing."""
    answer = SimpleNamespace(returncode=0, stdout="7_0|RUNNING\n7_1|CANCELLED\n", stderr="")
    calls = []
    monkeypatch.setattr(benchmark.subprocess, "run", lambda command, **_: calls.append(command) or answer)
    watcher = benchmark.SqueueWatcher(delay_s=600)
    for job_id in ("7_0", "7_1", "7_2"):
        watcher.register_job(job_id)
    watcher.update()
    assert calls[-1][-1] == "--jobs=7" and "--array" in calls[-1] and "--states=all" in calls[-1]
    assert [watcher.get_state(j, mode="cache") for j in ("7_0", "7_1", "7_2")] == ["RUNNING", "CANCELLED", "ENDED"]
    assert watcher.is_done("7_1", mode="cache") and watcher.is_done("7_2", mode="cache")
    assert not watcher.is_done("7_0", mode="cache")

    answer = SimpleNamespace(returncode=1, stdout="", stderr="slurm_load_jobs error: Unable to contact slurm controller")
    watcher.update()
    assert watcher.get_state("7_0", mode="cache") == "RUNNING"  # asked again at the next poll
    answer = SimpleNamespace(returncode=1, stdout="", stderr="slurm_load_jobs error: Invalid job id specified")
    watcher.update()
    assert watcher.get_state("7_0", mode="cache") == "ENDED" and calls[-1][-1] == "--jobs=7"
    watcher.update()
    assert len(calls) == 3  # every job has ended: nothing left to ask


def test_each_failed_job_is_named_in_one_line_with_why(tmp_path, capsys):
    """Without a cluster, submitit's three endings of a failed job, each one line: the script's exit code and error line
    (from its log), the state of a job that never ran (cancelled while pending), submitit's error (its time limit)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    os.makedirs(tmp_path / "logs")
    (tmp_path / "logs" / "a.log").write_text("note: ...\n\r 10%|█ | 1/10 [00:01]\rerror: the environment returned a NaN\n")
    trace = "failed during processing with trace:\n---\nTraceback (most recent call last):\n  File ...\n"
    errors = {
        "a": FailedJobError(f"{trace}RuntimeError: a failed (exit code 3): python x.py\n"),
        "b": UncompletedJobError(
            "Job 7_1 (task: 0) with path /x/7_1_0_result.pkl\nhas not produced any output (state: CANCELLED)"
        ),
        "c": FailedJobError(
            f"{trace}submitit.core.utils.UncompletedJobError: Job not requeued because: timed-out and not "
            "checkpointable.\n---\nYou can check full logs with ..."
        ),
        "d": None,
    }
    jobs = {name: SimpleNamespace(exception=lambda e=e: e, job_id=f"7_{i}") for i, (name, e) in enumerate(errors.items())}
    pending = iter(jobs.values())
    executor = SimpleNamespace(cluster="local", batch=contextlib.nullcontext, submit=lambda *_: next(pending))
    failures = benchmark.run_submitit({name: [] for name in jobs}, str(tmp_path), executor)
    assert failures == {
        "a": f"exit code 3: error: the environment returned a NaN (log: {tmp_path}/logs/a.log)",
        "b": "the job ended outside its script (state CANCELLED; job 7_1)",
        "c": "the job ended outside its script (Job not requeued because: timed-out and not checkpointable.; job 7_2)",
    }
    assert capsys.readouterr().err.splitlines() == [f"{name} failed: {why}" for name, why in failures.items()]


def test_a_cluster_whose_controller_does_not_answer_gets_nothing(tmp_path):
    """SLURM's commands, but a controller that does not answer (as `scontrol ping` says it, stopped): one error line, exit
    code 1 (a fault of the cluster, not of the input), no folder, nothing submitted."""
    bin_dir = tmp_path / "bin"
    os.makedirs(bin_dir)
    for command, text in (
        ("srun", "exit 0"),
        ("sbatch", "touch $0.called"),
        ("scontrol", "echo 'Slurmctld(primary) at vm is DOWN'; exit 1"),
    ):
        (bin_dir / command).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / command).chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}"}
    flags = ["--algos", "ppo", "--env-ids", "InvertedPendulum-v5", "--seeds", "1", "--total-timesteps", "2048"]
    done = subprocess.run(_sweep(tmp_path / "sweep", *flags), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and lines == [
        "error: the SLURM controller does not answer (Slurmctld(primary) at vm is DOWN); nothing was submitted"
    ], done.stderr
    assert not (tmp_path / "sweep").exists() and not (bin_dir / "sbatch.called").exists()
