"""Trust Region Policy Optimization (TRPO), single path and vine, for continuous control (Gymnasium 1.x, MuJoCo), in one file.

Schulman, Levine, Moritz, Jordan, Abbeel (2015), "Trust Region Policy Optimization", arXiv:1502.05477. Equation and
section numbers in the comments refer to that paper. Each iteration solves problem (15): maximise the importance-sampled
surrogate E[pi_theta(a|s) / pi_old(a|s) A] subject to the mean KL(pi_old || pi_theta) <= max_kl, by conjugate gradient
on Fisher-vector products and a backtracking line search (Section 6, Appendix C). The value function is a separate MLP
fitted by Adam. Defaults are those of OpenAI Baselines' trpo_mpi on MuJoCo; observations and rewards are normalized as
in the other two scripts. Two ablations of Section 8.1 are flags: the empirical Fisher matrix, and the natural policy
gradient with a fixed step size instead of the KL constraint.

    python trpo_continuous.py --env-id Hopper-v5 --seed 1
"""

import ast
import contextlib
import copy
import errno
import functools
import hashlib
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Annotated, Literal

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import typeguard
import tyro
from gymnasium.envs.mujoco import MujocoEnv
from torch import Tensor
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

try:
    import fcntl  # file locks (POSIX); none on Windows
except ImportError:
    fcntl = None


# Arguments ------------------------------------------------------------------------------------------------------------
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
    compile: Annotated[bool | None, tyro.conf.DisallowNone] = None
    """compile the value function's minibatch step (eager if it cannot); unset: only a run of 70,000 of them or more"""
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
    """the trust region: the bound on the mean KL(pi_old || pi_theta) of problem (13)"""
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


# Each numerical flag's interval (NaN lies in none): `check_run` refuses a value outside it before anything is built.
BOUNDS = {
    "[0, 4294967295]": ("seed",),
    "[1, inf)": ("num_envs", "num_steps", "num_minibatches", "vine_states", "vine_horizon"),
    "[0, inf)": ("checkpoint_interval", "ent_coef", "cg_damping"),
    "[1, 1000]": ("vf_iters", "cg_iters"),
    "[1, 60]": ("line_search_steps",),  # 0.5^60 ~ 1e-18
    "[2, inf)": ("vine_actions",),  # eq. (17) compares the actions of a state
    "[0, 1]": ("gamma", "gae_lambda"),
    "(0, inf)": ("vf_learning_rate", "max_kl", "npg_step_size"),
    "(-inf, inf)": ("init_log_std",),
}


# Environments ---------------------------------------------------------------------------------------------------------
def make_envs(
    env_id: str, num_envs: int, async_envs: bool = False, video_dir: str | None = None, env_kwargs: dict | None = None
) -> gym.vector.VectorEnv:
    """A vector of `num_envs` environments (`env_kwargs` go to every `gym.make`). With `AutoresetMode.SAME_STEP` every
    action is applied: the step that ends an episode returns the next episode's first observation and puts the last one
    in `info["final_obs"]`. `RecordEpisodeStatistics` reports the raw (unnormalized) return of each finished episode."""
    env_kwargs = env_kwargs or {}

    def make_env(idx: int) -> gym.Env:  # the first one records videos, with a `video_dir`
        for signum in (signal.SIGINT, signal.SIGTERM) if async_envs and multiprocessing.parent_process() else ():
            signal.signal(signum, signal.SIG_IGN)  # an async worker: Ctrl-C to the process group is the training process's
        if video_dir is None or idx > 0:
            return gym.make(env_id, **env_kwargs)
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering
        return gym.wrappers.RecordVideo(gym.make(env_id, render_mode="rgb_array", **env_kwargs), video_dir)

    vector_env = gym.vector.AsyncVectorEnv if async_envs else gym.vector.SyncVectorEnv
    thunks = [lambda idx=idx: make_env(idx) for idx in range(num_envs)]
    # copy=False: the rollout normalizes each observation into a new array before the next step.
    envs = vector_env(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, copy=False)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


# Observation and reward normalization (Baselines' VecNormalize) -------------------------------------------------------
class RunningMeanStd:
    """Mean and variance of a stream of batches (the parallel algorithm of Chan et al., as in Baselines)."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean, self.var, self.count = np.zeros(shape, np.float64), np.ones(shape, np.float64), 1e-4

    def update(self, x: np.ndarray) -> None:
        batch_count = x.shape[0]
        batch_mean = x.sum(axis=0) / batch_count  # x.mean(axis=0), bit for bit, without np.mean's Python wrapper
        shift, total = batch_mean - self.mean, self.count + batch_count
        self.mean = self.mean + shift * (batch_count / total)
        m2 = self.var * self.count + np.square(x - batch_mean).sum(axis=0)  # the sums of squared deviations, merged
        self.var = (m2 + np.square(shift) * (self.count * batch_count / total)) / total
        self.count = total

    def state_dict(self) -> dict[str, Tensor]:
        return {name: torch.as_tensor(np.asarray(getattr(self, name), np.float64)) for name in ("mean", "var", "count")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mean, self.var, self.count = state["mean"].numpy(), state["var"].numpy(), state["count"].item()


class Normalizer:
    """Observations: running mean/std, clipped to ±clip. Rewards: divided by the running std of the
    discounted return, clipped to ±clip. The statistics are part of the agent: they are saved with the
    model and applied frozen (`update=False`) at evaluation."""

    def __init__(self, obs_dim: int, num_envs: int, gamma: float, clip: float = 10.0, epsilon: float = 1e-8):
        self.obs_rms, self.ret_rms = RunningMeanStd((obs_dim,)), RunningMeanStd(())
        self.discounted_return, self.gamma, self.clip, self.epsilon = np.zeros(num_envs), gamma, clip, epsilon

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
        state = {"obs_rms": self.obs_rms.state_dict(), "ret_rms": self.ret_rms.state_dict(), "clip": self.clip}
        return state | {"epsilon": self.epsilon, "discounted_return": torch.as_tensor(self.discounted_return)}

    def load_state_dict(self, state: dict) -> None:
        """The statistics (Gymnasium cannot save environments: a resumed run starts new episodes, its returns from 0)."""
        self.obs_rms.load_state_dict(state["obs_rms"])
        self.ret_rms.load_state_dict(state["ret_rms"])


# Networks -------------------------------------------------------------------------------------------------------------
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


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """sum_i log N(a_i | mean_i, exp(log_std_i)^2)."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class Agent(nn.Module):
    """Separate policy (actor) and value (critic) MLPs; Gaussian policy with a state-independent log-std."""

    def __init__(self, obs_dim: int, act_dim: int, init_log_std: float = 0.0):
        super().__init__()
        self.critic = mlp(obs_dim, 1, out_std=1.0)
        self.actor_mean = mlp(obs_dim, act_dim, out_std=0.01)
        self.actor_logstd = nn.Parameter(torch.full((act_dim,), init_log_std))

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """log pi(a|s) = sum_i log N(a_i | mu_i(s), sigma_i^2)."""
        return gaussian_log_prob(self.actor_mean(obs), self.actor_logstd, actions)

    def policy_parameters(self) -> list[nn.Parameter]:
        """theta: the parameters of pi, in the order of the flat vectors of the natural gradient step."""
        return [*self.actor_mean.parameters(), self.actor_logstd]

    def entropy(self) -> Tensor:
        """Entropy of the Gaussian policy: sum_i (log sigma_i + 0.5 log(2 pi e)), the same in every state."""
        return (self.actor_logstd + 0.5 * math.log(2 * math.pi * math.e)).sum()


NUMPY_ACTIVATIONS = {nn.Tanh: np.tanh, nn.ReLU: lambda x: np.maximum(x, 0)}  # torch's, in numpy


def numpy_actor(agent: Agent) -> Callable[[np.ndarray], np.ndarray]:
    """The actor's mean mu(s) as a numpy function of a batch of observations, for the rollout, read off `agent.actor_mean`
    layer by layer (an nn.Linear as x W^T + b, an activation as its numpy twin). The weights do not change during a
    rollout, and one call of a 64-unit MLP costs ~5x less in numpy than in eager PyTorch, so the rollout runs on the CPU
    whatever the update's device."""

    def layer(module: nn.Module) -> Callable[[np.ndarray], np.ndarray]:  # an activation without a numpy twin: torch's own
        if isinstance(module, nn.Linear):
            weight, bias = module.weight.detach().cpu().numpy().T, module.bias.detach().cpu().numpy()
            return lambda x: x @ weight + bias
        return NUMPY_ACTIVATIONS.get(type(module), lambda x: module(torch.from_numpy(x)).numpy())

    layers = [layer(module) for module in agent.actor_mean]
    return lambda obs: functools.reduce(lambda x, f: f(x), layers, obs)


# Rollout --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout(
    envs: gym.vector.VectorEnv, agent: Agent, normalizer: Normalizer, obs: np.ndarray, num_steps: int, save_states_at=()
) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[int, float, int]], list]:
    """Run the policy for `num_steps` steps in every environment; for vine, save the simulator state of environment i
    before step t for each (t, i) of `save_states_at` (the rollout set; `--num-envs` environments of a SyncVectorEnv).
    Returns the transitions as (num_steps, num_envs, ...)
    arrays, the normalized observation to continue from, and the finished episodes as (step index, raw return, length).
    `next_obs[t]` is the normalized successor of `obs[t]`: the episode's final observation when it ended at t, so that a
    truncated episode can be bootstrapped from V(final observation). Last, the states saved, in `save_states_at`'s order."""
    num_envs, act_dim = envs.num_envs, envs.single_action_space.shape[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high
    shapes = dict(obs=obs.shape[1:], next_obs=obs.shape[1:], actions=(act_dim,), rewards=(), terminations=(), dones=())
    batch = {k: np.zeros((num_steps, num_envs, *shape), np.float32) for k, shape in shapes.items()}
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
        raise NumericalFault(f"the environment returned a non-finite observation or reward at rollout step {finite.argmin()}")
    return batch, obs, episodes, [saved[key] for key in save_states_at]


# Vine (Section 5.2): branch rollouts from a rollout set, with common random numbers -----------------------------------
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
    branch_envs: list, states: list, state_obs: np.ndarray, agent: Agent, normalizer: Normalizer, gamma: float, horizon: int
) -> tuple[dict[str, np.ndarray], int]:
    """K branch rollouts from each of the N rollout-set states (`states`, their normalized observations `state_obs`), the
    N K branches stepped in lockstep, K = len(branch_envs) / N. Branch k of state n starts with its own action
    a_nk ~ pi_old(.|s_n), the paper's q = pi_old for continuous control; then it follows pi_old with the noise sequence
    of its state: the K branches of a state share it (common random numbers, Appendix H), so that their Q-value
    differences have low variance. A branch ends at a termination (no future value), at the time limit, or after
    `horizon` steps; the last two are bootstrapped with V of the last observation (see `make_vine_batch`). Observations
    and rewards are normalized with the trunk's statistics, frozen. Returns, with (N, K) leading dimensions, the actions
    a_nk, each branch's discounted sum of normalized rewards, its last observation and the discount of its bootstrap
    (gamma^steps, or 0 after a termination); and the number of simulator steps taken."""
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
    branches = dict(obs=state_obs, actions=actions, returns=returns.reshape(shape), bootstrap_obs=last_obs.reshape(*shape, -1))
    return {k: v.astype(np.float32) for k, v in (branches | dict(bootstrap_discount=discount.reshape(shape))).items()}, steps


# Generalized advantage estimation -------------------------------------------------------------------------------------
def compute_gae(
    rewards: Tensor, values: Tensor, next_values: Tensor, terminations: Tensor, dones: Tensor, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) of Schulman et al. (2016) over (num_steps, num_envs) tensors.
    `next_values[t]` is V of the successor of step t (V(final observation) where the episode ended). A termination has no
    future value; a truncation keeps it. Any episode end stops the recursion. Returns the advantages and the value
    targets (advantages + values)."""
    td_errors = rewards + gamma * next_values * (1.0 - terminations) - values  # r_t + gamma V(s_t+1) - V(s_t)
    discounts = gamma * gae_lambda * (1.0 - dones)
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        last = td_errors[t] + discounts[t] * last  # A_t = td_error_t + gamma lambda A_t+1
        advantages[t] = last
    return advantages, advantages + values


@torch.no_grad()
def make_batch(
    agent: Agent, rollout_batch: dict[str, np.ndarray], gamma: float, gae_lambda: float, device: torch.device
) -> dict[str, Tensor]:
    """Values, log-probabilities of the rollout policy and GAE for a rollout, flattened over (step, env).
    The one place where the rollout's numpy arrays become tensors on `device`."""
    b = {k: torch.from_numpy(v).to(device) for k, v in rollout_batch.items()}
    values, next_values = agent.value(b["obs"]), agent.value(b["next_obs"])
    advantages, returns = compute_gae(b["rewards"], values, next_values, b["terminations"], b["dones"], gamma, gae_lambda)
    batch = {"obs": b["obs"], "actions": b["actions"], "logprobs": agent.log_prob(b["obs"], b["actions"]), "values": values}
    return {k: v.flatten(0, 1) for k, v in (batch | {"advantages": advantages, "returns": returns}).items()}


@torch.no_grad()
def make_vine_batch(agent: Agent, branches: dict[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    """The vine's samples on `device`, from `vine_rollouts`' branches: the rollout set's states (N, obs), actions
    (N, K, act), their log-probabilities under pi_old and Q(s_n, a_nk) = the branch's discounted return
    + gamma^steps V(s_last), the bootstrap being 0 after a termination."""
    b = {k: torch.from_numpy(v).to(device) for k, v in branches.items()}
    q_values = b["returns"] + b["bootstrap_discount"] * agent.value(b["bootstrap_obs"])
    obs_k = b["obs"][:, None, :].expand(-1, b["actions"].shape[1], -1)
    return {"obs": b["obs"], "actions": b["actions"], "logprobs": agent.log_prob(obs_k, b["actions"]), "q_values": q_values}


# TRPO update: natural gradient by conjugate gradient, line search on the KL constraint --------------------------------
def gaussian_kl(mean_old: Tensor, log_std_old: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """KL(N(mean_old, sigma_old^2) || N(mean, sigma^2)) per state, summed over action dimensions."""
    var_old, var = (2 * log_std_old).exp(), (2 * log_std).exp()
    return (log_std - log_std_old + (var_old + (mean_old - mean) ** 2) / (2 * var) - 0.5).sum(-1)


def analytic_fvp(kl: Tensor, params: list[nn.Parameter], damping: float) -> Callable[[Tensor], Tensor]:
    """v -> (A + damping I) v, A the Hessian of the mean KL at theta_old (Section 6, Appendix C), by double
    backprop: A v = grad((grad KL) . v). No matrix is formed."""
    grad_kl = torch.cat([g.flatten() for g in torch.autograd.grad(kl, params, create_graph=True)])

    def fvp(v: Tensor) -> Tensor:
        hessian_v = torch.autograd.grad(grad_kl @ v, params, retain_graph=True)
        return torch.cat([h.flatten() for h in hessian_v]) + damping * v

    return fvp


def score_matrix(agent: Agent, obs: Tensor, actions: Tensor) -> Tensor:
    """G[n] = grad_theta log pi_theta(a_n | s_n), one row per sample, in the order of `policy_parameters`."""
    names = [name for name, _ in agent.actor_mean.named_parameters()]

    def log_prob(mean_params: dict, log_std: Tensor, o: Tensor, a: Tensor) -> Tensor:
        return gaussian_log_prob(functional_call(agent.actor_mean, mean_params, (o,)), log_std, a)

    mean_params = {name: p.detach() for name, p in agent.actor_mean.named_parameters()}
    per_sample = vmap(grad(log_prob, argnums=(0, 1)), in_dims=(None, None, 0, 0))
    mean_grads, log_std_grads = per_sample(mean_params, agent.actor_logstd.detach(), obs, actions)
    return torch.cat([mean_grads[name].flatten(1) for name in names] + [log_std_grads], dim=1)


def empirical_fvp(scores: Tensor, damping: float) -> Callable[[Tensor], Tensor]:
    """v -> (F + damping I) v, F = (1/N) G^T G the covariance of the score gradients (Section 6's alternative)."""
    return lambda v: scores.T @ (scores @ v) / scores.shape[0] + damping * v


def conjugate_gradient(avp: Callable, b: Tensor, iters: int, residual_tol: float = 1e-10) -> tuple[Tensor, float]:
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
    params: list[nn.Parameter], full_step: Tensor, surrogate: Callable, kl: Callable, max_kl: float, steps: int
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


def value_loss(new_values: Tensor, returns: Tensor) -> Tensor:
    """0.5 (V - R)^2, R the GAE(lambda) return."""
    return 0.5 * ((new_values - returns) ** 2).mean()


@torch.no_grad()
def standardize(x: Tensor) -> Tensor:
    """Zero mean, unit variance."""
    return (x - x.mean()) / (x.std() + 1e-8)


@torch.no_grad()
def ratio_stats(agent: Agent, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The probability ratio pi_theta / pi_old over the whole batch, and the approximate KL(pi_old || pi_theta)."""
    logratio = agent.log_prob(batch["obs"], batch["actions"]) - batch["logprobs"]
    ratio = logratio.exp()
    stats = {"ratio/max": ratio.max(), "ratio/min": ratio.min(), "losses/approx_kl": ((ratio - 1) - logratio).mean()}
    return stats


def vine_surrogate(logratio: Tensor, q_values: Tensor) -> Tensor:
    """Eq. (17) averaged over the rollout set: (1/N) sum_n [sum_k w_nk Q_nk / sum_k w_nk], w_nk = pi_theta(a_nk|s_n) /
    pi_old(a_nk|s_n), from (N, K) log-ratios and Q-values. The self-normalized weights w_nk / sum_k w_nk are a
    softmax over k of the log-ratios: adding a constant to the Q-values of a state leaves the gradient unchanged."""
    return (torch.softmax(logratio, dim=1) * q_values).sum(1).mean()


def minibatch_step(agent: Agent, optimizer: torch.optim.Adam, mb: dict[str, Tensor], args: Args) -> Tensor:
    """One gradient step of the value function on a minibatch: the value loss, `backward()` and `optimizer.step()`. The
    eager and the compiled update both run this function. Returns the value loss."""
    v_loss = value_loss(agent.value(mb["obs"]), mb["returns"])
    optimizer.zero_grad()
    v_loss.backward()
    optimizer.step()
    return v_loss.detach()


def update(
    agent: Agent, optimizer: torch.optim.Adam, batch: dict, args: Args, vine_batch: dict | None = None, step=minibatch_step
) -> dict:
    """One natural-gradient step on the policy under the KL constraint, then `vf_iters` epochs of minibatch
    Adam on the value function (on the trunk's batch); returns the iteration's statistics. The policy step
    uses the batch's states and advantages (single path) or, given `vine_batch`, the rollout set's states and
    Q-values (vine): the surrogate, the KL constraint and the Fisher matrix are then all over the rollout set."""
    params = agent.policy_parameters()
    if vine_batch is None:  # single path
        obs, actions, logprobs = batch["obs"], batch["actions"], batch["logprobs"]
        advantages = standardize(batch["advantages"]) if args.norm_adv == "batch" else batch["advantages"]

        def surrogate() -> Tensor:  # E[pi_theta(a|s) / pi_old(a|s) A], eq. (15) with q = pi_old (Section 5.1)
            ratio = (agent.log_prob(obs, actions) - logprobs).exp()
            return (ratio * advantages).mean() + args.ent_coef * agent.entropy()

        samples = {"obs": obs, "actions": actions, "logprobs": logprobs}
    else:  # vine
        obs = vine_batch["obs"]
        obs_k = obs[:, None, :].expand(-1, vine_batch["actions"].shape[1], -1)

        def surrogate() -> Tensor:  # eq. (17) at each rollout-set state, averaged over the rollout set
            logratio = agent.log_prob(obs_k, vine_batch["actions"]) - vine_batch["logprobs"]
            return vine_surrogate(logratio, vine_batch["q_values"]) + args.ent_coef * agent.entropy()

        samples = {"obs": obs_k.flatten(0, 1), "actions": vine_batch["actions"].flatten(0, 1)}
        samples["logprobs"] = vine_batch["logprobs"].flatten()
    with torch.no_grad():
        mean_old, log_std_old = agent.actor_mean(obs), agent.actor_logstd.clone()
        trunk_mean_old = agent.actor_mean(batch["obs"]) if vine_batch is not None else None

    def kl() -> Tensor:  # KL(pi_old(.|s) || pi_theta(.|s)) at each state s of the constraint
        return gaussian_kl(mean_old, log_std_old, agent.actor_mean(obs), agent.actor_logstd)

    def mean_kl() -> Tensor:  # the constraint of eq. (15): E_s[KL(pi_old(.|s) || pi_theta(.|s))]
        return kl().mean()

    def max_state_kl() -> Tensor:  # the constraint of eq. (12): max_s KL, over the states of the batch
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
            beta = torch.sqrt(2 * args.max_kl / (step_dir @ fvp(step_dir)))  # the largest step with 1/2 s^T A s = max_kl
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
    v_losses = []
    for _ in range(args.vf_iters):  # the value function's fit (`step`: `minibatch_step`, or it compiled)
        for indices in torch.randperm(batch_size, device=batch["obs"].device).split(batch_size // args.num_minibatches):
            v_losses.append(step(agent, optimizer, {"obs": batch["obs"][indices], "returns": batch["returns"][indices]}, args))

    with torch.no_grad():
        policy_loss, largest_kl = -surrogate().item(), max_state_kl().item()
    stats = {"losses/policy_loss": policy_loss, "losses/value_loss": torch.stack(v_losses).mean().item()}
    stats |= {"losses/entropy": agent.entropy().item(), "losses/grad_norm": g.norm().item(), "trpo/kl": step_kl}
    stats |= {"trpo/max_kl": largest_kl, "trpo/surrogate_improvement": improvement, "trpo/line_search_steps": steps}
    stats |= {"trpo/cg_residual": cg_residual, "trpo/step_norm": step_norm, "trpo/zero_gradient": float(not g.any())}
    if vine_batch is not None:  # the constraint bounds the KL over the rollout set's N states; this is the KL over the trunk's
        with torch.no_grad():
            stats["trpo/trunk_kl"] = (
                gaussian_kl(trunk_mean_old, log_std_old, agent.actor_mean(batch["obs"]), agent.actor_logstd).mean().item()
            )
    return stats | {k: v.item() for k, v in ratio_stats(agent, samples).items()}


def explained_variance(values: Tensor, returns: Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect value function, 0 no better than a constant."""
    var_returns = returns.var()
    return float("nan") if var_returns == 0 else (1 - (returns - values).var() / var_returns).item()


# Training -------------------------------------------------------------------------------------------------------------
def make_agent(args: Args, obs_dim: int, act_dim: int, device: torch.device, checkpoint=None, rng=torch.default_generator):
    """A new run's agent, optimizer and statistics, or the checkpoint's with its random generators (an error if unfit)."""
    agent = Agent(obs_dim, act_dim, args.init_log_std).to(device)
    optimizer = torch.optim.Adam(agent.critic.parameters(), lr=args.vf_learning_rate, fused=True)  # the value function's
    normalizer = Normalizer(obs_dim, args.num_envs, args.gamma)
    if checkpoint:
        agent.load_state_dict(checkpoint["model"])  # its keys and shapes are checked
        normalizer.load_state_dict(checkpoint["normalizer"])  # the statistics' are not, nor Adam's state's
        shapes = [(normalizer.obs_rms.mean.shape, (obs_dim,)), (normalizer.obs_rms.var.shape, (obs_dim,))]
        if "optimizer" in checkpoint:  # a run's checkpoint; a policy (utils/results/policies) keeps what playing needs
            optimizer.load_state_dict(checkpoint["optimizer"])
            shapes += [(state[k].shape, p.shape) for p, state in optimizer.state.items() for k in ("exp_avg", "exp_avg_sq")]
            rng.set_state(checkpoint["rng"])
            if device.type == "cuda" and checkpoint["cuda_rng"]:
                torch.cuda.set_rng_state(checkpoint["cuda_rng"][0], device)
        if any(shape != expected for shape, expected in shapes):
            raise ValueError("its Adam state or its statistics do not fit the networks")
    return agent, optimizer, normalizer


def train(args: Args) -> dict[str, float]:
    """Train TRPO, or continue the run of the checkpoint `args.resume`. Returns the final global step, the mean raw return
    of the last 10 episodes, and the signal that stopped the run early (0: none)."""
    with Run(args) as run:  # the run's folder, TensorBoard and W&B, signals and checkpoints (plumbing, below)
        args, checkpoint = run.args, run.loaded
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        if args.cuda and device.type == "cpu":
            print("note: no GPU is available; training on the CPU", file=sys.stderr)

        envs = make_envs(args.env_id, args.num_envs, args.async_envs, run.video_dir, run.env_kwargs)
        run.callback(envs.close)
        vine = args.sampling == "vine"
        # Vine: one environment per branch (N K of them), its state restored from the trunk's before it steps.
        branch_envs = [gym.make(args.env_id, **run.env_kwargs) for _ in range(args.vine_states * args.vine_actions * vine)]
        for env in branch_envs:
            env.reset(seed=args.seed)
            run.callback(env.close)
        agent, optimizer, normalizer = make_agent(args, run.obs_dim, run.act_dim, device, checkpoint)
        global_step, iteration = (checkpoint["global_step"], checkpoint["iteration"]) if checkpoint else (0, 0)
        batch_size = args.num_envs * args.num_steps
        # An iteration runs the trunk (single path: the whole batch) and, with vine, up to N K H branch steps; every
        # simulator step counts. Iterations go on while one more surely fits in --total-timesteps.
        iteration_steps = batch_size + (args.vine_states * args.vine_actions * args.vine_horizon if vine else 0)
        # Compiling costs 4-17 s once, repaid after ~70,000 minibatch steps (README): by default only a run that long.
        long_run = args.total_timesteps // iteration_steps * args.vf_iters * args.num_minibatches >= 70_000
        train_step = compiled(minibatch_step) if args.compile or args.compile is None and long_run else minibatch_step
        # On resume the statistics already hold the observation the run would have continued from: not counted twice.
        obs = normalizer.obs(envs.reset(seed=args.seed + iteration * args.num_envs)[0], update=checkpoint is None)
        run.checkpoint(checkpoint_state(agent, optimizer, normalizer, args, global_step, iteration, device))

        while global_step + iteration_steps <= args.total_timesteps:
            iteration += 1
            lr = args.vf_learning_rate * (1.0 - global_step / run.total) if args.anneal_lr else args.vf_learning_rate
            optimizer.param_groups[0]["lr"] = lr

            rollout_start = time.perf_counter()
            # Vine: the rollout set, whose states the trunk's rollout saves as it passes them.
            rollout_set = choose_rollout_set(args.num_steps, args.num_envs, args.vine_states) if vine else []
            rollout_batch, obs, episodes, set_states = rollout(envs, agent, normalizer, obs, args.num_steps, rollout_set)
            episodes = [(global_step + (t + 1) * args.num_envs, ret, length) for t, ret, length in episodes]
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
            check_finite(agent, normalizer, stats)

            stats["losses/explained_variance"] = explained_variance(batch["values"], batch["returns"])
            stats |= {"charts/learning_rate": lr, "perf/rollout_time": update_start - rollout_start}
            run.log(stats | {"perf/update_time": update_end - update_start}, global_step, episodes)
            run.checkpoint(checkpoint_state(agent, optimizer, normalizer, args, global_step, iteration, device))
            if run.stopped:
                break
    return {"global_step": global_step, "mean_return": run.mean_return, "stopped_by": run.stopped}


# Plumbing: checks, checkpoints, the compiled step ---------------------------------------------------------------------
class ArgsError(ValueError):
    """A bad command line, environment or checkpoint, refused before the first step: one line, exit code 2."""


class NumericalFault(RuntimeError):
    """A NaN or an infinity in training or from an environment: training stops, exit code 3."""


class MachineFault(OSError):
    """A write that the machine refused (a full disk, a read-only folder): training stops, exit code 1."""


class Run(contextlib.ExitStack):
    """What `train` runs in: the run's folder (a new one, or that of --resume's checkpoint) with a lock on it that a second
    process is refused, W&B and TensorBoard, Ctrl-C and SIGTERM (the loop stops at the end of the iteration), the last
    good state and the checkpoints written from it, the final evaluation. However the run ends, the folder is let go and
    the `callback`s run (closing the environments); a setup that fails leaves no new folder, and a numerical fault or a
    write that the machine refuses stops the run with one line that names the checkpoint it leaves."""

    def __init__(self, args: Args):
        super().__init__()
        self.args, self.loaded = start_run(args)  # `loaded`: the checkpoint of --resume
        self.env_kwargs, self.obs_dim, self.act_dim = check_run(self.args)  # refused now, before anything is written
        self.dir = os.path.dirname(os.path.abspath(self.args.resume)) if self.loaded else None
        self.keeps = self.args.save_model or self.args.checkpoint_interval > 0
        batch, vine = self.args.num_envs * self.args.num_steps, self.args.sampling == "vine"
        self.total = self.args.total_timesteps if vine else self.args.total_timesteps // batch * batch  # the steps to run
        self.writer = self.last_good = None
        self.saved = (self.loaded["global_step"], self.args.resume) if self.loaded else None  # the last checkpoint written
        self.signals, self.stopped, self.returns = [], 0, deque(maxlen=10)

    def __enter__(self) -> "Run":
        name = f"runs/{self.args.env_id.replace('/', '-')}__{self.args.exp_name}__{self.args.seed}"
        while self.dir is None:  # a new run's own folder: the next second's if another run took this second's
            try:
                os.makedirs(folder := f"{name}__{int(time.time())}")
                self.dir = folder
            except FileExistsError:
                time.sleep(0.1)
        self.path = f"{self.dir}/{self.args.exp_name}.pt"
        self.video_dir = os.path.join(self.dir, "videos") if self.args.capture_video else None
        if fcntl is None:
            print("note: no file locks here (no fcntl): nothing keeps a second process off this run", file=sys.stderr)
            return self
        lock = os.open(self.dir, os.O_RDONLY)
        try:  # a lock that a second process running the run is refused, and that goes with this one however it ends
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise ArgsError(f"{self.dir} is in use by another process running this script") from None
        self.callback(os.close, lock)
        return self

    def checkpoint(self, state: dict) -> None:
        """Keep `state` as the last good one, and write it every --checkpoint-interval iterations and when stopped. The
        first call, before the first iteration, starts the training: W&B, the signals, the progress line, the clock."""
        self.stopped = (self.signals or [0])[0]  # a signal that comes later is seen at the next iteration's end
        interval = self.args.checkpoint_interval
        if self.last_good is None:
            self.start(state["global_step"])
        elif self.keeps and (self.stopped or interval and state["iteration"] % interval == 0):
            self.save(state)
        self.last_good = state

    def start(self, step: int) -> None:
        if self.args.track:  # W&B gets every TensorBoard scalar; a resumed run continues the W&B run of its name
            import wandb

            name = os.path.basename(os.path.normpath(self.dir))
            run = dict(project=self.args.wandb_project_name, entity=self.args.wandb_entity, name=name, resume="allow")
            run |= dict(id=hashlib.sha1(name.encode()).hexdigest()[:16], config=asdict(self.args), save_code=True)
            wandb.init(**run, monitor_gym=self.args.capture_video, sync_tensorboard=True)
            self.callback(wandb.finish)
        if threading.current_thread() is threading.main_thread():  # the one that signals reach
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.callback(signal.signal, signum, signal.signal(signum, self.request_stop))
        progress = tqdm(initial=step, total=self.total, unit="step", unit_scale=True, mininterval=1.0)
        self.progress, self.start_step, self.start_time = self.enter_context(progress), step, time.perf_counter()

    def request_stop(self, signum: int, frame) -> None:  # stop at the end of the iteration; a second Ctrl-C stops at once
        if self.signals and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signals.append(signum)

    def log(self, stats: dict, step: int, episodes: list[tuple[int, float, int]] = ()) -> None:
        """Write the iteration's statistics at `step` and its finished episodes (step, raw return, length) to TensorBoard.
        The writer opens at the first call, after the first iteration: a resume that fails before it purges nothing."""
        writer = self.writer or self.open_writer()
        for episode_step, episodic_return, episodic_length in episodes:
            writer.add_scalar("charts/episodic_return", episodic_return, episode_step)
            writer.add_scalar("charts/episodic_length", episodic_length, episode_step)
            self.returns.append(episodic_return)
        stats = {"charts/SPS": int((step - self.start_step) / (time.perf_counter() - self.start_time))} | stats
        for tag, value in stats.items():
            writer.add_scalar(tag, value, step)
        self.progress.set_postfix(SPS=stats["charts/SPS"], ret=f"{self.mean_return:.1f}", refresh=False)
        self.progress.update(step - self.progress.n)

    def open_writer(self) -> SummaryWriter:
        """TensorBoard's writer; a resumed run's drops what its run logged after the checkpoint."""
        while self.loaded and any(f".{int(time.time()):010d}." in name for name in os.listdir(self.dir)):  # event files
            time.sleep(0.1)  # are read in name order, and named by the second: a resume's must come after those it purges
        self.writer = self.enter_context(SummaryWriter(self.dir, purge_step=self.loaded and self.loaded["global_step"] + 1))
        if not self.loaded:
            table = "\n".join(f"|{k}|{v}|" for k, v in asdict(self.args).items())
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        return self.writer

    @property
    def mean_return(self) -> float:
        """The mean raw return of the last 10 episodes."""
        return float(np.mean(self.returns or [np.nan]))

    def save(self, state: dict) -> None:
        save_checkpoint(self.path, state)
        self.saved = state["global_step"], self.path

    def kept(self) -> str:
        """Which checkpoint a run that stops on a fault leaves behind."""
        return "; the checkpoint of step {} is kept in {}".format(*self.saved) if self.saved else ""

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if isinstance(error, NumericalFault):
                if self.keeps:
                    self.save(self.last_good)
                iteration = self.last_good["iteration"] + 1
                raise NumericalFault(f"{self.args.env_id}, iteration {iteration}: {error}{self.kept()}") from None
            elif isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                reason = f"{os.strerror(error.errno).lower()} writing {error.filename or self.dir}"
                raise MachineFault(reason + self.kept()) from None
            elif error is None:
                self.finish()
        finally:
            super().__exit__(kind, error, traceback)  # the callbacks: the writer, the environments, the lock, ...
            if self.last_good is None and not self.loaded:  # the setup failed: a new run leaves nothing behind
                shutil.rmtree(self.dir)
                with contextlib.suppress(OSError):
                    os.rmdir("runs")
        return False

    def finish(self) -> None:
        """The last checkpoint, and with --save-model the final policy's evaluation (10 episodes, logged after the last
        step: a resume drops them with the rest)."""
        step = self.last_good["global_step"]
        if self.stopped:
            self.progress.close()  # the progress line ends before this one
            resume = f"; continue with --resume {self.path}" * self.keeps
            return print(f"stopped by {signal.Signals(self.stopped).name} at step {step}{resume}", file=sys.stderr)
        if self.keeps:
            self.save(self.last_good)
        if self.args.save_model:
            try:
                from utils.evaluate import evaluate
            except ImportError:
                return print("utils/ is not next to this script: the final evaluation is skipped", file=sys.stderr)
            writer = self.writer or self.open_writer()
            for i, episodic_return in enumerate(evaluate(self.path, episodes=10)):
                writer.add_scalar("eval/episodic_return", episodic_return, step + 1 + i)


def start_run(args: Args) -> tuple[Args, dict | None]:
    """A new run: its arguments, no checkpoint. With --resume, the checkpoint's run: the arguments it was started with (but
    a new --total-timesteps, and the machine's --cuda and --compile), and the checkpoint."""
    if args.resume is None:
        return replace(args, total_timesteps=1_000_000 if args.total_timesteps is None else args.total_timesteps), None
    checkpoint, taken = load_checkpoint(args.resume), ("resume", "total_timesteps", "cuda", "compile")
    if "optimizer" not in checkpoint:
        raise ArgsError(f"'{args.resume}' is a policy without its optimizer's state: it plays (utils.evaluate), not resumes")
    ignored = [f"--{k.replace('_', '-')}" for k, v in asdict(args).items() if k not in taken and v != getattr(Args(), k)]
    if ignored:
        print(f"note: a resumed run keeps the arguments it was started with; ignoring {' '.join(ignored)}", file=sys.stderr)
    saved = checkpoint["args"]
    total = saved["total_timesteps"] if args.total_timesteps is None else args.total_timesteps
    if total < checkpoint["global_step"]:
        raise ArgsError(f"--total-timesteps {total} is fewer than the checkpoint's {checkpoint['global_step']} steps")
    return Args(**(saved | {k: getattr(args, k) for k in taken} | {"total_timesteps": total})), checkpoint


def check_run(args: Args) -> tuple[dict, int, int]:
    """Refuse (ArgsError) a value outside BOUNDS, flags that do not fit together, an environment that fails a reset and a step
    or has no 1-D Box spaces, a batch beyond the memory; returns `gym.make`'s kwargs, the obs and act sizes."""
    for interval, flags in BOUNDS.items():
        low, high = (float(end) for end in interval[1:-1].split(", "))
        for flag, x in [(flag, getattr(args, flag)) for flag in flags if getattr(args, flag) is not None]:
            if not (low <= x <= high and (interval[0] == "[" or x != low) and (interval[-1] == "]" or x != high)):
                raise ArgsError(f"--{flag.replace('_', '-')} must be in {interval}")
    batch_size = args.num_envs * args.num_steps
    if "/" in args.exp_name or "__" in args.exp_name or not args.exp_name.strip("."):
        raise ArgsError("--exp-name must be a plain name, without '/' or '__' (it names the run directory and the checkpoint)")
    if args.total_timesteps < batch_size:
        raise ArgsError(f"--total-timesteps {args.total_timesteps} is smaller than one batch ({batch_size} steps)")
    if batch_size % args.num_minibatches:
        raise ArgsError(f"--num-minibatches {args.num_minibatches} does not divide the batch of {batch_size} steps")
    if args.norm_adv != "none" and batch_size < 2:
        raise ArgsError(f"--norm-adv {args.norm_adv} cannot standardize the advantages of one sample")
    vine_steps = args.vine_states * args.vine_actions * args.vine_horizon
    if args.sampling == "vine" and args.vine_states > batch_size:
        raise ArgsError(
            f"--vine-states {args.vine_states} is more than the trunk's {batch_size} steps (--num-envs x --num-steps)"
        )
    if args.sampling == "vine" and args.async_envs:
        raise ArgsError("--sampling vine saves the trunk's states, which --async-envs keeps in subprocesses")
    if args.sampling == "vine" and args.total_timesteps < batch_size + vine_steps:
        raise ArgsError(
            f"--total-timesteps {args.total_timesteps} is smaller than one vine iteration "
            f"({batch_size} trunk + {vine_steps} branch steps)"
        )
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    try:  # made, reset and stepped once here, so that whatever the environment refuses is refused before anything is written
        env = gym.make(args.env_id, **env_kwargs)
        for name, space in (("observation", env.observation_space), ("action", env.action_space)):
            if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
                raise ArgsError(f"{args.env_id} has {name} space {space}; this script needs a 1-D Box")
        if args.sampling == "vine" and not isinstance(env.unwrapped, MujocoEnv):
            raise ArgsError(
                "--sampling vine restores the simulator's state, which this script can do for MuJoCo environments only; "
                f"{args.env_id} is not one"
            )
        env.reset(seed=args.seed)
        env.step(env.action_space.sample())
        env.close()
    except Exception as e:  # an unknown id, a missing dependency, a keyword argument it does not take, a failed step
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise e if isinstance(e, ArgsError) else ArgsError(f"cannot make environment '{args.env_id}': {reason}") from None
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    # Per step the rollout keeps 2 observations, an action and 3 scalars in float32, the batch about 2 more copies of them.
    needed, available = 12 * batch_size * (2 * obs_dim + act_dim + 3), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise ArgsError(f"a batch of {batch_size:,} steps needs about {needed / 2**30:,.0f} GiB, more than this machine has")
    return env_kwargs, obs_dim, act_dim


def parse_env_kwargs(items: tuple[str, ...]) -> dict:
    """`("include_cfrc_ext_in_observation=False", ...)` -> keyword arguments of `gym.make`, or ArgsError."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier() or key == "render_mode":  # the script's own: rgb_array with --capture-video
            raise ArgsError(f"--env-kwargs takes KEY=VALUE, KEY not render_mode (the script sets it), not '{item}'")
        try:
            kwargs[key] = ast.literal_eval(value)  # False, 0.5, (0.2, 1.0), ...
        except Exception:  # not a literal (or one too deep to parse)
            kwargs[key] = value  # a string
    return kwargs


def check_finite(agent: Agent, normalizer: Normalizer, stats: dict) -> None:
    """Raise NumericalFault naming the first quantity that training goes on with that holds a NaN or an infinity."""
    quantities = {k: v for k, v in stats.items() if k.startswith("losses/")}
    quantities |= {f"the parameter {name}": p for name, p in agent.named_parameters()}
    quantities["the running observation mean or variance"] = np.concatenate([normalizer.obs_rms.mean, normalizer.obs_rms.var])
    quantities["the running return variance"] = normalizer.ret_rms.var
    for name, value in quantities.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise NumericalFault(f"{name} is not finite after the update")


def checkpoint_state(agent: Agent, optimizer, normalizer: Normalizer, args: Args, global_step: int, iteration: int, device):
    """A copy of what evaluates the policy (`env_kwargs`: for utils.evaluate) or continues the run (and the GPU generator)."""
    state = dict(algo="trpo_continuous", args=asdict(args), env_kwargs=parse_env_kwargs(args.env_kwargs))
    state |= dict(global_step=global_step, iteration=iteration, model=agent.state_dict(), optimizer=optimizer.state_dict())
    cuda_rng = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return copy.deepcopy(state | dict(normalizer=normalizer.state_dict(), rng=torch.get_rng_state(), cuda_rng=cuda_rng))


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write atomically (a temporary file, then a rename): a crash or a full disk leaves the last checkpoint intact."""
    try:
        torch.save(checkpoint, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save's stream names no cause of a failed write: the folder then says it
        folder = os.path.dirname(os.path.abspath(path))
        full, writable = shutil.disk_usage(folder).free < 2**20, os.access(folder, os.W_OK)
        code = getattr(e, "errno", None) or (errno.ENOSPC if full else None if writable else errno.EROFS)
        raise OSError(code, os.strerror(code), path) if code else e from None
    finally:  # and no partial file
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


def tensors(tree) -> list[Tensor]:
    """The tensors in nested dicts and lists (a state dict)."""
    if isinstance(tree, dict | list | tuple):
        return [tensor for value in (tree.values() if isinstance(tree, dict) else tree) for tensor in tensors(value)]
    return [tree] if isinstance(tree, Tensor) else []


def load_checkpoint(path: str) -> dict:
    """The checkpoint at `path` if this script wrote it (its arguments' types and values, its environment, its networks,
    statistics, Adam and random generator, a policy's without the last two, restored into what `train` builds from them),
    or ArgsError naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint["algo"] != "trpo_continuous":
            raise ArgsError(f"it is one of {checkpoint['algo']}.py")
        args = Args(**checkpoint["args"])
        if asdict(args).keys() != checkpoint["args"].keys():
            raise ValueError(f"it lacks the arguments {sorted(asdict(args).keys() - checkpoint['args'].keys())}")
        for field in fields(Args):
            typeguard.check_type(getattr(args, field.name), field.type)
        typeguard.check_type(tuple(checkpoint[k] for k in ("global_step", "iteration", "cuda_rng")), tuple[int, int, list])
        make_agent(args, *check_run(args)[1:], torch.device("cpu"), checkpoint, torch.Generator())
        for part in ("model", "optimizer", "normalizer"):
            if not all(torch.isfinite(tensor).all() for tensor in tensors(checkpoint.get(part, {}))):
                raise ValueError(f"its {part} state holds a NaN or an infinity")
    except FileNotFoundError:
        raise ArgsError(f"no checkpoint at '{path}'") from None
    except Exception as e:
        reason = e if isinstance(e, ArgsError) else f"{type(e).__name__}: {' '.join(str(e).split())}"  # one line
        raise ArgsError(f"'{path}' is not a checkpoint of trpo_continuous.py: {reason}") from None
    return checkpoint


def compiled(step: Callable) -> Callable:
    """`step` compiled by torch.compile: the loss with its backward pass, the clipping and Adam's step in a few graphs
    (`zero_grad` and `backward()` itself stay eager). If it fails to compile (no C++ compiler, an unsupported platform,
    ...): a one-line note, and `step` from then."""
    fast = [torch.compile(step)]  # compiled at its first call; `step` itself once compiling has failed

    def run(agent: Agent, optimizer: torch.optim.Adam, mb: dict[str, Tensor], args: Args) -> Tensor:
        try:
            return fast[0](agent, optimizer, mb, args)
        except Exception as e:
            if fast[0] is step:  # an error of the step itself, not of compiling
                raise
            fast[0] = step
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            print(f"note: torch.compile failed ({reason}); the update runs eagerly, as with --no-compile", file=sys.stderr)
        return step(agent, optimizer, mb, args)

    return run


if __name__ == "__main__":  # the contract (README): a failure is one `error:` line; TRACEBACK=1 shows its traceback
    try:
        stopped_by = train(tyro.cli(Args))["stopped_by"]
    except (Exception, KeyboardInterrupt) as e:
        if os.environ.get("TRACEBACK"):
            raise
        ours = isinstance(e, ArgsError | NumericalFault | MachineFault)
        print(f"error: {e if ours else f'{type(e).__name__}: ' + ' '.join(str(e).split())}".rstrip(": "), file=sys.stderr)
        codes = {NumericalFault: 3, MachineFault: 1, KeyboardInterrupt: 128 + signal.SIGINT}
        sys.exit(next((code for kind, code in codes.items() if isinstance(e, kind)), 2))
    sys.exit(stopped_by and 128 + stopped_by)
