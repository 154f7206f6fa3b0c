"""User-defined rewards referenced explicitly from a recipe: ``name: plugin``, ``kwargs.target: "pkg.module:callable"``.

The target is imported and called with ``kwargs``; it must return either

* a :class:`~dmdr.rewards.base.Reward` (its own ``spec`` is used; any property the recipe also declares must agree), or
* a plain function ``fn(images, cond) -> (B,)`` (tensor, array or list), wrapped into a :class:`FunctionReward`
  whose spec is what the recipe declares: ``differentiable`` (required), ``reads_prompts``, ``reads_labels``,
  ``input_range``, ``resolution``, ``video`` (a video reward: ``fn`` receives whole clips (B, C, F, H, W); without
  it, clips are scored frame by frame and averaged over frames). Non-differentiable functions are called under
  ``torch.no_grad``.

Recipe example (a reward term's ``kwargs`` are this factory's arguments)::

    rewards:
      - name: plugin
        weight: 0.1
        kwargs:
          target: my_pkg.rewards:make_aesthetic      # factory(**kwargs) -> Reward | fn(images, cond)
          differentiable: false
          reads_prompts: true
          input_range: [0.0, 1.0]
          kwargs: {ckpt: /local/aesthetic.pt}       # passed to the factory

Nothing is imported by name guessing or introspection: the recipe names the callable, and the declared properties are
data (STYLE.md §12).

>>> import torch
>>> from dmdr.rewards import build_reward
>>> r = build_reward("plugin", target="dmdr.rewards.plugin:mean_brightness", differentiable=True)
>>> r(torch.full((2, 3, 4, 4), 0.25)).tolist()
[0.25, 0.25]
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dmdr.errors import UserError
from dmdr.rewards.base import Reward, RewardSpec, register_reward


class FunctionReward(Reward):
    """Wraps ``fn(images, cond) -> (B,)`` with a declared :class:`RewardSpec`."""

    def __init__(self, fn: Callable[[Tensor, Any], Any], spec: RewardSpec):
        super().__init__()
        self.fn = fn
        if isinstance(fn, nn.Module):
            self.module = fn   # registered, so .to(device) / freezing reach its parameters
        self.spec = spec

    def score(self, images: Tensor, cond: Any) -> Tensor:
        if self.spec.differentiable:
            out = self.fn(images, cond)
        else:
            with torch.no_grad():
                out = self.fn(images, cond)
        out = torch.as_tensor(out, device=images.device)
        return out if out.is_floating_point() else out.float()


def resolve_target(target: str) -> Callable[..., Any]:
    """``"package.module:attr[.attr]"`` → the callable; a one-line ``UserError`` (a ValueError) names the target."""
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise UserError(f"plugin reward target {target!r} must look like 'package.module:callable'")
    mod_name, attr_path = target.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or an error raised while importing the user's module
        raise UserError(f"plugin reward target {target!r}: cannot import module {mod_name!r} "
                        f"({type(e).__name__}: {e})") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserError(f"plugin reward target {target!r}: {mod_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"plugin reward target {target!r} is a {type(obj).__name__}, not a callable")
    return obj


@register_reward("plugin")
def build_plugin(target: str, differentiable: bool | None = None, reads_prompts: bool | None = None,
                 reads_labels: bool | None = None, input_range: Sequence[float] | None = None,
                 resolution: int | None = None, kwargs: Mapping[str, Any] | None = None, label: str | None = None,
                 device: str = "cpu", video: bool | None = None) -> Reward:
    """Import ``target``, call it with ``kwargs`` and return a :class:`Reward`.

    Args:
        target: ``"package.module:callable"``; the callable returns a Reward or a function ``(images, cond) -> (B,)``.
        differentiable, reads_prompts, reads_labels, input_range, resolution, video: the declared spec. Required
            (``differentiable``) or defaulted (False, False, (0, 1), None, False) for functions; checked against
            the spec of a returned Reward.
        kwargs: keyword arguments for the callable.
        label: the log name of a wrapped function (default: the factory name).
        device: the returned reward is moved there.
    """
    factory = resolve_target(target)
    try:
        made = factory(**dict(kwargs or {}))
    except TypeError as e:
        raise UserError(f"plugin reward target {target!r} could not be called with kwargs "
                        f"{sorted((kwargs or {}).keys())}: {e}") from e
    declared = {"differentiable": differentiable, "reads_prompts": reads_prompts, "reads_labels": reads_labels,
                "input_range": None if input_range is None else tuple(float(v) for v in input_range),
                "resolution": resolution, "video": video}
    if isinstance(made, Reward):
        for key, value in declared.items():
            if value is not None and getattr(made.spec, key) != value:
                raise UserError(f"plugin reward target {target!r}: the recipe declares {key}={value!r} but the "
                                f"returned reward's spec says {getattr(made.spec, key)!r}")
        return made.to(device)
    if not callable(made):
        raise UserError(f"plugin reward target {target!r} returned a {type(made).__name__}; expected a Reward or "
                        "a function (images, cond) -> (B,)")
    if differentiable is None:
        raise UserError(f"plugin reward target {target!r} returned a plain function: declare differentiable: "
                        "true|false in the recipe")
    rng = declared["input_range"] or (0.0, 1.0)
    if len(rng) != 2 or not rng[0] < rng[1]:
        raise UserError(f"plugin reward target {target!r}: input_range must be [low, high]; got {list(rng)}")
    spec = RewardSpec(name=label or target.split(":")[1].split(".")[-1], differentiable=bool(differentiable),
                      input_range=(rng[0], rng[1]), resolution=resolution, reads_prompts=bool(reads_prompts),
                      reads_labels=bool(reads_labels), video=bool(video))
    return FunctionReward(made, spec).to(device)


def mean_brightness() -> Callable[[Tensor, Any], Tensor]:
    """Example plugin factory (used by the docstring): ``r = mean over C, H, W of the pixels``."""
    return lambda images, cond: images.mean(dim=(1, 2, 3))


def temporal_smoothness() -> Callable[[Tensor, Any], Tensor]:
    """Example video-reward factory (declare ``video: true``): clips (B, C, F, H, W) →
    ``r = -mean_{C,F-1,H,W} |x[:, :, f+1] - x[:, :, f]|`` (0 for a still clip or a single frame, lower for
    flicker)."""
    def score(videos: Tensor, cond: Any) -> Tensor:
        if videos.shape[2] < 2:
            return videos.new_zeros(videos.shape[0])
        return -(videos[:, :, 1:] - videos[:, :, :-1]).abs().flatten(1).mean(1)

    return score


__all__ = ["FunctionReward", "resolve_target", "build_plugin", "mean_brightness", "temporal_smoothness"]
