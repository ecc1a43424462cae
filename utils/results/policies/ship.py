"""The trained policies beside this file, one per task and algorithm of the ten-seed study, made from a sweep's runs.

    python -m utils.results.policies.ship runs/policies/runs [--out utils/results/policies]

For the latest run of each task, exp_name and seed under the folder (`utils.benchmark ... --out-dir runs/policies`, see
README.md beside this file), its final checkpoint, validated by the script that wrote it, is written as
`<out>/<env_id>/<algo>.pt` with what playing needs: the networks, the normalization statistics, the arguments and
environment kwargs, the step counters; not Adam's state nor the random generator's (a policy plays, it does not resume).
Each file is validated again and played as `utils.evaluate` plays it (10 episodes, seeds 0-9, the mean action), and its
run is set beside its row of the ten-seed study (`utils.results.ten_seeds.compare`). Every run is checked before any file
is written. It prints the tables of README.md and the machine it ran on.
"""

import glob
import importlib
import os
import platform
from dataclasses import asdict, dataclass

import mujoco
import numpy as np
import torch
import tyro

from utils.evaluate import evaluate
from utils.logs import one_line_errors
from utils.plot import load_runs, run_from_scalars
from utils.results.ten_seeds import compare

TRAINING_STATE = ("optimizer", "rng")  # what only resuming needs


@dataclass
class Args:
    runs: tyro.conf.Positional[str]
    """the sweep's run directories (`<out-dir>/runs` of utils.benchmark)"""
    out: str = "utils/results/policies"
    """where the policies go, as <out>/<env_id>/<algo>.pt"""
    rows: str = "utils/results/ten_seeds/runs.csv"
    """the study whose rows the runs are set beside"""


def latest_runs(folder: str) -> list[str]:
    """The latest run directory (by its time stamp) of each task, exp_name and seed under `folder`."""
    latest = {}
    for run_dir in sorted(glob.glob(os.path.join(folder, "*__*__*__*")), key=lambda d: int(d.rsplit("__", 1)[1])):
        latest[os.path.basename(run_dir).rsplit("__", 1)[0]] = run_dir
    return sorted(latest.values())


def command(script, args: dict) -> str:
    """The script's command line that trains a run with these arguments: the flags that differ from a new run's defaults
    (not --resume: a run continued from its checkpoint keeps its checkpoint's path among its arguments)."""
    defaults = asdict(script.start_run(script.Args())[0])
    flags = ["--env-id", args["env_id"], "--seed", str(args["seed"])]
    for key, value in ((k, v) for k, v in args.items() if k not in ("env_id", "seed", "resume") and v != defaults[k]):
        flag = f"--{key.replace('_', '-')}"
        flags += (
            [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, *map(str, np.atleast_1d(value))]
        )
    return f"python {script.__name__}.py {' '.join(flags)}"


def machine() -> str:
    """The CPU (its model name, family and model, as Linux reports them) and the versions that fix a run's arithmetic."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = {
                k.strip(): v.strip() for k, _, v in (line.partition(":") for line in f.read().split("\n\n")[0].splitlines())
            }
        cpu = f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    versions = f"torch {torch.__version__}, MuJoCo {mujoco.__version__}, numpy {np.__version__}"
    return f"{cpu}, torch's CPU capability {torch.backends.cpu.get_cpu_capability()}; {versions}"


def main(args: Args) -> None:
    rows, runs, comparisons = load_runs(args.rows), [], []
    for run_dir in latest_runs(args.runs):  # every run checked before any file is written
        env_id, exp_name, _, _ = os.path.basename(run_dir).split("__")
        script = importlib.import_module(f"{exp_name.split('_')[0]}_continuous")
        checkpoint = script.load_checkpoint(os.path.join(run_dir, f"{exp_name}.pt"))
        batch_size = checkpoint["args"]["num_envs"] * checkpoint["args"]["num_steps"]
        if (step := checkpoint["global_step"]) != (total := checkpoint["args"]["total_timesteps"] // batch_size * batch_size):
            raise SystemExit(f"error: {run_dir} has not finished: its checkpoint is at step {step:,} of {total:,}")
        runs.append((run_dir, script, checkpoint))
        comparisons.append(compare.compare(run_from_scalars(run_dir), rows))
    if not runs:
        raise SystemExit(f"error: no runs under {args.runs}")

    table = ["| task | algorithm | the file played, 10 episodes: mean ± sd | play it | trained by |", "|---|---|---:|---|---|"]
    for run_dir, script, checkpoint in runs:
        algo, env_id = script.__name__.removesuffix("_continuous"), checkpoint["args"]["env_id"]
        path = os.path.join(args.out, env_id, f"{algo}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}, path)
        script.load_checkpoint(path)  # the file is valid as it ships
        returns = evaluate(path, episodes=10, seed=0)
        resumed = len(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))) - 1  # a resumed run writes a new event file
        trained = f"`{command(script, checkpoint['args'])}`" + (f", continued {resumed}x from its checkpoint" * bool(resumed))
        evaluation = f"{np.mean(returns):.1f} ± {np.std(returns):.1f}"  # as utils.evaluate prints it
        table.append(f"| {env_id} | {algo} | {evaluation} | `python -m utils.evaluate {path}` | {trained} |")
    print("\n".join(table), compare.table(comparisons), f"Machine: {machine()}", sep="\n\n")


if __name__ == "__main__":
    with one_line_errors():
        main(tyro.cli(Args))
