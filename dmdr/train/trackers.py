"""Optional experiment trackers (``logging.tracker: none | tensorboard | wandb``); ``metrics.jsonl`` stays the
source of truth — a tracker only mirrors what :class:`~dmdr.train.runtime.MetricsLog` writes.

* ``tensorboard`` — ``torch.utils.tensorboard.SummaryWriter(RUN/tensorboard)``; every finite numeric field of a
  metrics line becomes a scalar at ``global_step = line["step"]`` (alarm lines become the scalar
  ``alarm/<check>`` = degradation). Extra: ``pip install "dmdr[tensorboard]"``.
* ``wandb`` — ``wandb.init(mode="offline", dir=RUN, config=<resolved recipe>)``, ``wandb.log(fields, step=)``;
  nothing leaves the machine (``wandb sync`` uploads later if you want). Extra: ``pip install "dmdr[wandb]"``.

A missing extra is a one-line :class:`~dmdr.errors.UserError` raised before training starts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dmdr.errors import UserError


def _scalars(rec: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in rec.items():
        if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[k] = float(v)
    if "alarm" in rec and isinstance(rec.get("alarm_degradation"), (int, float)):
        out = {f"alarm/{rec['alarm']}": float(rec["alarm_degradation"])}
    return out


class TensorBoardTracker:
    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError('logging.tracker=tensorboard needs the tensorboard package: pip install "dmdr[tensorboard]" '
                            "(or set logging.tracker=none)") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, rec: dict[str, Any]) -> None:
        step = int(rec.get("step", 0))
        for k, v in _scalars(rec).items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out: Path, config: dict | None, name: str):
        try:
            import wandb
        except ImportError:
            raise UserError('logging.tracker=wandb needs the wandb package: pip install "dmdr[wandb]" '
                            "(or set logging.tracker=none)") from None
        self.run = wandb.init(mode="offline", dir=str(out), config=config or {}, name=name, reinit=True)

    def log(self, rec: dict[str, Any]) -> None:
        self.run.log(_scalars(rec), step=int(rec.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


def make_tracker(recipe, out: Path | None):
    """The tracker of ``recipe.logging.tracker`` (None for ``none``, or when there is no run directory)."""
    name = getattr(recipe.logging, "tracker", "none")
    if name == "none" or out is None:
        return None
    if name == "tensorboard":
        return TensorBoardTracker(Path(out))
    return WandbTracker(Path(out), recipe.model_dump(mode="json"), getattr(recipe, "name", "run"))


__all__ = ["TensorBoardTracker", "WandbTracker", "make_tracker"]
