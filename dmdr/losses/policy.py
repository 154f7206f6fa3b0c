"""The few-step student as a torchrl policy, its transitions, and the regularisers of policy-gradient RL.

**Policy** (Flow-GRPO's SDE view of a sampler, Liu et al. 2025 arXiv 2505.05470; our step is the DMD2-style
sde step of :func:`dmdr.samplers.transition_mean_std`). A transition of the N-step rollout is one action:

    observation o = (x_i, t_i, t_{i+1}, last_i, c),   action a = x_{i+1}
    π_θ(a | o) = N(a; μ_θ(o), σ(o)² I),  μ_θ = renoise(x̂0_θ(x_i, t_i, c), t_{i+1}, 0) = (1 - t_{i+1}) x̂0_θ
                                          σ   = noise_scale · t_{i+1}
    last step: μ_θ = x̂0_θ, σ = final_std (exploration noise, so 1-step students are stochastic too)

:func:`make_student_actor` wraps it as a torchrl ``ProbabilisticActor`` with ``IndependentNormal`` and
``event_dim=3`` so that ``action_log_prob`` is one number per transition, shape (B,). A wrong ``event_dim`` is
silently accepted by ``ClipPPOLoss`` and turns the per-sample ratio into a per-pixel one (a different
objective); :func:`check_log_prob_shape` guards against it. ``log_prob_reduce``:

* ``sum``  — the true log-density ``Σ_d log N(a_d; μ_d, σ²)``; the PPO ratio is the true likelihood ratio, which
  over D = C·H·W dimensions moves fast (the clip range is hit after small parameter changes);
* ``mean`` — ``(1/D) Σ_d log N(...)`` (:class:`MeanIndependentNormal`), Flow-GRPO's per-dimension average: the
  "ratio" is the D-th root of the likelihood ratio, so clip_epsilon acts per dimension.

**Transitions.** :func:`rollout_transitions` flattens a (B, N) rollout into B·N transitions; each carries its
trajectory's advantage (Flow-GRPO: the same advantage for every step of a trajectory).

**Regularisers** (each returns a TensorDict of named terms, ``loss_*`` summed by :func:`dmdr.losses.total_loss`):

* :func:`kl_to_reference` — KL(π_θ ‖ π_ref) to the frozen initial student. Both Gaussians share σ, so per
  transition ``KL = ‖μ_θ - μ_ref‖² / (2σ²)`` (summed over D for ``sum``, divided by D for ``mean``);
* :func:`weighted_dmd_loss` — the DMD loss (:mod:`dmdr.losses.dmd`) with per-sample weights (advantage-weighted
  DMD); with unit weights it equals :func:`dmdr.losses.dmd_loss`.

>>> actor = make_student_actor(student, final_std=0.1, log_prob_reduce="mean")
>>> td = rollout_transitions(stochastic_rollout(student, noise, grid, labels), labels)
>>> actor.get_dist(td).log_prob(td["action"]).shape       # (B·N,)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from torchrl.modules import IndependentNormal, ProbabilisticActor

from dmdr import keys as K
from dmdr.losses.dmd import DMDKeys, dmd_gradient
from dmdr.samplers import flow_grpo_sde

Reduce = Literal["mean", "sum"]


class MeanIndependentNormal(IndependentNormal):
    """``IndependentNormal`` whose ``log_prob`` (and entropy) is divided by the event size D (Flow-GRPO's mean)."""

    def _event_size(self) -> int:
        return max(1, math.prod(self.event_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        return super().log_prob(value) / self._event_size()

    def entropy(self) -> Tensor:
        return super().entropy() / self._event_size()


DISTRIBUTIONS = {"sum": IndependentNormal, "mean": MeanIndependentNormal}


@dataclass(frozen=True)
class PolicyKeys:
    """Keys of a transition TensorDict (batch = transitions). Shapes: T = transitions."""

    x: str = "x"                       # (T,C,H,W) state x_i
    t: str = K.T                       # (T,) t_i
    t_next: str = "t_next"             # (T,) t_{i+1}
    last: str = "last"                 # (T,) bool, i == N-1
    cond: str = K.COND                 # (T,...) conditioning
    loc: str = "loc"                   # (T,C,H,W) μ_θ
    scale: str = "scale"               # (T,1,1,1) σ
    action: str = K.ACTION             # (T,C,H,W) x_{i+1}
    log_prob: str = "action_log_prob"  # (T,) behaviour log-prob (torchrl's default key)
    ref_loc: str = "ref_loc"           # (T,C,H,W) μ_ref (KL regulariser)
    advantage: str = K.ADVANTAGE       # (T,1)
    sample: str = "sample_id"          # (T,) which trajectory
    step: str = K.STEP_INDEX           # (T,) which step i


class StudentStep(nn.Module):
    """``(x, t, t_next, last, cond) -> (loc, scale)``: one stochastic step of the student, per sample.

    ``model`` is the student (anything under the model contract); ``owner`` is the ``nn.Module`` holding its
    parameters (the student itself, or the base carrying its LoRA), registered so that torchrl sees them.
    Matches :func:`dmdr.samplers.transition_mean_std`, but with a per-sample ``last`` flag so that a minibatch
    can mix steps. ``scale`` is (T,1,1,1) and broadcasts against ``loc``.
    """

    def __init__(self, model: Any, owner: nn.Module | None = None, *, final_std: float, noise_scale: float = 1.0,
                 sde: str = "dmd2"):
        super().__init__()
        if sde not in ("dmd2", "flow_grpo"):
            raise ValueError(f"unknown sde form {sde!r}; use dmd2 or flow_grpo")
        self.sde = sde
        if final_std <= 0:
            raise ValueError("final_std must be > 0 so that every transition has a density")
        self.owner = owner if owner is not None else model
        self._model = model if not isinstance(model, nn.Module) else None  # a non-module view (e.g. AdapterView)
        self.final_std, self.noise_scale = float(final_std), float(noise_scale)

    @property
    def model(self):
        return self._model if self._model is not None else self.owner

    def forward(self, x: Tensor, t: Tensor, t_next: Tensor, last: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        model = self.model
        path = model.path
        pred = model(x, t, cond)
        x0 = path.to_x0(x, t, pred)
        last = last.reshape(-1).bool()
        if self.sde == "flow_grpo":   # Flow-GRPO's SDE step (dmdr.samplers.flow_grpo_sde); t_next of a last step
            safe_next = torch.where(last, t * 0.5, t_next)   # is unused there; keep its √(-Δt) finite
            mid, std_mid = flow_grpo_sde(x, pred, t, safe_next, self.noise_scale)
            std_mid = std_mid.to(x0.dtype)
        else:
            mid = path.renoise(x0, t_next, torch.zeros_like(x0))
            one = torch.ones(x.shape[0], 1, dtype=x0.dtype, device=x0.device)
            std_mid = path.renoise(torch.zeros_like(one), t_next, one)[:, 0] * self.noise_scale
        loc = torch.where(last.reshape(-1, *([1] * (x0.ndim - 1))), x0, mid)
        std = torch.where(last, torch.full_like(std_mid, self.final_std), std_mid)
        return loc, std.reshape(-1, *([1] * (x0.ndim - 1)))


def make_student_actor(model: Any, owner: nn.Module | None = None, *, final_std: float, noise_scale: float = 1.0,
                       log_prob_reduce: Reduce = "mean", sde: str = "dmd2", event_dim: int = 3,
                       keys: PolicyKeys = PolicyKeys()) -> ProbabilisticActor:
    """The student as a torchrl ``ProbabilisticActor``: ``IndependentNormal(event_dim=3)`` (``sum``) or
    :class:`MeanIndependentNormal` (``mean``). Reads ``x, t, t_next, last, cond``; writes ``loc, scale`` and,
    when called, ``action`` and ``action_log_prob`` (T,). ``event_dim`` = the sample's dims: 3 for images (C, H, W),
    4 for video (C, F, H, W).

    Calling the actor samples only under ``torchrl.envs.utils.set_exploration_type(ExplorationType.RANDOM)``;
    its default interaction type returns the mean (then ``action == loc``). The trainer never samples through
    the actor: actions come from :func:`dmdr.samplers.stochastic_rollout` and the actor only scores them.
    """
    if log_prob_reduce not in DISTRIBUTIONS:
        raise ValueError(f"log_prob_reduce must be 'mean' or 'sum', got {log_prob_reduce!r}")
    step = StudentStep(model, owner, final_std=final_std, noise_scale=noise_scale, sde=sde)
    module = TensorDictModule(step, in_keys=[keys.x, keys.t, keys.t_next, keys.last, keys.cond],
                              out_keys=[keys.loc, keys.scale])
    return ProbabilisticActor(module, in_keys=[keys.loc, keys.scale], out_keys=[keys.action],
                              distribution_class=DISTRIBUTIONS[log_prob_reduce],
                              distribution_kwargs={"event_dim": int(event_dim)},
                              return_log_prob=True, log_prob_key=keys.log_prob)


def check_log_prob_shape(log_prob: Tensor, batch: int) -> Tensor:
    """Raise unless ``log_prob`` is per transition, shape (T,) — the guard against a wrong ``event_dim``."""
    if tuple(log_prob.shape) != (batch,):
        raise ValueError(f"policy log-prob has shape {tuple(log_prob.shape)}, expected ({batch},): the distribution "
                         f"must reduce over every sample dim (IndependentNormal with event_dim=3 for (C, H, W), "
                         f"event_dim=4 for video (C, F, H, W))")
    return log_prob


def _repeat_rows(obj: Any, n: int) -> Any:
    """Repeat each row ``n`` times (tensor, TensorDict or list)."""
    if isinstance(obj, (Tensor, TensorDictBase)):
        return obj.repeat_interleave(n, dim=0)
    return [o for o in obj for _ in range(n)]


def rollout_transitions(rollout: TensorDictBase, cond: Any, *, advantage: Tensor | None = None,
                        keys: PolicyKeys = PolicyKeys()) -> TensorDict:
    """Flatten a :func:`~dmdr.samplers.stochastic_rollout` (batch B, N steps) into B·N transitions.

    Reads ``x_per_step`` (B,N,C,H,W), ``action`` (B,N,C,H,W), ``log_prob`` (B,N), ``grid`` (B,N+1). Row b·N + i
    is step i of trajectory b. ``advantage`` (B,1) or (B,) is repeated over the N steps of its trajectory.
    Returns TensorDict(batch B·N) with the :class:`PolicyKeys` observation keys, ``action``, ``action_log_prob``,
    ``sample_id``, ``step_index`` and, if given, ``advantage`` (B·N, 1). ``cond`` must be a tensor or TensorDict.
    """
    xs = K.require(rollout, K.X_PER_STEP, fn="rollout_transitions", field="x_per_step")
    acts = K.require(rollout, K.ACTION, fn="rollout_transitions", field="action")
    lps = K.require(rollout, K.LOG_PROB, fn="rollout_transitions", field="log_prob")
    grid = K.require(rollout, K.GRID, fn="rollout_transitions", field="grid")
    B, N = xs.shape[:2]
    step = torch.arange(N, device=xs.device).repeat(B)
    td = TensorDict({
        keys.x: xs.flatten(0, 1), keys.action: acts.flatten(0, 1), keys.log_prob: lps.flatten(0, 1).detach(),
        keys.t: grid[:, :-1].flatten(0, 1), keys.t_next: grid[:, 1:].flatten(0, 1),
        keys.last: step == N - 1, keys.step: step,
        keys.sample: torch.arange(B, device=xs.device).repeat_interleave(N),
        keys.cond: _repeat_rows(cond, N),
    }, batch_size=[B * N])
    if advantage is not None:
        a = advantage.reshape(B, 1).float()
        td.set(keys.advantage, a.repeat_interleave(N, dim=0))
    return td


def kl_to_reference(td: TensorDictBase, *, weight: float = 1.0, reduce: Reduce = "mean",
                    keys: PolicyKeys = PolicyKeys()) -> TensorDict:
    """KL(π_θ ‖ π_ref) per transition for two Gaussians with the same σ: ``‖μ_θ - μ_ref‖² / (2σ²)``.

    Reads ``loc`` (T,C,H,W, differentiable), ``ref_loc`` (T,C,H,W, no grad) and ``scale`` (T,1,1,1 or T,C,H,W).
    ``reduce="sum"`` sums over C,H,W (the true KL); ``"mean"`` divides by D = C·H·W (consistent with the
    ``mean`` log-prob). Returns ``loss_kl = weight · mean_T KL`` and the diagnostic ``kl_ref = mean_T KL``.
    """
    loc = K.require(td, keys.loc, fn="kl_to_reference", field="loc")
    ref = K.require(td, keys.ref_loc, fn="kl_to_reference", field="ref_loc").detach()
    scale = K.require(td, keys.scale, fn="kl_to_reference", field="scale").detach()
    per_dim = (loc.float() - ref.float()) ** 2 / (2 * scale.float() ** 2)
    kl = per_dim.flatten(1).sum(1) if reduce == "sum" else per_dim.flatten(1).mean(1)
    return TensorDict({"loss_kl": weight * kl.mean(), "kl_ref": kl.detach().mean()}, batch_size=[])


def advantage_weights(advantage: Tensor, temperature: float = 1.0) -> Tensor:
    """``w = B · softmax(A / temperature)`` (B,): positive, mean 1; larger for higher-advantage samples."""
    a = advantage.reshape(-1).float()
    return a.numel() * torch.softmax(a / temperature, dim=0)


def weighted_dmd_loss(td: TensorDictBase, weights: Tensor | None = None, *, weight: float = 1.0,
                      keys: DMDKeys = DMDKeys(), eps: float = 1e-8) -> TensorDict:
    """``loss_dmd = weight · ½ mean_b w_b mean_{CHW} (x̂0 - sg(x̂0 - g))²`` with g the normalised DMD gradient
    (:func:`dmdr.losses.dmd.dmd_gradient`). ``weights=None`` means w ≡ 1, which equals ``weight · dmd_loss``.

    Reads ``x0_pred`` (B,C,H,W, differentiable), ``x0_real``, ``x0_fake``. Returns ``loss_dmd`` and the
    diagnostics ``dmd_grad_norm`` and ``dmd_real_fake_gap`` (as :func:`dmdr.losses.dmd_loss`).
    """
    x0 = K.require(td, keys.x0_pred, fn="weighted_dmd_loss", field="x0_pred")
    real = K.require(td, keys.x0_real, fn="weighted_dmd_loss", field="x0_real").detach()
    fake = K.require(td, keys.x0_fake, fn="weighted_dmd_loss", field="x0_fake").detach()
    g = dmd_gradient(x0, real, fake, eps)
    per_sample = ((x0.float() - (x0.detach().float() - g)) ** 2).flatten(1).mean(1)
    w = torch.ones_like(per_sample) if weights is None else weights.reshape(-1).float().detach()
    loss = weight * 0.5 * (w * per_sample).mean()
    return TensorDict({"loss_dmd": loss, "dmd_grad_norm": g.flatten(1).norm(dim=1).mean(),
                       "dmd_real_fake_gap": (real.float() - fake.float()).abs().mean()}, batch_size=[])


__all__ = ["DISTRIBUTIONS", "MeanIndependentNormal", "PolicyKeys", "StudentStep", "advantage_weights",
           "check_log_prob_shape", "kl_to_reference", "make_student_actor", "rollout_transitions",
           "weighted_dmd_loss"]
