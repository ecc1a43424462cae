"""Learning curves, ratio ranges and a table of final returns from training logs.

    python -m utils.plot runs/ [--out curves.png]

Reads every TensorBoard run under the folder (run directories are named
`{env_id}__{exp_name}__{seed}__{time}`) and writes two figures:
- `--out`: per environment, the learning curve of each algorithm (`exp_name`): the mean over seeds of
  each run's running mean of its last 10 episodic returns, with a band of ± one standard error over
  seeds; x = environment steps.
- `<out>_ratios.png`: per environment and algorithm, the range of the probability ratio of each
  update, `ratio/max` and `ratio/min` (geometric mean over seeds), on a log scale: the TREFree paper's Figure 2.
It also prints a Markdown table of final returns: per run the mean of its last 10 % of episodes, then
mean ± standard deviation over seeds.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import tyro

from utils.logs import read_scalars


@dataclass
class Args:
    folder: tyro.conf.Positional[str]
    """the folder holding the runs (searched recursively)"""
    out: str = "curves.png"
    """the learning-curve figure; the ratio figure goes next to it as `<name>_ratios.png`"""


@dataclass
class Run:
    env_id: str
    exp_name: str
    seed: int
    returns: np.ndarray  # (episodes, 2): step, raw episodic return
    ratios: np.ndarray  # (iterations, 3): step, ratio/max, ratio/min


def load_runs(folder: str) -> list[Run]:
    """Every run under `folder` that has logged at least one episode."""
    runs = []
    for run_dir in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)}):
        parts = os.path.basename(run_dir).split("__")
        scalars = read_scalars(run_dir)
        if len(parts) != 4 or not scalars.get("charts/episodic_return"):
            continue
        ratios = [(s, hi, lo) for (s, hi), (_, lo) in zip(scalars.get("ratio/max", []), scalars.get("ratio/min", []))]
        runs.append(Run(parts[0], parts[1], int(parts[2]), np.array(scalars["charts/episodic_return"]), np.array(ratios).reshape(-1, 3)))
    return runs


def group(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """env_id -> exp_name -> runs (one per seed)."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.env_id][run.exp_name].append(run)
    return groups


def final_return(run: Run) -> float:
    """The mean raw return of the run's last 10 % of episodes (at least one)."""
    returns = run.returns[:, 1]
    return float(returns[-max(1, len(returns) // 10) :].mean())


def final_returns_table(runs: list[Run]) -> str:
    """Markdown: one row per environment and algorithm, mean ± std (ddof 1) over seeds of `final_return`."""
    rows = ["| environment | algorithm | seeds | final return |", "|---|---|---:|---:|"]
    for env_id, algos in sorted(group(runs).items()):
        for exp_name, seeds in sorted(algos.items()):
            finals = [final_return(run) for run in seeds]
            std = np.std(finals, ddof=1) if len(finals) > 1 else 0.0
            rows.append(f"| {env_id} | {exp_name} | {len(finals)} | {np.mean(finals):.1f} ± {std:.1f} |")
    return "\n".join(rows)


def smoothed_curve(run: Run, grid: np.ndarray, window: int = 10) -> np.ndarray:
    """The running mean of the last `window` episodic returns, read at the steps of `grid`."""
    steps, returns = run.returns[:, 0], run.returns[:, 1]
    running = np.convolve(returns, np.ones(window), "full")[: len(returns)] / np.minimum(np.arange(1, len(returns) + 1), window)
    return np.interp(grid, steps, running)


def plot(runs: list[Run], out: str) -> tuple[str, str]:
    """Write the learning-curve and ratio-range figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(runs)
    ratio_out = os.path.splitext(out)[0] + "_ratios.png"
    curves_fig, curve_axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    ratios_fig, ratio_axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, ratio_ax, (env_id, algos) in zip(curve_axes[0], ratio_axes[0], sorted(groups.items())):
        for exp_name, seeds in sorted(algos.items()):
            grid = np.linspace(0, min(run.returns[-1, 0] for run in seeds), 200)
            curves = np.stack([smoothed_curve(run, grid) for run in seeds])
            mean, stderr = curves.mean(0), curves.std(0, ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else 0.0
            (line,) = ax.plot(grid, mean, label=f"{exp_name} ({len(seeds)} seeds)")
            ax.fill_between(grid, mean - stderr, mean + stderr, color=line.get_color(), alpha=0.2)
            with_ratios = [run for run in seeds if len(run.ratios)]
            if with_ratios:
                steps = np.linspace(0, min(run.ratios[-1, 0] for run in with_ratios), 200)
                log_hi = np.mean([np.interp(steps, run.ratios[:, 0], np.log(run.ratios[:, 1])) for run in with_ratios], 0)
                log_lo = np.mean([np.interp(steps, run.ratios[:, 0], np.log(np.maximum(run.ratios[:, 2], 1e-30))) for run in with_ratios], 0)
                ratio_ax.fill_between(steps, np.exp(log_lo), np.exp(log_hi), alpha=0.3, label=exp_name)
        ax.set(title=env_id, xlabel="environment steps", ylabel="episodic return")
        ax.legend(fontsize="small")
        ratio_ax.set(title=env_id, xlabel="environment steps", ylabel="ratio range (min to max)", yscale="log")
        ratio_ax.legend(fontsize="small")
    curves_fig.tight_layout()
    curves_fig.savefig(out, dpi=120)
    ratios_fig.tight_layout()
    ratios_fig.savefig(ratio_out, dpi=120)
    plt.close("all")
    return out, ratio_out


def main(args: Args) -> None:
    runs = load_runs(args.folder)
    if not runs:
        raise SystemExit(f"error: no runs with episodic returns under '{args.folder}'")
    for path in plot(runs, args.out):
        print(f"wrote {path}")
    print(final_returns_table(runs))


if __name__ == "__main__":
    main(tyro.cli(Args))
