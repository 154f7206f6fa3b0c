"""Will it fit? A pessimistic memory estimate made *before* allocating, for the digits (tiny DiT) family.

A batch size of 10^7 used to be discovered by the OOM killer (or a hang in swap) minutes into a run. The estimate
here counts, per sample, the activations a TinyDiT keeps for backward and the images of a rollout:

    per_block  = T·D·(12 + 2·m) + 2·h·T²            floats  (T = (S/p)² tokens, D dim, m mlp ratio, h heads)
    train      = B · 4 bytes · (SAFETY · L · per_block + (N + 8)·C·S²)      (N = student steps, L depth)
    sample     = n · 4 bytes · (per_block + (N + 3)·C·S²)                     (no_grad: one block at a time)

with ``SAFETY = 4`` graphs alive at once (generator, real and fake scores, reward). It is compared with the
memory available now (``MemAvailable`` on CPU, ``cudaMemGetInfo`` on CUDA); above it, :func:`require_fit` raises a
one-line :class:`MemoryFitError` with the estimate and the largest size that fits. Text-to-image families are
estimated elsewhere (their ``--dry-run``) and not checked here.
"""
from __future__ import annotations

import os

from dmdr.errors import UserError

SAFETY = 4


class MemoryFitError(UserError):
    """The requested batch / sample count cannot fit in memory (one-line message)."""


def available_bytes(device) -> int | None:
    """Free memory on ``device`` now (bytes), or None when unknown."""
    dev = str(device)
    if dev.startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(dev))[0])
        except Exception:  # noqa: BLE001 - unknown: do not refuse
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _per_block(cfg) -> float:
    T = (cfg.image_size // cfg.patch) ** 2
    return T * cfg.dim * (12 + 2 * cfg.mlp_ratio) + 2 * cfg.heads * T * T


def train_bytes(cfg, batch: int, steps: int) -> int:
    """Estimated bytes to train on ``batch`` samples of a TinyDiT with config ``cfg`` (``steps`` = N)."""
    img = cfg.channels * cfg.image_size ** 2
    return int(4 * batch * (SAFETY * cfg.depth * _per_block(cfg) + (steps + 8) * img))


def sample_bytes(cfg, num: int, steps: int) -> int:
    """Estimated bytes to sample ``num`` images in one batch (no gradients)."""
    img = cfg.channels * cfg.image_size ** 2
    return int(4 * num * (_per_block(cfg) + (steps + 3) * img))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def require_fit(need: int, device, what: str, per_item: int, fix: str) -> None:
    """Raise :class:`MemoryFitError` when ``need`` bytes exceed what ``device`` has free now."""
    have = available_bytes(device)
    if have is None or need <= have:
        return
    fits = max(0, have // max(per_item, 1))
    raise MemoryFitError(f"{what} needs about {_gib(need)} but {device} has {_gib(have)} free; {fix} "
                         f"(at most about {fits:,} fit now)")


def check_recipe_fits(recipe, device) -> None:
    """The largest per-step batch of a ``dmdr``/``grpo`` recipe must fit: the family's own check
    (:meth:`~dmdr.families.base.Family.check_fits`; digits: :func:`check_digits_fits`, T2I families: none)."""
    if getattr(recipe, "task", None) not in ("dmdr", "grpo"):
        return
    from dmdr.families.registry import get_family

    get_family(recipe).check_fits(recipe, device)


def check_digits_fits(recipe, device) -> None:
    """The largest per-step batch of a digits ``dmdr``/``grpo`` recipe must fit."""
    from dmdr.models.tiny import load_tiny

    cfg = load_tiny(recipe.model.teacher).config
    N = recipe.generator.steps
    if recipe.task == "dmdr":
        i, st = max(enumerate(recipe.stages), key=lambda x: x[1].batch_size)
        require_fit(train_bytes(cfg, st.batch_size, N), device, f"stages.{i}.batch_size={st.batch_size}",
                    train_bytes(cfg, 1, N), f"lower stages.{i}.batch_size")
    else:
        B = recipe.rl.batch_size * N   # transitions kept for PPO
        require_fit(train_bytes(cfg, B, N), device, f"rl.batch_size={recipe.rl.batch_size} (x {N} steps)",
                    train_bytes(cfg, N, N), "lower rl.batch_size")
