"""Advantage estimation for policy-gradient RL on generators: small pure steps on TensorDicts (optax-style).

Each factory returns an :data:`AdvantageFn` ``td -> td``: it reads named keys, returns a shallow copy of ``td``
with its output keys set, and never modifies its input. :func:`chain` composes them left to right::

    fn = chain(mix_rewards({"digits_hackable": 1.0}), group_relative(eps=1e-6), clip_advantage(5.0))
    td = fn(TensorDict(reward_digits_hackable=r, group=g, batch_size=[B]))      # -> td["advantage"] (B, 1)

Keys (renamable through :class:`AdvantageKeys`; shapes with B = trajectories):

* ``reward_<name>`` (B,) — one raw reward per sample, kept untouched so that every reward is logged on its own;
* ``reward`` (B,) — the scalar reward the advantage is computed from (written by :func:`mix_rewards`);
* ``group`` (B,) long — group id: the G samples drawn for the same prompt / class id (GRPO);
* ``advantage`` (B, 1) — torchrl's convention (``ClipPPOLoss`` reads ``advantage.shape[:-1]`` as the batch).

Equations (GRPO, Shao et al. 2024 arXiv 2402.03300; Flow-GRPO, Liu et al. 2025 arXiv 2505.05470):

    group_relative:       A_b = (r_b - mean_{g(b)} r) / (std_{g(b)} r + eps)
    group_relative(std=False) / group_mean_baseline:   A_b = r_b - mean_{g(b)} r
    batch_relative:       A_b = (r_b - mean r) / (std r + eps)
    clip_advantage:       A_b ← clamp(A_b, -c, c)
    mix_rewards:          r_b = Σ_j w_j · norm_j(r_{j,b}),  norm_j = identity | z-score over the batch | within group

``std`` is the population standard deviation (ddof = 0, as Flow-GRPO's ``np.std``). Groups need not be equal in
size (samples with a NaN reward are dropped before this runs); a one-sample group has std 0 and advantage 0.

>>> td = TensorDict(reward_a=torch.tensor([1., 2., 3., 5.]), group=torch.tensor([0, 0, 1, 1]), batch_size=[4])
>>> chain(mix_rewards({"a": 1.0}, normalize="none"), group_relative())(td)["advantage"].squeeze(-1)
tensor([-1.0000,  1.0000, -1.0000,  1.0000])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import torch
from tensordict import TensorDictBase
from torch import Tensor

from dmdr import keys as K

AdvantageFn = Callable[[TensorDictBase], TensorDictBase]
Normalize = Literal["none", "batch", "group"]


@dataclass(frozen=True)
class AdvantageKeys:
    reward: str = K.REWARD
    advantage: str = K.ADVANTAGE
    group: str = K.GROUP


def _vector(td: TensorDictBase, key: str, fn: str, field: str) -> Tensor:
    v = K.require(td, key, fn=fn, field=field)
    if v.ndim == 2 and v.shape[-1] == 1:
        v = v.squeeze(-1)
    if v.ndim != 1:
        raise ValueError(f"{fn}: {key!r} must have shape (B,) or (B, 1); got {tuple(v.shape)}")
    return v


def group_stats(values: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean and population std of ``values`` (B,) within its group ``group`` (B,) (any integer ids)."""
    _, inv = torch.unique(group, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    v = values.double()
    count = torch.zeros(n_groups, dtype=v.dtype, device=v.device).index_add_(0, inv, torch.ones_like(v))
    mean = torch.zeros_like(count).index_add_(0, inv, v) / count
    var = torch.zeros_like(count).index_add_(0, inv, (v - mean[inv]) ** 2) / count
    return mean[inv].to(values.dtype), var.sqrt()[inv].to(values.dtype)


def _normalise(v: Tensor, how: Normalize, group: Tensor | None, eps: float) -> Tensor:
    if how == "none":
        return v
    if how == "batch":
        return (v - v.mean()) / (v.std(unbiased=False) + eps)
    if how == "group":
        mean, std = group_stats(v, group)
        return (v - mean) / (std + eps)
    raise ValueError(f"unknown reward normalisation {how!r}; use none, batch or group")


def mix_rewards(weights: Mapping[str, float], *, normalize: Normalize = "batch", eps: float = 1e-6,
                keys: AdvantageKeys = AdvantageKeys()) -> AdvantageFn:
    """``reward = Σ_j w_j · norm(reward_<j>)``: per-reward normalisation *before* the weighted mix, so that a
    reward with a large raw scale cannot drown the others. Reads ``reward_<name>`` for each name (and ``group``
    when ``normalize="group"``); writes ``reward`` (B,). The raw ``reward_<name>`` entries are left as they are."""
    if not weights:
        raise ValueError("mix_rewards needs at least one reward name")
    items = list(weights.items())

    def fn(td: TensorDictBase) -> TensorDictBase:
        group = _vector(td, keys.group, "mix_rewards", "group") if normalize == "group" else None
        total = None
        for name, w in items:
            r = _vector(td, K.reward_key(name), "mix_rewards", f"reward_{name}").float()
            term = w * _normalise(r, normalize, group, eps)
            total = term if total is None else total + term
        out = td.copy()
        out.set(keys.reward, total)
        return out

    return fn


def group_relative(*, std: bool = True, eps: float = 1e-6, std_scope: Literal["group", "global"] = "group",
                   keys: AdvantageKeys = AdvantageKeys()) -> AdvantageFn:
    """GRPO's group-relative advantage ``(r - mean_g) / (std_g + eps)`` (``std=False``: ``r - mean_g``);
    ``std_scope="global"``: ``(r - mean_g) / (std_batch + eps)`` (Flow-GRPO's ``global_std``), which does not blow a
    near-constant group up to ±1. Reads ``reward`` (B,) and ``group`` (B,); writes ``advantage`` (B, 1).

    Bound: with the group std (population), ``|A| <= sqrt(G - 1)`` for a group of G (equality when one sample
    differs from the G - 1 others), e.g. 2.65 for G = 8, so ``clip_advantage(c)`` with ``c >= sqrt(G - 1)`` never
    binds. With eps, ``|A| < sqrt(G - 1)`` strictly; a constant group gives 0."""
    if std_scope not in ("group", "global"):
        raise ValueError(f"unknown std_scope {std_scope!r}; use group or global")

    def fn(td: TensorDictBase) -> TensorDictBase:
        r = _vector(td, keys.reward, "group_relative", "reward").float()
        g = _vector(td, keys.group, "group_relative", "group")
        mean, sd = group_stats(r, g)
        if std_scope == "global":
            sd = r.std(unbiased=False).expand_as(r)
        adv = (r - mean) / (sd + eps) if std else r - mean
        out = td.copy()
        out.set(keys.advantage, adv.unsqueeze(-1))
        return out

    return fn


def group_mean_baseline(*, keys: AdvantageKeys = AdvantageKeys()) -> AdvantageFn:
    """``r - mean_g`` (Dr. GRPO's choice: no division by the group std). Same keys as :func:`group_relative`."""
    return group_relative(std=False, keys=keys)


def batch_relative(*, eps: float = 1e-6, keys: AdvantageKeys = AdvantageKeys()) -> AdvantageFn:
    """``(r - mean) / (std + eps)`` over the whole batch (REINFORCE with a batch baseline). Reads ``reward``."""

    def fn(td: TensorDictBase) -> TensorDictBase:
        r = _vector(td, keys.reward, "batch_relative", "reward").float()
        out = td.copy()
        out.set(keys.advantage, _normalise(r, "batch", None, eps).unsqueeze(-1))
        return out

    return fn


def clip_advantage(max_abs: float, *, keys: AdvantageKeys = AdvantageKeys()) -> AdvantageFn:
    """``advantage ← clamp(advantage, -max_abs, max_abs)``. Reads and writes ``advantage`` (B, 1)."""
    if max_abs <= 0:
        raise ValueError(f"clip_advantage: max_abs must be > 0, got {max_abs}")

    def fn(td: TensorDictBase) -> TensorDictBase:
        a = K.require(td, keys.advantage, fn="clip_advantage", field="advantage")
        out = td.copy()
        out.set(keys.advantage, a.clamp(-max_abs, max_abs))
        return out

    return fn


def chain(*fns: AdvantageFn) -> AdvantageFn:
    """Compose advantage steps left to right (``chain(f, g)(td) == g(f(td))``)."""

    def fn(td: TensorDictBase) -> TensorDictBase:
        for f in fns:
            td = f(td)
        return td

    return fn


def from_config(weights: Mapping[str, float], *, baseline: Literal["group", "group_mean", "batch"] = "group",
                normalize_rewards: Normalize = "batch", clip: float | None = None, eps: float = 1e-6,
                std: Literal["group", "global"] = "group", keys: AdvantageKeys = AdvantageKeys()) -> AdvantageFn:
    """The chain a recipe's ``rl.advantage`` section describes: mix → baseline (``std`` = group or global std for
    the ``group`` baseline) → (clip)."""
    base = {"group": lambda: group_relative(eps=eps, std_scope=std, keys=keys),
            "group_mean": lambda: group_mean_baseline(keys=keys),
            "batch": lambda: batch_relative(eps=eps, keys=keys)}
    if baseline not in base:
        raise ValueError(f"unknown advantage baseline {baseline!r}; use group, group_mean or batch")
    steps = [mix_rewards(weights, normalize=normalize_rewards, eps=eps, keys=keys), base[baseline]()]
    if clip is not None:
        steps.append(clip_advantage(clip, keys=keys))
    return chain(*steps)


__all__ = ["AdvantageFn", "AdvantageKeys", "batch_relative", "chain", "clip_advantage", "from_config",
           "group_mean_baseline", "group_relative", "group_stats", "mix_rewards"]
