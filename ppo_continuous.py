"""PPO with ratio clipping for continuous control (Gymnasium 1.x, MuJoCo), in one file.

Schulman et al. (2017), "Proximal Policy Optimization Algorithms", arXiv:1707.06347. Equation numbers
in the comments refer to the TREFree paper (Sun et al., 2023, arXiv:2302.07985), which restates PPO's
clipped objective as its equation (4).
Defaults are the MuJoCo defaults of OpenAI Baselines' ppo2 and CleanRL's ppo_continuous_action.py.

    python ppo_continuous.py --env-id Hopper-v5 --seed 1
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
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
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
    """if toggled, the minibatch step runs compiled whole by torch.compile (CUDA graphs on a GPU); eager if it cannot"""
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
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    num_envs: int = 1
    """the number of parallel environments"""
    num_steps: int = 2048
    """the number of steps to run in each environment per policy rollout"""
    async_envs: bool = False
    """if toggled, step the environments in subprocesses (`AsyncVectorEnv`); useful with `--num-envs` > 1"""
    anneal_lr: bool = True
    """if toggled, the learning rate decays linearly to 0 over the run"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda of generalized advantage estimation"""
    num_minibatches: int = 32
    """the number of minibatches per epoch"""
    update_epochs: int = 10
    """the number of epochs over each batch"""
    norm_adv: Literal["batch", "minibatch", "none"] = "minibatch"
    """where the advantages are standardized: each minibatch (Baselines' ppo2, CleanRL), the whole batch, or nowhere"""
    clip_coef: float = 0.2
    """the ratio clipping coefficient epsilon of eq. (4)"""
    clip_vloss: bool = True
    """if toggled, clip the value loss as in Baselines' ppo2, with range `vf_clip_coef` (on, as in ppo2 and CleanRL)"""
    vf_clip_coef: float | None = None
    """the value clipping range of `--clip-vloss` (none: --clip-coef, as in Baselines' ppo2 and CleanRL)"""
    init_log_std: float = 0.0
    """the initial log standard deviation of the Gaussian policy, the same in every action dimension (0: sigma = 1)"""
    ent_coef: float = 0.0
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum norm of the gradient"""
    target_kl: float | None = None
    """if set, stop the update's epochs once the batch's approximate KL exceeds it"""


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

    def reward(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
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


class Agent(nn.Module):
    """Separate actor and critic MLPs; Gaussian policy with a state-independent log-std."""

    def __init__(self, obs_dim: int, act_dim: int, init_log_std: float = 0.0):
        super().__init__()
        self.critic = mlp(obs_dim, 1, out_std=1.0)
        self.actor_mean = mlp(obs_dim, act_dim, out_std=0.01)
        self.actor_logstd = nn.Parameter(torch.full((act_dim,), init_log_std))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) = sum_i log N(a_i | mu_i(s), sigma_i^2)."""
        log_std = self.actor_logstd
        return (-0.5 * ((actions - self.actor_mean(obs)) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

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
    envs: gym.vector.VectorEnv, agent: Agent, normalizer: Normalizer, obs: np.ndarray, num_steps: int
) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[int, float, int]]]:
    """Run the policy for `num_steps` steps in every environment.

    Returns the transitions as (num_steps, num_envs, ...) arrays, the normalized observation to
    continue from, and the finished episodes as (step index, raw return, length). `next_obs[t]` is the
    normalized successor of `obs[t]`: the episode's final observation when it ended at t, so that a
    truncated episode can be bootstrapped from V(final observation).
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
    for t in range(num_steps):
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
    return batch, obs, episodes


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


# ---------------------------------------------------------------------------------------------------
# PPO loss and update
# ---------------------------------------------------------------------------------------------------
def ppo_loss(logratio: torch.Tensor, advantages: torch.Tensor, clip_coef: float) -> torch.Tensor:
    """Negative clipped surrogate, eq. (4): -E[min(r A, clip(r, 1 - eps, 1 + eps) A)], r = pi_theta / pi_old."""
    ratio = logratio.exp()
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages).mean()


def value_loss(
    new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_coef: float, clip_vloss: bool
) -> torch.Tensor:
    """0.5 (V - R)^2; with `clip_vloss` the pessimistic max over V and V clipped to old_V ± clip_coef (Baselines)."""
    loss = (new_values - returns) ** 2
    if clip_vloss:
        clipped = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * loss.mean()


@torch.no_grad()
def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance."""
    return (x - x.mean()) / (x.std() + 1e-8)


def ratio_stats(agent: Agent, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The probability ratio pi_theta / pi_old over the whole batch, and the approximate KL(pi_old || pi_theta)."""
    logratio = agent.log_prob(batch["obs"], batch["actions"]) - batch["logprobs"]
    ratio = logratio.exp()
    return {"ratio/max": ratio.max(), "ratio/min": ratio.min(), "losses/approx_kl": ((ratio - 1) - logratio).mean()}


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
    """One gradient step on a minibatch, in place: the PPO loss, its gradient, global-norm clipping and Adam. The eager and
    the compiled update both run this function. Returns (policy loss, value loss, entropy, clipfrac, gradient norm)."""
    logratio = agent.log_prob(mb["obs"], mb["actions"]) - mb["logprobs"]
    advantages = standardize(mb["advantages"]) if args.norm_adv == "minibatch" else mb["advantages"]
    policy_loss = ppo_loss(logratio, advantages, args.clip_coef)
    vf_clip_coef = args.clip_coef if args.vf_clip_coef is None else args.vf_clip_coef
    v_loss = value_loss(agent.value(mb["obs"]), mb["values"], mb["returns"], vf_clip_coef, args.clip_vloss)
    entropy = agent.entropy()
    loss = policy_loss - args.ent_coef * entropy + args.vf_coef * v_loss

    grads = torch.autograd.grad(loss, adam["params"])
    grad_norm = nn.utils.get_total_norm(grads)  # ||g||, the norm over all parameters that clip_grad_norm_ computes
    # g min(1, c / ||g||), clip_grad_norm_'s rule
    grads = [g * (args.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0) for g in grads]
    adam_step(adam, grads, lr)
    clipfrac = ((logratio.exp() - 1).abs() > args.clip_coef).float().mean()
    return torch.stack([policy_loss, v_loss, entropy, clipfrac, grad_norm]).detach()


def update(
    agent: Agent, optimizer: torch.optim.Adam, batch: dict[str, torch.Tensor], args: Args, step: Callable = minibatch_step
) -> dict[str, float]:
    """`update_epochs` passes of minibatch gradient steps on the PPO loss (`step`: `minibatch_step`, or it compiled);
    returns the iteration's statistics."""
    batch_size = batch["obs"].shape[0]
    if args.norm_adv == "batch":
        batch = batch | {"advantages": standardize(batch["advantages"])}
    adam, lr = adam_state(optimizer), optimizer.param_groups[0]["lr"]
    losses = []
    for _ in range(args.update_epochs):
        for indices in torch.randperm(batch_size, device=batch["obs"].device).split(batch_size // args.num_minibatches):
            losses.append(step(agent, adam, {k: v[indices] for k, v in batch.items()}, lr, args))
        if args.target_kl is not None and ratio_stats(agent, batch)["losses/approx_kl"] > args.target_kl:
            break
    policy_loss, v_loss, entropy, clipfrac, grad_norm = torch.stack(losses).mean(0).tolist()
    stats = {
        "losses/policy_loss": policy_loss,
        "losses/value_loss": v_loss,
        "losses/entropy": entropy,
        "losses/clipfrac": clipfrac,
        "losses/grad_norm": grad_norm,
    }
    return stats | {k: v.item() for k, v in ratio_stats(agent, batch).items()}


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect value function, 0 no better than a constant."""
    var_returns = returns.var()
    return float("nan") if var_returns == 0 else (1 - (returns - values).var() / var_returns).item()


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def train(args: Args) -> dict[str, float]:
    """Train PPO, or continue the run of the checkpoint `args.resume`. Returns the final global step,
    the mean raw return of the last 10 episodes, and the signal that stopped the run early (0: none)."""
    args, checkpoint, run_dir = start_run(args)
    env_kwargs, obs_dim, act_dim = check_run(args)
    writer, tracking = start_logging(args, run_dir, checkpoint)
    device = seed_and_device(args)

    video_dir = os.path.join(run_dir, "videos") if args.capture_video else None
    envs = make_envs(args.env_id, args.num_envs, args.async_envs, video_dir, env_kwargs)
    agent = Agent(obs_dim, act_dim, args.init_log_std).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    normalizer = Normalizer(obs_dim, args.num_envs, args.gamma)
    global_step, start_iteration = restore(checkpoint, agent, optimizer, normalizer, device) if checkpoint else (0, 1)
    train_step = compiled(minibatch_step, device) if args.compile else minibatch_step
    # On resume the statistics already hold the observation the run would have continued from: not counted twice.
    obs = normalizer.obs(envs.reset(seed=args.seed + (start_iteration - 1) * args.num_envs)[0], update=checkpoint is None)

    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    checkpoint_path = os.path.join(run_dir, f"{args.exp_name}.pt")
    # What a numerical fault leaves on disk: the last state that passed the checks, kept at the end of each iteration.
    last_good = checkpoint_state(agent, optimizer, normalizer, args, global_step, start_iteration - 1, device)
    recent_returns, stopped_by, start_step, start_time = deque(maxlen=10), 0, global_step, time.perf_counter()
    progress = tqdm(initial=global_step, total=num_iterations * batch_size, unit="step", unit_scale=True, mininterval=1.0)
    with stop_requests() as stop_requested:
        try:
            for iteration in range(start_iteration, num_iterations + 1):
                lr = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations) if args.anneal_lr else args.learning_rate
                optimizer.param_groups[0]["lr"] = lr

                rollout_start = time.perf_counter()
                rollout_batch, obs, episodes = rollout(envs, agent, normalizer, obs, args.num_steps)
                recent_returns += log_episodes(writer, episodes, global_step, args.num_envs)
                global_step += batch_size

                update_start = time.perf_counter()
                batch = make_batch(agent, rollout_batch, args.gamma, args.gae_lambda, device)
                stats = update(agent, optimizer, batch, args, train_step)
                update_end = time.perf_counter()
                check_finite(training_quantities(agent, normalizer, batch, stats), "after the update")

                stats |= {
                    "charts/SPS": int((global_step - start_step) / (update_end - start_time)),
                    "charts/learning_rate": lr,
                    "losses/explained_variance": explained_variance(batch["values"], batch["returns"]),
                    "perf/rollout_time": update_start - rollout_start,
                    "perf/update_time": update_end - update_start,
                }
                log_iteration(writer, progress, stats, global_step, batch_size, recent_returns)

                stopped_by = stop_requested()
                last_good = checkpoint_state(agent, optimizer, normalizer, args, global_step, iteration, device)
                if save_due(args, iteration, stopped_by):
                    save_checkpoint(checkpoint_path, last_good)
                if stopped_by:
                    break
        except NumericalFault as fault:
            raise stop_at_fault(fault, args, checkpoint_path, last_good, [progress, writer, envs]) from None
    return finish(args, checkpoint_path, last_good, stopped_by, recent_returns, writer, tracking, [progress, envs])


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
    batch_size = checkpoint["args"]["num_envs"] * checkpoint["args"]["num_steps"]
    if total_timesteps // batch_size < checkpoint["iteration"]:
        raise ArgsError(
            f"--total-timesteps {total_timesteps} is fewer than the checkpoint's {checkpoint['global_step']} steps"
        )
    saved = checkpoint["args"]
    if isinstance(saved["norm_adv"], bool):  # a checkpoint of the boolean --norm-adv: on was each minibatch
        saved = saved | {"norm_adv": "minibatch" if saved["norm_adv"] else "none"}
    taken_values = {"resume": args.resume, "total_timesteps": total_timesteps, "cuda": args.cuda, "compile": args.compile}
    return Args(**(saved | taken_values)), checkpoint, os.path.dirname(os.path.abspath(args.resume))


def check_run(args: Args) -> tuple[dict, int, int]:
    """Every check that could otherwise fail in the middle of the run, before anything is written: the arguments, the
    environment and the batch's memory. Returns the keyword arguments of `gym.make` and the observation and action sizes."""
    check_args(args)
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    obs_dim, act_dim = check_env(args.env_id, env_kwargs)
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
        (not 0 < args.learning_rate < inf, "--learning-rate must be positive and finite"),
        (not 1 <= args.update_epochs <= 1000, "--update-epochs must be between 1 and 1000"),
        (
            args.norm_adv != "none"
            and batch_size // (max(args.num_minibatches, 1) if args.norm_adv == "minibatch" else 1) < 2,
            f"--norm-adv {args.norm_adv} cannot standardize the advantages of one sample (--num-minibatches, --num-steps)",
        ),
        (not 0 < args.vf_coef < inf, "--vf-coef must be positive and finite"),
        (not 0 < args.max_grad_norm < inf, "--max-grad-norm must be positive and finite"),
        (
            not 0 < args.clip_coef < inf or (args.vf_clip_coef is not None and not 0 < args.vf_clip_coef < inf),
            "--clip-coef and --vf-clip-coef must be positive and finite",
        ),
        (args.target_kl is not None and not 0 < args.target_kl < inf, "--target-kl must be positive and finite"),
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


def check_env(env_id: str, env_kwargs: dict) -> tuple[int, int]:
    """Return (observation size, action size) of a Box-in, Box-out environment, or raise ArgsError."""
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
    obs_space, act_space = env.observation_space, env.action_space
    try:
        env.reset(seed=0)  # an environment that builds but cannot reset is refused here, not in the middle of a run
    except Exception as e:
        raise ArgsError(
            f"cannot reset environment '{env_id}': {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    finally:
        env.close()
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
            "algo": "ppo_continuous",
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
    if checkpoint["algo"] != "ppo_continuous":
        raise ArgsError(f"'{path}' is a checkpoint of {checkpoint['algo']}.py, not of ppo_continuous.py")
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
    """The boolean --norm-adv's spellings (CleanRL's), kept as aliases: `--norm-adv` alone is `--norm-adv minibatch`,
    `--no-norm-adv` is `--norm-adv none`."""
    spelled = []
    for i, arg in enumerate(argv):
        if arg == "--no-norm-adv":
            spelled += ["--norm-adv", "none"]
        elif arg == "--norm-adv" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            spelled += ["--norm-adv", "minibatch"]
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
