import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from dmdr.recipes import GRPORecipe, RecipeError, load_recipe, recipe_to_yaml, recipes_dir, validate_recipe
from dmdr.rewards.base import Reward, RewardSpec, build_reward, register_reward

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RECIPE = recipes_dir() / "digits-grpo.yaml"


# ---------------------------------------------------------------- test rewards (black boxes)
class _Probe(Reward):
    spec = RewardSpec(name="probe", differentiable=True, reads_labels=True)
    calls: list = []

    def __init__(self, mode="ok", device="cpu"):
        super().__init__()
        self.mode = mode

    def score(self, images, cond):
        _Probe.calls.append((torch.is_grad_enabled(), images.requires_grad))
        r = images.flatten(1).mean(1)
        if self.mode == "nan":
            r = r.clone()
            r[:3] = float("nan")
        return r

    def forward(self, images, cond=None):   # skips the base-class shape check on purpose
        r = self.score(images, cond)
        return r[:, None].expand(-1, 2) if self.mode == "badshape" else r


@register_reward("test_grpo_probe")
def _build_probe(mode="ok", device="cpu"):
    return _Probe(mode, device)


@pytest.fixture(scope="module")
def teacher(shared_tiny_teacher):
    import peft  # noqa: F401  (the LoRA helpers import peft: a one-off 3-10 s, paid here rather than in a test)
    import torchrl.objectives  # noqa: F401

    return shared_tiny_teacher


def _recipe(teacher, *over):
    return load_recipe(RECIPE, [f"model.teacher={teacher}", "runtime.device=cpu", "rl.batch_size=8", "rl.group_size=4",
                                "rl.minibatch_size=4", "optim.ratio=1", "iterations=2", "eval.samples=0",
                                "logging.progress=false", "logging.log_every=1", "logging.sample_every=0",
                                "logging.checkpoint_every=0", "critic.lora.rank=4", "critic.lora.alpha=4",
                                "monitors.every=0", *over])


def _metrics(out: Path):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- recipe
def test_shipped_recipe_validates_and_round_trips():
    r = load_recipe(RECIPE)
    assert isinstance(r, GRPORecipe) and r.rl.regularizer == "dmd" and r.rl.batch_size % r.rl.group_size == 0
    assert r.rl.rewards[0].name == "digits_hackable"
    again = validate_recipe(yaml.safe_load(recipe_to_yaml(r)))
    assert again == r


@pytest.mark.parametrize("override, field", [
    ("rl.group_size=3", "rl.group_size (3) must divide rl.batch_size (64)"),
    ("rl.clip_epsilon=0", "rl.clip_epsilon must be > 0"),
    ("rl.minibatch_size=48", "rl.minibatch_size (48) must divide"),
    ("rl.advantage_weighted_dmd=true", "needs rl.regularizer: dmd"),
    ("rl.group_size=1", "rl.group_size"),
])
def test_recipe_validation_is_one_line(override, field):
    over = [override] + (["rl.regularizer=kl"] if "advantage_weighted" in override else [])
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPE, over)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_cli_validate_exits_2_on_a_bad_grpo_recipe(tmp_path):
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    data = yaml.safe_load(RECIPE.read_text())
    data["rl"]["group_size"] = 5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["recipes", "validate", str(RECIPE), str(bad)])
    assert res.exit_code == 2
    assert "rl.group_size (5) must divide rl.batch_size (64)" in res.output


# ---------------------------------------------------------------- the hackable reward
def test_hackable_reward_pays_for_ink():
    from dmdr.data.digits import load_digits_tensors, to_unit

    r = build_reward("digits_hackable")
    assert r.spec.differentiable and r.spec.reads_labels
    x, y = load_digits_tensors("holdout")
    x = to_unit(x)[:64]
    y = y[:64]
    c = r.components(x, y)
    assert torch.allclose(r(x, y), c["prob"] + 2.0 * c["ink"])
    white = torch.ones_like(x)
    assert r(white, y).mean() > r(x, y).mean()                     # degrading the digits raises the reward ...
    clf = build_reward("digits_classifier", mode="prob")
    assert clf(white, y).mean() < clf(x, y).mean()                 # ... while the classifier says they got worse
    assert torch.allclose(build_reward("digits_hackable", ink_weight=0.0)(x, y), clf(x, y))


# ---------------------------------------------------------------- the trainer
@pytest.mark.parametrize("reg", ["dmd", "kl", "none"])
def test_trainer_runs_and_logs_each_regulariser(teacher, tmp_path, reg):
    from dmdr.train.grpo import GRPOTrainer

    r = _recipe(teacher, f"rl.regularizer={reg}")
    summary = GRPOTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a: None).run()
    recs = _metrics(tmp_path)
    assert [m["step"] for m in recs] == [1, 2]
    m = recs[-1]
    for k in ("reward_digits_hackable", "reward_mean", "reward_nan_count", "clip_fraction", "kl_approx", "ESS",
              "loss_objective", "time_rollout", "time_reward", "time_ppo", "time_dmd", "samples_seen"):
        assert k in m, k
    assert m["ppo_updates"] == 2 * r.rl.ppo_epochs * (8 * r.generator.steps // 4)
    if reg == "dmd":
        assert "loss_dmd" in m and "loss_fake_score" in m and m["critic_updates"] == m["ppo_updates"] and "grad_norm_dmd" in m
    if reg == "kl":
        assert "loss_kl" in m and "kl_ref" in m and m["kl_ref"] >= 0 and "loss_dmd" not in m
    if reg == "none":
        assert "loss_kl" not in m and "loss_dmd" not in m and m["time_dmd"] == 0
    assert summary["student"].exists() and (tmp_path / "checkpoints" / "step-0000002" / "COMPLETE").exists()
    from dmdr.sampling import load_student

    model, info = load_student(tmp_path)
    assert info.steps == r.generator.steps


def test_nan_rewards_are_counted_skipped_and_never_averaged(teacher, tmp_path):
    from dmdr.train.grpo import GRPOTrainer

    r = _recipe(teacher, "rl.regularizer=none", "iterations=1",
                "rl.rewards=[{name: test_grpo_probe, weight: 1.0, kwargs: {mode: nan}}]")
    with pytest.warns(RuntimeWarning, match="3 of 8 samples got a NaN"):
        GRPOTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a: None).run()
    m = _metrics(tmp_path)[0]
    assert m["reward_nan_count"] == 3 and m["reward_nan_total"] == 3
    assert m["reward_mean"] == m["reward_mean"] and m["reward_test_grpo_probe"] == m["reward_test_grpo_probe"]
    assert m["skipped_updates"] == 0


def test_reward_is_a_black_box_and_bad_shapes_are_errors(teacher, tmp_path):
    from dmdr.train.grpo import GRPOTrainer, RewardShapeError

    _Probe.calls.clear()
    r = _recipe(teacher, "rl.regularizer=none", "iterations=1", "rl.rewards=[{name: test_grpo_probe}]")
    GRPOTrainer(r, tmp_path / "ok", torch.device("cpu"), console=lambda *a: None).run()
    assert _Probe.calls and all(c == (False, False) for c in _Probe.calls)   # no_grad, detached images
    r = _recipe(teacher, "rl.regularizer=none", "iterations=1",
                "rl.rewards=[{name: test_grpo_probe, kwargs: {mode: badshape}}]")
    with pytest.raises(RewardShapeError, match=r"reward 'test_grpo_probe' returned shape \(8, 2\); expected \(8,\)"):
        GRPOTrainer(r, tmp_path / "bad", torch.device("cpu"), console=lambda *a: None).run()


def test_init_from_a_run_resume_and_eval(teacher, tmp_path):
    """Start from another run (student + critic), evaluate, checkpoint, then resume for one more iteration."""
    from dmdr.train.grpo import GRPOTrainer

    first = tmp_path / "first"
    GRPOTrainer(_recipe(teacher, "iterations=1"), first, torch.device("cpu"), console=lambda *a: None).run()
    r = _recipe(teacher, f"rl.init={first}", "iterations=1", "eval.samples=20", "eval.every=1",
                "logging.checkpoint_every=1")
    out = tmp_path / "second"
    tr = GRPOTrainer(r, out, torch.device("cpu"), console=lambda *a: None)
    assert "student.safetensors" in tr.init_source and "critic from step-0000001" in tr.init_source
    from safetensors.torch import load_file

    student = load_file(str(first / "student.safetensors"))
    assert all(torch.equal(student[k], v) for k, v in tr.bundle.generator_module.state_dict().items())
    tr.run()
    evals = [m for m in _metrics(out) if "eval_fid" in m]
    assert [m["step"] for m in evals] == [0, 1]
    assert {"eval_precision", "eval_recall", "eval_accuracy", "eval_ink", "eval_reward_digits_hackable"} <= set(evals[0])
    r2 = _recipe(teacher, f"rl.init={first}", "iterations=2", "eval.samples=0", "logging.checkpoint_every=1")
    tr2 = GRPOTrainer(r2, out, torch.device("cpu"), console=lambda *a: None)
    tr2.run(resume=True)
    assert tr2.state.global_step == 2 and tr2.state.ppo_updates == 2 * 2 * 2
    assert [m["step"] for m in _metrics(out) if "reward_mean" in m] == [1, 2]


def test_init_from_one_checkpoint(teacher, tmp_path):
    """rl.init = RUN/checkpoints/step-N loads that checkpoint's EMA (else generator) and its critic; a damaged checkpoint is
    refused in one line."""
    from safetensors.torch import load_file

    from dmdr.train.checkpoint import CheckpointError
    from dmdr.train.grpo import GRPOTrainer

    first = tmp_path / "first"
    GRPOTrainer(_recipe(teacher, "iterations=2", "logging.checkpoint_every=1", "logging.keep_last=5"), first,
                torch.device("cpu"), console=lambda *a: None).run()
    ck = first / "checkpoints" / "step-0000001"
    tr = GRPOTrainer(_recipe(teacher, f"rl.init={ck}", "iterations=1"), tmp_path / "second", torch.device("cpu"),
                     console=lambda *a: None)
    assert tr.init_source == f"{ck} (and its critic)"
    gen = load_file(str(ck / "generator.safetensors"))
    assert all(torch.equal(gen[k], v) for k, v in tr.bundle.generator_module.state_dict().items())
    later = load_file(str(first / "checkpoints" / "step-0000002" / "generator.safetensors"))
    assert any(not torch.equal(later[k], gen[k]) for k in gen)   # step 1, not the newest, was loaded
    critic = load_file(str(ck / "critic.safetensors"))
    got = tr.bundle.critic_state()
    assert critic.keys() == got.keys() and all(torch.equal(critic[k], got[k]) for k in critic)
    (ck / "recipe.yaml").write_text((ck / "recipe.yaml").read_text().replace("task: grpo", "task: classifier"))
    with pytest.raises(CheckpointError, match=r"step-0000001: recipe.yaml does not match its checksum"):
        GRPOTrainer(_recipe(teacher, f"rl.init={ck}", "iterations=1"), tmp_path / "third", torch.device("cpu"),
                    console=lambda *a: None)


def test_smoke_runner(teacher, tmp_path):
    from dmdr.train.tasks import run_task

    r = load_recipe(RECIPE, [f"model.teacher={teacher}", "runtime.device=cpu", "logging.progress=false",
                             "critic.lora.rank=4"])
    files = run_task(r, tmp_path, torch.device("cpu"), smoke=True, console=lambda *a: None)
    assert files["student"].exists() and files["sample grid"].exists() and not files["interrupted"]
    saved = load_recipe(tmp_path / "recipe.yaml")
    assert saved.iterations == 2 and saved.rl.batch_size == 2 * saved.rl.group_size
