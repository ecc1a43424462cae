"""The returns of a uniformly random policy: the zero of the ten seeds' normalized scores (README, "Random returns").

    python -m utils.results.ten_seeds.random_returns --env-id Hopper-v5 [--episodes 10] [--csv random_returns.csv]

Actions drawn uniformly within the action bounds (the action space seeded with --seed), episodes reset with seeds seed,
seed + 1, ...; prints each episode's raw return and their mean and standard deviation. `--csv` also appends each
episode's return to a CSV file (env_id, policy, episode, return), checked before the first episode.
"""

import os
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pandas as pd
import tyro

from utils.evaluate import run_episodes
from utils.logs import one_line_errors

CSV_COLUMNS = ["env_id", "policy", "episode", "return"]


@dataclass
class Args:
    env_id: str
    """the environment"""
    episodes: int = 10
    """the number of episodes"""
    seed: int = 0
    """seed of the episodes and of the action space"""
    csv: str | None = None
    """also append each episode's return to this CSV file (env_id, policy, episode, return)"""


def random_policy_returns(env_id: str, episodes: int = 10, seed: int = 0) -> list[float]:
    """The raw returns of `episodes` episodes of uniformly random actions within the bounds."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    return run_episodes(env, lambda _: env.action_space.sample(), episodes, seed)


def main(args: Args) -> None:
    if args.episodes < 1:
        raise SystemExit("error: --episodes must be at least 1")
    new = args.csv and (not os.path.exists(args.csv) or os.path.getsize(args.csv) == 0)
    if args.csv:  # refused before the episodes: a folder that cannot be written in, or a file of other columns
        if not os.path.isdir(folder := os.path.dirname(os.path.abspath(args.csv))) or not os.access(folder, os.W_OK):
            raise SystemExit(f"error: --csv {args.csv}: cannot write in {folder}")
        if os.path.exists(args.csv) and not os.path.isfile(args.csv):
            raise SystemExit(f"error: --csv {args.csv} is not a file")
        if not new and (columns := list(pd.read_csv(args.csv, nrows=0).columns)) != CSV_COLUMNS:
            raise SystemExit(f"error: --csv {args.csv} has the columns {','.join(columns)}, not {','.join(CSV_COLUMNS)}")
    try:
        returns = random_policy_returns(args.env_id, args.episodes, args.seed)
    except gym.error.Error as e:
        raise SystemExit(f"error: cannot make environment '{args.env_id}': {e}") from None
    if args.csv:
        rows = pd.DataFrame([[args.env_id, "random", i, r] for i, r in enumerate(returns)], columns=CSV_COLUMNS)
        rows.to_csv(args.csv, mode="a", header=new, index=False, float_format="%.6g", lineterminator="\r\n")
    for episode, episodic_return in enumerate(returns):
        print(f"episode {episode}: return {episodic_return:.1f}")
    print(f"mean return over {len(returns)} episodes: {np.mean(returns):.1f} ± {np.std(returns):.1f}")


if __name__ == "__main__":
    with one_line_errors():
        main(tyro.cli(Args))
