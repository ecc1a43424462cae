"""Trust-Region-Free Policy Optimization (TREFree) for continuous control (Gymnasium 1.x, MuJoCo), in one file.

Sun, Ellis, Mahajan, Devlin, Hofmann, Whiteson (2023), "Trust-Region-Free Policy Optimization for Stochastic Policies",
arXiv:2302.07985. Equation, algorithm and section numbers in the comments refer to that paper. TREFree maximises the
generalized surrogate G(pi~) = E[(pi~/pi - 1) A], eq. (6), conservatively: each sample's term is capped at a margin
delta (Algorithm 1), with no trust region on the policy. The rest follows Section 4: observation, reward and batch-level
advantage normalization, actor and critic MLPs (2 x 64 tanh) that share their first layer, a learning rate decayed
linearly from 3e-4 to 0. pi is the policy that collected the batch (pi_old in the other scripts), pi~_theta the new one.

    python trefree_continuous.py --env-id Hopper-v5 --seed 1
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
import numpy as np
import torch
import torch.nn as nn
import typeguard
import tyro
from torch import Tensor
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
    """compile the minibatch step with torch.compile (eager if it cannot); unset: only a run of 70,000 of them or more"""
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
    norm_adv: Literal["batch", "minibatch", "none"] = "batch"
    """where the advantages are standardized: the whole batch (Section 4), each minibatch (PPO's way), or nowhere"""
    delta: float = 0.1
    """Algorithm 1's margin delta on each sample's (r - 1) A; the paper's is 0.01, 0.1 did best here (README); inf: no cap"""
    conservative: Literal["objective", "ratio", "none"] = "objective"
    """how G is optimised (Section 3.2): cap the objective (TREFree), clip the ratio deviation, or neither"""
    ratio_clip: float = 0.2
    """lambda of the ratio-conservative variant, clip(r - 1, -lambda, lambda) A (`--conservative ratio`)"""
    share_first_layer: bool = True
    """if toggled, actor and critic share their first layer (Section 4); otherwise two separate MLPs"""
    clip_vloss: bool = False
    """if toggled, clip the value loss as in Baselines' ppo2, with range `vf_clip_coef` (off: the paper has none)"""
    vf_clip_coef: float = 0.2
    """the value clipping range of `--clip-vloss` (Baselines' ppo2's 0.2)"""
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


# Each numerical flag's interval (NaN lies in none): `check_run` refuses a value outside it before anything is built.
BOUNDS = {
    "[0, 4294967295]": ("seed",),
    "[1, inf)": ("num_envs", "num_steps", "num_minibatches"),
    "[0, inf)": ("checkpoint_interval", "ent_coef"),
    "[1, 1000]": ("update_epochs",),
    "[0, 1]": ("gamma", "gae_lambda"),
    "(0, inf)": ("learning_rate", "ratio_clip", "vf_clip_coef", "vf_coef", "max_grad_norm", "target_kl"),
    "(0, inf]": ("delta",),  # inf: no cap
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

    def reward(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
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


class Agent(nn.Module):
    """Actor and critic MLPs that share their first layer (Section 4), or not; a Gaussian policy whose log-std is a free
    parameter of the actor (Baselines' reading of Section 4's "mean and variance parameterized by the actor")."""

    def __init__(self, obs_dim: int, act_dim: int, share_first_layer: bool = True, init_log_std: float = 0.0):
        super().__init__()
        self.critic = mlp(obs_dim, 1, out_std=1.0)
        self.actor_mean = mlp(obs_dim, act_dim, out_std=0.01)
        if share_first_layer:
            self.critic[0] = self.actor_mean[0]  # one nn.Linear in both: the value loss trains it too
        self.actor_logstd = nn.Parameter(torch.full((act_dim,), init_log_std))

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """log pi(a|s) = sum_i log N(a_i | mu_i(s), sigma_i^2)."""
        log_std = self.actor_logstd
        return (-0.5 * ((actions - self.actor_mean(obs)) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

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
    envs: gym.vector.VectorEnv, agent: Agent, normalizer: Normalizer, obs: np.ndarray, num_steps: int
) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[int, float, int]]]:
    """Run the policy for `num_steps` steps in every environment. Returns the transitions as (num_steps, num_envs, ...)
    arrays, the normalized observation to continue from, and the finished episodes as (step index, raw return, length).
    `next_obs[t]` is the normalized successor of `obs[t]`: the episode's final observation when it ended at t, so that a
    truncated episode can be bootstrapped from V(final observation)."""
    num_envs, act_dim = envs.num_envs, envs.single_action_space.shape[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high
    shapes = dict(obs=obs.shape[1:], next_obs=obs.shape[1:], actions=(act_dim,), rewards=(), terminations=(), dones=())
    batch = {k: np.zeros((num_steps, num_envs, *shape), np.float32) for k, shape in shapes.items()}
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
        raise NumericalFault(f"the environment returned a non-finite observation or reward at rollout step {finite.argmin()}")
    return batch, obs, episodes


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


# TREFree loss and update ----------------------------------------------------------------------------------------------
def trefree_loss(
    logratio: Tensor, advantages: Tensor, delta: float, conservative: str = "objective", ratio_clip: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Negative conservative surrogate -L(theta) (Section 3.2), and which samples' terms are capped (zero gradient)."""
    deviation = logratio.exp() - 1  # the ratio deviation r - 1, r = pi~_theta(a|s) / pi(a|s)
    if conservative == "ratio":  # ratio-conservative: clip(r - 1, -lambda, lambda) A
        return -(deviation.clamp(-ratio_clip, ratio_clip) * advantages).mean(), deviation.abs() > ratio_clip
    term = deviation * advantages  # (r - 1) A, a sample's term of the surrogate G, eq. (6)
    cap = delta if conservative == "objective" else math.inf  # TREFree (Algorithm 1), or none: G optimised as it is
    return -term.clamp(max=cap).mean(), term > cap  # min((r - 1) A, delta): only the upper side is capped


def value_loss(new_values: Tensor, old_values: Tensor, returns: Tensor, clip_coef: float, clip_vloss: bool) -> Tensor:
    """0.5 (V - R)^2; with `clip_vloss`, Baselines' pessimistic max over V and V clipped to old_V ± clip_coef."""
    loss = (new_values - returns) ** 2
    if clip_vloss:
        clipped = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * loss.mean()


@torch.no_grad()
def standardize(x: Tensor) -> Tensor:
    """Zero mean, unit variance."""
    return (x - x.mean()) / (x.std() + 1e-8)


@torch.no_grad()
def ratio_stats(agent: Agent, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ratio r = pi~_theta / pi over the batch (extremes, 5th and 95th percentiles of log r) and the approximate KL."""
    logratio = agent.log_prob(batch["obs"], batch["actions"]) - batch["logprobs"]
    ratio = logratio.exp()
    log_p05, log_p95 = torch.quantile(logratio, torch.tensor([0.05, 0.95], device=logratio.device))
    objective = ((ratio - 1) * batch["advantages"]).mean()  # the uncapped surrogate G, eq. (6)
    stats = {"ratio/max": ratio.max(), "ratio/min": ratio.min(), "losses/approx_kl": ((ratio - 1) - logratio).mean()}
    return stats | {"ratio/log_p95": log_p95, "ratio/log_p05": log_p05, "losses/objective": objective}


def minibatch_step(agent: Agent, optimizer: torch.optim.Adam, mb: dict[str, Tensor], args: Args) -> Tensor:
    """One gradient step on a minibatch: the loss, `loss.backward()`, global-norm clipping, `optimizer.step()`. The eager
    and the compiled update both run this function. Returns (policy loss, value loss, entropy, capped fraction, gradient
    norm)."""
    logratio = agent.log_prob(mb["obs"], mb["actions"]) - mb["logprobs"]
    advantages = standardize(mb["advantages"]) if args.norm_adv == "minibatch" else mb["advantages"]
    policy_loss, capped = trefree_loss(logratio, advantages, args.delta, args.conservative, args.ratio_clip)
    v_loss = value_loss(agent.value(mb["obs"]), mb["values"], mb["returns"], args.vf_clip_coef, args.clip_vloss)
    entropy = agent.entropy()
    loss = policy_loss - args.ent_coef * entropy + args.vf_coef * v_loss  # -L(theta), Algorithm 1, with the critic's loss

    optimizer.zero_grad()
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    return torch.stack([policy_loss, v_loss, entropy, capped.float().mean(), grad_norm]).detach()


def update(agent: Agent, optimizer: torch.optim.Adam, batch: dict[str, Tensor], args: Args, step=minibatch_step) -> dict:
    """`update_epochs` passes of minibatch gradient steps (`step`: `minibatch_step`, or it compiled); returns the
    iteration's statistics."""
    batch_size = batch["obs"].shape[0]
    if args.norm_adv == "batch":  # Section 4: advantages are normalized "only within a training batch"
        batch = batch | {"advantages": standardize(batch["advantages"])}
    losses = []
    for _ in range(args.update_epochs):
        for indices in torch.randperm(batch_size, device=batch["obs"].device).split(batch_size // args.num_minibatches):
            losses.append(step(agent, optimizer, {k: v[indices] for k, v in batch.items()}, args))
        if args.target_kl is not None and ratio_stats(agent, batch)["losses/approx_kl"] > args.target_kl:
            break
    tags = ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/capfrac", "losses/grad_norm")
    stats = dict(zip(tags, torch.stack(losses).mean(0).tolist(), strict=True))  # the means over the minibatch steps
    return stats | {k: v.item() for k, v in ratio_stats(agent, batch).items()}


def explained_variance(values: Tensor, returns: Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect value function, 0 no better than a constant."""
    var_returns = returns.var()
    return float("nan") if var_returns == 0 else (1 - (returns - values).var() / var_returns).item()


# Training -------------------------------------------------------------------------------------------------------------
def make_agent(args: Args, obs_dim: int, act_dim: int, device: torch.device, checkpoint=None, rng=torch.default_generator):
    """A new run's agent, optimizer and statistics, or the checkpoint's with its random generators (an error if unfit)."""
    agent = Agent(obs_dim, act_dim, args.share_first_layer, args.init_log_std).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
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
    """Train TREFree, or continue the run of the checkpoint `args.resume`. Returns the final global step, the mean raw return
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
        agent, optimizer, normalizer = make_agent(args, run.obs_dim, run.act_dim, device, checkpoint)
        global_step, start_iteration = (checkpoint["global_step"], checkpoint["iteration"] + 1) if checkpoint else (0, 1)
        batch_size = args.num_envs * args.num_steps
        num_iterations = args.total_timesteps // batch_size
        # Compiling costs 7-17 s once, repaid after ~70,000 minibatch steps (README): by default only a run that long.
        long_run = num_iterations * args.update_epochs * args.num_minibatches >= 70_000
        train_step = compiled(minibatch_step) if args.compile or args.compile is None and long_run else minibatch_step
        # On resume the statistics already hold the observation the run would have continued from: not counted twice.
        obs = normalizer.obs(envs.reset(seed=args.seed + (start_iteration - 1) * args.num_envs)[0], update=checkpoint is None)
        run.checkpoint(checkpoint_state(agent, optimizer, normalizer, args, global_step, start_iteration - 1, device))

        for iteration in range(start_iteration, num_iterations + 1):
            lr = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations) if args.anneal_lr else args.learning_rate
            optimizer.param_groups[0]["lr"] = lr

            rollout_start = time.perf_counter()
            rollout_batch, obs, episodes = rollout(envs, agent, normalizer, obs, args.num_steps)
            episodes = [(global_step + (t + 1) * args.num_envs, ret, length) for t, ret, length in episodes]
            global_step += batch_size

            update_start = time.perf_counter()
            batch = make_batch(agent, rollout_batch, args.gamma, args.gae_lambda, device)
            stats = update(agent, optimizer, batch, args, train_step)
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
        self.total = self.args.total_timesteps // (batch := self.args.num_envs * self.args.num_steps) * batch  # steps to run
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
    if total // (saved["num_envs"] * saved["num_steps"]) < checkpoint["iteration"]:
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
    if args.norm_adv != "none" and batch_size // (args.num_minibatches if args.norm_adv == "minibatch" else 1) < 2:
        raise ArgsError(f"--norm-adv {args.norm_adv} cannot standardize the advantages of one sample")
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    try:  # made, reset and stepped once here, so that whatever the environment refuses is refused before anything is written
        env = gym.make(args.env_id, **env_kwargs)
        for name, space in (("observation", env.observation_space), ("action", env.action_space)):
            if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
                raise ArgsError(f"{args.env_id} has {name} space {space}; this script needs a 1-D Box")
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
    state = dict(algo="trefree_continuous", args=asdict(args), env_kwargs=parse_env_kwargs(args.env_kwargs))
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
        if checkpoint["algo"] != "trefree_continuous":
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
        raise ArgsError(f"'{path}' is not a checkpoint of trefree_continuous.py: {reason}") from None
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
