"""Helpers shared by the text-to-image adapter tests."""
import torch


def randomize(params, seed: int, std: float = 0.1) -> None:
    """Overwrite ``params`` with N(0, std²) draws from a seeded generator (LoRA B starts at 0; tests need signal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)
