"""Bad input, numerical faults, interruption and reproducibility, for each training script."""

import importlib
import os
import re
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import only_run_dir

from utils.logs import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["ppo_continuous", "trefree_continuous", "trpo_continuous"]
# Each script's own learning-rate and trust-region flags.
LEARNING_RATE = {
    "ppo_continuous": "learning_rate",
    "trefree_continuous": "learning_rate",
    "trpo_continuous": "vf_learning_rate",
}


@pytest.fixture(params=SCRIPTS)
def algo(request):
    return importlib.import_module(request.param)


def _bad_args(name):
    """(Args overrides, expected message) that every script must refuse."""
    lr = LEARNING_RATE[name]
    cases = [
        (
            dict(env_id="HalfCheeta-v5"),
            "cannot make environment 'HalfCheeta-v5': Environment `HalfCheeta` doesn't exist. Did you mean",
        ),
        (dict(env_id="CartPole-v1"), "CartPole-v1 has action space Discrete(2)"),
        (dict(env_id="tests/DictObservation-v0"), "tests/DictObservation-v0 has observation space Dict"),
        (dict(total_timesteps=1000, num_steps=2048), "--total-timesteps 1000 is smaller than one batch (2048 steps)"),
        (dict(num_minibatches=3, num_steps=1024), "--num-minibatches 3 does not divide the batch of 1024 steps"),
        (dict(num_envs=0), "--num-envs must be in [1, inf)"),
        (dict(num_steps=-5), "--num-steps must be in [1, inf)"),
        ({lr: 0.0}, f"--{lr.replace('_', '-')} must be in (0, inf)"),
        ({lr: float("nan")}, f"--{lr.replace('_', '-')} must be in (0, inf)"),
        ({lr: float("inf")}, f"--{lr.replace('_', '-')} must be in (0, inf)"),
        (dict(seed=-1), "--seed must be in [0, 4294967295]"),  # numpy's seeds; environment i gets seed + i, any size
        (dict(seed=2**32), "--seed must be in [0, 4294967295]"),
        (dict(ent_coef=float("nan")), "--ent-coef must be in [0, inf)"),
        (dict(ent_coef=-0.1), "--ent-coef must be in [0, inf)"),
        (dict(init_log_std=float("inf")), "--init-log-std must be in (-inf, inf)"),
        (dict(init_log_std=float("nan")), "--init-log-std must be in (-inf, inf)"),
        (dict(gamma=1.5), "--gamma must be in [0, 1]"),
        (dict(gae_lambda=-0.1), "--gae-lambda must be in [0, 1]"),
        (dict(checkpoint_interval=-1), "--checkpoint-interval must be in [0, inf)"),
        (
            dict(env_kwargs=("include_cfrc_ext_in_observation",)),
            "--env-kwargs takes KEY=VALUE, KEY not render_mode (the script sets it), not 'include_cfrc_ext_in_observation'",
        ),
        (dict(env_kwargs=("1x=2",)), "--env-kwargs takes KEY=VALUE, KEY not render_mode (the script sets it), not '1x=2'"),
        (dict(env_id="Hopper-v5", env_kwargs=("foo=1",)), "cannot make environment 'Hopper-v5': "),
        (dict(exp_name="a/b"), "--exp-name must be a plain name, without '/' or '__'"),
        (dict(exp_name="a__b"), "--exp-name must be a plain name, without '/' or '__'"),
        (
            dict(env_kwargs=("render_mode=human",)),
            "--env-kwargs takes KEY=VALUE, KEY not render_mode (the script sets it), not 'render_mode=human'",
        ),
        (
            dict(env_id="InvertedPendulum-v5", num_steps=10**12, total_timesteps=10**12),
            "a batch of 1,000,000,000,000 steps needs about",
        ),
        (dict(env_id="tests/BrokenReset-v0"), "cannot make environment 'tests/BrokenReset-v0': the simulator failed"),
    ]
    if name != "trpo_continuous":
        cases += [
            (dict(vf_coef=-1.0), "--vf-coef must be in (0, inf)"),
            (dict(max_grad_norm=float("inf")), "--max-grad-norm must be in (0, inf)"),
            (dict(target_kl=float("nan")), "--target-kl must be in (0, inf)"),
        ]
    if name != "trpo_continuous":
        cases += [
            (dict(update_epochs=10**9), "--update-epochs must be in [1, 1000]"),
            (dict(update_epochs=0), "--update-epochs must be in [1, 1000]"),
        ]
    if name == "ppo_continuous":
        cases += [
            (dict(clip_coef=float("inf")), "--clip-coef must be in (0, inf)"),
            (dict(clip_coef=0.0), "--clip-coef must be in (0, inf)"),
            (dict(vf_clip_coef=float("nan")), "--vf-clip-coef must be in (0, inf)"),
            (dict(num_steps=64, num_minibatches=64), "--norm-adv minibatch cannot standardize the advantages of one sample"),
            (
                dict(num_steps=1, num_minibatches=1, norm_adv="batch"),
                "--norm-adv batch cannot standardize the advantages of one sample",
            ),
        ]
    if name == "trefree_continuous":
        cases += [
            (dict(delta=0.0), "--delta must be in (0, inf]"),
            (dict(delta=-0.01), "--delta must be in (0, inf]"),
            (dict(delta=float("nan")), "--delta must be in (0, inf]"),
            (dict(ratio_clip=float("inf")), "--ratio-clip must be in (0, inf)"),
            (
                dict(num_steps=64, num_minibatches=64, norm_adv="minibatch"),
                "--norm-adv minibatch cannot standardize the advantages of one sample",
            ),
        ]
    if name == "trpo_continuous":
        cases += [
            (dict(num_steps=1, num_minibatches=1), "--norm-adv batch cannot standardize the advantages of one sample"),
            (dict(max_kl=0.0), "--max-kl must be in (0, inf)"),
            (dict(max_kl=-1.0), "--max-kl must be in (0, inf)"),
            (dict(max_kl=float("inf")), "--max-kl must be in (0, inf)"),
            (dict(cg_damping=float("nan")), "--cg-damping must be in [0, inf)"),
            (dict(cg_iters=10**6), "--cg-iters must be in [1, 1000]"),
            (dict(line_search_steps=100), "--line-search-steps must be in [1, 60]"),
            (dict(vine_actions=1), "--vine-actions must be in [2, inf)"),  # checked with or without --sampling vine
        ]
    return cases


def test_bad_arguments_are_refused_before_anything_is_built(algo):
    for overrides, message in _bad_args(algo.__name__):
        with pytest.raises(algo.ArgsError) as error:
            algo.train(algo.Args(**overrides))
        assert message in str(error.value) and "\n" not in str(error.value), (overrides, str(error.value))
        assert not os.path.exists("runs"), overrides


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_command_line_gets_one_line_and_exit_code_2(tmp_path, script):
    flag = "--" + LEARNING_RATE[script].replace("_", "-")
    for argv in (
        ["--gamma", "1.5"],
        [flag, "-1"],
        ["--num-minibatches", "7"],
        ["--seed", "-1"],
        [flag, "inf"],
        ["--ent-coef", "nan"],
    ):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, f"{script}.py"), *argv],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, (argv, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not (tmp_path / "runs").exists()


def test_cuda_without_a_gpu_falls_back_to_the_cpu_with_a_note(algo, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    algo.train(algo.Args(env_id="InvertedPendulum-v5", total_timesteps=512, num_steps=512, num_minibatches=8, cuda=True))
    assert "note: no GPU is available; training on the CPU" in capsys.readouterr().err


def test_nan_from_the_environment_stops_training_and_keeps_the_last_good_checkpoint(algo):
    args = algo.Args(
        env_id="tests/NaNAfter-v0", total_timesteps=8 * 256, num_steps=256, num_minibatches=8, checkpoint_interval=1
    )
    with pytest.raises(algo.NumericalFault) as fault:
        algo.train(args)
    # step 600 is in the 3rd iteration (steps 513-768)
    message = str(fault.value)
    assert message.startswith("tests/NaNAfter-v0, iteration 3: the environment returned a non-finite observation")
    checkpoint = torch.load(os.path.join(only_run_dir(), f"{algo.__name__}.pt"), weights_only=True)
    assert checkpoint["global_step"] == 2 * 256 and f"the checkpoint of step {2 * 256} is kept" in message
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert np.isfinite(checkpoint["normalizer"]["obs_rms"]["mean"].numpy()).all()  # the NaN never reached the statistics


def test_nan_in_training_names_the_quantity_and_keeps_the_last_good_checkpoint(algo, monkeypatch):
    original, calls = algo.update, []

    def poisoned_update(agent, *rest):  # rest: the optimizer, the batch, args (and TRPO's vine batch)
        stats = original(agent, *rest)
        calls.append(1)
        if len(calls) == 3:  # the 3rd update leaves a NaN parameter behind
            with torch.no_grad():
                agent.actor_logstd.fill_(float("nan"))
        return stats

    monkeypatch.setattr(algo, "update", poisoned_update)
    args = algo.Args(env_id="InvertedPendulum-v5", total_timesteps=8 * 256, num_steps=256, num_minibatches=8, save_model=True)
    with pytest.raises(algo.NumericalFault) as fault:
        algo.train(args)
    assert "iteration 3: the parameter actor_logstd is not finite after the update" in str(fault.value)
    checkpoint = torch.load(os.path.join(only_run_dir(), f"{algo.__name__}.pt"), weights_only=True)
    assert checkpoint["global_step"] == 2 * 256 and torch.isfinite(checkpoint["model"]["actor_logstd"]).all()


def test_nan_fault_exits_with_code_3(tmp_path):
    env = os.environ | {"PYTHONPATH": TESTS, "OMP_NUM_THREADS": "1"}
    flags = "--env-id helpers:tests/NaNAfter-v0 --total-timesteps 2048 --num-steps 256 --num-minibatches 8 --no-compile"
    cmd = [sys.executable, os.path.join(ROOT, "ppo_continuous.py"), *flags.split()]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: helpers:tests/NaNAfter-v0, iteration 3: the environment")


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path, script):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    flags = f"--env-id InvertedPendulum-v5 --total-timesteps {40 * 512} --num-steps 512 --num-minibatches 8"
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags.split(), "--checkpoint-interval", "1", "--no-compile"]
    process = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/*.pt")) and time.time() < deadline:  # the first checkpoint: training is under way
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    path = next(tmp_path.glob(f"runs/*/{script}.pt"))
    assert "stopped by SIGTERM at step" in stderr and f"continue with --resume {os.path.relpath(path, tmp_path)}" in stderr
    stopped_at = torch.load(path, weights_only=True)["global_step"]
    assert 0 < stopped_at < 40 * 512
    assert max(step for step, _ in read_scalars(str(path.parent))["charts/SPS"]) == stopped_at  # TensorBoard was flushed

    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, f"{script}.py"), "--resume", str(path), "--seed", "9", "--no-compile"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "note: a resumed run keeps the arguments it was started with; ignoring --seed" in result.stderr
    assert torch.load(path, weights_only=True)["global_step"] == 40 * 512
    assert [s for s, _ in read_scalars(str(path.parent))["charts/SPS"]] == [512 * i for i in range(1, 41)]


def test_each_environment_gets_its_own_seed_derived_from_the_seed(algo):
    envs = algo.make_envs("InvertedPendulum-v5", 3)
    obs, _ = envs.reset(seed=7)
    envs.close()
    for i in range(3):  # environment i is seeded with seed + i
        single = gym.make("InvertedPendulum-v5")
        np.testing.assert_array_equal(obs[i], single.reset(seed=7 + i)[0])
        single.close()
    assert len({tuple(row) for row in obs}) == 3


def test_same_seed_with_several_environments_gives_the_same_run(algo):
    args = dict(
        env_id="InvertedPendulum-v5", total_timesteps=2048, num_steps=256, num_envs=4, num_minibatches=8, save_model=True
    )
    for name in ("a", "b"):
        algo.train(algo.Args(exp_name=name, **args))
    a, b = (torch.load(os.path.join(only_run_dir(f"runs/*__{n}__*"), f"{n}.pt"), weights_only=True) for n in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    returns = [[v for _, v in read_scalars(only_run_dir(f"runs/*__{n}__*"))["charts/episodic_return"]] for n in "ab"]
    assert returns[0] == returns[1] and len(returns[0]) > 10


def test_minibatches_of_two_samples_still_train(algo):
    """The smallest minibatch that --norm-adv can standardize is allowed (TRPO's value minibatches of one sample too)."""
    algo.train(algo.Args(env_id="InvertedPendulum-v5", total_timesteps=64, num_steps=64, num_minibatches=32))


def test_a_run_directory_that_cannot_be_written_is_refused_and_left_as_it_was(algo, tmp_path, monkeypatch):
    (tmp_path / "runs").write_text("a file where the runs folder would go")
    with pytest.raises(NotADirectoryError):
        algo.train(algo.Args(env_id="InvertedPendulum-v5", total_timesteps=64, num_steps=64, num_minibatches=2))
    # a resumed run whose directory has become read-only (simulated: root may write anywhere) stops at its first write, a
    # machine's fault (exit code 1) named in one line, and leaves the directory as it was: its TensorBoard writer opens
    # after the first iteration, so nothing was purged
    (tmp_path / "runs").unlink()
    algo.train(
        algo.Args(env_id="InvertedPendulum-v5", total_timesteps=64, num_steps=64, num_minibatches=2, checkpoint_interval=1)
    )
    path = os.path.join(only_run_dir(), f"{algo.__name__}.pt")
    before, files = os.path.getmtime(path), sorted(os.listdir(only_run_dir()))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(algo, "SummaryWriter", read_only)
    with pytest.raises(
        algo.MachineFault,
        match=f"^permission denied writing {re.escape(os.path.abspath(only_run_dir()))}; the checkpoint of step 64 is kept",
    ):
        algo.train(algo.Args(resume=path, total_timesteps=128))
    assert os.path.getmtime(path) == before and sorted(os.listdir(only_run_dir())) == files


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # provoked: the statistics overflow to inf
def test_non_finite_normalization_statistics_stop_training(algo):
    """Observations of ~1e300 overflow the running variance to inf while every normalized observation, clipped to +-10,
    stays finite: the statistics themselves are checked, and the run stops (exit 3) instead of saving them."""
    args = algo.Args(
        env_id="InvertedPendulum-v5",
        env_kwargs=("reset_noise_scale=1e300",),
        total_timesteps=128,
        num_steps=64,
        num_minibatches=2,
        save_model=True,
    )
    with pytest.raises(
        algo.NumericalFault, match="iteration 1: the running observation mean or variance is not finite after the update"
    ):
        algo.train(args)


def test_no_cuda_never_touches_a_gpu(algo, monkeypatch):
    """With --no-cuda (or no GPU) the checkpoint holds no GPU generator state, and nothing asks the GPUs for theirs."""

    def no_gpu_call(*args, **kwargs):
        raise AssertionError("a CUDA generator was read")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_gpu_call)
    monkeypatch.setattr(torch.cuda, "get_rng_state", no_gpu_call)
    algo.train(
        algo.Args(
            env_id="InvertedPendulum-v5", total_timesteps=128, num_steps=64, num_minibatches=2, cuda=False, save_model=True
        )
    )
    path = os.path.join(only_run_dir(), f"{algo.__name__}.pt")
    assert torch.load(path, weights_only=True)["cuda_rng"] == []
    algo.train(algo.Args(resume=path, total_timesteps=192, cuda=False))
