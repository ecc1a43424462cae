"""The contract of every entry point (README, troubleshooting): a failure that is the input's or the machine's is one
`error:` line and exit code 2 (a numerical fault 3, a write the machine refuses 1, a signal 128 + n), and a run that
fails before its first step leaves
nothing behind; a checkpoint is validated by the script that wrote it; no run is lost to another run or a full disk."""

import fcntl
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import only_run_dir

from utils import evaluate as evaluation
from utils.logs import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ppo_continuous", "trefree_continuous", "trpo_continuous"]
TINY = dict(env_id="InvertedPendulum-v5", total_timesteps=128, num_steps=64, num_minibatches=2)


@pytest.fixture(params=SCRIPTS)
def algo(request):
    return importlib.import_module(request.param)


def run(*argv: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT} | (env or {})
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == code and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def corrupt(checkpoint: dict, case: str) -> dict:
    """The checkpoint with one part that this script does not write."""
    args, model, normalizer = dict(checkpoint["args"]), dict(checkpoint["model"]), dict(checkpoint["normalizer"])
    if case == "extra argument":
        args["bogus"] = 1
    elif case == "missing argument":
        del args["gamma"]
    elif case == "string for a number":
        args["gamma"] = "0.99"
    elif case == "bogus norm_adv":
        args["norm_adv"] = "sometimes"
    elif case == "another environment":
        args["env_id"] = "Hopper-v5"  # 11 observations, 3 actions: the networks take 4 and give 1
    elif case == "wrong weight shape":
        model["actor_logstd"] = torch.zeros(5)
    elif case == "missing normalizer field":
        del normalizer["obs_rms"]
    elif case == "wrong statistics shape":
        normalizer["obs_rms"] = normalizer["obs_rms"] | {"mean": torch.zeros(7), "var": torch.ones(7)}
    elif case == "wrong Adam state shape":
        optimizer = checkpoint["optimizer"] | {"state": dict(checkpoint["optimizer"]["state"])}
        optimizer["state"][0] = optimizer["state"][0] | {"exp_avg": torch.zeros(3, 3)}
        return checkpoint | {"optimizer": optimizer}
    elif case == "bad random generator state":
        return checkpoint | {"rng": torch.zeros(3, dtype=torch.uint8)}
    elif case == "string for the global step":
        return checkpoint | {"global_step": "128"}
    elif case == "NaN weight":
        model["actor_logstd"] = torch.full_like(model["actor_logstd"], float("nan"))
    elif case == "infinite Adam state":
        optimizer = checkpoint["optimizer"] | {"state": dict(checkpoint["optimizer"]["state"])}
        optimizer["state"][0] = optimizer["state"][0] | {
            "exp_avg_sq": torch.full_like(optimizer["state"][0]["exp_avg_sq"], float("inf"))
        }
        return checkpoint | {"optimizer": optimizer}
    elif case == "NaN statistics":
        normalizer["obs_rms"] = normalizer["obs_rms"] | {"var": torch.full_like(normalizer["obs_rms"]["var"], float("nan"))}
    return checkpoint | {"args": args, "model": model, "normalizer": normalizer}


CORRUPTIONS = [
    "extra argument",
    "missing argument",
    "string for a number",
    "bogus norm_adv",
    "another environment",
    "wrong weight shape",
    "missing normalizer field",
    "wrong statistics shape",
    "wrong Adam state shape",
    "bad random generator state",
    "string for the global step",
    "NaN weight",
    "infinite Adam state",
    "NaN statistics",
]


def test_a_checkpoint_that_this_script_did_not_write_is_refused_by_resume_and_evaluate_before_any_write(algo):
    algo.train(algo.Args(**TINY, save_model=True))
    run_dir = only_run_dir()
    path = os.path.join(run_dir, f"{algo.__name__}.pt")
    checkpoint, files = torch.load(path, weights_only=True), sorted(os.listdir(run_dir))
    for case in CORRUPTIONS:
        bad = os.path.join(run_dir, "bad.pt")
        torch.save(corrupt(checkpoint, case), bad)
        with pytest.raises(algo.ArgsError, match=f"'{bad}' is not a checkpoint of {algo.__name__}.py: "):
            algo.train(algo.Args(resume=bad, total_timesteps=256))
        with pytest.raises(ValueError, match=f"'{bad}' is not a checkpoint of {algo.__name__}.py: "):
            evaluation.evaluate(bad, episodes=1)
        os.remove(bad)
        assert sorted(os.listdir(run_dir)) == files, case  # no new event file, no new checkpoint
    assert algo.load_checkpoint(path)["global_step"] == 128  # the real one passes


def test_the_contract_of_a_script_one_line_exit_2_nothing_left_and_a_traceback_on_request(tmp_path):
    """Four entry-point failures that printed tracebacks: a keyword argument wrong only at the first step, a literal
    too deep for Python's parser, a checkpoint with an argument too many, utils.evaluate on a discrete environment."""
    script = os.path.join(ROOT, "ppo_continuous.py")
    hopper = one_error_line(run(script, "--env-id", "Hopper-v5", "--env-kwargs", "healthy_z_range=5", cwd=tmp_path))
    assert hopper.startswith("error: cannot make environment 'Hopper-v5': ")
    one_error_line(run(script, "--env-kwargs", "x=" + "-" * 3000 + "1", cwd=tmp_path))
    assert not os.path.exists(tmp_path / "runs")
    ppo = importlib.import_module("ppo_continuous")
    ppo.train(ppo.Args(**TINY, save_model=True))
    path = os.path.join(only_run_dir(), "ppo_continuous.pt")
    torch.save(corrupt(torch.load(path, weights_only=True), "extra argument"), "bad.pt")
    line = one_error_line(run(script, "--resume", "bad.pt", cwd=tmp_path))
    assert line.startswith("error: 'bad.pt' is not a checkpoint of ppo_continuous.py: TypeError: ")
    line = one_error_line(run("-m", "utils.evaluate", str(tmp_path / path), "--env-id", "CartPole-v1", cwd=ROOT))
    assert line == "error: AttributeError: 'Discrete' object has no attribute 'low'"  # a policy of 4 observations
    traced = run(script, "--resume", "bad.pt", cwd=tmp_path, env={"TRACEBACK": "1"})
    assert traced.returncode == 1 and "Traceback" in traced.stderr and "ArgsError" in traced.stderr


def test_a_run_whose_setup_fails_leaves_nothing_behind(algo, monkeypatch):
    def no_environments(*args, **kwargs):
        raise OSError("no such device")

    algo.train(algo.Args(**TINY, checkpoint_interval=1))
    run_dir = only_run_dir()
    files = sorted(os.listdir(run_dir))
    monkeypatch.setattr(algo, "make_envs", no_environments)
    with pytest.raises(OSError, match="no such device"):  # a resume: its new event file goes
        algo.train(algo.Args(resume=os.path.join(run_dir, f"{algo.__name__}.pt"), total_timesteps=256))
    assert sorted(os.listdir(run_dir)) == files
    with pytest.raises(OSError, match="no such device"):  # a new run: its directory goes
        algo.train(algo.Args(**TINY, exp_name="new"))
    assert os.listdir("runs") == [os.path.basename(run_dir)]


def test_runs_started_in_the_same_second_get_their_own_directories(algo):
    """Another run holds this second's directory (and the next's): the new run waits for a second of its own."""
    now = int(time.time())
    taken = [f"runs/InvertedPendulum-v5__{algo.__name__}__1__{now + i}" for i in range(2)]
    for folder in taken:
        os.makedirs(folder)
    algo.train(algo.Args(**TINY, save_model=True))
    assert all(not os.listdir(folder) for folder in taken)
    (new,) = set(os.listdir("runs")) - {os.path.basename(folder) for folder in taken}
    assert int(new.rsplit("__", 1)[1]) >= now + 2 and os.path.exists(f"runs/{new}/{algo.__name__}.pt")


def test_a_checkpoint_being_resumed_is_refused_to_a_second_process_and_freed_when_the_first_is_killed(algo):
    algo.train(algo.Args(**TINY, checkpoint_interval=1))
    run_dir = only_run_dir()
    path, files = os.path.join(run_dir, f"{algo.__name__}.pt"), sorted(os.listdir(run_dir))
    holder = "import fcntl, os, sys, time; fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX); print(1, flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", holder + "; time.sleep(60)", run_dir], stdout=subprocess.PIPE)
    assert holder.stdout.readline()  # the other process holds the run
    with pytest.raises(algo.ArgsError, match="is in use by another process running this script"):
        algo.train(algo.Args(resume=path, total_timesteps=256))
    assert sorted(os.listdir(run_dir)) == files
    holder.kill()  # SIGKILL: no cleanup of its own, yet the lock goes with it
    holder.wait()
    assert algo.train(algo.Args(resume=path, total_timesteps=256))["global_step"] == 256
    lock = os.open(run_dir, os.O_RDONLY)  # and the finished run has let go of it
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(lock)


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_leaves_no_partial_file(algo, monkeypatch):
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) < 3:
            return real_save(obj, f, *args, **kwargs)
        open(f, "wb").write(b"half a checkp")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(algo.MachineFault, match="^no space left on device writing .*; the checkpoint of step 128 is kept in"):
        algo.train(algo.Args(**(TINY | dict(total_timesteps=256)), checkpoint_interval=1))
    monkeypatch.setattr(torch, "save", real_save)
    run_dir = only_run_dir()
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]
    assert algo.load_checkpoint(os.path.join(run_dir, f"{algo.__name__}.pt"))["global_step"] == 128  # iteration 2's


def test_ctrl_c_to_the_process_group_of_a_run_with_async_environments_stops_it_with_130(tmp_path):
    script = os.path.join(ROOT, "ppo_continuous.py")
    flags = ["--env-id", "InvertedPendulum-v5", "--async-envs", "--num-envs", "2", "--num-steps", "64"]
    flags += ["--num-minibatches", "2", "--checkpoint-interval", "1", "--no-compile"]
    process = subprocess.Popen(
        [sys.executable, script, *flags], cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    while "step/s" not in process.stderr.read(200):  # training: the progress bar has its speed
        pass
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the workers get it too
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "stopped by SIGINT" in stderr and "Error" not in stderr, stderr


def test_utils_commands_keep_the_contract_and_never_overwrite_an_input(tmp_path):
    ppo = importlib.import_module("ppo_continuous")
    ppo.train(ppo.Args(**TINY))
    assert run("-m", "utils.plot", str(tmp_path / "runs"), "--export", str(tmp_path / "all.csv"), cwd=ROOT).returncode == 0
    before = (tmp_path / "all.csv").read_bytes()
    line = one_error_line(run("-m", "utils.plot", "all.csv", "--env-ids", "Hop*", "--export", "all.csv", cwd=tmp_path))
    assert line == "error: no runs with episodic returns under all.csv matching Hop*"
    line = one_error_line(run("-m", "utils.plot", ".", "--export", "./all.csv", cwd=tmp_path))
    assert line == "error: --export ./all.csv is an input" and (tmp_path / "all.csv").read_bytes() == before
    line = one_error_line(run("-m", "utils.plot", "all.csv", "--out", "new/sub/curves.txt", cwd=tmp_path))
    assert "not '.txt'" in line and not os.path.exists(tmp_path / "new")
    one_error_line(run("-m", "utils.plot", "all.csv", "--out", "", cwd=tmp_path))
    one_error_line(run("-m", "utils.speed", "--scripts", 'ppo_continuous "', cwd=ROOT))
    sweep = ["-m", "utils.benchmark", "--algos", "ppo", "--env-ids", "InvertedPendulum-v5", "--seeds", "1"]
    sweep += ["--total-timesteps", "2048", "--out-dir", str(tmp_path / "sweep")]
    no_slurm = {"PATH": os.path.dirname(sys.executable)}  # a machine without SLURM's commands (here, one may run)
    line = one_error_line(run(*sweep, "--launcher", "slurm", cwd=ROOT, env=no_slurm))
    assert "slurm" in line and not os.path.exists(tmp_path / "sweep")
    os.makedirs(tmp_path / "sweep")
    fcntl.flock(lock := os.open(tmp_path / "sweep", os.O_RDONLY), fcntl.LOCK_EX)  # the same sweep, running
    assert one_error_line(run(*sweep, cwd=ROOT)).startswith("error: another sweep is running in --out-dir")
    os.close(lock)
    assert not os.listdir(tmp_path / "sweep" / "runs")


def test_a_resume_that_fails_in_its_first_iteration_purges_nothing(algo, monkeypatch):
    """TensorBoard's writer of a resumed run opens after its first iteration: a fault before leaves the folder's scalars
    (those logged after the checkpoint, which a resume would drop) as they were."""
    algo.train(algo.Args(**(TINY | dict(total_timesteps=256)), checkpoint_interval=2))  # checkpoints at 128 and 256
    run_dir = only_run_dir()
    path, scalars = os.path.join(run_dir, f"{algo.__name__}.pt"), read_scalars(run_dir)

    def poisoned_update(agent, *rest):
        with torch.no_grad():
            agent.actor_logstd.fill_(float("nan"))
        return {}

    monkeypatch.setattr(algo, "update", poisoned_update)
    with pytest.raises(algo.NumericalFault, match="iteration 5: the parameter actor_logstd is not finite"):
        algo.train(algo.Args(resume=path, total_timesteps=512))
    assert read_scalars(run_dir) == scalars


def test_without_fcntl_a_script_shows_its_help_and_trains_with_a_note(tmp_path):
    """Where `fcntl` does not exist (Windows), the scripts import, --help works and a run trains, noting that its folder
    has no lock."""
    for script in SCRIPTS:
        launch = f"import runpy, sys; sys.modules['fcntl'] = None; sys.argv[0] = '{script}.py'; "
        launch += f"runpy.run_path('{os.path.join(ROOT, script)}.py', run_name='__main__')"
        result = run("-c", launch, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "--env-id" in result.stdout, result.stderr
    flags = "--env-id InvertedPendulum-v5 --total-timesteps 128 --num-steps 64 --num-minibatches 2 --no-compile"
    result = run("-c", launch, *flags.split(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "note: no file locks here (no fcntl): nothing keeps a second process off this run" in result.stderr


def test_a_full_disk_is_the_machines_fault_exit_code_1_and_names_the_checkpoint_kept(tmp_path):
    launch = f"""if True:  # torch.save fails from the second checkpoint on, as on a full disk
        import runpy, sys, torch
        real, saves = torch.save, []
        def full(obj, f, *args, **kwargs):
            saves.append(f)
            if len(saves) > 1:
                raise OSError(28, "No space left on device")
            real(obj, f, *args, **kwargs)
        torch.save, sys.argv[0] = full, "ppo_continuous.py"
        runpy.run_path("{ROOT}/ppo_continuous.py", run_name="__main__")"""
    flags = "--env-id InvertedPendulum-v5 --total-timesteps 256 --num-steps 64 --num-minibatches 2 --checkpoint-interval 1"
    line = one_error_line(run("-c", launch, *flags.split(), "--no-compile", cwd=tmp_path), code=1)
    path = os.path.join(only_run_dir(), "ppo_continuous.pt")
    assert line == f"error: no space left on device writing {path}; the checkpoint of step 64 is kept in {path}"
