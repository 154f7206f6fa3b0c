"""Decoupled DMD (``dmd.decoupled``): the CFG-augmentation and distribution-matching terms at separate renoise levels.

Decoupled DMD (Liu et al., ICLR 2026, arXiv 2511.22677, Eq. 6 and 8, Alg. 1; the Z-Image-Turbo recipe, Z-Image
report arXiv 2511.22699 §4.5; method.md §6.3) splits the CFG'd DMD direction into a distribution-matching (DM)
"regulariser" and a CFG-augmentation (CA) "engine" and renoises the generator output x̂0 separately for each:

    x_dm = renoise(sg(x̂0), τ_DM, ε_1),   x_ca = renoise(sg(x̂0), τ_CA, ε_2)        (t = 1 is noise, as everywhere in dmdr)
    DM = x̂0_fake(x_dm) − x̂0_real^c(x_dm)                      # real and fake at the same level τ_DM
    CA = (w − 1) (x̂0_real^c(x_ca) − x̂0_real^u(x_ca))          # CFG scale w (dmd.cfg, with jitter)
    g_b = nan_to_num( (DM − A_b · CA) / (mean_{elements} |x̂0 − (x̂0_real^c(x_dm) + CA)| + eps) )
    L = weight · ½ mean_b w_b mean_{elements} (x̂0 − sg(x̂0 − g_b))²   ⇒   ∂L/∂x̂0_b = weight · w_b · g_b / (B · n)

with n the number of elements per sample (C·H·W, or C·F·H·W for video). The paper writes Eq. 8 in score space with
t = 0 as noise; in x̂0 space (dmdr's convention, t = 1 is noise) the real-minus-fake score is proportional to
x̂0_real − x̂0_fake, which is why DM carries the opposite sign of the score form, and the paper's ``τ_CA ~ U(t, 1)``
("cleaner than the generator's current level t") becomes ``τ_CA ≤ s`` for a generator evaluated at time s.

* The normaliser is DMDR's per-sample DMD weighting (method.md §2.4) with the CFG'd real estimate replaced by
  ``x̂0_real^c(x_dm) + CA``. The paper's Alg. 1 has no normaliser (a proxy-loss weight λ instead); this choice is
  dmdr's and it is what makes the reduction below exact.
* **Reduction.** At ``τ_CA = τ_DM`` with the same noise (so x_ca = x_dm), ``A ≡ 1`` and ``w_b ≡ 1`` this is exactly
  DMDR's coupled DMD-with-CFG loss (:func:`dmdr.losses.dmd.dmd_loss` with x̂0_real = x̂0_real^u + w (x̂0_real^c −
  x̂0_real^u)); tests/test_decoupled_dmd.py checks it in float64.
* ``A`` (advantage, (B,) or (B,1)) is the RL regulariser of :mod:`dmdr.losses.dmd_ca_adv` (``rl.regularizer:
  dmd_ca_adv``): CA multiplied by the advantage, DM kept as the regulariser. ``A = None`` means A ≡ 1.
* ``w_b`` (sample_weights, (B,)) are the ``rl.regularizer: dmd_adv`` per-sample weights; None means 1.

τ_CA schedules (``dmd.decoupled.ca_tau``), s = the generator time of each sample (B,), u a uniform or DynaRS draw:

* ``below_gen`` — Decoupled DMD's "Decoupled-Hybrid" (➃, the paper's best): ``τ_CA = clamp(s · u, floor, ceiling)``,
  u ~ U(0, 1).
* ``annealed`` — the DMDR maintainer's suggestion for pairing with DynaRS (official repository issue #4): CA's DynaRS
  starts at DMDR's schedule and ends at Decoupled DMD's: ``τ_CA = clamp(hi(k) · u, floor, ceiling)``,
  u ~ Beta(α(k), β(k)) (DynaRS, method.md §2.7), ``hi(k) = s + (1 − s) c(k)`` with DynaRS's cosine c(k). At k = 0 this
  is DMDR's τ ~ Beta(α0, β0) exactly; at k ≥ K_dyn it is ``below_gen`` exactly.
* ``independent`` — the paper's ablation ➁: τ_CA drawn independently from the same sampler as τ_DM.

τ_DM is always the DMD sampler of the recipe (DynaRS, or uniform when DynaRS is off): "DM should span the full
noise range" (paper §4.2) and "the DM branch uses DynaRS" (issue #4).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor

from dmdr.models.contract import Denoiser, cat_cond
from dmdr.schedules import cosine_decay, dynars_beta_params

# TensorDict keys of :func:`decoupled_targets` (no grad, shapes of x̂0)
X0_REAL_DM = "x0_real_dm"          # x̂0_real^c at x_dm
X0_FAKE_DM = "x0_fake_dm"          # x̂0_fake at x_dm
X0_REAL_C_CA = "x0_real_cond_ca"   # x̂0_real^c at x_ca
X0_REAL_U_CA = "x0_real_uncond_ca"  # x̂0_real^u at x_ca
CA_TAU_SCHEDULES = ("below_gen", "annealed", "independent")


def sample_ca_tau(s: Tensor, step: int, schedule: str, *, horizon: int = 0, alpha0: float = 4.0, beta0: float = 1.5,
                  floor: float = 0.0, ceiling: float = 1.0, tau_dm_sampler=None) -> Tensor:
    """τ_CA (B,) float32 on ``s.device`` for generator times ``s`` (B,) at generator step ``step`` (module docstring).

    ``horizon, alpha0, beta0``: DynaRS's K_dyn, α0, β0 (``annealed`` only). ``tau_dm_sampler``: a callable B -> (B,)
    τ (``independent`` only). Uses the global torch RNG (checkpointed by the trainers, so resumes are exact)."""
    B = s.shape[0]
    if schedule == "independent":
        if tau_dm_sampler is None:
            raise ValueError("ca_tau=independent needs tau_dm_sampler")
        return tau_dm_sampler(B).to(device=s.device, dtype=torch.float32)
    s64 = s.detach().to(device="cpu", dtype=torch.float64)
    if schedule == "below_gen":
        hi, u = s64, torch.rand(B, dtype=torch.float64)
    elif schedule == "annealed":
        a, b = dynars_beta_params(step, horizon, alpha0, beta0)
        if a == 1.0 and b == 1.0:
            u = torch.rand(B, dtype=torch.float64)
        else:  # the same Gamma-ratio Beta draw as dmdr.schedules.sample_dynars (identical values at k = 0)
            ga = torch._standard_gamma(torch.full((B,), a, dtype=torch.float64))
            gb = torch._standard_gamma(torch.full((B,), b, dtype=torch.float64))
            u = ga / (ga + gb)
        c = cosine_decay(step, horizon)
        hi = s64 + (1.0 - s64) * c
    else:
        raise ValueError(f"unknown ca_tau schedule {schedule!r}; expected one of {', '.join(CA_TAU_SCHEDULES)}")
    return (hi * u).clamp(min=floor, max=min(ceiling, 1.0)).to(device=s.device, dtype=torch.float32)


@torch.no_grad()
def decoupled_targets(x0_pred: Tensor, real: Denoiser, fake: Denoiser, cond: Any, uncond: Any, *, tau_dm: Tensor,
                      tau_ca: Tensor, noise_dm: Tensor, noise_ca: Tensor) -> TensorDict:
    """Renoise sg(x̂0) at τ_DM and τ_CA and evaluate the scores, without gradients.

    The real model runs once on a 3B batch [x_dm | x_ca | x_ca] with conditions [c | c | ∅]; the fake model once on
    x_dm. Shapes: x0_pred, noise_* (B, ...); tau_* (B,). Returns TensorDict(batch B) with :data:`X0_REAL_DM`,
    :data:`X0_FAKE_DM`, :data:`X0_REAL_C_CA`, :data:`X0_REAL_U_CA` (float32 or wider).
    """
    path = real.path
    x0 = x0_pred.detach()
    x_dm, x_ca = path.renoise(x0, tau_dm, noise_dm), path.renoise(x0, tau_ca, noise_ca)
    x3, t3 = torch.cat([x_dm, x_ca, x_ca]), torch.cat([tau_dm, tau_ca, tau_ca])
    r_dm, r_c, r_u = path.to_x0(x3, t3, real(x3, t3, cat_cond(cat_cond(cond, cond), uncond))).chunk(3)
    f_dm = fake.path.to_x0(x_dm, tau_dm, fake(x_dm, tau_dm, cond))
    up = (lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    return TensorDict({X0_REAL_DM: up(r_dm), X0_FAKE_DM: up(f_dm), X0_REAL_C_CA: up(r_c), X0_REAL_U_CA: up(r_u)},
                      batch_size=[x0.shape[0]])


def decoupled_dmd_loss(x0_pred: Tensor, targets: TensorDict, cfg_scale: float, *, advantage: Tensor | None = None,
                       sample_weights: Tensor | None = None, weight: float = 1.0, eps: float = 1e-8) -> TensorDict:
    """The Decoupled DMD loss (module docstring). ``x0_pred`` (B, ...) differentiable; ``targets`` from
    :func:`decoupled_targets`. Computed in fp32 (fp64 inputs stay fp64).

    Returns TensorDict (no batch dims): ``loss_dmd``; diagnostics ``dm_norm``, ``ca_norm`` (mean per-sample L2
    norms of DM and CA, before the advantage), ``dmd_grad_norm`` (of g), ``dmd_real_fake_gap`` (mean |DM|) and
    ``dmd_weight`` (mean normaliser) — the last three as in :func:`dmdr.losses.dmd.dmd_loss`."""
    up = (lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    x0 = up(x0_pred)
    B = x0.shape[0]
    with torch.no_grad():
        rc_dm, fk_dm = up(targets[X0_REAL_DM]), up(targets[X0_FAKE_DM])
        rc_ca, ru_ca = up(targets[X0_REAL_C_CA]), up(targets[X0_REAL_U_CA])
        dm = fk_dm - rc_dm
        ca = (cfg_scale - 1.0) * (rc_ca - ru_ca)
        norm = (x0.detach() - (rc_dm + ca)).abs().flatten(1).mean(1) + eps  # (B,)
        shape = (B,) + (1,) * (x0.ndim - 1)
        a = torch.ones(shape, dtype=x0.dtype, device=x0.device) if advantage is None else \
            advantage.detach().reshape(shape).to(x0.dtype)
        g = torch.nan_to_num((dm - a * ca) / norm.reshape(shape))
    per_sample = ((x0 - (x0.detach() - g)) ** 2).flatten(1).mean(1)
    w = torch.ones_like(per_sample) if sample_weights is None else sample_weights.detach().reshape(-1).to(x0.dtype)
    loss = weight * 0.5 * (w * per_sample).mean()
    return TensorDict({"loss_dmd": loss, "dm_norm": dm.flatten(1).norm(dim=1).mean(),
                       "ca_norm": ca.flatten(1).norm(dim=1).mean(), "dmd_grad_norm": g.flatten(1).norm(dim=1).mean(),
                       "dmd_real_fake_gap": dm.abs().mean(), "dmd_weight": norm.mean()}, batch_size=[])


def decoupled_dmd_terms(x0_pred: Tensor, s: Tensor, cond: Any, uncond: Any, *, real: Denoiser, fake: Denoiser,
                        cfg_scale: float, tau_dm: Tensor, step: int, dmd: Any, tau_sampler=None,
                        advantage: Tensor | None = None, sample_weights: Tensor | None = None, weight: float = 1.0,
                        autocast=contextlib.nullcontext, t_first: float = 1.0) -> TensorDict:
    """One generator step's Decoupled DMD term, as the trainers call it: draw τ_CA (:func:`sample_ca_tau`, schedule
    ``dmd.decoupled.ca_tau``), two fresh noises, the scores (:func:`decoupled_targets`, under ``autocast()``), then
    :func:`decoupled_dmd_loss`. ``dmd`` is the recipe's ``dmd`` section; ``tau_sampler`` the trainer's τ_DM sampler
    (B -> (B,)); ``real`` / ``fake`` the real (λ_r, DynaDG) and fake (λ_f) views. Adds the diagnostic ``tau_ca``.

    ``t_first`` is the first grid time: a generator evaluated there sees pure noise (SDXL's one-step grid starts at
    0.399 on a pure-noise input), so it counts as s = 1 for τ_CA: nothing is resolved yet."""
    s = torch.where(s >= t_first - 1e-6, torch.ones_like(s), s)
    rs = dmd.dynars
    tau_ca = sample_ca_tau(s, step, dmd.decoupled.ca_tau, horizon=rs.horizon if rs.enabled else 0, alpha0=rs.alpha0,
                           beta0=rs.beta0, floor=dmd.tau_floor, ceiling=dmd.tau_ceiling, tau_dm_sampler=tau_sampler)
    noise_dm, noise_ca = torch.randn_like(x0_pred), torch.randn_like(x0_pred)
    with autocast():
        td = decoupled_targets(x0_pred, real, fake, cond, uncond, tau_dm=tau_dm, tau_ca=tau_ca, noise_dm=noise_dm,
                               noise_ca=noise_ca)
    out = decoupled_dmd_loss(x0_pred, td, cfg_scale, advantage=advantage, sample_weights=sample_weights, weight=weight)
    out["tau_ca"] = tau_ca.float().mean()
    return out


__all__ = ["CA_TAU_SCHEDULES", "X0_FAKE_DM", "X0_REAL_C_CA", "X0_REAL_DM", "X0_REAL_U_CA", "decoupled_dmd_loss",
           "decoupled_dmd_terms", "decoupled_targets", "sample_ca_tau"]
