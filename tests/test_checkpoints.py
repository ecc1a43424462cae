"""Checkpoints, resume, interruption, evaluation, videos and plots, for each training script."""

import importlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ALIGNED_ID, INTERRUPT, only_run_dir
from torch.utils.tensorboard import SummaryWriter

from utils import evaluate as evaluation
from utils import plot
from utils.logs import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ppo_continuous", "trefree_continuous", "trpo_continuous"]


@pytest.fixture(params=SCRIPTS)
def algo(request):
    return importlib.import_module(request.param)


def test_evaluation_rebuilds_the_policy_with_the_training_statistics_frozen(algo):
    algo.train(algo.Args(env_id="InvertedPendulum-v5", total_timesteps=4096, num_steps=1024, save_model=True))
    run_dir = only_run_dir()
    path = os.path.join(run_dir, f"{algo.__name__}.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 4096 and checkpoint["iteration"] == 4
    # the policy is rebuilt by the script that wrote the checkpoint: its own Agent and Normalizer, with the saved state
    _, agent, normalizer = evaluation.load_policy(path)
    assert type(agent) is algo.Agent and type(normalizer) is algo.Normalizer
    assert all(torch.equal(agent.state_dict()[k], v) for k, v in checkpoint["model"].items())
    np.testing.assert_array_equal(normalizer.obs_rms.mean, checkpoint["normalizer"]["obs_rms"]["mean"].numpy())
    np.testing.assert_array_equal(normalizer.obs_rms.var, checkpoint["normalizer"]["obs_rms"]["var"].numpy())

    # Frozen: every observation of the evaluation is normalized with update=False, by the statistics of the checkpoint.
    seen = []
    obs = algo.Normalizer.obs

    def spy(self, x, update=True):
        seen.append((update, self.obs_rms.mean.copy(), self.obs_rms.var.copy()))
        return obs(self, x, update)

    algo.Normalizer.obs = spy
    try:
        returns = evaluation.evaluate(path, episodes=3)
    finally:
        algo.Normalizer.obs = obs
    assert len(returns) == 3 and len(seen) >= 3
    for update, mean, var in seen:
        assert update is False
        np.testing.assert_array_equal(mean, normalizer.obs_rms.mean)
        np.testing.assert_array_equal(var, normalizer.obs_rms.var)
    assert len(read_scalars(run_dir)["eval/episodic_return"]) == 10  # the script evaluated its final checkpoint
    with pytest.raises(ValueError, match=r"Hopper-v5 has observations of shape \(11,\); the policy takes \(4,\)"):
        evaluation.evaluate(path, episodes=1, env_id="Hopper-v5")


def test_env_kwargs_reach_the_environments_the_checkpoint_and_the_evaluation(algo):
    kwargs = ("include_cfrc_ext_in_observation=False", "healthy_z_range=(0.2, 1.0)", "xml_file=ant.xml")
    algo.train(
        algo.Args(env_id="Ant-v5", env_kwargs=kwargs, total_timesteps=64, num_steps=64, num_minibatches=2, save_model=True)
    )
    path = os.path.join(only_run_dir(), f"{algo.__name__}.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["args"]["env_kwargs"] == kwargs  # a resumed run gets them back with its arguments
    assert checkpoint["env_kwargs"] == {
        "include_cfrc_ext_in_observation": False,
        "healthy_z_range": (0.2, 1.0),
        "xml_file": "ant.xml",
    }
    assert checkpoint["normalizer"]["obs_rms"]["mean"].shape == (27,)  # Ant-v5 observes 105 numbers by default
    assert len(evaluation.evaluate(path, episodes=1)) == 1  # utils.evaluate makes the same environment
    with pytest.raises(TypeError, match="unexpected keyword argument 'include_cfrc_ext_in_observation'"):
        evaluation.evaluate(path, episodes=1, env_id="Hopper-v5")  # the kwargs apply to another --env-id too


def test_init_log_std_sets_the_initial_policy_standard_deviation(algo):
    algo.train(
        algo.Args(
            env_id="InvertedPendulum-v5",
            init_log_std=-1.0,
            total_timesteps=64,
            num_steps=64,
            num_minibatches=2,
            save_model=True,
        )
    )
    log_std = torch.load(os.path.join(only_run_dir(), f"{algo.__name__}.pt"), weights_only=True)["model"]["actor_logstd"]
    # one update moves it by less than 0.2: 20 Adam steps of 3e-4 (PPO, TREFree), a mean KL of at most 0.01 (TRPO)
    assert log_std.shape == (1,) and abs(log_std.item() + 1.0) < 0.2


def _aligned_args(algo, **kwargs):
    return algo.Args(**(dict(env_id=ALIGNED_ID, total_timesteps=8 * 64, num_steps=64, num_minibatches=4) | kwargs))


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(algo):
    """Everything but the environments' state is checkpointed; with episodes that end at iteration
    boundaries (AlignedEnv) nothing is lost, and the final parameters must be identical."""
    algo.train(_aligned_args(algo, save_model=True, exp_name="straight"))
    straight = torch.load(only_run_dir("runs/*__straight__*") + "/straight.pt", weights_only=True)

    INTERRUPT["after_steps"] = 3 * 64 + 10  # SIGINT during the 4th iteration: the run stops after it
    summary = algo.train(_aligned_args(algo, checkpoint_interval=100, exp_name="resumed"))
    assert summary["stopped_by"] == signal.SIGINT and summary["global_step"] == 4 * 64
    run_dir = only_run_dir("runs/*__resumed__*")
    summary = algo.train(algo.Args(resume=os.path.join(run_dir, "resumed.pt")))
    assert summary["stopped_by"] == 0 and summary["global_step"] == 8 * 64
    resumed = torch.load(os.path.join(run_dir, "resumed.pt"), weights_only=True)

    for key in straight["model"]:
        torch.testing.assert_close(resumed["model"][key], straight["model"][key], rtol=0, atol=0)
    assert resumed["iteration"] == straight["iteration"] == 8
    # one TensorBoard curve, continued: every iteration logged once, in order
    sps_steps = [step for step, _ in read_scalars(run_dir)["charts/SPS"]]
    assert sps_steps == [64 * i for i in range(1, 9)]
    lr = dict(read_scalars(run_dir)["charts/learning_rate"])
    assert lr == dict(read_scalars(only_run_dir("runs/*__straight__*"))["charts/learning_rate"])


def test_a_finished_run_resumed_with_a_larger_total_equals_a_longer_run(algo):
    """`--resume CKPT --total-timesteps N` extends the run in its own directory; with a constant learning rate
    the extended run ends where an uninterrupted run of N steps does, bit for bit."""
    algo.train(_aligned_args(algo, anneal_lr=False, save_model=True, exp_name="straight"))
    straight = torch.load(only_run_dir("runs/*__straight__*") + "/straight.pt", weights_only=True)
    algo.train(_aligned_args(algo, anneal_lr=False, save_model=True, exp_name="extended", total_timesteps=4 * 64))
    path = os.path.join(only_run_dir("runs/*__extended__*"), "extended.pt")
    with pytest.raises(algo.ArgsError, match="--total-timesteps 255 is fewer than the checkpoint's 256 steps"):
        algo.train(algo.Args(resume=path, total_timesteps=4 * 64 - 1))
    summary = algo.train(algo.Args(resume=path, total_timesteps=8 * 64))
    assert summary["global_step"] == 8 * 64 and len(os.listdir("runs")) == 2  # the same run directory
    extended = torch.load(path, weights_only=True)
    assert extended["args"]["total_timesteps"] == 8 * 64 and extended["iteration"] == 8
    for key in straight["model"]:
        torch.testing.assert_close(extended["model"][key], straight["model"][key], rtol=0, atol=0)


def test_a_finished_run_resumed_or_extended_keeps_one_evaluation(algo):
    """The final evaluation is logged after the run's last step, so that a resume drops it with everything logged after
    the checkpoint: resuming a finished run (nothing left to train) or extending it leaves one evaluation in the log,
    that of the policy it ends with."""
    algo.train(_aligned_args(algo, total_timesteps=2 * 64, save_model=True))
    run_dir, path = only_run_dir(), os.path.join(only_run_dir(), f"{algo.__name__}.pt")
    assert [step for step, _ in read_scalars(run_dir)["eval/episodic_return"]] == list(range(2 * 64 + 1, 2 * 64 + 11))
    algo.train(algo.Args(resume=path))  # finished: nothing to train, evaluated again
    assert [step for step, _ in read_scalars(run_dir)["eval/episodic_return"]] == list(range(2 * 64 + 1, 2 * 64 + 11))
    algo.train(algo.Args(resume=path, total_timesteps=4 * 64))  # extended: evaluated at its new end, once
    assert [step for step, _ in read_scalars(run_dir)["eval/episodic_return"]] == list(range(4 * 64 + 1, 4 * 64 + 11))


def test_an_extended_run_anneals_the_learning_rate_over_its_new_total(algo):
    lr_name = "vf_learning_rate" if algo.__name__ == "trpo_continuous" else "learning_rate"
    algo.train(_aligned_args(algo, anneal_lr=True, save_model=True, total_timesteps=2 * 64))
    run_dir = only_run_dir()
    algo.train(algo.Args(resume=os.path.join(run_dir, f"{algo.__name__}.pt"), total_timesteps=4 * 64))
    lr0 = getattr(algo.Args(), lr_name)
    lr = [value for _, value in read_scalars(run_dir)["charts/learning_rate"]]
    # iterations 1-2 annealed over 2 iterations; 3-4 as if the run had been started with 4: lr0 (1 - (i - 1) / 4)
    np.testing.assert_allclose(lr, [lr0, lr0 / 2, lr0 * 2 / 4, lr0 * 1 / 4], rtol=1e-6)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_trains_saves_resumes_and_evaluates_on_each_device(algo, device):
    """The rollout (numpy, CPU) and the update (`device`) meet in one place; a checkpoint holds the device's
    tensors and is read on the CPU by utils.evaluate and by a resumed run on any device."""
    args = algo.Args(
        env_id="InvertedPendulum-v5",
        total_timesteps=2 * 512,
        num_steps=512,
        num_minibatches=4,
        cuda=device == "cuda",
        save_model=True,
    )
    algo.train(args)
    path = os.path.join(only_run_dir(), f"{algo.__name__}.pt")
    assert torch.load(path, weights_only=True)["model"]["actor_logstd"].device.type == device
    for cuda in (device == "cuda", device != "cuda"):  # continue on this device, then on the other one (the CPU without a GPU)
        summary = algo.train(
            algo.Args(
                resume=path,
                cuda=cuda,
                total_timesteps=torch.load(path, weights_only=True, map_location="cpu")["global_step"] + 512,
            )
        )
        assert summary["stopped_by"] == 0
    assert torch.load(path, weights_only=True, map_location="cpu")["global_step"] == 4 * 512
    assert len(evaluation.evaluate(path, episodes=2)) == 2


def test_checkpoint_is_written_atomically(algo, monkeypatch):
    """A crash while writing leaves the previous checkpoint readable."""
    algo.train(_aligned_args(algo, total_timesteps=64, save_model=True))
    path = os.path.join(only_run_dir(), f"{algo.__name__}.pt")
    before = open(path, "rb").read()

    def crash(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a checkp")
        raise OSError("disk full")

    checkpoint = torch.load(path, weights_only=True)
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        algo.save_checkpoint(path, checkpoint)
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_refuses_another_scripts_checkpoint_and_non_checkpoints(tmp_path, script):
    other = "trpo_continuous" if script != "trpo_continuous" else "ppo_continuous"
    module = importlib.import_module(other)
    module.train(_aligned_args(module, total_timesteps=64, save_model=True))
    foreign = os.path.join(only_run_dir(), f"{other}.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"algo": script}, tmp_path / "partial.pt")  # has "algo", lacks the rest
    for path, message in [
        (foreign, f"is not a checkpoint of {script}.py: it is one of {other}.py"),
        ("notes.txt", "is not a checkpoint"),
        ("missing.pt", "no checkpoint at"),
        ("partial.pt", "'partial.pt' is not a checkpoint"),
    ]:
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, f"{script}.py"), "--resume", path],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_evaluate_command_refuses_a_non_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "utils.evaluate", str(tmp_path / "notes.txt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip() == f"error: '{tmp_path / 'notes.txt'}' is not a checkpoint"


def test_evaluation_records_the_first_episode_in_the_working_directory_not_next_to_the_checkpoint(tmp_path):
    import ppo_continuous as ppo

    ppo.train(ppo.Args(env_id="InvertedPendulum-v5", total_timesteps=1024, num_steps=1024, checkpoint_interval=1))
    path = os.path.join(only_run_dir(), "ppo_continuous.pt")
    beside = sorted(os.listdir(os.path.dirname(path)))
    try:
        evaluation.evaluate(path, episodes=2, capture_video=True)
    except Exception as e:  # only where no OpenGL backend exists
        if "GL" in str(e) or "display" in str(e).lower():
            pytest.skip(f"no OpenGL backend for headless rendering: {e}")
        raise
    folder = tmp_path / "videos" / "InvertedPendulum-v5__ppo_continuous"  # the default --video-dir, in the working directory
    assert os.listdir(folder) == ["eval-episode-0.mp4"] and (folder / "eval-episode-0.mp4").stat().st_size > 1000
    assert sorted(os.listdir(os.path.dirname(path))) == beside  # nothing written next to the checkpoint
    evaluation.evaluate(path, episodes=1, capture_video=True, video_dir=str(tmp_path / "mine"))  # a folder the user names
    assert os.listdir(tmp_path / "mine") == ["eval-episode-0.mp4"]


def test_plot_writes_figures_and_the_final_returns_table_and_reads_its_csv_back(tmp_path):
    # two algorithms x two seeds, 20 episodes each; the last 10 % = the last 2 episodes
    for exp_name, offset in [("ppo_continuous", 0.0), ("trefree_continuous", 100.0)]:
        for seed in (1, 2):
            writer = SummaryWriter(str(tmp_path / "runs" / f"Hopper-v5__{exp_name}__{seed}__1700000000"))
            for episode in range(20):
                writer.add_scalar("charts/episodic_return", offset + 10 * seed + episode, 1000 * (episode + 1))
            for iteration in range(1, 5):
                writer.add_scalar("ratio/max", 1.0 + 0.1 * iteration, 5000 * iteration)
                writer.add_scalar("ratio/min", 1.0 - 0.1 * iteration, 5000 * iteration)
                writer.add_scalar("charts/SPS", 1000 * seed, 5000 * iteration)
            writer.close()
    runs = plot.load_runs(str(tmp_path / "runs"))
    table = plot.final_returns_table(runs).splitlines()
    # ppo: seed 1 -> mean(28, 29) = 28.5, seed 2 -> 38.5: 33.5 ± 7.07; trefree: +100; SPS: mean(1000, 2000)
    expected = [
        "| Hopper-v5 | ppo_continuous | 2 | 33.5 ± 7.1 | 1,500 |",
        "| Hopper-v5 | trefree_continuous | 2 | 133.5 ± 7.1 | 1,500 |",
    ]
    assert table[2:] == expected
    curves, ratios = plot.plot(runs, str(tmp_path / "curves.png"))
    for path in (curves, ratios):
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    plot.export_runs(runs, str(tmp_path / "results" / "runs.csv"))
    again = plot.load_runs(str(tmp_path / "results"))
    assert plot.final_returns_table(again).splitlines()[2:] == expected
    np.testing.assert_allclose(again[0].curve, runs[0].curve, rtol=1e-5)
    np.testing.assert_allclose(again[0].ratios, runs[0].ratios, rtol=1e-5)
