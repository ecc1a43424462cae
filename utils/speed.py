"""Training speed next to environment-only speed, measured in the same sitting.

    python -m utils.speed --env-id HalfCheetah-v5 --steps 40960
    python -m utils.speed --env-id Hopper-v5 --scripts trpo_continuous "trpo_continuous --sampling vine"

Environment-only: one `gym.make` environment stepped with `action_space.sample()`, reset at episode
ends, measured just before and just after each training run (the mean is the reference). Training: each script run as
its own process with its default hyper-parameters (and any flags given) and one torch thread. Its SPS is the steady
speed after the first iteration, whose update holds the compilation of the minibatch step (with `--compile`):
(steps of iterations 2..n) / (their wall time), from the logged `charts/SPS`. The rollout and update times per
iteration are the medians of `perf/rollout_time` and `perf/update_time`; "compile s" is the first iteration's update
time less the median (about 0 with --no-compile).
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import tyro

from utils.logs import one_line_errors, read_scalars, reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("ppo_continuous", "trefree_continuous", "trpo_continuous")


@dataclass
class Args:
    env_id: str = "HalfCheetah-v5"
    """the environment to measure"""
    steps: int = 40960
    """environment steps per measurement (a whole number of the scripts' batches)"""
    scripts: tuple[str, ...] = tuple(s for s in SCRIPTS if os.path.exists(os.path.join(ROOT, f"{s}.py")))
    """the training scripts to measure, each optionally with flags (`"trpo_continuous --sampling vine"`)"""


def env_only_sps(env_id: str, steps: int, seed: int = 0) -> float:
    env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def training_speed(script: str, env_id: str, steps: int) -> dict[str, float]:
    """Run `script` (a script's name, then any flags) for `steps` steps in a temporary folder; its SPS and
    seconds per rollout and update."""
    name, *flags = shlex.split(script)
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, os.path.join(ROOT, f"{name}.py"), "--env-id", env_id, "--total-timesteps", str(steps), *flags]
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise SystemExit(f"error: {script} stopped with exit code {result.returncode}: {reason(result.stderr)}")
        scalars = read_scalars(glob.glob(os.path.join(folder, "runs", "*"))[0])
    if len(scalars["charts/SPS"]) < 2:
        raise SystemExit(f"error: {script} ran one iteration in --steps {steps}; the steady speed needs two or more")
    (first_step, first_sps), (last_step, last_sps) = scalars["charts/SPS"][0], scalars["charts/SPS"][-1]
    updates = [v for _, v in scalars["perf/update_time"]]
    return {
        "sps": (last_step - first_step) / (last_step / last_sps - first_step / first_sps),  # the run starts at step 0
        "rollout_time": float(np.median([v for _, v in scalars["perf/rollout_time"]])),
        "update_time": float(np.median(updates)),
        "compile_time": updates[0] - float(np.median(updates)),
    }


def main(args: Args) -> None:
    """Each script's SPS next to the mean of env-only measurements taken just before and just after it."""
    if args.steps < 1:
        raise SystemExit("error: --steps must be at least 1")
    for script in args.scripts:
        name = (shlex.split(script) or [""])[0]
        if not os.path.exists(os.path.join(ROOT, f"{name}.py")):
            raise SystemExit(f"error: no training script '{name}' (one of {', '.join(SCRIPTS)}, then any flags)")
    try:
        gym.make(args.env_id).close()
    except Exception as e:
        raise SystemExit(
            f"error: cannot make environment '{args.env_id}': {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    print(f"{args.env_id}, {args.steps} steps per measurement\n")
    print("| script | SPS | env-only steps/s | % of env-only | rollout s/iter | update s/iter | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    before = env_only_sps(args.env_id, args.steps)
    for script in args.scripts:
        speed = training_speed(script, args.env_id, args.steps)
        after = env_only_sps(args.env_id, args.steps)
        reference, before = (before + after) / 2, after
        print(
            f"| {script} | {speed['sps']:,.0f} | {reference:,.0f} | {100 * speed['sps'] / reference:.1f} | "
            f"{speed['rollout_time']:.3f} | {speed['update_time']:.3f} | {speed['compile_time']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    with one_line_errors():
        main(tyro.cli(Args))
