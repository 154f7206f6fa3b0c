"""Reward-hacking monitors: the ``monitors:`` recipe section and the alarm rules (pure Python, no torch).

Every ``monitors.every`` generator steps (``task: dmdr``) or RL iterations (``task: grpo``) the trainer measures
each check on a **fixed** set (fixed noise and classes for digits; fixed held-out prompts × seeds for
text-to-image; :mod:`dmdr.train.monitoring`) and feeds the value to :class:`MonitorBank`. A check's
*degradation* d is compared with its ``threshold``; ``patience`` consecutive violations raise an alarm, which
triggers the check's ``action``:

* ``warn``     — one console line and an ``alarm`` record in ``metrics.jsonl``; training goes on;
* ``stop``     — save a checkpoint, write the record, end the run with a one-line message (exit code 2);
* ``rollback`` — restore the weights and optimiser states of the best measurement of the check named by
  ``monitors.rollback.by`` (default: the alarming check) and go on with every learning rate multiplied by
  ``rollback.lr_factor``; after ``rollback.max_rollbacks`` rollbacks the next rollback alarm stops the run.

Degradation rules (``best`` / ``ref`` are taken over measurements at steps ≥ ``start``; nothing can fire before
the first measurement at or after ``start``):

=====================  ===========================================  ===================================
kind                   value                                        degradation d
=====================  ===========================================  ===================================
``fid``                digits eval-net FID on the fixed noise set   (v − best) / best         (lower is better)
``recall``             digits eval-net k-NN recall (k = 3)          (best − v) / best
``accuracy``           digits eval-net class accuracy               (best − v) / best
``diversity``          mean pairwise feature distance, same class   (best − v) / best
                       / prompt, different noise
``heldout_reward``     mean of a registered reward that is not a    best − v                  (absolute)
                       training reward
``reward_saturation``  fraction of samples whose training reward    v                         (a level)
                       is ≥ ``ceiling``
``x0_norm``            mean RMS of the student's x̂0 (model space)   |v − ref| / |ref|         (drift)
``brightness``         mean pixel value of the images in [0, 1]     |v − ref| / |ref|
``saturation``         mean HSV saturation (0 for grey images)      |v − ref| / max(|ref|, 1e-3)
=====================  ===========================================  ===================================

>>> bank = MonitorBank(Monitors(every=1, checks=[MonitorCheck(kind="fid", threshold=0.5, action="stop")]))
>>> bank.update(0, {"fid": 2.0}), bank.update(1, {"fid": 2.5})
([], [])
>>> [a.action for a in bank.update(2, {"fid": 3.2})]
['stop']
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["fid", "recall", "accuracy", "diversity", "heldout_reward", "reward_saturation", "x0_norm",
               "brightness", "saturation"]
RULES: dict[str, str] = {"fid": "up", "recall": "down", "accuracy": "down", "diversity": "down",
                         "heldout_reward": "down_abs", "reward_saturation": "level", "x0_norm": "drift",
                         "brightness": "drift", "saturation": "drift"}
DIGITS_ONLY = ("fid", "recall", "accuracy")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RewardRef(_Strict):
    """A registered reward by name, with the kwargs of its factory."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class MonitorCheck(_Strict):
    """One watched quantity with its threshold and action (see the module docstring for the rules)."""

    kind: Kind
    threshold: float = Field(..., gt=0, description="alarm when the degradation d exceeds this")
    action: Literal["warn", "stop", "rollback"] = "warn"
    name: str | None = Field(None, description="label in metrics.jsonl (monitor_<name>); default: kind "
                             "(heldout_<reward> for held-out rewards)")
    start: int = Field(0, ge=0, description="first step whose measurement may set best/ref and raise an alarm")
    patience: int = Field(1, ge=1, description="consecutive violations needed for an alarm")
    smooth: int = Field(1, ge=1, description="judge the median of the last `smooth` measurements (noisy metrics "
                        "such as FID on a few hundred samples); 1 = the raw value")
    reward: RewardRef | None = Field(None, description="heldout_reward: the reward (must not be a training "
                                     "reward); reward_saturation: the training reward (default: the first one)")
    ceiling: float | None = Field(None, description="reward_saturation: the reward level counted as saturated "
                                  "(digits default: the 99th percentile of the reward on real held-out digits)")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "heldout_reward" and self.reward is not None:
            return f"heldout_{self.reward.name}"
        return self.kind

    @model_validator(mode="after")
    def _needs_reward(self):
        if self.kind == "heldout_reward" and self.reward is None:
            raise ValueError("monitors: a heldout_reward check needs `reward: {name: ..., kwargs: {...}}`, a "
                             "registered reward that is not a training reward")
        if self.kind == "reward_saturation" and not 0 < self.threshold <= 1:
            raise ValueError(f"monitors: reward_saturation threshold is a fraction of samples in (0, 1]; got "
                             f"{self.threshold}")
        return self


class Rollback(_Strict):
    """What a ``rollback`` action restores and how much it lowers the learning rates."""

    by: str | None = Field(None, description="the check whose best measurement picks the weights to restore "
                           "(default: the alarming check)")
    lr_factor: float = Field(0.5, gt=0, lt=1, description="every learning rate is multiplied by this per rollback")
    max_rollbacks: int = Field(2, ge=0, description="after this many rollbacks a rollback alarm stops the run")


class Monitors(_Strict):
    """The ``monitors:`` recipe section (``task: dmdr`` and ``task: grpo``); ``every: 0`` switches it off."""

    every: int = Field(0, ge=0, description="generator steps / RL iterations between measurements; 0 = off")
    samples: int = Field(500, ge=8, description="digits: size of the fixed noise set (classes cycle)")
    prompts: str | None = Field(None, description="text-to-image: held-out prompt file (default: the run's "
                                "sample prompts)")
    seeds: int = Field(4, ge=2, description="text-to-image: seeds per held-out prompt (diversity needs >= 2)")
    checks: list[MonitorCheck] = Field(default_factory=list)
    rollback: Rollback = Field(default_factory=Rollback)

    @model_validator(mode="after")
    def _names(self):
        labels = [c.label for c in self.checks]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"monitors: check names must be unique; {', '.join(dup)} repeat (set `name:`)")
        if self.rollback.by is not None and self.rollback.by not in labels:
            raise ValueError(f"monitors.rollback.by={self.rollback.by!r} names no check; checks: "
                             f"{', '.join(labels) or 'none'}")
        if self.every and not self.checks:
            raise ValueError("monitors.every > 0 but monitors.checks is empty; add checks or set every: 0")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.every and self.checks)


@dataclass
class CheckState:
    """Per-check memory: best value and its step, the drift reference, the violation streak, alarm count."""

    best: float = math.nan
    best_step: int = -1
    ref: float = math.nan
    streak: int = 0
    alarms: int = 0
    last: float = math.nan
    last_d: float = math.nan
    recent: list = field(default_factory=list)  # the last `smooth` raw values (from `start` on)


@dataclass
class Alarm:
    """One alarm: which check, at which step, its value, degradation and threshold, and the action to take."""

    check: str
    kind: str
    step: int
    value: float
    degradation: float
    threshold: float
    action: str
    message: str = ""

    def record(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` line of this alarm."""
        return {"step": self.step, "alarm": self.check, "alarm_kind": self.kind, "alarm_action": self.action,
                "alarm_value": self.value, "alarm_degradation": self.degradation,
                "alarm_threshold": self.threshold, "alarm_message": self.message}


def degradation(kind: str, value: float, st: CheckState) -> float:
    """d of ``value`` against ``st`` (see the table in the module docstring); 0 before any best/ref exists."""
    rule = RULES[kind]
    if math.isnan(value):
        return math.nan
    if rule == "level":
        return value
    if rule == "drift":
        if math.isnan(st.ref):
            return 0.0
        return abs(value - st.ref) / max(abs(st.ref), 1e-3)
    if math.isnan(st.best):
        return 0.0
    if rule == "up":
        return (value - st.best) / max(abs(st.best), 1e-12)
    if rule == "down":
        return (st.best - value) / max(abs(st.best), 1e-12)
    return st.best - value  # down_abs


def _better(kind: str, value: float, best: float) -> bool:
    if math.isnan(best):
        return True
    rule = RULES[kind]
    if rule == "up":
        return value < best
    if rule in ("down", "down_abs"):
        return value > best
    return False


@dataclass
class MonitorBank:
    """The alarm logic over all checks of a :class:`Monitors` config; state is plain data (checkpointed)."""

    config: Monitors
    states: dict[str, CheckState] = field(default_factory=dict)
    rollbacks: int = 0
    lr_scale: float = 1.0
    last_step: int = -1  # the step of the last measurement (a resumed run re-measures only if it is missing)

    def __post_init__(self):
        for c in self.config.checks:
            self.states.setdefault(c.label, CheckState())

    def update(self, step: int, values: dict[str, float]) -> tuple[list[Alarm], list[str]]:
        """Feed one measurement (``values[label]``) per check. Returns (alarms, labels that reached a new best).

        A NaN value counts as a violation (a sampler or reward that produced NaN is itself an alarm)."""
        alarms, improved = [], []
        self.last_step = step
        for c in self.config.checks:
            st, v = self.states[c.label], float(values.get(c.label, math.nan))
            st.last = v
            if step < c.start:
                st.last_d = math.nan
                continue
            st.recent = (st.recent + [v])[-c.smooth:]
            if c.smooth > 1:
                finite = sorted(x for x in st.recent if not math.isnan(x))
                v = finite[len(finite) // 2] if len(finite) % 2 else (
                    (finite[len(finite) // 2 - 1] + finite[len(finite) // 2]) / 2 if finite else math.nan)
            d = degradation(c.kind, v, st)
            st.last_d = d
            if RULES[c.kind] == "drift" and math.isnan(st.ref) and not math.isnan(v):
                st.ref = v
            if not math.isnan(v) and _better(c.kind, v, st.best):
                st.best, st.best_step = v, step
                improved.append(c.label)
            violated = math.isnan(d) or d > c.threshold
            st.streak = st.streak + 1 if violated else 0
            if violated and st.streak >= c.patience:
                st.alarms += 1
                action = c.action
                if action == "rollback" and self.rollbacks >= self.config.rollback.max_rollbacks:
                    action = "stop"
                msg = (f"monitor {c.label}: value {v:.4g}, degradation {d:.3g} > threshold {c.threshold:g} at step "
                       f"{step} (best {st.best:.4g} at step {st.best_step}"
                       f"{'' if math.isnan(st.ref) else f', reference {st.ref:.4g}'}); action {action}")
                alarms.append(Alarm(c.label, c.kind, step, v, d, c.threshold, action, msg))
        return alarms, improved

    def status(self) -> str:
        """A short status for the progress display, e.g. ``monitors ok`` or ``ALARM fid×2``."""
        bad = [f"{k}×{s.alarms}" if s.alarms > 1 else k for k, s in self.states.items() if s.alarms]
        return ("ALARM " + ",".join(bad)) if bad else "monitors ok"

    def scalars(self) -> dict[str, float]:
        """``monitor_<label>`` (value) and ``monitor_<label>_d`` (degradation) of the last measurement."""
        out = {}
        for k, s in self.states.items():
            out[f"monitor_{k}"] = s.last
            out[f"monitor_{k}_d"] = s.last_d
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"states": {k: asdict(v) for k, v in self.states.items()}, "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale, "last_step": self.last_step}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.get("states", {}).items():
            if k in self.states:
                self.states[k] = CheckState(**v)
        self.rollbacks = int(d.get("rollbacks", 0))
        self.lr_scale = float(d.get("lr_scale", 1.0))
        self.last_step = int(d.get("last_step", -1))


__all__ = ["Alarm", "CheckState", "MonitorBank", "MonitorCheck", "Monitors", "RewardRef", "Rollback", "RULES",
           "degradation"]
