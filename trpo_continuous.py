"""Trust Region Policy Optimization (TRPO), single path and vine, for continuous control (Gymnasium 1.x, MuJoCo), in one file.

Schulman, Levine, Moritz, Jordan, Abbeel (2015), "Trust Region Policy Optimization", arXiv:1502.05477.
Equation and section numbers in the comments refer to that paper. Each iteration solves problem (15): maximise the
importance-sampled surrogate E[pi_theta(a|s) / pi_old(a|s) A] subject to the mean KL(pi_old || pi_theta)
<= delta, by conjugate gradient on Fisher-vector products and a backtracking line search (Section 6,
Appendix C). The value function is a separate MLP fitted by Adam. Defaults are those of OpenAI
Baselines' trpo_mpi on MuJoCo; observations and rewards are normalized as in the other two scripts.
Two ablations of Section 8.1 are flags: the empirical Fisher matrix, and the natural policy gradient
with a fixed step size instead of the KL constraint.

    python trpo_continuous.py --env-id Hopper-v5 --seed 1
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import hashlib
import importlib.util
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Literal

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro
from gymnasium.envs.mujoco import MujocoEnv
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.optim.adam import adam as functional_adam
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of the experiment (environments, torch, numpy, random)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, the update runs on the GPU when one is available"""
    track: bool = False
    """if toggled, send the run to Weights & Biases (its TensorBoard scalars as they are written, the arguments as config)"""
    wandb_project_name: str = "onpolicy-continuous"
    """the W&B project of --track"""
    wandb_entity: str | None = None
    """the W&B entity (team or user) of --track; none: the default of the logged-in account"""
    compile: bool = True
    """if toggled, the value function's step runs compiled by torch.compile (CUDA graphs on a GPU); eager if it cannot"""
    capture_video: bool = False
    """whether to record videos of the first environment to `runs/{run_name}/videos`"""
    save_model: bool = False
    """whether to save the final checkpoint to `runs/{run_name}/{exp_name}.pt` and evaluate it (10 episodes)"""
    checkpoint_interval: int = 0
    """also write that checkpoint every this many iterations (0: only at the end, with --save-model)"""
    resume: str | None = None
    """resume this checkpoint's run in its folder, with its saved arguments (but --total-timesteps, --cuda, --compile)"""

    env_id: str = "HalfCheetah-v5"
    """the id of the environment (any Gymnasium environment with Box observations and Box actions)"""
    env_kwargs: tuple[str, ...] = ()
    """`gym.make` keyword arguments KEY=VALUE, VALUE a Python literal or a string (`include_cfrc_ext_in_observation=False`)"""
    total_timesteps: int | None = None
    """total environment steps (default: 1,000,000); with --resume, a new total for the run (default: its own)"""
    vf_learning_rate: Annotated[float, tyro.conf.arg(aliases=("--learning-rate",))] = 1e-3
    """the learning rate of the value function's Adam (the policy's step is set by --max-kl)"""
    num_envs: int = 1
    """the number of parallel environments"""
    num_steps: int = 1024
    """the number of steps to run in each environment per policy rollout"""
    async_envs: bool = False
    """if toggled, step the environments in subprocesses (`AsyncVectorEnv`); useful with `--num-envs` > 1"""
    anneal_lr: bool = False
    """if toggled, the value function's learning rate decays linearly to 0 over the run"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.98
    """the lambda of generalized advantage estimation"""
    num_minibatches: int = 16
    """the number of minibatches per epoch of the value function's fit"""
    vf_iters: int = 5
    """the number of epochs of the value function's fit over each batch"""
    norm_adv: Literal["batch", "none"] = "batch"
    """where the advantages are standardized: the whole batch (Baselines' TRPO), or nowhere"""
    init_log_std: float = 0.0
    """the initial log standard deviation of the Gaussian policy, the same in every action dimension (0: sigma = 1)"""
    ent_coef: float = 0.0
    """coefficient of the entropy bonus in the surrogate"""
    max_kl: float = 0.01
    """the trust region delta: the bound on the mean KL(pi_old || pi_theta) of problem (13)"""
    cg_iters: int = 10
    """the number of conjugate gradient iterations"""
    cg_damping: float = 0.1
    """damping added to the Fisher matrix: (A + damping I) s = g"""
    line_search_steps: int = 10
    """the number of backtracking steps (each halves the step) before the update is rejected"""
    fisher: Literal["analytic", "empirical"] = "analytic"
    """the Fisher matrix: Hessian of the mean KL (TRPO) or covariance of the score gradients (Section 8.1 ablation)"""
    step_rule: Literal["constraint", "penalty"] = "constraint"
    """KL-constrained step with line search (TRPO), or a fixed-size natural gradient step (Section 8.1 ablation)"""
    npg_step_size: float = 0.1
    """the fixed step size lambda of `--step-rule penalty`: theta += lambda A^-1 g"""
    kl_constraint: Literal["mean", "max"] = "mean"
    """the line search bounds the mean KL over the batch's states (TRPO) or its maximum (Section 8.1's max KL)"""
    sampling: Literal["single-path", "vine"] = "single-path"
    """how the surrogate is estimated (Section 5): single path, or vine (branch rollouts; MuJoCo environments)"""
    vine_states: int = 32
    """vine: N, the size of the rollout set, states drawn at random from each iteration's trunk (--num-steps)"""
    vine_actions: int = 4
    """vine: K, the actions a ~ pi_old tried at each rollout-set state, each followed by a branch rollout"""
    vine_horizon: int = 100
    """vine: H, the length of a branch rollout; a branch still running after H steps is bootstrapped with V"""


# ---------------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------------
def make_envs(
    env_id: str, num_envs: int, async_envs: bool = False, video_dir: str | None = None, env_kwargs: dict | None = None
) -> gym.vector.VectorEnv:
    """A vector of `num_envs` environments that reset in the same step as an episode ends.

    With `AutoresetMode.SAME_STEP` every action is applied to the environment: the step that ends an
    episode returns the next episode's first observation and puts the last one in `info["final_obs"]`.
    `RecordEpisodeStatistics` reports the raw (unnormalized) return of each finished episode.
    `env_kwargs` go to every `gym.make`.
    """
    env_kwargs = env_kwargs or {}

    def make_env(idx: int):
        def thunk():
            if video_dir is not None and idx == 0:
                os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering
                return gym.wrappers.RecordVideo(gym.make(env_id, render_mode="rgb_array", **env_kwargs), video_dir)
            return gym.make(env_id, **env_kwargs)

        return thunk

    vector_env = gym.vector.AsyncVectorEnv if async_envs else gym.vector.SyncVectorEnv
    # copy=False: the rollout normalizes each observation into a new array before the next step.
    envs = vector_env([make_env(i) for i in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, copy=False)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


# ---------------------------------------------------------------------------------------------------
# Observation and reward normalization (Baselines' VecNormalize)
# ---------------------------------------------------------------------------------------------------
class RunningMeanStd:
    """Mean and variance of a stream of batches (the parallel algorithm of Chan et al., as in Baselines)."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        batch_count = x.shape[0]
        batch_mean = x.sum(axis=0) / batch_count  # x.mean(axis=0), bit for bit, without np.mean's Python wrapper
        mean_difference = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + mean_difference * (batch_count / total)
        m2 = (
            self.var * self.count
            + np.square(x - batch_mean).sum(axis=0)
            + np.square(mean_difference) * (self.count * batch_count / total)
        )
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "mean": torch.as_tensor(self.mean),
            "var": torch.as_tensor(self.var),
            "count": torch.tensor(self.count, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mean, self.var, self.count = state["mean"].numpy(), state["var"].numpy(), state["count"].item()


class Normalizer:
    """Observations: running mean/std, clipped to ±clip. Rewards: divided by the running std of the
    discounted return, clipped to ±clip. The statistics are part of the agent: they are saved with the
    model and applied frozen (`update=False`) at evaluation."""

    def __init__(self, obs_dim: int, num_envs: int, gamma: float, clip: float = 10.0, epsilon: float = 1e-8):
        self.obs_rms = RunningMeanStd((obs_dim,))
        self.ret_rms = RunningMeanStd(())
        self.discounted_return = np.zeros(num_envs)
        self.gamma, self.clip, self.epsilon = gamma, clip, epsilon

    def obs(self, obs: np.ndarray, update: bool = True) -> np.ndarray:
        if update:
            self.obs_rms.update(obs)
        normalized = (obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + self.epsilon)
        return np.minimum(np.maximum(normalized, -self.clip), self.clip).astype(np.float32)  # clip, but faster

    def reward(self, reward: np.ndarray, done: np.ndarray | None, update: bool = True) -> np.ndarray:
        if update:
            self.discounted_return = self.discounted_return * self.gamma + reward
            self.ret_rms.update(self.discounted_return)
            self.discounted_return[done] = 0.0
        scaled = reward / np.sqrt(self.ret_rms.var + self.epsilon)
        return np.minimum(np.maximum(scaled, -self.clip), self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        """The statistics as tensors, so that a checkpoint loads with `torch.load(weights_only=True)`."""
        return {
            "obs_rms": self.obs_rms.state_dict(),
            "ret_rms": self.ret_rms.state_dict(),
            "discounted_return": torch.as_tensor(self.discounted_return),
            "clip": self.clip,
            "epsilon": self.epsilon,
        }

    def load_state_dict(self, state: dict) -> None:
        self.obs_rms.load_state_dict(state["obs_rms"])
        self.ret_rms.load_state_dict(state["ret_rms"])
        self.discounted_return = state["discounted_return"].numpy().copy()


# ---------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------
def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(in_dim: int, out_dim: int, out_std: float, hidden: int = 64) -> nn.Sequential:
    """A 2 x `hidden` tanh MLP; the output layer is initialised with gain `out_std`."""
    # One layer per line (the formatter would split each pair).
    return nn.Sequential(
        layer_init(nn.Linear(in_dim, hidden)), nn.Tanh(),
        layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
        layer_init(nn.Linear(hidden, out_dim), std=out_std),
    )  # fmt: skip


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """sum_i log N(a_i | mean_i, exp(log_std_i)^2)."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class Agent(nn.Module):
    """Separate policy (actor) and value (critic) MLPs; Gaussian policy with a state-independent log-std."""

    def __init__(self, obs_dim: int, act_dim: int, init_log_std: float = 0.0):
        super().__init__()
        self.critic = mlp(obs_dim, 1, out_std=1.0)
        self.actor_mean = mlp(obs_dim, act_dim, out_std=0.01)
        self.actor_logstd = nn.Parameter(torch.full((act_dim,), init_log_std))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) = sum_i log N(a_i | mu_i(s), sigma_i^2)."""
        return gaussian_log_prob(self.actor_mean(obs), self.actor_logstd, actions)

    def policy_parameters(self) -> list[nn.Parameter]:
        """theta: the parameters of pi, in the order of the flat vectors of the natural gradient step."""
        return [*self.actor_mean.parameters(), self.actor_logstd]

    def entropy(self) -> torch.Tensor:
        """Entropy of the Gaussian policy: sum_i (log sigma_i + 0.5 log(2 pi e)), the same in every state."""
        return (self.actor_logstd + 0.5 * math.log(2 * math.pi * math.e)).sum()


def numpy_actor(agent: Agent) -> Callable[[np.ndarray], np.ndarray]:
    """The actor's mean mu(s) as a numpy function of a batch of observations, for the rollout.

    The weights do not change during a rollout, and one call of a 64-unit MLP costs ~5x less in numpy
    than in eager PyTorch, so the rollout runs on the CPU whatever the update's device.
    """
    (w1, b1), (w2, b2), (w3, b3) = [
        (layer.weight.detach().cpu().numpy().T, layer.bias.detach().cpu().numpy())
        for layer in agent.actor_mean
        if isinstance(layer, nn.Linear)
    ]
    return lambda obs: np.tanh(np.tanh(obs @ w1 + b1) @ w2 + b2) @ w3 + b3


# ---------------------------------------------------------------------------------------------------
# Rollout
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(
    envs: gym.vector.VectorEnv,
    agent: Agent,
    normalizer: Normalizer,
    obs: np.ndarray,
    num_steps: int,
    save_states_at: list[tuple[int, int]] = (),
) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[int, float, int]], list]:
    """Run the policy for `num_steps` steps in every environment; for vine, save the simulator state of environment i
    before step t for each (t, i) of `save_states_at` (the rollout set; `--num-envs` environments of a SyncVectorEnv).

    Returns the transitions as (num_steps, num_envs, ...) arrays, the normalized observation to
    continue from, and the finished episodes as (step index, raw return, length). `next_obs[t]` is the
    normalized successor of `obs[t]`: the episode's final observation when it ended at t, so that a
    truncated episode can be bootstrapped from V(final observation). Last, the saved states, in the order of
    `save_states_at`.
    """
    num_envs, act_dim = envs.num_envs, envs.single_action_space.shape[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high
    batch = {
        "obs": np.zeros((num_steps, num_envs, obs.shape[1]), np.float32),
        "next_obs": np.zeros((num_steps, num_envs, obs.shape[1]), np.float32),
        "actions": np.zeros((num_steps, num_envs, act_dim), np.float32),
        "rewards": np.zeros((num_steps, num_envs), np.float32),
        "terminations": np.zeros((num_steps, num_envs), np.float32),
        "dones": np.zeros((num_steps, num_envs), np.float32),
    }
    episodes = []
    # The numpy side: CPU copies of the policy (its weights, sigma), and the noise from the CPU generator.
    actor_mean = numpy_actor(agent)
    sigma = agent.actor_logstd.detach().cpu().exp()
    noise = (sigma * torch.randn((num_steps, num_envs, act_dim))).numpy()  # sigma * eps
    saved, save_at = {}, {}  # save_at: step t -> the environments whose state is saved before it
    for t, i in save_states_at:
        save_at.setdefault(t, []).append(i)
    for t in range(num_steps):
        for i in save_at.get(t, ()):
            saved[t, i] = save_state(envs.unwrapped.envs[i])
        action = actor_mean(obs) + noise[t]  # a = mu(s) + sigma * eps ~ N(mu(s), sigma^2)
        # The environment gets the action clipped to its bounds; the batch keeps the sampled one.
        raw_obs, reward, terminated, truncated, info = envs.step(np.clip(action, low, high))
        done = terminated | truncated
        next_obs = normalizer.obs(raw_obs)
        batch["obs"][t], batch["actions"][t], batch["next_obs"][t] = obs, action, next_obs
        batch["rewards"][t] = normalizer.reward(reward, done)
        batch["terminations"][t], batch["dones"][t] = terminated, done
        if done.any():
            final = info["_final_obs"]
            batch["next_obs"][t, final] = normalizer.obs(np.stack(info["final_obs"][final]), update=False)
            ended = info["_episode"]
            episodes += [(t, r, n) for r, n in zip(info["episode"]["r"][ended], info["episode"]["l"][ended], strict=True)]
        obs = next_obs
    # A NaN or an infinity from the environment survives normalization (and spoils the statistics after it).
    finite = np.isfinite(batch["next_obs"]).all(axis=(1, 2)) & np.isfinite(batch["rewards"]).all(axis=1)
    if not finite.all():
        raise NumericalFault(
            f"the environment returned a non-finite observation or reward at rollout step {np.argmin(finite)}"
        )
    return batch, obs, episodes, [saved[key] for key in save_states_at]


# ---------------------------------------------------------------------------------------------------
# Vine (Section 5.2): branch rollouts from a rollout set, with common random numbers
# ---------------------------------------------------------------------------------------------------
def choose_rollout_set(num_steps: int, num_envs: int, num_states: int) -> list[tuple[int, int]]:
    """The rollout set: `num_states` (step, environment) pairs of the trunk's batch, drawn uniformly without replacement."""
    return [divmod(int(i), num_envs) for i in torch.randperm(num_steps * num_envs)[:num_states]]


def time_limit(env: gym.Env) -> gym.wrappers.TimeLimit | None:
    """The TimeLimit wrapper of `env`, if it has one."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            return env
        env = env.env
    return None


def save_state(env: gym.Env) -> tuple[mujoco.MjData, int | None]:
    """What a bit-exact replay of a MuJoCo environment needs: a copy of its whole MjData (positions, velocities,
    actuator activations, time, the solver's warm start, and the quantities derived from them, such as the body
    positions that the next reward reads) and the TimeLimit wrapper's step counter."""
    limit = time_limit(env)
    return copy.copy(env.unwrapped.data), limit._elapsed_steps if limit is not None else None  # MjData's copy is mj_copyData


def restore_state(env: gym.Env, state: tuple[mujoco.MjData, int | None]) -> None:
    """Put `env` (made with the same model) in a state of `save_state`."""
    env.unwrapped.data = copy.copy(state[0])  # a copy: the K branches of a state each change their own
    limit = time_limit(env)
    if limit is not None:
        limit._elapsed_steps = state[1]


@torch.no_grad()
def vine_rollouts(
    branch_envs: list[gym.Env],
    states: list,
    state_obs: np.ndarray,
    agent: Agent,
    normalizer: Normalizer,
    gamma: float,
    horizon: int,
) -> tuple[dict[str, np.ndarray], int]:
    """K branch rollouts from each of the N rollout-set states (`states`, their normalized observations
    `state_obs`), the N K branches stepped in lockstep, K = len(branch_envs) / N.

    Branch k of state n starts with its own action a_nk ~ pi_old(.|s_n), the paper's q = pi_old for continuous
    control; then it follows pi_old with the noise sequence of its state: the K branches of a state share it
    (common random numbers, Appendix H), so that their Q-value differences have low variance. A branch ends at
    a termination (no future value), at the time limit, or after `horizon` steps; the last two are
    bootstrapped with V of the last observation (see `make_vine_batch`). Observations and rewards are
    normalized with the trunk's statistics, frozen. Returns, with (N, K) leading dimensions, the actions a_nk,
    each branch's discounted sum of normalized rewards, its last observation and the discount of its
    bootstrap (gamma^steps, or 0 after a termination); and the number of simulator steps taken.
    """
    num_states, obs_dim = state_obs.shape
    num_actions = len(branch_envs) // num_states
    act_dim = branch_envs[0].action_space.shape[0]
    low, high = branch_envs[0].action_space.low, branch_envs[0].action_space.high
    for j, env in enumerate(branch_envs):
        restore_state(env, states[j // num_actions])
    # The numpy side: CPU copies of the policy, and the noise from the CPU generator.
    actor_mean = numpy_actor(agent)
    sigma = agent.actor_logstd.detach().cpu().exp()
    first = (sigma * torch.randn((num_states, num_actions, act_dim))).numpy()  # a_nk - mu(s_n), independent over k
    shared = (sigma * torch.randn((num_states, max(horizon - 1, 0), act_dim))).numpy()  # one sequence per state
    actions = actor_mean(state_obs)[:, None, :] + first  # a_nk ~ N(mu(s_n), sigma^2)
    noise = np.repeat(shared, num_actions, axis=0)  # branch j = n K + k follows the noise of state n

    num_branches = num_states * num_actions
    action = actions.reshape(num_branches, act_dim).copy()
    returns, discount = np.zeros(num_branches), np.ones(num_branches)
    last_obs, running, steps = np.zeros((num_branches, obs_dim), np.float32), np.ones(num_branches, bool), 0
    for t in range(horizon):
        live = np.flatnonzero(running)
        if not len(live):
            break
        results = [branch_envs[j].step(np.clip(action[j], low, high)) for j in live]
        steps += len(live)
        reward = np.array([r[1] for r in results])
        terminated, truncated = np.array([r[2] for r in results]), np.array([r[3] for r in results])
        returns[live] += discount[live] * normalizer.reward(reward, None, update=False)  # sum_t gamma^t r_t
        discount[live] *= gamma
        last_obs[live] = normalizer.obs(np.stack([r[0] for r in results]), update=False)
        discount[live[terminated]] = 0.0  # a termination has no future value
        running[live[terminated | truncated]] = False
        live = np.flatnonzero(running)
        if t + 1 < horizon and len(live):
            action[live] = actor_mean(last_obs[live]) + noise[live, t]  # a = mu(s) + the state's shared sigma * eps
    if not (np.isfinite(returns).all() and np.isfinite(last_obs).all()):
        raise NumericalFault("the environment returned a non-finite observation or reward in a branch rollout")
    shape = (num_states, num_actions)
    return {
        "obs": state_obs,
        "actions": actions.astype(np.float32),
        "returns": returns.reshape(shape).astype(np.float32),
        "bootstrap_obs": last_obs.reshape(*shape, obs_dim),
        "bootstrap_discount": discount.reshape(shape).astype(np.float32),
    }, steps


# ---------------------------------------------------------------------------------------------------
# Generalized advantage estimation
# ---------------------------------------------------------------------------------------------------
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminations: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) of Schulman et al. (2016) over (num_steps, num_envs) tensors.

    `next_values[t]` is V of the successor of step t (V(final observation) where the episode ended).
    A termination has no future value; a truncation keeps it. Any episode end stops the recursion.
    Returns the advantages and the value targets (advantages + values).
    """
    td_residuals = rewards + gamma * next_values * (1.0 - terminations) - values  # r_t + gamma V(s_t+1) - V(s_t)
    discounts = gamma * gae_lambda * (1.0 - dones)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        last = td_residuals[t] + discounts[t] * last  # A_t = (r_t + gamma V(s_t+1) - V(s_t)) + gamma lambda A_t+1
        advantages[t] = last
    return advantages, advantages + values


@torch.no_grad()
def make_batch(
    agent: Agent, rollout_batch: dict[str, np.ndarray], gamma: float, gae_lambda: float, device: torch.device
) -> dict[str, torch.Tensor]:
    """Values, log-probabilities of the rollout policy and GAE for a rollout, flattened over (step, env).
    The one place where the rollout's numpy arrays become tensors on `device`."""
    b = {k: torch.from_numpy(v).to(device) for k, v in rollout_batch.items()}
    values, next_values = agent.value(b["obs"]), agent.value(b["next_obs"])
    advantages, returns = compute_gae(b["rewards"], values, next_values, b["terminations"], b["dones"], gamma, gae_lambda)
    batch = {
        "obs": b["obs"],
        "actions": b["actions"],
        "logprobs": agent.log_prob(b["obs"], b["actions"]),
        "values": values,
        "advantages": advantages,
        "returns": returns,
    }
    return {k: v.flatten(0, 1) for k, v in batch.items()}


@torch.no_grad()
def make_vine_batch(agent: Agent, branches: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The vine's samples on `device`, from `vine_rollouts`' branches: the rollout set's states (N, obs), actions
    (N, K, act), their log-probabilities under pi_old and Q(s_n, a_nk) = the branch's discounted return
    + gamma^steps V(s_last), the bootstrap being 0 after a termination."""
    b = {k: torch.from_numpy(v).to(device) for k, v in branches.items()}
    q_values = b["returns"] + b["bootstrap_discount"] * agent.value(b["bootstrap_obs"])
    obs_k = b["obs"][:, None, :].expand(-1, b["actions"].shape[1], -1)
    return {"obs": b["obs"], "actions": b["actions"], "logprobs": agent.log_prob(obs_k, b["actions"]), "q_values": q_values}


# ---------------------------------------------------------------------------------------------------
# TRPO update: natural gradient by conjugate gradient, line search on the KL constraint
# ---------------------------------------------------------------------------------------------------
def gaussian_kl(mean_old: torch.Tensor, log_std_old: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_old, sigma_old^2) || N(mean, sigma^2)) per state, summed over action dimensions."""
    var_old, var = (2 * log_std_old).exp(), (2 * log_std).exp()
    return (log_std - log_std_old + (var_old + (mean_old - mean) ** 2) / (2 * var) - 0.5).sum(-1)


def analytic_fvp(kl: torch.Tensor, params: list[nn.Parameter], damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (A + damping I) v, A the Hessian of the mean KL at theta_old (Section 6, Appendix C), by double
    backprop: A v = grad((grad KL) . v). No matrix is formed."""
    grad_kl = torch.cat([g.flatten() for g in torch.autograd.grad(kl, params, create_graph=True)])

    def fvp(v: torch.Tensor) -> torch.Tensor:
        hessian_v = torch.autograd.grad(grad_kl @ v, params, retain_graph=True)
        return torch.cat([h.flatten() for h in hessian_v]) + damping * v

    return fvp


def score_matrix(agent: Agent, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """G[n] = grad_theta log pi_theta(a_n | s_n), one row per sample, in the order of `policy_parameters`."""
    names = [name for name, _ in agent.actor_mean.named_parameters()]

    def log_prob(mean_params: dict, log_std: torch.Tensor, o: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(functional_call(agent.actor_mean, mean_params, (o,)), log_std, a)

    mean_params = {name: p.detach() for name, p in agent.actor_mean.named_parameters()}
    per_sample = vmap(grad(log_prob, argnums=(0, 1)), in_dims=(None, None, 0, 0))
    mean_grads, log_std_grads = per_sample(mean_params, agent.actor_logstd.detach(), obs, actions)
    return torch.cat([mean_grads[name].flatten(1) for name in names] + [log_std_grads], dim=1)


def empirical_fvp(scores: torch.Tensor, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (F + damping I) v, F = (1/N) G^T G the covariance of the score gradients (Section 6's alternative)."""
    return lambda v: scores.T @ (scores @ v) / scores.shape[0] + damping * v


def conjugate_gradient(
    avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int, residual_tol: float = 1e-10
) -> tuple[torch.Tensor, float]:
    """Approximately solve A x = b for symmetric positive-definite A given only v -> A v (Appendix C).
    Returns x and the norm of the residual r = b - A x that the iteration maintains."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        ap = avp(p)
        alpha = rr / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        rr_new = r @ r
        if rr_new < residual_tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, r.norm().item()


@torch.no_grad()
def line_search(
    params: list[nn.Parameter],
    full_step: torch.Tensor,
    surrogate: Callable[[], torch.Tensor],
    kl: Callable[[], torch.Tensor],
    max_kl: float,
    steps: int,
) -> tuple[int, float, float]:
    """Backtracking line search (Appendix C): try theta_old + 0.5^k full_step for k = 0, 1, ... and keep the
    first step that improves the surrogate with a measured KL (`kl`: the mean, or the max over states) <= max_kl
    (the bound itself, no tolerance). If none does, theta_old is restored. Returns (k or -1, its KL, its surrogate
    improvement)."""
    theta_old = parameters_to_vector(params).clone()
    surrogate_old = surrogate().item()
    for k in range(steps):
        vector_to_parameters(theta_old + 0.5**k * full_step, params)
        improvement, step_kl = surrogate().item() - surrogate_old, kl().item()
        if step_kl <= max_kl and improvement > 0:  # False for NaN, too
            return k, step_kl, improvement
    vector_to_parameters(theta_old, params)
    return -1, 0.0, 0.0


def value_loss(new_values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """0.5 (V - R)^2, R the GAE(lambda) return."""
    return 0.5 * ((new_values - returns) ** 2).mean()


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance."""
    return (x - x.mean()) / (x.std() + 1e-8)


@torch.no_grad()
def ratio_stats(agent: Agent, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The probability ratio pi_theta / pi_old over the whole batch, and the approximate KL(pi_old || pi_theta)."""
    logratio = agent.log_prob(batch["obs"], batch["actions"]) - batch["logprobs"]
    ratio = logratio.exp()
    return {"ratio/max": ratio.max(), "ratio/min": ratio.min(), "losses/approx_kl": ((ratio - 1) - logratio).mean()}


def vine_surrogate(logratio: torch.Tensor, q_values: torch.Tensor) -> torch.Tensor:
    """Eq. (17) averaged over the rollout set: (1/N) sum_n [sum_k w_nk Q_nk / sum_k w_nk], w_nk = pi_theta(a_nk|s_n) /
    pi_old(a_nk|s_n), from (N, K) log-ratios and Q-values. The self-normalized weights w_nk / sum_k w_nk are a
    softmax over k of the log-ratios: adding a constant to the Q-values of a state leaves the gradient unchanged."""
    return (torch.softmax(logratio, dim=1) * q_values).sum(1).mean()


def adam_state(optimizer: torch.optim.Adam) -> dict:
    """The parameters, state tensors and hyper-parameters of a one-group `torch.optim.Adam`, its state created as its
    first `step()` would create it. `adam_step` updates these tensors in place, so `optimizer.state_dict()` saves them."""
    group = optimizer.param_groups[0]
    for p in group["params"]:
        if not optimizer.state[p]:
            optimizer.state[p] = {
                "step": torch.zeros((), device=p.device),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
    states = [optimizer.state[p] for p in group["params"]]
    return {
        "params": group["params"],
        "exp_avgs": [st["exp_avg"] for st in states],
        "exp_avg_sqs": [st["exp_avg_sq"] for st in states],
        "state_steps": [st["step"] for st in states],
        "beta1": group["betas"][0],
        "beta2": group["betas"][1],
        "eps": group["eps"],
    }


def adam_step(adam: dict, grads: list[torch.Tensor], lr: float | torch.Tensor) -> None:
    """Adam (Kingma and Ba, 2015) on `adam`'s parameters and state, in place: PyTorch's own, the functional form that
    `torch.optim.Adam.step` runs; its fused kernel eagerly, its single-tensor form (which inductor fuses) when compiled."""
    with torch.no_grad():
        functional_adam(
            adam["params"],
            grads,
            adam["exp_avgs"],
            adam["exp_avg_sqs"],
            [],
            adam["state_steps"],
            foreach=False,
            fused=not torch.compiler.is_compiling(),
            amsgrad=False,
            beta1=adam["beta1"],
            beta2=adam["beta2"],
            lr=lr,
            weight_decay=0.0,
            eps=adam["eps"],
            maximize=False,
        )


def minibatch_step(
    agent: Agent, adam: dict, mb: dict[str, torch.Tensor], lr: float | torch.Tensor, args: Args
) -> torch.Tensor:
    """One gradient step of the value function on a minibatch, in place: the value loss, its gradient and Adam. The eager
    and the compiled update both run this function. Returns the value loss."""
    v_loss = value_loss(agent.value(mb["obs"]), mb["returns"])
    adam_step(adam, list(torch.autograd.grad(v_loss, adam["params"])), lr)
    return v_loss.detach()


def update(
    agent: Agent,
    optimizer: torch.optim.Adam,
    batch: dict[str, torch.Tensor],
    args: Args,
    vine_batch: dict[str, torch.Tensor] | None = None,
    step: Callable = minibatch_step,
) -> dict[str, float]:
    """One natural-gradient step on the policy under the KL constraint, then `vf_iters` epochs of minibatch
    Adam on the value function (on the trunk's batch); returns the iteration's statistics. The policy step
    uses the batch's states and advantages (single path) or, given `vine_batch`, the rollout set's states and
    Q-values (vine): the surrogate, the KL constraint and the Fisher matrix are then all over the rollout set."""
    params = agent.policy_parameters()
    if vine_batch is None:  # single path
        obs, actions, logprobs = batch["obs"], batch["actions"], batch["logprobs"]
        advantages = standardize(batch["advantages"]) if args.norm_adv == "batch" else batch["advantages"]

        def surrogate() -> torch.Tensor:  # E[pi_theta(a|s) / pi_old(a|s) A], eq. (15) with q = pi_old (Section 5.1)
            ratio = (agent.log_prob(obs, actions) - logprobs).exp()
            return (ratio * advantages).mean() + args.ent_coef * agent.entropy()

        samples = {"obs": obs, "actions": actions, "logprobs": logprobs}
    else:  # vine
        obs = vine_batch["obs"]
        obs_k = obs[:, None, :].expand(-1, vine_batch["actions"].shape[1], -1)

        def surrogate() -> torch.Tensor:  # eq. (17) at each rollout-set state, averaged over the rollout set
            logratio = agent.log_prob(obs_k, vine_batch["actions"]) - vine_batch["logprobs"]
            return vine_surrogate(logratio, vine_batch["q_values"]) + args.ent_coef * agent.entropy()

        samples = {
            "obs": obs_k.flatten(0, 1),
            "actions": vine_batch["actions"].flatten(0, 1),
            "logprobs": vine_batch["logprobs"].flatten(),
        }
    with torch.no_grad():
        mean_old, log_std_old = agent.actor_mean(obs), agent.actor_logstd.clone()
        trunk_mean_old = agent.actor_mean(batch["obs"]) if vine_batch is not None else None

    def kl() -> torch.Tensor:  # KL(pi_old(.|s) || pi_theta(.|s)) at each state s of the constraint
        return gaussian_kl(mean_old, log_std_old, agent.actor_mean(obs), agent.actor_logstd)

    def mean_kl() -> torch.Tensor:  # the constraint of eq. (15): E_s[KL(pi_old(.|s) || pi_theta(.|s))]
        return kl().mean()

    def max_state_kl() -> torch.Tensor:  # the constraint of eq. (12): max_s KL, over the states of the batch
        return kl().max()

    g = torch.cat([p.flatten() for p in torch.autograd.grad(surrogate(), params)])
    if not g.any():  # a zero policy gradient (e.g. constant advantages, which standardize to 0): no direction to step in
        steps, step_kl, improvement, cg_residual, step_norm = -1, 0.0, 0.0, 0.0, 0.0  # keep theta_old, as Baselines does
    else:
        if args.fisher == "analytic":
            fvp = analytic_fvp(mean_kl(), params, args.cg_damping)
        else:
            fvp = empirical_fvp(score_matrix(agent, samples["obs"], samples["actions"]), args.cg_damping)
        step_dir, cg_residual = conjugate_gradient(fvp, g, args.cg_iters)  # s ~ A^-1 g
        if args.step_rule == "constraint":
            beta = torch.sqrt(2 * args.max_kl / (step_dir @ fvp(step_dir)))  # the largest step with 1/2 s^T A s = delta
            full_step = beta * step_dir
            constraint = mean_kl if args.kl_constraint == "mean" else max_state_kl  # max: the same direction, a stricter test
            steps, step_kl, improvement = line_search(
                params, full_step, surrogate, constraint, args.max_kl, args.line_search_steps
            )
            step_norm = 0.5**steps * full_step.norm().item() if steps >= 0 else 0.0
        else:  # natural policy gradient with a fixed step size: no line search, no KL constraint
            with torch.no_grad():
                surrogate_old = surrogate().item()
                vector_to_parameters(parameters_to_vector(params) + args.npg_step_size * step_dir, params)
                steps, step_kl, improvement = 0, mean_kl().item(), surrogate().item() - surrogate_old
            step_norm = args.npg_step_size * step_dir.norm().item()

    batch_size = batch["obs"].shape[0]
    adam, lr = adam_state(optimizer), optimizer.param_groups[0]["lr"]
    v_losses = []
    for _ in range(args.vf_iters):  # the value function's fit (`step`: `minibatch_step`, or it compiled)
        for indices in torch.randperm(batch_size, device=batch["obs"].device).split(batch_size // args.num_minibatches):
            v_losses.append(step(agent, adam, {"obs": batch["obs"][indices], "returns": batch["returns"][indices]}, lr, args))

    with torch.no_grad():
        policy_loss, largest_kl = -surrogate().item(), max_state_kl().item()
    stats = {
        "losses/policy_loss": policy_loss,
        "losses/value_loss": torch.stack(v_losses).mean().item(),
        "losses/entropy": agent.entropy().item(),
        "losses/grad_norm": g.norm().item(),
        "trpo/kl": step_kl,
        "trpo/max_kl": largest_kl,
        "trpo/surrogate_improvement": improvement,
        "trpo/line_search_steps": steps,
        "trpo/cg_residual": cg_residual,
        "trpo/step_norm": step_norm,
    }
    stats["trpo/zero_gradient"] = float(not g.any())
    if vine_batch is not None:  # the constraint bounds the KL over the rollout set's N states; this is the KL over the trunk's
        with torch.no_grad():
            stats["trpo/trunk_kl"] = (
                gaussian_kl(trunk_mean_old, log_std_old, agent.actor_mean(batch["obs"]), agent.actor_logstd).mean().item()
            )
    return stats | {k: v.item() for k, v in ratio_stats(agent, samples).items()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect value function, 0 no better than a constant."""
    var_returns = returns.var()
    return float("nan") if var_returns == 0 else (1 - (returns - values).var() / var_returns).item()


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def train(args: Args) -> dict[str, float]:
    """Train TRPO, or continue the run of the checkpoint `args.resume`. Returns the final global step,
    the mean raw return of the last 10 episodes, and the signal that stopped the run early (0: none)."""
    args, checkpoint, run_dir = start_run(args)
    env_kwargs, obs_dim, act_dim = check_run(args)
    writer, tracking = start_logging(args, run_dir, checkpoint)
    device = seed_and_device(args)

    video_dir = os.path.join(run_dir, "videos") if args.capture_video else None
    envs = make_envs(args.env_id, args.num_envs, args.async_envs, video_dir, env_kwargs)
    vine = args.sampling == "vine"
    # Vine: one environment per branch (N K of them), its state restored from the trunk's before it steps.
    branch_envs = [gym.make(args.env_id, **env_kwargs) for _ in range(args.vine_states * args.vine_actions)] if vine else []
    for env in branch_envs:
        env.reset(seed=args.seed)
    agent = Agent(obs_dim, act_dim, args.init_log_std).to(device)
    optimizer = torch.optim.Adam(agent.critic.parameters(), lr=args.vf_learning_rate)  # the value function's
    normalizer = Normalizer(obs_dim, args.num_envs, args.gamma)
    global_step, start_iteration = restore(checkpoint, agent, optimizer, normalizer, device) if checkpoint else (0, 1)
    train_step = compiled(minibatch_step, device) if args.compile else minibatch_step
    # On resume the statistics already hold the observation the run would have continued from: not counted twice.
    obs = normalizer.obs(envs.reset(seed=args.seed + (start_iteration - 1) * args.num_envs)[0], update=checkpoint is None)

    batch_size = args.num_envs * args.num_steps
    # An iteration runs the trunk (single path: the whole batch) and, with vine, up to N K H branch steps; every
    # simulator step counts. Iterations go on while one more surely fits in --total-timesteps.
    iteration_steps = batch_size + (args.vine_states * args.vine_actions * args.vine_horizon if vine else 0)
    budget = args.total_timesteps if vine else args.total_timesteps // batch_size * batch_size  # the steps that may be run
    checkpoint_path = os.path.join(run_dir, f"{args.exp_name}.pt")
    # What a numerical fault leaves on disk: the last state that passed the checks, kept at the end of each iteration.
    last_good = checkpoint_state(agent, optimizer, normalizer, args, global_step, start_iteration - 1, device)
    recent_returns, stopped_by, start_step, start_time = deque(maxlen=10), 0, global_step, time.perf_counter()
    progress = tqdm(initial=global_step, total=budget, unit="step", unit_scale=True, mininterval=1.0)
    iteration = start_iteration - 1
    with stop_requests() as stop_requested:
        try:
            while global_step + iteration_steps <= args.total_timesteps:
                iteration += 1
                lr = args.vf_learning_rate * (1.0 - global_step / budget) if args.anneal_lr else args.vf_learning_rate
                optimizer.param_groups[0]["lr"] = lr

                rollout_start, iteration_start_step = time.perf_counter(), global_step
                # Vine: the rollout set, whose states the trunk's rollout saves as it passes them.
                rollout_set = choose_rollout_set(args.num_steps, args.num_envs, args.vine_states) if vine else []
                rollout_batch, obs, episodes, set_states = rollout(envs, agent, normalizer, obs, args.num_steps, rollout_set)
                recent_returns += log_episodes(writer, episodes, global_step, args.num_envs)
                global_step += batch_size
                if vine:  # K branches from each state of the rollout set
                    set_obs = np.stack([rollout_batch["obs"][t, i] for t, i in rollout_set])
                    branches, branch_steps = vine_rollouts(
                        branch_envs, set_states, set_obs, agent, normalizer, args.gamma, args.vine_horizon
                    )
                    global_step += branch_steps

                update_start = time.perf_counter()
                batch = make_batch(agent, rollout_batch, args.gamma, args.gae_lambda, device)
                vine_batch = make_vine_batch(agent, branches, device) if vine else None
                stats = update(agent, optimizer, batch, args, vine_batch, train_step)
                if vine:
                    stats |= {"trpo/branch_steps": branch_steps, "trpo/q_spread": vine_batch["q_values"].std(1).mean().item()}
                update_end = time.perf_counter()
                check_finite(training_quantities(agent, normalizer, batch, stats), "after the update")

                stats |= {
                    "charts/SPS": int((global_step - start_step) / (update_end - start_time)),
                    "charts/learning_rate": lr,
                    "losses/explained_variance": explained_variance(batch["values"], batch["returns"]),
                    "perf/rollout_time": update_start - rollout_start,
                    "perf/update_time": update_end - update_start,
                }
                log_iteration(writer, progress, stats, global_step, global_step - iteration_start_step, recent_returns)

                stopped_by = stop_requested()
                last_good = checkpoint_state(agent, optimizer, normalizer, args, global_step, iteration, device)
                if save_due(args, iteration, stopped_by):
                    save_checkpoint(checkpoint_path, last_good)
                if stopped_by:
                    break
        except NumericalFault as fault:
            raise stop_at_fault(fault, args, checkpoint_path, last_good, [progress, writer, envs, *branch_envs]) from None
    return finish(
        args, checkpoint_path, last_good, stopped_by, recent_returns, writer, tracking, [progress, envs, *branch_envs]
    )


# ---------------------------------------------------------------------------------------------------
# Plumbing: argument and environment checks, checkpoints, stop signals, the final evaluation
# ---------------------------------------------------------------------------------------------------
class ArgsError(ValueError):
    """A bad command line or environment; reported as one line with exit code 2."""


class NumericalFault(RuntimeError):
    """A NaN or an infinity in training or from an environment; training stops (exit code 3)."""


def check_finite(values: dict[str, torch.Tensor | float], where: str) -> None:
    """Raise NumericalFault naming the first of `values` that holds a NaN or an infinity."""
    for name, value in values.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise NumericalFault(f"{name} is not finite {where}")


def start_run(args: Args) -> tuple[Args, dict | None, str]:
    """A new run: its arguments, no checkpoint and a new run directory. With `--resume`, the run of that checkpoint:
    the arguments it was started with (a new --total-timesteps makes it longer or shorter; --cuda and --compile are
    the machine's, not the run's), the checkpoint and its run directory."""
    if not args.resume:
        args = replace(args, total_timesteps=1_000_000 if args.total_timesteps is None else args.total_timesteps)
        env_name = args.env_id.replace("/", "-")  # a namespaced id ("ns/Env-v0") must not nest the folder
        return args, None, os.path.join("runs", f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}")
    checkpoint = load_checkpoint(args.resume)
    taken = ("resume", "total_timesteps", "cuda", "compile")
    ignored = [f"--{k.replace('_', '-')}" for k, v in asdict(args).items() if k not in taken and v != getattr(Args(), k)]
    if ignored:
        print(f"note: a resumed run keeps the arguments it was started with; ignoring {' '.join(ignored)}", file=sys.stderr)
    total_timesteps = checkpoint["args"]["total_timesteps"] if args.total_timesteps is None else args.total_timesteps
    if total_timesteps < checkpoint["global_step"]:
        raise ArgsError(
            f"--total-timesteps {total_timesteps} is fewer than the checkpoint's {checkpoint['global_step']} steps"
        )
    saved = checkpoint["args"]
    if isinstance(saved["norm_adv"], bool):  # a checkpoint of the boolean --norm-adv: on was the whole batch
        saved = saved | {"norm_adv": "batch" if saved["norm_adv"] else "none"}
    taken_values = {"resume": args.resume, "total_timesteps": total_timesteps, "cuda": args.cuda, "compile": args.compile}
    return Args(**(saved | taken_values)), checkpoint, os.path.dirname(os.path.abspath(args.resume))


def check_run(args: Args) -> tuple[dict, int, int]:
    """Every check that could otherwise fail in the middle of the run, before anything is written: the arguments, the
    environment and the batch's memory. Returns the keyword arguments of `gym.make` and the observation and action sizes."""
    check_args(args)
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    obs_dim, act_dim = check_env(args.env_id, env_kwargs, restorable=args.sampling == "vine")
    check_memory(args.num_envs * args.num_steps, obs_dim, act_dim)
    return env_kwargs, obs_dim, act_dim


def start_logging(args: Args, run_dir: str, checkpoint: dict | None) -> tuple[SummaryWriter, object | None]:
    """The run directory (refused if it cannot be written), its TensorBoard writer (on resume, what was logged after the
    checkpoint is dropped) and the W&B run of `--track` (None without)."""
    check_writable(run_dir)
    tracking = start_tracking(args, run_dir) if args.track else None
    writer = SummaryWriter(run_dir, purge_step=checkpoint["global_step"] + 1 if checkpoint else None)
    if checkpoint is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    return writer, tracking


def seed_and_device(args: Args) -> torch.device:
    """Seed Python's, numpy's and torch's generators; the device of the update (the GPU with --cuda, if there is one)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and device.type == "cpu":
        print("note: no GPU is available; training on the CPU", file=sys.stderr)
    return device


def restore(
    checkpoint: dict, agent: Agent, optimizer: torch.optim.Optimizer, normalizer: Normalizer, device: torch.device
) -> tuple[int, int]:
    """Load a checkpoint's agent, optimizer, normalizer and random generators; returns its global step and the iteration
    to continue with."""
    agent.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    normalizer.load_state_dict(checkpoint["normalizer"])
    torch.set_rng_state(checkpoint["rng"])
    if device.type == "cuda" and checkpoint["cuda_rng"]:  # the generator of the GPU that wrote it, if one did
        torch.cuda.set_rng_state(checkpoint["cuda_rng"][0], device)
    # Gymnasium cannot save an environment's state in general: a resumed run starts new episodes.
    normalizer.discounted_return[:] = 0.0
    return checkpoint["global_step"], checkpoint["iteration"] + 1


def log_episodes(writer: SummaryWriter, episodes: list[tuple[int, float, int]], global_step: int, num_envs: int) -> list:
    """Log the raw return and length of each episode that ended in the rollout (at step t of the rollout, which began
    after `global_step`) and return the returns."""
    for t, episodic_return, episodic_length in episodes:
        step = global_step + (t + 1) * num_envs
        writer.add_scalar("charts/episodic_return", episodic_return, step)
        writer.add_scalar("charts/episodic_length", episodic_length, step)
    return [episodic_return for _, episodic_return, _ in episodes]


def training_quantities(agent: Agent, normalizer: Normalizer, batch: dict, stats: dict) -> dict:
    """What must stay finite for training to go on: the batch's observations, the losses, the parameters and the running
    statistics (named for `check_finite`'s message)."""
    return (
        {"the normalized observation": batch["obs"]}
        | {k: v for k, v in stats.items() if k.startswith("losses/")}
        | {f"the parameter {name}": p for name, p in agent.named_parameters()}
        | {"the running observation mean or variance": np.concatenate([normalizer.obs_rms.mean, normalizer.obs_rms.var])}
        | {"the running return variance": normalizer.ret_rms.var}
    )


def log_iteration(
    writer: SummaryWriter, progress: tqdm, stats: dict, global_step: int, steps: int, recent_returns: deque
) -> None:
    """Write the iteration's statistics to TensorBoard and move the progress bar by the iteration's `steps`."""
    for tag, value in stats.items():
        writer.add_scalar(tag, value, global_step)
    progress.set_postfix(SPS=stats["charts/SPS"], ret=f"{mean_return(recent_returns):.1f}", refresh=False)
    progress.update(steps)


def mean_return(recent_returns: deque) -> float:
    """The mean raw return of the last episodes (NaN before the first ends): the progress bar's and `train`'s summary."""
    return float(np.mean(recent_returns)) if recent_returns else float("nan")


def keeps_checkpoints(args: Args) -> bool:
    """Whether the run writes checkpoints: with --save-model, or every --checkpoint-interval iterations."""
    return args.save_model or args.checkpoint_interval > 0


def save_due(args: Args, iteration: int, stopped_by: int) -> bool:
    """Whether the checkpoint is written at the end of this iteration: every --checkpoint-interval, and when stopped."""
    interval_due = args.checkpoint_interval > 0 and iteration % args.checkpoint_interval == 0
    return keeps_checkpoints(args) and (stopped_by != 0 or interval_due)


def stop_at_fault(fault: NumericalFault, args: Args, checkpoint_path: str, last_good: dict, closing: list) -> NumericalFault:
    """After a numerical fault: close `closing`, write the last good state (if the run keeps checkpoints) and return the
    fault's one-line message, naming the iteration and the checkpoint kept."""
    for resource in closing:
        resource.close()
    kept = ""
    if keeps_checkpoints(args):
        save_checkpoint(checkpoint_path, last_good)
        kept = f"; the checkpoint of step {last_good['global_step']} is kept in {checkpoint_path}"
    return NumericalFault(f"{args.env_id}, iteration {last_good['iteration'] + 1}: {fault}{kept}")


def finish(
    args: Args,
    checkpoint_path: str,
    final: dict,
    stopped_by: int,
    recent_returns: deque,
    writer: SummaryWriter,
    tracking,
    closing: list,
) -> dict[str, float]:
    """End the run: close `closing`; unless it was stopped by a signal, write the final checkpoint `final` and evaluate
    it (--save-model); close the logs. Returns `train`'s summary."""
    for resource in closing:
        resource.close()
    if stopped_by:
        resume = f"; continue with --resume {checkpoint_path}" if keeps_checkpoints(args) else ""
        print(f"stopped by {signal.Signals(stopped_by).name} at step {final['global_step']}{resume}", file=sys.stderr)
    elif keeps_checkpoints(args):
        save_checkpoint(checkpoint_path, final)
        if args.save_model:
            evaluate_checkpoint(checkpoint_path, writer, final["global_step"])
    writer.close()
    if tracking is not None:
        tracking.finish()
    return {"global_step": final["global_step"], "mean_return": mean_return(recent_returns), "stopped_by": stopped_by}


def check_args(args: Args) -> None:
    """Reject arguments the algorithm cannot run with, before anything is built. Every bound is written so that
    NaN fails it (`not 0 < x < inf` is True for NaN), and `< inf` refuses infinities."""
    inf = math.inf
    batch_size = args.num_envs * args.num_steps
    # Environment i of iteration k is seeded with seed + k num_envs + i.
    max_seed = 2**32 - args.num_envs * (args.total_timesteps // max(batch_size, 1))
    checks = [
        (
            "/" in args.exp_name or "__" in args.exp_name or args.exp_name.strip(".") == "",
            "--exp-name must be a plain name, without '/' or '__' (it names the run directory and the checkpoint)",
        ),
        (args.track and importlib.util.find_spec("wandb") is None, "--track needs the wandb package: pip install wandb"),
        (args.num_envs < 1 or args.num_steps < 1, "--num-envs and --num-steps must be positive"),
        (
            args.total_timesteps < batch_size,
            f"--total-timesteps {args.total_timesteps} is smaller than one batch ({batch_size} steps)",
        ),
        (
            max_seed < 0,
            f"--total-timesteps {args.total_timesteps} is too many: the environments' seeds (seed + k num_envs + i in "
            "iteration k) must stay below 2^32",
        ),
        (not 0 <= args.seed <= max_seed, f"--seed must be between 0 and {max_seed}"),
        (
            args.num_minibatches < 1 or batch_size % args.num_minibatches != 0,
            f"--num-minibatches {args.num_minibatches} does not divide the batch of {batch_size} steps",
        ),
        (not 0 <= args.gamma <= 1 or not 0 <= args.gae_lambda <= 1, "--gamma and --gae-lambda must be in [0, 1]"),
        (args.checkpoint_interval < 0, "--checkpoint-interval must be 0 or positive"),
        (not 0 <= args.ent_coef < inf, "--ent-coef must be 0 or positive, and finite"),
        (not -inf < args.init_log_std < inf, "--init-log-std must be finite"),
        (not 0 < args.vf_learning_rate < inf, "--vf-learning-rate must be positive and finite"),
        (
            not (1 <= args.vf_iters <= 1000 and 1 <= args.cg_iters <= 1000 and 1 <= args.line_search_steps <= 60),
            "--vf-iters and --cg-iters must be between 1 and 1000, --line-search-steps between 1 and 60 (0.5^60 ~ 1e-18)",
        ),
        (
            args.norm_adv != "none" and batch_size < 2,
            f"--norm-adv {args.norm_adv} cannot standardize the advantages of one sample (--num-envs, --num-steps)",
        ),
        (
            not 0 < args.max_kl < inf or not 0 < args.npg_step_size < inf,
            "--max-kl and --npg-step-size must be positive and finite",
        ),
        (not 0 <= args.cg_damping < inf, "--cg-damping must be 0 or positive, and finite"),
        (
            args.sampling == "vine" and not 1 <= args.vine_states <= batch_size,
            f"--vine-states must be between 1 and the trunk's {batch_size} steps (--num-envs x --num-steps)",
        ),
        (
            args.sampling == "vine" and (args.vine_actions < 2 or args.vine_horizon < 1),
            "--vine-actions must be at least 2 (eq. (17) compares the actions of a state) and --vine-horizon at least 1",
        ),
        (
            args.sampling == "vine" and args.async_envs,
            "--sampling vine saves the trunk's states, which --async-envs keeps in subprocesses",
        ),
        (
            args.sampling == "vine"
            and args.total_timesteps < batch_size + args.vine_states * args.vine_actions * args.vine_horizon,
            f"--total-timesteps {args.total_timesteps} is smaller than one vine iteration ({batch_size} trunk + "
            f"{args.vine_states * args.vine_actions * args.vine_horizon} branch steps)",
        ),
    ]
    for failed, message in checks:
        if failed:
            raise ArgsError(message)


def parse_env_kwargs(items: tuple[str, ...]) -> dict:
    """`("include_cfrc_ext_in_observation=False", ...)` -> keyword arguments of `gym.make`, or ArgsError."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ArgsError(f"--env-kwargs takes KEY=VALUE, not '{item}'")
        if key == "render_mode":  # the scripts' own: rgb_array with --capture-video, else none (human needs a display)
            raise ArgsError(
                "--env-kwargs cannot set render_mode: the script sets it (--capture-video records rgb_array frames)"
            )
        try:
            kwargs[key] = ast.literal_eval(value)  # False, 0.5, (0.2, 1.0), ...
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a string
    return kwargs


def check_env(env_id: str, env_kwargs: dict, restorable: bool = False) -> tuple[int, int]:
    """Return (observation size, action size) of a Box-in, Box-out environment (whose state can be saved and
    restored, if `restorable`), or raise ArgsError."""
    try:
        env = gym.make(env_id, **env_kwargs)
    except (gym.error.NameNotFound, gym.error.NamespaceNotFound, gym.error.VersionNotFound):
        close = difflib.get_close_matches(env_id, gym.registry.keys(), n=3)
        raise ArgsError(
            f"unknown environment id '{env_id}'" + (f"; did you mean {', '.join(close)}?" if close else "")
        ) from None
    except Exception as e:  # a missing dependency, a bad entry point, ...
        raise ArgsError(
            f"cannot make environment '{env_id}': {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    obs_space, act_space, base = env.observation_space, env.action_space, env.unwrapped
    try:
        env.reset(seed=0)  # an environment that builds but cannot reset is refused here, not in the middle of a run
    except Exception as e:
        raise ArgsError(
            f"cannot reset environment '{env_id}': {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    finally:
        env.close()
    if restorable and not isinstance(base, MujocoEnv):
        raise ArgsError(
            "--sampling vine restores the simulator's state, which this script can do for MuJoCo environments only; "
            f"{env_id} is not one"
        )
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        raise ArgsError(f"{env_id} has action space {act_space}; this script needs a 1-D Box (continuous actions)")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise ArgsError(f"{env_id} has observation space {obs_space}; this script needs a 1-D Box")
    return obs_space.shape[0], act_space.shape[0]


def checkpoint_state(
    agent: Agent,
    optimizer: torch.optim.Optimizer,
    normalizer: Normalizer,
    args: Args,
    global_step: int,
    iteration: int,
    device: torch.device,
) -> dict:
    """Everything needed to evaluate the policy or to continue the run, copied (of the random generators, the CPU's and
    that of the GPU the run uses, if it uses one)."""
    return cloned(
        {
            "algo": "trpo_continuous",
            "args": asdict(args),
            "env_kwargs": parse_env_kwargs(args.env_kwargs),  # for utils.evaluate
            "global_step": global_step,
            "iteration": iteration,
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "normalizer": normalizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        }
    )


def cloned(state):
    """A copy of `state` (dicts and lists of tensors and other values) with its tensors cloned: `copy.deepcopy` of a
    tensor is far slower (70 ms for a checkpoint of Humanoid's networks, against 0.1 ms)."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: cloned(v) for k, v in state.items()}
    if isinstance(state, list):
        return [cloned(v) for v in state]
    return copy.deepcopy(state)


def start_tracking(args: Args, run_dir: str):
    """Send the run to Weights & Biases (`--track`), as CleanRL does: `sync_tensorboard` forwards every TensorBoard
    scalar unchanged, the arguments are the run's config. The W&B run id is derived from the run directory's name, so
    that a resumed run continues the same W&B run (`resume="allow"`). Returns the W&B run."""
    import wandb  # only with --track: the script runs without wandb installed

    name = os.path.basename(os.path.normpath(run_dir))
    return wandb.init(
        project=args.wandb_project_name,
        entity=args.wandb_entity,
        name=name,
        id=hashlib.sha1(name.encode()).hexdigest()[:16],
        resume="allow",
        config=asdict(args),
        sync_tensorboard=True,
        monitor_gym=args.capture_video,
        save_code=True,
    )


def check_memory(batch_size: int, obs_dim: int, act_dim: int) -> None:
    """Refuse a batch that cannot fit in this machine's memory, before anything is built (ArgsError). Per step the
    rollout keeps 2 observations, an action and 3 scalars in float32, and the batch holds about two more copies of them
    as tensors (on the update's device, flattened and indexed)."""
    needed = 3 * 4 * batch_size * (2 * obs_dim + act_dim + 3)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ArgsError(
            f"a batch of {batch_size:,} steps needs about {needed / 2**30:,.0f} GiB; "
            f"this machine has {available / 2**30:,.0f} GiB "
            "(--num-envs x --num-steps)"
        )


def check_writable(run_dir: str) -> None:
    """Make the run directory (or find the resumed one) and write a file in it, or raise ArgsError: a run that could not
    write its logs and checkpoint must fail before its first step, not after its last."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        raise ArgsError(f"cannot write to the run directory {run_dir}: {e.strerror or e}") from None


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write atomically (a temporary file, then a rename): a crash while writing leaves the previous checkpoint intact."""
    torch.save(checkpoint, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or ArgsError."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArgsError(f"no checkpoint at '{path}'") from None
    except Exception:
        raise ArgsError(f"'{path}' is not a checkpoint") from None
    keys = {"algo", "args", "global_step", "iteration", "model", "optimizer", "normalizer", "rng", "cuda_rng"}
    if not isinstance(checkpoint, dict) or not keys <= checkpoint.keys() or not isinstance(checkpoint["args"], dict):
        raise ArgsError(f"'{path}' is not a checkpoint")
    if checkpoint["algo"] != "trpo_continuous":
        raise ArgsError(f"'{path}' is a checkpoint of {checkpoint['algo']}.py, not of trpo_continuous.py")
    return checkpoint


@contextlib.contextmanager
def stop_requests():
    """While active, SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop at the end of the current
    iteration, so that the last checkpoint is a consistent state; a second Ctrl-C stops at once.
    Yields a function that returns the signal received (0: none)."""
    received = []

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield lambda: 0
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0] if received else 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def compiled(step: Callable, device: torch.device) -> Callable:
    """`step` compiled whole by torch.compile at its first call (`fullgraph`: the loss, autograd, clipping and Adam in one
    graph; CUDA graphs on a GPU), with the learning rate passed as a tensor so that its annealing does not recompile.
    Where compilation fails (no C++ compiler, an unsupported platform, a compiler error), a one-line note and `step` itself."""
    torch._dynamo.config.trace_autograd_ops = True  # the one private switch: trace torch.autograd.grad into the graph
    # No shape asserts in the generated code (the shapes never change; -17 % per step on the CPU); CUDA graphs on a GPU.
    fast = torch.compile(step, fullgraph=True, options={"size_asserts": False, "triton.cudagraphs": device.type == "cuda"})
    calls = {"first": True, "eager": False}

    def run(agent: Agent, adam: dict, mb: dict[str, torch.Tensor], lr: float, args: Args) -> torch.Tensor:
        if calls["eager"]:
            return step(agent, adam, mb, lr, args)
        if calls["first"] and device.type == "cuda":  # CUDA graphs may update the optimizer's state in place
            for tensor in adam["exp_avgs"] + adam["exp_avg_sqs"] + adam["state_steps"]:
                torch._dynamo.mark_static_address(tensor)
        try:
            # The clone: a CUDA graph's next replay overwrites its output.
            return fast(agent, adam, mb, torch.tensor(lr, device=device), args).clone()
        except Exception as e:
            if not calls["first"]:
                raise
            calls["eager"] = True
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            print(f"note: torch.compile failed ({reason}); the update runs eagerly, as with --no-compile", file=sys.stderr)
            return step(agent, adam, mb, lr, args)
        finally:
            calls["first"] = False

    return run


def old_spellings(argv: list[str]) -> list[str]:
    """The boolean --norm-adv's spellings (CleanRL's), kept as aliases: `--norm-adv` alone is `--norm-adv batch`,
    `--no-norm-adv` is `--norm-adv none`."""
    spelled = []
    for i, arg in enumerate(argv):
        if arg == "--no-norm-adv":
            spelled += ["--norm-adv", "none"]
        elif arg == "--norm-adv" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            spelled += ["--norm-adv", "batch"]
        else:
            spelled.append(arg)
    return spelled


def evaluate_checkpoint(path: str, writer: SummaryWriter, global_step: int) -> None:
    """Run `utils.evaluate` on the final checkpoint and log `eval/episodic_return`, when utils/ is here. The 10 returns
    are logged at the steps after the run's last, so that resuming the run (to extend it, or with nothing left to train)
    drops them with everything else logged after its checkpoint, and the log keeps one evaluation."""
    try:
        from utils.evaluate import evaluate
    except ImportError:
        print("utils/ is not next to this script: the final evaluation is skipped", file=sys.stderr)
        return
    for i, episodic_return in enumerate(evaluate(path, episodes=10)):
        writer.add_scalar("eval/episodic_return", episodic_return, global_step + 1 + i)


if __name__ == "__main__":
    try:
        summary = train(tyro.cli(Args, args=old_spellings(sys.argv[1:])))
    except ArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NumericalFault as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    sys.exit(128 + summary["stopped_by"] if summary["stopped_by"] else 0)
