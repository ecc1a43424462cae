"""The ten-seed study's pre-registered analysis (utils/results/ten_seeds/README.md): the learning curves, ratio ranges and
final-returns table of `utils.plot`, then TREFree against PPO and TRPO on three metrics, per task and across tasks.

    python -m utils.results.ten_seeds.analysis utils/results/ten_seeds --out utils/results/ten_seeds/curves.png --ratios \
        --workers 2 --compare trefree_continuous ppo_continuous_clip-coef0.3 trpo_continuous \
        --random utils/results/random_returns.csv

`--compare A B C --random random_returns.csv` compares A with B and with C on three metrics (final return,
evaluation return, area under the binned learning curve): per environment, each algorithm's mean over seeds
and the differences A - B and A - C with 95 % bootstrap intervals and verdicts; across environments, the
IQM of scores normalized by B's mean and the random policy's return, and the probability that A improves
on B and on C, with stratified-bootstrap intervals (rliable, `--reps` resamples, `--workers` processes).
It draws `<out>_binned.png` (the binned learning curves with bootstrap bands) and `<out>_profiles.png`
(rliable's performance profiles). Every table is computed before any file is written.
"""

from __future__ import annotations

import csv
import functools
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import tyro

from utils.logs import one_line_errors
from utils.plot import BIN, Run, check_writable, export_runs, final_returns_table, group, plot, ratio_table, select_runs


@dataclass
class Args:
    folders: tyro.conf.Positional[tuple[str, ...]]
    """the folders holding the runs (searched recursively): TensorBoard run directories and `--export` CSV files (or a file)"""
    compare: tuple[str, ...] = ("trefree_continuous", "ppo_continuous_clip-coef0.3", "trpo_continuous")
    """exp_names: compare the first with each other, per environment and across them (the second normalizes)"""
    random: str = "utils/results/random_returns.csv"
    """a CSV of random-policy returns (`utils.evaluate --random-policy --csv`), for the normalized scores"""
    out: str = "curves.png"
    """the learning-curve figure; the others go next to it as `<name>_ratios.png`, `_binned.png`, `_profiles.png`"""
    export: str | None = None
    """also write the runs to this CSV file"""
    ratios: bool = False
    """also print the ratio ranges: median over updates of ln ratio/max and ln ratio/min, and their extremes"""
    reps: int = 50_000
    """bootstrap resamples of every confidence interval"""
    workers: int = 1
    """processes computing the intervals (each interval seeds its own draws: the same numbers for any count)"""


def read_random_returns(path: str) -> dict[str, float]:
    """env_id -> the mean return of a random policy's episodes, from a CSV of `utils.evaluate --random-policy --csv`."""
    returns = defaultdict(list)
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                returns[row["env_id"]].append(float(row["return"]))
    except (OSError, KeyError, ValueError):
        raise SystemExit(f"error: '{path}' is not a CSV file of utils.evaluate --csv") from None
    return {env_id: float(np.mean(values)) for env_id, values in returns.items()}


METRICS = {"final": "final return", "eval": "evaluation return", "auc": "sample efficiency (AUC)"}


# The statistics of --compare's intervals, at module level so that worker processes can run them.
def mean(x: np.ndarray) -> np.ndarray:
    return np.array([x.mean()])


def difference_of_means(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([x.mean() - y.mean()])


def iqm(x: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(x)])


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array([metrics.probability_of_improvement(x, y)])


def interval(scores, statistic, reps: int, seed: int) -> tuple[float, float, float]:
    """`statistic` of `scores` (a (runs, tasks) matrix, or a tuple of them) and its 95 % percentile interval over `reps`
    stratified-bootstrap resamples: rliable's `get_interval_estimates`, with numpy's generator seeded with `seed`."""
    from rliable import library as rly

    # rliable draws the resamples' indices from numpy's global generator (np.random.choice); its `random_state` argument
    # does not reach them. Seeding it here makes each interval the same in any order and in any process.
    np.random.seed(seed)
    point, ci = rly.get_interval_estimates({"x": scores}, statistic, reps=reps)
    return float(point["x"][0]), float(ci["x"][0, 0]), float(ci["x"][1, 0])


def intervals(jobs: dict, reps: int, seed: int, workers: int = 1) -> dict:
    """key -> `interval(*jobs[key], reps, seed)`, computed in `workers` processes; each interval seeds its own draws, so
    the numbers do not depend on `workers`."""
    scores, statistics = zip(*jobs.values(), strict=True)
    estimate = functools.partial(interval, reps=reps, seed=seed)
    if workers == 1:
        return dict(zip(jobs, map(estimate, scores, statistics), strict=True))
    with ProcessPoolExecutor(workers) as pool:
        return dict(zip(jobs, pool.map(estimate, scores, statistics), strict=True))


def common_env_ids(groups: dict[str, dict[str, list[Run]]], names: tuple[str, ...]) -> list[str]:
    """The environments of `group`'s result on which every one of `names` has runs, sorted."""
    return sorted(env_id for env_id, algos in groups.items() if all(name in algos for name in names))


def compare(
    runs: list[Run], names: tuple[str, ...], random: dict[str, float], reps: int = 50_000, seed: int = 0, workers: int = 1
) -> tuple[str, dict]:
    """The comparison of `names[0]` with each of `names[1:]`, per metric (METRICS): per environment, each algorithm's mean
    over seeds with a 95 % bootstrap interval, and the differences of means with theirs and a verdict; across
    environments, each algorithm's IQM of the scores normalized as (x - random) / (mean of `names[1]` - random), and
    the probabilities of improvement, with 95 % stratified-bootstrap intervals. All by rliable's `get_interval_estimates`
    (`interval`: percentile, `reps` resamples, numpy seeded with `seed` per interval; in `workers` processes). Returns
    Markdown and the normalized final returns."""
    groups = group(runs)
    env_ids = common_env_ids(groups, names)
    if not env_ids or any(env_id not in random for env_id in env_ids):
        raise SystemExit(
            f"error: --compare needs runs of {', '.join(names)} on a common environment, and random returns for each"
        )
    candidate, reference, baselines = names[0], names[1], names[1:]

    # The data of each metric: per environment the seeds' values, and across environments (runs, environments) matrices
    # of raw and normalized scores over the seeds that every environment has.
    values, raw, normalized = {}, {}, {}
    for metric in METRICS:
        by_env = {
            e: {n: np.array([getattr(r, metric) for r in sorted(groups[e][n], key=lambda r: r.seed)]) for n in names}
            for e in env_ids
        }
        if any(np.isnan(v).any() for by_name in by_env.values() for v in by_name.values()):
            continue  # e.g. runs without --save-model have no evaluation return
        runs_per_env = min(len(v) for by_name in by_env.values() for v in by_name.values())
        values[metric] = by_env
        raw[metric] = {n: np.stack([by_env[e][n][:runs_per_env] for e in env_ids], 1) for n in names}
        scale = np.array([by_env[e][reference].mean() - random[e] for e in env_ids])
        normalized[metric] = {n: (raw[metric][n] - np.array([random[e] for e in env_ids])) / scale for n in names}

    jobs = {}
    for metric, by_env in values.items():
        for e in env_ids:
            jobs |= {(metric, e, n): (by_env[e][n][:, None], mean) for n in names}
            jobs |= {
                (metric, e, "-", b): ((by_env[e][candidate][:, None], by_env[e][b][:, None]), difference_of_means)
                for b in baselines
            }
        jobs |= {(metric, "IQM", n): (normalized[metric][n], iqm) for n in names}
        jobs |= {(metric, "P", b): ((raw[metric][candidate], raw[metric][b]), probability_of_improvement) for b in baselines}
    estimates = intervals(jobs, reps, seed, workers)

    def fmt(x: float) -> str:
        return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3f}"

    lines = []
    for metric in values:
        title = METRICS[metric]
        diffs = [f"{candidate} − {b}" for b in baselines]
        lines += [
            f"**{title}**, per environment: mean over seeds [95 % CI]; differences [95 % CI] and verdict",
            "",
            "| environment | " + " | ".join([*names, *(f"{d} | verdict" for d in diffs)]) + " |",
            "|---|" + "---:|" * len(names) + "---:|---|" * len(diffs),
        ]
        for e in env_ids:
            cells = [f"{fmt(m)} [{fmt(lo)}, {fmt(hi)}]" for m, lo, hi in (estimates[metric, e, n] for n in names)]
            for b in baselines:
                d, lo, hi = estimates[metric, e, "-", b]
                cells += [
                    f"{d:+,.1f} [{lo:+,.1f}, {hi:+,.1f}]",
                    "better" if lo > 0 else "worse" if hi < 0 else "no detectable difference",
                ]
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"**{title}** across the {len(env_ids)} environments ({len(raw[metric][candidate])} runs each), "
            f"normalized by {reference}:",
            "",
            "| algorithm | IQM [95 % CI] | P(" + candidate + " > algorithm) [95 % CI] | verdict |",
            "|---|---:|---:|---|",
        ]
        for n in names:
            m, lo, hi = estimates[metric, "IQM", n]
            if n == candidate:
                lines.append(f"| {n} | {m:.3f} [{lo:.3f}, {hi:.3f}] | | |")
                continue
            p, plo, phi = estimates[metric, "P", n]
            verdict = "beats" if plo > 0.5 else "loses" if phi < 0.5 else "ties (no detectable difference)"
            if verdict == "beats" and estimates[metric, "IQM", candidate][1] > hi:
                verdict += ", by a large margin (IQM intervals apart)"
            lines.append(f"| {n} | {m:.3f} [{lo:.3f}, {hi:.3f}] | {p:.3f} [{plo:.3f}, {phi:.3f}] | {candidate} {verdict} |")
        lines.append("")
    return "\n".join(lines), normalized.get("final", {})


def plot_comparison(
    runs: list[Run],
    names: tuple[str, ...],
    normalized_final: dict[str, np.ndarray],
    out: str,
    reps: int = 50_000,
    seed: int = 0,
) -> tuple[str, str]:
    """`<out>_binned.png`: per environment, each algorithm's binned learning curve (the sample-efficiency grid), the mean
    over seeds with a 95 % bootstrap band; `<out>_profiles.png`: rliable's performance profiles of the normalized final
    returns, with their 95 % stratified-bootstrap bands. Returns the two paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly
    from rliable import plot_utils

    groups = group(runs)
    env_ids = common_env_ids(groups, names)
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    ncols = min(len(env_ids), 3)
    fig, axes = plt.subplots(
        -(-len(env_ids) // ncols), ncols, figsize=(5 * ncols, 4 * -(-len(env_ids) // ncols)), squeeze=False
    )
    for ax in axes.flat[len(env_ids) :]:
        ax.set_visible(False)
    for ax, env_id in zip(axes.flat, env_ids, strict=False):
        for name in names:
            seeds = groups[env_id][name]
            bins = min(len(run.binned) for run in seeds)
            # (runs, 1 task, bins): a run's curve moves whole
            curves = np.stack([run.binned[:bins, 1] for run in seeds])[:, None, :]
            np.random.seed(seed)  # rliable's resamples come from numpy's global generator (see `interval`)
            mean, ci = rly.get_interval_estimates({name: curves}, lambda x: x.mean(axis=0)[0], reps=reps)
            steps = seeds[0].binned[:bins, 0]
            ax.plot(steps, mean[name], color=colors[name], label=f"{name} ({len(seeds)} seeds)")
            ax.fill_between(steps, ci[name][0], ci[name][1], color=colors[name], alpha=0.2)
        ax.set(title=env_id, xlabel="environment steps", ylabel=f"episodic return (mean per {BIN:,} steps)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    binned_out = os.path.splitext(out)[0] + "_binned.png"
    fig.savefig(binned_out, dpi=120)

    taus = np.linspace(
        min(0.0, min(v.min() for v in normalized_final.values())), max(v.max() for v in normalized_final.values()), 101
    )
    np.random.seed(seed)  # the profiles' bands: rliable's bootstrap again (2,000 resamples, its default)
    profiles, profile_cis = rly.create_performance_profile(normalized_final, taus)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(
        profiles,
        taus,
        performance_profile_cis=profile_cis,
        colors=colors,
        ax=ax,
        xlabel=r"normalized final return $\tau$",
        labelsize="medium",
    )
    ax.legend([plt.Line2D([], [], color=colors[name]) for name in names], names, fontsize="small")
    fig.tight_layout()
    profiles_out = os.path.splitext(out)[0] + "_profiles.png"
    fig.savefig(profiles_out, dpi=120)
    plt.close("all")
    return binned_out, profiles_out


def main(args: Args) -> None:
    runs = select_runs(args.folders)
    where = ", ".join(args.folders)
    if not runs:
        raise SystemExit(f"error: no runs with episodic returns under {where}")
    if len(args.compare) < 2:
        raise SystemExit("error: --compare takes two or more exp_names (the first is compared with the others)")
    if args.workers < 1:
        raise SystemExit("error: --workers must be at least 1")
    if missing := [name for name in args.compare if name not in {run.exp_name for run in runs}]:
        raise SystemExit(f"error: no runs of --compare {' '.join(missing)} under {where}")
    for flag, path in (("--out", args.out), ("--export", args.export)):
        check_writable(flag, path, args.folders)

    # Every table before any file: whatever refuses the input refuses it with nothing written.
    tables = [final_returns_table(runs)] + ([ratio_table(runs)] if args.ratios else [])
    random = read_random_returns(args.random)
    comparison, normalized_final = compare(runs, args.compare, random, args.reps, workers=args.workers)
    tables.append(comparison)

    written = list(plot(runs, args.out))
    if args.export:
        export_runs(runs, args.export)
        written.append(args.export)
    written += plot_comparison(runs, args.compare, normalized_final, args.out, args.reps)
    print("\n".join(f"wrote {path}" for path in written))
    print("\n\n".join(tables))


if __name__ == "__main__":
    with one_line_errors():
        main(tyro.cli(Args))
