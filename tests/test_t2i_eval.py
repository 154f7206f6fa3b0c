"""`dmdr eval --run DIR --prompts FILE` on a smoke-trained text-to-image run (tiny random SD3 stand-ins, offline),
and text-to-image monitors in the DMDR trainer."""
import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dmdr.recipes import load_recipe, recipes_dir
from dmdr_cli.app import app

torch.set_num_threads(1)
SD3 = recipes_dir() / "sd3-medium-4step.yaml"
runner = CliRunner()


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "run"
    code, stdout, err = _cli("train", SD3, "--smoke", "--out", out, "--set", "logging.progress=false")
    assert code == 0, err
    return out


def test_eval_student_vs_teacher(sd3_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball on grass\na cat\n")
    js, grid = tmp_path / "e.json", tmp_path / "g.png"
    code, out, err = _cli("eval", "--run", sd3_run, "--prompts", prompts, "--teacher-steps", 3, "--seeds", 2,
                          "--reward", "pickscore", "--json", js, "--grid", grid)
    assert code == 0, err
    res = json.loads(js.read_text())
    assert res["prompts"] == 3 and res["seeds"] == 2 and res["teacher"] == {"steps": 3, "cfg": 7.0}
    assert res["rewards"] == {"clip": "training", "hpsv2": "training", "pickscore": "held-out"}
    for side in ("student", "teacher_metrics"):
        m = res[side]
        assert set(m) == {"reward_clip", "reward_hpsv2", "reward_pickscore", "clip_score", "diversity"}
        assert all(math.isfinite(v) for v in m.values())
        # the CLIP score is 100 x the (prefix-free) clip reward on the same images and prompts
        assert m["clip_score"] == pytest.approx(100 * m["reward_clip"], rel=1e-4, abs=1e-4)
        assert 0 < m["diversity"] <= 2          # distances between unit embeddings of different seeds
    assert res["student"] != res["teacher_metrics"]
    assert [p["prompt"] for p in res["per_prompt"]] == ["a red cube", "a blue ball on grass", "a cat"]
    per = [p["student"]["clip_score"] for p in res["per_prompt"]]
    assert sum(per) / 3 == pytest.approx(res["student"]["clip_score"], rel=1e-4)
    w, h = Image.open(grid).size                 # 3 rows x (2 student + 2 teacher) images, 16 px x4
    assert (w - 14 - 2) // (64 + 2) == 4 and (h - 2) // (64 + 2) == 3
    assert "student (4 steps) vs teacher (3 steps" in out and "held-out" in out


def test_eval_bad_input(sd3_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cube\n")
    for args, needle in [(("--run", sd3_run), "--run needs --prompts"),
                         (("--run", sd3_run, "--prompts", tmp_path / "none.txt"), "no such file"),
                         (("--run", sd3_run, "--prompts", prompts, "--seeds", 1), "at least 2 seeds"),
                         (("--run", sd3_run, "--prompts", prompts, "--reward", "pickscore:[1]"), "YAML mapping"),
                         (("--run", tmp_path, "--prompts", prompts), "no recipe.yaml"),
                         ((), "pass SAMPLES.npz")]:
        code, out, err = _cli("eval", *args)
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, err)


def test_t2i_monitors_measure_prompts_x_seeds(tmp_path):
    from dmdr.train.dmdr import DMDRTrainer

    r = load_recipe(SD3, ["model.smoke=true", "stages.0.batch_size=2", "stages.1.batch_size=2",
                          "logging.sample_every=0", "logging.checkpoint_every=0", "logging.progress=false",
                          "logging.log_every=1", "monitors.every=1", "monitors.seeds=2",
                          "monitors.checks=[{kind: diversity, threshold: 0.9}, {kind: saturation, threshold: 10}, "
                          "{kind: x0_norm, threshold: 10}, {kind: brightness, threshold: 10}, "
                          "{kind: heldout_reward, threshold: 10, reward: {name: pickscore}}]"])
    tr = DMDRTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a, **k: None)
    x0, images, cond, groups = tr.monitor.samples()
    P = len(tr.bundle.sample_prompts)
    assert images.shape[0] == 2 * P and images.shape[1] == 3 and cond[:P] == cond[P:]
    assert groups.tolist() == list(range(P)) * 2
    tr.run(max_steps_per_stage=1)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mon = [m for m in recs if "monitor_diversity" in m]
    assert [m["step"] for m in mon] == [0, 1, 2]
    assert all(math.isfinite(m[k]) for m in mon for k in ("monitor_diversity", "monitor_saturation",
                                                          "monitor_x0_norm", "monitor_heldout_pickscore"))
    assert mon[0]["monitor_saturation"] > 0


def test_t2i_monitors_refuse_digits_only_checks(tmp_path):
    from dmdr.errors import UserError
    from dmdr.train.dmdr import DMDRTrainer

    r = load_recipe(SD3, ["model.smoke=true", "monitors.every=1", "monitors.checks=[{kind: fid, threshold: 0.5}]"])
    with pytest.raises(UserError, match="needs the digits evaluation network"):
        DMDRTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a, **k: None)
