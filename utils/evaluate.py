"""Evaluate a saved policy.

    python -m utils.evaluate runs/<run>/<exp_name>.pt [--episodes 10] [--env-id ...] [--capture-video] [--stochastic]
    python -m utils.evaluate --random-policy --env-id Hopper-v5 [--episodes 10] [--csv random.csv]

The policy is rebuilt by the script that wrote the checkpoint (its `algo`, next to `utils/`): that script's `Agent`
with the saved weights and its `Normalizer` with the saved statistics, applied frozen, so each algorithm has one
actor. It acts with the mean action (`--stochastic` samples from the Gaussian instead) and prints each episode's
raw return and their mean and standard deviation. `--random-policy` evaluates a uniformly random policy instead
(actions drawn uniformly within the action bounds, the action space seeded with --seed): the reference for
normalized scores. `--csv` also appends each episode's return to a CSV file (env_id, policy, episode, return).
"""

from __future__ import annotations

import csv
import importlib
import os
import sys
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the training scripts are


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str | None] = None
    """a checkpoint written by a training script (`runs/<run>/<exp_name>.pt`); none with --random-policy"""
    episodes: int = 10
    """the number of evaluation episodes"""
    env_id: str | None = None
    """the environment (default: the one the policy was trained on; its `--env-kwargs` apply in either case)"""
    capture_video: bool = False
    """record every episode to `videos_eval/` next to the checkpoint (headless: MUJOCO_GL=egl)"""
    stochastic: bool = False
    """sample actions from the policy instead of taking its mean"""
    seed: int = 0
    """seed of the evaluation episodes"""
    random_policy: bool = False
    """evaluate a uniformly random policy on --env-id instead of a checkpoint"""
    csv: str | None = None
    """also append each episode's return to this CSV file (env_id, policy, episode, return)"""


def load_checkpoint(path: str) -> dict:
    """The checkpoint at `path`, or ValueError with a one-line reason."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at '{path}'") from None
    except Exception:
        raise ValueError(f"'{path}' is not a checkpoint") from None
    if not isinstance(checkpoint, dict) or not {"algo", "args", "model", "normalizer"} <= checkpoint.keys():
        raise ValueError(f"'{path}' is not a checkpoint")
    return checkpoint


def load_policy(checkpoint: dict) -> tuple:
    """The checkpoint's `Agent` and `Normalizer`, of the script that wrote it (imported from next to `utils/`)."""
    if ROOT not in sys.path:
        sys.path.append(ROOT)
    try:
        script = importlib.import_module(checkpoint["algo"])
    except ImportError:
        raise ValueError(f"the checkpoint was written by {checkpoint['algo']}.py, which is not next to utils/") from None
    state = checkpoint["normalizer"]
    obs_dim, act_dim = state["obs_rms"]["mean"].shape[0], checkpoint["model"]["actor_logstd"].shape[0]
    agent, normalizer = script.Agent(obs_dim, act_dim), script.Normalizer(obs_dim, 1, 0.99, state["clip"], state["epsilon"])
    agent.load_state_dict(checkpoint["model"])
    normalizer.load_state_dict(state)
    return agent, normalizer


def evaluate(
    path: str,
    episodes: int = 10,
    env_id: str | None = None,
    capture_video: bool = False,
    stochastic: bool = False,
    seed: int = 0,
) -> list[float]:
    """Run the checkpoint's policy for `episodes` episodes; returns their raw returns."""
    checkpoint = load_checkpoint(path)
    agent, normalizer = load_policy(checkpoint)
    obs_shape, sigma = normalizer.obs_rms.mean.shape, agent.actor_logstd.detach().exp().numpy()
    env_id = env_id or checkpoint["args"]["env_id"]
    env_kwargs = checkpoint.get("env_kwargs", {})  # the training environment's `gym.make` keyword arguments
    if capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering
        env = gym.make(env_id, render_mode="rgb_array", **env_kwargs)
        video_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "videos_eval")
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda _: True, name_prefix="eval")
    else:
        env = gym.make(env_id, **env_kwargs)
    if env.observation_space.shape != obs_shape:
        raise ValueError(f"{env_id} has observations of shape {env.observation_space.shape}; the policy takes {obs_shape}")
    rng = np.random.default_rng(seed) if stochastic else None
    low, high = env.action_space.low, env.action_space.high
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, episodic_return = False, 0.0
        while not done:
            with torch.no_grad():  # the mean action, with the training statistics frozen; or a sample of the policy
                action = agent.actor_mean(torch.from_numpy(normalizer.obs(obs[None], update=False))).numpy()[0]
            action = action if rng is None else action + sigma * rng.standard_normal(action.shape).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(np.clip(action, low, high))
            episodic_return += float(reward)
            done = terminated or truncated
        returns.append(episodic_return)
    env.close()
    return returns


def random_policy_returns(env_id: str, episodes: int = 10, seed: int = 0) -> list[float]:
    """The raw returns of `episodes` episodes (seeds seed, seed + 1, ...) of uniformly random actions within the bounds."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise ValueError(f"cannot make environment '{env_id}': {e}") from None
    env.action_space.seed(seed)
    returns = []
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        done, episodic_return = False, 0.0
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            episodic_return += float(reward)
            done = terminated or truncated
        returns.append(episodic_return)
    env.close()
    return returns


CSV_COLUMNS = ["env_id", "policy", "episode", "return"]


def check_csv(path: str) -> None:
    """Refuse a `--csv` that the returns could not be appended to after the episodes: a folder that is not there or
    cannot be written in, or a file with other columns."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--csv {path}: cannot write in {folder}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"--csv {path} is not a file")
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_COLUMNS:
            raise ValueError(f"--csv {path} has the columns {','.join(header)}, not {','.join(CSV_COLUMNS)}")


def main(args: Args) -> None:
    if args.episodes < 1:
        raise ValueError("--episodes must be at least 1")
    if args.random_policy != (args.checkpoint is None):
        raise ValueError("give a checkpoint, or --random-policy with --env-id, not both")
    if args.random_policy and args.env_id is None:
        raise ValueError("--random-policy needs --env-id")
    if args.csv:
        check_csv(args.csv)
    if args.random_policy:
        returns = random_policy_returns(args.env_id, args.episodes, args.seed)
    else:
        returns = evaluate(args.checkpoint, args.episodes, args.env_id, args.capture_video, args.stochastic, args.seed)
    if args.csv:
        new = not os.path.exists(args.csv) or os.path.getsize(args.csv) == 0
        with open(args.csv, "a", newline="") as f:
            rows = csv.writer(f)
            if new:
                rows.writerow(CSV_COLUMNS)
            policy = "random" if args.random_policy else args.checkpoint
            rows.writerows(
                [args.env_id or load_checkpoint(args.checkpoint)["args"]["env_id"], policy, i, f"{r:.6g}"]
                for i, r in enumerate(returns)
            )
    for episode, episodic_return in enumerate(returns):
        print(f"episode {episode}: return {episodic_return:.1f}")
    print(f"mean return over {len(returns)} episodes: {np.mean(returns):.1f} ± {np.std(returns):.1f}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (ValueError, TypeError, gym.error.Error) as e:  # TypeError: a keyword argument the environment does not take
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
