"""Learning curves, ratio ranges and a table of final returns from training logs.

    python -m utils.plot runs/ [--out curves.png] [--export results.csv]

Reads every TensorBoard run under the folder (run directories are named
`{env_id}__{exp_name}__{seed}__{time}`), and every CSV file of runs that `--export` wrote, and writes
two figures:
- `--out`: per environment, the learning curve of each algorithm (`exp_name`): the mean over seeds of
  each run's running mean of its last 10 episodic returns, with a band of ± one standard error over
  seeds; x = environment steps.
- `<out>_ratios.png`: per environment and algorithm, the range of the probability ratio of each
  update, `ratio/max` and `ratio/min` (geometric mean over seeds), on a log scale: the TREFree paper's Figure 2.
It also prints a Markdown table of final returns: per run the mean of its last 10 % of episodes, then
mean ± standard deviation over seeds, and the mean SPS. `--export` writes the runs in a compact CSV
(each run's curve and ratio range at most 200 points, its final return and SPS) that this command
reads back.
"""

from __future__ import annotations

import csv
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
    export: str | None = None
    """also write the runs to this CSV file"""


@dataclass
class Run:
    env_id: str
    exp_name: str
    seed: int
    curve: np.ndarray  # (points, 2): step, running mean of the last 10 episodic returns
    ratios: np.ndarray  # (iterations, 3): step, ratio/max, ratio/min
    final: float  # the mean raw return of the last 10 % of episodes
    sps: float  # the run's last charts/SPS


def run_from_scalars(run_dir: str, window: int = 10) -> Run | None:
    """The run of a TensorBoard run directory, or None if it is not one of ours or has no episode."""
    parts = os.path.basename(run_dir).split("__")
    scalars = read_scalars(run_dir)
    if len(parts) != 4 or not scalars.get("charts/episodic_return"):
        return None
    steps, returns = np.array(scalars["charts/episodic_return"]).T
    running = np.convolve(returns, np.ones(window))[: len(returns)] / np.minimum(np.arange(1, len(returns) + 1), window)
    ratios = [(s, hi, lo) for (s, hi), (_, lo) in zip(scalars.get("ratio/max", []), scalars.get("ratio/min", []))]
    final = float(returns[-max(1, len(returns) // 10) :].mean())
    sps = scalars["charts/SPS"][-1][1] if scalars.get("charts/SPS") else float("nan")
    return Run(parts[0], parts[1], int(parts[2]), np.stack([steps, running], 1), np.array(ratios).reshape(-1, 3), final, sps)


def load_runs(folder: str) -> list[Run]:
    """Every run under `folder`: TensorBoard run directories and CSV files written by `export_runs`."""
    run_dirs = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)})
    runs = [run for run in map(run_from_scalars, run_dirs) if run is not None]
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.csv"), recursive=True)):
        runs += read_runs_csv(path)
    return runs


def downsample(points: np.ndarray, most: int = 200) -> np.ndarray:
    return points[np.unique(np.linspace(0, len(points) - 1, most).round().astype(int))] if len(points) > most else points


def export_runs(runs: list[Run], path: str) -> None:
    """A compact CSV of the runs, one row per point: kind `curve` (step, running mean), `ratio` (step,
    max, min), `final` (final return) and `sps`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["env_id", "exp_name", "seed", "kind", "step", "value", "value2"])
        for run in runs:
            key = [run.env_id, run.exp_name, run.seed]
            out.writerows(key + ["curve", int(s), f"{v:.6g}", ""] for s, v in downsample(run.curve))
            out.writerows(key + ["ratio", int(s), f"{hi:.6g}", f"{lo:.6g}"] for s, hi, lo in downsample(run.ratios))
            out.writerows([key + ["final", "", f"{run.final:.6g}", ""], key + ["sps", "", f"{run.sps:.6g}", ""]])


def read_runs_csv(path: str) -> list[Run]:
    rows = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[(row["env_id"], row["exp_name"], int(row["seed"]))][row["kind"]].append(row)
    runs = []
    for (env_id, exp_name, seed), kinds in rows.items():
        curve = np.array([(float(r["step"]), float(r["value"])) for r in kinds["curve"]]).reshape(-1, 2)
        ratios = np.array([(float(r["step"]), float(r["value"]), float(r["value2"])) for r in kinds["ratio"]]).reshape(-1, 3)
        runs.append(Run(env_id, exp_name, seed, curve, ratios, float(kinds["final"][0]["value"]), float(kinds["sps"][0]["value"])))
    return runs


def group(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """env_id -> exp_name -> runs (one per seed)."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.env_id][run.exp_name].append(run)
    return groups


def final_returns_table(runs: list[Run]) -> str:
    """Markdown: one row per environment and algorithm, mean ± std (ddof 1) over seeds of the final returns."""
    rows = ["| environment | algorithm | seeds | final return | SPS |", "|---|---|---:|---:|---:|"]
    for env_id, algos in sorted(group(runs).items()):
        for exp_name, seeds in sorted(algos.items()):
            finals = [run.final for run in seeds]
            std = np.std(finals, ddof=1) if len(finals) > 1 else 0.0
            sps = np.mean([run.sps for run in seeds])
            rows.append(f"| {env_id} | {exp_name} | {len(finals)} | {np.mean(finals):.1f} ± {std:.1f} | {sps:,.0f} |")
    return "\n".join(rows)


def plot(runs: list[Run], out: str) -> tuple[str, str]:
    """Write the learning-curve and ratio-range figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(runs)
    colors = {name: f"C{i}" for i, name in enumerate(sorted({run.exp_name for run in runs}))}  # one per algorithm everywhere
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    ratio_out = os.path.splitext(out)[0] + "_ratios.png"
    ncols = min(len(groups), 3)  # one panel per environment, at most three per row
    nrows = -(-len(groups) // ncols)
    (curves_fig, curve_axes), (ratios_fig, ratio_axes) = [
        plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False) for _ in range(2)
    ]
    for extra in [*curve_axes.flat[len(groups):], *ratio_axes.flat[len(groups):]]:
        extra.set_visible(False)
    for ax, ratio_ax, (env_id, algos) in zip(curve_axes.flat, ratio_axes.flat, sorted(groups.items())):
        for exp_name, seeds in sorted(algos.items()):
            grid = np.linspace(0, min(run.curve[-1, 0] for run in seeds), 200)
            curves = np.stack([np.interp(grid, run.curve[:, 0], run.curve[:, 1]) for run in seeds])
            mean, stderr = curves.mean(0), curves.std(0, ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else 0.0
            ax.plot(grid, mean, color=colors[exp_name], label=f"{exp_name} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
            ax.fill_between(grid, mean - stderr, mean + stderr, color=colors[exp_name], alpha=0.2)
            with_ratios = [run for run in seeds if len(run.ratios)]
            if with_ratios:
                steps = np.linspace(0, min(run.ratios[-1, 0] for run in with_ratios), 200)
                log_hi = np.mean([np.interp(steps, run.ratios[:, 0], np.log(run.ratios[:, 1])) for run in with_ratios], 0)
                log_lo = np.mean([np.interp(steps, run.ratios[:, 0], np.log(np.maximum(run.ratios[:, 2], 1e-30))) for run in with_ratios], 0)
                ratio_ax.fill_between(steps, np.exp(log_lo), np.exp(log_hi), color=colors[exp_name], alpha=0.3, label=exp_name)
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
    if args.export:
        export_runs(runs, args.export)
        print(f"wrote {args.export}")
    print(final_returns_table(runs))


if __name__ == "__main__":
    main(tyro.cli(Args))
