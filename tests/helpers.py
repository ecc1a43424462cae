"""Shared by the tests: a tiny deterministic environment and the run directory of a test."""

import glob
import os

import gymnasium as gym
import numpy as np


class CounterEnv(gym.Env):
    """Observation = number of steps taken in the episode. Odd-numbered episodes terminate at step 3;
    the others run until the TimeLimit of 5 steps truncates them. Reward 1 per step."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self.episode = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.n = self.episode + 1, 0
        return np.array([0.0]), {}

    def step(self, action):
        self.n += 1
        return np.array([float(self.n)]), 1.0, self.episode % 2 == 1 and self.n == 3, False, {}


COUNTER_ID = "tests/Counter-v0"
if COUNTER_ID not in gym.registry:
    gym.register(COUNTER_ID, entry_point=CounterEnv, max_episode_steps=5)


def only_run_dir(pattern: str = "runs/*") -> str:
    """The one run directory that matches `pattern`."""
    runs = glob.glob(pattern)
    assert len(runs) == 1, runs
    return runs[0]
