"""logging.tracker: TensorBoard mirrors metrics.jsonl; a missing extra is a one-line error before training."""
import json
import sys

import pytest
import torch

from dmdr.recipes import RecipeError, load_recipe, recipes_dir
from dmdr.train.trackers import make_tracker

GRPO = recipes_dir() / "digits-grpo.yaml"


def test_tracker_field_is_validated():
    assert load_recipe(GRPO).logging.tracker == "none"
    with pytest.raises(RecipeError, match="logging.tracker"):
        load_recipe(GRPO, ["logging.tracker=mlflow"])


@pytest.mark.parametrize("name, module, extra", [("tensorboard", "torch.utils.tensorboard", "dmdr[tensorboard]"),
                                                  ("wandb", "wandb", "dmdr[wandb]")])
def test_missing_extra_is_one_line(tmp_path, monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)       # makes `import module` raise ImportError
    r = load_recipe(GRPO, [f"logging.tracker={name}"])
    with pytest.raises(ValueError) as e:
        make_tracker(r, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and f"logging.tracker={name} needs" in msg and extra in msg


def test_cli_reports_missing_extra_before_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    monkeypatch.setitem(sys.modules, "wandb", None)
    res = CliRunner().invoke(app, ["train", str(GRPO), "--smoke", "--out", str(tmp_path / "r"), "--set",
                                   "logging.tracker=wandb", "--set", "logging.progress=false"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "dmdr[wandb]" in res.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_tensorboard_mirrors_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dmdr.train.runtime import MetricsLog

    r = load_recipe(GRPO, ["logging.tracker=tensorboard"])
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.tracker = make_tracker(r, tmp_path)
    log.write({"step": 1, "loss_dmd": 0.5, "stage": "joint", "bad": float("nan")})
    log.write({"step": 2, "loss_dmd": 0.25})
    log.write({"step": 2, "alarm": "fid", "alarm_degradation": 0.7, "alarm_action": "warn"})
    log.tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["alarm/fid", "loss_dmd"]
    assert [(e.step, e.value) for e in acc.Scalars("loss_dmd")] == [(1, 0.5), (2, 0.25)]
    assert acc.Scalars("alarm/fid")[0].value == pytest.approx(0.7)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 2]                    # the jsonl is written as before
