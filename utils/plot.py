"""Learning curves, ratio ranges and a table of final returns from training logs.

    python -m utils.plot runs/ [--out curves.png] [--export results.csv] [--ratios] [--x steps|iterations]
    python -m utils.plot utils/results/final --reference ppo_continuous_clip-coef0.3
    python -m utils.plot utils/results/figure1 utils/results/final --exp-names trpo_continuous "ppo_*"

Reads every TensorBoard run under the folders (run directories are named
`{env_id}__{exp_name}__{seed}__{time}`), and every CSV file of runs that `--export` wrote, keeps those
whose exp_name matches `--exp-names` (shell patterns; all by default), and writes two figures:
- `--out`: per environment, the learning curve of each algorithm (`exp_name`): the mean over seeds of
  each run's running mean of its last 10 episodic returns, with a band of ± one standard error over
  seeds; x = environment steps.
- `<out>_ratios.png`: per environment and algorithm, the range of the probability ratio of each
  update, `ratio/max` and `ratio/min` (geometric mean over seeds), on a log scale: the TREFree paper's Figure 2.
It also prints a Markdown table of final returns: per run the mean of its last 10 % of episodes, then
mean ± standard deviation over seeds, and the mean SPS. `--export` writes the runs in a compact CSV
(each run's curve and ratio range at most 200 points, its final return and SPS) that this command
reads back.

`--ratios` prints the ratio ranges as a table (per environment and algorithm, the median over updates
of ln ratio/max and ln ratio/min, and their extremes). `--reference EXP_NAME` normalizes every final
return by the reference's mean final return on the same environment and prints, per algorithm, the
mean normalized score over environments and the interquartile mean (IQM) over runs and environments
with a 95 % stratified-bootstrap confidence interval (rliable; Agarwal et al., 2021). A study's own analysis lives
beside its data: the ten seeds' comparison (formerly `--compare`) in `utils/results/ten_seeds/analysis.py`, the
screening's choice and sensitivity figure (formerly `--choose`, `--sensitivity`) in `utils/results/screening/analysis.py`.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tyro

from utils.logs import one_line_errors, read_scalars


@dataclass
class Args:
    folders: tyro.conf.Positional[tuple[str, ...]]
    """the folders holding the runs (searched recursively): TensorBoard run directories and `--export` CSV files (or a file)"""
    exp_names: tuple[str, ...] = ()
    """keep only the runs whose exp_name matches one of these shell patterns (`trpo_continuous`, `ppo_*`)"""
    env_ids: tuple[str, ...] = ()
    """keep only the runs whose environment matches one of these shell patterns (`Ant-v5`, `Humanoid*`)"""
    out: str = "curves.png"
    """the learning-curve figure; the ratio figure goes next to it as `<name>_ratios.png`"""
    export: str | None = None
    """also write the runs to this CSV file"""
    ratios: bool = False
    """also print the ratio ranges: median over updates of ln ratio/max and ln ratio/min, and their extremes"""
    reference: str | None = None
    """normalize final returns by this exp_name's mean final return per environment; print the mean and the IQM (rliable)"""
    x: Literal["steps", "iterations"] = "steps"
    """the learning curves' x axis: environment (simulator) steps, or iterations"""


@dataclass
class Run:
    env_id: str
    exp_name: str
    seed: int
    curve: np.ndarray  # (points, 2): step, running mean of the last 10 episodic returns
    ratios: np.ndarray  # (iterations, 3): step, ratio/max, ratio/min
    final: float  # the mean raw return of the last 10 % of episodes
    sps: float  # the run's last charts/SPS
    length: float = float("nan")  # the mean length of the last 10 % of episodes
    eval: float = float("nan")  # the mean of eval/episodic_return: the final policy's mean action (`--save-model`)
    # (points, 2): the step at the end of an iteration, its number
    iterations: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    binned: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (bins, 2): the learning curve on the shared grid
    auc: float = float("nan")  # sample efficiency: the mean of `binned`, the area under the learning curve per step


BIN = 10_000  # the shared grid of the sample-efficiency measure: bins of 10k environment steps


def binned_curve(steps: np.ndarray, returns: np.ndarray, width: int = BIN) -> np.ndarray:
    """(bins, 2): at g = width, 2 width, ... to the bin of the last episode, the mean raw return of the episodes that
    ended in (g - width, g], or the previous bin's value where none did."""
    index = np.ceil(steps / width).astype(int) - 1
    counts, sums = np.bincount(index), np.bincount(index, returns)
    values = np.divide(sums, counts, out=np.full(len(counts), np.nan), where=counts > 0)
    for i in range(1, len(values)):
        values[i] = values[i - 1] if counts[i] == 0 else values[i]
    return np.stack([(np.arange(len(values)) + 1.0) * width, values], 1)


def run_from_scalars(run_dir: str, window: int = 10) -> Run | None:
    """The run of a TensorBoard run directory, or None if it is not one of ours or has no episode."""
    parts = os.path.basename(run_dir).split("__")
    try:
        scalars = read_scalars(run_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if len(parts) != 4 or not scalars.get("charts/episodic_return"):
        return None
    steps, returns = np.array(scalars["charts/episodic_return"]).T
    running = np.convolve(returns, np.ones(window))[: len(returns)] / np.minimum(np.arange(1, len(returns) + 1), window)
    ratios = [(s, hi, lo) for (s, hi), (_, lo) in zip(scalars.get("ratio/max", []), scalars.get("ratio/min", []), strict=True)]
    last = max(1, len(returns) // 10)
    final = float(returns[-last:].mean())
    sps = scalars["charts/SPS"][-1][1] if scalars.get("charts/SPS") else float("nan")
    lengths = [value for _, value in scalars.get("charts/episodic_length", [])]
    length = float(np.mean(lengths[-last:])) if lengths else float("nan")
    evals = [value for _, value in scalars.get("eval/episodic_return", [])]
    ends = [step for step, _ in scalars.get("charts/SPS", [])]  # logged once per iteration
    iterations = np.stack([ends, np.arange(1, len(ends) + 1)], 1) if ends else np.zeros((0, 2))
    binned = binned_curve(steps, returns)
    return Run(
        parts[0],
        parts[1],
        int(parts[2]),
        np.stack([steps, running], 1),
        np.array(ratios).reshape(-1, 3),
        final,
        sps,
        length,
        float(np.mean(evals)) if evals else float("nan"),
        iterations,
        binned,
        float(binned[:, 1].mean()),
    )


def load_runs(folder: str) -> list[Run]:
    """Every run under `folder`: TensorBoard run directories and CSV files written by `export_runs` (or the one such
    CSV file that `folder` names)."""
    if os.path.isfile(folder):
        return read_runs_csv(folder)
    run_dirs = sorted(
        {os.path.dirname(p) for p in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)}
    )
    runs = [run for run in map(run_from_scalars, run_dirs) if run is not None]
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.csv"), recursive=True)):
        runs += read_runs_csv(path)
    return runs


def downsample(points: np.ndarray, most: int = 200) -> np.ndarray:
    return points[np.unique(np.linspace(0, len(points) - 1, most).round().astype(int))] if len(points) > most else points


def csv_rows(run: Run) -> list[list]:
    """The run's rows in the compact CSV: kind `curve` (step, running mean), `ratio` (step, max, min), `iteration`
    (step, iteration number), `binned` (step, the binned curve, every bin), `final` (final return), `sps`, `length`
    (final episode length), `eval` (evaluation return) and `auc` (sample efficiency)."""
    key = [run.env_id, run.exp_name, run.seed]
    rows = [key + ["curve", int(s), f"{v:.6g}", ""] for s, v in downsample(run.curve)]
    rows += [key + ["ratio", int(s), f"{hi:.6g}", f"{lo:.6g}"] for s, hi, lo in downsample(run.ratios)]
    rows += [key + ["iteration", int(s), int(i), ""] for s, i in downsample(run.iterations)]
    rows += [key + ["binned", int(s), f"{v:.6g}", ""] for s, v in run.binned]
    rows += [key + ["final", "", f"{run.final:.6g}", ""], key + ["sps", "", f"{run.sps:.6g}", ""]]
    rows += [
        key + [kind, "", f"{value:.6g}", ""]
        for kind, value in (("length", run.length), ("eval", run.eval), ("auc", run.auc))
        if not np.isnan(value)
    ]
    return rows


def export_runs(runs: list[Run], path: str) -> None:
    """A compact CSV of the runs, one row per point (`csv_rows`), that `read_runs_csv` reads back."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["env_id", "exp_name", "seed", "kind", "step", "value", "value2"])
        for run in runs:
            out.writerows(csv_rows(run))


def read_runs_csv(path: str) -> list[Run]:
    rows = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[(row["env_id"], row["exp_name"], int(row["seed"]))][row["kind"]].append(row)
    runs = []
    for (env_id, exp_name, seed), kinds in rows.items():
        curve = np.array([(float(r["step"]), float(r["value"])) for r in kinds["curve"]]).reshape(-1, 2)
        ratios = np.array([(float(r["step"]), float(r["value"]), float(r["value2"])) for r in kinds["ratio"]]).reshape(-1, 3)
        iterations, binned = (
            np.array([(float(r["step"]), float(r["value"])) for r in kinds[kind]]).reshape(-1, 2)
            for kind in ("iteration", "binned")
        )
        scalar = {
            kind: float(kinds[kind][0]["value"]) if kinds[kind] else float("nan")
            for kind in ("final", "sps", "length", "eval", "auc")
        }
        runs.append(Run(env_id, exp_name, seed, curve, ratios, **scalar, iterations=iterations, binned=binned))
    return runs


def group(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """env_id -> exp_name -> runs (one per seed)."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.env_id][run.exp_name].append(run)
    return groups


def final_returns_table(runs: list[Run]) -> str:
    """Markdown: one row per environment and algorithm, mean ± std (ddof 1) over seeds of the final returns (and of
    the evaluation returns and final episode lengths, where runs have them; "–" for a row whose runs lack them)."""
    with_eval = any(not np.isnan(run.eval) for run in runs)
    with_length = any(not np.isnan(run.length) for run in runs)
    extra = ["evaluation return"] * with_eval + ["episode length"] * with_length
    rows = [
        "| " + " | ".join(["environment", "algorithm", "seeds", "final return", *extra, "SPS"]) + " |",
        "|---|---|" + "---:|" * (3 + len(extra)),
    ]

    def mean_std(values: list[float], digits: int = 1) -> str:
        if np.isnan(values).any():
            return "–"
        return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.{digits}f}"

    for env_id, algos in sorted(group(runs).items()):
        for exp_name, seeds in sorted(algos.items()):
            cells = [mean_std([run.final for run in seeds])]
            cells += [mean_std([run.eval for run in seeds])] * with_eval + [
                mean_std([run.length for run in seeds], 0)
            ] * with_length
            sps = np.mean([run.sps for run in seeds])
            rows.append(f"| {env_id} | {exp_name} | {len(seeds)} | {' | '.join(cells)} | {sps:,.0f} |")
    return "\n".join(rows)


def ratio_table(runs: list[Run]) -> str:
    """Markdown: per environment and algorithm, the median over updates (pooled over seeds) of ln ratio/max and
    ln ratio/min after each update, their most extreme values, and the share of updates whose ratio/min is >= 1."""
    rows = [
        "| environment | algorithm | median ln max | median ln min | largest ln max | smallest ln min "
        "| updates with min ≥ 1 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for env_id, algos in sorted(group(runs).items()):
        for exp_name, seeds in sorted(algos.items()):
            ratios = np.concatenate([run.ratios for run in seeds])
            if not len(ratios):
                continue
            log_max, log_min = np.log(ratios[:, 1]), np.log(np.maximum(ratios[:, 2], 1e-300))
            rows.append(
                f"| {env_id} | {exp_name} | {np.median(log_max):.3f} | {np.median(log_min):.3f} | {log_max.max():.2f} | "
                f"{log_min.min():.2f} | {np.mean(log_min >= 0):.0%} |"
            )
    return "\n".join(rows)


def normalized_scores(runs: list[Run], reference: str) -> dict[str, dict[str, np.ndarray]]:
    """exp_name -> env_id -> each seed's final return divided by `reference`'s mean final return on that env_id
    (environments where the reference has no run are left out)."""
    groups = group(runs)
    scale = {
        env_id: np.mean([run.final for run in algos[reference]]) for env_id, algos in groups.items() if reference in algos
    }
    if any(value <= 0 for value in scale.values()):
        raise SystemExit(f"error: {reference} has a mean final return <= 0 on some environment; it cannot normalize")
    scores = defaultdict(dict)
    for env_id, algos in groups.items():
        for exp_name, seeds in algos.items():
            if env_id in scale:
                scores[exp_name][env_id] = np.array([run.final for run in seeds]) / scale[env_id]
    return scores


def aggregate_table(runs: list[Run], reference: str, reps: int = 50_000, seed: int = 0) -> str:
    """Markdown: per algorithm, the mean over environments of the mean normalized score, and the IQM of the
    normalized scores over runs and environments with a 95 % stratified-bootstrap confidence interval (rliable).
    Only algorithms with runs on every environment that the reference has are aggregated."""
    from rliable import library as rly
    from rliable import metrics

    scores = normalized_scores(runs, reference)
    env_ids = sorted(scores[reference])
    complete = {exp_name: by_env for exp_name, by_env in scores.items() if set(by_env) >= set(env_ids)}
    # rliable takes a (runs, tasks) matrix per algorithm: the seeds that every environment has
    matrices = {
        exp_name: np.stack([by_env[e][: min(len(by_env[e]) for e in env_ids)] for e in env_ids], 1)
        for exp_name, by_env in complete.items()
    }
    np.random.seed(seed)  # rliable's bootstrap draws from numpy's global generator
    iqm, ci = rly.get_interval_estimates(matrices, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps)
    rows = [
        f"Scores: final return / mean final return of {reference} on the same environment ({', '.join(env_ids)}).",
        "",
        "| algorithm | runs per environment | mean score over environments | IQM [95 % CI] |",
        "|---|---:|---:|---:|",
    ]
    order = sorted(matrices, key=lambda name: -np.mean([complete[name][e].mean() for e in env_ids]))
    for name in order:
        mean = np.mean([complete[name][e].mean() for e in env_ids])
        rows.append(
            f"| {name} | {matrices[name].shape[0]} | {mean:.3f} | "
            f"{iqm[name][0]:.3f} [{ci[name][0, 0]:.3f}, {ci[name][1, 0]:.3f}] |"
        )
    return "\n".join(rows)


def plot(runs: list[Run], out: str, x: str = "steps") -> tuple[str, str]:
    """Write the learning-curve and ratio-range figures; returns their paths. `x="iterations"`: the learning
    curves against iterations (each run's steps mapped to its iterations; every run needs them) instead of environment
    steps."""
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
    for extra in [*curve_axes.flat[len(groups) :], *ratio_axes.flat[len(groups) :]]:
        extra.set_visible(False)
    for ax, ratio_ax, (env_id, algos) in zip(curve_axes.flat, ratio_axes.flat, sorted(groups.items()), strict=False):
        for exp_name, seeds in sorted(algos.items()):
            xs = [
                np.interp(run.curve[:, 0], run.iterations[:, 0], run.iterations[:, 1])
                if x == "iterations"
                else run.curve[:, 0]
                for run in seeds
            ]
            grid = np.linspace(0, min(values[-1] for values in xs), 200)
            curves = np.stack([np.interp(grid, values, run.curve[:, 1]) for values, run in zip(xs, seeds, strict=True)])
            mean, stderr = curves.mean(0), curves.std(0, ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else 0.0
            ax.plot(grid, mean, color=colors[exp_name], label=f"{exp_name} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
            ax.fill_between(grid, mean - stderr, mean + stderr, color=colors[exp_name], alpha=0.2)
            with_ratios = [run for run in seeds if len(run.ratios)]
            if with_ratios:
                steps = np.linspace(0, min(run.ratios[-1, 0] for run in with_ratios), 200)
                log_hi = np.mean([np.interp(steps, run.ratios[:, 0], np.log(run.ratios[:, 1])) for run in with_ratios], 0)
                log_lo = np.mean(
                    [np.interp(steps, run.ratios[:, 0], np.log(np.maximum(run.ratios[:, 2], 1e-30))) for run in with_ratios], 0
                )
                ratio_ax.fill_between(steps, np.exp(log_lo), np.exp(log_hi), color=colors[exp_name], alpha=0.3, label=exp_name)
        ax.set(title=env_id, xlabel="iterations" if x == "iterations" else "environment steps", ylabel="episodic return")
        ax.legend(fontsize="small")
        ratio_ax.set(title=env_id, xlabel="environment steps", ylabel="ratio range (min to max)", yscale="log")
        if ratio_ax.get_legend_handles_labels()[0]:
            ratio_ax.legend(fontsize="small")
    curves_fig.tight_layout()
    curves_fig.savefig(out, dpi=120)
    ratios_fig.tight_layout()
    ratios_fig.savefig(ratio_out, dpi=120)
    plt.close("all")
    return out, ratio_out


def select_runs(folders: tuple[str, ...], exp_names: tuple[str, ...] = (), env_ids: tuple[str, ...] = ()) -> list[Run]:
    """The runs under the folders whose exp_name and env_id match one of their patterns (all, without patterns). A run
    (environment, exp_name, seed) found twice is counted once if both copies hold the same data (a results CSV
    that repeats another's runs), and is an error otherwise, never a silent double count."""
    runs = {}
    for run in (run for folder in folders for run in load_runs(folder)):
        if not (matches(run.exp_name, exp_names) and matches(run.env_id, env_ids)):
            continue
        key = (run.env_id, run.exp_name, run.seed)
        if key in runs and not same_data(runs[key], run):
            raise SystemExit(f"error: two different runs {'__'.join(map(str, key))} under {', '.join(folders)}")
        runs.setdefault(key, run)
    return list(runs.values())


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def same_data(a: Run, b: Run) -> bool:
    """The same run, read twice: the rows that `--export` writes for them agree (so a TensorBoard run directory and its
    copy in an exported CSV are one run)."""
    return [[str(x) for x in row] for row in csv_rows(a)] == [[str(x) for x in row] for row in csv_rows(b)]


def check_writable(flag: str, path: str | None) -> None:
    """Refuse an output path that is a folder, or whose folder could not be made or written in (None: no output)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a folder, not a file")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise SystemExit(f"error: {flag} {path}: cannot write in {existing}")


def main(args: Args) -> None:
    runs = select_runs(args.folders, args.exp_names, args.env_ids)
    patterns = args.exp_names + args.env_ids
    where = ", ".join(args.folders) + (f" matching {' '.join(patterns)}" if patterns else "")
    if not runs:
        raise SystemExit(f"error: no runs with episodic returns under {where}")
    if args.reference and args.reference not in {run.exp_name for run in runs}:
        raise SystemExit(f"error: no runs of --reference {args.reference} under {where}")
    for flag, path in (("--out", args.out), ("--export", args.export)):
        check_writable(flag, path)
    if args.x == "iterations" and (without := next((run for run in runs if not len(run.iterations)), None)):
        raise SystemExit(f"error: {without.env_id} {without.exp_name} has no iteration steps (charts/SPS) to plot against")

    # Every table before any file: whatever refuses the input refuses it with nothing written.
    tables = [final_returns_table(runs)] + ([ratio_table(runs)] if args.ratios else [])
    if args.reference:
        tables.append(aggregate_table(runs, args.reference))

    written = list(plot(runs, args.out, args.x))
    if args.export:
        export_runs(runs, args.export)
        written.append(args.export)
    print("\n".join(f"wrote {path}" for path in written))
    print("\n\n".join(tables))


MOVED = {  # the flags of a study's own analysis, moved beside the study: the old spelling names the new command
    "--compare": "python -m utils.results.ten_seeds.analysis",
    "--random": "python -m utils.results.ten_seeds.analysis",
    "--reps": "python -m utils.results.ten_seeds.analysis",
    "--workers": "python -m utils.results.ten_seeds.analysis",
    "--choose": "python -m utils.results.screening.analysis",
    "--sensitivity": "python -m utils.results.screening.analysis",
}

if __name__ == "__main__":
    with one_line_errors():
        if moved := next((arg for arg in sys.argv[1:] if arg in MOVED), None):
            raise SystemExit(f"error: {moved} has moved beside its study: {MOVED[moved]} (the same arguments)")
        main(tyro.cli(Args))
