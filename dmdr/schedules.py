"""Time grids and the two dynamic training schedules of DMDR. Every schedule is a pure function of the step.

* :func:`few_step_grid` — the shifted few-step grid of the student (method.md §2.1).
* :func:`dynars_beta_params` / :func:`sample_dynars` — Dynamic Renoise Sampling: τ ~ Beta(α(k), β(k)),
  annealed to U(0,1) by a cosine (method.md §2.7).
* :func:`dynadg_scale` — Dynamic Distribution Guidance: the real score's LoRA scale λ_r(k) (method.md §2.6).
* :func:`sample_uniform`, :func:`sample_grid_steps` — plain timestep samplers.

``k`` is always the number of generator updates done so far (the official code's ``global_step``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def few_step_grid(num_steps: int, shift: float = 1.0, t_min: float = 0.0, *, dtype=torch.float64) -> Tensor:
    """The student's time grid ``t_0 .. t_N`` (shape (N+1,)), method.md §2.1.

    ``t̃_i = linspace(1, t_min, N+1)_i``, ``t_i = S t̃_i / (1 + (S - 1) t̃_i)``, and ``t_N := t_min``.
    The generator is evaluated at ``t_0 .. t_{N-1}``.

    >>> few_step_grid(4, shift=3.0, t_min=0.001)[:4].tolist()  # SD3-Medium
    [1.0, 0.9001..., 0.7503..., 0.5010...]
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    base = torch.linspace(1.0, t_min, num_steps + 1, dtype=dtype)
    grid = shift * base / (1 + (shift - 1) * base)
    grid[-1] = t_min
    return grid


def cosine_decay(step: int | float, horizon: int) -> float:
    """``c(k) = ½ (1 + cos(π min(k/K, 1)))``: 1 at k = 0, 0 from k = K on. ``K <= 0`` gives 0 (off)."""
    if horizon <= 0:
        return 0.0
    frac = min(max(float(step), 0.0) / horizon, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def dynars_beta_params(step: int, horizon: int, alpha0: float = 4.0, beta0: float = 1.5) -> tuple[float, float]:
    """DynaRS Beta parameters at generator step ``k`` (method.md §2.7).

    ``α(k) = 1 + (α0 - 1) c(k)``, ``β(k) = 1 + (β0 - 1) c(k)`` with the cosine ``c`` of :func:`cosine_decay`.
    Beta(4, 1.5) at k = 0 (biased to high noise: t = 1 is noise) anneals to Beta(1, 1) = U(0, 1) at k ≥ K.

    >>> dynars_beta_params(1000, 2000)
    (2.5, 1.25)
    """
    c = cosine_decay(step, horizon)
    return 1.0 + (alpha0 - 1.0) * c, 1.0 + (beta0 - 1.0) * c


def sample_dynars(batch: int, step: int, horizon: int, alpha0: float = 4.0, beta0: float = 1.5, *,
                  t_floor: float = 0.0, device=None, dtype=torch.float32) -> Tensor:
    """Draw τ ~ Beta(α(k), β(k)) of shape (B,), clamped below at ``t_floor`` (the official code does not clamp:
    ``t_floor = 0``). Uses the global torch RNG, so checkpointing its state makes runs resumable exactly."""
    a, b = dynars_beta_params(step, horizon, alpha0, beta0)
    if a == 1.0 and b == 1.0:
        tau = torch.rand(batch, dtype=torch.float64)
    else:
        # Beta via two Gammas with the global generator (torch.distributions.Beta does the same internally).
        ga = torch._standard_gamma(torch.full((batch,), a, dtype=torch.float64))
        gb = torch._standard_gamma(torch.full((batch,), b, dtype=torch.float64))
        tau = ga / (ga + gb)
    return tau.clamp(min=t_floor, max=1.0).to(device=device, dtype=dtype)


def dynadg_scale(step: int, horizon: int, scale0: float) -> float:
    """DynaDG real-score LoRA scale ``λ_r(k) = λ_r0 · ½(1 + cos(π k / K))`` for k < K, else 0 (method.md §2.6).

    The real score is the teacher plus the critic's LoRA at this scale; once it is 0 it is the pure teacher.

    >>> dynadg_scale(0, 2000, 0.5), dynadg_scale(1000, 2000, 0.5), dynadg_scale(2000, 2000, 0.5)
    (0.5, 0.25, 0.0)
    """
    if horizon <= 0 or step >= horizon:
        return 0.0
    return scale0 * 0.5 * (1.0 + math.cos(math.pi * step / horizon))


def sample_uniform(batch: int, low: float = 0.001, high: float = 1.0, *, device=None, dtype=torch.float32) -> Tensor:
    """τ ~ U[low, high], shape (B,). The official ``uniform`` option uses U[0.001, 1]."""
    return (low + (high - low) * torch.rand(batch, dtype=torch.float64)).to(device=device, dtype=dtype)


def sample_grid_steps(batch: int, num_steps: int, *, device=None) -> Tensor:
    """Per-sample generator step index ``i ~ Uniform{0 .. N-1}``, shape (B,), long (``utils.py::sample_discrete``)."""
    return torch.randint(0, num_steps, (batch,), device=device)
