"""Issue 12, deliverable 3: Decoupled DMD (dmdr/losses/decoupled_dmd.py) — hand-derived values in float64, the exact
reduction to DMDR's coupled DMD-with-CFG at equal renoise levels, each term's direction, the τ_CA schedules, the
recipe option and the trainer wiring (DMDR and GRPO with dmd_ca_adv)."""
import json
import os

import pytest
import torch
from tensordict import TensorDict

from dmdr import keys as K
from dmdr.losses.decoupled_dmd import (X0_FAKE_DM, X0_REAL_C_CA, X0_REAL_DM, X0_REAL_U_CA, decoupled_dmd_loss,
                                       decoupled_targets, sample_ca_tau)
from dmdr.losses.dmd import dmd_loss
from dmdr.losses.dmd_ca_adv import dmd_ca_adv_loss
from dmdr.paths import FlowMatching
from dmdr.recipes import RecipeError, load_recipe, recipes_dir, validate_recipe
from dmdr.schedules import sample_dynars
from dmdr.scores import distribution_matching_targets

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
D = torch.float64


def _targets(rc_dm, fk_dm, rc_ca, ru_ca):
    return TensorDict({X0_REAL_DM: rc_dm, X0_FAKE_DM: fk_dm, X0_REAL_C_CA: rc_ca, X0_REAL_U_CA: ru_ca},
                      batch_size=[rc_dm.shape[0]])


def _grad(x0, td, w, **kw):
    x0 = x0.clone().requires_grad_(True)
    out = decoupled_dmd_loss(x0, td, w, **kw)
    g, = torch.autograd.grad(out["loss_dmd"], x0)
    return out, g


# ---------------------------------------------------------------- hand-derived values
def test_hand_derived_loss_and_gradient_float64():
    # B = 1, two elements. x̂0 = [0, 0]; at τ_DM: real^c = [1, 1], fake = [0.5, 1]; at τ_CA: real^c = [2, 0],
    # real^u = [1, 0]; w = 3.
    #   DM = fake - real^c = [-0.5, 0];  CA = (3 - 1)([2, 0] - [1, 0]) = [2, 0]
    #   normaliser = mean |x̂0 - (real^c_DM + CA)| = mean |[-3, -1]| = 2
    #   g = (DM - CA) / 2 = [-1.25, 0];  ∂L/∂x̂0 = g / n = [-0.625, 0];  L = ½ mean g² = ½ · 1.5625 / 2 = 0.390625
    x0 = torch.zeros(1, 1, 1, 2, dtype=D)
    td = _targets(torch.tensor([1.0, 1.0], dtype=D).view(1, 1, 1, 2), torch.tensor([0.5, 1.0], dtype=D).view(1, 1, 1, 2),
                  torch.tensor([2.0, 0.0], dtype=D).view(1, 1, 1, 2), torch.tensor([1.0, 0.0], dtype=D).view(1, 1, 1, 2))
    out, g = _grad(x0, td, 3.0, eps=0.0)
    assert out["loss_dmd"].dtype == D
    assert float(out["loss_dmd"].detach()) == pytest.approx(0.390625, abs=1e-15)
    assert torch.allclose(g.flatten(), torch.tensor([-0.625, 0.0], dtype=D), atol=1e-15)
    assert float(out["dmd_weight"]) == 2.0
    assert float(out["ca_norm"]) == pytest.approx(2.0) and float(out["dm_norm"]) == pytest.approx(0.5)
    # advantage -1 reverses CA: g = (DM + CA)/2 = [0.75, 0]; sample weight 3 and weight 0.5 scale the gradient
    _, g = _grad(x0, td, 3.0, advantage=torch.tensor([-1.0], dtype=D), sample_weights=torch.tensor([3.0], dtype=D),
                 weight=0.5, eps=0.0)
    assert torch.allclose(g.flatten(), torch.tensor([0.75 / 2 * 3 * 0.5, 0.0], dtype=D), atol=1e-15)


# ---------------------------------------------------------------- exact reduction to coupled DMD
def test_equal_renoise_levels_reduce_exactly_to_coupled_dmd_with_cfg():
    g = torch.Generator().manual_seed(0)
    B, w = 5, 4.3
    x0, rc, ru, fk = (torch.randn(B, 3, 4, 4, generator=g, dtype=D) for _ in range(4))
    x0 = x0.requires_grad_(True)
    ours = decoupled_dmd_loss(x0, _targets(rc, fk, rc, ru), w)
    real_cfg = ru + w * (rc - ru)                                   # DMDR's CFG'd real estimate (method.md §2.5)
    ref = dmd_loss(TensorDict({K.X0_PRED: x0, K.X0_REAL: real_cfg, K.X0_FAKE: fk}, batch_size=[B]))
    ga, = torch.autograd.grad(ours["loss_dmd"], x0)
    gb, = torch.autograd.grad(ref["loss_dmd"], x0)
    assert torch.allclose(ours["loss_dmd"], ref["loss_dmd"], rtol=1e-12, atol=0)
    assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-14)
    assert float(ours["dmd_weight"]) == pytest.approx(float(ref["dmd_weight"]), rel=1e-12)
    # with the advantage: equals the coupled dmd_ca_adv regulariser
    adv = torch.randn(B, generator=g, dtype=D)
    x1 = x0.detach().clone().requires_grad_(True)
    ga, = torch.autograd.grad(decoupled_dmd_loss(x1, _targets(rc, fk, rc, ru), w, advantage=adv)["loss_dmd"], x1)
    gb, = torch.autograd.grad(dmd_ca_adv_loss(x1, rc, ru, fk, adv, w)["loss_dmd"], x1)
    assert torch.allclose(ga.double(), gb.double(), rtol=1e-5, atol=1e-9)   # dmd_ca_adv computes in fp32


class _Lin(torch.nn.Module):
    """A tiny per-sample velocity denoiser v = a·x_t + t·mean(x_t) + e[cond] (cond 10 = null)."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(3, 1, 1, generator=g, dtype=D))
        self.e = torch.nn.Parameter(torch.randn(11, 3, 1, 1, generator=g, dtype=D))
        self.path = FlowMatching(t_min=0.001)

    def forward(self, x, t, cond):
        return self.a * x + t.view(-1, 1, 1, 1) * x.mean(dim=(1, 2, 3), keepdim=True) + self.e[cond]

    def null_cond(self, cond):
        return torch.full_like(cond, 10)


def test_targets_at_equal_levels_and_noise_equal_the_coupled_targets():
    real, fake = _Lin(1), _Lin(2)
    g = torch.Generator().manual_seed(3)
    B, w = 4, 2.5
    x0 = torch.randn(B, 3, 4, 4, generator=g, dtype=D)
    tau = torch.rand(B, generator=g, dtype=D)
    noise = torch.randn(B, 3, 4, 4, generator=g, dtype=D)
    cond = torch.tensor([0, 3, 5, 9])
    td = decoupled_targets(x0, real, fake, cond, real.null_cond(cond), tau_dm=tau, tau_ca=tau, noise_dm=noise,
                           noise_ca=noise)
    ref = distribution_matching_targets(x0, real, fake, cond, tau=tau, noise=noise, uncond=real.null_cond(cond),
                                        cfg_scale=w)
    assert torch.allclose(td[X0_FAKE_DM], ref[K.X0_FAKE], rtol=0, atol=1e-13)
    composed = td[X0_REAL_DM] + (w - 1) * (td[X0_REAL_C_CA] - td[X0_REAL_U_CA])
    assert torch.allclose(composed, ref[K.X0_REAL], rtol=0, atol=1e-12)
    # different levels: the DM half is evaluated at τ_DM, the CA half at τ_CA
    tau_ca = tau * 0.5
    td2 = decoupled_targets(x0, real, fake, cond, real.null_cond(cond), tau_dm=tau, tau_ca=tau_ca, noise_dm=noise,
                            noise_ca=noise)
    assert torch.equal(td2[X0_REAL_DM], td[X0_REAL_DM]) and torch.equal(td2[X0_FAKE_DM], td[X0_FAKE_DM])
    x_ca = real.path.renoise(x0, tau_ca, noise)
    assert torch.allclose(td2[X0_REAL_U_CA], real.path.to_x0(x_ca, tau_ca, real(x_ca, tau_ca, real.null_cond(cond))),
                          atol=1e-13)


# ---------------------------------------------------------------- each term's direction
def test_dm_term_pulls_towards_real_and_ca_term_pushes_along_cond_minus_uncond():
    g = torch.Generator().manual_seed(1)
    B, w = 3, 3.0
    x0, rc, fk, ru = (torch.randn(B, 2, 4, 4, generator=g, dtype=D) for _ in range(4))
    # DM only (cond = uncond at τ_CA): a descent step moves x̂0 from the fake towards the real estimate
    _, gd = _grad(x0, _targets(rc, fk, rc, rc), w)
    assert torch.allclose(gd, (fk - rc) / ((x0 - rc).abs().flatten(1).mean(1).view(B, 1, 1, 1) + 1e-8) / gd[0].numel()
                          / B, atol=1e-14)
    assert float((-gd * (rc - fk)).sum()) > 0
    # CA only (fake = real at τ_DM): a descent step moves x̂0 along (w - 1)(cond - uncond)
    _, gc = _grad(x0, _targets(rc, rc, rc, ru), w)
    assert float((-gc * (rc - ru)).sum()) > 0
    assert torch.allclose(-gc / (-gc).flatten(1).norm(dim=1).view(B, 1, 1, 1),
                          (rc - ru) / (rc - ru).flatten(1).norm(dim=1).view(B, 1, 1, 1), atol=1e-12)
    # the two add up (common normaliser): DM + CA
    _, gboth = _grad(x0, _targets(rc, fk, rc, ru), w)
    norm_dm_only = (x0 - rc).abs().flatten(1).mean(1)
    norm_both = (x0 - (rc + (w - 1) * (rc - ru))).abs().flatten(1).mean(1)
    recon = (gd * norm_dm_only.view(B, 1, 1, 1) + gc * norm_both.view(B, 1, 1, 1)) / norm_both.view(B, 1, 1, 1)
    assert torch.allclose(gboth, recon, atol=1e-12)
    # advantage 0: CA switched off, DM unchanged in direction
    _, g0 = _grad(x0, _targets(rc, fk, rc, ru), w, advantage=torch.zeros(B, dtype=D))
    assert torch.allclose(g0 / g0.flatten(1).norm(dim=1).view(B, 1, 1, 1),
                          (fk - rc) / (fk - rc).flatten(1).norm(dim=1).view(B, 1, 1, 1), atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 16, 2, 4, 4), (2, 1, 8, 8)])
def test_shapes_images_and_video_latents(shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(*shape, generator=g).requires_grad_(True)
    td = _targets(*(torch.randn(*shape, generator=g) for _ in range(4)))
    out = decoupled_dmd_loss(x0, td, 2.0, advantage=torch.randn(shape[0], 1, generator=g))
    assert out["loss_dmd"].shape == () and out["loss_dmd"].dtype == torch.float32
    out["loss_dmd"].backward()
    assert x0.grad.shape == x0.shape and torch.isfinite(x0.grad).all()
    bf = x0.detach().bfloat16().requires_grad_(True)
    assert decoupled_dmd_loss(bf, td, 2.0)["loss_dmd"].dtype == torch.float32   # fp32 loss, as dmd_loss


# ---------------------------------------------------------------- τ_CA schedules
def test_below_gen_draws_below_the_generator_time():
    s = torch.tensor([1.0, 0.75, 0.5, 0.25] * 500)
    torch.manual_seed(0)
    tau = sample_ca_tau(s, 0, "below_gen")
    assert tau.shape == s.shape and tau.dtype == torch.float32
    assert bool((tau <= s).all()) and bool((tau >= 0).all())
    for v in (1.0, 0.5, 0.25):  # U(0, s): mean s/2
        assert float(tau[s == v].mean()) == pytest.approx(v / 2, abs=0.04 * v + 0.01)
    torch.manual_seed(0)
    assert bool((sample_ca_tau(s, 0, "below_gen", floor=0.1, ceiling=0.6) >= 0.1).all())
    torch.manual_seed(0)
    assert bool((sample_ca_tau(s, 0, "below_gen", floor=0.1, ceiling=0.6) <= 0.6).all())


def test_annealed_starts_at_dmdr_dynars_and_ends_at_below_gen():
    s = torch.tensor([0.9, 0.5, 0.3, 1.0])
    torch.manual_seed(7)
    start = sample_ca_tau(s, 0, "annealed", horizon=100, alpha0=4.0, beta0=1.5)
    torch.manual_seed(7)
    assert torch.equal(start, sample_dynars(4, 0, 100, 4.0, 1.5))           # DMDR's τ at k = 0, exactly
    torch.manual_seed(7)
    end = sample_ca_tau(s, 100, "annealed", horizon=100, alpha0=4.0, beta0=1.5)
    torch.manual_seed(7)
    assert torch.equal(end, sample_ca_tau(s, 0, "below_gen"))               # Decoupled DMD's at k >= K, exactly
    torch.manual_seed(7)
    mid = sample_ca_tau(s.repeat(2000), 50, "annealed", horizon=100)
    hi = s.repeat(2000) + (1 - s.repeat(2000)) * 0.5                       # c(K/2) = 0.5
    assert bool((mid <= hi + 1e-6).all()) and float(mid.max()) > float(s.min())


def test_independent_uses_the_dm_sampler_and_unknown_schedule_fails():
    calls = []
    tau = sample_ca_tau(torch.ones(3), 0, "independent", tau_dm_sampler=lambda b: calls.append(b) or torch.full((b,), .3))
    assert calls == [3] and torch.allclose(tau, torch.full((3,), 0.3))
    with pytest.raises(ValueError, match="unknown ca_tau"):
        sample_ca_tau(torch.ones(3), 0, "nope")


def test_the_first_grid_time_counts_as_pure_noise_for_tau_ca():
    # SDXL's one-step grid is [0.399, 0] with a pure-noise input at 0.399: nothing is resolved, τ_CA spans (0, 1)
    from dmdr.losses.decoupled_dmd import decoupled_dmd_terms

    real, fake = _Lin(1), _Lin(2)
    dmd = validate_recipe(_dmdr(cfg=2.0, decoupled={"enabled": True}, dynars={"enabled": False})).dmd
    x0 = torch.randn(400, 3, 4, 4, dtype=D)
    s = torch.full((400,), 0.399, dtype=D)
    cond = torch.zeros(400, dtype=torch.long)
    kw = dict(real=real, fake=fake, cfg_scale=2.0, tau_dm=torch.rand(400, dtype=D), step=0, dmd=dmd)
    torch.manual_seed(0)
    first = decoupled_dmd_terms(x0, s, cond, real.null_cond(cond), t_first=0.399, **kw)
    torch.manual_seed(0)
    later = decoupled_dmd_terms(x0, s, cond, real.null_cond(cond), t_first=1.0, **kw)
    assert float(first["tau_ca"]) == pytest.approx(float(later["tau_ca"]) / 0.399, rel=1e-5)  # same u: 1·u vs s·u
    assert float(first["tau_ca"]) > 0.399 / 2 + 0.1


# ---------------------------------------------------------------- recipe option
def _dmdr(**dmd):
    return {"task": "dmdr", "name": "t", "stages": [{"name": "a", "steps": 1}], "dmd": dmd}


def test_recipe_option_validates_with_one_line_errors():
    r = validate_recipe(_dmdr(cfg=2.0, decoupled={"enabled": True, "ca_tau": "annealed"}))
    assert r.dmd.decoupled.enabled and r.dmd.decoupled.ca_tau == "annealed"
    assert validate_recipe(_dmdr()).dmd.decoupled.enabled is False                     # off by default
    for bad, msg in [({"cfg": 1.0, "decoupled": {"enabled": True}}, "dmd.cfg > 1"),
                     ({"cfg": 2.0, "decoupled": {"enabled": True, "ca_tau": "x"}}, "ca_tau"),
                     ({"cfg": 2.0, "dynars": {"enabled": False}, "decoupled": {"enabled": True, "ca_tau": "annealed"}},
                      "dynars.enabled=true"),
                     ({"decoupled": {"enabled": True, "tau": 1}}, "tau")]:
        with pytest.raises(RecipeError, match=msg) as e:
            validate_recipe(_dmdr(**bad))
        assert "\n" not in str(e.value)


def test_cli_refuses_a_bad_value_with_one_line_and_exit_2(tmp_path):
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    res = CliRunner().invoke(app, ["train", str(recipes_dir() / "digits.yaml"), "--out", str(tmp_path / "o"),
                                   "--set", "dmd.decoupled.enabled=true", "--set", "dmd.cfg=1.0", "--dry-run"])
    assert res.exit_code == 2
    lines = [l for l in res.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "dmd.cfg > 1" in lines[0]


# ---------------------------------------------------------------- trainers
def test_dmdr_trainer_uses_the_decoupled_term_with_tau_ca_below_the_generator_time(tiny_teacher, monkeypatch):
    import dmdr.losses.decoupled_dmd as mod
    from dmdr.train.dmdr import DMDRTrainer

    seen = []
    real_targets = mod.decoupled_targets

    def spy(x0, real, fake, cond, uncond, **kw):
        seen.append(kw)
        return real_targets(x0, real, fake, cond, uncond, **kw)

    monkeypatch.setattr(mod, "decoupled_targets", spy)
    draws = []
    real_sample = mod.sample_ca_tau

    def spy_tau(s, step, schedule, **kw):
        draws.append((s.clone(), real_sample(s, step, schedule, **kw)))
        return draws[-1][1]

    monkeypatch.setattr(mod, "sample_ca_tau", spy_tau)
    base = {"task": "dmdr", "name": "t", "seed": 0, "model": {"teacher": tiny_teacher},
            "critic": {"lora": {"rank": 4, "alpha": 4}}, "optim": {"ratio": 1},
            "generator": {"steps": 4, "shift": 3.0, "backward_sim": "ode"},
            "logging": {"log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False},
            "stages": [{"name": "a", "steps": 3, "batch_size": 8}]}
    torch.manual_seed(0)
    tr = DMDRTrainer(validate_recipe({**base, "dmd": {"cfg": 3.0, "decoupled": {"enabled": True}}}), None,
                     torch.device("cpu"))
    grid = set(float(v) for v in tr.grid[:-1])
    outs = [tr.iteration() for _ in range(3)]
    assert len(seen) == 3 and all(o["ca_norm"] > 0 and o["dm_norm"] >= 0 for o in outs)
    for kw in seen:
        assert not torch.equal(kw["tau_ca"], kw["tau_dm"]) and not torch.equal(kw["noise_ca"], kw["noise_dm"])
    # τ_CA ≤ s per sample (below_gen), where s are the grid times of the generator inputs
    assert len(draws) == 3
    for (s, tau_ca), kw in zip(draws, seen):
        assert torch.equal(tau_ca, kw["tau_ca"]) and bool((tau_ca <= s).all())
        assert set(float(v) for v in s) <= grid and len(set(float(v) for v in s)) > 1
    torch.manual_seed(0)
    tr2 = DMDRTrainer(validate_recipe({**base, "dmd": {"cfg": 3.0}}), None, torch.device("cpu"))
    coupled = tr2.iteration()
    assert len(seen) == 3 and "ca_norm" not in coupled                    # the coupled path does not call it
    assert coupled["loss_dmd"] != pytest.approx(outs[0]["loss_dmd"], rel=1e-6)


def _grpo(teacher, out, *over):
    from dmdr.train.grpo import GRPOTrainer

    r = load_recipe(recipes_dir() / "digits-grpo.yaml",
                    [f"model.teacher={teacher}", "runtime.device=cpu", "rl.batch_size=8", "rl.group_size=4",
                     "rl.minibatch_size=4", "optim.ratio=1", "iterations=2", "eval.samples=0", "logging.progress=false",
                     "logging.log_every=1", "logging.sample_every=0", "logging.checkpoint_every=0",
                     "critic.lora.rank=4", "critic.lora.alpha=4", "monitors.every=0", *over])
    GRPOTrainer(r, out, torch.device("cpu"), console=lambda *a: None).run()
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("reg", ["dmd", "dmd_ca_adv"])
def test_grpo_composes_with_decoupled_one_extra_real_forward_per_dmd_step(shared_tiny_teacher, tmp_path, reg):
    # Known configuration (tests/test_rl_trainer_costs.py): 4 DMD steps per iteration on minibatches of 4. Coupled
    # DMD with CFG runs the real model on 2·4 samples per step; decoupled on 3·4 (cond at τ_DM, cond + uncond at τ_CA)
    coupled = _grpo(shared_tiny_teacher, tmp_path / "c", f"rl.regularizer={reg}", "dmd.cfg=2.0")[-1]
    dec = _grpo(shared_tiny_teacher, tmp_path / "d", f"rl.regularizer={reg}", "dmd.cfg=2.0",
                "dmd.decoupled.enabled=true")[-1]
    assert dec["nfe_total"] - coupled["nfe_total"] == 4 * 4
    assert dec["ca_norm"] > 0 and 0 <= dec["tau_ca"] <= 1


def test_grpo_refuses_decoupled_without_a_dmd_regulariser(shared_tiny_teacher, tmp_path):
    from dmdr.errors import UserError

    with pytest.raises(UserError, match="rl.regularizer=kl uses none"):
        _grpo(shared_tiny_teacher, tmp_path, "rl.regularizer=kl", "dmd.cfg=2.0", "dmd.decoupled.enabled=true")
