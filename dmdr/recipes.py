"""The recipe schema (pydantic v2): a recipe is data, validated once, written next to every run.

A recipe is one of four tasks, told apart by ``task``:

* ``teacher``    — train the class-conditional flow-matching teacher (digits);
* ``classifier`` — train the digits classifier used as a reward / the fixed evaluation network;
* ``dmdr``       — distil a few-step student with DMD, then DMD + RL, in ordered ``stages``;
* ``grpo``       — policy-gradient RL (GRPO/PPO through torchrl) with DMD, KL or no regulariser (docs/rl.md).

Unknown keys are refused everywhere (``extra="forbid"``). :func:`load_recipe` reads YAML, applies type-checked
``key=value`` overrides (dotted paths, list indices allowed: ``stages.1.rewards.0.weight=0.1``) and validates;
every problem becomes a :class:`RecipeError` whose one-line message names the field path and the fix.
"""
from __future__ import annotations

from dmdr.errors import UserError
from dmdr import safe_yaml

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from dmdr.monitors import Monitors


class RecipeError(UserError):
    """A recipe (file, YAML, override or field) is invalid. ``str(e)`` is a one-line message with the fix."""


class Strict(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated, floats must be finite (no
    ``.inf``/``.nan``) and a number field refuses a bool (``steps: true`` is not 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_int(cls, data):
        if isinstance(data, dict):
            for name, f in cls.model_fields.items():
                if isinstance(data.get(name), bool) and f.annotation in (int, int | None, float, float | None):
                    kind = "an integer" if f.annotation in (int, int | None) else "a number"
                    raise ValueError(f"{name}: expected {kind}, got the boolean {data[name]!r}")
        return data


MAX_THREADS = 1024   # runtime.threads above this is refused at validation (torch crashes on 100000)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # a run name becomes a directory name: no '/', no '..'


# ---- shared sections -----------------------------------------------------------------------------------------------
class FSDPOptions(Strict):
    """FSDP2 options (``runtime.distributed: fsdp2``; docs/distributed.md)."""

    param_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dtype of the all-gathered weights in compute; auto = each weight's own dtype")
    reduce_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dtype of the gradient reduce-scatter; auto = the gathered weight's dtype")


class Runtime(Strict):
    """Where and how a run executes: device, autocast precision, CPU threads, data parallelism."""

    device: Literal["auto", "cpu", "cuda"] = "auto"     # auto: CUDA when present
    precision: Literal["fp32", "bf16"] = "fp32"         # bf16 = autocast for forwards; master weights stay fp32
    threads: int = Field(0, ge=0, le=MAX_THREADS, description="torch CPU threads; 0 = leave torch's default")
    distributed: Literal["auto", "none", "ddp", "fsdp2"] = Field(
        "auto", description="data parallelism under torchrun; auto = DMDR_DISTRIBUTED env, else ddp (docs/reliability.md)")
    fsdp: FSDPOptions = Field(default_factory=FSDPOptions, description="runtime.distributed: fsdp2 only")


class Logging(Strict):
    """Metrics, sample-grid and checkpoint cadence (in generator steps)."""

    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=0, description="generator steps between PNG sample grids; 0 = only at the end")
    checkpoint_every: int = Field(100, ge=0, description="generator steps between checkpoints; 0 = only at stage ends")
    keep_last: int = Field(3, ge=1)
    progress: bool = True
    tracker: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="also log scalars to TensorBoard or W&B (offline); metrics.jsonl stays the record")


class LoRA(Strict):
    """A LoRA adapter: rank r, alpha α (scaling α/r) and the target module names."""

    rank: int = Field(32, ge=1)
    alpha: float = Field(32.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])


class Model(Strict):
    """The teacher and its family (tiny digits DiT, SD3/SD3.5, SDXL) and how it is loaded."""

    family: Literal["tiny", "sd3", "sdxl", "flux1", "flux2", "wan", "zimage"] = "tiny"
    teacher: str = Field("builtin:digits-teacher", description="teacher weights: a .safetensors file, a diffusers "
                         "directory, or builtin:digits-teacher")
    # tiny DiT architecture (used by task=teacher to build a new model; loaded models carry their own config)
    dim: int = Field(128, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    patch: int = Field(2, ge=1)
    mlp_ratio: float = Field(2.0, gt=0)
    t_min: float = Field(0.0, ge=0, lt=0.1)
    gradient_checkpointing: bool = False
    # text-to-image families (sd3 / sdxl): a local diffusers directory; nothing is downloaded
    path: str | None = Field(None, description="local diffusers model directory (sd3/sdxl families)")
    smoke: bool = Field(False, description="swap in tiny random-weight modules of the same family (offline smoke)")
    resolution: int = Field(512, ge=8, description="image side in pixels (T2I families)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="weights dtype of the frozen base (T2I)")
    offload_idle: bool = Field(False, description="move the VAE and text encoders to CPU when idle (T2I)")
    max_sequence_length: int = Field(128, ge=1, description="T5 tokens for SD3 prompts")
    config: Literal["sd3-medium", "sd35-large", "sdxl-base", "flux1-dev", "flux2-klein-4b",
                    "flux2-klein-9b", "wan2.1-t2v-1.3b", "z-image"] | None = Field(
        None, description="shipped real configuration (dmdr/models/configs): --smoke stand-ins and the --dry-run "
        "memory estimate; default: sd3-medium for sd3, sdxl-base for sdxl")
    vae_gradient_checkpointing: bool = Field(False, description="activation checkpointing in the VAE decoder used "
                                             "for reward decoding (T2I)")
    reward_vae: str | None = Field(None, description="local AutoencoderTiny folder (e.g. taesdxl) that decodes "
                                   "images for the rewards instead of the full VAE (T2I; official SDXL set-up)")
    guidance: float | None = Field(None, gt=0, description="FLUX.1-dev guidance-embedding input of the student, "
                                   "the fake and the real score (one pass; default 3.5, FluxPipeline's)")
    # video families (wan): frames per clip, the clip width (None: square), frames the rewards decode
    num_frames: int = Field(1, ge=1, description="video: frames per clip (Wan: 4k + 1, e.g. 81)")
    width: int | None = Field(None, ge=8, description="video: frame width in pixels (None: model.resolution)")
    reward_frames: int | None = Field(None, ge=1, description="video: decode only the first k latent frames "
                                      "(the first 4(k-1)+1 frames; exact, the VAE is causal) for the rewards; "
                                      "None: every frame")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.dim % self.heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.heads ({self.heads})")
        return self


class Data(Strict):
    """Conditioning data: digits classes, or a prompt file for text-to-image families."""

    dataset: Literal["digits", "prompts"] = "digits"
    prompts: str | None = Field(None, description="prompt file (.txt one per line, or .jsonl) for T2I families")
    num_classes: int = Field(10, ge=1)


class Seeded(Strict):
    """Fields every recipe has: name, seed, runtime, logging."""

    name: str = Field("run", pattern=NAME_PATTERN, description="letters, digits, '.', '_', '-'; at most 100 "
                      "characters, first a letter or digit (it names the run directory)")
    seed: int = 0
    runtime: Runtime = Field(default_factory=Runtime)
    logging: Logging = Field(default_factory=Logging)


# ---- task: teacher ---------------------------------------------------------------------------------------------------
class TeacherTraining(Strict):
    """Flow-matching teacher training (dmdr/train/teacher.py)."""

    steps: int = Field(4000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    cond_dropout: float = Field(0.1, ge=0, le=1, description="probability of the null class (enables CFG)")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    warmup: int = Field(100, ge=0)


class TeacherRecipe(Seeded):
    """``task: teacher`` — train the class-conditional digits teacher."""

    task: Literal["teacher"]
    model: Model = Field(default_factory=Model)
    data: Data = Field(default_factory=Data)
    train: TeacherTraining = Field(default_factory=TeacherTraining)
    eval_steps: int = Field(50, ge=1, description="Euler steps for the sample grids")
    eval_cfg: float = Field(1.0, ge=0)


# ---- task: classifier ------------------------------------------------------------------------------------------------
class ClassifierTraining(Strict):
    """Digits classifier training (dmdr/train/classifier.py)."""

    kind: Literal["reward", "features", "features_mlp"] = "reward"
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    split: Literal["all", "train", "half_a", "half_b"] = "train"
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augment: bool = True


class ClassifierRecipe(Seeded):
    """``task: classifier`` — the reward network or the fixed evaluation network."""

    task: Literal["classifier"]
    train: ClassifierTraining = Field(default_factory=ClassifierTraining)


# ---- task: dmdr ------------------------------------------------------------------------------------------------------
class Generator(Strict):
    """The few-step student: N, grid shift S (method.md §2.1), backward simulation (§2.2), LoRA or full."""

    steps: int = Field(1, ge=1, description="N: few-step student step count")
    shift: float = Field(1.0, gt=0, description="grid shift S (method.md §2.1)")
    backward_sim: Literal["ode", "sde"] = "sde"
    lora: LoRA | None = Field(None, description="None = full fine-tune (SiT/digits); a LoRA = adapter on the base")
    init: str | None = Field(None, description="initial weights of a full-weights generator (lora: null): T2I, a "
                             "UNet/transformer state dict (.safetensors/.bin) or diffusers model folder (official "
                             "SDXL: DMD2's ODE-pretrained 1-step UNet); digits, a tiny-DiT .safetensors")


class Critic(Strict):
    """The fake score: teacher + LoRA, evaluated at scale λ_f (method.md §1, §2.3); ``lora: null`` = a full
    trainable copy of the teacher (DMD2; digits only), viewed at θ_t + λ(θ_c − θ_t) (dmdr/models/full_critic.py)."""

    lora: LoRA | None = Field(default_factory=LoRA, description="None = full critic copy (DMD2, tiny family only)")
    scale_fake: float = Field(2.0, gt=0, description="λ_f: the critic LoRA scale for the fake score")


class DynaDG(Strict):
    """Dynamic Distribution Guidance: λ_r(k) = λ_r0 · ½(1 + cos πk/K) (method.md §2.6)."""

    enabled: bool = True
    scale0: float = Field(0.75, ge=0, description="λ_r0: initial real-score LoRA scale")
    horizon: int = Field(1000, ge=0, description="K_dyn in generator steps (global)")


class DynaRS(Strict):
    """Dynamic Renoise Sampling: τ ~ Beta(α(k), β(k)) annealed to U(0,1) (method.md §2.7)."""

    enabled: bool = True
    alpha0: float = Field(4.0, gt=0)
    beta0: float = Field(1.5, gt=0)
    horizon: int = Field(1000, ge=0)


class Decoupled(Strict):
    """Decoupled DMD: the CFG-augmentation (CA) term at its own renoise level τ_CA, the distribution-matching term at
    the DMD τ (method.md §6.3; dmdr/losses/decoupled_dmd.py; docs/decoupled_dmd.md)."""

    enabled: bool = False
    ca_tau: Literal["below_gen", "annealed", "independent"] = Field(
        "below_gen", description="τ_CA: below_gen = U(0, s) below the generator time s (Decoupled DMD); annealed = "
        "DynaRS annealed from DMDR's schedule to below_gen (DMDR issue #4); independent = the DMD sampler, redrawn")


class DMD(Strict):
    """The DMD term: real-score CFG with jitter, DynaDG, DynaRS, τ floor, weight (method.md §2.4-2.7)."""

    cfg: float = Field(1.0, ge=0, description="real-score CFG; > 1 enables CFG with jitter (method.md §2.5)")
    cfg_jitter: float = Field(0.5, ge=0)
    dynadg: DynaDG = Field(default_factory=DynaDG)
    dynars: DynaRS = Field(default_factory=DynaRS)
    tau_floor: float = Field(0.0, ge=0, lt=1, description="lower clamp of τ (official: 0)")
    tau_ceiling: float = Field(1.0, gt=0, le=1, description="upper bound of τ (DMD2: 0.98; official DMDR: 1)")
    weight: float = Field(1.0, ge=0, description="weight of the DMD term in the generator loss")
    decoupled: Decoupled = Field(default_factory=Decoupled)

    @model_validator(mode="after")
    def _tau_range(self):
        if self.tau_floor >= self.tau_ceiling:
            raise ValueError(f"dmd.tau_floor={self.tau_floor} must be below dmd.tau_ceiling={self.tau_ceiling}")
        if self.decoupled.enabled and self.cfg <= 1.0:
            raise ValueError(f"dmd.decoupled needs real-score CFG: its CFG-augmentation term is (w - 1)(cond - uncond), "
                             f"zero at dmd.cfg={self.cfg}; set dmd.cfg > 1 (e.g. dmd.cfg=2.0) or dmd.decoupled.enabled=false")
        if self.decoupled.enabled and self.decoupled.ca_tau == "annealed" and not self.dynars.enabled:
            raise ValueError("dmd.decoupled.ca_tau=annealed anneals DynaRS into the Decoupled DMD schedule and needs "
                             "dmd.dynars.enabled=true; use dmd.decoupled.ca_tau=below_gen without DynaRS")
        return self


class RewardTerm(Strict):
    """One reward of a stage: registry name, weight w, optional hinge h, kwargs for the reward factory."""

    name: str
    weight: float = Field(..., ge=0)
    hinge: float | None = None
    per_element: bool = Field(False, description="divide by C·H·W to match the DMD loss scale (method.md §5.2.12)")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Optim(Strict):
    """Two AdamW optimisers (generator, critic), clipping, the TTUR ratio (method.md §2.8), optional EMA."""

    lr_gen: float = Field(2e-5, gt=0)
    lr_critic: float = Field(2e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay_gen: float = Field(0.01, ge=0)
    weight_decay_critic: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ratio: int = Field(5, ge=1, description="TTUR: critic updates per generator update")
    ema_decay: float | None = Field(None, ge=0, lt=1, description="generator EMA (official: none)")


class Stage(Strict):
    """One stage: generator steps, batch size, learning-rate overrides and its rewards (method.md §1)."""

    name: str
    steps: int = Field(..., ge=1, description="generator updates in this stage")
    batch_size: int = Field(64, ge=1)
    lr_gen: float | None = Field(None, gt=0)
    lr_critic: float | None = Field(None, gt=0)
    rewards: list[RewardTerm] = Field(default_factory=list)


class StudentRecipe(Seeded):
    """What every student-training task shares: the teacher, data, student, critic, DMD term and optimisers."""

    model: Model = Field(default_factory=Model)
    data: Data = Field(default_factory=Data)
    generator: Generator = Field(default_factory=Generator)
    critic: Critic = Field(default_factory=Critic)
    dmd: DMD = Field(default_factory=DMD)
    optim: Optim = Field(default_factory=Optim)
    sample_classes: int = Field(10, ge=1, description="rows of the PNG sample grids")
    monitors: Monitors = Field(default_factory=Monitors, description="reward-hacking monitors (docs/monitors.md)")


class DMDRRecipe(StudentRecipe):
    """``task: dmdr`` — ordered stages of DMD (+ rewards); state carries over between stages."""

    task: Literal["dmdr"]
    stages: list[Stage] = Field(..., min_length=1)

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, v: list[Stage]):
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return v


# ---- task: grpo (policy-gradient RL with a DMD / KL / no regulariser; docs/rl.md) -----------------------------------
class PGReward(Strict):
    name: str = Field(..., description="a registered reward; always called as a black box (no gradient)")
    weight: float = Field(1.0, ge=0, description="weight in the mix, applied after per-reward normalisation")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class AdvantageConfig(Strict):
    baseline: Literal["group", "group_mean", "batch"] = Field(
        "group", description="group: (r-mean_g)/(std_g+eps) (GRPO); group_mean: r-mean_g; batch: batch z-score")
    normalize_rewards: Literal["none", "batch", "group"] = Field(
        "batch", description="per-reward normalisation before the weighted mix of several rewards")
    clip: float | None = Field(5.0, gt=0, description="clamp |advantage| (None: no clipping; with baseline group "
                               "and std group, |A| <= sqrt(G-1), so a clip >= sqrt(G-1) never binds)")
    eps: float = Field(1e-4, gt=0, description="added to the std (Flow-GRPO: 1e-4)")
    std: Literal["group", "global"] = Field(
        "group", description="baseline group: divide by the group's std, or by the whole batch's (Flow-GRPO's "
                             "global_std option)")


class RL(Strict):
    rewards: list[PGReward] = Field(..., min_length=1)
    batch_size: int = Field(64, ge=2, description="trajectories per iteration = groups × group_size")
    group_size: int = Field(8, ge=2, description="G: samples per class id / prompt (GRPO group)")
    minibatch_size: int = Field(32, ge=1, description="transitions per PPO minibatch")
    ppo_epochs: int = Field(2, ge=1, description="passes over the iteration's transitions")
    clip_epsilon: float = Field(0.2, description="PPO clip range, > 0")
    log_prob_reduce: Literal["mean", "sum"] = Field(
        "mean", description="mean: per-dimension log-prob (Flow-GRPO); sum: the true density (docs/rl.md)")
    final_std: float = Field(0.1, gt=0, description="exploration std of the last step (pixels in [-1,1])")
    noise_scale: float = Field(1.0, gt=0, description="multiplies the sde std t_{i+1} of non-final steps")
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    sde: Literal["dmd2", "flow_grpo"] = Field(
        "dmd2", description="form of the non-final stochastic steps: dmd2 renoise, or Flow-GRPO's SDE (docs/rl.md)")
    regularizer: Literal["dmd", "dmd_adv", "dmd_ca_adv", "kl", "none"] = Field(
        "dmd", description="dmd; dmd_adv: DMD weighted per sample by B·softmax(A/T); dmd_ca_adv: DM term + A × "
                           "CFG-augmentation term (needs dmd.cfg > 1); kl; none")
    critic_updates: int | None = Field(
        None, ge=0, description="critic updates per policy update for the dmd regularisers (null: optim.ratio)")
    critic_reuse_rollout: bool = Field(
        False, description="train the critic on the rollout's final samples instead of a fresh backward simulation")
    reg_weight: float = Field(1.0, ge=0, description="weight of the DMD term (regularizer: dmd)")
    kl_weight: float = Field(0.01, ge=0, description="weight of KL(π_θ‖π_ref) (regularizer: kl)")
    advantage_weighted_dmd: bool = Field(False, description="weight the DMD term per sample by B·softmax(A/T)")
    adw_temperature: float = Field(1.0, gt=0, description="T of advantage_weighted_dmd")
    init: str | None = Field(None, description="student to start from: a DMDR run directory (student + critic) or "
                             "a student .safetensors, one checkpoint RUN/checkpoints/step-N (its EMA, else generator, + critic); "
                             "null = the teacher (teacher-initialised student)")

    @field_validator("clip_epsilon")
    @classmethod
    def _clip_positive(cls, v: float):
        if not v > 0:
            raise ValueError(f"rl.clip_epsilon must be > 0 (the PPO trust region; typical 0.1-0.3), got {v}")
        return v

    @model_validator(mode="after")
    def _groups_divide(self):
        if self.batch_size % self.group_size:
            raise ValueError(f"rl.group_size ({self.group_size}) must divide rl.batch_size ({self.batch_size}): "
                             f"the batch is groups × group_size")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rl.rewards names must be unique (each is logged as reward_<name>), got {names}")
        if self.advantage_weighted_dmd and self.regularizer not in ("dmd", "dmd_adv"):
            raise ValueError("rl.advantage_weighted_dmd needs rl.regularizer: dmd")
        return self


class EvalConfig(Strict):
    every: int = Field(0, ge=0, description="iterations between evaluations; 0 = only at the end")
    samples: int = Field(1000, ge=0, description="samples for FID/precision/recall (digits only); 0 = no eval")


class GRPORecipe(StudentRecipe):
    """``task: grpo`` — policy-gradient RL with a DMD / KL / no regulariser (docs/rl.md)."""

    task: Literal["grpo"]
    rl: RL
    iterations: int = Field(200, ge=1, description="RL iterations (rollout → rewards → PPO epochs)")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _minibatch_divides(self):
        n = self.rl.batch_size * self.generator.steps
        if n % self.rl.minibatch_size:
            raise ValueError(f"rl.minibatch_size ({self.rl.minibatch_size}) must divide the transitions per "
                             f"iteration, rl.batch_size × generator.steps = {n}")
        return self


AnyRecipe = Annotated[Union[TeacherRecipe, ClassifierRecipe, DMDRRecipe, GRPORecipe], Field(discriminator="task")]
_ADAPTER = TypeAdapter(AnyRecipe)
TASKS = ("teacher", "classifier", "dmdr", "grpo")


# ---- loading, overrides, errors ----------------------------------------------------------------------------------------
def _fmt_loc(loc: tuple, tagged: bool) -> str:
    parts = list(loc[1:] if tagged and loc else loc)
    return ".".join(str(p) for p in parts) or "(top level)"


def format_validation_error(e: ValidationError, source: str) -> str:
    """One line: ``<source>: <field.path>: <problem> — fix: ...`` (plus the count of further problems)."""
    errs = e.errors()
    first = errs[0]
    loc = _fmt_loc(tuple(first["loc"]), tagged=bool(first["loc"]) and first["loc"][0] in TASKS)
    typ, msg = first["type"], first["msg"]
    if typ == "extra_forbidden":
        fix = "remove it or check its spelling (`dmdr recipes show <recipe>` lists the fields)"
        msg = "unknown key"
    elif typ == "missing":
        fix = "add it to the recipe"
        msg = "field required"
    elif typ in ("union_tag_invalid", "union_tag_not_found"):
        loc = "task"
        fix = f"set task to one of: {', '.join(TASKS)}"
    else:
        got = first.get("input")
        shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."  # one readable line
        fix = f"got {shown}" if not isinstance(got, (dict, list)) else "check the value"
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return f"{source}: {loc}: {msg}; {fix}{more}"


def _set_path(data: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise RecipeError(f"{source}: --set {dotted}: {'.'.join(keys[:i]) or 'value'} has {len(node)} "
                                  f"entries; use an index 0..{len(node) - 1}")
            k = int(k)
            if last:
                node[k] = value
            else:
                node = node[k]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                if node.get(k) is None:
                    node[k] = {}
                node = node[k]
        else:
            raise RecipeError(f"{source}: --set {dotted}: {'.'.join(keys[:i])} is a value, not a section")


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=1e-4"`` → ``("a.b", 1e-4)``; the value is parsed as YAML (so lists and nulls work)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set optim.lr_gen=1e-5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"--set {item!r}: empty key; expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_recipe_dict(path: str | Path) -> dict:
    """Read a YAML file into a dict; missing, unreadable, empty, non-YAML or non-mapping files → RecipeError."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe file not found: {p}; pass a path to a .yaml recipe (see `dmdr recipes list`)")
    if p.is_dir():
        raise RecipeError(f"{p} is a directory; pass a .yaml recipe file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {p}: {e.__class__.__name__}; pass a readable UTF-8 YAML file") from None
    try:
        data = safe_yaml.load(text)
    except safe_yaml.YAMLLimitError as e:
        raise RecipeError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{p}: not valid YAML{where}; fix the syntax (indentation, colons, quotes)") from None
    if data is None:
        raise RecipeError(f"{p}: the recipe is empty; it needs at least `task:` (one of {', '.join(TASKS)})")
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe must be a YAML mapping of fields, got a {type(data).__name__}")
    return data


def validate_recipe(data: dict, source: str = "recipe"):
    """Validate a dict into a recipe model (one of the task classes)."""
    if "task" not in data:
        raise RecipeError(f"{source}: task: field required; set task to one of: {', '.join(TASKS)}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None):
    """Read a YAML recipe, apply ``key=value`` overrides, validate. Raises :class:`RecipeError`."""
    data = read_recipe_dict(path)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(data, key, value, str(path))
    return validate_recipe(data, str(path))


def recipe_to_yaml(recipe: BaseModel) -> str:
    """The resolved recipe (every default filled in) as YAML; :func:`load_recipe` reads it back equal."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def save_recipe(recipe: BaseModel, path: str | Path) -> None:
    """Write :func:`recipe_to_yaml` to ``path``."""
    Path(path).write_text(recipe_to_yaml(recipe))


def recipes_dir() -> Path:
    """The repository's ``recipes/`` folder (next to the package in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path as given, or the name of a shipped recipe (``digits`` → ``recipes/digits.yaml``)."""
    p = Path(name_or_path)
    if p.exists() or p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        return p
    cand = recipes_dir() / f"{name_or_path}.yaml"
    return cand if cand.exists() else p
