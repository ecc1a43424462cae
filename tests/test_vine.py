"""Vine TRPO (Section 5.2 of the TRPO paper) and the max-KL ablation: exact state restore, common random
numbers, the self-normalized estimator of eq. (17), the simulator-step count, learning, and the max-KL bound."""

import glob
import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import only_run_dir

import trpo_continuous as trpo
from utils.logs import read_scalars

STEPS = {"count": 0}


class CountingHopper(gym.Wrapper):
    """Hopper-v5 that counts every simulator step of every instance."""

    def __init__(self):
        super().__init__(gym.make("Hopper-v5").env)  # without the TimeLimit, which gym.make adds again

    def step(self, action):
        STEPS["count"] += 1
        return self.env.step(action)


if "tests/CountingHopper-v0" not in gym.registry:
    gym.register("tests/CountingHopper-v0", entry_point=CountingHopper, max_episode_steps=1000)


def _trajectory(env, actions):
    return [env.step(a)[:4] for a in actions]


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Ant-v5", "Humanoid-v5"])
def test_a_restored_state_replays_bit_identically(env_id):
    env, other = gym.make(env_id), gym.make(env_id)
    env.reset(seed=1)
    other.reset(seed=2)  # another episode altogether: everything that matters must come from the saved state
    rng = np.random.default_rng(0)
    for a in rng.uniform(-0.4, 0.4, (20, env.action_space.shape[0])):
        env.step(a)
    state = trpo.save_state(env)
    actions = rng.uniform(-0.4, 0.4, (30, env.action_space.shape[0]))
    original = _trajectory(env, actions)
    trpo.restore_state(other, state)
    replayed = _trajectory(other, actions)
    for (o1, r1, te1, tr1), (o2, r2, te2, tr2) in zip(original, replayed, strict=True):
        np.testing.assert_array_equal(o1, o2)
        assert (r1, te1, tr1) == (r2, te2, tr2)
    trpo.restore_state(other, state)  # a second restore of the same state: the first replay changed nothing in it
    assert all(np.array_equal(o1, o2) for (o1, *_), (o2, *_) in zip(original, _trajectory(other, actions), strict=True))


def test_the_time_limit_counter_continues_after_a_restore():
    env, other = gym.make("InvertedPendulum-v5", max_episode_steps=25), gym.make("InvertedPendulum-v5", max_episode_steps=25)
    env.reset(seed=0)
    other.reset(seed=0)
    for _ in range(20):
        env.step(np.zeros(1))
    trpo.restore_state(other, trpo.save_state(env))
    truncations = [other.step(np.zeros(1))[3] for _ in range(5)]
    assert truncations == [False, False, False, False, True]  # step 25 of the episode, as it would have been


def test_vine_surrogate_against_a_hand_computation_and_its_gradient():
    logratio = torch.tensor([[0.0, np.log(2.0), np.log(0.5)], [np.log(3.0), 0.0, 0.0]], requires_grad=True)
    q_values = torch.tensor([[1.0, 4.0, -2.0], [2.0, 0.0, 6.0]])
    # state 1: weights 1, 2, 0.5 -> (1 + 8 - 1) / 3.5; state 2: weights 3, 1, 1 -> (6 + 0 + 6) / 5
    expected = (8.0 / 3.5 + 12.0 / 5.0) / 2
    value = trpo.vine_surrogate(logratio, q_values)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    # d/d log w_k of sum_k w_k Q_k / sum_k w_k = p_k (Q_k - L_n), p_k = w_k / sum w; then averaged over the 2 states
    for n, (w, q) in enumerate([((1.0, 2.0, 0.5), (1.0, 4.0, -2.0)), ((3.0, 1.0, 1.0), (2.0, 0.0, 6.0))]):
        p = np.array(w) / sum(w)
        np.testing.assert_allclose(logratio.grad[n].numpy(), p * (np.array(q) - p @ np.array(q)) / 2, rtol=1e-6)


def test_a_constant_added_to_the_q_values_of_a_state_leaves_the_gradient_unchanged():
    torch.manual_seed(0)
    logratio, q_values = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    grads = []
    for shift in (torch.zeros(4, 1), torch.tensor([[3.0], [-7.0], [0.5], [100.0]])):
        logratio.grad = None
        trpo.vine_surrogate(logratio, q_values + shift).backward()
        grads.append(logratio.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


class RecordingEnv(gym.Wrapper):
    """Records the actions it receives and the observations it returns."""

    def __init__(self, env):
        super().__init__(env)
        self.actions, self.observations = [], []

    def step(self, action):
        self.actions.append(np.array(action))
        result = self.env.step(action)
        self.observations.append(result[0])
        return result


def test_the_branches_of_a_state_share_their_noise_after_the_first_action():
    num_states, num_actions, horizon = 2, 3, 6
    trunk = gym.make("Hopper-v5")
    trunk.reset(seed=0)
    states, state_obs = [], []
    normalizer = trpo.Normalizer(11, 1, 0.99)
    for _ in range(num_states):
        states.append(trpo.save_state(trunk))
        state_obs.append(normalizer.obs(trunk.unwrapped._get_obs()[None], update=False)[0])
        trunk.step(np.full(3, 0.1))
    branches = [RecordingEnv(gym.make("Hopper-v5")) for _ in range(num_states * num_actions)]
    for env in branches:
        env.reset(seed=0)
    agent = trpo.Agent(11, 3)
    with torch.no_grad():
        agent.actor_logstd.fill_(np.log(0.1))  # small noise: no clipping at the action bounds, no fall within 6 steps
    torch.manual_seed(0)
    vine, steps = trpo.vine_rollouts(branches, states, np.stack(state_obs), agent, normalizer, 0.99, horizon)
    assert steps == num_states * num_actions * horizon
    mean = trpo.numpy_actor(agent)
    for n in range(num_states):
        group = [branches[n * num_actions + k].actions for k in range(num_actions)]
        firsts = np.stack([actions[0] for actions in group])
        np.testing.assert_allclose(firsts, vine["actions"][n], rtol=1e-6)
        assert len({tuple(a) for a in firsts}) == num_actions  # K different first actions
        for t in range(1, horizon):
            # the noise a - mu(s) of step t is the same in the K branches (their states, and so mu(s), differ)
            seen = [
                normalizer.obs(branches[n * num_actions + k].observations[t - 1][None], update=False)
                for k in range(num_actions)
            ]
            noises = [actions[t] - mean(obs)[0] for actions, obs in zip(group, seen, strict=True)]
            assert not np.allclose(mean(seen[0]), mean(seen[1]))
            for other in noises[1:]:
                np.testing.assert_allclose(other, noises[0], atol=1e-5)

    def noise_of_state(n):  # the noise of the second step of state n's first branch
        branch = branches[n * num_actions]
        return branch.actions[1] - mean(normalizer.obs(branch.observations[0][None], update=False))[0]

    assert not np.allclose(noise_of_state(0), noise_of_state(1))  # each state has its own sequence


def test_every_simulator_step_of_trunk_and_branches_counts_in_the_global_step():
    STEPS["count"] = 0
    args = trpo.Args(
        env_id="tests/CountingHopper-v0",
        sampling="vine",
        num_steps=256,
        vine_states=4,
        vine_actions=3,
        vine_horizon=20,
        total_timesteps=3 * (256 + 4 * 3 * 20),
    )
    summary = trpo.train(args)
    STEPS["count"] -= 1  # check_run's one probing step, before training
    assert summary["global_step"] == STEPS["count"]  # env.step calls, trunk and branches
    scalars = read_scalars(only_run_dir())
    branch_steps = [value for _, value in scalars["trpo/branch_steps"]]
    assert len(branch_steps) == 3 and STEPS["count"] == 3 * 256 + sum(branch_steps)
    # the KL over the trunk's states after each step (the constraint bounds it over the rollout set's only): logged, >= 0
    assert len(scalars["trpo/trunk_kl"]) == 3 and all(0 <= value < float("inf") for _, value in scalars["trpo/trunk_kl"])
    assert [step for step, _ in scalars["charts/SPS"]][-1] == summary["global_step"]


def _policy_step_batch(num_states=64):
    """A random agent and a batch of states, actions and advantages for one policy step."""
    torch.manual_seed(1)
    agent = trpo.Agent(5, 2)
    obs = torch.randn(num_states, 5) * 2
    with torch.no_grad():
        actions = agent.actor_mean(obs) + torch.randn(num_states, 2)
        logprobs = agent.log_prob(obs, actions)
    batch = {
        "obs": obs,
        "actions": actions,
        "logprobs": logprobs,
        "advantages": torch.randn(num_states) * (1 + obs[:, 0].abs()),
        "returns": torch.randn(num_states),
        "values": torch.zeros(num_states),
    }
    return agent, batch


@pytest.mark.parametrize("kl_constraint", ["mean", "max"])
def test_max_kl_bounds_the_kl_of_every_state(kl_constraint):
    agent, batch = _policy_step_batch()
    with torch.no_grad():
        mean_old, log_std_old = agent.actor_mean(batch["obs"]), agent.actor_logstd.clone()
    args = trpo.Args(max_kl=0.01, kl_constraint=kl_constraint, num_minibatches=4)
    optimizer = torch.optim.Adam(agent.critic.parameters(), lr=1e-3)
    stats = trpo.update(agent, optimizer, batch, args)
    with torch.no_grad():
        per_state = trpo.gaussian_kl(mean_old, log_std_old, agent.actor_mean(batch["obs"]), agent.actor_logstd)
    assert stats["trpo/line_search_steps"] >= 0 and per_state.mean() > 0  # a step was taken
    assert stats["trpo/max_kl"] == pytest.approx(per_state.max().item(), rel=1e-5)
    if kl_constraint == "max":
        assert per_state.max() <= 0.01 and stats["trpo/kl"] == pytest.approx(per_state.max().item(), rel=1e-5)
    else:  # the mean constraint lets some states go beyond delta: the max test is not trivially met
        assert per_state.mean() <= 0.01 < per_state.max()


def test_vine_balances_inverted_pendulum():
    """A random policy scores < 10; vine TRPO balances the pole within this budget."""
    summary = trpo.train(
        trpo.Args(
            env_id="InvertedPendulum-v5",
            sampling="vine",
            total_timesteps=VINE_BUDGET,
            num_steps=512,
            vine_states=16,
            vine_actions=4,
            vine_horizon=25,
            seed=1,
        )
    )
    assert summary["mean_return"] >= 500, summary


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(env_id="tests/Counter-v0"),
            "--sampling vine restores the simulator's state, which this script can do for MuJoCo environments only",
        ),
        (dict(vine_actions=1), "--vine-actions must be in [2, inf)"),
        (dict(vine_states=2000), "--vine-states 2000 is more than the trunk's 1024 steps"),
        (
            dict(async_envs=True, num_envs=2),
            "--sampling vine saves the trunk's states, which --async-envs keeps in subprocesses",
        ),
        (
            dict(total_timesteps=10_000),
            "--total-timesteps 10000 is smaller than one vine iteration (1024 trunk + 12800 branch steps)",
        ),
    ],
)
def test_bad_vine_arguments_are_refused(overrides, message):
    with pytest.raises(trpo.ArgsError, match=re.escape(message)):
        trpo.train(trpo.Args(**({"env_id": "Hopper-v5", "sampling": "vine"} | overrides)))
    assert not glob.glob("runs/*")


VINE_BUDGET = 60_000


def test_vine_rollouts_against_a_branch_by_branch_replay():
    """Each branch replayed alone: from its state, the action a_nk = mu(s_n) + sigma eps_nk, then mu(s) + sigma eps_n,t,
    the noise its state's K branches share; the environment gets the actions clipped to its bounds; the return sums
    gamma^t times the reward normalized with frozen statistics, until a termination (bootstrap discount 0), the time
    limit or the horizon (gamma^steps). The three states are chosen so that all three endings occur."""
    num_states, num_actions, horizon, gamma = 3, 2, 16, 0.9
    rng = np.random.default_rng(0)
    trunk = gym.make("Hopper-v5")
    obs, _ = trunk.reset(seed=0)
    normalizer = trpo.Normalizer(11, 1, 0.99)
    states, state_obs = [], []
    for n in range(num_states):
        for _ in range(5):
            obs, reward, *_ = trunk.step(rng.uniform(-1, 1, 3))
            normalizer.obs(obs[None])
            normalizer.reward(np.array([reward]), np.array([False]))
        if n == 2:  # 10 steps from the time limit: its branches are truncated
            trpo.time_limit(trunk)._elapsed_steps = 990
        states.append(trpo.save_state(trunk))
        state_obs.append(normalizer.obs(obs[None], update=False)[0])
    torch.manual_seed(0)
    agent = trpo.Agent(11, 3, init_log_std=0.5)  # sigma = 1.65: many actions outside the bounds [-1, 1]
    branch_envs = [gym.make("Hopper-v5") for _ in range(num_states * num_actions)]
    for env in branch_envs:
        env.reset(seed=1)
    torch.manual_seed(7)
    vine, steps = trpo.vine_rollouts(branch_envs, states, np.stack(state_obs), agent, normalizer, gamma, horizon)

    torch.manual_seed(7)
    sigma = agent.actor_logstd.detach().exp()
    first = (sigma * torch.randn((num_states, num_actions, 3))).numpy()
    shared = (sigma * torch.randn((num_states, horizon - 1, 3))).numpy()
    mu = trpo.numpy_actor(agent)
    env, taken, endings = gym.make("Hopper-v5"), 0, set()
    env.reset(seed=2)
    for n in range(num_states):
        for k in range(num_actions):
            trpo.restore_state(env, states[n])
            action = mu(state_obs[n][None])[0] + first[n, k]
            np.testing.assert_allclose(vine["actions"][n, k], action, rtol=1e-6)
            ret, discount, ending = 0.0, 1.0, "horizon"
            for t in range(horizon):
                raw, reward, terminated, truncated, _ = env.step(np.clip(action, -1.0, 1.0))
                taken += 1
                ret += discount * normalizer.reward(np.array([reward]), None, update=False)[0]
                discount *= gamma
                last = normalizer.obs(raw[None], update=False)[0]
                if terminated or truncated:
                    discount, ending = (0.0, "terminated") if terminated else (discount, "truncated")
                    break
                action = mu(last[None])[0] + shared[n, t] if t + 1 < horizon else action
            endings.add(ending)
            assert vine["returns"][n, k] == pytest.approx(ret, rel=1e-4), (n, k)
            assert vine["bootstrap_discount"][n, k] == pytest.approx(discount, rel=1e-6), (n, k)
            np.testing.assert_allclose(vine["bootstrap_obs"][n, k], last, rtol=1e-4, atol=1e-5)
    assert steps == taken and endings == {"terminated", "truncated", "horizon"}
    assert all(v.dtype == np.float32 for k, v in vine.items() if k != "obs")


class NaNObservation(gym.Wrapper):
    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs * np.nan, reward, terminated, truncated, info


def test_a_non_finite_branch_observation_stops_training_and_a_one_step_horizon_draws_no_shared_noise():
    trunk = gym.make("Hopper-v5")
    obs, _ = trunk.reset(seed=0)
    normalizer, agent = trpo.Normalizer(11, 1, 0.99), trpo.Agent(11, 3)
    states, state_obs = [trpo.save_state(trunk)], normalizer.obs(obs[None], update=False)
    envs = [gym.make("Hopper-v5") for _ in range(2)]
    for env in envs:
        env.reset(seed=1)
    # One step: the observation is NaN, the reward is not (and no action is computed from the NaN).
    with pytest.raises(
        trpo.NumericalFault, match="^the environment returned a non-finite observation or reward in a branch rollout$"
    ):
        trpo.vine_rollouts([NaNObservation(env) for env in envs], states, state_obs, agent, normalizer, 0.99, 1)
    torch.manual_seed(3)
    _, steps = trpo.vine_rollouts(envs, states, state_obs, agent, normalizer, 0.99, 1)
    after = torch.randn(1)
    torch.manual_seed(3)
    torch.randn((1, 2, 3))  # the first actions' noise only: a horizon of 1 leaves no step for the shared sequence
    assert steps == 2 and torch.equal(after, torch.randn(1))
