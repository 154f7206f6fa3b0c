"""Counting network evaluations (the cost unit of docs/rl.md), independent of wall time on a shared machine.

A *network evaluation* is one sample through one network, forward or backward: a forward call on a batch of n
samples counts n (a CFG call that batches conditional + unconditional counts 2n); a forward call whose output
requires grad also counts n backward evaluations (in the GRPO trainer every such output is backpropagated once).

    counter = NFECounter([base, generator_module])      # forward hooks on the network modules
    counter.reset(); ...; counter.snapshot()  -> {"nfe_forward": F, "nfe_backward": Bw, "nfe_total": F + Bw}

Modules must be distinct networks (a LoRA student shares its base with the critic: pass the base once).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class NFECounter:
    def __init__(self, modules: Iterable[nn.Module]):
        seen, self.forward, self.backward = [], 0, 0
        for m in modules:
            if m is not None and all(m is not s for s in seen):
                seen.append(m)
        self._handles = [m.register_forward_hook(self._hook) for m in seen]

    def _hook(self, module, args, output) -> None:
        x = args[0] if args else None
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim > 0 else 1
        self.forward += n
        if isinstance(output, torch.Tensor) and output.requires_grad:
            self.backward += n

    def reset(self) -> None:
        self.forward = self.backward = 0

    def snapshot(self) -> dict[str, float]:
        return {"nfe_forward": float(self.forward), "nfe_backward": float(self.backward),
                "nfe_total": float(self.forward + self.backward)}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


__all__ = ["NFECounter"]
