"""Benchmark sweeps: algorithms x environments x seeds, on this machine or on a SLURM cluster.

    python -m utils.benchmark --algos trefree ppo trpo --env-ids HalfCheetah-v5 Hopper-v5 --seeds 1 2 3 \\
        [--grid delta=0.03,0.1] [--total-timesteps N] [--launcher local|slurm] [--workers N] [--out-dir benchmark]
        [--skip-runs-in results.csv] [--dry-run] [-- extra args]

A job is one run of `<algo>_continuous.py` in its own process (one torch thread, `--save-model`, a checkpoint every
`--checkpoint-interval` iterations), in `<out-dir>/runs/` with its output in `<out-dir>/logs/`; arguments after `--` go
to every job. The sweep is resumable: a finished job (its marker in `<out-dir>/done/`, or a run in a `--skip-runs-in`
CSV) is skipped, an interrupted one continues from its checkpoint. Every job's command line passes its script's checks
before any job starts; a job that fails later is reported, and the others go on. `utils.plot` draws the sweep at the end.
"""

import contextlib
import fcntl
import glob
import importlib
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import submitit
import tyro

from utils.logs import one_line_errors, reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGOS = ("trefree", "ppo", "trpo")


@dataclass
class Args:
    algos: tuple[Literal["trefree", "ppo", "trpo"], ...] = ALGOS  # each runs `<algo>_continuous.py` with its (paper) defaults
    env_ids: tuple[str, ...] = ("HalfCheetah-v5",)  # the environments
    seeds: tuple[int, ...] = (1, 2, 3)  # the seeds
    grid: tuple[str, ...] = ()  # script flags to sweep, [ALGO:]FLAG=V1,V2,... (`delta=0.03,0.1`): a job per combination
    total_timesteps: int | None = None  # environment steps per run (default: each script's own, 1M)
    launcher: Literal["local", "slurm"] = "local"  # processes on this machine, or a SLURM job array (submitit)
    workers: int = os.cpu_count() or 1  # local: the number of jobs at a time; slurm: the array's parallelism
    out_dir: str = "benchmark"  # where the runs, logs, markers and figures of the sweep go
    checkpoint_interval: int = 20  # a checkpoint every this many iterations, from which an interrupted job continues
    tag: str | None = None  # a suffix `_<tag>` of every exp_name, to tell this sweep's runs from others (`nocfrc`)
    skip_runs_in: tuple[str, ...] = ()  # CSV files of `utils.plot --export`: their runs are not run again
    dry_run: bool = False  # print the jobs and their commands without running them
    track: bool = False  # pass --track to every job: each run goes to Weights & Biases (with the two flags below)
    wandb_project_name: str | None = None  # with --track: the W&B project of every job (default: the scripts' own)
    wandb_entity: str | None = None  # with --track: the W&B entity of every job
    slurm_partition: str | None = None  # SLURM partition (default: the cluster's)
    slurm_time: int = 240  # SLURM time limit of each job, in minutes
    slurm_cpus_per_task: int = 1  # SLURM CPUs per job
    slurm_gpus_per_task: int = 0  # SLURM GPUs per job


@dataclass(frozen=True)
class Job:
    algo: str
    env_id: str
    seed: int
    flags: tuple[tuple[str, str], ...] = ()  # (flag, value) pairs of the grid
    tag: str | None = None

    @property
    def exp_name(self) -> str:
        return f"{self.algo}_continuous" + "".join(f"_{f}{v}" for f, v in self.flags) + (f"_{self.tag}" if self.tag else "")

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
        if colon and only not in ALGOS:
            raise SystemExit(f"error: --grid names an unknown algorithm: {only} (trefree, ppo or trpo)")
        flag, _, values = (rest if colon else item).partition("=")
        flag = flag.removeprefix("--")
        if not flag or not values or any(not v for v in values.split(",")):
            raise SystemExit(f"error: --grid takes [ALGO:]FLAG=V1,V2,... (e.g. delta=0.03,0.1), not '{item}'")
        if flag in ("env-id", "seed", "exp-name", "resume"):
            raise SystemExit(f"error: --grid cannot sweep --{flag}; it is set by the runner")
        axes += [[(flag, value) for value in values.split(",")]] if only == algo or not colon else []
    return list(itertools.product(*axes))


def make_jobs(args: Args) -> list[Job]:
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9.=-]+", args.tag):
        raise SystemExit(f"error: --tag takes letters, digits, '.', '=' and '-', not '{args.tag}'")
    return [
        Job(algo, env_id, seed, flags, args.tag)
        for env_id in args.env_ids
        for algo in args.algos
        for flags in parse_grid(args.grid, algo)
        for seed in args.seeds
    ]


def runs_in_csv(paths: tuple[str, ...]) -> set[str]:
    """The names (`<env>__<exp_name>__<seed>`) of the finished runs (a `final` row) in CSV files of `utils.plot --export`."""
    names = set()
    for path in paths:
        try:
            runs = pd.read_csv(path, dtype=str).query("kind == 'final'")
        except (OSError, ValueError, AttributeError, pd.errors.UndefinedVariableError):
            raise SystemExit(f"error: '{path}' is not a CSV file of runs written by utils.plot --export") from None
        names |= set(runs.env_id + "__" + runs.exp_name + "__" + runs.seed)
    return names


def job_command(job: Job, args: Args, extra: list[str], out_dir: str) -> list[str]:
    """The command that runs the job, or continues it from the checkpoint of its latest run (with its saved arguments)."""
    script = os.path.join(ROOT, f"{job.algo}_continuous.py")
    runs = sorted(glob.glob(os.path.join(out_dir, "runs", f"{job.name}__*")), key=lambda d: int(d.rsplit("__", 1)[1]))
    if runs and os.path.exists(checkpoint := os.path.join(runs[-1], f"{job.exp_name}.pt")):
        # the run keeps its own arguments; those after `--` still reach it (a resumed run takes --cuda and --compile)
        return [sys.executable, script, "--resume", os.path.relpath(checkpoint, out_dir), *extra]
    flags = ["--env-id", job.env_id, "--seed", str(job.seed), "--exp-name", job.exp_name, "--save-model"]
    flags += ["--checkpoint-interval", str(args.checkpoint_interval)]
    flags += ["--total-timesteps", str(args.total_timesteps)] if args.total_timesteps is not None else []
    flags += ["--track"] * args.track
    for flag, value in (("--wandb-project-name", args.wandb_project_name), ("--wandb-entity", args.wandb_entity)):
        flags += [flag, value] if args.track and value else []
    return [sys.executable, script, *flags, *(word for flag, value in job.flags for word in (f"--{flag}", value)), *extra]


def check_jobs(commands: dict[str, list[str]], out_dir: str) -> None:
    """Refuse the sweep before any job starts if a script would refuse a job's command line (a typo after `--` or in
    --grid, a value out of range, an unknown environment): the script's public `Args`, `start_run` and `check_run`, as
    its `__main__` and `train` run them before they write anything. One error line names the first such job."""
    with contextlib.chdir(out_dir) if os.path.isdir(out_dir) else contextlib.nullcontext():  # a resumed job's checkpoint
        for name, command in commands.items():
            script = importlib.import_module(os.path.basename(command[1]).removesuffix(".py"))  # no side effects on import
            messages = io.StringIO()  # tyro's framed message, the notes of a resumed run
            try:
                with contextlib.redirect_stderr(messages):
                    script.check_run(script.start_run(tyro.cli(script.Args, args=command[2:]))[0])
            except script.ArgsError as e:
                raise SystemExit(f"error: {name}: {e}") from None
            except SystemExit:  # tyro's refusal
                raise SystemExit(f"error: {name}: {reason(messages.getvalue())}") from None


def run_job(command: list[str], out_dir: str, name: str) -> None:
    """Run one job to completion in `out_dir`, its output in `logs/<name>.log`; mark it done, or raise RuntimeError with
    its command and the end of its log. Called locally, or on a SLURM node by submitit: there, the warning that the time
    limit is near (SIGUSR2, 90 s before it) reaches the script as SIGTERM, so that it stops at the end of its iteration
    with a checkpoint from which the sweep submitted again continues (it would die of SIGUSR2 mid-iteration)."""
    log_path = os.path.join(out_dir, "logs", f"{name}.log")
    on_node = "SLURM_JOB_ID" in os.environ and threading.current_thread() is threading.main_thread()
    ignore_usr2 = (lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN)) if on_node else None  # in the script, from its start
    with open(log_path, "a") as log:
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        with subprocess.Popen(
            command, cwd=out_dir, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=ignore_usr2
        ) as process:
            if on_node:  # instead of submitit's handler, which ends the job at once
                signal.signal(signal.SIGUSR2, lambda signum, frame: process.terminate())
            code = process.wait()
    if code != 0:
        tail = "".join(line + "\n" for line in log_tail(log_path))
        raise RuntimeError(f"{name} failed (exit code {code}): {' '.join(command)}\n{tail}")
    open(os.path.join(out_dir, "done", name), "w").close()


def log_tail(path: str, count: int = 5) -> list[str]:
    """The last `count` lines of a job's log as a terminal shows them (a progress line's last state)."""
    with open(path, errors="replace") as log:
        return [line.split("\r")[-1] for line in log.read().removesuffix("\n").split("\n")[-count:]]


def run_local(commands: dict[str, list[str]], out_dir: str, workers: int) -> dict[str, str]:
    """Run the jobs on this machine, `workers` at a time (submitit's local executor would start them all at once), with
    a progress line (in a log file, one line per change); returns the failures by job name."""
    failures, start, line, interactive = {}, time.time(), "", sys.stderr.isatty()
    with ThreadPoolExecutor(workers) as pool:  # each thread waits on one job's process
        futures = {pool.submit(run_job, command, out_dir, name): name for name, command in commands.items()}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in (future for future in finished if future.exception()):
                failures[futures[future]] = str(future.exception())
                print("\n" * interactive + failures[futures[future]], file=sys.stderr)
            done, running = len(futures) - len(pending), sum(future.running() for future in pending)
            waiting, minutes = len(pending) - running, (time.time() - start) / max(done, 1) * len(pending) / 60
            left = f"~{minutes:.0f} min left" if done else "time left: after the first job"
            status = f"jobs: {done - len(failures)} done, {running} running, {len(failures)} failed, {waiting} waiting; {left}"
            if status != line:
                print(
                    f"\r{status}   " if interactive else status, end="" if interactive else "\n", file=sys.stderr, flush=True
                )
                line = status
    print("\n" * interactive, end="", file=sys.stderr)
    return failures


class SqueueWatcher(submitit.slurm.slurm.SlurmInfoWatcher):
    """Job states from `squeue`, for a cluster without accounting (where submitit's `sacct` fails at every poll). A job
    that squeue no longer lists has ended (it keeps them MinJobAge, 300 s by default, after they end)."""

    def update(self) -> None:
        pending = self._registered - self._finished
        ids = ",".join(sorted({job_id.split("_")[0] for job_id in pending}))
        if not ids:
            return
        self._num_calls += 1
        command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={ids}"]
        listed = subprocess.run(command, capture_output=True, text=True)
        if listed.returncode != 0 and "Invalid job id" not in listed.stderr:
            return  # the controller did not answer: the states are asked again at the next poll
        states = dict(line.split("|", 1) for line in listed.stdout.split())
        self._info_dict |= {job_id: {"State": states.get(job_id, "ENDED")} for job_id in pending}
        self._last_status_check = time.time()
        self._finished |= {job_id for job_id in pending if self.is_done(job_id, mode="cache")}


def accounting_off() -> bool:
    """Whether the SLURM cluster here keeps no accounting (so `sacct`, which submitit asks for job states, fails)."""
    with contextlib.suppress(OSError):  # no scontrol: not a SLURM machine
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
        return re.search(r"^AccountingStorageType\s*=\s*accounting_storage/none$", config, re.MULTILINE) is not None
    return False


def make_executor(args: Args, out_dir: str, cluster: str = "slurm"):
    """A submitit executor for the sweep: a SLURM job array (`cluster="local"` runs it on this machine)."""
    executor = submitit.AutoExecutor(folder=os.path.join(out_dir, "submitit"), cluster=cluster)
    executor.update_parameters(timeout_min=args.slurm_time, cpus_per_task=args.slurm_cpus_per_task, name="benchmark")
    if cluster == "slurm":
        partition = {"slurm_partition": args.slurm_partition} if args.slurm_partition else {}
        gpus = {"slurm_gpus_per_task": args.slurm_gpus_per_task} if args.slurm_gpus_per_task else {}
        executor.update_parameters(slurm_array_parallelism=args.workers, **partition, **gpus)
    return executor


def run_submitit(commands: dict[str, list[str]], out_dir: str, executor) -> dict[str, str]:
    """Submit the jobs as one array and wait for them; returns the failures by job name, each reported in one line: the
    job's exit code and error line (its script's, from its log), or why a job ended outside its script."""
    with executor.batch():
        jobs = {name: executor.submit(run_job, command, out_dir, name) for name, command in commands.items()}
    if executor.cluster == "slurm" and accounting_off():
        print("note: SLURM accounting is off on this cluster (no sacct): job states come from squeue", file=sys.stderr)
        watcher = SqueueWatcher(delay_s=600)  # as submitit's: it polls at 2 s, 4 s, 8 s, ..., then every 10 min
        for job in jobs.values():
            job.watcher = watcher  # this job's, instead of the one that all of submitit's SLURM jobs share
            watcher.register_job(job.job_id)
    failures = {}
    for name, job in jobs.items():
        if (error := job.exception()) is None:
            continue
        if code := re.search(r"failed \(exit code (-?\d+)\)", str(error)):  # run_job's error: the script's exit code
            # the script's error line, or the last line it wrote (`stopped by SIGTERM at ...`)
            tail = log_tail(log := os.path.join(out_dir, "logs", f"{name}.log"))
            failures[name] = f"exit code {code[1]}: {next((s for s in tail if s.startswith('error:')), tail[-1])} (log: {log})"
        else:  # ended outside the script: cancelled before it started, its time limit (submitit's error), its node lost
            state, raised = re.search(r"\(state: (\w+)\)", str(error)), re.findall(r"^\S+Error: (.+)$", str(error), re.M)
            why = f"state {state[1]}" if state else raised[-1] if raised else str(error).strip().split("\n")[0]
            failures[name] = f"the job ended outside its script ({why}; job {job.job_id})"
        print(f"{name} failed: {failures[name]}", file=sys.stderr)
    return failures


def main(args: Args, extra: list[str]) -> int:
    if "--exp-name" in extra or "--resume" in extra:
        raise SystemExit("error: --exp-name and --resume are set by the runner, not after --")
    if "-h" in extra or "--help" in extra:
        raise SystemExit("error: --help after -- would end every job with the script's help; run the script with --help")
    if args.workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    out_dir, jobs, in_csv = os.path.abspath(args.out_dir), make_jobs(args), runs_in_csv(args.skip_runs_in)
    todo = [job for job in jobs if not os.path.exists(os.path.join(out_dir, "done", job.name)) and job.name not in in_csv]
    commands = {job.name: job_command(job, args, extra, out_dir) for job in todo}
    check_jobs(commands, out_dir)
    print(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to run ({args.launcher})")
    if args.dry_run:
        print("".join(f"{name}: (cd {out_dir} && {' '.join(command)})\n" for name, command in commands.items()), end="")
        return 0
    executor = make_executor(args, out_dir) if args.launcher == "slurm" else None  # no SLURM: refused before any folder
    if executor and (ping := subprocess.run(["scontrol", "ping"], capture_output=True, text=True)).returncode != 0:
        answer = (ping.stdout + ping.stderr).strip().split("\n")[0]  # a fault of the cluster, not of the input: exit 1
        print(f"error: the SLURM controller does not answer ({answer}); nothing was submitted", file=sys.stderr)
        return 1
    for sub in ("runs", "logs", "done"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    try:  # one sweep at a time in --out-dir: a lock that goes with this process, however it ends
        fcntl.flock(lock := os.open(out_dir, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: another sweep is running in --out-dir {args.out_dir}") from None
    failures = run_local(commands, out_dir, args.workers) if executor is None else run_submitit(commands, out_dir, executor)
    os.close(lock)
    print(f"{len(todo) - len(failures)} jobs finished, {len(failures)} failed")
    from utils import plot

    if runs := plot.load_runs(os.path.join(out_dir, "runs")):
        print("".join(f"wrote {path}\n" for path in plot.plot(runs, os.path.join(out_dir, "curves.png"))), end="")
        print(plot.final_returns_table(runs))
    return 1 if failures else 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    with one_line_errors():
        sys.exit(main(tyro.cli(Args, args=argv[:split]), argv[split + 1 :]))
