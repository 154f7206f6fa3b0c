"""The DMDR trainer: two-time-scale DMD (+ rewards) over ordered stages (method.md §2.8, §2.12).

Per inner iteration i (all on the same backward-simulated batch):

1. backward simulation: the student's N-step rollout (ode/sde) under ``no_grad``; per sample a grid step
   s ~ U{t_0..t_{N-1}} and its clean sample x_clean (:func:`dmdr.samplers.clean_targets`);
2. critic update: τ_c ~ DynaRS(k), L_fake on renoise(x_clean, τ_c) with the critic at scale λ_f;
3. every ``ratio``-th iteration a generator update: x̂0 = G(renoise(x_clean, s), s); L = w_dmd L_DMD (real score
   = base + λ_r(k) LoRA with CFG jitter, fake = base + λ_f LoRA, τ ~ DynaRS(k)) + Σ_j L_reward_j(x̂0).

Differences from the official loop, chosen deliberately (docs/method.md): the generator is updated after
exactly ``ratio`` critic updates (``(i+1) % ratio == 0``; the official ``i % ratio == 0 and i > 0`` adds one extra
critic step at the very start); k, i and the stage are explicit state, saved in every checkpoint; stage 2 carries
the generator, critic and both optimiser states over and only changes learning rates and rewards.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

from dmdr import keys as K
from dmdr.losses import dmd_loss, fake_score_batch, fake_score_loss, merge_terms, reward_loss, scalars, total_loss
from dmdr.recipes import DMDRRecipe, recipe_to_yaml, validate_recipe
from dmdr.samplers import clean_targets, few_step_rollout
from dmdr.schedules import dynadg_scale, dynars_beta_params, sample_dynars, sample_grid_steps, sample_uniform
from dmdr.scores import distribution_matching_targets, sample_cfg_scale
from dmdr.errors import UserError
from dmdr.train import checkpoint as ckpt
from dmdr.train import distributed
from dmdr.families.base import Bundle
from dmdr.families.registry import get_family
from dmdr.train.runtime import (MetricsLog, autocast, make_progress, rng_neutral, rng_state, seed_everything,
                                set_rng_state, truncate_metrics)


class TrainingStopped(UserError, RuntimeError):
    """A run stopped on purpose (numerical-fault streak); the last good checkpoint is intact.

    A :class:`~dmdr.errors.UserError`, so the CLI prints it as one line and exits with code 2."""


class MonitorStopped(TrainingStopped):
    """A monitor with ``action: stop`` (or a rollback past ``max_rollbacks``) ended the run; a checkpoint was saved."""


@dataclass
class DMDRState:
    """Everything besides weights and optimisers that a resume needs (STYLE.md §4)."""

    stage: int = 0           # index of the current stage
    stage_step: int = 0      # generator updates done in the current stage
    global_step: int = 0     # k: generator updates so far (drives DynaDG/DynaRS)
    inner_step: int = 0      # i: critic updates so far; the update-ratio phase is i % ratio
    skipped_updates: int = 0  # non-finite losses/gradients skipped so far
    nonfinite_streak: int = 0  # the longer of the two current streaks below
    gen_nonfinite_streak: int = 0     # consecutive skipped generator updates
    critic_nonfinite_streak: int = 0  # consecutive skipped critic updates

    def as_tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.int64) for k, v in asdict(self).items()}

    @classmethod
    def from_tensors(cls, d: dict[str, Any]) -> "DMDRState":
        return cls(**{k: int(d[k]) for k in asdict(cls()) if k in d})


BLOCKING_SECTIONS = ("model", "data", "generator", "critic")


def recipe_changes(old: DMDRRecipe, new: DMDRRecipe) -> tuple[list[str], list[str]]:
    """(blocking, harmless) field paths that differ. Blocking = model/data/generator/critic shapes or the number
    of stages; everything else (logging, learning rates, steps, rewards, runtime) is allowed on resume."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            p = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flat(v, p + "."))
            else:
                out[p] = v
        return out
    a, b = flat(old.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    blocking = [k for k in changed if k.split(".")[0] in BLOCKING_SECTIONS]
    if len(old.stages) != len(new.stages):
        blocking.append("stages (count)")
    return blocking, [k for k in changed if k not in blocking]


class DMDRTrainer:
    """Holds the bundle, optimisers and :class:`DMDRState`; :meth:`run` trains, :meth:`iteration` does one step."""

    def __init__(self, recipe: DMDRRecipe, out: Path | None, device: torch.device, *, console=print,
                 bundle: Bundle | None = None):
        self.recipe, self.out, self.device, self.console = recipe, out, device, console
        self.family = bundle.family if bundle is not None else get_family(recipe)  # all family questions go here
        self.dist = distributed.setup(recipe)  # inactive (all no-ops) in a single process
        if not self.dist.is_main:
            self.console = lambda *a, **k: None
        self.bundle = bundle or self.family.build(recipe, device)
        if self.dist.sharded:  # FSDP2: shard per block before the optimisers see the parameters
            from dmdr.train import fsdp

            fsdp.shard_bundle(self.bundle, recipe, self.dist, device)
        if self.dist.active:  # identical replicas, then per-rank data/noise streams
            self.dist.broadcast_(self.bundle.generator_params + self.bundle.critic_params)
            seed_everything(recipe.seed + self.dist.rank)
        o = recipe.optim
        self.opt_gen = torch.optim.AdamW(self.bundle.generator_params, lr=o.lr_gen, betas=o.betas,
                                         weight_decay=o.weight_decay_gen)
        self.opt_critic = torch.optim.AdamW(self.bundle.critic_params, lr=o.lr_critic, betas=o.betas,
                                            weight_decay=o.weight_decay_critic)
        self.ema: dict[str, torch.Tensor] | None = None
        if o.ema_decay is not None:
            self.ema = {k: v.detach().clone().float() for k, v in self.bundle.generator_state().items()}
        self.state = DMDRState()
        self.grid = self.bundle.grid.to(device=device, dtype=torch.float32)  # the family's (SDXL one-step: 0.399)
        self._rewards: dict[str, torch.nn.Module] = {}
        self._stop_signal: int | None = None
        self.max_nonfinite_streak = 20
        self._acc: dict[str, list[float]] = defaultdict(list)  # scalars since the last metrics line (checkpointed)
        self._saved_step: int | None = None
        self._saved_inner: int | None = None   # inner step of the last save (a stop may land between gen steps)
        self._last_update = "critic"
        self._gen_tried = self._gen_ok = 0     # generator updates in this process: attempted / applied
        from dmdr.train.monitoring import MonitorHook

        self.monitor = MonitorHook.create(self)  # None unless recipe.monitors is on (docs/monitors.md)
        from dmdr.train.trackers import make_tracker

        self.tracker = make_tracker(recipe, out) if self.dist.is_main else None  # logging.tracker (optional)

    # ---- schedules ------------------------------------------------------------------------------------------------
    def lambda_real(self) -> float:
        dg = self.recipe.dmd.dynadg
        return dynadg_scale(self.state.global_step, dg.horizon, dg.scale0) if dg.enabled else 0.0

    def sample_tau(self, B: int) -> torch.Tensor:
        rs, d = self.recipe.dmd.dynars, self.recipe.dmd
        if rs.enabled:
            tau = sample_dynars(B, self.state.global_step, rs.horizon, rs.alpha0, rs.beta0,
                                t_floor=d.tau_floor, device=self.device)
            return tau.clamp(max=d.tau_ceiling) if d.tau_ceiling < 1.0 else tau
        return sample_uniform(B, max(0.001, d.tau_floor), d.tau_ceiling, device=self.device)

    def reward(self, name: str, kwargs: dict) -> torch.nn.Module:
        key = f"{name}:{sorted(kwargs.items())}"
        if key not in self._rewards:
            self._rewards[key] = self.family.reward(self.bundle, name, {"device": str(self.device), **kwargs}
                                                    ).to(self.device)
        return self._rewards[key]

    def set_stage_lrs(self) -> None:
        st, o = self.recipe.stages[self.state.stage], self.recipe.optim
        scale = self.monitor.bank.lr_scale if self.monitor is not None else 1.0  # lowered by monitor rollbacks
        for g in self.opt_gen.param_groups:
            g["lr"] = (st.lr_gen or o.lr_gen) * scale
        for g in self.opt_critic.param_groups:
            g["lr"] = (st.lr_critic or o.lr_critic) * scale

    # ---- one inner iteration ---------------------------------------------------------------------------------------
    def _apply(self, loss: torch.Tensor, params: list, opt: torch.optim.Optimizer) -> tuple[bool, float]:
        """backward, (average gradients over ranks), clip, step. A non-finite loss or gradient norm skips the
        step and returns ``(False, nan)``; under torchrun every rank takes the same decision."""
        self._last_update = "gen" if opt is self.opt_gen else "critic"
        opt.zero_grad(set_to_none=True)
        finite = self.dist.agree_finite(bool(torch.isfinite(loss)))  # FSDP2: backward is collective
        if finite:
            loss.backward()
        if self.dist.active:
            self.dist.average_grads_(params, poison=not finite)
        elif not finite:
            return False, float("nan")
        return self._clip_and_step(params, opt)

    def _clip_and_step(self, params: list, opt: torch.optim.Optimizer) -> tuple[bool, float]:
        """Clip to ``optim.grad_clip`` and step; a non-finite gradient norm skips the step. Returns (ok, norm)."""
        gnorm = self.dist.clip_grad_norm_(params, self.recipe.optim.grad_clip)
        if not torch.isfinite(gnorm):
            opt.zero_grad(set_to_none=True)
            return False, float("nan")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return True, float(gnorm)

    def _count(self, ok: bool) -> None:
        """Count a skipped update; a streak of ``max_nonfinite_streak`` skipped updates of one kind (generator or
        critic) stops the run with :class:`TrainingStopped` (checkpoints already written stay as they are)."""
        st, which = self.state, f"{self._last_update}_nonfinite_streak"
        if self._last_update == "gen":
            self._gen_tried += 1
            self._gen_ok += int(ok)
        if ok:
            setattr(st, which, 0)
        else:
            st.skipped_updates += 1
            setattr(st, which, getattr(st, which) + 1)
        st.nonfinite_streak = max(st.gen_nonfinite_streak, st.critic_nonfinite_streak)
        if st.nonfinite_streak >= self.max_nonfinite_streak:
            kind = "generator" if st.gen_nonfinite_streak >= st.critic_nonfinite_streak else "critic"
            done = ckpt.list_checkpoints(self.out / "checkpoints") if self.out is not None else []
            last = f"resume from the last good checkpoint {done[-1]}" if done else "no checkpoint was written yet"
            raise TrainingStopped(f"{st.nonfinite_streak} non-finite {kind} losses/gradients in a row at generator "
                                  f"step {st.global_step} ({st.skipped_updates} updates skipped in all); lower the "
                                  f"learning rates or use fp32; {last}")

    def backward_simulation(self, B: int, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's N-step rollout under ``no_grad`` (method.md §2.2): per sample a grid step
        s ~ U{t_0..t_{N-1}} and its clean sample. Returns (x_clean (B,C,H,W), s (B,))."""
        r, b, dev = self.recipe, self.bundle, self.device
        noise = torch.randn(B, *b.sample_shape, device=dev)
        b.generator_module.eval()
        with autocast(dev, r.runtime.precision):
            roll = few_step_rollout(b.generator, noise, self.grid, cond, mode=r.generator.backward_sim)
        clean = clean_targets(roll, r.generator.backward_sim).float()
        idx = sample_grid_steps(B, clean.shape[1], device=dev)
        return clean[torch.arange(B, device=dev), idx], self.grid[idx]

    def critic_update(self, x_clean: torch.Tensor, cond) -> dict[str, float]:
        """One critic step (method.md §2.3): L_fake on renoise(sg(x_clean), τ_c), τ_c ~ DynaRS(k), critic at λ_f."""
        r, b = self.recipe, self.bundle
        fake = b.critic_view(r.critic.scale_fake)
        tau_c = self.sample_tau(x_clean.shape[0])
        with autocast(self.device, r.runtime.precision):
            c_terms = fake_score_loss(fake_score_batch(fake, x_clean, tau_c, torch.randn_like(x_clean), cond))
        ok, gn = self._apply(total_loss(c_terms), b.critic_params, self.opt_critic)
        self._count(ok)
        self.state.inner_step += 1
        return {**scalars(c_terms), "critic_grad_norm": gn}

    def distribution_matching(self, x0_pred: torch.Tensor, cond, uncond, *, cfg_scale: float,
                              tau: torch.Tensor) -> TensorDict:
        """Both scores at renoise(x̂0, τ) (method.md §2.4-2.6): real = base + λ_r(k) LoRA with CFG ``cfg_scale``,
        fake = base + λ_f LoRA. Returns TensorDict(x0_pred, x0_real, x0_fake) ready for :func:`dmd_loss`."""
        r, b = self.recipe, self.bundle
        real = b.critic_view(self.lambda_real())
        fake = b.critic_view(r.critic.scale_fake)
        with autocast(self.device, r.runtime.precision):
            targets = distribution_matching_targets(x0_pred, real, fake, cond, tau=tau, noise=torch.randn_like(x0_pred),
                                                    uncond=uncond if cfg_scale > 1.0 else None, cfg_scale=cfg_scale)
        return TensorDict({K.X0_PRED: x0_pred, K.X0_REAL: targets[K.X0_REAL].float(),
                           K.X0_FAKE: targets[K.X0_FAKE].float()}, batch_size=[x0_pred.shape[0]])

    def iteration(self) -> dict[str, float]:
        """One critic update, plus a generator update when the update-ratio phase says so. Returns scalars."""
        r, b, st = self.recipe, self.bundle, self.state
        stage = r.stages[st.stage]
        cond, uncond, rcond = b.sample_cond(stage.batch_size)
        x_clean, s = self.backward_simulation(stage.batch_size, cond)           # 1. backward simulation
        out = self.critic_update(x_clean, cond)                                # 2. critic update
        if st.inner_step % r.optim.ratio == 0:                                 # 3. generator, every `ratio`
            out.update(self.generator_update(x_clean, s, cond, uncond, rcond, stage))
        return out

    def generator_update(self, x_clean, s, cond, uncond, rcond, stage) -> dict[str, float]:
        r, b, st, dev = self.recipe, self.bundle, self.state, self.device
        path = b.path
        b.generator_module.train()
        lam_r = self.lambda_real()
        w = sample_cfg_scale(r.dmd.cfg, r.dmd.cfg_jitter)
        tau = self.sample_tau(x_clean.shape[0])
        with autocast(dev, r.runtime.precision):
            x_s = path.renoise(x_clean, s, torch.randn_like(x_clean))
            x0_pred = path.to_x0(x_s, s, b.generator(x_s, s, cond)).float()
        if r.dmd.decoupled.enabled:  # CA and DM at separate renoise levels (method.md §6.3, losses/decoupled_dmd.py)
            from dmdr.losses.decoupled_dmd import decoupled_dmd_terms

            td = TensorDict({K.X0_PRED: x0_pred}, batch_size=[x0_pred.shape[0]])
            terms = [decoupled_dmd_terms(x0_pred, s, cond, uncond, real=b.critic_view(lam_r), fake=b.critic_view(
                r.critic.scale_fake), cfg_scale=w, tau_dm=tau, step=st.global_step, dmd=r.dmd, tau_sampler=self.sample_tau,
                autocast=lambda: autocast(dev, r.runtime.precision), t_first=float(self.grid[0]))]
        else:
            td = self.distribution_matching(x0_pred, cond, uncond, cfg_scale=w, tau=tau)
            terms = [dmd_loss(td)]
        terms[0]["loss_dmd"] = terms[0]["loss_dmd"] * r.dmd.weight
        if stage.rewards:
            images = b.decode(x0_pred)
            per_el = math.prod(x0_pred.shape[1:])
            for term in stage.rewards:
                td[K.reward_key(term.name)] = self.reward(term.name, term.kwargs)(images, rcond)
                terms.append(reward_loss(td, term.name, weight=term.weight, hinge=term.hinge,
                                         per_element=per_el if term.per_element else None))
        g_terms = merge_terms(*terms)
        ok, gn = self._apply(total_loss(g_terms), b.generator_params, self.opt_gen)
        self._count(ok)
        self.opt_critic.zero_grad(set_to_none=True)
        if ok and self.ema is not None:
            self._ema_update()
        st.global_step += 1
        st.stage_step += 1
        a, bb = dynars_beta_params(st.global_step - 1, r.dmd.dynars.horizon, r.dmd.dynars.alpha0, r.dmd.dynars.beta0) \
            if r.dmd.dynars.enabled else (1.0, 1.0)
        return {**scalars(g_terms), "gen_grad_norm": gn, "lambda_real": lam_r, "cfg": w,
                "dynars_alpha": a, "dynars_beta": bb, "gen_update": 1.0}

    @torch.no_grad()
    def _ema_update(self) -> None:
        d = self.recipe.optim.ema_decay
        for k, v in self.bundle.generator_state().items():
            self.ema[k].lerp_(v.float(), 1 - d)

    # ---- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, both optimisers, every RNG state and the not-yet-logged metric scalars (weights_only-safe)."""
        return {"trainer": self.state.as_tensors(), "opt_gen": self.opt_gen.state_dict(),
                "opt_critic": self.opt_critic.state_dict(), "rng": rng_state(),
                "metrics_acc": {k: torch.tensor(v, dtype=torch.float64) for k, v in self._acc.items()},
                "world_size": torch.tensor(self.dist.world_size),
                **({"monitors": self.monitor.bank.state_dict()} if self.monitor is not None else {}),
                **({"data": data} if (data := self.family.data_state(self.bundle)) is not None else {})}

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        t = {"generator": self.bundle.generator_state(), "critic": self.bundle.critic_state()}
        if self.ema is not None:
            t["ema"] = self.ema
        return t

    def load(self, tensors: dict, state: dict) -> None:
        bad = non_finite(tensors)
        if bad:  # a checkpoint with NaN weights (even with matching checksums) is never resumed from
            raise ValueError(f"non-finite weights in {', '.join(bad)}")
        self.bundle.load_generator_state(tensors["generator"])
        self.bundle.load_critic_state(tensors["critic"])
        if self.ema is not None:
            self.ema = ({k: v.float().to(self.device) for k, v in tensors["ema"].items()} if "ema" in tensors else
                        {k: v.detach().clone().float() for k, v in self.bundle.generator_state().items()})
        self.opt_gen.load_state_dict(state["opt_gen"])
        self.opt_critic.load_state_dict(state["opt_critic"])
        self.state = DMDRState.from_tensors(state["trainer"])
        if "data" in state:  # the family's data stream (T2I prompt order) resumes exactly
            self.family.load_data_state(self.bundle, state["data"])
        if self.monitor is not None and "monitors" in state:
            self.monitor.bank.load_state_dict(state["monitors"])
        self._acc = defaultdict(list, {k: [float(x) for x in v.tolist()]
                                       for k, v in state.get("metrics_acc", {}).items()})
        ranks, saved_world = state.get("rng_ranks"), int(state.get("world_size", 1))
        if not self.dist.active:
            set_rng_state(state["rng"])
        elif ranks is not None and len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank])
        else:  # world size changed: fresh, distinct per-rank streams (the run goes on, not bitwise)
            seed_everything(self.recipe.seed + self.dist.rank + 1_000_003 * self.state.global_step)
            self.console(f"warning: the checkpoint was written by {saved_world} process(es), this run has "
                         f"{self.dist.world_size}; per-rank RNG streams restart from a derived seed")

    def save(self) -> Path | None:
        """Checkpoint at the current generator step (every rank calls it; rank 0 writes; barrier after).

        Refuses (with a warning, returning None) when a weight is non-finite, so the last checkpoint on disk
        is always a good one."""
        if self.dist.sharded:  # FSDP2: DCP shards from every rank (dmdr/train/fsdp.py)
            from dmdr.train import fsdp

            return fsdp.save(self)
        k = self.state.global_step
        tensors = self.tensors()
        bad = non_finite(tensors)
        if bad:
            self._warn(f"warning: not saving step {k}: non-finite weights in {', '.join(bad)}")
            return None
        if not self._student_outputs_finite():
            self._warn(f"warning: not saving step {k}: the student's samples are non-finite (weights blew up)")
            return None
        state = self.state_dict()
        if self.dist.active:
            state["rng_ranks"] = self.dist.gather_tensor_dicts(state["rng"])
        path = self.out / "checkpoints" / f"step-{k:07d}"
        if self.dist.is_main:
            path = ckpt.write_checkpoint(self.out / "checkpoints", k, tensors=tensors, state=state,
                                         recipe_yaml=recipe_to_yaml(self.recipe),
                                         keep_last=self.recipe.logging.keep_last)
        self.dist.barrier()
        self._saved_step, self._saved_inner = k, self.state.inner_step
        return path

    def resume(self) -> Path:
        """Load the newest valid checkpoint of ``out`` (damaged ones are reported and skipped).

        A recipe change in a field that matters (model, data, generator, critic, number of stages) raises
        :class:`~dmdr.train.checkpoint.CheckpointError` naming the fields; other changes are reported."""
        import yaml

        harmless: list[str] = []

        def apply(path, tensors, state, recipe_yaml):
            old = validate_recipe(yaml.safe_load(recipe_yaml), str(path / "recipe.yaml"))
            blocking, changed = recipe_changes(old, self.recipe)
            if blocking:
                raise ckpt.CheckpointError(f"cannot resume: the recipe changed in fields that matter: "
                                           f"{', '.join(blocking[:6])}; revert them or start a new run with --force")
            from dmdr.train import fsdp

            if self.dist.sharded or fsdp.is_dcp_checkpoint(path):  # FSDP2 / DCP checkpoints reshard on load
                fsdp.load(self, path, tensors, state)
            else:
                self.load(tensors, state)
            harmless[:] = changed

        path, *_ = ckpt.load_latest_valid(self.out / "checkpoints", warn=self._warn, apply=apply)
        self.dist.same_int(self.state.global_step, "the resumed generator step")
        if harmless:
            self.console(f"resuming with changed fields: {', '.join(harmless[:8])}"
                         f"{f' (+{len(harmless) - 8} more)' if len(harmless) > 8 else ''}")
        if self.dist.is_main:
            truncate_metrics(self.out / "metrics.jsonl", self.state.global_step, warn=self._warn)
            (self.out / "recipe.yaml").write_text(recipe_to_yaml(self.recipe))  # written only once resume succeeded
        self._saved_step, self._saved_inner = self.state.global_step, self.state.inner_step
        return path

    def _warn(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, file=sys.stderr, flush=True)

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _monitor_step(self, k: int, log: MetricsLog) -> None:
        """Measure the monitors when due (docs/monitors.md); a ``stop`` alarm saves a checkpoint and raises
        :class:`MonitorStopped`. Every rank measures the same fixed set, so every rank takes the same action."""
        if self.monitor is None or not self.monitor.due(k) or self.monitor.bank.last_step == k:
            return
        alarm = self.monitor.check(k, log.write, self.console)
        if alarm is not None:
            if self._saved_step != k:
                self.save()
            raise MonitorStopped(f"{alarm.message}; run stopped, checkpoint saved at step {k} in "
                                 f"{self.out / 'checkpoints'}")

    def run(self, *, resume: bool = False, max_steps_per_stage: int | None = None,
            stop_at: int | None = None) -> dict[str, Any]:
        """Train all stages; returns a summary.

        SIGINT/SIGTERM (or reaching generator step ``stop_at``) save a checkpoint at the current generator step
        and return early with ``summary["interrupted"] = True``; ``run(resume=True)`` then continues exactly
        where it stopped (same losses as a run that never stopped). Under torchrun every rank runs this loop
        in lockstep; only rank 0 writes metrics, samples, checkpoints and the exported student."""
        r, out, main = self.recipe, self.out, self.dist.is_main
        if resume:
            p = self.resume()
            self.console(f"resumed from {p} (stage {self.state.stage}, generator step {self.state.global_step})")
        log = MetricsLog(out / "metrics.jsonl", enabled=main)
        log.tracker = self.tracker
        old_handlers = ({s_: signal.signal(s_, self._on_signal) for s_ in (signal.SIGINT, signal.SIGTERM)}
                        if threading.current_thread() is threading.main_thread() else {})
        progress = make_progress(r.logging.progress and main)
        from dmdr.train import startup

        pending = startup.take_pending()  # a signal that came while models were built / the checkpoint loaded
        if pending is not None:
            self._stop_signal = pending
        fixed = self._fixed_sample_inputs()
        summary: dict[str, Any] = {"interrupted": False}
        acc = self._acc
        try:
            with (progress or _Null()) as p:
                self._monitor_step(self.state.global_step, log)  # step 0, or a resumed step not yet measured
                while self.state.stage < len(r.stages):
                    stage = r.stages[self.state.stage]
                    steps = min(stage.steps, max_steps_per_stage) if max_steps_per_stage else stage.steps
                    self.set_stage_lrs()
                    with rng_neutral():  # building a reward draws init weights: keep it off the training streams
                        for term in stage.rewards:
                            self.reward(term.name, term.kwargs)
                    task = p.add_task(f"stage {self.state.stage + 1}/{len(r.stages)} {stage.name}", total=steps,
                                      completed=self.state.stage_step, info="", rate="") if progress else None
                    t0, k0 = time.time(), self.state.stage_step
                    while self.state.stage_step < steps:
                        before = self.state.global_step
                        for k_, v in self.iteration().items():
                            acc[k_].append(v)
                        if self.state.global_step == before:
                            # a critic-only iteration: stop here too, so the stop latency is one inner iteration
                            if self.dist.any(self._stop_signal is not None):
                                return self._stopped(summary, before)
                            continue
                        k = self.state.global_step
                        if k % r.logging.log_every == 0 or self.state.stage_step == steps:
                            rate = (self.state.stage_step - k0) / max(time.time() - t0, 1e-9)
                            rec = {"stage": stage.name, "step": k, "stage_step": self.state.stage_step,
                                   "inner_step": self.state.inner_step, "skipped_updates": self.state.skipped_updates,
                                   "lr_gen": self.opt_gen.param_groups[0]["lr"],
                                   "lr_critic": self.opt_critic.param_groups[0]["lr"], "gen_steps_per_s": rate}
                            rec.update(self.dist.mean_scalars(
                                {k_: sum(v) / len(v) for k_, v in acc.items() if v and k_ != "gen_update"}))
                            log.write(rec)
                            acc.clear()
                            if task is not None:
                                info = " ".join(f"{n[5:]} {rec[n]:.3g}" for n in rec if n.startswith("loss_"))
                                info += f" | {self.monitor.bank.status()}" if self.monitor is not None else ""
                                p.update(task, completed=self.state.stage_step, info=info, rate=f"{rate:.2f} it/s")
                        if (main or self.dist.sharded) and r.logging.sample_every and k % r.logging.sample_every == 0:
                            self.sample_grid(out / "samples" / f"step-{k:07d}.png", fixed)
                        self._monitor_step(k, log)  # before the checkpoint, so that it holds this measurement
                        if r.logging.checkpoint_every and k % r.logging.checkpoint_every == 0:
                            self.save()
                        if self.dist.any(self._stop_signal is not None or (stop_at is not None and k >= stop_at)):
                            return self._stopped(summary, k, stop_at)
                    self.state.stage += 1
                    self.state.stage_step = 0
                    self.save()
            # still under our handlers: a signal during the final grid or export is absorbed, not a kill (143)
            self._check_some_update_applied()
            self._check_student_finite()
            if main or self.dist.sharded:  # FSDP2: sampling and export gather shards on every rank
                summary["final_grid"] = self.sample_grid(out / "samples" / "final.png", fixed)
                summary["student"] = self.export_student(out / "student.safetensors")
        finally:
            for s_, h in old_handlers.items():
                signal.signal(s_, h)
            if self.tracker is not None:
                self.tracker.close()
        return summary

    def _stopped(self, summary: dict, k: int, stop_at: int | None = None) -> dict:
        """Save at the current position (unless just saved) and mark the summary interrupted."""
        if (self._saved_step, self._saved_inner) != (k, self.state.inner_step):
            self.save()
        summary["interrupted"] = True
        why = (f"signal {self._stop_signal}" if self._stop_signal is not None else
               f"stop_at={stop_at}" if stop_at is not None and k >= stop_at else "a signal on another rank")
        self.console(f"stopped by {why}; checkpoint saved at generator step {k}")
        return summary

    def _student_outputs_finite(self) -> bool:
        """Finite weights can still be garbage (a huge step leaves 1e30s that overflow): the family's check that the
        student maps a few fixed noises to finite samples (:meth:`~dmdr.families.base.Family.student_finite`)."""
        return self.family.student_finite(self.bundle)

    def _check_student_finite(self) -> None:
        """Refuse to export a student whose samples are non-finite (:meth:`_student_outputs_finite`)."""
        if not self._student_outputs_finite():
            done = ckpt.list_checkpoints(self.out / "checkpoints") if self.out is not None else []
            raise TrainingStopped(f"the student produces non-finite samples (its weights blew up); nothing exported"
                                  f"{f', the last checkpoint is {done[-1]}' if done else ''}; lower the learning "
                                  f"rates or use fp32")

    def _check_some_update_applied(self) -> None:
        """A run whose generator updates in this process were all skipped (non-finite) has nothing to export."""
        if self._gen_tried and not self._gen_ok:
            done = ckpt.list_checkpoints(self.out / "checkpoints") if self.out is not None else []
            raise TrainingStopped(f"none of the {self._gen_tried} generator updates of this run was applied (every "
                                  f"loss or gradient was non-finite); nothing exported; "
                                  f"{f'the last good checkpoint is {done[-1]}' if done else 'no checkpoint written'}; "
                                  f"lower the learning rates or use fp32")

    # ---- samples and export -----------------------------------------------------------------------------------------
    def _fixed_sample_inputs(self):
        return self.family.sample_inputs(self.bundle, "grid")

    @torch.no_grad()
    def sample_grid(self, path: Path, fixed) -> Path | None:
        """The student's samples of the family's fixed grid inputs (its own rollout, no CFG), written by the family.
        Under FSDP2 every rank samples (the sharded forward needs all ranks) and rank 0 writes."""
        x = self.family.sample(self.bundle, fixed)
        if not self.dist.is_main:
            return None
        return self.family.save_samples(self.bundle, self.family.render(self.bundle, x), fixed, path)

    def export_student(self, path: Path) -> Path | None:
        """Write the student (EMA if enabled) through the family (:meth:`~dmdr.families.base.Family.export`):
        digits a standalone tiny-DiT file with its grid in the metadata, text-to-image the generator LoRA as a
        diffusers LoRA folder ``path.parent / "student_lora"`` (or the full network). Under FSDP2 the shards are
        gathered on every rank and rank 0 writes."""
        if self.dist.sharded:
            from dmdr.train import fsdp

            return fsdp.export_student(self, path)
        bad = non_finite({"generator": self.bundle.generator_state(), **({"ema": self.ema} if self.ema else {})})
        if bad:  # keep the last good student on disk; say so and exit non-zero
            done = ckpt.list_checkpoints(self.out / "checkpoints") if self.out is not None else []
            raise TrainingStopped(f"the student has non-finite weights ({', '.join(bad)}); nothing exported, "
                                  f"{path if path.exists() else 'no earlier student'} left as it was; "
                                  f"{f'the last good checkpoint is {done[-1]}' if done else 'no checkpoint written'}; "
                                  f"lower the learning rates or use fp32")
        return self.family.export(self.bundle, path, state=self.ema, global_step=self.state.global_step)


def non_finite(tensors: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Names (sorted) of the state dicts in ``tensors`` holding a NaN/Inf floating-point value."""
    return sorted(n for n, sd in tensors.items()
                  if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in sd.values()))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
