"""Evaluate a saved policy.

    python -m utils.evaluate runs/<run>/<exp_name>.pt [--episodes 10] [--env-id ...] [--capture-video] [--stochastic]
    MUJOCO_GL=egl python -m utils.evaluate utils/results/policies/Hopper-v5/trefree.pt --capture-video   # a trained policy

The script that wrote the checkpoint (its `algo`, next to `utils/`) validates it and rebuilds the policy: its `Agent`
with the saved weights and its `Normalizer` with the saved statistics, applied frozen, so each algorithm has one actor.
It acts with the mean action (`--stochastic`: a sample) and prints each episode's raw return, and their mean and std.
`--capture-video` renders the first episode headless (MuJoCo's `MUJOCO_GL=egl`, the default here; `osmesa` where EGL is
missing) into an mp4 in `--video-dir`, by default `videos/<env_id>__<checkpoint name>/` in the working directory.
"""

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np
import torch
import tyro

from utils.logs import one_line_errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the training scripts are
SCRIPTS = ("ppo_continuous", "trefree_continuous", "trpo_continuous")


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]  # a checkpoint written by a training script (`runs/<run>/<exp_name>.pt`)
    episodes: int = 10  # the number of evaluation episodes
    env_id: str | None = None  # the environment (default: the policy's own; its --env-kwargs apply in either case)
    capture_video: bool = False  # record the first episode as an mp4 in --video-dir (headless: MUJOCO_GL=egl, the default)
    video_dir: str | None = None  # the videos' folder (default: videos/<env_id>__<checkpoint name>/ in the working directory)
    stochastic: bool = False  # sample actions from the policy instead of taking its mean
    seed: int = 0  # seed of the evaluation episodes


def load_policy(path: str) -> tuple[dict, torch.nn.Module, object]:
    """The checkpoint at `path` as the script that wrote it validates and restores it (ValueError with one line if it is
    not one of its checkpoints): the checkpoint, that script's `Agent` and `Normalizer` with the saved state."""
    try:
        algo = torch.load(path, map_location="cpu", weights_only=True)["algo"]
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at '{path}'") from None
    except Exception:
        algo = None
    if algo not in SCRIPTS:
        raise ValueError(f"'{path}' is not a checkpoint")
    sys.path += [ROOT] if ROOT not in sys.path else []
    try:
        script = importlib.import_module(algo)
    except ImportError:
        raise ValueError(f"the checkpoint was written by {algo}.py, which is not next to utils/") from None
    checkpoint = script.load_checkpoint(path)  # validated (its ArgsError is a ValueError), then restored as train does
    obs_dim, act_dim = checkpoint["normalizer"]["obs_rms"]["mean"].shape[0], checkpoint["model"]["actor_logstd"].shape[0]
    cpu, args = torch.device("cpu"), script.Args(**checkpoint["args"])
    agent, _, normalizer = script.make_agent(args, obs_dim, act_dim, cpu, checkpoint, torch.Generator())
    return checkpoint, agent, normalizer


def run_episodes(env: gym.Env, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int) -> list[float]:
    """The raw returns of `episodes` episodes (reset with seeds seed, seed + 1, ...) of the policy `act`."""
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, episodic_return = False, 0.0
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            episodic_return += float(reward)
            done = terminated or truncated
        returns.append(episodic_return)
    env.close()
    return returns


def track(env: gym.Env) -> gym.Env:
    """Film a MuJoCo task with its model's camera `track`, which follows the body (each of the six tasks of the studies has
    one): Gymnasium's default camera stays where the episode starts, and a running body leaves the picture."""
    model = getattr(env.unwrapped, "model", None)
    if isinstance(model, mujoco.MjModel) and (camera := mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "track")) >= 0:
        env.unwrapped.mujoco_renderer.camera_id = camera
    return env


def video_folder(path: str, env_id: str, video_dir: str | None = None) -> str:
    """Where --capture-video writes: `video_dir`, or `videos/<env_id>__<checkpoint name>` in the working directory."""
    return video_dir or os.path.join("videos", f"{env_id.replace('/', '-')}__{os.path.splitext(os.path.basename(path))[0]}")


def make_policy(
    path: str, env_id: str | None = None, render: bool = False, stochastic: bool = False, seed: int = 0
) -> tuple[gym.Env, Callable[[np.ndarray], np.ndarray]]:
    """The checkpoint's environment (its --env-kwargs; with `render`, rgb_array frames from its tracking camera) and its
    policy as a function of a raw observation: the mean action with the training statistics frozen, or a sample."""
    checkpoint, agent, normalizer = load_policy(path)
    env_id, env_kwargs = env_id or checkpoint["args"]["env_id"], checkpoint.get("env_kwargs", {})  # the training env's
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering
    env = track(gym.make(env_id, **env_kwargs, **({"render_mode": "rgb_array"} if render else {})))
    if env.observation_space.shape != (shape := normalizer.obs_rms.mean.shape):
        raise ValueError(f"{env_id} has observations of shape {env.observation_space.shape}; the policy takes {shape}")
    rng, sigma = np.random.default_rng(seed) if stochastic else None, agent.actor_logstd.detach().exp().numpy()

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        action = agent.actor_mean(torch.from_numpy(normalizer.obs(obs[None], update=False))).numpy()[0]
        action = action if rng is None else action + sigma * rng.standard_normal(action.shape).astype(np.float32)
        return np.clip(action, env.action_space.low, env.action_space.high)

    return env, act


def evaluate(
    path: str,
    episodes: int = 10,
    env_id: str | None = None,
    capture_video: bool = False,
    stochastic: bool = False,
    seed: int = 0,
    video_dir: str | None = None,
) -> list[float]:
    """Run the checkpoint's policy for `episodes` episodes (the first recorded into `video_folder` with `capture_video`, which
    it names); returns their raw returns."""
    env, act = make_policy(path, env_id, capture_video, stochastic, seed)
    if capture_video:
        folder = video_folder(path, env.spec.id, video_dir)
        env = gym.wrappers.RecordVideo(env, folder, episode_trigger=lambda episode: episode == 0, name_prefix="eval")
        print(f"recording the first episode into {folder}/")
    return run_episodes(env, act, episodes, seed)


def main(args: Args) -> None:
    if args.episodes < 1:
        raise ValueError("--episodes must be at least 1")
    options = dict(capture_video=args.capture_video, stochastic=args.stochastic, seed=args.seed, video_dir=args.video_dir)
    returns = evaluate(args.checkpoint, args.episodes, args.env_id, **options)
    for episode, episodic_return in enumerate(returns):
        print(f"episode {episode}: return {episodic_return:.1f}")
    print(f"mean return over {len(returns)} episodes: {np.mean(returns):.1f} ± {np.std(returns):.1f}")


if __name__ == "__main__":
    with one_line_errors():
        if moved := next((arg for arg in sys.argv[1:] if arg in ("--random-policy", "--csv")), None):
            raise SystemExit(f"error: {moved} has moved beside its study: python -m utils.results.ten_seeds.random_returns")
        main(tyro.cli(Args))
