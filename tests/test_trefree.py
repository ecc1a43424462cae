"""TREFree's own pieces against the paper: the three surrogates of Section 3.2 and the shared first layer of Section 4."""

import pytest
import torch

import trefree_continuous as trefree


def _loss_and_grad(ratio, advantages, **kwargs):
    logratio = torch.tensor(ratio).log().requires_grad_()
    loss, capped = trefree.trefree_loss(logratio, torch.tensor(advantages), **kwargs)
    loss.backward()
    return loss.item(), logratio.grad, capped


def test_objective_conservative_caps_only_the_upper_side_at_delta():
    # (r - 1) A per sample: 0.5 (capped), 0.005 (under the cap), -0.5 and -0.2 (negative: never clipped), 0.1 (capped)
    ratio, advantages = [1.5, 1.005, 0.5, 1.2, 0.9], [1.0, 1.0, 1.0, -1.0, -1.0]
    loss, grad, capped = _loss_and_grad(ratio, advantages, delta=0.01, conservative="objective")
    # L = (1/M) sum min((r - 1) A, delta): capped samples contribute exactly delta
    assert loss == pytest.approx(-(0.01 + 0.005 - 0.5 - 0.2 + 0.01) / 5, abs=1e-6)
    assert capped.tolist() == [True, False, False, False, True]
    # dL/dtheta = A dr/dtheta / M under the cap (here theta = log r, so dr/dtheta = r), 0 at the cap
    expected = -torch.tensor([0.0, 1.0 * 1.005, 1.0 * 0.5, -1.0 * 1.2, 0.0]) / 5
    torch.testing.assert_close(grad, expected)


def test_objective_conservative_gradient_through_a_policy_parameter():
    """The gradient of L w.r.t. a real parameter is (1/M) sum over uncapped samples of A dr/dtheta."""
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0]])
    advantages = torch.tensor([0.02, -3.0, 1.0, -0.5])
    logratio = features @ theta - (features @ theta).detach()  # r = 1 at theta, as at the start of an update
    logratio = logratio + torch.tensor([0.0, 0.1, 0.2, -0.05])  # move some samples away from r = 1
    loss, capped = trefree.trefree_loss(logratio, advantages, delta=0.01)
    loss.backward()
    ratio = logratio.detach().exp()
    # (r - 1) A: 0 (under the cap), -0.316 (negative), 0.221 (capped), 0.0244 (capped)
    assert capped.tolist() == [False, False, True, True]
    expected = -sum(advantages[i] * ratio[i] * features[i] for i in (0, 1)) / 4  # dr/dtheta = r * features
    torch.testing.assert_close(theta.grad, expected)


def test_ratio_conservative_clips_the_ratio_deviation():
    ratio, advantages = [1.5, 1.1, 0.5, 0.9], [1.0, -2.0, -1.0, 3.0]
    loss, grad, capped = _loss_and_grad(ratio, advantages, delta=0.01, conservative="ratio", ratio_clip=0.2)
    # clip(r - 1, -0.2, 0.2) A: 0.2, -0.2, 0.2, -0.3; zero gradient where the deviation is clipped
    assert loss == pytest.approx(-(0.2 - 0.2 + 0.2 - 0.3) / 4, abs=1e-6)
    assert capped.tolist() == [True, False, True, False]
    torch.testing.assert_close(grad, -torch.tensor([0.0, -2.0 * 1.1, 0.0, 3.0 * 0.9]) / 4)


def test_non_conservative_is_the_plain_surrogate():
    ratio, advantages = [1.5, 1.1, 0.5, 0.9], [1.0, -2.0, -1.0, 3.0]
    loss, grad, capped = _loss_and_grad(ratio, advantages, delta=0.01, conservative="none")
    # (r - 1) A: 0.5, -0.2, 0.5, -0.3, whatever their size
    assert loss == pytest.approx(-(0.5 - 0.2 + 0.5 - 0.3) / 4, abs=1e-6)
    assert not capped.any()
    torch.testing.assert_close(grad, -torch.tensor([1.5, -2.2, -0.5, 2.7]) / 4)


def test_infinite_delta_is_the_non_conservative_surrogate():
    ratio, advantages = [1.5, 1.1, 0.5, 0.9], [1.0, -2.0, -1.0, 3.0]
    loss, grad, capped = _loss_and_grad(ratio, advantages, delta=float("inf"), conservative="objective")
    assert loss == pytest.approx(-(0.5 - 0.2 + 0.5 - 0.3) / 4, abs=1e-6) and not capped.any()
    torch.testing.assert_close(grad, -torch.tensor([1.5, -2.2, -0.5, 2.7]) / 4)


def _value_loss_grads(agent):
    agent.zero_grad()
    trefree.value_loss(agent.value(torch.randn(16, 5)), torch.zeros(16), torch.randn(16), 0.2, False).backward()
    return {name: p.grad for name, p in agent.actor_mean.named_parameters()} | {"actor_logstd": agent.actor_logstd.grad}


def test_shared_first_layer_is_one_layer_trained_by_the_value_loss():
    agent = trefree.Agent(obs_dim=5, act_dim=2, share_first_layer=True)
    actor, critic = dict(agent.actor_mean.named_parameters()), dict(agent.critic.named_parameters())
    shared = [name for name in actor if any(actor[name] is p for p in critic.values())]
    assert shared == ["0.weight", "0.bias"]
    grads = _value_loss_grads(agent)
    assert grads["0.weight"].abs().sum() > 0 and grads["0.bias"].abs().sum() > 0
    assert all(grads[name] is None for name in grads if not name.startswith("0."))
    # each parameter once in the optimizer
    assert len(list(agent.parameters())) == len({id(p) for p in agent.parameters()}) == 11


def test_separate_networks_share_nothing():
    agent = trefree.Agent(obs_dim=5, act_dim=2, share_first_layer=False)
    assert not {id(p) for p in agent.actor_mean.parameters()} & {id(p) for p in agent.critic.parameters()}
    assert all(g is None for g in _value_loss_grads(agent).values())


@pytest.mark.parametrize("conservative", ["objective", "ratio", "none"])
def test_the_minibatch_step_optimises_the_chosen_surrogate_with_its_own_margin(conservative):
    """`minibatch_step` reports the surrogate of --conservative with its margin (delta, or --ratio-clip), and the
    fraction of capped samples, computed at the parameters it starts from."""
    torch.manual_seed(0)
    agent = trefree.Agent(3, 2)
    mb = {"obs": torch.randn(32, 3), "actions": torch.randn(32, 2), "values": torch.randn(32), "returns": torch.randn(32)}
    with torch.no_grad():
        mb |= {"logprobs": agent.log_prob(mb["obs"], mb["actions"]) + 0.3 * torch.randn(32), "advantages": torch.randn(32)}
        logratio = agent.log_prob(mb["obs"], mb["actions"]) - mb["logprobs"]
    args = trefree.Args(conservative=conservative, delta=0.05, ratio_clip=0.1, norm_adv="none")
    expected, capped = trefree.trefree_loss(logratio, mb["advantages"], 0.05, conservative, 0.1)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    policy_loss, _, _, capfrac, _ = trefree.minibatch_step(agent, optimizer, mb, args).tolist()
    assert policy_loss == pytest.approx(expected.item(), rel=1e-6) and capfrac == pytest.approx(capped.float().mean().item())
    assert (0 < capfrac < 1) == (conservative != "none")
