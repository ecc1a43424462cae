"""Training speed next to environment-only speed, measured in the same sitting.

    python -m utils.speed --env-id HalfCheetah-v5 --steps 40960
    python -m utils.speed --env-id Hopper-v5 --scripts trpo_continuous "trpo_continuous --sampling vine"

Each script runs as its own process (its defaults, any flags given, one torch thread). Its SPS is the steady speed after
the first iteration (whose update holds the compilation), from `charts/SPS`; rollout and update seconds are medians of
`perf/rollout_time` and `perf/update_time`, "compile s" the first update's time less the median. Env-only: one environment
stepped with `action_space.sample()` just before and just after each script (the mean is the reference).
"""

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
SCRIPTS = tuple(s for s in ("ppo_continuous", "trefree_continuous", "trpo_continuous") if os.path.exists(f"{ROOT}/{s}.py"))


@dataclass
class Args:
    env_id: str = "HalfCheetah-v5"  # the environment to measure
    steps: int = 40960  # environment steps per measurement (a whole number of the scripts' batches)
    scripts: tuple[str, ...] = (
        SCRIPTS  # the training scripts to measure, each maybe with flags (`"trpo_continuous --sampling vine"`)
    )


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


def training_speed(script: str, env_id: str, steps: int) -> tuple[float, float, float, float]:
    """Run `script` (its name, then any flags) for `steps` steps in a temporary folder: its SPS, seconds per rollout and
    per update, and the first update's extra seconds (compilation)."""
    name, *flags = shlex.split(script)
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, os.path.join(ROOT, f"{name}.py"), "--env-id", env_id, "--total-timesteps", str(steps), *flags]
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise SystemExit(f"error: {script} stopped with exit code {result.returncode}: {reason(result.stderr)}")
        scalars = {tag: np.array(values) for tag, values in read_scalars(glob.glob(f"{folder}/runs/*")[0]).items()}
    if len(scalars["charts/SPS"]) < 2:
        raise SystemExit(f"error: {script} ran one iteration in --steps {steps}; the steady speed needs two or more")
    (first_step, first_sps), (last_step, last_sps) = scalars["charts/SPS"][[0, -1]]  # SPS at a step: step / seconds
    sps = (last_step - first_step) / (last_step / last_sps - first_step / first_sps)  # iterations 2..n
    rollout, update = np.median(scalars["perf/rollout_time"][:, 1]), np.median(updates := scalars["perf/update_time"][:, 1])
    return float(sps), float(rollout), float(update), float(updates[0] - update)


def main(args: Args) -> None:
    """Each script's SPS next to the mean of env-only measurements taken just before and just after it."""
    for name in (shlex.split(script)[0] if script.strip() else "" for script in args.scripts):
        if not os.path.exists(os.path.join(ROOT, f"{name}.py")):
            raise SystemExit(f"error: no training script '{name}' (one of {', '.join(SCRIPTS)}, then any flags)")
    try:
        before = env_only_sps(args.env_id, args.steps)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make environment '{args.env_id}': {str(e).splitlines()[0]}") from None
    print(f"{args.env_id}, {args.steps} steps per measurement\n")
    print("| script | SPS | env-only steps/s | % of env-only | rollout s/iter | update s/iter | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for script in args.scripts:
        sps, rollout, update, compile_time = training_speed(script, args.env_id, args.steps)
        after = env_only_sps(args.env_id, args.steps)
        reference, before = (before + after) / 2, after
        row = f"| {script} | {sps:,.0f} | {reference:,.0f} | {100 * sps / reference:.1f} | {rollout:.3f} | {update:.3f} |"
        print(f"{row} {compile_time:.1f} |", flush=True)


if __name__ == "__main__":
    with one_line_errors():
        main(tyro.cli(Args))
