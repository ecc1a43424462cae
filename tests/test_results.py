"""What `utils.plot` computes from runs for the Results: ratio ranges, normalized scores and their IQM,
hyper-parameter sweeps (`utils.benchmark --grid`), and the evaluation returns and episode lengths."""

import os
import subprocess
import sys

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from utils import plot
from utils.results.screening import analysis as screening
from utils.results.ten_seeds import analysis as ten_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(env_id, exp_name, seed, final, ratios=((1000, 1.5, 0.8),)):
    return plot.Run(env_id, exp_name, seed, np.array([[1000.0, final]]), np.array(ratios, float).reshape(-1, 3), final, 100.0)


def test_ratio_table_against_hand_computed_logs():
    ratios = [(1, np.exp(0.1), np.exp(-0.1)), (2, np.exp(0.3), np.exp(0.05)), (3, np.exp(0.2), np.exp(-0.3))]
    table = plot.ratio_table([_run("Hopper-v5", "trefree_continuous", 1, 0.0, ratios)]).splitlines()
    # medians 0.2 and -0.1, extremes 0.3 and -0.3, one update in three with ratio/min >= 1
    assert table[2] == "| Hopper-v5 | trefree_continuous | 0.200 | -0.100 | 0.30 | -0.30 | 33% |"


def test_normalized_scores_and_their_iqm_against_hand_computed_values():
    runs = [
        _run("A-v5", "ref", 1, 100.0),
        _run("A-v5", "ref", 2, 300.0),
        _run("B-v5", "ref", 1, 10.0),
        _run("B-v5", "ref", 2, 30.0),
    ]
    runs += [_run("A-v5", "x", s, 100.0 * s) for s in (1, 2, 3, 4)] + [_run("B-v5", "x", s, 2.0 * s) for s in (1, 2, 3, 4)]
    runs += [_run("A-v5", "only_a", 1, 50.0)]  # not on every environment: left out of the aggregate
    scores = screening.normalized_scores(runs, "ref")
    np.testing.assert_allclose(scores["x"]["A-v5"], [0.5, 1.0, 1.5, 2.0])  # / mean(100, 300)
    np.testing.assert_allclose(scores["x"]["B-v5"], [0.1, 0.2, 0.3, 0.4])  # / mean(10, 30)
    table = screening.aggregate_table(runs, "ref", reps=2000).splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"algorithm", "x", "ref"}
    # x: the mean over environments of (1.25, 0.25) = 0.75; IQM = mean of the middle half of the 8 scores,
    # (0.3, 0.4, 0.5, 1.0) -> 0.55. ref: scores 0.5, 1.5 on each environment -> mean 1, IQM 1
    assert rows["x"].startswith("| x | 4 | 0.750 | 0.550 [") and rows["ref"].startswith("| ref | 2 | 1.000 | 1.000 [")
    low, high = (float(v) for v in rows["x"].split("[")[1].rstrip("] |").split(", "))
    assert low <= 0.55 <= high and low < high


def test_a_reference_without_a_positive_mean_cannot_normalize():
    with pytest.raises(SystemExit, match="mean final return <= 0"):
        screening.normalized_scores([_run("A-v5", "ref", 1, -5.0)], "ref")


@pytest.mark.parametrize(
    "exp_name, flag, expected",
    [
        ("trefree_continuous_delta0.1", "delta", ("trefree_continuous", 0.1)),
        ("ppo_continuous_clip-coef0.3_nocfrc", "clip-coef", ("ppo_continuous", 0.3)),
        ("trefree_continuous_delta1e-3", "delta", ("trefree_continuous", 0.001)),
        ("ppo_continuous", "clip-coef", None),
        ("trefree_continuous_delta0.1", "clip-coef", None),
    ],
)
def test_grid_value_reads_the_exp_names_of_a_grid_sweep(exp_name, flag, expected):
    assert screening.grid_value(exp_name, flag) == expected


def test_sensitivity_figure(tmp_path):
    runs = [
        _run(env, f"trefree_continuous_delta{d}", s, d * s) for env in ("A-v5", "B-v5") for d in (0.01, 0.1) for s in (1, 2)
    ]
    runs += [_run(env, f"ppo_continuous_clip-coef{e}", s, e) for env in ("A-v5", "B-v5") for e in (0.1, 0.2) for s in (1, 2)]
    path = screening.plot_sensitivity(runs, ("delta", "clip-coef"), str(tmp_path / "screen.png"))
    assert path == str(tmp_path / "screen_sensitivity.png") and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluation_returns_and_episode_lengths_reach_the_table_and_the_csv(tmp_path):
    for seed in (1, 2):
        writer = SummaryWriter(str(tmp_path / "runs" / f"Ant-v5__ppo_continuous__{seed}__1700000000"))
        for episode in range(10):  # the last 10 % = the last episode
            writer.add_scalar("charts/episodic_return", float(episode), 100 * (episode + 1))
            writer.add_scalar("charts/episodic_length", 10.0 * seed + episode, 100 * (episode + 1))
        writer.add_scalar("charts/SPS", 1000.0, 1000)
        for i in range(10):  # the final evaluation: 10 episodes of returns 1000 * seed + i
            writer.add_scalar("eval/episodic_return", 1000.0 * seed + i, i)
        writer.close()
    expected = "| Ant-v5 | ppo_continuous | 2 | 9.0 ± 0.0 | 1504.5 ± 707.1 | 24 ± 7 | 1,000 |"
    runs = plot.load_runs(str(tmp_path / "runs"))
    assert plot.final_returns_table(runs).splitlines()[0].endswith("| evaluation return | episode length | SPS |")
    assert plot.final_returns_table(runs).splitlines()[2] == expected
    plot.export_runs(runs, str(tmp_path / "results" / "runs.csv"))
    assert plot.final_returns_table(plot.load_runs(str(tmp_path / "results"))).splitlines()[2] == expected
    without = plot.Run("Ant-v5", "trpo_continuous", 1, np.array([[100.0, 5.0]]), np.zeros((0, 3)), 5.0, 900.0)  # no eval
    assert plot.final_returns_table([*runs, without]).splitlines()[2:] == [
        expected,
        "| Ant-v5 | trpo_continuous | 1 | 5.0 ± 0.0 | – | – | 900 |",
    ]


def test_choose_takes_the_grid_value_with_the_highest_mean_normalized_score():
    runs = [_run(env, "ref", 1, 100.0) for env in ("A-v5", "B-v5")]
    # delta 0.1: scores 1.5 and 0.1 (mean 0.8); delta 0.3: 0.6 and 0.9 (mean 0.75); delta 1: on A only
    runs += [_run("A-v5", "trefree_continuous_delta0.1", 1, 150.0), _run("B-v5", "trefree_continuous_delta0.1", 1, 10.0)]
    runs += [_run("A-v5", "trefree_continuous_delta0.3", 1, 60.0), _run("B-v5", "trefree_continuous_delta0.3", 1, 90.0)]
    runs += [_run("A-v5", "trefree_continuous_delta1", 1, 500.0)]
    best, means = screening.choose(runs, "ref", "delta")
    assert best == "trefree_continuous_delta0.1" and means == pytest.approx({best: 0.8, "trefree_continuous_delta0.3": 0.75})


def test_curves_against_iterations_read_the_iteration_ends_and_survive_the_csv(tmp_path):
    writer = SummaryWriter(str(tmp_path / "runs" / "Hopper-v5__trpo_continuous_vine__1__1700000000"))
    for step in (1000, 3000, 6000):  # three iterations of growing size, as vine's
        writer.add_scalar("charts/SPS", 100.0, step)
        writer.add_scalar("charts/episodic_return", step / 10, step)
    writer.close()
    run = plot.load_runs(str(tmp_path / "runs"))[0]
    np.testing.assert_array_equal(run.iterations, [[1000, 1], [3000, 2], [6000, 3]])
    plot.export_runs([run], str(tmp_path / "results" / "runs.csv"))
    np.testing.assert_array_equal(plot.load_runs(str(tmp_path / "results"))[0].iterations, run.iterations)
    (curves,) = plot.plot([run], str(tmp_path / "curves.png"), x="iterations")  # no ratios logged: no ratio figure
    assert open(curves, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_runs_from_several_folders_filtered_by_name_and_environment_and_never_counted_twice(tmp_path):
    plot.export_runs(
        [_run("A-v5", "trpo_continuous", 1, 1.0), _run("A-v5", "ppo_continuous", 1, 2.0)], str(tmp_path / "a" / "runs.csv")
    )
    plot.export_runs(
        [_run("A-v5", "ppo_continuous_clip-coef0.3", 2, 3.0), _run("B-v5", "ppo_continuous", 1, 4.0)],
        str(tmp_path / "b" / "runs.csv"),
    )
    folders = (str(tmp_path / "a"), str(tmp_path / "b"))
    names = {(run.exp_name, run.seed) for run in plot.select_runs(folders, ("trpo_continuous", "ppo_*_clip-coef*"))}
    assert names == {("trpo_continuous", 1), ("ppo_continuous_clip-coef0.3", 2)}
    assert len(plot.select_runs(folders)) == 4
    assert {run.env_id for run in plot.select_runs(folders, env_ids=("B-*",))} == {"B-v5"}
    assert [run.final for run in plot.select_runs(folders, ("ppo_continuous",), ("A-v5",))] == [2.0]
    assert len(plot.select_runs((str(tmp_path / "a"), str(tmp_path / "a")))) == 2  # the same runs twice: counted once
    plot.export_runs([_run("A-v5", "trpo_continuous", 1, 5.0)], str(tmp_path / "c" / "runs.csv"))  # another run, same name
    with pytest.raises(SystemExit, match="two different runs A-v5__trpo_continuous__1"):
        plot.select_runs((str(tmp_path / "a"), str(tmp_path / "c")))


def test_binned_curve_and_its_area_against_hand_computed_values():
    # episodes ending at steps 3k and 9k (bin 1), 12k (bin 2), none in bin 3, 35k (bin 4)
    binned = plot.binned_curve(np.array([3000.0, 9000.0, 12000.0, 35000.0]), np.array([1.0, 3.0, 5.0, 7.0]), width=10_000)
    np.testing.assert_array_equal(binned, [[10_000, 2.0], [20_000, 5.0], [30_000, 5.0], [40_000, 7.0]])  # bin 3: bin 2's value
    assert binned[:, 1].mean() == 4.75  # the area under the curve per step: the sample-efficiency measure


def _scored_run(env_id, exp_name, seed, final):
    run = _run(env_id, exp_name, seed, final)
    run.binned, run.auc = np.array([[10_000.0, final / 2], [20_000.0, final]]), 0.75 * final
    return run


def test_comparison_verdicts_on_runs_with_known_differences(tmp_path):
    """`better` is 100 above `ref` in every run of both tasks, `same` equals `ref` run for run, `worse` is 50 below."""
    runs = []
    for env_id, base in (("A-v5", 1000.0), ("B-v5", 200.0)):
        for seed in range(1, 11):
            ref = base + 10.0 * seed
            runs += [
                _scored_run(env_id, "ref", seed, ref),
                _scored_run(env_id, "better", seed, ref + 100.0),
                _scored_run(env_id, "same", seed, ref),
                _scored_run(env_id, "worse", seed, ref - 50.0),
            ]
    random = {"A-v5": 0.0, "B-v5": 100.0}
    tables, normalized = ten_seeds.compare(runs, ("better", "ref", "same"), random, reps=2000)
    final = tables.split("**sample efficiency")[0]
    row = next(line for line in final.splitlines() if line.startswith("| A-v5 |"))
    # the difference of means is +100; the seeds of each algorithm are resampled independently (runs are not paired), so
    # its interval is +100 ± ~25 (each mean's bootstrap sd is 28.7 / sqrt(10) ~ 9.1, the difference's ~12.8): above 0
    low, high = (float(v) for v in row.split(" | ")[4].split("[")[1].rstrip("]").split(", "))
    assert row.split(" | ")[4].startswith("+100.0 [") and 60 < low < 100 < high < 140 and row.split(" | ")[5] == "better"
    # normalized: (x - random) / (ref's mean - random); ref's mean on B is 255, so `better` on B scores (ref + 100 - 100) / 155
    np.testing.assert_allclose(normalized["ref"][:, 1], (200.0 + 10.0 * np.arange(1, 11) - 100.0) / 155.0)
    aggregate = {
        line.split(" | ")[0].strip("| "): line
        for line in final.splitlines()
        if line.startswith("| ref |") or line.startswith("| same |")
    }
    # every run of `better` beats every run of `ref` (P = 1 in every resample), and the IQM intervals lie apart
    assert aggregate["ref"].endswith("1.000 [1.000, 1.000] | better beats, by a large margin (IQM intervals apart) |")
    # P(better > same) = 1 too; and against itself a method ties: `same` vs `ref`
    tables, _ = ten_seeds.compare(runs, ("same", "ref", "worse"), random, reps=2000)
    final = tables.split("**sample efficiency")[0]
    ref_row = next(line for line in final.splitlines() if line.startswith("| ref |") and "P(" not in line)
    worse_row = next(line for line in final.splitlines() if line.startswith("| worse |") and "P(" not in line)
    assert "same ties (no detectable difference)" in ref_row and "0.500 [" in ref_row
    # P(same > worse) by hand: same = base + 10 i, worse = base - 50 + 10 j (i, j = 1..10) on both tasks; i beats j when
    # j <= i + 4 (85 of the 100 pairs) and ties when j = i + 5 (5 pairs, counted 1/2 by Mann-Whitney): 0.875
    assert "| 0.875 [" in worse_row and "| same beats" in worse_row
    cells = next(line for line in final.splitlines() if line.startswith("| B-v5 |")).split(" | ")
    assert cells[4].startswith("+0.0 [") and cells[5] == "no detectable difference"  # same - ref
    assert cells[6].startswith("+50.0 [") and cells[7] == "better |"  # same - worse
    # the sample-efficiency table is there, with the AUC (0.75 x final): the same verdicts
    assert "**sample efficiency (AUC)**" in tables and "| A-v5 |" in tables.split("**sample efficiency")[1]


def test_binned_curves_and_areas_survive_the_csv_and_draw_the_comparison_figures(tmp_path):
    runs = [
        _scored_run(env_id, name, seed, 100.0 * seed + (50.0 if name == "b" else 0.0))
        for env_id in ("A-v5", "B-v5")
        for name in ("a", "b")
        for seed in (1, 2, 3)
    ]
    plot.export_runs(runs, str(tmp_path / "runs.csv"))
    back = {(r.env_id, r.exp_name, r.seed): r for r in plot.read_runs_csv(str(tmp_path / "runs.csv"))}
    for run in runs:
        copy = back[(run.env_id, run.exp_name, run.seed)]
        np.testing.assert_array_equal(copy.binned, run.binned)
        assert copy.auc == run.auc
    (tmp_path / "random.csv").write_text(
        "env_id,policy,episode,return\nA-v5,random,0,-10\nA-v5,random,1,10\nB-v5,random,0,5\n"
    )
    assert ten_seeds.read_random_returns(str(tmp_path / "random.csv")) == {"A-v5": 0.0, "B-v5": 5.0}
    _, normalized = ten_seeds.compare(runs, ("b", "a"), ten_seeds.read_random_returns(str(tmp_path / "random.csv")), reps=200)
    for path in ten_seeds.plot_comparison(runs, ("b", "a"), normalized, str(tmp_path / "curves.png"), reps=200):
        assert path.endswith(("_binned.png", "_profiles.png")) and (tmp_path / path).stat().st_size > 10_000
    # the bands are bootstrap intervals too, drawn from numpy's seeded generator: the same figures again
    np.random.rand(3)
    (tmp_path / "again").mkdir()
    for path in ten_seeds.plot_comparison(runs, ("b", "a"), normalized, str(tmp_path / "again" / "curves.png"), reps=200):
        assert (tmp_path / "again" / os.path.basename(path)).read_bytes() == (tmp_path / os.path.basename(path)).read_bytes()


def test_a_run_and_its_exported_copy_count_once(tmp_path):
    """A finished run's TensorBoard directory next to the CSV it was exported to (values rounded to 6 digits, the curve
    downsampled to 200 points) is one run, so that a sweep can be exported again as more runs finish."""
    run_dir = tmp_path / "sweep" / "runs" / "A-v5__x__1__1"
    writer = SummaryWriter(str(run_dir))
    for i in range(1, 501):
        writer.add_scalar("charts/episodic_return", 1.23456789 * i, 100 * i)
    for i in range(1, 6):
        writer.add_scalar("charts/SPS", 1234.56789, 10_000 * i)
    writer.close()
    plot.export_runs(plot.select_runs((str(tmp_path / "sweep"),)), str(tmp_path / "results" / "runs.csv"))
    both = plot.select_runs((str(tmp_path / "sweep"), str(tmp_path / "results")))
    assert len(both) == 1 and both[0].auc == pytest.approx(
        np.mean(plot.binned_curve(100.0 * np.arange(1, 501), 1.23456789 * np.arange(1, 501))[:, 1])
    )


def test_comparison_intervals_are_reproducible_and_the_same_in_any_number_of_processes():
    """rliable draws its resamples from numpy's global generator, whatever `random_state` it is handed: each interval
    seeds it, so the tables are the same twice, after other draws from that generator, and over two processes."""
    runs = [
        _scored_run(env_id, name, seed, 100.0 * seed + (50.0 if name == "b" else 0.0) + 3.0 * seed**2 * (env_id == "B-v5"))
        for env_id in ("A-v5", "B-v5")
        for name in ("a", "b", "c")
        for seed in range(1, 7)
    ]
    random = {"A-v5": 0.0, "B-v5": 10.0}
    first, _ = ten_seeds.compare(runs, ("b", "a", "c"), random, reps=200)
    np.random.seed(123)
    np.random.rand(7)
    again, _ = ten_seeds.compare(runs, ("b", "a", "c"), random, reps=200)
    spread, _ = ten_seeds.compare(runs, ("b", "a", "c"), random, reps=200, workers=2)
    assert first == again == spread
    assert "| A-v5 | 400.0 [" in first  # not a degenerate interval: its bounds depend on the draws
    low, high = (float(v) for v in first.split("| A-v5 | 400.0 [")[1].split("]")[0].split(", "))
    assert low < 400.0 < high


TEN_SEEDS, SCREENING = "utils.results.ten_seeds.analysis", "utils.results.screening.analysis"


@pytest.mark.parametrize(
    "command, flags, message",
    [
        (SCREENING, ["--reference", "nope"], "error: no runs of --reference nope under results"),
        (TEN_SEEDS, ["--compare", "b", "nope", "--random", "random.csv"], "error: no runs of --compare nope under results"),
        (SCREENING, ["--choose", "delta"], "error: --choose needs --reference"),
        (SCREENING, ["--reference", "a"], "error: a has a mean final return <= 0 on some environment; it cannot normalize"),
        ("utils.plot", ["--reference", "a"], "error: --reference has moved beside its study: python -m " + SCREENING),
        (
            TEN_SEEDS,
            ["--compare", "b", "a", "--random", "random.csv"],
            "error: --compare needs runs of b, a on a common environment",
        ),
        ("utils.plot", ["--x", "iterations"], "error: A-v5 a has no iteration steps (charts/SPS) to plot against"),
        ("utils.plot", ["--out", "random.csv/curves.png"], "error: --out random.csv/curves.png: cannot write in"),
        ("utils.plot", ["--export", "results"], "error: --export results is a folder, not a file"),
        (TEN_SEEDS, ["--workers", "0"], "error: --workers must be at least 1"),
        ("utils.plot", ["--compare", "b", "a"], "error: --compare has moved beside its study: python -m " + TEN_SEEDS),
        ("utils.plot", ["--choose", "delta"], "error: --choose has moved beside its study: python -m " + SCREENING),
    ],
)
def test_plot_refuses_bad_input_before_writing_anything(tmp_path, command, flags, message):
    """Every check, including those of the tables (the reference's normalization, the comparison's environments), comes
    before the first figure is written."""
    finals = {"A-v5": 100.0, "B-v5": -50.0}
    runs = [_scored_run(env_id, name, seed, final) for env_id, final in finals.items() for name in "ab" for seed in (1, 2)]
    plot.export_runs(runs, str(tmp_path / "results" / "runs.csv"))
    (tmp_path / "random.csv").write_text("env_id,policy,episode,return\nA-v5,random,0,0\n")  # no B-v5
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    env = os.environ | {"PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-m", command, "results", *flags], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
