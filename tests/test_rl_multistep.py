"""Issue 10: the Flow-GRPO SDE policy (multi-step), the advantage bounds, the dmd_ca_adv regulariser."""
import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives import ClipPPOLoss

from dmdr.advantages import clip_advantage, from_config, group_relative
from dmdr.losses.dmd_ca_adv import dmd_ca_adv_loss
from dmdr.losses.policy import PolicyKeys, make_student_actor, rollout_transitions, weighted_dmd_loss
from dmdr.models.tiny import TinyDiT, TinyDiTConfig
from dmdr.paths import FlowMatching
from dmdr.samplers import flow_grpo_sde, stochastic_rollout, transition_log_prob, transition_mean_std
from dmdr.schedules import few_step_grid

torch.set_num_threads(1)
PK = PolicyKeys()


def _student(dtype=torch.float64):
    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.to(dtype)


def _rollout(model, B=6, N=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(B, 1, 8, 8, generator=g).to(dtype)
    labels = torch.arange(B) % 10
    grid = few_step_grid(N, 1.0).to(dtype)
    torch.manual_seed(2)
    return stochastic_rollout(model, noise, grid, labels, final_std=0.1, noise_scale=0.7, sde="flow_grpo"), labels, grid


# ---------------------------------------------------------------- the SDE step, by hand (float64)
@pytest.mark.parametrize("t,tn,cx,cv,std", [
    # σ = 0.7 √(0.75/0.25) = 0.7√3, σ² = 1.47; Δt = -0.25: cx = 1 + 1.47(-0.25)/1.5, cv = (1 + 1.47·0.25/1.5)(-0.25)
    (0.75, 0.5, 0.755, -0.31125, 0.35 * math.sqrt(3)),
    # t = 1 uses t' in the denominator: σ = 0.7 √(1/0.25) = 1.4, σ² = 1.96, std = 1.4·0.5; cv = (1 + 0)(-0.25)
    (1.0, 0.75, 1 - 1.96 * 0.25 / 2, -0.25, 0.7),
])
def test_flow_grpo_sde_step_matches_hand_derived_values(t, tn, cx, cv, std):
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    v = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    T, Tn = torch.full((3,), t, dtype=torch.float64), torch.full((3,), tn, dtype=torch.float64)
    mean, s = flow_grpo_sde(x, v, T, Tn, 0.7)
    assert torch.allclose(mean, cx * x + cv * v, rtol=0, atol=1e-14)
    assert torch.allclose(s, torch.full((3,), std, dtype=torch.float64), rtol=0, atol=1e-14)


def test_flow_grpo_sde_with_zero_noise_is_the_euler_step():
    x, v = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    T, Tn = torch.full((2,), 0.6, dtype=torch.float64), torch.full((2,), 0.3, dtype=torch.float64)
    mean, s = flow_grpo_sde(x, v, T, Tn, 0.0)
    assert torch.equal(mean, FlowMatching().step(x, T, Tn, v)) and torch.all(s == 0)


# ---------------------------------------------------------------- the 4-step policy
def test_every_step_is_stochastic_and_logged_log_probs_recompute_exactly():
    """Exploration noise at every one of the 4 steps; log π recomputed from the stored transitions (the sampler's
    transition_log_prob and the torchrl actor) equals the logged one exactly; the PPO ratio is 1 at every step."""
    model = _student()
    roll, labels, grid = _rollout(model)
    B, N = 6, 4
    assert roll["std"].shape == (B, N) and bool((roll["std"] > 0).all())
    x, act = roll["x_per_step"], roll["action"]
    for i in range(N):
        t, tn = grid[i].expand(B), grid[i + 1].expand(B)
        with torch.no_grad():
            lp = transition_log_prob(model, x[:, i], t, tn, act[:, i], labels, last=i == N - 1, final_std=0.1,
                                     noise_scale=0.7, sde="flow_grpo")
        assert torch.equal(lp, roll["log_prob"][:, i]), i
        if i < N - 1:   # the action is not the deterministic mean: noise was added at this step
            mean, _, _ = transition_mean_std(model, x[:, i], t, tn, labels, last=False, final_std=0.1,
                                             noise_scale=0.7, sde="flow_grpo")
            assert float((act[:, i] - mean.detach()).abs().max()) > 1e-3
    trans = rollout_transitions(roll, labels, advantage=torch.randn(B, 1, dtype=torch.float64))
    actor = make_student_actor(model, final_std=0.1, noise_scale=0.7, sde="flow_grpo")
    with torch.no_grad():
        lp = actor.get_dist(trans).log_prob(trans[PK.action])
    assert torch.allclose(lp, trans[PK.log_prob], rtol=0, atol=1e-12)
    loss = ClipPPOLoss(actor, critic_network=None, critic_coeff=None, entropy_bonus=False, clip_epsilon=0.2)
    for i in range(N):   # ratio exactly 1 at every step of the trajectory
        out = loss(trans[trans[PK.step] == i])
        assert abs(float(out["max_ratio"]) - 1) < 1e-12 and abs(float(out["mean_ratio"]) - 1) < 1e-12, i


def test_flow_grpo_refuses_an_eps_model():
    class Eps(torch.nn.Module):
        path = type("P", (), {"prediction": "epsilon", "to_x0": staticmethod(lambda x, t, p: x - p)})()

        def forward(self, x, t, c):
            return x

    with pytest.raises(ValueError, match="flow-matching"):
        transition_mean_std(Eps(), torch.zeros(1, 1, 2, 2), torch.ones(1) * 0.5, torch.ones(1) * 0.25, None,
                            last=False, final_std=0.1, sde="flow_grpo")


# ---------------------------------------------------------------- advantages: the clip bound and eps
def _adv(r, g, **kw):
    td = TensorDict({"reward": r, "group": g}, batch_size=[r.shape[0]])
    return group_relative(**kw)(td)["advantage"].squeeze(-1)


def test_group_advantage_is_bounded_by_sqrt_g_minus_1_so_clip_5_never_binds_at_g8():
    G = 8
    one_out = torch.tensor([1.0] + [0.0] * (G - 1))                  # the extreme case: one sample differs
    a = _adv(one_out, torch.zeros(G, dtype=torch.long), eps=0.0)
    assert abs(float(a.abs().max()) - math.sqrt(G - 1)) < 1e-5        # 2.6458 < 5
    torch.manual_seed(0)
    r = torch.cat([torch.randn(4000, G), torch.randn(4000, G).pow(9), (torch.rand(4000, G) > 0.9).float()])
    g = torch.arange(r.shape[0]).repeat_interleave(G)
    a = _adv(r.reshape(-1), g, eps=1e-4)
    assert float(a.abs().max()) <= math.sqrt(G - 1) + 1e-5
    td = TensorDict({"advantage": a.unsqueeze(-1)}, batch_size=[a.shape[0]])
    assert torch.equal(clip_advantage(5.0)(td)["advantage"].squeeze(-1), a)   # clip 5 is a no-op at G = 8
    assert float(clip_advantage(2.0)(td)["advantage"].abs().max()) == 2.0     # a clip below √(G-1) does bind


def test_eps_and_global_std_on_a_near_constant_group():
    """A group whose rewards differ by 1e-5 (numerical noise): eps 1e-6 blows it up to about ±0.9, eps 1e-4 keeps
    it below 0.1, the global std keeps it at the scale of the batch's spread."""
    r = torch.tensor([0.5, 0.5 + 1e-5, 0.5, 0.5 + 1e-5, 0.0, 1.0, 0.2, 0.9])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert float(_adv(r, g, eps=1e-6)[:4].abs().max()) > 0.8
    assert float(_adv(r, g, eps=1e-4)[:4].abs().max()) < 0.1
    glob = _adv(r, g, eps=1e-4, std_scope="global")
    assert float(glob[:4].abs().max()) < 1e-4
    assert torch.allclose(glob[4:], (r[4:] - r[4:].mean()) / (r.std(unbiased=False) + 1e-4))
    td = TensorDict({"reward_a": r, "group": g}, batch_size=[8])
    fc = from_config({"a": 1.0}, normalize_rewards="none", eps=1e-4, std="global")(td)["advantage"].squeeze(-1)
    assert torch.allclose(fc, glob)


def test_recipe_advantage_defaults_follow_flow_grpo():
    from dmdr.recipes import AdvantageConfig

    a = AdvantageConfig()
    assert a.eps == 1e-4 and a.std == "group"


# ---------------------------------------------------------------- dmd_ca_adv
def test_dmd_ca_adv_reduces_to_dmd_at_unit_advantage_and_to_dm_at_zero():
    torch.manual_seed(0)
    B, w = 4, 3.0
    x0 = torch.randn(B, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    rc, ru, fk = (torch.randn(B, 1, 4, 4, dtype=torch.float64) for _ in range(3))
    real_cfg = ru + w * (rc - ru)
    ref = weighted_dmd_loss(TensorDict({"x0_pred": x0, "x0_real": real_cfg, "x0_fake": fk}, batch_size=[B]),
                            weight=2.0)["loss_dmd"]
    ours = dmd_ca_adv_loss(x0, rc, ru, fk, torch.ones(B), w, weight=2.0)["loss_dmd"]
    g1, = torch.autograd.grad(ref, x0)
    g2, = torch.autograd.grad(ours, x0)
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-9)   # both losses compute in fp32
    zero = dmd_ca_adv_loss(x0, rc, ru, fk, torch.zeros(B), w)["loss_dmd"]
    g0, = torch.autograd.grad(zero, x0)
    norm = (x0.detach() - real_cfg).abs().flatten(1).mean(1).reshape(B, 1, 1, 1) + 1e-8
    # DM only; ∂/∂x0 of ½ mean(..)² is g / (B·D)
    assert torch.allclose(g0, (fk - rc) / norm / (B * 16), rtol=1e-5, atol=1e-9)
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0])
    ga, = torch.autograd.grad(dmd_ca_adv_loss(x0, rc, ru, fk, adv, w)["loss_dmd"], x0)
    ca = (w - 1) * (rc - ru)
    assert torch.allclose(ga, (fk - rc - adv.reshape(B, 1, 1, 1) * ca) / norm / (B * 16), rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- the honest reward
def test_weak_classes_reward_pays_only_classifier_confidence_on_the_chosen_classes():
    from dmdr.data.digits import load_digits_tensors, to_unit
    from dmdr.rewards.base import available_rewards, build_reward
    from dmdr.rewards.weak_classes import per_class_accuracy, per_class_confidence, weakest_classes

    assert "digits_weak_classes" in available_rewards()
    x, y = load_digits_tensors("holdout")
    x, y = to_unit(x[:200]), y[:200]
    r = build_reward("digits_weak_classes", classes=[3, 8])
    clf = build_reward("digits_classifier", mode="prob")
    v, p = r(x, y), clf(x, y)
    weak = (y == 3) | (y == 8)
    assert torch.equal(v[weak], p[weak]) and bool((v[~weak] == 0).all())
    white = torch.ones_like(x)
    assert float(r(white, y)[weak].mean()) < float(v[weak].mean())          # ink does not pay (unlike hackable)
    half = build_reward("digits_weak_classes", classes=[3, 8], others_weight=0.5)(x, y)
    assert torch.allclose(half[~weak], 0.5 * p[~weak])
    acc = per_class_accuracy(x, y)
    assert len(acc) == 10 and all(0.5 <= a <= 1 for a in acc)              # real digits: the eval net is accurate
    conf = per_class_confidence(x, y)
    assert all(0 < c <= 1 for c in conf) and len(set(conf)) == 10          # graded: no ties to break
    assert weakest_classes([0.9, 0.5, 0.99, 0.5, 0.7], k=2) == [1, 3]
    with pytest.raises(ValueError, match="non-empty"):
        build_reward("digits_weak_classes", classes=[])
