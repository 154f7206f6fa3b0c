"""Samplers: free functions with one signature ``sampler(model, noise, timesteps, cond, ...)``.

* :func:`sample_euler` — the multi-step teacher sampler (Euler for flow matching, DDIM for ε) with CFG.
* :func:`few_step_rollout` — the student's few-step rollout used for backward simulation (method.md §2.2), in
  ``ode`` or ``sde`` mode, returning the per-step states, the per-step x̂0 and the grid.
* :func:`clean_targets` — which x̂0 each grid step is trained on (the official ode/sde semantics).
* :func:`stochastic_rollout` — the sde rollout with per-step Gaussian log-probabilities (policy gradients);
  :func:`transition_log_prob` recomputes one step's log-probability from a stored transition.

``model`` follows the contract of :mod:`dmdr.models.contract`; ``timesteps`` is a (N+1,) grid from
:func:`dmdr.schedules.few_step_grid` (t_0 = 1 noise … t_N). Logging goes through ``callback(i, state_dict)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from tensordict import TensorDict
from torch import Tensor

from dmdr import keys as K
from dmdr.models.contract import Denoiser
from dmdr.scores import cfg_prediction

Callback = Callable[[int, dict], None]


def _t(value: Tensor, batch: int, like: Tensor) -> Tensor:
    return value.to(device=like.device, dtype=like.dtype).expand(batch)


@torch.no_grad()
def sample_euler(model: Denoiser, noise: Tensor, timesteps: Tensor, cond: Any, *, uncond: Any = None,
                 cfg: float = 1.0, callback: Callback | None = None) -> Tensor:
    """Deterministic multi-step sampler: ``x_{i+1} = path.step(x_i, t_i, t_{i+1}, pred_w(x_i, t_i))``.

    For flow matching this is Euler, ``x_{i+1} = x_i + (t_{i+1} - t_i) v``; for ε-prediction it is DDIM. The last
    step returns x̂0. ``pred_w = p_u + w (p_c - p_u)`` when ``cfg = w > 1`` and ``uncond`` is given.

    Shapes: noise (B,C,H,W), timesteps (N+1,), returns (B,C,H,W). NFE = N (2N with CFG, batched).
    """
    x, B, path = noise, noise.shape[0], model.path
    n = timesteps.shape[0] - 1
    for i in range(n):
        t, t_next = _t(timesteps[i], B, x), _t(timesteps[i + 1], B, x)
        pred = cfg_prediction(model, x, t, cond, uncond, cfg)
        x = path.to_x0(x, t, pred) if i == n - 1 else path.step(x, t, t_next, pred)
        if callback is not None:
            callback(i, {"x": x, "t": t, "pred": pred})
    return x


@torch.no_grad()
def few_step_rollout(model: Denoiser, noise: Tensor, timesteps: Tensor, cond: Any, *,
                     mode: Literal["ode", "sde"] = "ode", step_noise: Tensor | None = None,
                     callback: Callback | None = None) -> TensorDict:
    """The student's N-step rollout for backward simulation (method.md §2.2), under ``no_grad``.

    * ``ode``: ``x_{i+1} = x_i + (t_{i+1} - t_i) G(x_i, t_i)`` (``path.step``), the last step returns x̂0.
    * ``sde``: ``x̂0_i = to_x0(x_i, t_i, G(x_i, t_i))``, ``x_{i+1} = renoise(x̂0_i, t_{i+1}, ε_i)`` with fresh ε_i.

    Args:
        noise: (B,C,H,W) initial noise at t_0; timesteps: (N+1,) grid; step_noise: optional (N,B,C,H,W) ε_i.
    Returns:
        TensorDict(batch B): ``x_per_step`` (B,N,C,H,W) the generator inputs, ``x0_per_step`` (B,N,C,H,W) the
        per-step x̂0, ``sample`` (B,C,H,W) the final sample, ``grid`` (B,N+1).
    """
    x, B, path = noise, noise.shape[0], model.path
    n = timesteps.shape[0] - 1
    xs, x0s = [], []
    for i in range(n):
        t, t_next = _t(timesteps[i], B, x), _t(timesteps[i + 1], B, x)
        pred = model(x, t, cond)
        x0 = path.to_x0(x, t, pred)
        xs.append(x)
        x0s.append(x0)
        if i == n - 1:
            x = x0
        elif mode == "ode":
            x = path.step(x, t, t_next, pred)
        elif mode == "sde":
            eps = step_noise[i] if step_noise is not None else torch.randn_like(x)
            x = path.renoise(x0, t_next, eps)
        else:
            raise ValueError(f"unknown rollout mode {mode!r}; use 'ode' or 'sde'")
        if callback is not None:
            callback(i, {"x": x, "x0": x0, "t": t})
    return TensorDict({
        K.X_PER_STEP: torch.stack(xs, 1),
        K.X0_PER_STEP: torch.stack(x0s, 1),
        K.SAMPLE: x,
        K.GRID: timesteps.to(noise.dtype).to(noise.device).expand(B, n + 1),
    }, batch_size=[B])


def clean_targets(rollout: TensorDict, mode: Literal["ode", "sde"]) -> Tensor:
    """The clean sample each grid step is trained on, (B,N,C,H,W) (method.md §2.2, the official semantics).

    ``ode``: the final N-step sample for every step ("we use a fix x0 state for ode sampling");
    ``sde``: the x̂0 predicted at step i.
    """
    x0s = rollout[K.X0_PER_STEP]
    if mode == "ode":
        return rollout[K.SAMPLE].unsqueeze(1).expand_as(x0s)
    return x0s


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduce: Literal["mean", "sum"] = "mean") -> Tensor:
    """``log N(x; mean, std² I)`` reduced over all non-batch dims: ``sum`` (the true density) or ``mean``
    (per-dimension average, as Flow-GRPO does). Shapes: x, mean (B,...); std scalar or (B,). Returns (B,)."""
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    if std.ndim == 1:
        std = std.reshape(-1, *([1] * (x.ndim - 1)))
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.sum(1) if reduce == "sum" else lp.mean(1)


def flow_grpo_sde(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """One step of Flow-GRPO's reverse-time SDE (Liu et al. 2025, arXiv 2505.05470, Eq. 9 and its discretisation,
    ``sde_step_with_logprob`` in the official code), for flow matching ``x_t = (1 - t) x0 + t ε``, ``v = ε - x0``:

        x_{t'} = x_t + [v + σ_t²/(2t) (x_t + (1 - t) v)] Δt + σ_t √(-Δt) ξ,   Δt = t' - t < 0,  ξ ~ N(0, I)
        σ_t = a √(t / (1 - t))   (t = 1 is replaced by t' in the denominator, as the official code does with
                                  ``sigma_max = sigmas[1]``)

    i.e. ``mean = x (1 + σ_t² Δt / (2t)) + v (1 + σ_t² (1 - t) / (2t)) Δt``, ``std = σ_t √(-Δt)``. ``a`` =
    ``noise_level`` (Flow-GRPO's default 0.7); ``a → 0`` gives the Euler (ODE) step. Shapes: x, v (B,...),
    t, t_next (B,). Returns (mean (B,...), std (B,)).
    """
    t64, tn = t.to(x.dtype), t_next.to(x.dtype)
    denom_t = torch.where(t64 >= 1, tn, t64)
    sigma = noise_level * torch.sqrt(t64 / (1 - denom_t))
    dt = tn - t64
    b = (-1,) + (1,) * (x.ndim - 1)
    s2, tb, dtb = (sigma**2).reshape(b), t64.reshape(b), dt.reshape(b)
    mean = x * (1 + s2 / (2 * tb) * dtb) + v * (1 + s2 * (1 - tb) / (2 * tb)) * dtb
    return mean, sigma * torch.sqrt(-dt)


SDE_FORMS = ("dmd2", "flow_grpo")


def transition_mean_std(model: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, cond: Any, *,
                        last: bool, final_std: float, noise_scale: float = 1.0,
                        sde: Literal["dmd2", "flow_grpo"] = "dmd2") -> tuple[Tensor, Tensor, Tensor]:
    """One stochastic step's Gaussian ``N(mean, std² I)`` (non-final steps), in one of two forms:

    * ``dmd2``: ``mean = renoise(x̂0, t', 0)``, ``std = noise_scale · renoise(0, t', 1)``; for flow matching
      ``x_{i+1} ~ N((1 - t_{i+1}) x̂0(x_i), t_{i+1}² I)`` (the DMD2-style sde step);
    * ``flow_grpo``: Flow-GRPO's SDE step (:func:`flow_grpo_sde`, Eq. 9 of arXiv 2505.05470) with
      ``a = noise_scale``; flow-matching paths only.

    The last step (t_N = t_min) would be deterministic; it gets exploration noise ``N(x̂0, final_std² I)`` instead,
    which makes 1-step students stochastic (both forms). Returns (mean (B,...), std (B,), x̂0 (B,...)).
    """
    path = model.path
    pred = model(x, t, cond)
    x0 = path.to_x0(x, t, pred)
    if last:
        return x0, torch.full_like(t, final_std), x0
    if sde == "flow_grpo":
        if getattr(path, "prediction", None) != "velocity":
            raise ValueError("sde='flow_grpo' needs a flow-matching (velocity) path; use sde='dmd2' for ε-models")
        mean, std = flow_grpo_sde(x, pred, t, t_next, noise_scale)
        return mean, std.to(x0.dtype), x0
    if sde != "dmd2":
        raise ValueError(f"unknown sde form {sde!r}; use one of {SDE_FORMS}")
    mean = path.renoise(x0, t_next, torch.zeros_like(x0))
    one = torch.ones(x0.shape[0], 1, dtype=x0.dtype, device=x0.device)
    std = path.renoise(torch.zeros_like(one), t_next, one)[:, 0] * noise_scale
    return mean, std, x0


def stochastic_rollout(model: Denoiser, noise: Tensor, timesteps: Tensor, cond: Any, *, final_std: float = 0.05,
                       noise_scale: float = 1.0, reduce: Literal["mean", "sum"] = "mean",
                       sde: Literal["dmd2", "flow_grpo"] = "dmd2", callback: Callback | None = None) -> TensorDict:
    """The sde rollout as a policy: each transition is a Gaussian action with a logged log-probability.

    ``x_{i+1} = mean_i + std_i ξ_i`` (:func:`transition_mean_std`), ``log_prob_i = log N(x_{i+1}; mean_i, std_i²)``
    reduced by ``reduce`` (:func:`gaussian_log_prob`); ``sde`` picks the step's form (``dmd2`` or Flow-GRPO's
    ``flow_grpo``, exploration noise at every step). Runs without gradients (it collects data).

    Returns:
        TensorDict(batch B): ``x_per_step`` (B,N,C,H,W) states x_i, ``action`` (B,N,C,H,W) the sampled x_{i+1},
        ``log_prob`` (B,N), ``std`` (B,N), ``x0_per_step`` (B,N,C,H,W), ``sample`` (B,C,H,W) = x_N, ``grid``.
    """
    if final_std <= 0:
        raise ValueError("final_std must be > 0 so that every transition is stochastic (1-step students need it)")
    B, n = noise.shape[0], timesteps.shape[0] - 1
    x = noise
    xs, acts, lps, stds, x0s = [], [], [], [], []
    with torch.no_grad():
        for i in range(n):
            t, t_next = _t(timesteps[i], B, x), _t(timesteps[i + 1], B, x)
            mean, std, x0 = transition_mean_std(model, x, t, t_next, cond, last=i == n - 1, final_std=final_std,
                                                noise_scale=noise_scale, sde=sde)
            x_next = mean + std.reshape(-1, *([1] * (x.ndim - 1))) * torch.randn_like(mean)
            xs.append(x)
            acts.append(x_next)
            lps.append(gaussian_log_prob(x_next, mean, std, reduce))
            stds.append(std)
            x0s.append(x0)
            if callback is not None:
                callback(i, {"x": x_next, "x0": x0, "t": t})
            x = x_next
    return TensorDict({
        K.X_PER_STEP: torch.stack(xs, 1), K.ACTION: torch.stack(acts, 1), K.LOG_PROB: torch.stack(lps, 1),
        "std": torch.stack(stds, 1), K.X0_PER_STEP: torch.stack(x0s, 1), K.SAMPLE: x,
        K.GRID: timesteps.to(noise.dtype).to(noise.device).expand(B, n + 1),
    }, batch_size=[B])


def transition_log_prob(model: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, x_next: Tensor, cond: Any, *,
                        last: bool, final_std: float, noise_scale: float = 1.0,
                        reduce: Literal["mean", "sum"] = "mean", sde: Literal["dmd2", "flow_grpo"] = "dmd2") -> Tensor:
    """Recompute ``log π(x_next | x, t)`` under the current ``model`` (with gradients), shape (B,).

    On-policy (same weights as the rollout) this equals the logged ``log_prob`` exactly, so the PPO ratio is 1.
    """
    mean, std, _ = transition_mean_std(model, x, t, t_next, cond, last=last, final_std=final_std,
                                       noise_scale=noise_scale, sde=sde)
    return gaussian_log_prob(x_next, mean, std, reduce)
