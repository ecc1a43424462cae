"""The protocol's screening and three-seed stage (utils/results/screening/ and final/): the tables and figures of
`utils.plot`, the final returns normalized by a reference algorithm's mean per environment with their mean and IQM
(rliable), then, per swept flag, the value with the highest mean normalized score, and the sensitivity figure.

    python -m utils.results.screening.analysis utils/results/screening --out utils/results/screening/curves.png \
        --reference ppo_continuous_clip-coef0.2 --choose delta clip-coef --sensitivity delta clip-coef --ratios

`--choose FLAG ...` reads the runs of a `utils.benchmark --grid` sweep (exp_name `<script>_<flag><value>`) and prints the
value with the highest mean over environments of the final return normalized by `--reference`'s mean; `--sensitivity
FLAG ...` draws `<out>_sensitivity.png`: per environment (rows) and flag (columns), the final return against the
flag's value on a log axis, each seed a dot and the mean a line.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import tyro

from utils.logs import one_line_errors
from utils.plot import Run, check_writable, final_returns_table, group, plot, ratio_table, select_runs


@dataclass
class Args:
    folders: tyro.conf.Positional[tuple[str, ...]]
    """the folders holding the runs (searched recursively): TensorBoard run directories and `--export` CSV files (or a file)"""
    exp_names: tuple[str, ...] = ()
    """keep only the runs whose exp_name matches one of these shell patterns (`trpo_continuous`, `ppo_*`)"""
    reference: str | None = None
    """normalize final returns by this exp_name's mean final return per environment; print the mean and the IQM (rliable)"""
    choose: tuple[str, ...] = ()
    """flags of a `utils.benchmark --grid` sweep: print the value with the highest mean normalized score"""
    sensitivity: tuple[str, ...] = ()
    """flags of a `utils.benchmark --grid` sweep: draw `<out>_sensitivity.png`, final return against each flag's value"""
    out: str = "curves.png"
    """the learning-curve figure; the ratio and sensitivity figures go next to it"""
    ratios: bool = False
    """also print the ratio ranges: median over updates of ln ratio/max and ln ratio/min, and their extremes"""


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
    means = {exp_name: np.mean([by_env[e].mean() for e in env_ids]) for exp_name, by_env in complete.items()}
    # rliable takes a (runs, tasks) matrix per algorithm: the seeds that every environment has
    matrices = {
        name: np.stack([by[e][: min(len(by[e]) for e in env_ids)] for e in env_ids], 1) for name, by in complete.items()
    }
    np.random.seed(seed)  # rliable's bootstrap draws from numpy's global generator
    iqm, ci = rly.get_interval_estimates(matrices, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=reps)
    rows = [
        f"Scores: final return / mean final return of {reference} on the same environment ({', '.join(env_ids)}).",
        "",
        "| algorithm | runs per environment | mean score over environments | IQM [95 % CI] |",
        "|---|---:|---:|---:|",
    ]
    for name in sorted(matrices, key=lambda name: -means[name]):
        interval = f"{iqm[name][0]:.3f} [{ci[name][0, 0]:.3f}, {ci[name][1, 0]:.3f}]"
        rows.append(f"| {name} | {matrices[name].shape[0]} | {means[name]:.3f} | {interval} |")
    return "\n".join(rows)


def choose(runs: list[Run], reference: str, flag: str) -> tuple[str, dict[str, float]]:
    """The exp_name of a `--grid` sweep over `flag` with the highest mean normalized score over the reference's
    environments, and every candidate's mean score (only candidates with runs on all of those environments)."""
    scores = normalized_scores(runs, reference)
    env_ids = set(scores[reference])
    means = {
        exp_name: float(np.mean([by_env[e].mean() for e in env_ids]))
        for exp_name, by_env in scores.items()
        if grid_value(exp_name, flag) and set(by_env) >= env_ids
    }
    if not means:
        raise SystemExit(f"error: no runs of a --grid sweep over {flag} on every environment of {reference}")
    return max(means, key=means.get), means


def grid_value(exp_name: str, flag: str) -> tuple[str, float] | None:
    """`("trefree_continuous_delta0.1", "delta")` -> `("trefree_continuous", 0.1)`: the script and the value of a
    `utils.benchmark --grid` run, or None if the run did not sweep `flag`."""
    match = re.fullmatch(rf"(?P<script>[a-z]+_continuous)(?:_.*)?_{re.escape(flag)}(?P<value>[-+0-9.e]+)(?:_.*)?", exp_name)
    try:
        return (match["script"], float(match["value"])) if match else None
    except ValueError:
        return None


def plot_sensitivity(runs: list[Run], flags: tuple[str, ...], out: str) -> str:
    """Per environment (rows) and flag (columns): final return against the flag's value (log axis); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(runs)
    path = os.path.splitext(out)[0] + "_sensitivity.png"
    fig, axes = plt.subplots(
        len(groups), len(flags), figsize=(4.5 * len(flags), 3.2 * len(groups)), squeeze=False, sharey="row"
    )
    for row, (env_id, algos) in zip(axes, sorted(groups.items()), strict=True):
        for ax, flag in zip(row, flags, strict=True):
            ax.set_xscale("log")  # before the ticks: setting the scale resets them
            points = defaultdict(list)  # script -> (value, finals)
            for exp_name, seeds in algos.items():
                found = grid_value(exp_name, flag)
                if found:
                    points[found[0]].append((found[1], [run.final for run in seeds]))
            for i, (script, values) in enumerate(sorted(points.items())):
                values.sort()
                x = np.array([v for v, _ in values])
                for v, finals in values:
                    ax.scatter([v] * len(finals), finals, s=12, color=f"C{i}", alpha=0.5)
                ax.plot(x, [np.mean(finals) for _, finals in values], "o-", color=f"C{i}", label=script)
                ax.set_xticks(x, [f"{v:g}" for v in x])
            ax.set(title=env_id, xlabel=flag, ylabel="final return")
            ax.minorticks_off()
            if points:
                ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: Args) -> None:
    runs = select_runs(args.folders, args.exp_names)
    where = ", ".join(args.folders) + (f" matching {' '.join(args.exp_names)}" if args.exp_names else "")
    if not runs:
        raise SystemExit(f"error: no runs with episodic returns under {where}")
    if not args.reference:
        raise SystemExit("error: --choose needs --reference" if args.choose else "error: the screening needs --reference")
    if args.reference not in {run.exp_name for run in runs}:
        raise SystemExit(f"error: no runs of --reference {args.reference} under {where}")
    check_writable("--out", args.out, args.folders)

    # Every table before any file: whatever refuses the input refuses it with nothing written.
    tables = [final_returns_table(runs)] + ([ratio_table(runs)] if args.ratios else [])
    tables.append(aggregate_table(runs, args.reference))
    for flag in args.choose:
        best, means = choose(runs, args.reference, flag)
        others = ", ".join(
            f"{grid_value(name, flag)[1]:g}: {score:.3f}"
            for name, score in sorted(means.items(), key=lambda m: grid_value(m[0], flag)[1])
        )
        tables.append(f"chosen {flag}={grid_value(best, flag)[1]:g} ({best}), the highest mean normalized score ({others})")

    written = list(plot(runs, args.out))
    if args.sensitivity:
        written.append(plot_sensitivity(runs, args.sensitivity, args.out))
    print("\n".join(f"wrote {path}" for path in written))
    print("\n\n".join(tables))


if __name__ == "__main__":
    with one_line_errors():
        main(tyro.cli(Args))
