"""Shared by the tests: a tiny deterministic environment and the run directory of a test."""

import glob
import os
import signal

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

INTERRUPT = {"after_steps": None}  # AlignedEnv sends SIGINT to its own process once, after this many more steps


class AlignedEnv(gym.Env):
    """A deterministic point on a line that the action pushes (reward -x^2), whose episodes last exactly
    64 steps and start at 0 whatever the seed: with --num-steps 64 every episode ends at an iteration
    boundary, so a resumed run sees exactly what an uninterrupted one would."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.v = 0.0, 0.0
        return np.array([self.x, self.v]), {}

    def step(self, action):
        if INTERRUPT["after_steps"] is not None:
            INTERRUPT["after_steps"] -= 1
            if INTERRUPT["after_steps"] == 0:
                INTERRUPT["after_steps"] = None
                os.kill(os.getpid(), signal.SIGINT)
        self.v = 0.9 * self.v + 0.1 * float(action[0])
        self.x += self.v + 0.01
        return np.array([self.x, self.v]), -(self.x**2), False, False, {}


ALIGNED_ID = "tests/Aligned-v0"
if ALIGNED_ID not in gym.registry:
    gym.register(ALIGNED_ID, entry_point=AlignedEnv, max_episode_steps=64)


def only_run_dir(pattern: str = "runs/*") -> str:
    """The one run directory that matches `pattern`."""
    runs = glob.glob(pattern)
    assert len(runs) == 1, runs
    return runs[0]


class NaNAfter(gym.Wrapper):
    """InvertedPendulum whose observation becomes NaN at its 600th step."""

    def __init__(self):
        super().__init__(gym.make("InvertedPendulum-v5"))
        self.steps = 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        return (obs * np.nan if self.steps == 600 else obs), reward, terminated, truncated, info


class DictObservation(gym.Env):
    """Box actions, but a Dict observation space: not supported by the scripts."""

    observation_space = gym.spaces.Dict({"x": gym.spaces.Box(-1.0, 1.0, (2,))})
    action_space = gym.spaces.Box(-1.0, 1.0, (1,))


class BrokenReset(gym.Env):
    """Builds, but fails at its first reset: refused before any run directory is made."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.Box(-1.0, 1.0, (1,))

    def reset(self, *, seed=None, options=None):
        raise RuntimeError("the simulator failed to start")


for env_id, entry_point in [
    ("tests/NaNAfter-v0", NaNAfter),
    ("tests/DictObservation-v0", DictObservation),
    ("tests/BrokenReset-v0", BrokenReset),
]:
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=entry_point)
