"""Learning curves, ratio ranges and tables of final returns from training logs.

    python -m utils.plot runs/ [--out curves.png] [--export results.csv] [--ratios] [--x iterations]
    python -m utils.plot utils/results/figure1 utils/results/final --exp-names trpo_continuous "ppo_*" --env-ids "Hopper*"

Reads the TensorBoard runs (`{env_id}__{exp_name}__{seed}__{time}`) and `--export` CSV files under the folders and
draws with seaborn, a panel per environment: each exp_name's learning curve (mean over seeds of each run's running mean
of 10 episodic returns, ± one standard error) into `--out`; ln ratio/max and ln ratio/min after each update (mean over
seeds: the TREFree paper's Figure 2) into `<out>_ratios.png`. It prints the final returns (per run the mean of its last
10 % of episodes; mean ± std over seeds). A study's own analysis is beside its data, in `utils/results/<study>/`.
"""

import fnmatch
import glob
import itertools
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import tyro
from matplotlib.backend_bases import FigureCanvasBase

from utils.logs import one_line_errors, read_scalars


@dataclass
class Args:
    folders: tyro.conf.Positional[tuple[str, ...]]  # folders of TensorBoard runs and `--export` CSV files, or CSV files
    exp_names: tuple[str, ...] = ()  # keep the runs whose exp_name matches one of these shell patterns (`ppo_*`)
    env_ids: tuple[str, ...] = ()  # keep the runs whose env_id matches one of these shell patterns (`Humanoid*`)
    out: str = "curves.png"  # the learning-curve figure; the ratio figure goes next to it as `<name>_ratios.png`
    export: str | None = None  # also write the runs to this CSV file
    ratios: bool = False  # also print the ratio ranges: median and extremes of ln ratio/max and ln ratio/min
    x: Literal["steps", "iterations"] = "steps"  # the learning curves' x axis: environment (simulator) steps, or iterations


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
    iterations: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (points, 2): an iteration's last step, number
    binned: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (bins, 2): the learning curve on the shared grid
    auc: float = float("nan")  # sample efficiency: the mean of `binned`, the area under the learning curve per step


BIN = 10_000  # the shared grid of the sample-efficiency measure: bins of 10k environment steps
SCALARS = ("final", "sps", "length", "eval", "auc")  # a run's one-value rows in the CSV
COLUMNS = ["env_id", "exp_name", "seed", "kind", "step", "value", "value2"]


def binned_curve(steps: np.ndarray, returns: np.ndarray, width: int = BIN) -> np.ndarray:
    """(bins, 2): at g = width, 2 width, ... to the bin of the last episode, the mean raw return of the episodes that
    ended in (g - width, g], or the previous bin's value where none did."""
    means = pd.Series(returns).groupby(np.ceil(steps / width).astype(int)).mean()
    means = means.reindex(range(1, means.index.max() + 1)).ffill()
    return np.stack([means.index * float(width), means.to_numpy()], 1)


def run_from_scalars(run_dir: str) -> Run | None:
    """The run of a TensorBoard run directory, or None if it is not one of ours or has no episode."""
    parts = os.path.basename(run_dir).split("__")
    scalars = {tag: np.array(values).reshape(-1, 2) for tag, values in read_scalars(run_dir).items()}  # or ValueError
    if len(parts) != 4 or "charts/episodic_return" not in scalars:
        return None
    scalars = defaultdict(lambda: np.zeros((0, 2)), scalars)  # a tag never written: no value

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if len(values) else float("nan")

    steps, returns = scalars["charts/episodic_return"].T
    last, ends = max(1, len(returns) // 10), scalars["charts/SPS"][:, 0]  # the last 10 % of episodes; SPS: once per iteration
    binned = binned_curve(steps, returns)
    return Run(
        *parts[:2],
        int(parts[2]),
        curve=np.stack([steps, pd.Series(returns).rolling(10, min_periods=1).mean()], 1),
        ratios=np.column_stack([scalars["ratio/max"], scalars["ratio/min"][:, 1]]),
        final=mean(returns[-last:]),
        sps=mean(scalars["charts/SPS"][-1:, 1]),
        length=mean(scalars["charts/episodic_length"][-last:, 1]),
        eval=mean(scalars["eval/episodic_return"][:, 1]),
        iterations=np.stack([ends, np.arange(1, len(ends) + 1)], 1),
        binned=binned,
        auc=float(binned[:, 1].mean()),
    )


def load_runs(folder: str) -> list[Run]:
    """Every run under `folder`: TensorBoard run directories and CSV files of `--export` (or the CSV file `folder`)."""
    if os.path.isfile(folder):
        return read_runs_csv(folder)
    events = glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)
    runs = [run for run in map(run_from_scalars, sorted({os.path.dirname(p) for p in events})) if run is not None]
    csv_files = sorted(glob.glob(os.path.join(folder, "**", "*.csv"), recursive=True))
    return runs + [run for path in csv_files for run in read_runs_csv(path)]


def downsample(points: np.ndarray, most: int = 200) -> np.ndarray:
    return points[np.unique(np.linspace(0, len(points) - 1, most).round().astype(int))] if len(points) > most else points


def run_frame(run: Run) -> pd.DataFrame:
    """The run's rows in the compact CSV, by kind: `curve` (step, running mean), `ratio` (step, max, min), `iteration`
    (step, number), `binned` (step, every bin), then one row each of `final`, `sps`, and `length`, `eval`, `auc` if any."""
    points = {"curve": downsample(run.curve), "ratio": downsample(run.ratios), "iteration": downsample(run.iterations)}
    frames = [
        pd.DataFrame(p, columns=COLUMNS[4 : 4 + p.shape[1]]).assign(kind=kind)
        for kind, p in (points | {"binned": run.binned}).items()
    ]
    scalars = pd.DataFrame({"kind": SCALARS, "value": [getattr(run, kind) for kind in SCALARS]})
    frames.append(scalars[scalars.kind.isin(["final", "sps"]) | scalars.value.notna()])
    rows = pd.concat([frame for frame in frames if len(frame)]).assign(env_id=run.env_id, exp_name=run.exp_name, seed=run.seed)
    return rows.reindex(columns=COLUMNS).astype({"step": "Int64", "value": float, "value2": float})


def to_csv(frame: pd.DataFrame, path: str | None = None) -> str | None:
    return frame.to_csv(path, index=False, float_format="%.6g", lineterminator="\r\n")  # values to 6 significant digits


def export_runs(runs: list[Run], path: str) -> None:
    """A compact CSV of the runs, one row per point (`run_frame`), that `read_runs_csv` reads back."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_csv(pd.concat(map(run_frame, runs)) if runs else pd.DataFrame(columns=COLUMNS), path)


def read_runs_csv(path: str) -> list[Run]:
    table = pd.read_csv(path, dtype={"env_id": str, "exp_name": str}, float_precision="round_trip")
    runs = []
    for (env_id, exp_name, seed), rows in table.groupby(["env_id", "exp_name", "seed"], sort=False):
        kinds = {kind: part[COLUMNS[4:]].to_numpy(float) for kind, part in rows.groupby("kind")}
        curve, ratios, iterations, binned = (kinds.get(k, np.zeros((0, 3))) for k in ("curve", "ratio", "iteration", "binned"))
        scalars = {kind: kinds[kind][0, 1] if kind in kinds else float("nan") for kind in SCALARS}
        points = dict(curve=curve[:, :2], ratios=ratios, iterations=iterations[:, :2], binned=binned[:, :2])
        runs.append(Run(env_id, exp_name, int(seed), **points, **scalars))
    return runs


def group(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """env_id -> exp_name -> runs (one per seed)."""
    groups = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run.env_id][run.exp_name].append(run)
    return groups


def mean_std(values: np.ndarray, digits: int = 1) -> str:
    if np.isnan(values).any():
        return "–"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.{digits}f}"


def final_returns_table(runs: list[Run]) -> str:
    """Markdown: one row per environment and algorithm, mean ± std (ddof 1) over seeds of the final returns (and of
    the evaluation returns and final episode lengths, where runs have them; "–" for a row whose runs lack them)."""
    table = pd.DataFrame([vars(run) for run in runs])
    columns = {"final": ("final return", 1), "eval": ("evaluation return", 1), "length": ("episode length", 0)}
    columns = {key: value for key, value in columns.items() if table[key].notna().any() or key == "final"}
    header = ["environment", "algorithm", "seeds", *(name for name, _ in columns.values()), "SPS"]
    rows = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (2 + len(columns))]
    for (env_id, exp_name), seeds in table.groupby(["env_id", "exp_name"]):
        cells = [mean_std(seeds[key].to_numpy(), digits) for key, (_, digits) in columns.items()]
        rows.append(f"| {env_id} | {exp_name} | {len(seeds)} | {' | '.join(cells)} | {np.mean(seeds.sps.to_numpy()):,.0f} |")
    return "\n".join(rows)


def ratio_table(runs: list[Run]) -> str:
    """Markdown: per environment and algorithm, the median over updates (pooled over seeds) of ln ratio/max and
    ln ratio/min after each update, their most extreme values, and the share of updates whose ratio/min is >= 1."""
    logs = pd.concat(
        pd.DataFrame({"env_id": run.env_id, "exp_name": run.exp_name, "max": np.log(run.ratios[:, 1])}).assign(
            min=np.log(np.maximum(run.ratios[:, 2], 1e-300)), above=run.ratios[:, 2] >= 1
        )
        for run in runs
    )
    rows = ["| environment | algorithm | median ln max | median ln min | largest ln max | smallest ln min | updates with "]
    rows = [rows[0] + "min ≥ 1 |", "|---|---|---:|---:|---:|---:|---:|"]
    for (env_id, exp_name), s in logs.groupby(["env_id", "exp_name"]).agg(["median", "max", "min", "mean"]).iterrows():
        cells = f"{s['max', 'median']:.3f} | {s['min', 'median']:.3f} | {s['max', 'max']:.2f} | {s['min', 'min']:.2f}"
        rows.append(f"| {env_id} | {exp_name} | {cells} | {s['above', 'mean']:.0%} |")
    return "\n".join(rows)


def plot(runs: list[Run], out: str, x: str = "steps") -> list[str]:
    """Write the learning-curve figure and, if any run has ratios, the ratio-range figure; returns their paths. Each
    run is read on a grid of 200 points that the seeds of its algorithm share, up to the shortest one's end; with
    `x="iterations"` each run's steps are first mapped to its iterations (every run needs them)."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns
    from matplotlib import pyplot as plt

    curves, ratios = [], []
    for env_id, algos in group(runs).items():
        for exp_name, seeds in algos.items():
            key = {"env_id": env_id, "exp_name": exp_name}
            xs = [np.interp(run.curve[:, 0], *run.iterations.T) if x == "iterations" else run.curve[:, 0] for run in seeds]
            grid = np.linspace(0, min(values[-1] for values in xs), 200)
            for values, run in zip(xs, seeds, strict=True):
                curves.append(pd.DataFrame(key | {"x": grid, "return": np.interp(grid, values, run.curve[:, 1])}))
            with_ratios = [run for run in seeds if len(run.ratios)]
            grid = np.linspace(0, min((run.ratios[-1, 0] for run in with_ratios), default=0), 200)
            for run, (column, bound) in itertools.product(with_ratios, ((1, "max"), (2, "min"))):
                ln_ratio = np.interp(grid, run.ratios[:, 0], np.log(np.maximum(run.ratios[:, column], 1e-30)))
                ratios.append(pd.DataFrame(key | {"step": grid, "bound": f"ratio/{bound}", "ln ratio": ln_ratio}))
    facets = dict(col="env_id", col_wrap=min(len(group(runs)), 3), col_order=sorted(group(runs)), height=4, aspect=1.25)
    facets |= dict(kind="line", hue="exp_name", hue_order=sorted({run.exp_name for run in runs}))
    facets |= dict(facet_kws={"sharex": False, "sharey": False})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure = sns.relplot(pd.concat(curves), x="x", y="return", errorbar="se", **facets).set_titles("{col_name}")
    figure.set_axis_labels("iterations" if x == "iterations" else "environment steps", "episodic return").savefig(out, dpi=120)
    written = [out]
    if ratios:  # the mean over seeds of ln ratio: the log of the ratio's geometric mean
        written.append(os.path.splitext(out)[0] + "_ratios.png")
        figure = sns.relplot(pd.concat(ratios), x="step", y="ln ratio", style="bound", errorbar=None, **facets)
        figure.set_titles("{col_name}").set_xlabels("environment steps").savefig(written[1], dpi=120)
    plt.close("all")
    return written


def select_runs(folders: tuple[str, ...], exp_names: tuple[str, ...] = (), env_ids: tuple[str, ...] = ()) -> list[Run]:
    """The runs under the folders whose exp_name and env_id match one of their patterns (all, without patterns). A run
    (environment, exp_name, seed) found twice is counted once if both copies hold the same data (as `--export` writes
    them: a TensorBoard run and its exported copy are one run), and is an error otherwise, never a silent double count."""
    runs = {}
    for run in (run for folder in folders for run in load_runs(folder)):
        names = ((run.exp_name, exp_names), (run.env_id, env_ids))
        if not all(not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns) for name, patterns in names):
            continue
        key = (run.env_id, run.exp_name, run.seed)
        if key in runs and to_csv(run_frame(runs[key])) != to_csv(run_frame(run)):
            raise SystemExit(f"error: two different runs {'__'.join(map(str, key))} under {', '.join(folders)}")
        runs.setdefault(key, run)
    return list(runs.values())


def check_writable(flag: str, path: str | None, inputs: tuple[str, ...]) -> None:
    """Refuse an output that is a folder or an input, or cannot be written, or is a figure matplotlib does not write."""
    folder = os.path.dirname(os.path.abspath(path or "."))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    read = {os.path.realpath(p) for f in inputs for p in [f, *glob.glob(os.path.join(f, "**", "*.csv"), recursive=True)]}
    if path and (os.path.isdir(path) or os.path.realpath(path) in read):
        raise SystemExit(f"error: {flag} {path} is {'a folder, not a file' if os.path.isdir(path) else 'an input'}")
    if path and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        raise SystemExit(f"error: {flag} {path}: cannot write in {folder}")
    if flag == "--out" and (kind := os.path.splitext(path)[1][1:]) not in FigureCanvasBase.get_supported_filetypes():
        raise SystemExit(f"error: --out {path}: matplotlib writes .png, .pdf, .svg, ..., not '.{kind}'")


def main(args: Args) -> None:
    runs = select_runs(args.folders, args.exp_names, args.env_ids)
    patterns = args.exp_names + args.env_ids
    where = ", ".join(args.folders) + (f" matching {' '.join(patterns)}" if patterns else "")
    if not runs:
        raise SystemExit(f"error: no runs with episodic returns under {where}")
    for flag, path in (("--out", args.out), ("--export", args.export)):
        check_writable(flag, path, args.folders)
    if args.x == "iterations" and (without := next((run for run in runs if not len(run.iterations)), None)):
        raise SystemExit(f"error: {without.env_id} {without.exp_name} has no iteration steps (charts/SPS) to plot against")

    # Every table before any file: whatever refuses the input refuses it with nothing written.
    tables = [final_returns_table(runs)] + ([ratio_table(runs)] if args.ratios else [])
    written = plot(runs, args.out, args.x)
    if args.export:
        export_runs(runs, args.export)
        written.append(args.export)
    print("\n".join(f"wrote {path}" for path in written))
    print("\n\n".join(tables))


# the flags of a study's own analysis, moved beside the study: the old spelling names the new command
MOVED = dict.fromkeys(("--compare", "--random", "--reps", "--workers"), "python -m utils.results.ten_seeds.analysis")
MOVED |= dict.fromkeys(("--reference", "--choose", "--sensitivity"), "python -m utils.results.screening.analysis")

if __name__ == "__main__":
    with one_line_errors():
        if moved := next((arg for arg in sys.argv[1:] if arg in MOVED), None):
            raise SystemExit(f"error: {moved} has moved beside its study: {MOVED[moved]} (the same arguments)")
        main(tyro.cli(Args))
