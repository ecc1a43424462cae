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
