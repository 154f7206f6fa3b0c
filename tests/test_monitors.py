"""Reward-hacking monitors: alarm rules, recipe validation, measurement on a fixed set, and the three actions
(warn, stop, rollback) inside the trainers."""
import json
import math
import os

import pytest
import torch

from dmdr.monitors import MonitorBank, MonitorCheck, Monitors, degradation, CheckState
from dmdr.recipes import RecipeError, load_recipe, recipes_dir

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
GRPO = recipes_dir() / "digits-grpo.yaml"
DIGITS = recipes_dir() / "digits.yaml"


def _bank(*checks, **kw):
    return MonitorBank(Monitors(every=1, checks=list(checks), **kw))


# ---- rules ---------------------------------------------------------------------------------------------------
def test_fid_alarm_is_relative_to_the_best_value():
    b = _bank(MonitorCheck(kind="fid", threshold=0.5, action="stop"))
    assert b.update(0, {"fid": 4.0}) == ([], ["fid"])
    assert b.update(1, {"fid": 2.0}) == ([], ["fid"])           # new best
    assert b.update(2, {"fid": 2.9})[0] == []                    # +45 % < 50 %
    alarms, _ = b.update(3, {"fid": 3.2})                        # +60 %
    assert [(a.check, a.action, a.step) for a in alarms] == [("fid", "stop", 3)]
    assert alarms[0].degradation == pytest.approx(0.6)
    assert "fid" in b.status() and b.status().startswith("ALARM")


def test_drift_level_and_absolute_rules():
    st = CheckState(ref=0.3)
    assert degradation("brightness", 0.36, st) == pytest.approx(0.2)
    assert degradation("brightness", 0.24, st) == pytest.approx(0.2)
    assert degradation("reward_saturation", 0.4, CheckState()) == 0.4
    assert degradation("heldout_reward", 0.7, CheckState(best=0.9)) == pytest.approx(0.2)   # absolute drop
    assert degradation("recall", 0.6, CheckState(best=0.8)) == pytest.approx(0.25)
    b = _bank(MonitorCheck(kind="brightness", threshold=0.1))
    b.update(0, {"brightness": 0.3})
    assert b.states["brightness"].ref == 0.3
    assert b.update(1, {"brightness": 0.32})[0] == []
    assert [a.action for a in b.update(2, {"brightness": 0.4})[0]] == ["warn"]


def test_start_patience_nan_and_state_round_trip():
    b = _bank(MonitorCheck(kind="diversity", threshold=0.1, start=10, patience=2))
    assert b.update(0, {"diversity": 5.0}) == ([], [])           # before start: recorded, no best
    assert math.isnan(b.states["diversity"].best)
    b.update(10, {"diversity": 1.0})
    assert b.update(11, {"diversity": 0.5})[0] == []             # first violation: patience 2
    assert len(b.update(12, {"diversity": 0.5})[0]) == 1
    assert len(b.update(13, {"diversity": float("nan")})[0]) == 1  # NaN is a violation
    again = _bank(MonitorCheck(kind="diversity", threshold=0.1, start=10, patience=2))
    again.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert again.states["diversity"].best == 1.0 and again.states["diversity"].streak == b.states["diversity"].streak


def test_rollback_turns_into_stop_after_max_rollbacks():
    b = _bank(MonitorCheck(kind="fid", threshold=0.1, action="rollback"), rollback={"max_rollbacks": 1})
    b.update(0, {"fid": 1.0})
    assert b.update(1, {"fid": 2.0})[0][0].action == "rollback"
    b.rollbacks = 1
    assert b.update(2, {"fid": 2.0})[0][0].action == "stop"


@pytest.mark.parametrize("over, msg", [
    (["monitors.checks=[{kind: fid, threshold: 0.5}, {kind: fid, threshold: 0.2}]"], "check names must be unique"),
    (["monitors.checks=[{kind: heldout_reward, threshold: 0.5}]"], "heldout_reward check needs `reward:"),
    (["monitors.rollback.by=nope"], "names no check"),
    (["monitors.checks=[{kind: fid, threshold: 0.5, action: explode}]"], "monitors.checks.0.action"),
    (["monitors.checks=[{kind: reward_saturation, threshold: 2}]"], "fraction of samples"),
    (["monitors.checks=[]"], "monitors.checks is empty"),
])
def test_bad_monitor_sections_are_one_line_errors(over, msg):
    with pytest.raises(RecipeError) as e:
        load_recipe(GRPO, over)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_shipped_recipes_have_monitors():
    for path in (GRPO, DIGITS):
        m = load_recipe(path).monitors
        assert m.enabled and {"fid", "recall", "diversity", "reward_saturation", "brightness", "x0_norm"} <= \
            {c.kind for c in m.checks}
    g = load_recipe(GRPO).monitors
    assert any(c.kind == "heldout_reward" and c.reward.name != "digits_hackable" for c in g.checks)
    assert {c.action for c in g.checks} == {"warn", "stop"}


# ---- the hook in a trainer -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(shared_tiny_teacher):
    return shared_tiny_teacher


def _grpo(teacher, *over):
    return load_recipe(GRPO, [f"model.teacher={teacher}", "runtime.device=cpu", "rl.batch_size=8", "rl.group_size=4",
                              "rl.minibatch_size=4", "optim.ratio=1", "iterations=3", "eval.samples=0",
                              "logging.progress=false", "logging.log_every=1", "logging.sample_every=0",
                              "logging.checkpoint_every=0", "critic.lora.rank=4", "critic.lora.alpha=4",
                              "monitors.every=1", "monitors.samples=40", *over])


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_measurement_is_fixed_and_leaves_the_training_rng_alone(teacher, tmp_path):
    from dmdr.train.grpo import GRPOTrainer

    tr = GRPOTrainer(_grpo(teacher), tmp_path, torch.device("cpu"), console=lambda *a: None)
    state = torch.get_rng_state()
    v1 = tr.monitor.measure()
    assert torch.equal(torch.get_rng_state(), state)
    v2 = tr.monitor.measure()
    assert v1 == v2
    assert set(v1) == {c.label for c in tr.recipe.monitors.checks}
    assert 0 <= v1["reward_saturation"] <= 1 and v1["fid"] > 0 and 0 < v1["brightness"] < 1


def test_heldout_reward_must_differ_from_the_training_reward(teacher, tmp_path):
    from dmdr.errors import UserError
    from dmdr.train.grpo import GRPOTrainer

    r = _grpo(teacher, "monitors.checks=[{kind: heldout_reward, threshold: 0.1, reward: {name: digits_hackable, "
                       "kwargs: {ink_weight: 2.0}}}]")
    with pytest.raises(UserError, match="also a training reward"):
        GRPOTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a: None)


def test_stop_action_saves_and_ends_the_run(teacher, tmp_path):
    from dmdr.train.dmdr import MonitorStopped
    from dmdr.train.grpo import GRPOTrainer

    r = _grpo(teacher, "monitors.checks=[{kind: x0_norm, threshold: 1.0e-9, action: stop}, "
                       "{kind: brightness, threshold: 10, action: warn}]")
    lines = []
    with pytest.raises(MonitorStopped, match=r"monitor x0_norm: .* action stop; run stopped, checkpoint saved at step 1"):
        GRPOTrainer(r, tmp_path, torch.device("cpu"), console=lines.append).run()
    recs = _metrics(tmp_path)
    alarm = [m for m in recs if "alarm" in m]
    assert [(m["step"], m["alarm"], m["alarm_action"]) for m in alarm] == [(1, "x0_norm", "stop")]
    assert [m["step"] for m in recs if "monitor_x0_norm" in m] == [0, 1]
    assert (tmp_path / "checkpoints" / "step-0000001").is_dir()
    assert any(l.startswith("alarm: monitor x0_norm") for l in lines)
    assert max(m["step"] for m in recs) == 1                       # nothing trained after the stop


def test_cli_reports_a_monitor_stop_as_one_line(teacher, tmp_path):
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    args = ["train", str(GRPO), "--out", str(tmp_path / "run")]
    for o in [f"model.teacher={teacher}", "rl.batch_size=8", "rl.group_size=4", "rl.minibatch_size=4",
              "optim.ratio=1", "iterations=3", "eval.samples=0", "logging.progress=false", "critic.lora.rank=4",
              "critic.lora.alpha=4", "monitors.every=1", "monitors.samples=40",
              "monitors.checks=[{kind: x0_norm, threshold: 1.0e-9, action: stop}]"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    err = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "monitor x0_norm" in err[0] and "checkpoint saved" in err[0]


def test_rollback_restores_the_best_weights_and_lowers_the_lr(teacher, tmp_path):
    from dmdr.train.grpo import GRPOTrainer

    r = _grpo(teacher, "monitors.checks=[{kind: fid, threshold: 0.1, action: rollback}]",
              "monitors.rollback.max_rollbacks=1", "monitors.rollback.lr_factor=0.25")
    tr = GRPOTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a: None)
    hook, recs = tr.monitor, []
    values = iter([1.0, 2.0, 2.0])
    hook.measure = lambda: {"fid": next(values)}
    best = {k: v.clone() for k, v in tr.bundle.generator_state().items()}
    lr0 = tr.opt_gen.param_groups[0]["lr"]
    assert hook.check(0, recs.append, lambda *a: None) is None            # best at step 0: snapshot
    with torch.no_grad():
        for p in tr.bundle.generator_params:
            p.add_(1.0)                                                     # "training" moves the weights
    assert hook.check(1, recs.append, lambda *a: None) is None            # alarm -> rollback
    now = tr.bundle.generator_state()
    assert all(torch.equal(now[k], best[k]) for k in best)
    assert tr.opt_gen.param_groups[0]["lr"] == pytest.approx(lr0 * 0.25)
    rb = [m for m in recs if "rollback" in m]
    assert rb == [{"step": 1, "rollback": "fid", "rollback_to_step": 0, "lr_scale": 0.25, "rollbacks": 1}]
    stop = hook.check(2, recs.append, lambda *a: None)                     # past max_rollbacks -> stop
    assert stop is not None and stop.action == "stop"
    st = tr.state_dict()["monitors"]
    assert st["rollbacks"] == 1 and st["lr_scale"] == 0.25


def test_dmdr_trainer_measures_and_checkpoints_monitor_state(teacher, tmp_path):
    from dmdr.train.checkpoint import read_checkpoint
    from dmdr.train.dmdr import DMDRTrainer

    r = load_recipe(DIGITS, [f"model.teacher={teacher}", "runtime.device=cpu", "stages.0.steps=2",
                             "stages.1.steps=2", "stages.0.batch_size=4", "stages.1.batch_size=4", "optim.ratio=1",
                             "logging.progress=false", "logging.log_every=1", "logging.sample_every=0",
                             "logging.checkpoint_every=0", "critic.lora.rank=4", "critic.lora.alpha=4",
                             "monitors.every=2", "monitors.samples=40",
                             "monitors.checks=[{kind: brightness, threshold: 100}, {kind: fid, threshold: 100, start: 2}]"])
    DMDRTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a: None).run()
    recs = _metrics(tmp_path)
    assert [m["step"] for m in recs if "monitor_fid" in m] == [0, 2, 4]
    assert math.isnan([m for m in recs if "monitor_fid_d" in m][0]["monitor_fid_d"])   # before start
    assert not [m for m in recs if "alarm" in m]
    from dmdr.train.checkpoint import list_checkpoints

    _, state, *_ = read_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert state["monitors"]["states"]["fid"]["best_step"] in (2, 4)


def test_resume_measures_a_missing_step_once(teacher, tmp_path):
    from dmdr.train.grpo import GRPOTrainer

    r = _grpo(teacher, "monitors.every=2", "iterations=4", "logging.checkpoint_every=2",
              "monitors.checks=[{kind: brightness, threshold: 100}]")
    tr = GRPOTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a: None)
    tr.run(max_iterations=2)
    steps = [m["step"] for m in _metrics(tmp_path) if "monitor_brightness" in m]
    assert steps == [0, 2]                                  # step 2 measured before its checkpoint
    tr2 = GRPOTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a: None)
    tr2.run(resume=True)
    steps = [m["step"] for m in _metrics(tmp_path) if "monitor_brightness" in m]
    assert steps == [0, 2, 4]                               # no second measurement of step 2
    assert tr2.monitor.bank.last_step == 4


def test_smooth_ignores_a_single_spike_but_not_a_trend():
    b = _bank(MonitorCheck(kind="fid", threshold=0.3, smooth=3))
    for step, v in enumerate([1.1, 1.15, 0.95, 1.4, 1.0, 1.05]):   # noise around 1 with one spike
        assert b.update(step, {"fid": v})[0] == [], step
    fired = [step for step, v in enumerate([1.25, 1.6, 2.0], start=6) if b.update(step, {"fid": v})[0]]
    assert fired == [8]                # step 7: median(1.05, 1.25, 1.6) = 1.25; step 8: 1.6
    assert b.states["fid"].last == 2.0 and len(b.states["fid"].recent) == 3
