"""PPO's own pieces against their formulas: the clipped surrogate, eq. (4) of the TREFree paper, and the value loss."""

import pytest
import torch

import ppo_continuous as ppo


def test_ppo_loss_against_its_formula_with_clipping_on_both_sides():
    ratio = torch.tensor([0.5, 1.5, 0.5, 1.5, 1.1, 0.9])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -2.0])
    logratio = ratio.log().requires_grad_()
    loss = ppo.ppo_loss(logratio, advantages, clip_coef=0.2)
    # min(r A, clip(r, 0.8, 1.2) A) per sample:
    #   0.5*1 -> 0.5 (unclipped), 1.5*1 -> 1.2 (clipped above), 0.5*-1 -> -0.8 (clipped below),
    #   1.5*-1 -> -1.5 (unclipped), 1.1*2 -> 2.2, 0.9*-2 -> -1.8
    assert loss.item() == pytest.approx(-(0.5 + 1.2 - 0.8 - 1.5 + 2.2 - 1.8) / 6, abs=1e-6)
    loss.backward()
    # d loss / d logratio = -r A / 6 where unclipped, 0 where the clipped term is the min
    expected_grad = torch.tensor([-0.5, 0.0, 0.0, 1.5, -2.2, 1.8]) / 6
    torch.testing.assert_close(logratio.grad, expected_grad)


def test_value_loss_clipped_and_unclipped():
    new, old, ret = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 1.9]), torch.tensor([2.0, 1.0, 2.0])
    # unclipped: 0.5 * mean((1-2)^2, (0-1)^2, (2-2)^2) = 0.5 * 2/3
    assert ppo.value_loss(new, old, ret, 0.2, clip_vloss=False).item() == pytest.approx(1 / 3)
    # clipped V: 0.2, 0.0, 2.0 -> squared errors 3.24, 1, 0; max with unclipped 1, 1, 0
    assert ppo.value_loss(new, old, ret, 0.2, clip_vloss=True).item() == pytest.approx(0.5 * (3.24 + 1 + 0) / 3)


def test_the_value_clipping_range_is_the_clip_coef_unless_vf_clip_coef_is_set(monkeypatch):
    """--clip-vloss clips by --vf-clip-coef, which defaults to --clip-coef (Baselines' ppo2 and CleanRL)."""
    ranges = []

    def recording_value_loss(new_values, old_values, returns, clip_coef, clip_vloss):
        ranges.append(clip_coef)
        return ((new_values - returns) ** 2).mean()

    monkeypatch.setattr(ppo, "value_loss", recording_value_loss)
    torch.manual_seed(0)
    agent = ppo.Agent(3, 2)
    mb = {"obs": torch.randn(8, 3), "actions": torch.randn(8, 2), "logprobs": torch.randn(8)}
    mb |= {"values": torch.randn(8), "advantages": torch.randn(8), "returns": torch.randn(8)}
    for args in [ppo.Args(clip_coef=0.3), ppo.Args(clip_coef=0.3, vf_clip_coef=0.1)]:
        ppo.minibatch_step(agent, torch.optim.Adam(agent.parameters(), lr=1e-3), mb, args)
    assert ranges == [0.3, 0.1]
