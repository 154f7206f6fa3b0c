"""``critic.lora: null``: a full trainable critic copy (DMD2), its scaled views, checkpoints and the DMD2 recipe."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call

from dmdr.errors import UserError
from dmdr.models.full_critic import FullCopyView
from dmdr.recipes import load_recipe, validate_recipe
from dmdr.families.registry import build_bundle
from dmdr.train.dmdr import DMDRTrainer


def _recipe(teacher, **over):
    d = {"task": "dmdr", "name": "t", "seed": 0, "model": {"teacher": teacher},
         "critic": {"lora": None, "scale_fake": 1.0},
         "optim": {"ratio": 2, "lr_gen": 1e-3, "lr_critic": 1e-3},
         "dmd": {"dynadg": {"enabled": False}, "dynars": {"enabled": False}, "tau_floor": 0.02, "tau_ceiling": 0.98},
         "generator": {"steps": 1},
         "logging": {"log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False},
         "stages": [{"name": "dmd", "steps": 2, "batch_size": 4}]}
    d.update(over)
    return validate_recipe(d)


def test_full_critic_is_a_separate_trainable_copy_and_the_teacher_stays_frozen(tiny_teacher):
    torch.manual_seed(0)
    tr = DMDRTrainer(_recipe(tiny_teacher), None, torch.device("cpu"))
    b = tr.bundle
    assert b.critic_module is not None and b.critic_module is not b.base
    n_base = sum(p.numel() for p in b.base.parameters())
    assert sum(p.numel() for p in b.critic_params) == n_base  # a full copy, not an adapter
    assert not any(p.requires_grad for p in b.base.parameters())
    base0 = {n: p.detach().clone() for n, p in b.base.named_parameters()}
    c0 = [p.detach().clone() for p in b.critic_params]
    g0 = [p.detach().clone() for p in b.generator_params]
    tr.iteration()  # critic only
    assert any(not torch.equal(a, p) for a, p in zip(c0, b.critic_params))
    assert all(torch.equal(a, p) for a, p in zip(g0, b.generator_params))
    tr.iteration()  # critic + generator
    assert tr.state.global_step == 1
    assert any(not torch.equal(a, p) for a, p in zip(g0, b.generator_params))
    assert all(torch.equal(p, base0[n]) for n, p in b.base.named_parameters())


def test_full_copy_view_interpolates_weights_and_sends_gradients_to_the_copy_only(tiny_teacher):
    from dmdr.models.tiny import load_tiny

    torch.manual_seed(0)
    base = load_tiny(tiny_teacher).requires_grad_(False)
    critic = copy.deepcopy(base).requires_grad_(True)
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, c = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 4, 10])
    assert torch.equal(FullCopyView(base, critic, 0.0)(x, t, c), base(x, t, c))
    assert torch.equal(FullCopyView(base, critic, 1.0)(x, t, c), critic(x, t, c))
    lam = 2.0
    want = functional_call(base, {n: pb + lam * (pc - pb) for (n, pb), pc in
                                  zip(base.named_parameters(), critic.parameters())}, (x, t, c))
    out = FullCopyView(base, critic, lam)(x, t, c)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert all(p.grad is None for p in base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())


def test_full_critic_checkpoint_round_trip(tiny_teacher, tmp_path):
    torch.manual_seed(0)
    tr = DMDRTrainer(_recipe(tiny_teacher), tmp_path, torch.device("cpu"))
    for _ in range(4):
        tr.iteration()
    path = tr.save()
    torch.manual_seed(1)
    tr2 = DMDRTrainer(_recipe(tiny_teacher), tmp_path, torch.device("cpu"))
    assert not all(torch.equal(a, b) for a, b in zip(tr.bundle.critic_params, tr2.bundle.critic_params))
    tr2.resume()
    assert set(tr2.bundle.critic_state()) == set(dict(tr.bundle.critic_module.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(tr.bundle.critic_params, tr2.bundle.critic_params))
    assert path is not None and tr2.state.global_step == tr.state.global_step


def test_uniform_tau_respects_floor_and_ceiling(tiny_teacher):
    tr = DMDRTrainer(_recipe(tiny_teacher), None, torch.device("cpu"))
    tau = tr.sample_tau(20000)
    assert tau.min() >= 0.02 and tau.max() <= 0.98 and tau.max() > 0.97 and tau.min() < 0.03
    tr2 = DMDRTrainer(_recipe(tiny_teacher, critic={"lora": {"rank": 4, "alpha": 4}},
                              dmd={"dynars": {"enabled": True, "horizon": 10}, "tau_ceiling": 0.9}),
                      None, torch.device("cpu"))
    assert tr2.sample_tau(5000).max() <= 0.9


def test_tau_floor_must_be_below_ceiling(tiny_teacher):
    with pytest.raises(Exception, match="tau_floor=0.5 must be below dmd.tau_ceiling=0.4"):
        _recipe(tiny_teacher, dmd={"tau_floor": 0.5, "tau_ceiling": 0.4})


def test_full_critic_is_refused_for_text_to_image_families():
    r = SimpleNamespace(model=SimpleNamespace(family="sd3"), critic=SimpleNamespace(lora=None))
    with pytest.raises(UserError, match="critic.lora: null .* tiny digits family only"):
        build_bundle(r, torch.device("cpu"))


def test_dmd2_recipe_is_the_documented_baseline():
    r = load_recipe("recipes/digits-dmd2.yaml")
    assert r.critic.lora is None and r.critic.scale_fake == 1.0
    assert not r.dmd.dynadg.enabled and not r.dmd.dynars.enabled
    assert (r.dmd.tau_floor, r.dmd.tau_ceiling, r.dmd.cfg) == (0.02, 0.98, 1.0)
    assert (r.optim.lr_gen, r.optim.lr_critic, r.optim.ratio, r.optim.grad_clip) == (1e-4, 1e-4, 5, 1.0)
    assert [(s.steps, s.batch_size, s.rewards) for s in r.stages] == [(900, 64, [])]
    assert r.optim.ema_decay is None
