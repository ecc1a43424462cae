"""The sweep runner on tiny jobs: local processes, skipping and resuming, failures, dry runs, and the
SLURM path through submitit (its local executor here, and the submission it would make on a cluster)."""

import os
import re
import subprocess
import sys

import pytest

from utils import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-steps", "1024", "--no-compile"]  # tiny jobs: compiling would take longer than training
RANDOM = "utils.results.ten_seeds.random_returns"  # the random policy's returns, beside the study that normalizes by them


def _args(tmp_path, **kwargs):
    return benchmark.Args(
        **(dict(env_ids=("InvertedPendulum-v5",), total_timesteps=1024, out_dir=str(tmp_path / "sweep"), workers=2) | kwargs)
    )


def test_dry_run_lists_the_jobs_and_runs_nothing(tmp_path, capsys):
    assert benchmark.main(_args(tmp_path, algos=("ppo", "trpo"), seeds=(1, 2), dry_run=True), TINY) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 jobs, 0 already done, 4 to run (local)"
    assert lines[1].startswith("InvertedPendulum-v5__ppo_continuous__1: (cd ") and lines[1].endswith(
        "ppo_continuous.py --env-id InvertedPendulum-v5 --seed 1 --exp-name ppo_continuous --save-model "
        "--checkpoint-interval 20 --total-timesteps 1024 --num-steps 1024 --no-compile)"
    )
    assert not (tmp_path / "sweep").exists()


def test_local_sweep_runs_skips_finished_jobs_and_resumes_interrupted_ones(tmp_path, capsys):
    args = _args(tmp_path, algos=("ppo", "trefree"), seeds=(1, 2))
    assert benchmark.main(args, TINY) == 0
    sweep = tmp_path / "sweep"
    assert sorted(os.listdir(sweep / "done")) == sorted(
        f"InvertedPendulum-v5__{a}_continuous__{s}" for a in ("ppo", "trefree") for s in (1, 2)
    )
    assert (sweep / "curves.png").exists() and (sweep / "curves_ratios.png").exists()
    captured = capsys.readouterr()
    out = captured.out
    assert "| InvertedPendulum-v5 | ppo_continuous | 2 |" in out and "| InvertedPendulum-v5 | trefree_continuous | 2 |" in out
    # not a terminal: the progress is one line per change, never a redrawn line
    progress = [line for line in captured.err.splitlines() if line.startswith("jobs: ")]
    assert "\r" not in captured.err and progress and len(progress) == len(set(progress))
    assert progress[-1].startswith("jobs: 4 done, 0 running, 0 failed, 0 waiting")

    # a re-run skips what finished; a job without its marker continues from its checkpoint
    os.remove(sweep / "done" / "InvertedPendulum-v5__ppo_continuous__1")
    job = benchmark.Job("ppo", "InvertedPendulum-v5", 1)
    command = benchmark.job_command(job, args, TINY, str(sweep))
    resume = command.index("--resume")  # the run's own arguments, and those after `--` (e.g. --no-compile)
    assert command[resume + 1].startswith("runs/InvertedPendulum-v5__ppo_continuous__1__") and command[resume + 2 :] == TINY
    assert benchmark.main(args, TINY) == 0
    assert capsys.readouterr().out.startswith("4 jobs, 3 already done, 1 to run (local)")
    assert len(os.listdir(sweep / "runs")) == 4  # resumed in its own run directory, not started again


def test_a_failed_job_is_reported_and_the_others_finish(tmp_path, capsys, monkeypatch):
    # the NaNAfter job passes every check and fails in the middle of its run (exit code 3: a numerical fault)
    monkeypatch.setenv("PYTHONPATH", os.path.join(ROOT, "tests"))  # the job's process imports `helpers`
    args = _args(tmp_path, algos=("ppo",), env_ids=("InvertedPendulum-v5", "helpers:tests/NaNAfter-v0"), seeds=(1,))
    assert benchmark.main(args, TINY) == 1
    err = capsys.readouterr().err
    assert "helpers:tests-NaNAfter-v0__ppo_continuous__1 failed (exit code 3): " in err and "--env-id helpers:" in err
    assert "the environment returned a non-finite observation" in err  # the end of the job's log
    assert os.listdir(tmp_path / "sweep" / "done") == ["InvertedPendulum-v5__ppo_continuous__1"]


@pytest.mark.parametrize(
    "kwargs, extra, message",
    [  # --delta exists only in trefree_continuous.py
        (
            dict(algos=("trefree", "ppo")),
            [*TINY, "--delta", "0.02"],
            "InvertedPendulum-v5__ppo_continuous__1: Unrecognized options: --delta",
        ),
        (
            dict(grid=("ppo:clip-coef=0.2,-1",)),
            TINY,
            "__ppo_continuous_clip-coef-1__1: --clip-coef must be in (0, inf)",
        ),
        (
            dict(algos=("trpo",)),
            ["--num-steps", "4096"],
            "__trpo_continuous__1: --total-timesteps 1024 is smaller than one batch",
        ),
        (
            dict(env_ids=("InvertedPendulum-v5", "Hoper-v5")),
            TINY,
            "error: Hoper-v5__trefree_continuous__1: cannot make environment 'Hoper-v5'",
        ),
        (dict(), ["--help"], "error: --help after -- would end every job with the script's help"),
    ],
)
def test_arguments_a_script_would_refuse_stop_the_sweep_before_any_job_starts(tmp_path, kwargs, extra, message):
    for dry_run in (True, False):
        with pytest.raises(SystemExit, match=re.escape(message)):
            benchmark.main(_args(tmp_path, seeds=(1,), dry_run=dry_run, **kwargs), extra)
        assert not (tmp_path / "sweep").exists()


def test_submitit_local_executor_runs_the_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT)  # the submitit worker unpickles utils.benchmark.run_job
    args = _args(tmp_path, algos=("trpo",), seeds=(1, 2))
    sweep = str(tmp_path / "sweep")
    for sub in ("runs", "logs", "done"):
        os.makedirs(os.path.join(sweep, sub))
    commands = {job.name: benchmark.job_command(job, args, TINY, sweep) for job in benchmark.make_jobs(args)}
    failures = benchmark.run_submitit(commands, sweep, benchmark.make_executor(args, sweep, cluster="local"))
    assert failures == {} and sorted(os.listdir(os.path.join(sweep, "done"))) == sorted(commands)


def test_slurm_submission_without_a_cluster(tmp_path, monkeypatch):
    import submitit.slurm.slurm

    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # no srun here
    args = _args(tmp_path, slurm_partition="gpu", slurm_time=90, slurm_cpus_per_task=2, slurm_gpus_per_task=1, workers=6)
    executor = benchmark.make_executor(args, str(tmp_path), cluster="slurm")._executor
    assert executor.parameters == {
        "time": 90,
        "cpus_per_task": 2,
        "job_name": "benchmark",
        "array_parallelism": 6,
        "partition": "gpu",
        "gpus_per_task": 1,
    }
    script = executor._make_submission_file_text("COMMAND", "uid")
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --cpus-per-task=2", "#SBATCH --gpus-per-task=1"]:
        assert line in script
    commands = [benchmark.job_command(job, args, [], str(tmp_path)) for job in benchmark.make_jobs(args)]
    assert len(commands) == 9 and {c[1] for c in commands} == {
        os.path.join(ROOT, f"{a}_continuous.py") for a in ("trefree", "ppo", "trpo")
    }
    assert all(c[2:8] == ["--env-id", "InvertedPendulum-v5", "--seed", c[5], "--exp-name", c[7]] for c in commands)


def test_exp_name_after_the_separator_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--exp-name and --resume are set by the runner"):
        benchmark.main(_args(tmp_path), ["--exp-name", "x"])


def test_grid_sweeps_script_flags_under_their_own_exp_names(tmp_path, capsys):
    args = _args(
        tmp_path, algos=("trefree",), seeds=(1,), grid=("delta=0.03,0.1", "gamma=0.9,0.99"), tag="short", dry_run=True
    )
    assert benchmark.main(args, TINY) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 jobs, 0 already done, 4 to run (local)"
    names = [line.split(":")[0] for line in lines[1:]]
    assert names == [
        f"InvertedPendulum-v5__trefree_continuous_delta{d}_gamma{g}_short__1" for d in ("0.03", "0.1") for g in ("0.9", "0.99")
    ]
    assert lines[1].endswith(
        "--exp-name trefree_continuous_delta0.03_gamma0.9_short --save-model --checkpoint-interval 20 "
        "--total-timesteps 1024 --delta 0.03 --gamma 0.9 --num-steps 1024 --no-compile)"
    )


def test_runs_already_in_a_results_csv_are_skipped(tmp_path, capsys):
    csv_path = tmp_path / "runs.csv"
    csv_path.write_text(
        "env_id,exp_name,seed,kind,step,value,value2\n"
        "InvertedPendulum-v5,ppo_continuous_clip-coef0.2,1,curve,1000,5,\n"
        "InvertedPendulum-v5,ppo_continuous_clip-coef0.2,1,final,,5,\n"
        "InvertedPendulum-v5,ppo_continuous_clip-coef0.1,2,curve,1000,5,\n"
    )
    args = _args(
        tmp_path, algos=("ppo",), seeds=(1, 2), grid=("clip-coef=0.1,0.2",), skip_runs_in=(str(csv_path),), dry_run=True
    )
    assert benchmark.main(args, TINY) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 jobs, 1 already done, 3 to run (local)"  # a run with no `final` row has not finished
    assert "InvertedPendulum-v5__ppo_continuous_clip-coef0.2__1" not in [line.split(":")[0] for line in lines[1:]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(grid=("delta",)), "--grid takes \\[ALGO:\\]FLAG=V1,V2,..."),
        (dict(grid=("delta=0.1,",)), "--grid takes \\[ALGO:\\]FLAG=V1,V2,..."),
        (dict(grid=("seed=1,2",)), "--grid cannot sweep --seed"),
        (dict(grid=("sac:delta=0.1",)), "--grid names an unknown algorithm: sac"),
        (dict(tag="a_b"), "--tag takes letters, digits"),
        (dict(skip_runs_in=("missing.csv",)), "'missing.csv' is not a CSV file of runs"),
    ],
)
def test_bad_sweep_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(SystemExit, match=message):
        benchmark.main(_args(tmp_path, dry_run=True, **kwargs), [])


def test_grid_items_for_one_algorithm(tmp_path, capsys):
    args = _args(
        tmp_path,
        algos=("trefree", "ppo", "trpo"),
        seeds=(1,),
        grid=("trefree:delta=0.1,0.3", "ppo:clip-coef=0.3"),
        dry_run=True,
    )
    assert benchmark.main(args, TINY) == 0
    names = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == [
        "InvertedPendulum-v5__trefree_continuous_delta0.1__1",
        "InvertedPendulum-v5__trefree_continuous_delta0.3__1",
        "InvertedPendulum-v5__ppo_continuous_clip-coef0.3__1",
        "InvertedPendulum-v5__trpo_continuous__1",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["utils.plot", "no-such-folder"], "error: no runs with episodic returns under no-such-folder"),
        (["utils.plot", "."], "error: no runs with episodic returns under ."),
        (["utils.benchmark", "--workers", "0", "--out-dir", "sweep"], "error: --workers must be at least 1"),
        (
            ["utils.benchmark", "--total-timesteps", "0", "--out-dir", "sweep"],
            "error: HalfCheetah-v5__trefree_continuous__1: --total-timesteps 0 is smaller than one batch",
        ),
        (["utils.benchmark", "--out-dir", "/proc/sweep", "--seeds", "1"], "error: FileNotFoundError: [Errno 2] No such file"),
        (
            ["utils.benchmark", "--algos", "ppo", "--seeds", "1", "--out-dir", "sweep", "--", "--bogus"],
            "error: HalfCheetah-v5__ppo_continuous__1: Unrecognized options: --bogus",
        ),
        (["utils.speed", "--env-id", "Nope-v0"], "error: cannot make environment 'Nope-v0'"),
        (
            ["utils.speed", "--steps", "0"],
            "error: ppo_continuous stopped with exit code 2: --total-timesteps 0 is smaller than one",
        ),
        (["utils.speed", "--scripts", "sac_continuous"], "error: no training script 'sac_continuous'"),
        (
            ["utils.speed", "--env-id", "Hopper-v5", "--steps", "4096", "--scripts", "ppo_continuous --bogus"],
            "error: ppo_continuous --bogus stopped with exit code 2: Unrecognized options: --bogus",
        ),
        (
            ["utils.speed", "--env-id", "Hopper-v5", "--steps", "100", "--scripts", "trpo_continuous"],
            "error: trpo_continuous stopped with exit code 2: --total-timesteps 100 is smaller than one batch (1024 steps)",
        ),
        (
            ["utils.speed", "--env-id", "Hopper-v5", "--steps", "1024", "--scripts", "trpo_continuous --no-compile"],
            "error: trpo_continuous --no-compile ran one iteration in --steps 1024; the steady speed needs two or more",
        ),
        (["utils.evaluate", "--episodes", "0", "x.pt"], "error: --episodes must be at least 1"),
        (
            ["utils.evaluate", "--random-policy", "--env-id", "Hopper-v5"],
            "error: --random-policy has moved beside its study: python -m " + RANDOM,
        ),
        ([RANDOM, "--env-id", "Hopper-v5", "--episodes", "0"], "error: --episodes must be at least 1"),
        ([RANDOM, "--env-id", "Nope-v0"], "error: cannot make environment 'Nope-v0'"),
        ([RANDOM, "--env-id", "Hopper-v5", "--csv", "nope/random.csv"], "error: --csv nope/random.csv: cannot write in "),
        ([RANDOM, "--env-id", "Hopper-v5", "--csv", "."], "error: --csv . is not a file"),
    ],
)
def test_utils_commands_refuse_bad_input_with_one_line_and_exit_code_2(tmp_path, argv, message):
    env = os.environ | {"PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0] and result.stderr.startswith(message), result.stderr
    assert os.listdir(tmp_path) == []  # nothing written


def test_random_returns_refuse_to_append_to_a_csv_of_other_columns_before_the_episodes(tmp_path):
    (tmp_path / "runs.csv").write_text("env_id,exp_name,seed,kind,step,value,value2\n")
    env = os.environ | {"PYTHONPATH": ROOT}
    argv = [RANDOM, "--env-id", "Hopper-v5", "--csv", "runs.csv"]
    result = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith(
        "error: --csv runs.csv has the columns env_id,exp_name,seed,kind,step,value,value2, not env_id,policy,episode,return"
    )
    assert (tmp_path / "runs.csv").read_text() == "env_id,exp_name,seed,kind,step,value,value2\n"
    # an empty file takes the header and the returns
    (tmp_path / "empty.csv").write_text("")
    argv = [RANDOM, "--env-id", "Hopper-v5", "--csv", "empty.csv", "--episodes", "2"]
    result = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "empty.csv").read_text().splitlines()
    assert lines[0] == "env_id,policy,episode,return" and [line.split(",")[:3] for line in lines[1:]] == [
        ["Hopper-v5", "random", "0"],
        ["Hopper-v5", "random", "1"],
    ]


def test_plot_names_a_corrupt_event_file_instead_of_skipping_it(tmp_path):
    run_dir = tmp_path / "runs" / "Hopper-v5__ppo_continuous__1__1"
    run_dir.mkdir(parents=True)
    (run_dir / "events.out.tfevents.1.host").write_bytes(bytes(range(256)) * 8)
    env = os.environ | {"PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-m", "utils.plot", "runs"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(
        "error: the event file runs/Hopper-v5__ppo_continuous__1__1/events.out.tfevents.1.host is corrupt"
    )
    assert sorted(os.listdir(tmp_path)) == ["runs"]


def test_track_reaches_every_job_with_its_project_and_entity(tmp_path, capsys):
    args = _args(
        tmp_path, algos=("ppo", "trpo"), seeds=(1,), track=True, wandb_project_name="proj", wandb_entity="team", dry_run=True
    )
    assert benchmark.main(args, TINY) == 0
    commands = capsys.readouterr().out.splitlines()[1:]
    assert len(commands) == 2 and all("--track --wandb-project-name proj --wandb-entity team" in line for line in commands)
