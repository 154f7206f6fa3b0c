"""`dmdr report RUN`: one self-contained HTML page; opened in headless Chromium, curves and images render and no
script error happens."""
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dmdr.eval.grid import save_grid
from dmdr.eval.html_report import build_report, series, svg_chart
from dmdr_cli.app import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _fake_run(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    recs = []
    for k in range(0, 41, 10):
        recs.append({"step": k, "loss_dmd": 1.0 / (k + 1), "loss_fake_score": 0.5, "reward_digits_hackable": 1.5 + k / 100,
                     "gen_grad_norm": float("nan") if k == 20 else 1.0})
        recs.append({"step": k, "monitor_fid": 2.0 + k / 10, "monitor_fid_d": 0.1, "monitor_brightness": 0.3})
        recs.append({"step": k, "eval_fid": 2.0 + k / 10, "eval_recall": 0.8})
    recs.append({"step": 40, "alarm": "fid", "alarm_kind": "fid", "alarm_action": "stop", "alarm_value": 6.0,
                 "alarm_degradation": 2.0, "alarm_threshold": 0.3, "alarm_message": "monitor fid: ..."})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    g = torch.Generator().manual_seed(0)
    for k in (20, 40):
        save_grid(torch.rand(20, 1, 8, 8, generator=g), run / "samples" / f"step-{k:07d}.png", nrow=10)
    save_grid(torch.rand(20, 1, 8, 8, generator=g), run / "samples" / "final.png", nrow=10)
    (run / "recipe.yaml").write_text("name: fake\ntask: grpo\n")
    (run / "eval.json").write_text(json.dumps({"fid": 1.23, "recall": 0.7, "n": 2000}))
    return run


def test_report_is_self_contained_and_complete(tmp_path):
    run = _fake_run(tmp_path)
    out = build_report(run, tmp_path / "r.html")
    page = out.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page)          # nothing fetched from the network
    assert page.count('src="data:image/png;base64,') == 4            # 3 grids in the strip + the current one
    assert page.count('class="curve"') == 2 + 1 + 1 + 2 + 2          # losses(2), reward, grad norm, monitors, eval
    assert 'class="alarm"' in page and "1 alarm(s)" in page and "name: fake" in page and "eval.json" in page
    assert "NaN" not in page


def test_chart_skips_non_finite_values():
    recs = [{"step": 0, "x": 1.0}, {"step": 1, "x": float("nan")}, {"step": 2, "x": 3.0}, {"step": 3}]
    assert series(recs, "x") == [(0.0, 1.0), (2.0, 3.0)]
    assert svg_chart("empty", {"x": []}) == ""
    assert svg_chart("one", {"x": [(0.0, 1.0)]}).count("<path") == 1


def test_cli_report_and_bad_run(tmp_path):
    run = _fake_run(tmp_path)
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0 and (run / "report.html").exists()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "not a directory" in res.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = _fake_run(tmp_path)
    page = build_report(run, tmp_path / "r.html")
    url = page.resolve().as_uri()
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p1'}", "--enable-logging=stderr", "--v=0",
                          "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, env=env)
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(0)))
    assert attrs["report-status"] == "ok" and attrs["js-errors"] == "", attrs
    assert attrs["images-total"] == attrs["images-loaded"] == "4"
    assert int(attrs["paths"]) == 8
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr.upper().replace("CONSOLE_", "")
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p2'}", "--hide-scrollbars",
                    "--window-size=1000,1200", f"--screenshot={shot}", url],
                   capture_output=True, text=True, timeout=120, env=env)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert img.shape[:2] == (1200, 1000)
    # the curves are drawn in colour: the page holds the losses' blue / red strokes, not just black text on white
    blue = ((img[..., 2] > 150) & (img[..., 0] < 80)).sum()
    assert blue > 200 and img.std() > 10
