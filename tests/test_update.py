"""The minibatch step that the eager and the compiled update share: against `loss.backward()`, `clip_grad_norm_` and
`torch.optim.Adam` itself; compiled against eager; and the fallback to eager where compilation fails."""

import copy
import importlib
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ppo_continuous", "trefree_continuous", "trpo_continuous"]
OBS_DIM, ACT_DIM, MINIBATCH, STEPS = 4, 1, 32, 10  # InvertedPendulum's sizes, the minibatch of --num-steps 1024


def _reference_loss(algo, agent, mb, args):
    """Each script's loss as its update computed it before the fused step, written out here."""
    if algo.__name__ == "trpo_continuous":  # the value function's fit
        return algo.value_loss(agent.value(mb["obs"]), mb["returns"])
    logratio = agent.log_prob(mb["obs"], mb["actions"]) - mb["logprobs"]
    advantages = (mb["advantages"] - mb["advantages"].mean()) / (mb["advantages"].std() + 1e-8)
    if algo.__name__ == "ppo_continuous":
        policy_loss = algo.ppo_loss(logratio, advantages, args.clip_coef)
        v_loss = algo.value_loss(agent.value(mb["obs"]), mb["values"], mb["returns"], args.clip_coef, args.clip_vloss)
    else:
        policy_loss, _ = algo.trefree_loss(logratio, advantages, args.delta, args.conservative, args.ratio_clip)
        v_loss = algo.value_loss(agent.value(mb["obs"]), mb["values"], mb["returns"], args.vf_clip_coef, args.clip_vloss)
    return policy_loss - args.ent_coef * agent.entropy() + args.vf_coef * v_loss


def _setup(algo, seed=0):
    """An agent, its optimizer as `train` builds it, arguments that make every term matter, and `STEPS` minibatches."""
    torch.manual_seed(seed)
    agent = algo.Agent(OBS_DIM, ACT_DIM)
    if algo.__name__ == "trpo_continuous":
        args = algo.Args()
        optimizer = torch.optim.Adam(agent.critic.parameters(), lr=args.vf_learning_rate, fused=True)
    else:
        # ent_coef > 0 and a small max_grad_norm: the entropy term and the clipping both act. TREFree's advantages are
        # standardized per minibatch here, so that the reference above is its loss too.
        extra = {} if algo.__name__ == "ppo_continuous" else {"norm_adv": "minibatch"}
        args = algo.Args(ent_coef=0.01, max_grad_norm=0.1, **extra)
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    minibatches = []
    for _ in range(STEPS):
        obs, actions = torch.randn(MINIBATCH, OBS_DIM), torch.randn(MINIBATCH, ACT_DIM)
        with torch.no_grad():  # the rollout policy's log-probabilities, moved so that some ratios are clipped or capped
            logprobs = agent.log_prob(obs, actions) + 0.3 * torch.randn(MINIBATCH)
        minibatches.append(
            {
                "obs": obs,
                "actions": actions,
                "logprobs": logprobs,
                "values": torch.randn(MINIBATCH),
                "advantages": torch.randn(MINIBATCH),
                "returns": torch.randn(MINIBATCH),
            }
        )
    return agent, optimizer, args, minibatches


def _optimizer_state(optimizer):
    return [t for state in optimizer.state_dict()["state"].values() for t in state.values()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_minibatch_step_is_backward_clip_grad_norm_and_torch_adam_bit_for_bit(script):
    """`minibatch_step` (eager) = loss.backward(), clip_grad_norm_ (PPO, TREFree) and torch.optim.Adam's step, exactly:
    the parameters, Adam's state and the returned losses after `STEPS` steps. This is what keeps --no-compile's runs
    bit-identical to those of the update written that way."""
    algo = importlib.import_module(script)
    agent, optimizer, args, minibatches = _setup(algo)
    ref_agent = copy.deepcopy(agent)
    ref_params = list(ref_agent.critic.parameters() if script == "trpo_continuous" else ref_agent.parameters())
    ref_optimizer = torch.optim.Adam(ref_params, lr=optimizer.defaults["lr"], eps=optimizer.defaults["eps"], fused=True)
    for mb in minibatches:
        stats = algo.minibatch_step(agent, optimizer, mb, args)
        loss = _reference_loss(algo, ref_agent, mb, args)
        ref_optimizer.zero_grad()
        loss.backward()
        if script != "trpo_continuous":
            grad_norm = nn.utils.clip_grad_norm_(ref_params, args.max_grad_norm)
            assert torch.equal(stats[4], grad_norm)
            assert grad_norm > args.max_grad_norm  # the clipping acted
        ref_optimizer.step()
    for p, q in zip(agent.state_dict().values(), ref_agent.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert all(torch.equal(a, b) for a, b in zip(_optimizer_state(optimizer), _optimizer_state(ref_optimizer), strict=True))
    assert optimizer.state_dict()["state"][0]["step"].item() == STEPS


# Compiled against eager, after STEPS steps from one state on the same minibatches. The compiled graph sums in another
# order (fused reductions, its own matmul tiling), so each float32 sum of n terms may differ by up to ~n u sum|terms|
# (Higham; u = 2^-24 ~ 6e-8): ~2e-6 of the terms' size for the 32-sample means and 64-unit layers here. Two consequences
# fix how to compare. (1) A gradient entry that cancels to ~0 has no correct digits, and Adam divides it by its own
# running size, so it may step by up to ~lr in another direction: parameters cannot be compared entry by entry, only
# through the distance the update moved them, |theta_compiled - theta_eager| / |theta_eager - theta_0| (a bug in the
# loss, the clipping or Adam makes this O(1)). (2) Adam's moments and the losses differ by the gradients' rounding,
# relative to their own norm. Measured over 5 seeds: at most 1.2e-5 (parameters), 2.6e-5 (moments), 9.3e-6 (losses);
# the bounds below leave a margin of ~40 over those and stay ~1000 below what a wrong step gives.
TOLERANCE = 1e-3


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """|a - b| / |reference| over the concatenated tensors."""
    flat = lambda tensors: torch.cat([t.flatten() for t in tensors])  # noqa: E731
    return ((flat(a) - flat(b)).norm() / flat(reference).norm()).item()


@pytest.mark.compiled
@pytest.mark.parametrize("script", SCRIPTS)
def test_compiled_step_equals_the_eager_step(script):
    algo = importlib.import_module(script)
    agent, optimizer, args, minibatches = _setup(algo)
    start = [p.clone() for p in agent.state_dict().values()]
    fast_agent = copy.deepcopy(agent)
    params = list(fast_agent.critic.parameters() if script == "trpo_continuous" else fast_agent.parameters())
    fast_optimizer = torch.optim.Adam(params, lr=optimizer.defaults["lr"], eps=optimizer.defaults["eps"], fused=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast_step = algo.compiled(algo.minibatch_step)
    lr, eager_stats, fast_stats, graphs = optimizer.param_groups[0]["lr"], [], [], []
    for i, mb in enumerate(minibatches):
        for o in (optimizer, fast_optimizer):
            o.param_groups[0]["lr"] = lr * (1 - i / STEPS)  # annealed
        eager_stats.append(algo.minibatch_step(agent, optimizer, mb, args))
        fast_stats.append(fast_step(fast_agent, fast_optimizer, mb, args))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    eager, fast = list(agent.state_dict().values()), list(fast_agent.state_dict().values())
    assert _relative_error(fast, eager, [p - p0 for p, p0 in zip(eager, start, strict=True)]) < TOLERANCE
    eager_state, fast_state = optimizer.state_dict()["state"].values(), fast_optimizer.state_dict()["state"].values()
    for key in ("exp_avg", "exp_avg_sq"):
        assert (
            _relative_error([s[key] for s in fast_state], [s[key] for s in eager_state], [s[key] for s in eager_state])
            < TOLERANCE
        ), key
    assert [s["step"].item() for s in fast_state] == [s["step"].item() for s in eager_state] == [STEPS] * len(params)
    torch.testing.assert_close(torch.stack(fast_stats), torch.stack(eager_stats), rtol=TOLERANCE, atol=1e-6)
    # It really ran compiled: the loss with its backward() and Adam's step in graphs, compiled again once for the first
    # change of the learning rate (Dynamo then takes it as a variable) and never after, however it is annealed.
    assert graphs[0] > 0 and graphs[1] == graphs[-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_failed_compilation_falls_back_to_eager_with_one_line(tmp_path, script):
    """No C++ compiler (CXX names none; Inductor's caches off, so that nothing compiled earlier is reused): one note, and
    the run trains to the end eagerly."""
    env = os.environ | {
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
        "OMP_NUM_THREADS": "1",
    }
    flags = "--env-id InvertedPendulum-v5 --total-timesteps 2048 --num-steps 1024 --no-cuda --compile"
    cmd = [sys.executable, os.path.join(ROOT, f"{script}.py"), *flags.split()]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: torch.compile failed")]
    assert (
        len(notes) == 1
        and "No working C++ compiler" in notes[0]
        and notes[0].endswith("the update runs eagerly, as with --no-compile")
    )
    assert len(list((tmp_path / "runs").iterdir())) == 1


@pytest.mark.parametrize("script", ["ppo_continuous", "trefree_continuous"])
def test_norm_adv_batch_standardizes_the_whole_batch_once(script):
    """--norm-adv batch: the update of a batch equals that of its advantages standardized beforehand with no
    normalization; per minibatch (`minibatch`) is a different update."""
    algo = importlib.import_module(script)
    torch.manual_seed(0)
    obs, actions = torch.randn(64, OBS_DIM), torch.randn(64, ACT_DIM)
    batch = {"obs": obs, "actions": actions, "logprobs": torch.randn(64), "values": torch.randn(64)}
    batch |= {"advantages": 3 + 2 * torch.randn(64), "returns": torch.randn(64)}
    a = batch["advantages"]

    def updated(norm_adv: str, advantages: torch.Tensor) -> list[torch.Tensor]:
        torch.manual_seed(1)
        agent = algo.Agent(OBS_DIM, ACT_DIM)
        optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
        args = algo.Args(norm_adv=norm_adv, num_minibatches=4, update_epochs=2)
        algo.update(agent, optimizer, batch | {"advantages": advantages}, args)
        return list(agent.state_dict().values())

    by_batch = updated("batch", a)
    assert all(torch.equal(p, q) for p, q in zip(by_batch, updated("none", (a - a.mean()) / (a.std() + 1e-8)), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(by_batch, updated("minibatch", a), strict=True))


def _reference_parts(algo, agent, mb, args):
    """(policy loss, value loss, entropy, clipped or capped fraction) of a minibatch, by the script's loss functions."""
    with torch.no_grad():
        logratio = agent.log_prob(mb["obs"], mb["actions"]) - mb["logprobs"]
        advantages = (mb["advantages"] - mb["advantages"].mean()) / (mb["advantages"].std() + 1e-8)
        if algo.__name__ == "ppo_continuous":
            policy_loss = algo.ppo_loss(logratio, advantages, args.clip_coef)
            fraction = ((logratio.exp() - 1).abs() > args.clip_coef).float().mean()
            v_loss = algo.value_loss(agent.value(mb["obs"]), mb["values"], mb["returns"], args.clip_coef, args.clip_vloss)
        else:
            policy_loss, capped = algo.trefree_loss(logratio, advantages, args.delta, args.conservative, args.ratio_clip)
            fraction = capped.float().mean()
            v_loss = algo.value_loss(agent.value(mb["obs"]), mb["values"], mb["returns"], args.vf_clip_coef, args.clip_vloss)
        return torch.stack([policy_loss, v_loss, agent.entropy(), fraction])


@pytest.mark.parametrize("script", ["ppo_continuous", "trefree_continuous"])
@pytest.mark.parametrize("target_kl", [None, 1e-9])
def test_update_runs_epochs_of_minibatch_steps_over_fresh_permutations(script, target_kl):
    """`update` = for each epoch, a fresh random permutation of the batch cut into `num_minibatches` minibatches, one
    clipped Adam step on each (stopping after the epoch whose approximate KL exceeds `target_kl`); its statistics are the
    means over the steps of the losses and gradient norms, and the ratio's statistics over the whole batch after them."""
    algo = importlib.import_module(script)
    agent, optimizer, args, minibatches = _setup(algo)
    args = replace(args, num_minibatches=4, update_epochs=3, target_kl=target_kl, clip_vloss=True)
    batch = {k: torch.cat([mb[k] for mb in minibatches[:4]]) for k in minibatches[0]}
    ref_agent = copy.deepcopy(agent)
    lr, eps = optimizer.defaults["lr"], optimizer.defaults["eps"]
    ref_optimizer = torch.optim.Adam(ref_agent.parameters(), lr=lr, eps=eps, fused=True)
    torch.manual_seed(11)
    stats = algo.update(agent, optimizer, batch, args)

    torch.manual_seed(11)
    parts, norms = [], []
    for _ in range(1 if target_kl else 3):
        for indices in torch.randperm(4 * MINIBATCH).split(MINIBATCH):
            mb = {k: v[indices] for k, v in batch.items()}
            parts.append(_reference_parts(algo, ref_agent, mb, args))
            ref_optimizer.zero_grad()
            _reference_loss(algo, ref_agent, mb, args).backward()
            norms.append(nn.utils.clip_grad_norm_(list(ref_agent.parameters()), args.max_grad_norm))
            ref_optimizer.step()
    for p, q in zip(agent.state_dict().values(), ref_agent.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert optimizer.state_dict()["state"][0]["step"].item() == len(norms) == (4 if target_kl else 12)
    policy_loss, v_loss, entropy, fraction = torch.stack(parts).mean(0).tolist()
    fraction_tag = "losses/clipfrac" if script == "ppo_continuous" else "losses/capfrac"
    assert stats["losses/policy_loss"] == pytest.approx(policy_loss, rel=1e-6)
    assert stats["losses/value_loss"] == pytest.approx(v_loss, rel=1e-6)
    assert stats["losses/entropy"] == pytest.approx(entropy, rel=1e-6)
    assert stats[fraction_tag] == pytest.approx(fraction, rel=1e-6) and 0 < fraction < 1
    assert stats["losses/grad_norm"] == pytest.approx(torch.stack(norms).mean().item(), rel=1e-6)
    with torch.no_grad():
        logratio = ref_agent.log_prob(batch["obs"], batch["actions"]) - batch["logprobs"]
    assert stats["ratio/max"] == logratio.exp().max().item() and stats["ratio/min"] == logratio.exp().min().item()
    assert stats["losses/approx_kl"] == pytest.approx(((logratio.exp() - 1) - logratio).mean().item(), rel=1e-6)


@pytest.mark.parametrize("script", ["ppo_continuous", "trefree_continuous"])
def test_a_gradient_just_below_the_clipping_norm_is_not_scaled(script):
    """With ||g|| between max_grad_norm / 2 and max_grad_norm, clip_grad_norm_ leaves g as it is (factor min(1, c/||g||)
    = 1): the step equals the reference bit for bit."""
    algo = importlib.import_module(script)
    agent, optimizer, args, minibatches = _setup(algo)
    ref_agent = copy.deepcopy(agent)
    loss = _reference_loss(algo, ref_agent, minibatches[0], args)
    norm = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(ref_agent.parameters()))]).norm().item()
    args = replace(args, max_grad_norm=1.5 * norm)
    ref_optimizer = torch.optim.Adam(ref_agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)
    algo.minibatch_step(agent, optimizer, minibatches[0], args)
    ref_optimizer.zero_grad()
    _reference_loss(algo, ref_agent, minibatches[0], args).backward()
    assert nn.utils.clip_grad_norm_(list(ref_agent.parameters()), args.max_grad_norm) < args.max_grad_norm
    ref_optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(agent.state_dict().values(), ref_agent.state_dict().values(), strict=True))


@pytest.mark.parametrize("script", ["ppo_continuous", "trefree_continuous"])
def test_standardized_advantages_make_the_update_blind_to_their_scale_and_none_does_not(script):
    algo = importlib.import_module(script)
    torch.manual_seed(0)
    batch = {"obs": torch.randn(64, OBS_DIM), "actions": torch.randn(64, ACT_DIM), "logprobs": torch.randn(64)}
    batch |= {"values": torch.randn(64), "advantages": torch.randn(64), "returns": torch.randn(64)}

    def updated(norm_adv: str, scale: float) -> torch.Tensor:
        torch.manual_seed(1)
        agent = algo.Agent(OBS_DIM, ACT_DIM)
        optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
        algo.update(agent, optimizer, batch | {"advantages": scale * batch["advantages"]}, algo.Args(norm_adv=norm_adv))
        return torch.cat([p.flatten() for p in agent.state_dict().values()])

    for norm_adv in ("batch", "minibatch"):
        assert (updated(norm_adv, 1.0) - updated(norm_adv, 3.0)).abs().max() < 1e-5, norm_adv
    assert (updated("none", 1.0) - updated("none", 3.0)).abs().max() > 1e-3


@pytest.mark.parametrize("script", SCRIPTS)
def test_compiles_by_default_only_a_run_long_enough_to_repay_it(script, monkeypatch):
    """Unset, --compile compiles the minibatch step only for a run of 70,000 minibatch steps or more, counted over the whole
    run (PPO and TREFree at their defaults: from 219 iterations of 320 steps; TRPO: from 875 of 80); --compile and
    --no-compile force either. Each run stops at its first rollout, once the step is chosen."""
    algo = importlib.import_module(script)

    class Compiling(Exception):
        pass

    class RollingOut(Exception):
        pass

    def compiled(step):
        raise Compiling

    def rollout(*args, **kwargs):
        raise RollingOut

    monkeypatch.setattr(algo, "compiled", compiled)
    monkeypatch.setattr(algo, "rollout", rollout)
    steps = algo.Args().num_steps
    first = 219 if script != "trpo_continuous" else 875  # the first number of iterations with 70,000 minibatch steps
    for compile, iterations, compiles in [
        (None, first - 1, False),
        (None, first, True),
        (True, 1, True),
        (False, first, False),
    ]:
        with pytest.raises((Compiling, RollingOut)) as stopped:
            algo.train(algo.Args(env_id="InvertedPendulum-v5", total_timesteps=iterations * steps, compile=compile))
        assert isinstance(stopped.value, Compiling) == compiles, (compile, iterations)
