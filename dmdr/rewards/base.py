"""The reward protocol and registry.

A reward is an ``nn.Module`` with a :class:`RewardSpec` and
``forward(images, cond) -> (B,)`` scores (higher is better), where

* ``images``: (B, C, H, W) float tensor in ``spec.input_range`` (decoded pixels, not latents);
* **videos** (B, C, F, H, W): an image reward scores every frame and returns the mean over frames,
  ``r(video) = (1/F) Σ_f r(video[:, :, f])`` (``cond`` repeated per frame); a reward whose spec says
  ``video=True`` (a video-reward plug-in) receives the whole clip instead and must return (B,);
* ``cond``: what the reward reads — class labels (B,) long for class-conditional rewards, a list of B prompt
  strings for text rewards, or ``None`` when ``spec.reads_prompts`` / ``spec.reads_labels`` are both False.

Differentiable rewards (``spec.differentiable``) must keep all preprocessing in torch ops so that gradients flow
from the score to the pixels (ReFL, method.md §2.10). Black-box rewards are called under ``torch.no_grad``.

Rewards are registered by name and built from recipes by name::

    @register_reward("my_reward")
    def build(**kwargs) -> Reward: ...

    reward = build_reward("my_reward", device="cpu", some_option=1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn


@dataclass(frozen=True)
class RewardSpec:
    name: str
    differentiable: bool
    input_range: tuple[float, float] = (0.0, 1.0)
    resolution: int | None = None  # the side the reward resizes to internally (None: any size)
    reads_prompts: bool = False
    reads_labels: bool = False
    video: bool = False  # takes whole clips (B, C, F, H, W); False: an image reward, applied per frame to clips


class Reward(nn.Module):
    """Base class. Subclasses set ``self.spec`` and implement :meth:`score`."""

    spec: RewardSpec

    def score(self, images: Tensor, cond: Any) -> Tensor:  # (B,) float
        raise NotImplementedError

    def forward(self, images: Tensor, cond: Any = None) -> Tensor:
        if images.ndim == 5 and not self.spec.video:
            return per_frame_mean(self, images, cond)
        if self.spec.video and images.ndim != 5:
            raise ValueError(f"reward {self.spec.name!r} is a video reward: it takes clips (B, C, F, H, W); "
                             f"got shape {tuple(images.shape)}")
        r = self.score(images, cond)
        if r.ndim != 1 or r.shape[0] != images.shape[0]:
            raise ValueError(f"reward {self.spec.name!r} returned shape {tuple(r.shape)}; expected ({images.shape[0]},)")
        return r


def repeat_per_frame(cond: Any, frames: int) -> Any:
    """``cond`` of a batch of B clips as the conditioning of their B·F frames (clip-major): tensors and TensorDicts
    are repeated along dim 0 (``repeat_interleave``), lists/tuples element by element; ``None`` and a single string
    (which text rewards repeat over the batch) stay as they are."""
    if cond is None or isinstance(cond, str):
        return cond
    if isinstance(cond, (list, tuple)):
        return [c for c in cond for _ in range(frames)]
    return cond.repeat_interleave(frames, dim=0)


def per_frame_mean(reward: Reward, videos: Tensor, cond: Any = None) -> Tensor:
    """Score clips (B, C, F, H, W) with an image reward: frames (B·F, C, H, W) → scores (B, F) → mean over F, (B,).
    Differentiable when the reward is (the reshapes keep the graph)."""
    B, C, F, H, W = videos.shape
    frames = videos.transpose(1, 2).reshape(B * F, C, H, W)
    return reward(frames, repeat_per_frame(cond, F)).view(B, F).mean(1)


class UnknownRewardError(ValueError):
    """``build_reward`` got a name nobody registered; the message lists the registered names."""


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator registering a reward factory under ``name``."""

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"a reward named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    """Sorted names of every registered reward (built-ins are imported first)."""
    _load_builtin()
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Build the registered reward ``name`` with ``kwargs``. Unknown names list the registered ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownRewardError(f"unknown reward {name!r}; registered rewards: {', '.join(sorted(_REGISTRY))}")
    reward = _REGISTRY[name](**kwargs)
    for p in reward.parameters():
        p.requires_grad_(False)
    return reward.eval()


def _load_builtin() -> None:
    import importlib

    for mod in ("dmdr.rewards.digits", "dmdr.rewards.imagereward", "dmdr.rewards.clip", "dmdr.rewards.pickscore",
                "dmdr.rewards.srpo", "dmdr.rewards.plugin", "dmdr.rewards.hackable",
                "dmdr.rewards.weak_classes"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a reward file not written (yet) must not break the others
            if e.name != mod:
                raise
