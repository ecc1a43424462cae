"""Benchmark sweeps: algorithms x environments x seeds, on this machine or on a SLURM cluster.

    python -m utils.benchmark --algos trefree ppo trpo --env-ids HalfCheetah-v5 Hopper-v5 --seeds 1 2 3 \\
        [--grid delta=0.03,0.1] [--total-timesteps N] [--launcher local|slurm] [--workers N] [--out-dir benchmark]
        [--skip-runs-in results.csv] [--dry-run] [-- extra args]

A job is one run of `<algo>_continuous.py` in its own process, with one torch thread, `--save-model`
and a checkpoint every `--checkpoint-interval` iterations; its run directory goes to `<out-dir>/runs/`
and its output to `<out-dir>/logs/<job>.log`. Arguments after `--` go to every script. `--grid`
sweeps script flags too (`ALGO:FLAG=...` for one algorithm's jobs only): one job per combination of
their values, named by its exp_name, the script's
name followed by `_<flag><value>` per flag (`trefree_continuous_delta0.1`), then `_<tag>` with `--tag`.

The sweep is resumable: a job that finished (a marker in `<out-dir>/done/`, or a run already in a CSV
file of `--skip-runs-in`, as `utils.plot --export` writes them) is skipped, and a job that was
interrupted continues from its checkpoint with `--resume`. Each script's own parsing and checks run on its jobs'
arguments before any job starts, so that a typo or a refused value stops the sweep at once, with one error line.
A job that fails during its run is reported with its command and the end of its log and does not stop the others.
When the jobs are done, `utils.plot` draws the sweep's figures into `<out-dir>/` and prints the table of final returns.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import importlib
import io
import itertools
import os
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

import tyro

from utils.logs import one_line_errors, reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    algos: tuple[Literal["trefree", "ppo", "trpo"], ...] = ("trefree", "ppo", "trpo")
    """the algorithms: `<algo>_continuous.py` with its default (paper) hyper-parameters"""
    env_ids: tuple[str, ...] = ("HalfCheetah-v5",)
    """the environments"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """the seeds"""
    grid: tuple[str, ...] = ()
    """script flags to sweep, as [ALGO:]FLAG=V1,V2,... (`delta=0.03,0.1`, `ppo:clip-coef=0.3`): one job per combination"""
    total_timesteps: int | None = None
    """environment steps per run (default: each script's own, 1M)"""
    launcher: Literal["local", "slurm"] = "local"
    """run the jobs as processes on this machine, or as a SLURM job array through submitit"""
    workers: int = os.cpu_count() or 1
    """local: the number of jobs at a time; slurm: the array's parallelism"""
    out_dir: str = "benchmark"
    """where the runs, logs, markers and figures of the sweep go"""
    checkpoint_interval: int = 20
    """each job writes a checkpoint every this many iterations, from which an interrupted sweep continues"""
    tag: str | None = None
    """a suffix of every job's exp_name (`_<tag>`), to tell this sweep's runs from others (e.g. `nocfrc`)"""
    skip_runs_in: tuple[str, ...] = ()
    """CSV files of finished runs (`utils.plot --export`): their (environment, exp_name, seed) are not run again"""
    dry_run: bool = False
    """print the jobs and their commands without running them"""
    track: bool = False
    """pass --track to every job: each run goes to Weights & Biases (with the two flags below)"""
    wandb_project_name: str | None = None
    """with --track: the W&B project of every job (default: the scripts' own)"""
    wandb_entity: str | None = None
    """with --track: the W&B entity of every job"""
    slurm_partition: str | None = None
    """SLURM partition (default: the cluster's)"""
    slurm_time: int = 240
    """SLURM time limit of each job, in minutes"""
    slurm_cpus_per_task: int = 1
    """SLURM CPUs per job"""
    slurm_gpus_per_task: int = 0
    """SLURM GPUs per job"""


@dataclass(frozen=True)
class Job:
    algo: str
    env_id: str
    seed: int
    flags: tuple[tuple[str, str], ...] = ()  # (flag, value) pairs of the grid
    tag: str | None = None

    @property
    def script(self) -> str:
        return f"{self.algo}_continuous"

    @property
    def exp_name(self) -> str:
        return self.script + "".join(f"_{flag}{value}" for flag, value in self.flags) + (f"_{self.tag}" if self.tag else "")

    @property
    def name(self) -> str:
        """The job's run directory name without its time stamp, as the scripts write it."""
        return f"{self.env_id.replace('/', '-')}__{self.exp_name}__{self.seed}"


def parse_grid(grid: tuple[str, ...], algo: str) -> list[tuple[tuple[str, str], ...]]:
    """`("delta=0.03,0.1", "gamma=0.99")` -> every combination of (flag, value) pairs; an item `ALGO:FLAG=...`
    (`trefree:delta=0.1`) applies to that algorithm's jobs only."""
    axes = []
    for item in grid:
        only, colon, rest = item.partition(":")
        if colon and only != algo:
            continue
        flag, _, values = (rest if colon else item).partition("=")
        flag = flag.removeprefix("--")
        if not flag or not values or any(not v for v in values.split(",")):
            raise SystemExit(f"error: --grid takes [ALGO:]FLAG=V1,V2,... (e.g. delta=0.03,0.1), not '{item}'")
        if flag in ("env-id", "seed", "exp-name", "resume"):
            raise SystemExit(f"error: --grid cannot sweep --{flag}; it is set by the runner")
        axes.append([(flag, value) for value in values.split(",")])
    return list(itertools.product(*axes))


def make_jobs(args: Args) -> list[Job]:
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9.=-]+", args.tag):
        raise SystemExit(f"error: --tag takes letters, digits, '.', '=' and '-', not '{args.tag}'")
    unknown = {item.partition(":")[0] for item in args.grid if ":" in item} - {"trefree", "ppo", "trpo"}
    if unknown:
        raise SystemExit(f"error: --grid names an unknown algorithm: {', '.join(sorted(unknown))} (trefree, ppo or trpo)")
    return [
        Job(algo, env_id, seed, flags, args.tag)
        for env_id in args.env_ids
        for algo in args.algos
        for flags in parse_grid(args.grid, algo)
        for seed in args.seeds
    ]


def runs_in_csv(paths: tuple[str, ...]) -> set[str]:
    """The names (`<env>__<exp_name>__<seed>`) of the finished runs in CSV files written by `utils.plot --export`."""
    names = set()
    for path in paths:
        try:
            with open(path, newline="") as f:
                names |= {f"{r['env_id']}__{r['exp_name']}__{r['seed']}" for r in csv.DictReader(f) if r["kind"] == "final"}
        except (OSError, KeyError):
            raise SystemExit(f"error: '{path}' is not a CSV file of runs written by utils.plot --export") from None
    return names


def is_done(job: Job, out_dir: str) -> bool:
    return os.path.exists(os.path.join(out_dir, "done", job.name))


def latest_checkpoint(job: Job, out_dir: str) -> str | None:
    """The checkpoint of the job's most recent run, if it wrote one."""
    runs = sorted(glob.glob(os.path.join(out_dir, "runs", f"{job.name}__*")), key=lambda d: int(d.rsplit("__", 1)[1]))
    path = os.path.join(runs[-1], f"{job.exp_name}.pt") if runs else None
    return path if path and os.path.exists(path) else None


def job_command(job: Job, args: Args, extra: list[str], out_dir: str) -> list[str]:
    """The command that runs the job, or continues it from its checkpoint (with its saved arguments)."""
    script = os.path.join(ROOT, f"{job.script}.py")
    checkpoint = latest_checkpoint(job, out_dir)
    if checkpoint is not None:
        # the run keeps its own arguments; those after `--` still reach it (a resumed run takes --cuda and --compile)
        return [sys.executable, script, "--resume", os.path.relpath(checkpoint, out_dir), *extra]
    steps = ["--total-timesteps", str(args.total_timesteps)] if args.total_timesteps else []
    flags = [word for flag, value in job.flags for word in (f"--{flag}", value)]
    tracking = ["--track"] * args.track + [
        word
        for flag, value in (("--wandb-project-name", args.wandb_project_name), ("--wandb-entity", args.wandb_entity))
        if args.track and value
        for word in (flag, value)
    ]
    return [
        sys.executable,
        script,
        "--env-id",
        job.env_id,
        "--seed",
        str(job.seed),
        "--exp-name",
        job.exp_name,
        "--save-model",
        "--checkpoint-interval",
        str(args.checkpoint_interval),
        *steps,
        *tracking,
        *flags,
        *extra,
    ]


def check_jobs(jobs: list[Job], commands: dict[str, list[str]], out_dir: str) -> None:
    """Refuse the sweep before any job starts if a script would refuse a job's arguments (a typo after `--` or in
    --grid, a value out of range, an unknown environment): each script's own parsing and checks, run here on each job's
    command line as its `__main__` and `train` would, before they write anything. One error line names the first job."""
    # in the jobs' folder: a resumed job names its checkpoint relative to it
    with contextlib.chdir(out_dir) if os.path.isdir(out_dir) else contextlib.nullcontext():
        for job in jobs:
            module = importlib.import_module(job.script)  # no side effects on import
            argv = commands[job.name][2:]
            messages = io.StringIO()  # tyro's framed message, the notes of a resumed run
            with contextlib.redirect_stderr(messages):
                try:
                    module.check_run(module.start_run(tyro.cli(module.Args, args=argv))[0])
                except SystemExit:  # tyro's refusal
                    raise SystemExit(f"error: {job.name}: {reason(messages.getvalue())}") from None
                except module.ArgsError as e:
                    raise SystemExit(f"error: {job.name}: {e}") from None


def run_job(command: list[str], out_dir: str, name: str) -> None:
    """Run one job to completion in `out_dir`, its output in `logs/<name>.log`; mark it done, or raise
    RuntimeError with its command and the end of its log. Called locally, or on a SLURM node by submitit."""
    log_path = os.path.join(out_dir, "logs", f"{name}.log")
    with open(log_path, "a") as log:
        code = subprocess.run(
            command, cwd=out_dir, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"}
        ).returncode
    if code != 0:
        with open(log_path, errors="replace") as log:
            tail = "".join(line.split("\r")[-1] for line in log.readlines()[-5:])
        raise RuntimeError(f"{name} failed (exit code {code}): {' '.join(command)}\n{tail}")
    open(os.path.join(out_dir, "done", name), "w").close()


def run_local(commands: dict[str, list[str]], out_dir: str, workers: int) -> dict[str, str]:
    """Run the jobs on this machine, `workers` at a time, with a progress line; returns failures by job name."""
    failures, start = {}, time.time()
    line, interactive = "", sys.stderr.isatty()  # in a log file, one line per change instead of a redrawn line
    with ThreadPoolExecutor(workers) as pool:  # each thread waits on one job's process
        futures = {pool.submit(run_job, command, out_dir, name): name for name, command in commands.items()}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in finished:
                if future.exception() is not None:
                    failures[futures[future]] = str(future.exception())
                    print(("\n" if interactive else "") + str(future.exception()), file=sys.stderr)  # off the progress line
            done = len(futures) - len(pending)
            running = sum(future.running() for future in pending)
            left = (
                f"~{(time.time() - start) / done * len(pending) / 60:.0f} min left"
                if done
                else "time left: after the first job"
            )
            waiting = len(pending) - running
            status = f"jobs: {done - len(failures)} done, {running} running, {len(failures)} failed, {waiting} waiting; {left}"
            if status != line:
                line = status
                print(f"\r{line}   " if interactive else line, end="" if interactive else "\n", file=sys.stderr, flush=True)
    if interactive:
        print(file=sys.stderr)
    return failures


def make_executor(args: Args, out_dir: str, cluster: str = "slurm"):
    """A submitit executor for the sweep: a SLURM job array (`cluster="local"` runs it on this machine)."""
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(out_dir, "submitit"), cluster=cluster)
    executor.update_parameters(timeout_min=args.slurm_time, cpus_per_task=args.slurm_cpus_per_task, name="benchmark")
    if cluster == "slurm":
        partition = {"slurm_partition": args.slurm_partition} if args.slurm_partition else {}
        gpus = {"slurm_gpus_per_task": args.slurm_gpus_per_task} if args.slurm_gpus_per_task else {}
        executor.update_parameters(slurm_array_parallelism=args.workers, **partition, **gpus)
    return executor


def run_submitit(commands: dict[str, list[str]], out_dir: str, executor) -> dict[str, str]:
    """Submit the jobs as one array and wait for them; returns failures by job name."""
    with executor.batch():
        futures = {name: executor.submit(run_job, command, out_dir, name) for name, command in commands.items()}
    failures = {}
    for name, future in futures.items():
        try:
            future.result()
        except Exception as e:  # submitit re-raises the job's error, wrapped
            failures[name] = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            print(f"{name} failed: {failures[name]}", file=sys.stderr)
    return failures


def main(args: Args, extra: list[str]) -> int:
    if "--exp-name" in extra or "--resume" in extra:
        raise SystemExit("error: --exp-name and --resume are set by the runner, not after --")
    if "-h" in extra or "--help" in extra:
        raise SystemExit("error: --help after -- would end every job with the script's help; run the script with --help")
    if args.workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    if args.total_timesteps is not None and args.total_timesteps < 1:
        raise SystemExit("error: --total-timesteps must be at least 1 (or left out: each script's own)")
    if args.checkpoint_interval < 0:
        raise SystemExit("error: --checkpoint-interval must be 0 or positive")
    out_dir = os.path.abspath(args.out_dir)
    jobs = make_jobs(args)
    in_csv = runs_in_csv(args.skip_runs_in)
    todo = [job for job in jobs if not is_done(job, out_dir) and job.name not in in_csv]
    commands = {job.name: job_command(job, args, extra, out_dir) for job in todo}
    check_jobs(todo, commands, out_dir)
    print(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run ({args.launcher})")
    if args.dry_run:
        for name, command in commands.items():
            print(f"{name}: (cd {out_dir} && {' '.join(command)})")
        return 0
    try:
        for sub in ("runs", "logs", "done"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot make --out-dir {args.out_dir}: {e.strerror}") from None
    if args.launcher == "local":
        failures = run_local(commands, out_dir, args.workers)
    else:
        failures = run_submitit(commands, out_dir, make_executor(args, out_dir))
    print(f"{len(todo) - len(failures)} jobs finished, {len(failures)} failed")
    from utils import plot

    runs = plot.load_runs(os.path.join(out_dir, "runs"))
    if runs:
        for path in plot.plot(runs, os.path.join(out_dir, "curves.png")):
            print(f"wrote {path}")
        print(plot.final_returns_table(runs))
    return 1 if failures else 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    with one_line_errors():
        sys.exit(main(tyro.cli(Args, args=argv[:split]), argv[split + 1 :]))
