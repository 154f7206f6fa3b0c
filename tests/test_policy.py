import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.modules import IndependentNormal, ProbabilisticActor
from torchrl.objectives import ClipPPOLoss

from dmdr import keys as K
from dmdr.losses import dmd_loss
from dmdr.losses.policy import (MeanIndependentNormal, PolicyKeys, StudentStep, advantage_weights,
                                check_log_prob_shape, kl_to_reference, make_student_actor, rollout_transitions,
                                weighted_dmd_loss)
from dmdr.models.tiny import TinyDiT, TinyDiTConfig
from dmdr.samplers import stochastic_rollout
from dmdr.schedules import few_step_grid

torch.set_num_threads(1)
PK = PolicyKeys()


def _student(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2))
    for p in m.parameters():   # adaLN-zero / zero output layers would make the student constant
        torch.nn.init.normal_(p, std=0.05)
    return m.to(dtype)


def _rollout(model, B=6, N=2, dtype=torch.float32, reduce="mean", final_std=0.1):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(B, 1, 8, 8, generator=g).to(dtype)
    labels = torch.arange(B) % 10
    grid = few_step_grid(N, 1.0).to(dtype)
    torch.manual_seed(2)
    roll = stochastic_rollout(model, noise, grid, labels, final_std=final_std, reduce=reduce)
    return roll, labels


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_logged_log_prob_equals_actor_before_update(reduce):
    """On-policy, the actor recomputes exactly the logged log-prob: the PPO ratio is 1 (float64: to 1e-12)."""
    model = _student(torch.float64)
    roll, labels = _rollout(model, dtype=torch.float64, reduce=reduce)
    trans = rollout_transitions(roll, labels, advantage=torch.randn(6, 1, dtype=torch.float64))
    actor = make_student_actor(model, final_std=0.1, log_prob_reduce=reduce)
    with torch.no_grad():
        lp = actor.get_dist(trans).log_prob(trans[PK.action])
    assert lp.shape == (12,)
    assert torch.allclose(lp, trans[PK.log_prob], rtol=0, atol=1e-10)
    out = ClipPPOLoss(actor, critic_network=None, critic_coeff=None, entropy_bonus=False, clip_epsilon=0.2)(trans)
    assert abs(float(out["mean_ratio"]) - 1) < 1e-12 and abs(float(out["max_ratio"]) - 1) < 1e-12
    assert float(out["clip_fraction"]) == 0.0 and abs(float(out["kl_approx"])) < 1e-12


def test_float32_ratio_is_one_and_gradients_reach_the_student():
    model = _student()
    roll, labels = _rollout(model)
    trans = rollout_transitions(roll, labels, advantage=torch.randn(6, 1))
    actor = make_student_actor(model, final_std=0.1)
    loss = ClipPPOLoss(actor, critic_network=None, critic_coeff=None, entropy_bonus=False, clip_epsilon=0.2)
    out = loss(trans)
    assert abs(float(out["mean_ratio"]) - 1) < 1e-5
    out["loss_objective"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_log_prob_shape_guard_catches_wrong_event_dim():
    model = _student()
    roll, labels = _rollout(model)
    trans = rollout_transitions(roll, labels)
    step = StudentStep(model, final_std=0.1)
    bad = ProbabilisticActor(TensorDictModule(step, in_keys=[PK.x, PK.t, PK.t_next, PK.last, PK.cond],
                                              out_keys=[PK.loc, PK.scale]), in_keys=[PK.loc, PK.scale],
                             distribution_class=IndependentNormal, distribution_kwargs={"event_dim": 1},
                             return_log_prob=True)
    with torch.no_grad():
        lp_bad = bad.get_dist(trans).log_prob(trans[PK.action])
        lp_good = make_student_actor(model, final_std=0.1).get_dist(trans).log_prob(trans[PK.action])
    assert lp_bad.shape == (12, 1, 8)   # silently per-row: the wrong objective
    with pytest.raises(ValueError, match="event_dim=3"):
        check_log_prob_shape(lp_bad, 12)
    assert check_log_prob_shape(lp_good, 12).shape == (12,)


def test_mean_reduce_is_sum_over_dimensions():
    loc, scale = torch.randn(3, 1, 8, 8), torch.full((3, 1, 1, 1), 0.3)
    x = loc + 0.3 * torch.randn_like(loc)
    s = IndependentNormal(loc, scale, event_dim=3).log_prob(x)
    m = MeanIndependentNormal(loc, scale, event_dim=3).log_prob(x)
    assert torch.allclose(m, s / 64)
    ref = torch.distributions.Normal(loc, 0.3).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(s, ref, atol=1e-5)


def test_step_matches_the_sampler_per_step_and_exploration_mode():
    """The per-sample ``last`` flag reproduces transition_mean_std; the actor's default interaction is the mean."""
    model = _student()
    roll, labels = _rollout(model, N=2)
    trans = rollout_transitions(roll, labels)
    loc, scale = StudentStep(model, final_std=0.1)(trans[PK.x], trans[PK.t], trans[PK.t_next], trans[PK.last],
                                                    trans[PK.cond])
    assert torch.equal(trans[PK.last], torch.tensor([False, True] * 6))
    assert torch.allclose(scale[trans[PK.last]].flatten(), torch.full((6,), 0.1))
    assert torch.allclose(scale[~trans[PK.last]].flatten(), trans[PK.t_next][~trans[PK.last]])   # σ = t_{i+1}
    assert torch.allclose(roll[K.SAMPLE], trans[PK.action][trans[PK.last]])
    actor = make_student_actor(model, final_std=0.1)
    with torch.no_grad():
        td = actor(trans.exclude(PK.action, PK.log_prob))
    assert torch.allclose(td[PK.action], loc.detach())   # pitfall: not a sample unless ExplorationType.RANDOM


def test_rollout_transitions_layout():
    model = _student()
    roll, labels = _rollout(model, B=3, N=2)
    adv = torch.tensor([[1.0], [2.0], [3.0]])
    td = rollout_transitions(roll, labels, advantage=adv)
    assert td.batch_size == (6,)
    assert torch.equal(td[PK.advantage].squeeze(-1), torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]))
    assert torch.equal(td[PK.sample], torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(td[PK.cond], labels.repeat_interleave(2))
    assert torch.allclose(td[PK.x][1], roll[K.X_PER_STEP][0, 1]) and torch.allclose(td[PK.action][1], roll[K.ACTION][0, 1])
    assert torch.allclose(td[PK.t], torch.tensor([1.0, 0.5] * 3)) and torch.allclose(td[PK.t_next], torch.tensor([0.5, 0.0] * 3))
    assert not td[PK.log_prob].requires_grad


def test_kl_to_reference_hand_values():
    loc = torch.full((2, 1, 8, 8), 0.3, requires_grad=True)
    td = TensorDict({PK.loc: loc, PK.ref_loc: torch.full((2, 1, 8, 8), 0.2), PK.scale: torch.full((2, 1, 1, 1), 0.5)},
                    batch_size=[2])
    # per dim 0.1² / (2 · 0.25) = 0.02; D = 64
    s = kl_to_reference(td, reduce="sum", weight=2.0)
    m = kl_to_reference(td, reduce="mean")
    assert math.isclose(float(s["kl_ref"]), 1.28, rel_tol=1e-5) and math.isclose(float(s["loss_kl"].detach()), 2.56, rel_tol=1e-5)
    assert math.isclose(float(m["kl_ref"]), 0.02, rel_tol=1e-5)
    p = torch.distributions.Normal(loc.detach(), 0.5)
    q = torch.distributions.Normal(td[PK.ref_loc], 0.5)
    assert math.isclose(float(torch.distributions.kl_divergence(p, q).flatten(1).sum(1).mean()), 1.28, rel_tol=1e-5)
    s["loss_kl"].backward()
    assert loc.grad.abs().sum() > 0
    td.set(PK.ref_loc, loc.detach())
    assert float(kl_to_reference(td)["kl_ref"]) == 0.0


def test_weighted_dmd_loss_reduces_to_dmd_loss_and_weights_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, requires_grad=True)
    td = TensorDict({K.X0_PRED: x, K.X0_REAL: torch.randn(4, 1, 8, 8, generator=g),
                     K.X0_FAKE: torch.randn(4, 1, 8, 8, generator=g)}, batch_size=[4])
    assert torch.allclose(weighted_dmd_loss(td, weight=3.0)["loss_dmd"], 3.0 * dmd_loss(td)["loss_dmd"])
    weighted_dmd_loss(td)["loss_dmd"].backward()
    g1 = x.grad.flatten(1).norm(dim=1)
    x.grad = None
    weighted_dmd_loss(td, torch.tensor([0.0, 1.0, 1.0, 2.0]))["loss_dmd"].backward()
    gw = x.grad.flatten(1).norm(dim=1)
    assert gw[0] == 0 and torch.allclose(gw[1:3], g1[1:3]) and torch.isclose(gw[3], 2 * g1[3])
    aw = advantage_weights(torch.tensor([[0.0], [1.0], [-1.0], [2.0]]))
    assert math.isclose(float(aw.mean()), 1.0, rel_tol=1e-6) and aw.argmax() == 3 and (aw > 0).all()
