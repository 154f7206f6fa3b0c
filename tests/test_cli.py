"""The CLI: bad input gives one line on stderr and exit code 2, no traceback, and nothing is overwritten."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmdr_cli.app import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def _one_line_error(code, out, err, needle):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("content,needle", [
    ("", "empty"), ("task: dmdr\n  bad: [", "not valid YAML"), ("task: dmdr\nstages: [{name: a, steps: x}]\n", "stages.0.steps"),
    ("task: dmdr\nstages: [{name: a, steps: 1}]\nwat: 3\n", "wat: unknown key"),
])
def test_train_bad_recipes(tmp_path, content, needle):
    p = tmp_path / "r.yaml"
    p.write_text(content)
    _one_line_error(*_run("train", p, "--out", tmp_path / "run"), needle)
    assert not (tmp_path / "run").exists()


def test_train_bad_arguments(tmp_path):
    _one_line_error(*_run("train", tmp_path / "missing.yaml"), "recipe file not found")
    r = ROOT / "recipes" / "digits.yaml"
    _one_line_error(*_run("train", r, "--set", "optim.ratio=zero"), "optim.ratio")
    _one_line_error(*_run("train", r, "--set", "nokey"), "expected key=value")
    _one_line_error(*_run("train", r, "--device", "tpu"), "--device 'tpu'")
    _one_line_error(*_run("train", r, "--resume"), "--resume needs --out")


def test_existing_run_is_not_overwritten(tmp_path, tiny_teacher):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = ROOT / "recipes" / "digits.yaml"
    _one_line_error(*_run("train", r, "--out", out, "--set", f"model.teacher={tiny_teacher}"), "already holds files")
    assert (out / "precious.txt").read_text() == "keep me"
    _one_line_error(*_run("train", r, "--out", tmp_path / "empty", "--resume"), "no run to resume")


def test_missing_teacher_weights_is_one_line(tmp_path):
    code, out, err = _run("train", ROOT / "recipes" / "digits.yaml", "--out", tmp_path / "r", "--smoke",
                          "--set", "model.teacher=/nonexistent/teacher.safetensors")
    _one_line_error(code, out, err, "model weights not found")


def test_smoke_train_then_sample_and_eval(tmp_path, tiny_teacher):
    out = tmp_path / "run"
    code, stdout, err = _run("train", ROOT / "recipes" / "digits.yaml", "--smoke", "--out", out,
                             "--set", f"model.teacher={tiny_teacher}", "--set", "logging.progress=false")
    assert code == 0, err
    assert (out / "student.safetensors").exists() and (out / "recipe.yaml").exists()
    assert "sample grid" in stdout and str(out) in stdout
    npz = tmp_path / "s.npz"
    code, _, err = _run("sample", "--run", out, "--num", 12, "--seed", 3, "--out", npz)
    assert code == 0, err
    d = np.load(npz)
    assert d["images"].shape == (12, 1, 8, 8) and d["images"].dtype == np.float32
    assert d["labels"].dtype == np.int64 and d["images"].min() >= 0 and d["images"].max() <= 1
    npz2 = tmp_path / "s2.npz"
    _run("sample", "--run", out, "--num", 12, "--seed", 3, "--out", npz2)
    assert np.array_equal(np.load(npz2)["images"], d["images"])  # reproducible for a seed
    code, stdout, err = _run("eval", npz, "--json", tmp_path / "m.json")
    assert code == 0, err
    import json
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"fid", "precision", "recall", "accuracy", "reward"} <= set(m)


def test_sample_bad_input(tmp_path):
    _one_line_error(*_run("sample", "--teacher", "--steps", 0), "--steps 0")
    _one_line_error(*_run("sample", "--teacher", "--class", 11, "--num", 2, "--steps", 1, "--out", tmp_path / "x.png"),
                    "--class 11: out of range")
    _one_line_error(*_run("sample", "--run", tmp_path), "has no student")
    _one_line_error(*_run("sample"), "exactly one of --run DIR or --teacher")
    _one_line_error(*_run("sample", "--teacher", "--out", tmp_path / "x.jpg"), "use a .npz or .png")


def test_eval_bad_input(tmp_path):
    _one_line_error(*_run("eval", tmp_path / "none.npz"), "none.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((3, 8, 8), np.float32), labels=np.zeros(3, np.int64))
    code, _, err = _run("eval", bad)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_recipes_commands(tmp_path):
    code, out, _ = _run("recipes", "list")
    assert code == 0 and "digits" in out
    code, out, _ = _run("recipes", "show", "digits")
    assert code == 0 and "task: dmdr" in out and "ratio: 5" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: dmdr\n")
    code, out, err = _run("recipes", "validate", ROOT / "recipes" / "digits.yaml", bad)
    assert code == 2 and "ok" in out and "stages: field required" in err


def test_help_is_fast_and_imports_no_torch():
    code = subprocess.run([sys.executable, "-c", "import sys; import dmdr_cli.app; "
                           "sys.exit(1 if 'torch' in sys.modules else 0)"]).returncode
    assert code == 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_one_line(tmp_path):
    _one_line_error(*_run("train", ROOT / "recipes" / "digits.yaml", "--smoke", "--device", "cuda", "--out",
                          tmp_path / "r"), "no CUDA device is available")
    assert not (tmp_path / "r").exists()
