"""Monitors in the training loop: measure the checks of ``recipe.monitors`` on a fixed set and act on alarms.

The alarm rules live in :mod:`dmdr.monitors`; this module measures (docs/monitors.md):

* **fixed set** — digits: ``monitors.samples`` noises from a seeded CPU generator (seed 777), classes
  ``i mod C``, sampled with the student's training rollout (sde step noise from seed 778); text-to-image: the
  held-out prompts (``monitors.prompts``, default the run's sample prompts) × ``monitors.seeds`` seeds
  (9000 + s). The same inputs at every measurement, so changes are the student's, not the noise's.
* **values** — x̂0 RMS (model space), brightness and HSV saturation of the decoded images in [0, 1];
  digits: FID / k-NN recall (k = 3) / accuracy of the fixed evaluation net against all 1797 real digits;
  diversity: mean pairwise distance between the samples of one class / prompt, in eval-net features (digits)
  or 16×16 average-pooled pixels (text-to-image), averaged over classes / prompts; rewards called under
  ``no_grad``.

Measuring never moves the training RNG streams (:func:`~dmdr.train.runtime.rng_neutral`). Alarms go to
``metrics.jsonl`` (``alarm`` records), the console and the progress display. ``rollback`` restores an in-memory
snapshot (generator, critic, EMA, both optimiser states) taken at the best measurement of the chosen check; the
step counters go on (the log stays monotone) and every learning rate is multiplied by ``rollback.lr_factor``.
Snapshots are not checkpointed: after ``--resume`` a rollback only lowers the learning rates until a new best
is measured.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dmdr.errors import UserError
from dmdr.monitors import DIGITS_ONLY, Alarm, MonitorBank

ORDER = {"warn": 0, "rollback": 1, "stop": 2}


def training_rewards(recipe) -> list[tuple[str, dict]]:
    """(name, kwargs) of every training reward of a ``dmdr`` (all stages) or ``grpo`` recipe."""
    if recipe.task == "grpo":
        return [(t.name, dict(t.kwargs)) for t in recipe.rl.rewards]
    return [(t.name, dict(t.kwargs)) for st in recipe.stages for t in st.rewards]


def pairwise_diversity(feats: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean over groups of the mean pairwise L2 distance between the feature rows (N, D) of each group (N,).
    Groups with fewer than 2 members are skipped; NaN when no group has 2."""
    vals = []
    for g in groups.unique():
        f = feats[groups == g].double()
        n = f.shape[0]
        if n < 2:
            continue
        d = torch.cdist(f, f)
        vals.append(float(d.sum() / (n * (n - 1))))
    return sum(vals) / len(vals) if vals else math.nan


def image_stats(images01: torch.Tensor) -> dict[str, float]:
    """brightness = mean pixel; saturation = mean (max_c − min_c) / max_c over pixels (0 for one channel)."""
    x = images01.float()
    sat = 0.0
    if x.shape[1] == 3:
        mx, mn = x.max(1).values, x.min(1).values
        sat = float(((mx - mn) / mx.clamp_min(1e-6)).mean())
    return {"brightness": float(x.mean()), "saturation": sat}


class MonitorHook:
    """Measures the checks of ``trainer.recipe.monitors`` and applies their actions. Create with
    :meth:`create` (None when the section is off)."""

    def __init__(self, trainer):
        self.tr = trainer
        self.cfg = trainer.recipe.monitors
        self.bank = MonitorBank(self.cfg)
        self._inputs: Any = None
        self._rewards: dict[str, Callable] = {}
        self._ceilings: dict[str, float] = {}
        self._snapshots: dict[str, tuple[int, dict]] = {}
        self._validate()

    @classmethod
    def create(cls, trainer) -> "MonitorHook | None":
        mon = getattr(trainer.recipe, "monitors", None)
        return cls(trainer) if mon is not None and mon.enabled else None

    # ---- validation ---------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        r = self.tr.recipe
        tiny = self.tr.family.has_eval_net   # the digits evaluation network and real data
        train = training_rewards(r)
        for c in self.cfg.checks:
            if c.kind in DIGITS_ONLY and not tiny:
                raise UserError(f"monitors: check {c.label!r} (kind {c.kind}) needs the digits evaluation network; "
                                f"model.family={self.tr.family.name} supports heldout_reward, diversity, "
                                f"reward_saturation, x0_norm, brightness, saturation")
            if c.kind == "heldout_reward" and (c.reward.name, dict(c.reward.kwargs)) in train:
                raise UserError(f"monitors: held-out reward {c.reward.name!r} is also a training reward; pick a "
                                f"reward the student is not trained on")
            if c.kind == "reward_saturation":
                if c.reward is None and not train:
                    raise UserError(f"monitors: check {c.label!r} watches the training reward but the recipe has "
                                    f"none; set `reward:` or drop the check")
                if c.ceiling is None and not tiny:
                    raise UserError(f"monitors: check {c.label!r} needs `ceiling:` (the saturated reward level) "
                                    f"for model.family={self.tr.family.name}")

    # ---- measuring ----------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0

    def _reward(self, name: str, kwargs: dict):
        key = f"{name}:{sorted(kwargs.items())}"
        if key not in self._rewards:
            self._rewards[key] = self.tr.family.reward(self.tr.bundle, name, {"device": str(self.tr.device), **kwargs}
                                                       ).to(self.tr.device)
        return self._rewards[key]

    def _fixed_inputs(self):
        prompts = None
        if self.cfg.prompts:
            from dmdr.data.prompts import load_prompts

            prompts = load_prompts(self.cfg.prompts)
        return self.tr.family.sample_inputs(self.tr.bundle, "monitor", n=self.cfg.samples, prompts=prompts,
                                            repeats=self.cfg.seeds)

    @torch.no_grad()
    def samples(self) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
        """(x0 in model space (N, ...), images (N, C, H, W) in [0, 1], reward cond, group ids (N,))."""
        if self._inputs is None:
            self._inputs = self._fixed_inputs()
        fam, b, inp = self.tr.family, self.tr.bundle, self._inputs
        x = fam.sample(b, inp)   # the student's own rollout on the fixed set
        return x.float(), fam.decode(b, x).float().clamp(0, 1), inp.reward_cond, inp.groups

    def _ceiling(self, c, name: str, kwargs: dict) -> float:
        if c.ceiling is not None:
            return c.ceiling
        if c.label not in self._ceilings:  # the family's saturated level on real data (digits: p99 on hold-out)
            self._ceilings[c.label] = self.tr.family.reward_ceiling(self.tr.bundle, self._reward(name, kwargs))
        return self._ceilings[c.label]

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """One value per check label (see the module docstring)."""
        from dmdr.train.runtime import rng_neutral

        with rng_neutral():
            return self._measure()

    def _measure(self) -> dict[str, float]:
        x0, images, cond, groups = self.samples()
        kinds = {c.kind for c in self.cfg.checks}
        vals: dict[str, float] = {"x0_norm": float(x0.flatten(1).pow(2).mean(1).sqrt().mean()), **image_stats(images)}
        tiny = self.tr.family.has_eval_net
        if tiny and kinds & {"fid", "recall", "accuracy", "diversity"}:
            from dmdr.eval.metrics import fid_from_features, knn_precision_recall
            from dmdr.eval.report import features_and_logits, real_features

            feats, logits = features_and_logits(images.cpu())
            real = real_features()
            if "fid" in kinds:
                vals["fid"] = fid_from_features(real, feats)
            if "recall" in kinds:
                vals["recall"] = knn_precision_recall(real, feats, k=3)["recall"]
            vals["accuracy"] = float((logits.argmax(1) == groups.numpy()).mean())
            vals["diversity"] = pairwise_diversity(torch.from_numpy(feats), groups)
        elif "diversity" in kinds:
            vals["diversity"] = pairwise_diversity(F.adaptive_avg_pool2d(images.cpu(), 16).flatten(1), groups)
        train = training_rewards(self.tr.recipe)
        out = {}
        for c in self.cfg.checks:
            if c.kind == "heldout_reward":
                out[c.label] = float(self._reward(c.reward.name, c.reward.kwargs)(images, cond).float().mean())
            elif c.kind == "reward_saturation":
                name, kw = (c.reward.name, c.reward.kwargs) if c.reward is not None else train[0]
                r = self._reward(name, kw)(images, cond).float()
                out[c.label] = float((r >= self._ceiling(c, name, kw)).float().mean())
            else:
                out[c.label] = vals[c.kind]
        return out

    # ---- acting -------------------------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        tr = self.tr
        return {"tensors": {k: {n: v.detach().clone() for n, v in sd.items()} for k, sd in tr.tensors().items()},
                "opt_gen": copy.deepcopy(tr.opt_gen.state_dict()),
                "opt_critic": copy.deepcopy(tr.opt_critic.state_dict())}

    def _restore(self, snap: dict) -> None:
        tr = self.tr
        lrs = ([g["lr"] for g in tr.opt_gen.param_groups], [g["lr"] for g in tr.opt_critic.param_groups])
        t = snap["tensors"]
        tr.bundle.load_generator_state(t["generator"])
        tr.bundle.load_critic_state(t["critic"])
        if tr.ema is not None and "ema" in t:
            tr.ema = {k: v.clone() for k, v in t["ema"].items()}
        tr.opt_gen.load_state_dict(snap["opt_gen"])
        tr.opt_critic.load_state_dict(snap["opt_critic"])
        for opt, old in zip((tr.opt_gen, tr.opt_critic), lrs):
            for g, lr in zip(opt.param_groups, old):
                g["lr"] = lr

    def _rollback_targets(self) -> set[str]:
        by = self.cfg.rollback.by
        return {by} if by else {c.label for c in self.cfg.checks if c.action == "rollback"}

    def check(self, step: int, write: Callable[[dict], None], console: Callable[[str], None]) -> Alarm | None:
        """Measure, log ``monitor_*`` values and alarms, apply warn / rollback. Returns the alarm that asks to
        stop (the caller saves and ends the run), else None."""
        values = self.measure()
        alarms, improved = self.bank.update(step, values)
        for label in improved:
            if label in self._rollback_targets():
                self._snapshots[label] = (step, self._snapshot())
        write({"step": step, **self.bank.scalars()})
        stop = None
        for a in alarms:
            write(a.record())
            console(f"alarm: {a.message}")
        worst = max(alarms, key=lambda a: ORDER[a.action], default=None)
        if worst is None or worst.action == "warn":
            return None
        if worst.action == "stop":
            return worst
        label = self.cfg.rollback.by or worst.check
        snap = self._snapshots.get(label)
        if snap is not None:
            self._restore(snap[1])
        f = self.cfg.rollback.lr_factor
        self.bank.rollbacks += 1
        self.bank.lr_scale *= f
        for opt in (self.tr.opt_gen, self.tr.opt_critic):
            for g in opt.param_groups:
                g["lr"] *= f
        for st in self.bank.states.values():
            st.streak = 0
        restored = snap[0] if snap is not None else None
        write({"step": step, "rollback": label, "rollback_to_step": restored, "lr_scale": self.bank.lr_scale,
               "rollbacks": self.bank.rollbacks})
        console(f"rollback {self.bank.rollbacks}/{self.cfg.rollback.max_rollbacks}: restored the best {label} "
                f"weights (step {restored}); learning rates × {f:g} (now × {self.bank.lr_scale:g})"
                if restored is not None else
                f"rollback {self.bank.rollbacks}: no better {label} snapshot; learning rates × {f:g}")
        return stop


__all__ = ["MonitorHook", "image_stats", "pairwise_diversity", "training_rewards"]
