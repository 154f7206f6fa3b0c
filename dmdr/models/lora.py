"""LoRA adapters through peft, with per-call scaling and an explicit trainable set.

DMDR keeps one frozen base network and scales LoRA adapters per call (method.md §1, §2.6):

* fake score  = base + λ_f · Δ_critic          (λ_f = 2.0 in the official scripts)
* real score  = base + λ_r(k) · Δ_critic       (DynaDG; λ_r → 0 gives the pure teacher)
* generator   = base + Δ_generator              (T2I families; the digits student is a full fine-tune)

peft's ``set_adapter`` / ``add_adapter`` silently rewrite ``requires_grad`` (shared/ecosystem.md §3). Here:

* :func:`add_lora` injects a named adapter and then restores every parameter's previous ``requires_grad``;
  the new adapter's parameters are left frozen until :func:`set_trainable` says otherwise.
* :func:`adapter_scope` activates one adapter at one scale for a block of code by editing the LoRA layers'
  active list and scaling directly, restoring both afterwards; it never touches ``requires_grad``.
* :class:`AdapterView` wraps a base denoiser so it satisfies the model contract with a fixed adapter and scale.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

from torch import Tensor, nn


def _lora_layers(module: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def add_lora(module: nn.Module, adapter: str, *, rank: int, alpha: float, target_modules: list[str] | str,
             init: str | bool = "gaussian", dropout: float = 0.0) -> nn.Module:
    """Inject a LoRA adapter named ``adapter`` into ``module`` in place (peft ``inject_adapter_in_model``).

    ``init="gaussian"`` (the official critic init) and the default both start ``lora_B = 0``, so a fresh adapter
    leaves outputs unchanged. ``requires_grad`` of all existing parameters is restored afterwards and the new
    adapter's parameters are frozen: call :func:`set_trainable` to choose what trains.
    """
    from peft import LoraConfig, inject_adapter_in_model

    before = {id(p): p.requires_grad for p in module.parameters()}
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=init,
                     lora_dropout=dropout)
    import warnings

    with warnings.catch_warnings():  # "Already found a peft_config" is expected: several adapters share a base
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(cfg, module, adapter_name=adapter)
    for layer in _lora_layers(module):
        # keep every adapter addressable; activity is decided per call by adapter_scope
        layer._active_adapter = []
    for p in module.parameters():
        p.requires_grad_(before.get(id(p), False))
    return module


def lora_parameters(module: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The parameters of one adapter (lora_A/lora_B of every LoRA layer), in a stable order."""
    params = []
    for name, p in module.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and name.endswith(f".{adapter}.weight"):
            params.append(p)
    if not params:
        raise ValueError(f"module has no LoRA adapter named {adapter!r}")
    return params


def lora_state_dict(module: nn.Module, adapter: str) -> dict[str, Tensor]:
    """``{parameter name: tensor}`` of one adapter, names as in ``module.named_parameters()``."""
    return {n: p.detach() for n, p in module.named_parameters()
            if (".lora_A." in n or ".lora_B." in n) and n.endswith(f".{adapter}.weight")}


def adapter_names(module: nn.Module) -> set[str]:
    """Names of every LoRA adapter injected into ``module``."""
    names: set[str] = set()
    for layer in _lora_layers(module):
        names.update(layer.lora_A.keys())
    return names


def fuse_adapter(module: nn.Module, adapter: str) -> int:
    """For inference only: turn every LoRA layer of ``module`` back into its plain base layer, in place, with
    ``W ← W + Δ_adapter`` (peft's ``get_delta_weight``, summed in float32 and cast back to W's dtype). Every other
    adapter is dropped. Returns the number of layers replaced.

    An unmerged LoRA layer runs its own low-rank matmuls and per-module Python on every call; at batch 1 and
    1024 px that made the 4-step student 1.9× (SD3-Medium) and 2.4× (SDXL) slower per forward than the same
    weights merged (docs/scale.md, ``bench/results/device_sampling.json``). After this call the module can no
    longer give the base alone or any other adapter, and its adapters cannot train.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    replaced = 0
    for name, layer in list(module.named_modules()):
        if not name or not isinstance(layer, LoraLayer):
            continue
        base = layer.get_base_layer()
        if adapter in layer.lora_A:
            with torch.no_grad():
                delta = layer.get_delta_weight(adapter).float()
                base.weight.copy_((base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, base)
        replaced += 1
    return replaced


def set_trainable(module: nn.Module, params: Iterable[nn.Parameter]) -> None:
    """Make exactly ``params`` trainable in ``module``; everything else is frozen."""
    keep = {id(p) for p in params}
    for p in module.parameters():
        p.requires_grad_(id(p) in keep)


@contextlib.contextmanager
def adapter_scope(module: nn.Module, adapter: str | None, scale: float = 1.0) -> Iterator[None]:
    """Within the block, ``module`` computes ``base + scale · Δ_adapter`` (``adapter=None`` or ``scale=0``: base).

    Restores the previous active adapters and scalings afterwards, even on error. ``requires_grad`` is untouched.
    """
    layers = _lora_layers(module)
    saved = [(layer, list(layer.active_adapters), dict(layer.scaling)) for layer in layers]
    try:
        for layer in layers:
            if adapter is None or scale == 0.0 or adapter not in layer.lora_A:
                layer._active_adapter = []
            else:
                layer._active_adapter = [adapter]
                layer.scaling[adapter] = layer.scaling[adapter] * scale
        yield
    finally:
        for layer, active, scaling in saved:
            layer._active_adapter = active
            layer.scaling.update(scaling)


class BaseView:
    """What every denoiser view shares: the time path and the null condition are the base model's."""

    base: nn.Module

    @property
    def path(self):
        return self.base.path

    def null_cond(self, cond: Any) -> Any:
        return self.base.null_cond(cond)


class AdapterView(BaseView):
    """A denoiser view: ``base`` with one LoRA adapter at a fixed scale, satisfying the model contract.

    >>> real = AdapterView(critic_base, "critic", scale=0.25)   # DynaDG real score
    >>> fake = AdapterView(critic_base, "critic", scale=2.0)    # fake score
    """

    def __init__(self, base: nn.Module, adapter: str | None, scale: float = 1.0):
        self.base, self.adapter, self.scale = base, adapter, float(scale)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        with adapter_scope(self.base, self.adapter, self.scale):
            return self.base(x_t, t, cond)

    def __repr__(self) -> str:
        return f"AdapterView(adapter={self.adapter!r}, scale={self.scale})"


def copy_adapter(module: nn.Module, src: str, dst: str) -> list[nn.Parameter]:
    """Inject adapter ``dst`` with ``src``'s config and a copy of its current weights, frozen (e.g. a fixed
    reference policy sharing the base: LoRA-sized memory, not a copy of the network). Returns ``dst``'s params."""
    import torch

    cfg = module.peft_config[src]
    targets = cfg.target_modules
    targets = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
    add_lora(module, dst, rank=cfg.r, alpha=cfg.lora_alpha, target_modules=targets, init=True)
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in lora_state_dict(module, src).items():
            named[name[: -len(f".{src}.weight")] + f".{dst}.weight"].copy_(value)
    return lora_parameters(module, dst)


def adapter_is_identity(module: nn.Module, adapter: str) -> bool:
    """True when every ``lora_B`` of ``adapter`` is zero, i.e. base + Δ_adapter equals the base."""
    return all(not p.any() for n, p in module.named_parameters()
               if ".lora_B." in n and n.endswith(f".{adapter}.weight"))
