"""A run beside its row of the ten-seed study: is it the same run, and where does it land among the study's seeds?

    python -m utils.results.ten_seeds.compare runs/Hopper-v5__trefree_continuous__4__1796537471 [more runs or folders] \
        [--rows utils/results/ten_seeds/runs.csv]

For each run (a TensorBoard run directory, a folder of them, or a CSV of `utils.plot --export`), the row of the same
environment, exp_name and seed in `--rows`: the final return, evaluation return, final episode length and AUC of both,
where the run's final return ranks among the rows' seeds of its environment and exp_name, and their running-mean learning
curves point by point. The CSV keeps 200 points of a row's curve to 6 significant digits; at each of them (up to the run's
last episode) the run must have an episode ending at the same step with the same running mean to that precision. The
table names the last step through which every point agrees and the first that does not. A run equal to its row agrees
through the row's last point; on another kind of CPU a seeded run agrees for some thousands of steps, then parts
(utils/results/ten_seeds/README.md, "Reproducing a row").
"""

import os
from dataclasses import dataclass

import numpy as np
import tyro

from utils.logs import one_line_errors
from utils.plot import Run, load_runs

DIGITS = 6  # the CSV's precision: utils.plot writes every value with "%.6g"


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """runs to compare: TensorBoard run directories, folders of them, or CSV files of `utils.plot --export`"""
    rows: str = "utils/results/ten_seeds/runs.csv"
    """the study's runs (a CSV of `utils.plot --export`, or a folder of runs)"""


def agreement(run: np.ndarray, row: np.ndarray) -> tuple[int | None, int | None, int]:
    """Compare two running-mean curves ((points, 2): step, value) at the row's points up to the run's last step. Returns the
    last step through which every point agrees to DIGITS significant digits (None: not even the first), the first step
    that differs (None: none) and the number of points compared."""
    at = {int(step): f"{value:.{DIGITS}g}" for step, value in run}
    compared = [(int(step), f"{value:.{DIGITS}g}") for step, value in row if len(run) and step <= run[-1, 0]]
    first = next((step for step, value in compared if at.get(step) != value), None)
    agreed = [step for step, _ in compared if first is None or step < first]
    return (agreed[-1] if agreed else None), first, len(compared)


def compare(run: Run, rows: list[Run]) -> dict:
    """The run beside its row in `rows` (the same environment, exp_name and seed): metrics, rank and curve agreement."""
    seeds = [r for r in rows if (r.env_id, r.exp_name) == (run.env_id, run.exp_name)]
    row = next((r for r in seeds if r.seed == run.seed), None)
    if row is None:
        raise ValueError(f"no row {run.env_id}__{run.exp_name}__{run.seed} to compare with")
    agrees_through, differs_at, points = agreement(run.curve, row.curve)
    return dict(
        run=run,
        row=row,
        above=sum(r.final < run.final for r in seeds),  # the study's seeds (its own row among them) below the run
        seeds=len(seeds),
        agrees_through=agrees_through,
        differs_at=differs_at,
        points=points,
    )


def table(comparisons: list[dict]) -> str:
    """Markdown: one line per run, each metric as `run / row`."""

    def pair(c: dict, key: str, digits: int = 1) -> str:
        return " / ".join("–" if np.isnan(x := getattr(r, key)) else f"{x:,.{digits}f}" for r in (c["run"], c["row"]))

    def step(x: int | None) -> str:
        return "–" if x is None else f"{x:,}"

    header = "| environment | algorithm | seed | final return (run / row) | evaluation return | episode length | AUC |"
    header += " final return above | curve agrees through step | first differs at | points compared |"
    rows = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        run = c["run"]
        cells = [pair(c, "final"), pair(c, "eval"), pair(c, "length", 0), pair(c, "auc")]
        cells += [f"{c['above']} of {c['seeds']} seeds", step(c["agrees_through"]), step(c["differs_at"]), str(c["points"])]
        rows.append(f"| {run.env_id} | {run.exp_name} | {run.seed} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(args: Args) -> None:
    rows = load_runs(args.rows) if os.path.exists(args.rows) else []
    if not rows:
        raise SystemExit(f"error: no runs in --rows {args.rows}")
    runs = []
    for path in args.runs:
        if not (found := load_runs(path) if os.path.exists(path) else []):
            raise SystemExit(f"error: no run with episodic returns at {path}")
        runs += found
    print(table([compare(run, rows) for run in runs]))


if __name__ == "__main__":
    with one_line_errors():
        main(tyro.cli(Args))
