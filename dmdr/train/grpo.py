"""GRPO/PPO for few-step students through TorchRL, with the DMD loss (or a KL, or nothing) as the regulariser.

One iteration (docs/rl.md gives the equations):

1. **rollout** — ``rl.batch_size`` trajectories = groups × G, the G samples of a group sharing a class id / prompt;
   :func:`dmdr.samplers.stochastic_rollout` logs every transition's Gaussian log-probability;
2. **rewards** — every reward is a black box, called under ``no_grad`` on the decoded final samples. A sample
   with a NaN reward is counted (``reward_nan_count``), skipped with a warning and never averaged in;
   a reward of the wrong shape is an error;
3. **advantages** — :func:`dmdr.advantages.from_config` (per-reward normalisation → weighted mix → group-relative
   → clip); the N transitions of a trajectory share its advantage (Flow-GRPO);
4. **PPO** — the B·N transitions go into a torchrl ``ReplayBuffer(LazyTensorStorage, SamplerWithoutReplacement)``;
   ``rl.ppo_epochs`` passes of minibatches through ``ClipPPOLoss(actor, critic_network=None, critic_coeff=None)``
   (critic-free = GRPO) plus the regulariser: ``reg_weight · L_DMD`` on the minibatch's states, or
   ``kl_weight · KL(π_θ ‖ π_ref)`` to the frozen initial student, or nothing. One optimiser step per minibatch;
5. **critic** (``regularizer: dmd | dmd_adv | dmd_ca_adv``) — before every generator step, ``rl.critic_updates``
   (default ``optim.ratio``) fake-score updates, each on a fresh backward simulation of the current student (the
   DMDR critic step, two time-scale rule) or, with ``rl.critic_reuse_rollout``, on the iteration's rollout samples.

The policy's non-final steps are ``rl.sde``: ``dmd2`` renoising or Flow-GRPO's SDE (``flow_grpo``); see
:func:`dmdr.samplers.flow_grpo_sde`. Per generator step the trainer logs each loss term's own gradient norm before
clipping (``grad_norm_<term>``) and whether the clip bound (``grad_clip_bound``); per iteration the network
evaluations (``nfe_forward``, ``nfe_backward``, ``nfe_total``; :mod:`dmdr.train.nfe`).

``metrics.jsonl`` gets per-reward values, ``reward_mean``, the PPO diagnostics (``clip_fraction``, ``kl_approx``,
``ESS``, ``max_ratio``), the regulariser terms and the per-iteration cost (``time_rollout``, ``time_reward``,
``time_ppo``, ``time_dmd`` seconds; ``time_ppo`` includes the KL term). Evaluations (FID, precision, recall,
accuracy on the deterministic student) are separate lines with ``eval_*`` keys. Checkpoints, the final sample grid
and ``student.safetensors`` are written as the DMDR trainer writes them, so ``dmdr sample --run DIR`` works.
"""
from __future__ import annotations

import copy
import math
import signal
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from dmdr import keys as K
from dmdr.advantages import from_config
from dmdr.errors import UserError
from dmdr.losses.policy import (PolicyKeys, StudentStep, advantage_weights, check_log_prob_shape, kl_to_reference,
                                make_student_actor, rollout_transitions, weighted_dmd_loss)
from dmdr.models.lora import AdapterView
from dmdr.recipes import GRPORecipe, save_recipe, validate_recipe
from dmdr.samplers import stochastic_rollout
from dmdr.schedules import sample_grid_steps
from dmdr.scores import sample_cfg_scale
from dmdr.train import checkpoint as ckpt
from dmdr.families.base import Bundle
from dmdr.train.dmdr import DMDRState, DMDRTrainer, _Null
from dmdr.train.runtime import MetricsLog, autocast, make_progress, truncate_metrics

PK = PolicyKeys()


class RewardShapeError(UserError):
    """A reward returned something other than one score per sample."""


@dataclass
class GRPOState(DMDRState):
    """DMDR's counters (``global_step`` = RL iterations, ``inner_step`` = critic updates) plus RL counters."""

    ppo_updates: int = 0       # optimiser steps on the generator
    reward_nan_total: int = 0  # samples skipped because a reward was NaN/inf


def check_reward(name: str, value: Any, batch: int) -> torch.Tensor:
    """Return ``value`` as a float (B,) tensor, or raise :class:`RewardShapeError` naming the reward."""
    if not isinstance(value, torch.Tensor):
        raise RewardShapeError(f"reward {name!r} returned {type(value).__name__}; expected a tensor of shape "
                               f"({batch},)")
    v = value.detach()
    if v.ndim == 2 and v.shape[1] == 1:
        v = v[:, 0]
    if tuple(v.shape) != (batch,):
        raise RewardShapeError(f"reward {name!r} returned shape {tuple(value.shape)}; expected ({batch},): one score "
                               f"per sample")
    return v.float()


def _index_rows(obj: Any, idx: torch.Tensor) -> Any:
    if isinstance(obj, (torch.Tensor, TensorDictBase)):
        return obj[idx]
    return [obj[i] for i in idx.tolist()]


def _repeat_groups(obj: Any, g: int) -> Any:
    if isinstance(obj, (torch.Tensor, TensorDictBase)):
        return obj.repeat_interleave(g, dim=0)
    if obj is None:
        return None
    return [o for o in obj for _ in range(g)]


def smoke_recipe(recipe: GRPORecipe) -> GRPORecipe:
    """A tiny, fast version of ``recipe`` (for ``dmdr train --smoke``): 2 iterations, 2 groups, 100 eval samples."""
    d = recipe.model_dump(mode="json")
    rl = d["rl"]
    rl["batch_size"] = 2 * rl["group_size"]
    rl["minibatch_size"] = rl["batch_size"] * d["generator"]["steps"] // 2
    d["optim"]["ratio"] = 1
    d["iterations"] = min(d["iterations"], 2)
    d["eval"] = {"every": 0, "samples": min(d["eval"]["samples"], 100)}
    d["logging"].update(log_every=1, sample_every=0, checkpoint_every=0)
    return validate_recipe(d, "smoke recipe")


class GRPOTrainer(DMDRTrainer):
    """Policy-gradient RL on the few-step student; reuses the DMDR trainer's bundle, optimisers, critic and DMD
    machinery, checkpoints, grids and export. :meth:`run` trains; :meth:`iteration` is one RL iteration."""

    def __init__(self, recipe: GRPORecipe, out: Path | None, device: torch.device, *, console=print,
                 bundle: Bundle | None = None):
        super().__init__(recipe, out, device, console=console, bundle=bundle)
        self.state = GRPOState()
        self.init_source = self._load_init()
        rl, b = recipe.rl, self.bundle
        self.actor = make_student_actor(b.generator, b.generator_module, final_std=rl.final_std,
                                        noise_scale=rl.noise_scale, log_prob_reduce=rl.log_prob_reduce, sde=rl.sde,
                                        event_dim=len(b.sample_shape))  # (C, H, W) = 3; video (C, F, H, W) = 4
        self.uses_dmd = rl.regularizer in ("dmd", "dmd_adv", "dmd_ca_adv")
        if rl.sde == "flow_grpo" and recipe.generator.steps > 1 and getattr(b.path, "prediction", None) != "velocity":
            raise UserError("rl.sde=flow_grpo is Flow-GRPO's SDE for flow-matching models; this model predicts "
                            f"{getattr(b.path, 'prediction', '?')}: use --set rl.sde=dmd2")
        if rl.regularizer == "dmd_ca_adv" and recipe.dmd.cfg <= 1.0:
            raise UserError("rl.regularizer=dmd_ca_adv multiplies the CFG-augmentation term by the advantage, which "
                            "is zero at dmd.cfg = 1; set dmd.cfg > 1 (e.g. --set dmd.cfg=2.0)")
        if recipe.dmd.decoupled.enabled and not self.uses_dmd:
            raise UserError(f"dmd.decoupled changes the DMD regulariser, but rl.regularizer={rl.regularizer} uses none; "
                            "set rl.regularizer to dmd, dmd_adv or dmd_ca_adv, or dmd.decoupled.enabled=false")
        self.step_module: StudentStep = self.actor.module[0].module
        self.reference: StudentStep | None = None
        if rl.regularizer == "kl":
            if b.generator_is_lora:  # the reference shares the base: no copy of the network
                from dmdr.models.lora import adapter_is_identity, copy_adapter

                if adapter_is_identity(b.base, "generator"):  # the student starts at the base: adapter disabled
                    model = AdapterView(b.base, None, 0.0)
                else:  # a trained LoRA student (rl.init): a frozen copy of its adapter
                    copy_adapter(b.base, "generator", "reference")
                    model = AdapterView(b.base, "reference", 1.0)
                self.reference = StudentStep(model, b.base, final_std=rl.final_std, noise_scale=rl.noise_scale,
                                             sde=rl.sde)
            else:
                ref = copy.deepcopy(b.generator_module).requires_grad_(False).eval()
                self.reference = StudentStep(ref, ref, final_std=rl.final_std, noise_scale=rl.noise_scale, sde=rl.sde)
        from torchrl.data import LazyTensorStorage, ReplayBuffer
        from torchrl.data.replay_buffers import SamplerWithoutReplacement
        from torchrl.objectives import ClipPPOLoss

        self.loss_module = ClipPPOLoss(self.actor, critic_network=None, critic_coeff=None, entropy_bonus=False,
                                       clip_epsilon=rl.clip_epsilon, normalize_advantage=False)
        n = rl.batch_size * recipe.generator.steps
        self.buffer = ReplayBuffer(storage=LazyTensorStorage(n, device=device),
                                   sampler=SamplerWithoutReplacement(drop_last=True), batch_size=rl.minibatch_size)
        a = rl.advantage
        self.advantage_fn = from_config({t.name: t.weight for t in rl.rewards}, baseline=a.baseline,
                                        normalize_rewards=a.normalize_rewards, clip=a.clip, eps=a.eps, std=a.std)
        self._shape_checked = False
        from dmdr.train.nfe import NFECounter

        ref_net = self.reference.owner if self.reference is not None and not b.generator_is_lora else None
        self.nfe = NFECounter([b.base, None if b.generator_is_lora else b.generator_module, ref_net])

    # ---- initial weights ------------------------------------------------------------------------------------------
    def _load_init(self) -> str:
        """Load ``rl.init`` into the generator (and the critic, from a run's newest checkpoint). Returns its source."""
        init, b = self.recipe.rl.init, self.bundle
        if init is None:
            return "teacher"
        p = Path(init)
        if not p.exists():
            raise UserError(f"rl.init={init}: no such file or run directory; pass a `dmdr train` run directory, a "
                            f"student .safetensors, or null to start from the teacher")
        if p.is_file():
            return self._load_student_file(p)
        if (p / "COMPLETE").exists() and ckpt.STEP_RE.match(p.name):  # one checkpoint of a run (e.g. a stage's end)
            return self._load_checkpoint_dir(p, init)
        task = _run_task(p)
        if task is not None and task not in ("dmdr", "grpo"):
            raise UserError(f"rl.init={init}: that is a task={task} run, not a student; pass the --out of a "
                            f"`task: dmdr` or `task: grpo` run, a student .safetensors, or null for the teacher")
        cks = ckpt.list_checkpoints(p / "checkpoints")
        tensors = ckpt.read_checkpoint(cks[-1])[0] if cks else {}
        if (p / "student.safetensors").exists() and not b.generator_is_lora:
            src = self._load_student_file(p / "student.safetensors")
        elif tensors and "generator" not in tensors:
            raise UserError(f"rl.init={init}: its checkpoint {cks[-1].name} holds no generator; pass the --out of a "
                            f"`task: dmdr` or `task: grpo` run")
        elif tensors:
            b.load_generator_state(tensors.get("ema", tensors["generator"]))
            src = str(cks[-1])
        else:
            raise UserError(f"rl.init={init}: the run has neither student.safetensors nor a checkpoint")
        if "critic" in tensors:
            b.load_critic_state(tensors["critic"])
            src += f" (critic from {cks[-1].name})"
        return src

    def _load_checkpoint_dir(self, path: Path, init: str) -> str:
        """``rl.init = RUN/checkpoints/step-NNNNNNN``: that checkpoint's EMA (else generator) and critic."""
        tensors, _, recipe_yaml = ckpt.read_checkpoint(path)
        from dmdr import safe_yaml

        task = (safe_yaml.load(recipe_yaml) or {}).get("task")
        if task not in ("dmdr", "grpo") or "generator" not in tensors:
            raise UserError(f"rl.init={init}: that checkpoint is from a task={task} run and holds no generator; pass "
                            f"a checkpoint of a `task: dmdr` or `task: grpo` run")
        self.bundle.load_generator_state(tensors.get("ema", tensors["generator"]))
        src = str(path)
        if "critic" in tensors:
            self.bundle.load_critic_state(tensors["critic"])
            src += " (and its critic)"
        return src

    def _load_student_file(self, path: Path) -> str:
        if self.bundle.generator_is_lora:
            raise UserError(f"rl.init={path}: a student file holds full weights but generator.lora is set; "
                            f"pass the run directory instead")
        self.family.load_export(self.bundle, path)
        return str(path)

    # ---- pieces of an iteration -----------------------------------------------------------------------------------
    def sample_groups(self) -> tuple[Any, Any, Any, torch.Tensor]:
        """(cond, uncond, reward cond, group ids): ``batch_size / G`` draws of the bundle's conditioning, each
        repeated G times; group id = draw index (B,)."""
        rl = self.recipe.rl
        n = rl.batch_size // rl.group_size
        cond, uncond, rcond = self.bundle.sample_cond(n)
        group = torch.arange(n, device=self.device).repeat_interleave(rl.group_size)
        G = rl.group_size
        return _repeat_groups(cond, G), _repeat_groups(uncond, G), _repeat_groups(rcond, G), group

    @torch.no_grad()
    def score(self, images: torch.Tensor, rcond: Any) -> TensorDict:
        """Every reward as a black box: TensorDict(batch B) with ``reward_<name>`` (float, may hold NaN)."""
        B = images.shape[0]
        out = TensorDict({}, batch_size=[B], device=images.device)
        for term in self.recipe.rl.rewards:
            value = self.reward(term.name, term.kwargs)(images, rcond)
            out.set(K.reward_key(term.name), check_reward(term.name, value, B))
        return out

    def critic_step(self, reuse: tuple[torch.Tensor, Any] | None = None) -> dict[str, float]:
        """One DMDR critic update (method.md §2.2-2.3) on a fresh backward simulation of the current student
        (:meth:`DMDRTrainer.backward_simulation` then :meth:`DMDRTrainer.critic_update`), or, with ``reuse =
        (x_clean, cond)`` (``rl.critic_reuse_rollout``), on the iteration's rollout (:func:`rollout_clean`): no
        extra rollout."""
        if reuse is not None:
            self.bundle.generator_module.train()
            return self.critic_update(*reuse)
        B = self.recipe.rl.batch_size
        cond, _, _ = self.bundle.sample_cond(B)
        x_clean, _ = self.backward_simulation(B, cond)
        self.bundle.generator_module.train()
        return self.critic_update(x_clean, cond)

    def dmd_term(self, mb: TensorDictBase) -> TensorDict:
        """The DMD loss of the DMDR generator update (method.md §2.4) on a minibatch's states x_i at t_i:
        x̂0 = G(x_i, t_i, c); scores from :meth:`DMDRTrainer.distribution_matching`; τ ~ DynaRS(k)."""
        r, b, rl = self.recipe, self.bundle, self.recipe.rl
        x, t, cond = mb[PK.x], mb[PK.t], mb[PK.cond]
        w = sample_cfg_scale(r.dmd.cfg, r.dmd.cfg_jitter)
        with autocast(self.device, r.runtime.precision):
            x0_pred = b.path.to_x0(x, t, b.generator(x, t, cond)).float()
        if r.dmd.decoupled.enabled:  # CA at its own τ (losses/decoupled_dmd.py); dmd_ca_adv: CA × advantage
            from dmdr.losses.decoupled_dmd import decoupled_dmd_terms

            ca_adv, adw = rl.regularizer == "dmd_ca_adv", rl.advantage_weighted_dmd or rl.regularizer == "dmd_adv"
            return decoupled_dmd_terms(
                x0_pred, t, cond, b.base.null_cond(cond), real=b.critic_view(self.lambda_real()), fake=b.critic_view(
                    r.critic.scale_fake), cfg_scale=w, tau_dm=self.sample_tau(x.shape[0]), step=self.state.global_step,
                dmd=r.dmd, tau_sampler=self.sample_tau, advantage=mb[PK.advantage] if ca_adv else None,
                sample_weights=advantage_weights(mb[PK.advantage], rl.adw_temperature) if adw and not ca_adv else None,
                weight=rl.reg_weight, autocast=lambda: autocast(self.device, r.runtime.precision),
                t_first=float(self.grid[0]))
        if rl.regularizer == "dmd_ca_adv":
            return self.dmd_ca_adv_term(x0_pred, cond, mb[PK.advantage], w)
        td = self.distribution_matching(x0_pred, cond, b.base.null_cond(cond), cfg_scale=w,
                                        tau=self.sample_tau(x.shape[0]))
        adw = rl.advantage_weighted_dmd or rl.regularizer == "dmd_adv"
        weights = advantage_weights(mb[PK.advantage], rl.adw_temperature) if adw else None
        return weighted_dmd_loss(td, weights, weight=rl.reg_weight)

    def dmd_ca_adv_term(self, x0_pred: torch.Tensor, cond: Any, advantage: torch.Tensor, w: float) -> TensorDict:
        """``rl.regularizer: dmd_ca_adv`` (:mod:`dmdr.losses.dmd_ca_adv`): real x̂0 conditional and unconditional
        and fake x̂0 at one renoise level τ ~ DynaRS(k) (DMDR's coupled form), then DM + A × CA."""
        from dmdr.losses.dmd_ca_adv import dmd_ca_adv_loss
        from dmdr.scores import denoise

        r, b = self.recipe, self.bundle
        real = AdapterView(b.base, "critic", self.lambda_real())
        fake = AdapterView(b.base, "critic", r.critic.scale_fake)
        tau = self.sample_tau(x0_pred.shape[0])
        with torch.no_grad(), autocast(self.device, r.runtime.precision):
            x_tau = b.path.renoise(x0_pred.detach(), tau, torch.randn_like(x0_pred))
            real_c = denoise(real, x_tau, tau, cond).float()
            real_u = denoise(real, x_tau, tau, b.base.null_cond(cond)).float()
            fake_x0 = denoise(fake, x_tau, tau, cond).float()
        return dmd_ca_adv_loss(x0_pred, real_c, real_u, fake_x0, advantage, w, weight=r.rl.reg_weight)

    def kl_term(self, mb: TensorDictBase) -> TensorDict:
        """KL(π_θ ‖ π_ref) on a minibatch (:func:`dmdr.losses.policy.kl_to_reference`)."""
        args = (mb[PK.x], mb[PK.t], mb[PK.t_next], mb[PK.last], mb[PK.cond])
        loc, scale = self.step_module(*args)
        with torch.no_grad():
            ref_loc, _ = self.reference(*args)
        td = TensorDict({PK.loc: loc, PK.ref_loc: ref_loc, PK.scale: scale}, batch_size=[loc.shape[0]])
        rl = self.recipe.rl
        return kl_to_reference(td, weight=rl.kl_weight, reduce=rl.log_prob_reduce)

    def _step(self, parts: list[tuple[str, str, torch.Tensor]], timers: dict[str, float],
              diag: dict[str, float]) -> tuple[bool, float]:
        """One generator step on the sum of ``parts`` = [(timer key, name, loss)]. Each part's backward is timed
        into ``timers[timer key]``; each part's own gradient norm (before clipping) goes to
        ``diag["grad_norm_<name>"]`` (how strong the regulariser pulls compared with the policy gradient), and
        ``diag["grad_clip_bound"]`` is 1 when the total norm exceeded ``optim.grad_clip`` (the clip scaled the step
        down), else 0."""
        opt, params = self.opt_gen, self.bundle.generator_params
        self._last_update = "gen"   # which non-finite streak _count() extends
        opt.zero_grad(set_to_none=True)
        if not all(torch.isfinite(loss) for _, _, loss in parts):
            return False, float("nan")
        prev = None
        for timer, name, loss in parts:
            t0 = time.perf_counter()
            loss.backward()
            timers[timer] += time.perf_counter() - t0
            with torch.no_grad():   # per-term norms, for every regulariser (also a lone policy term)
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                  for p in params])
                diag[f"grad_norm_{name}"] = float((flat if prev is None else flat - prev).norm())
                prev = flat
        self.opt_critic.zero_grad(set_to_none=True)
        ok, gn = self._clip_and_step(params, opt)
        if ok:
            diag["grad_clip_bound"] = float(gn > self.recipe.optim.grad_clip)
        return ok, gn

    # ---- one iteration ----------------------------------------------------------------------------------------------
    def iteration(self) -> dict[str, float]:
        """rollout → rewards → advantages → PPO epochs (per step: critic updates for dmd, PPO + regulariser).
        Returns scalars to log."""
        r, b, st, rl = self.recipe, self.bundle, self.state, self.recipe.rl
        B, dev = rl.batch_size, self.device
        timers: dict[str, float] = defaultdict(float)
        out: dict[str, float] = {}
        self.nfe.reset()
        # 1. rollout
        t0 = time.perf_counter()
        cond, uncond, rcond, group = self.sample_groups()
        noise = torch.randn(B, *b.sample_shape, device=dev)
        b.generator_module.eval()
        with autocast(dev, r.runtime.precision):
            roll = stochastic_rollout(b.generator, noise, self.grid, cond, final_std=rl.final_std,
                                      noise_scale=rl.noise_scale, reduce=rl.log_prob_reduce, sde=rl.sde)
        roll = roll.apply(lambda v: v.float() if v.is_floating_point() else v)
        timers["time_rollout"] = time.perf_counter() - t0
        # 2. rewards (black box) and NaN handling
        t0 = time.perf_counter()
        rewards = self.score(b.decode(roll[K.SAMPLE]).detach(), rcond)
        finite = torch.stack([torch.isfinite(v) for v in rewards.values()], 0).all(0)
        n_bad = int((~finite).sum())
        if n_bad:
            warnings.warn(f"{n_bad} of {B} samples got a NaN/inf reward at iteration {st.global_step}; skipped",
                          RuntimeWarning, stacklevel=2)
            self.console(f"warning: {n_bad} of {B} samples got a NaN/inf reward at iteration {st.global_step}; "
                         f"they are skipped")
        st.reward_nan_total += n_bad
        keep = finite.nonzero().squeeze(-1)
        out["reward_nan_count"] = float(n_bad)
        for name, v in rewards.items():
            out[name] = float(v[keep].mean()) if keep.numel() else float("nan")
        raw_mix = sum(t.weight * rewards[K.reward_key(t.name)][keep] for t in rl.rewards)
        out["reward_mean"] = float(raw_mix.mean()) if keep.numel() else float("nan")
        out["reward_std"] = float(raw_mix.std(unbiased=False)) if keep.numel() else float("nan")
        timers["time_reward"] = time.perf_counter() - t0
        if keep.numel() < 2:
            self.console(f"warning: fewer than 2 samples with a finite reward at iteration {st.global_step}; "
                         f"no update")
            st.global_step += 1
            st.stage_step += 1
            return {**out, **timers}
        # 3. advantages
        rows = rewards[keep].clone()
        rows.set(K.GROUP, group[keep])
        adv = self.advantage_fn(rows)[K.ADVANTAGE]
        out["advantage_abs_mean"] = float(adv.abs().mean())
        out["advantage_std"] = float(adv.std(unbiased=False))
        roll_k, cond_k = roll[keep], _index_rows(cond, keep)
        # 4. PPO epochs over minibatches of transitions (+ 5. critic updates before each step, for DMD)
        trans = rollout_transitions(roll_k, cond_k, advantage=adv)
        if not self._shape_checked:
            probe = trans[:2]
            with torch.no_grad():
                check_log_prob_shape(self.actor.get_dist(probe).log_prob(probe[PK.action]), 2)
            self._shape_checked = True
        self.buffer.empty()
        self.buffer.extend(trans)
        minibatches = (lambda: iter(self.buffer)) if len(trans) >= rl.minibatch_size else (lambda: iter([trans]))
        b.generator_module.train()
        acc: dict[str, list[float]] = defaultdict(list)
        n_critic = r.optim.ratio if rl.critic_updates is None else rl.critic_updates
        reuse = (rollout_clean(roll_k), cond_k) if rl.critic_reuse_rollout else None
        for _ in range(rl.ppo_epochs):
            for mb in minibatches():
                if self.uses_dmd:
                    t0 = time.perf_counter()
                    for _ in range(n_critic):
                        for k_, v in self.critic_step(reuse).items():
                            acc[k_].append(v)
                    timers["time_dmd"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                with autocast(dev, r.runtime.precision):   # the same precision as the rollout that logged π_old
                    terms = self.loss_module(mb)
                    parts = [("time_ppo", "ppo", terms["loss_objective"].float())]
                    if rl.regularizer == "kl":
                        kl = self.kl_term(mb)
                        terms.update(kl)
                        parts.append(("time_ppo", "kl", kl["loss_kl"]))
                timers["time_ppo"] += time.perf_counter() - t0
                if self.uses_dmd:
                    t0 = time.perf_counter()
                    dmd = self.dmd_term(mb)
                    terms.update(dmd)
                    parts.append(("time_dmd", "dmd", dmd["loss_dmd"]))
                    timers["time_dmd"] += time.perf_counter() - t0
                diag: dict[str, float] = {}
                ok, gn = self._step(parts, timers, diag)
                self._count(ok)
                st.ppo_updates += int(ok)
                if ok and self.ema is not None:
                    self._ema_update()
                for k_, v in [*((k_, float(v.detach())) for k_, v in terms.items()), *diag.items()]:
                    acc[k_].append(v)
                acc["gen_grad_norm"].append(gn)
        out.update({k_: sum(v) / len(v) for k_, v in acc.items()})
        if self.uses_dmd:
            out["lambda_real"] = self.lambda_real()
        out.update(self.nfe.snapshot())   # network evaluations of this iteration (dmdr.train.nfe)
        st.global_step += 1
        st.stage_step += 1
        timers["time_iteration"] = sum(timers[k_] for k_ in ("time_rollout", "time_reward", "time_ppo", "time_dmd"))
        return {**out, **timers}

    # ---- evaluation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """FID / precision / recall / accuracy / classifier reward of the deterministic student (families with an
        evaluation network: digits), plus the training rewards and the mean brightness of the same samples. Keys are
        prefixed ``eval_``."""
        r, fam, b = self.recipe, self.family, self.bundle
        if not fam.has_eval_net or r.eval.samples < 4:
            return {}
        from dmdr.eval.report import evaluate_samples

        inputs = fam.sample_inputs(b, "eval", n=r.eval.samples)   # the student's own sampler, fixed noise
        x = fam.decode(b, fam.sample(b, inputs)).float().clamp(0, 1)
        labels = inputs.reward_cond
        m = evaluate_samples(x.cpu(), labels.cpu())
        rec = {f"eval_{k}": float(v) for k, v in m.items() if k != "n"}
        rec["eval_ink"] = float(x.mean())
        for name, v in self.score(x, labels).items():
            rec[f"eval_{name}"] = float(v[torch.isfinite(v)].mean())
        return rec

    def _log_eval(self, log: MetricsLog) -> dict[str, float]:
        ev = self.evaluate()
        if ev:
            k = self.state.global_step
            log.write({"step": k, "samples_seen": k * self.recipe.rl.batch_size, **ev})
        return ev

    # ---- state ------------------------------------------------------------------------------------------------------
    def load(self, tensors: dict, state: dict) -> None:
        super().load(tensors, state)
        self.state = GRPOState.from_tensors(state["trainer"])

    def resume(self) -> Path:
        """Load the newest valid checkpoint of ``out``. A change of model/data/generator/critic, of
        ``rl.regularizer`` or of ``rl.init`` is refused (one-line :class:`~dmdr.train.checkpoint.CheckpointError`)."""
        import yaml

        def apply(path, tensors, state, recipe_yaml):
            old = validate_recipe(yaml.safe_load(recipe_yaml), str(path / "recipe.yaml"))
            a, b = old.model_dump(mode="json"), self.recipe.model_dump(mode="json")
            blocking = [s for s in ("task", "model", "data", "generator", "critic") if a.get(s) != b.get(s)]
            if a.get("task") == "grpo" and (a["rl"]["regularizer"], a["rl"]["init"]) != (b["rl"]["regularizer"],
                                                                                         b["rl"]["init"]):
                blocking.append("rl.regularizer/rl.init")
            if blocking:
                raise ckpt.CheckpointError(f"cannot resume: the recipe changed in fields that matter: "
                                           f"{', '.join(blocking)}; revert them or start a new run with --force")
            self.load(tensors, state)

        path, *_ = ckpt.load_latest_valid(self.out / "checkpoints", warn=self._warn, apply=apply)
        truncate_metrics(self.out / "metrics.jsonl", self.state.global_step, warn=self._warn)
        save_recipe(self.recipe, self.out / "recipe.yaml")   # written only once resume succeeded
        self._saved_step = self.state.global_step
        return path

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def run(self, *, resume: bool = False, max_iterations: int | None = None) -> dict[str, Any]:
        """Train for ``recipe.iterations`` (capped by ``max_iterations``); returns a summary. SIGINT/SIGTERM save a
        checkpoint and return early."""
        r, out, rl = self.recipe, self.out, self.recipe.rl
        if resume:
            p = self.resume()
            self.console(f"resumed from {p} (iteration {self.state.global_step})")
        else:
            self.console(f"grpo: start from {self.init_source}; regularizer {rl.regularizer}; {rl.batch_size} "
                         f"samples/iteration ({rl.batch_size // rl.group_size} groups × {rl.group_size})")
        total = min(r.iterations, max_iterations) if max_iterations else r.iterations
        out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(out / "metrics.jsonl")
        log.tracker = self.tracker
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        progress = make_progress(r.logging.progress)
        from dmdr.train import startup

        pending = startup.take_pending()  # a signal that came while models were built / the checkpoint loaded
        if pending is not None:
            self._stop_signal = pending
        fixed = self._fixed_sample_inputs()
        summary: dict[str, Any] = {"interrupted": False}
        acc: dict[str, list[float]] = defaultdict(list)
        try:
            with (progress or _Null()) as p:
                task = p.add_task(f"grpo ({rl.regularizer})", total=total, completed=self.state.global_step,
                                  info="", rate="") if progress else None
                t_start, k0 = time.time(), self.state.global_step
                if r.eval.every and self.state.global_step == 0:
                    self._log_eval(log)
                self._monitor_step(self.state.global_step, log)  # step 0, or a resumed step not yet measured
                while self.state.global_step < total:
                    for k_, v in self.iteration().items():
                        acc[k_].append(v)
                    k = self.state.global_step
                    if k % r.logging.log_every == 0 or k == total:
                        rate = (k - k0) / max(time.time() - t_start, 1e-9)
                        rec = {"step": k, "samples_seen": k * rl.batch_size, "ppo_updates": self.state.ppo_updates,
                               "critic_updates": self.state.inner_step, "reward_nan_total": self.state.reward_nan_total,
                               "skipped_updates": self.state.skipped_updates,
                               "lr_gen": self.opt_gen.param_groups[0]["lr"], "iterations_per_s": rate}
                        rec.update({k_: _nanmean(v) for k_, v in acc.items() if v})
                        log.write(rec)
                        acc.clear()
                        if task is not None:
                            p.update(task, completed=k, rate=f"{rate:.2f} it/s",
                                     info=f"reward {rec.get('reward_mean', float('nan')):.3g} "
                                          f"clip {rec.get('clip_fraction', float('nan')):.2f}"
                                          + (f" | {self.monitor.bank.status()}" if self.monitor is not None else ""))
                    if r.eval.every and k % r.eval.every == 0 and k < total:
                        self._log_eval(log)
                    if r.logging.sample_every and k % r.logging.sample_every == 0:
                        self.sample_grid(out / "samples" / f"step-{k:07d}.png", fixed)
                    self._monitor_step(k, log)  # before the checkpoint, so that it holds this measurement
                    if r.logging.checkpoint_every and k % r.logging.checkpoint_every == 0:
                        self.save()
                    if self._stop_signal is not None:
                        self.save()
                        summary["interrupted"] = True
                        self.console(f"stopped by signal {self._stop_signal}; checkpoint saved at iteration {k}")
                        return summary
            # still under our handlers: a signal during the final save, eval or export is absorbed (no 143)
            self.save()
            self._check_some_update_applied()
            self._check_student_finite()
            ev = self._log_eval(log)
            if ev:
                summary["eval"] = ev
            summary["final_grid"] = self.sample_grid(out / "samples" / "final.png", fixed)
            summary["student"] = self.export_student(out / "student.safetensors")
        finally:
            for s_, h in old_handlers.items():
                signal.signal(s_, h)
            if self.tracker is not None:
                self.tracker.close()
        return summary


def rollout_clean(roll: TensorDictBase) -> torch.Tensor:
    """The critic's samples from a policy rollout (``rl.critic_reuse_rollout``): per trajectory the generator's
    clean x̂0 at one of its N steps, drawn uniformly, exactly what :meth:`DMDRTrainer.backward_simulation` returns.

    Not ``roll["sample"]``: that final state carries the last step's exploration noise (``rl.final_std``), so a
    critic trained on it models p_θ * N(0, final_std²) while the DMD gradient is taken at the clean x̂0 — a fake
    score biased at low τ. roll: ``x0_per_step`` (B, N, ...). Returns (B, ...), detached."""
    x0s = roll[K.X0_PER_STEP].detach()
    idx = sample_grid_steps(x0s.shape[0], x0s.shape[1], device=x0s.device)
    return x0s[torch.arange(x0s.shape[0], device=x0s.device), idx].float()


def _run_task(run: Path) -> str | None:
    """``task`` of the run directory ``run`` (from its recipe.yaml), or None when it has no readable one."""
    from dmdr import safe_yaml

    try:
        data = safe_yaml.load((run / "recipe.yaml").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data.get("task") if isinstance(data, dict) else None


def _nanmean(v: list[float]) -> float:
    good = [x for x in v if not math.isnan(x)]
    return sum(good) / len(good) if good else float("nan")


def run_grpo(recipe: GRPORecipe, out: Path, device: torch.device, *, resume: bool = False, smoke: bool = False,
             console=print) -> dict[str, Any]:
    """The ``task: grpo`` runner of :mod:`dmdr.train.tasks`. ``smoke`` shrinks the recipe (:func:`smoke_recipe`)
    and rewrites ``out/recipe.yaml`` to match. Returns the named output files (+ ``interrupted``)."""
    from dmdr.train.distributed import require_single_process

    require_single_process("task: grpo")   # _step does not average gradients over ranks
    if smoke:
        recipe = smoke_recipe(recipe)
        if not resume:   # on resume, GRPOTrainer.resume writes it once the checkpoint is accepted
            save_recipe(recipe, out / "recipe.yaml")
    summary = GRPOTrainer(recipe, out, device, console=console).run(resume=resume)
    return {"student": summary.get("student"), "sample grid": summary.get("final_grid"),
            "interrupted": summary.get("interrupted", False)}


__all__ = ["GRPOState", "GRPOTrainer", "RewardShapeError", "check_reward", "run_grpo", "smoke_recipe"]
