"""TRPO's own pieces against independent references: conjugate gradient, the Fisher-vector products
(an explicit Hessian, a dense score matrix), the analytic KL, and the line search's guarantees."""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

import trpo_continuous as trpo


def _tiny_agent(obs_dim: int = 3, act_dim: int = 2) -> trpo.Agent:
    """An agent whose policy is a 3-unit MLP, so that its Hessian is small enough to form; float64."""
    torch.manual_seed(0)
    agent = trpo.Agent(obs_dim, act_dim)
    agent.actor_mean = trpo.mlp(obs_dim, act_dim, out_std=1.0, hidden=3)
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([-0.3, 0.4]))
    return agent.double()


def test_conjugate_gradient_solves_a_random_spd_system():
    torch.manual_seed(0)
    m = torch.randn(20, 20, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, dtype=torch.float64)
    x, residual = trpo.conjugate_gradient(lambda v: a @ v, b, iters=60)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-6, atol=1e-6)
    assert residual < 1e-5 and residual == pytest.approx((b - a @ x).norm().item(), abs=1e-6)


def test_gaussian_kl_equals_torch_kl_divergence():
    mean_old, mean = torch.randn(5, 3), torch.randn(5, 3)
    log_std_old, log_std = torch.tensor([0.1, -0.5, 0.3]), torch.tensor([-0.2, 0.0, 0.6])
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_old, log_std_old.exp()), torch.distributions.Normal(mean, log_std.exp())
    ).sum(-1)
    torch.testing.assert_close(trpo.gaussian_kl(mean_old, log_std_old, mean, log_std), reference)


def _kl_hessian(agent: trpo.Agent, obs: torch.Tensor) -> torch.Tensor:
    """The explicit Hessian of the mean KL(pi_old || pi_theta) at theta = theta_old, by torch.autograd.functional."""
    params = agent.policy_parameters()
    names = [name for name, _ in agent.actor_mean.named_parameters()]
    with torch.no_grad():
        mean_old, log_std_old = agent.actor_mean(obs), agent.actor_logstd.clone()

    def mean_kl_of(theta: torch.Tensor) -> torch.Tensor:
        chunks = theta.split([p.numel() for p in params])
        # The mean network's parameters; the last chunk is the log-std.
        mean_params = {name: c.view_as(p) for name, c, p in zip(names, chunks, params, strict=False)}
        mean = functional_call(agent.actor_mean, mean_params, (obs,))
        return trpo.gaussian_kl(mean_old, log_std_old, mean, chunks[-1]).mean()

    return torch.autograd.functional.hessian(mean_kl_of, parameters_to_vector(params).detach())


def test_analytic_fvp_equals_the_explicit_hessian_of_the_mean_kl():
    agent = _tiny_agent()
    obs = torch.randn(10, 3, dtype=torch.float64)
    hessian = _kl_hessian(agent, obs)
    mean = agent.actor_mean(obs)
    kl = trpo.gaussian_kl(mean.detach(), agent.actor_logstd.detach(), mean, agent.actor_logstd).mean()
    fvp = trpo.analytic_fvp(kl, agent.policy_parameters(), damping=0.1)
    for _ in range(3):
        v = torch.randn(hessian.shape[0], dtype=torch.float64)
        torch.testing.assert_close(fvp(v), hessian @ v + 0.1 * v)


def test_empirical_fvp_equals_the_dense_score_covariance():
    agent = _tiny_agent()
    obs, actions = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    params = agent.policy_parameters()
    rows = []  # one backward pass per sample: the reference score matrix
    for o, a in zip(obs, actions, strict=True):
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(agent.log_prob(o[None], a[None]).sum(), params)]))
    dense = torch.stack(rows)
    scores = trpo.score_matrix(agent, obs, actions)
    torch.testing.assert_close(scores, dense)
    v = torch.randn(dense.shape[1], dtype=torch.float64)
    torch.testing.assert_close(trpo.empirical_fvp(scores, damping=0.1)(v), dense.T @ (dense @ v) / 12 + 0.1 * v)


def test_line_search_takes_the_first_step_inside_the_kl_bound():
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    c = torch.tensor([1.0, 0.5], dtype=torch.float64)
    full_step = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # KL = 5 |theta|^2: 10 at the full step, 10 / 4^k after k halvings, first <= 0.01 at k = 5
    steps, kl, improvement = trpo.line_search([theta], full_step, lambda: theta @ c, lambda: 5 * (theta**2).sum(), 0.01, 10)
    assert steps == 5 and kl == pytest.approx(10 / 4**5) and improvement == pytest.approx(1.5 / 2**5)
    torch.testing.assert_close(theta.detach(), full_step / 2**5)


def _random_line_search(generator: torch.Generator):
    """A line search on a random problem: surrogate c . theta (may rise or fall along the step), KL s |theta - theta_old|^2."""
    theta_old = torch.randn(4, dtype=torch.float64, generator=generator)
    theta = torch.nn.Parameter(theta_old.clone())
    c = torch.randn(4, dtype=torch.float64, generator=generator)
    scale = 10 ** torch.empty(1).uniform_(-3, 3, generator=generator).item()
    full_step = torch.randn(4, dtype=torch.float64, generator=generator)
    steps, kl, improvement = trpo.line_search(
        [theta], full_step, lambda: theta @ c, lambda: scale * ((theta - theta_old) ** 2).sum(), 0.01, 10
    )
    return steps, kl, improvement, theta, theta_old, full_step, (scale * ((theta - theta_old) ** 2).sum()).item()


def test_line_search_never_exceeds_the_bound_and_restores_theta_when_nothing_improves():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        steps, kl, improvement, theta, theta_old, full_step, measured_kl = _random_line_search(generator)
        if steps >= 0:
            assert measured_kl <= 0.01 and kl == pytest.approx(measured_kl) and improvement > 0
            torch.testing.assert_close(theta.detach(), theta_old + 0.5**steps * full_step)
        else:
            assert torch.equal(theta.detach(), theta_old)
    # a surrogate that falls along the step: rejected, theta_old kept exactly
    theta = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    steps, _, _ = trpo.line_search(
        [theta], torch.ones(2, dtype=torch.float64), lambda: -theta.sum(), lambda: theta.sum() * 0, 0.01, 10
    )
    assert steps == -1 and torch.equal(theta.detach(), torch.ones(2, dtype=torch.float64))


def test_penalty_step_rule_takes_a_fixed_natural_gradient_step():
    """--step-rule penalty: theta moves by exactly eta (A + damping I)^-1 g, whatever the KL (Section 7, eq. 18)."""
    agent = _tiny_agent()
    obs, actions, advantages = torch.randn(64, 3), torch.randn(64, 2), torch.randn(64)
    batch = {"obs": obs, "actions": actions, "advantages": advantages, "values": torch.zeros(64), "returns": torch.randn(64)}
    batch = {k: v.double() for k, v in batch.items()}
    with torch.no_grad():
        batch["logprobs"] = agent.log_prob(batch["obs"], batch["actions"])
    # References at theta_old: g = grad E[r A] = E[A grad log pi] (advantages standardized), and A explicitly.
    normalized = (batch["advantages"] - batch["advantages"].mean()) / (batch["advantages"].std() + 1e-8)
    params = agent.policy_parameters()
    g = torch.cat(
        [
            p.flatten()
            for p in torch.autograd.grad((agent.log_prob(batch["obs"], batch["actions"]) * normalized).mean(), params)
        ]
    )
    hessian = _kl_hessian(agent, batch["obs"])
    theta_old = parameters_to_vector(params).detach().clone()

    args = trpo.Args(step_rule="penalty", npg_step_size=0.5, cg_iters=200, num_minibatches=4, vf_iters=1)
    stats = trpo.update(agent, torch.optim.Adam(agent.critic.parameters()), batch, args)
    step = parameters_to_vector(agent.policy_parameters()).detach() - theta_old
    identity = torch.eye(len(g), dtype=torch.float64)
    # CG stops once its residual norm is below 1e-5 (||r||^2 < 1e-10); g itself has norm ~0.1 here.
    assert ((hessian + 0.1 * identity) @ step / 0.5 - g).norm() < 2e-5 and g.norm() > 1e-2
    assert stats["trpo/line_search_steps"] == 0 and stats["trpo/step_norm"] == pytest.approx(step.norm().item())


@pytest.mark.parametrize("step_rule", ["constraint", "penalty"])
def test_a_zero_policy_gradient_skips_the_policy_step(step_rule):
    """Constant advantages standardize to exactly 0, so g = 0 and conjugate gradient would divide 0 by 0 (NaN parameters
    with --step-rule penalty, a NaN residual with the line search). The step is skipped instead, as Baselines does ("Got
    zero gradient. not updating"): theta unchanged, every statistic finite, and `trpo/zero_gradient` says so."""
    agent = _tiny_agent()
    batch = {
        "obs": torch.randn(64, 3),
        "actions": torch.randn(64, 2),
        "advantages": torch.full((64,), 2.0),
        "values": torch.zeros(64),
        "returns": torch.randn(64),
    }
    batch = {k: v.double() for k, v in batch.items()}
    with torch.no_grad():
        batch["logprobs"] = agent.log_prob(batch["obs"], batch["actions"])
    theta_old = parameters_to_vector(agent.policy_parameters()).detach().clone()
    stats = trpo.update(
        agent,
        torch.optim.Adam(agent.critic.parameters()),
        batch,
        trpo.Args(step_rule=step_rule, num_minibatches=4, vf_iters=1),
    )
    assert torch.equal(parameters_to_vector(agent.policy_parameters()).detach(), theta_old)
    assert stats["trpo/zero_gradient"] == 1.0 and stats["trpo/line_search_steps"] == -1 and stats["losses/grad_norm"] == 0.0
    assert all(math.isfinite(value) for value in stats.values()), stats
    assert [stats[f"trpo/{k}"] for k in ("kl", "surrogate_improvement", "cg_residual", "step_norm")] == [0.0] * 4


def test_the_full_step_has_quadratic_kl_delta_and_its_measured_kl_is_close():
    """beta = sqrt(2 delta / s^T A s) makes the full step's quadratic KL, 1/2 (beta s)^T H (beta s) with H the explicit
    Hessian of the mean KL, equal delta (damping 0, so that A = H); on a small step the measured KL agrees to second order."""
    agent = _tiny_agent()
    torch.manual_seed(3)
    batch = {
        "obs": torch.randn(64, 3),
        "actions": torch.randn(64, 2),
        "advantages": torch.randn(64),
        "values": torch.zeros(64),
        "returns": torch.randn(64),
    }
    batch = {k: v.double() for k, v in batch.items()}
    with torch.no_grad():
        batch["logprobs"] = agent.log_prob(batch["obs"], batch["actions"])
    hessian = _kl_hessian(agent, batch["obs"])
    theta_old = parameters_to_vector(agent.policy_parameters()).detach().clone()
    delta = 1e-8  # small: the KL's terms beyond the quadratic (~sqrt(delta) relative) vanish
    args = trpo.Args(max_kl=delta, cg_damping=0.0, cg_iters=100, num_minibatches=4, vf_iters=1)
    stats = trpo.update(agent, torch.optim.Adam(agent.critic.parameters()), batch, args)
    assert stats["trpo/line_search_steps"] == 0  # the full step was taken
    step = parameters_to_vector(agent.policy_parameters()).detach() - theta_old
    assert (0.5 * step @ hessian @ step).item() == pytest.approx(delta, rel=1e-6)
    # The measured (analytic) KL of the step; a step aimed at delta/4 fails.
    assert stats["trpo/kl"] == pytest.approx(delta, rel=0.01)


def test_vine_q_values_against_hand_computed_ones():
    """Q(s_n, a_nk) = the branch's discounted normalized return + gamma^T V(last observation), with no bootstrap after a
    termination (discount 0): with V = 2 everywhere (a critic that outputs its bias), each Q is return + 2 discount."""
    agent = trpo.Agent(3, 2)
    with torch.no_grad():
        last = agent.critic[-1]
        last.weight.zero_()
        last.bias.fill_(2.0)
    gamma = 0.9
    vine = {
        "obs": np.zeros((2, 3), np.float32),
        "actions": np.zeros((2, 2, 2), np.float32),
        # state 0: branch 0 ran the horizon of 3 steps (rewards 1, 1, 1), branch 1 terminated after 2 steps (rewards 1, 1)
        # state 1: branch 0 reached the time limit after 1 step (reward 5), branch 1 terminated at once (reward -1)
        "returns": np.array([[1 + gamma + gamma**2, 1 + gamma], [5.0, -1.0]], np.float32),
        "bootstrap_obs": np.ones((2, 2, 3), np.float32),
        "bootstrap_discount": np.array([[gamma**3, 0.0], [gamma, 0.0]], np.float32),
    }
    q = trpo.make_vine_batch(agent, vine, torch.device("cpu"))["q_values"]
    expected = [[1 + gamma + gamma**2 + 2 * gamma**3, 1 + gamma], [5.0 + 2 * gamma, -1.0]]
    torch.testing.assert_close(q, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def _policy_batch(agent: trpo.Agent, n: int = 64) -> dict[str, torch.Tensor]:
    """A float64 batch whose log-probabilities are the agent's own (the ratio is 1 at theta_old)."""
    torch.manual_seed(3)
    batch = {"obs": torch.randn(n, 3), "actions": torch.randn(n, 2), "advantages": torch.randn(n), "returns": torch.randn(n)}
    batch = {k: v.double() for k, v in batch.items()} | {"values": torch.zeros(n, dtype=torch.float64)}
    with torch.no_grad():
        batch["logprobs"] = agent.log_prob(batch["obs"], batch["actions"])
    return batch


def _surrogate_and_gradient(agent: trpo.Agent, surrogate) -> tuple[float, torch.Tensor]:
    value = surrogate()
    return value.item(), torch.cat([g.flatten() for g in torch.autograd.grad(value, agent.policy_parameters())])


@pytest.mark.parametrize("step_rule", ["constraint", "penalty"])
def test_update_statistics_against_their_definitions(step_rule):
    """Every statistic of `update` recomputed from its definition: the surrogate with its entropy bonus (eq. (15)), its
    gradient at theta_old, the KLs of the step, the improvement and the step's length; the value loss of the fit."""
    agent = _tiny_agent()
    batch = _policy_batch(agent)
    args = trpo.Args(step_rule=step_rule, ent_coef=0.1, num_minibatches=4, vf_iters=1, npg_step_size=0.01)
    a = batch["advantages"]
    advantages = (a - a.mean()) / (a.std() + 1e-8)

    def surrogate() -> torch.Tensor:
        ratio = (agent.log_prob(batch["obs"], batch["actions"]) - batch["logprobs"]).exp()
        return (ratio * advantages).mean() + 0.1 * agent.entropy()

    surrogate_old, g = _surrogate_and_gradient(agent, surrogate)
    theta_old = parameters_to_vector(agent.policy_parameters()).detach().clone()
    with torch.no_grad():
        mean_old, log_std_old = agent.actor_mean(batch["obs"]), agent.actor_logstd.clone()
        critic_before = agent.value(batch["obs"])
    torch.manual_seed(0)
    stats = trpo.update(agent, torch.optim.Adam(agent.critic.parameters()), batch, args)
    with torch.no_grad():
        kls = trpo.gaussian_kl(mean_old, log_std_old, agent.actor_mean(batch["obs"]), agent.actor_logstd)
        surrogate_new = surrogate().item()
    step = parameters_to_vector(agent.policy_parameters()).detach() - theta_old
    assert stats["losses/grad_norm"] == pytest.approx(g.norm().item(), rel=1e-9)
    assert stats["losses/policy_loss"] == pytest.approx(-surrogate_new, rel=1e-9)
    assert stats["trpo/surrogate_improvement"] == pytest.approx(surrogate_new - surrogate_old, rel=1e-6)
    assert surrogate_new > surrogate_old
    assert stats["trpo/kl"] == pytest.approx(kls.mean().item(), rel=1e-6) and stats["trpo/max_kl"] == kls.max().item()
    assert stats["trpo/step_norm"] == pytest.approx(step.norm().item(), rel=1e-6) and step.norm() > 0
    assert stats["losses/entropy"] == pytest.approx(agent.entropy().item()) and stats["trpo/cg_residual"] > 0
    # vf_iters 1 of 4 minibatches: the value loss's mean over those steps is close to the loss before the fit.
    assert stats["losses/value_loss"] == pytest.approx(0.5 * ((critic_before - batch["returns"]) ** 2).mean().item(), rel=0.05)
    assert step_rule == "penalty" or stats["trpo/line_search_steps"] >= 0


def test_the_empirical_fisher_step_solves_the_dense_score_covariance_system():
    """--fisher empirical: the step direction is (G^T G / n + damping I)^-1 g, G the per-sample score gradients."""
    agent = _tiny_agent()
    batch = _policy_batch(agent)
    args = trpo.Args(fisher="empirical", cg_iters=200, max_kl=1e-10, num_minibatches=4, vf_iters=1)
    a = batch["advantages"]
    advantages = (a - a.mean()) / (a.std() + 1e-8)
    _, g = _surrogate_and_gradient(
        agent, lambda: ((agent.log_prob(batch["obs"], batch["actions"]) - batch["logprobs"]).exp() * advantages).mean()
    )
    scores = trpo.score_matrix(agent, batch["obs"], batch["actions"]).detach()
    direction = torch.linalg.solve(scores.T @ scores / 64 + args.cg_damping * torch.eye(len(g), dtype=g.dtype), g)
    theta_old = parameters_to_vector(agent.policy_parameters()).detach().clone()
    stats = trpo.update(agent, torch.optim.Adam(agent.critic.parameters()), batch, args)
    step = parameters_to_vector(agent.policy_parameters()).detach() - theta_old
    assert stats["trpo/line_search_steps"] == 0
    assert torch.nn.functional.cosine_similarity(step, direction, dim=0).item() == pytest.approx(1.0, abs=1e-8)


def test_the_vine_policy_step_follows_the_gradient_of_eq_17_with_the_entropy_bonus():
    """Given a vine batch (N states, K actions each, K != the action size), the policy gradient is that of the
    self-normalized surrogate of eq. (17) over the rollout set, plus ent_coef times the entropy's."""
    agent = _tiny_agent()
    torch.manual_seed(4)
    states, actions = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        logprobs = agent.log_prob(states[:, None, :].expand(-1, 3, -1), actions)
    vine_batch = {"obs": states, "actions": actions, "logprobs": logprobs, "q_values": torch.randn(6, 3, dtype=torch.float64)}

    def surrogate() -> torch.Tensor:
        weights = (agent.log_prob(states[:, None, :].expand(-1, 3, -1), actions) - logprobs).exp()
        return ((weights * vine_batch["q_values"]).sum(1) / weights.sum(1)).mean() + 0.1 * agent.entropy()

    _, g = _surrogate_and_gradient(agent, surrogate)
    args = trpo.Args(sampling="vine", ent_coef=0.1, num_minibatches=4, vf_iters=1)
    stats = trpo.update(agent, torch.optim.Adam(agent.critic.parameters()), _policy_batch(agent), args, vine_batch)
    assert stats["losses/grad_norm"] == pytest.approx(g.norm().item(), rel=1e-9)
    assert stats["losses/policy_loss"] == pytest.approx(-surrogate().item(), rel=1e-9)


def test_value_loss_is_half_the_mean_squared_error():
    new, returns = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    assert trpo.value_loss(new, returns).item() == pytest.approx(0.5 * (1 + 9 + 0) / 3)


def test_line_search_boundaries_and_its_report():
    """A step is accepted with KL exactly max_kl, refused with no improvement, and reports its improvement; a rejected
    search reports (-1, 0, 0)."""
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    steps, kl, improvement = trpo.line_search(
        [theta],
        torch.ones(2, dtype=torch.float64),
        lambda: 3 * theta.sum() + 1,
        lambda: torch.tensor(0.01, dtype=torch.float64),
        0.01,
        10,
    )
    assert (steps, kl, improvement) == (0, 0.01, pytest.approx(6.0))
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    zero = lambda: theta.sum() * 0  # noqa: E731
    flat = trpo.line_search([theta], torch.ones(2, dtype=torch.float64), zero, zero, 0.01, 10)
    assert flat == (-1, 0.0, 0.0) and torch.equal(theta.detach(), torch.zeros(2, dtype=torch.float64))


def test_the_time_limit_and_the_state_of_an_environment_are_found_under_other_wrappers_or_without_any():
    import gymnasium as gym

    env = gym.wrappers.ClipAction(gym.make("Hopper-v5"))
    assert isinstance(trpo.time_limit(env), gym.wrappers.TimeLimit)
    env.reset(seed=0)
    data, elapsed = trpo.save_state(env.unwrapped)  # no TimeLimit at all: no step counter
    assert elapsed is None and trpo.time_limit(env.unwrapped) is None and data.time == env.unwrapped.data.time


def test_norm_adv_none_steps_along_the_raw_advantages():
    agent = _tiny_agent()
    batch = _policy_batch(agent)
    _, g = _surrogate_and_gradient(
        agent,
        lambda: ((agent.log_prob(batch["obs"], batch["actions"]) - batch["logprobs"]).exp() * batch["advantages"]).mean(),
    )
    args = trpo.Args(norm_adv="none", num_minibatches=4, vf_iters=1)
    stats = trpo.update(agent, torch.optim.Adam(agent.critic.parameters()), batch, args)
    assert stats["losses/grad_norm"] == pytest.approx(g.norm().item(), rel=1e-9)


def test_the_reported_step_length_follows_the_line_search(monkeypatch):
    """step_norm = 0.5^k |full step| after k halvings (--kl-constraint max halves the full step here), 0 when rejected."""
    agent = _tiny_agent()
    batch = _policy_batch(agent)
    theta_old = parameters_to_vector(agent.policy_parameters()).detach().clone()
    args = trpo.Args(kl_constraint="max", max_kl=0.05, num_minibatches=4, vf_iters=1)
    stats = trpo.update(agent, torch.optim.Adam(agent.critic.parameters()), batch, args)
    step = parameters_to_vector(agent.policy_parameters()).detach() - theta_old
    assert stats["trpo/line_search_steps"] >= 1 and stats["trpo/step_norm"] == pytest.approx(step.norm().item(), rel=1e-6)
    monkeypatch.setattr(trpo, "line_search", lambda *args: (-1, 0.0, 0.0))
    stats = trpo.update(agent, torch.optim.Adam(agent.critic.parameters()), batch, args)
    assert stats["trpo/line_search_steps"] == -1 and stats["trpo/step_norm"] == 0.0


def test_vine_log_probabilities_are_those_of_each_state_s_k_actions():
    torch.manual_seed(0)
    agent = trpo.Agent(3, 2)
    rng = np.random.default_rng(0)
    branches = {"obs": rng.normal(size=(4, 3)).astype(np.float32), "actions": rng.normal(size=(4, 3, 2)).astype(np.float32)}
    branches |= {"returns": np.zeros((4, 3), np.float32), "bootstrap_discount": np.zeros((4, 3), np.float32)}
    branches |= {"bootstrap_obs": np.zeros((4, 3, 3), np.float32)}
    logprobs = trpo.make_vine_batch(agent, branches, torch.device("cpu"))["logprobs"]
    obs, actions = torch.tensor(branches["obs"]), torch.tensor(branches["actions"])
    with torch.no_grad():  # state n's log-probability of its action k, one pair at a time
        expected = [[agent.log_prob(obs[n : n + 1], actions[n, k : k + 1]).item() for k in range(3)] for n in range(4)]
    torch.testing.assert_close(logprobs, torch.tensor(expected))
