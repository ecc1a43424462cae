"""The shipped policies (utils/results/policies), the command that makes them, and the comparison of a run with its row."""

import glob
import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import only_run_dir

from utils import evaluate as evaluation
from utils import plot
from utils.results.policies import ship
from utils.results.ten_seeds import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = os.path.join(ROOT, "utils", "results", "policies")
TASKS = ("Ant-v5", "HalfCheetah-v5", "Hopper-v5", "Humanoid-v5", "HumanoidStandup-v5", "Walker2d-v5")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "Hopper-v5__trefree_continuous__4__1796537470")


@pytest.mark.parametrize("algo", ["trefree", "ppo", "trpo"])
@pytest.mark.parametrize("task", TASKS)
def test_each_shipped_policy_is_a_valid_checkpoint_of_its_script_at_the_studys_flags_without_the_training_state(task, algo):
    path = os.path.join(POLICIES, task, f"{algo}.pt")
    checkpoint = importlib.import_module(f"{algo}_continuous").load_checkpoint(path)  # the validation of --resume and evaluate
    args = checkpoint["args"]
    assert (args["env_id"], args["seed"], args["total_timesteps"], checkpoint["global_step"]) == (task, 1, 1_000_000, 999_424)
    assert args["clip_coef"] == 0.3 if algo == "ppo" else "clip_coef" not in args  # the study's PPO
    assert "optimizer" not in checkpoint and "rng" not in checkpoint


def test_the_shipped_policies_are_eighteen_files_within_8_mib():
    files = glob.glob(os.path.join(POLICIES, "*", "*.pt"))
    assert len(files) == 18 and sum(map(os.path.getsize, files)) <= 8 * 2**20


def test_a_shipped_policy_plays_the_episode_its_readme_shows():
    # the README shows `python -m utils.evaluate <file> --episodes 1` and its output: one short deterministic episode
    readme = open(os.path.join(POLICIES, "README.md")).read()
    path, shown = re.search(r"python -m utils\.evaluate (\S+) --episodes 1\nepisode 0: return (-?[\d.]+)\n", readme).groups()
    assert f"{evaluation.evaluate(os.path.join(ROOT, path), episodes=1)[0]:.1f}" == shown


def test_agreement_of_two_curves_against_hand_checked_points():
    row = np.array([[10, 1.0], [20, 2.0], [30, 3.0], [40, 4.0]])
    same_to_six_digits = np.array([[10, 1.0000001], [15, 9.0], [20, 2.0], [30, 3.0], [40, 4.0]])  # extra points are ignored
    assert compare.agreement(same_to_six_digits, row) == (40, None, 4)
    assert compare.agreement(np.array([[10, 1.0], [20, 2.0], [30, 3.00001], [40, 4.0]]), row) == (20, 30, 4)  # 6th digit
    assert compare.agreement(np.array([[10, 1.0], [21, 2.0], [30, 3.0]]), row) == (10, 20, 3)  # no episode ends at 20
    assert compare.agreement(np.array([[10, 1.0], [20, 2.0], [25, 7.0]]), row) == (20, None, 2)  # a shorter run
    assert compare.agreement(np.array([[10, 1.1]]), row) == (None, 10, 1)


def test_compare_names_the_step_through_which_a_run_agrees_with_its_row_of_the_ten_seed_study():
    # the fixture: the first 30,720 steps (episodic returns) of Hopper-v5 TREFree seed 4 at the study's flags, trained on an
    # AMD EPYC (family 26, model 2): it agrees with its row through step 9,944 and differs at 10,805
    result = subprocess.run(
        [sys.executable, "-m", "utils.results.ten_seeds.compare", FIXTURE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.splitlines()[-1]
    assert line.startswith("| Hopper-v5 | trefree_continuous | 4 | ") and line.endswith(" | 9,944 | 10,805 | 42 |")
    assert "| 188.0 / 3,071.0 | – / 3,660.7 | – / 844 |" in line and "| 0 of 10 seeds |" in line


def test_compare_refuses_a_run_without_a_row(tmp_path):
    rows = tmp_path / "rows.csv"
    plot.export_runs([plot.run_from_scalars(FIXTURE)], str(rows))
    run = compare.compare(plot.run_from_scalars(FIXTURE), plot.load_runs(str(rows)))  # a run equal to its own export
    last = int(plot.load_runs(str(rows))[0].curve[-1, 0])
    assert (run["agrees_through"], run["differs_at"], run["above"], run["seeds"]) == (last, None, 0, 1)
    other = tmp_path / "Walker2d-v5__trefree_continuous__4__1"
    os.symlink(FIXTURE, other)
    result = subprocess.run(
        [sys.executable, "-m", "utils.results.ten_seeds.compare", str(other), "--rows", str(rows)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: no row Walker2d-v5__trefree_continuous__4 to compare with\n"


def test_ship_writes_a_policy_that_plays_but_does_not_resume_and_sets_its_run_beside_its_row(tmp_path, capsys):
    import ppo_continuous as ppo

    ppo.train(ppo.Args(env_id="InvertedPendulum-v5", total_timesteps=2048, num_steps=1024, save_model=True))
    run_dir = only_run_dir()
    plot.export_runs(plot.load_runs("runs"), "rows.csv")  # the run's own row
    ship.main(ship.Args(runs="runs", out="policies", rows="rows.csv"))
    tables = capsys.readouterr().out
    run_checkpoint = torch.load(os.path.join(run_dir, "ppo_continuous.pt"), weights_only=True)
    policy = torch.load("policies/InvertedPendulum-v5/ppo.pt", weights_only=True)
    assert policy.keys() == run_checkpoint.keys() - {"optimizer", "rng"}
    assert all(torch.equal(policy["model"][k], v) for k, v in run_checkpoint["model"].items())
    returns = evaluation.evaluate("policies/InvertedPendulum-v5/ppo.pt")  # it plays
    assert f"| InvertedPendulum-v5 | ppo | {np.mean(returns):.1f} ± {np.std(returns):.1f} |" in tables
    assert (
        "`python ppo_continuous.py --env-id InvertedPendulum-v5 --seed 1 --save-model --total-timesteps 2048 --num-steps"
        in tables
    )
    last = int(plot.load_runs("rows.csv")[0].curve[-1, 0])
    assert f"| 0 of 1 seeds | {last:,} | – |" in tables  # equal to its row through the row's last point
    with pytest.raises(ppo.ArgsError, match="is a policy without its optimizer's state: it plays"):
        ppo.train(ppo.Args(resume="policies/InvertedPendulum-v5/ppo.pt"))
    assert os.listdir("policies/InvertedPendulum-v5") == ["ppo.pt"]  # nothing written beside it


def test_ship_refuses_an_unfinished_run_before_writing_anything(tmp_path):
    import trefree_continuous as trefree

    args = trefree.Args(env_id="InvertedPendulum-v5", total_timesteps=4096, num_steps=1024, checkpoint_interval=1)
    trefree.train(args)
    checkpoint_path = os.path.join(only_run_dir(), "trefree_continuous.pt")
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    torch.save(checkpoint | {"global_step": 2048, "iteration": 2}, checkpoint_path)  # as if stopped after two iterations
    with pytest.raises(SystemExit, match=r"has not finished: its checkpoint is at step 2,048 of 4,096"):
        ship.main(ship.Args(runs="runs", out="policies", rows="runs"))
    assert not os.path.exists("policies")
