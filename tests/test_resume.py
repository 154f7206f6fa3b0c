"""Exact resume, signals, recipe-change checks and numerical faults (docs/reliability.md).

Everything runs on a tiny random TinyDiT teacher (dim 32, one block), batch 4, two stages of 3 generator steps,
ratio 2, so that a whole run takes about a second on one CPU thread.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmdr.recipes import validate_recipe
from dmdr.train import checkpoint as ckpt
from dmdr.train.dmdr import DMDRTrainer, TrainingStopped
from dmdr.train.runtime import read_metrics, rng_state, seed_everything, set_rng_state

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = ("time", "gen_steps_per_s")  # wall-clock figures, different in every run


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    from dmdr.models.tiny import TinyDiT, TinyDiTConfig, save_tiny

    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2, num_classes=10))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_tiny(m, str(path))
    return str(path)


def recipe_dict(teacher: str, **logging) -> dict:
    return {"task": "dmdr", "name": "tiny", "seed": 0,
            "runtime": {"device": "cpu"},
            "model": {"teacher": teacher},
            "critic": {"lora": {"rank": 4, "alpha": 4}},
            "generator": {"steps": 2, "backward_sim": "sde"},
            "dmd": {"cfg": 2.0, "dynadg": {"horizon": 4}, "dynars": {"horizon": 4}},
            "optim": {"ratio": 2, "lr_gen": 1e-3, "lr_critic": 1e-3, "ema_decay": 0.9},
            "stages": [{"name": "cold", "steps": 3, "batch_size": 4},
                       {"name": "joint", "steps": 3, "batch_size": 4, "lr_gen": 5e-4,
                        "rewards": [{"name": "digits_classifier", "weight": 0.1}]}],
            "logging": {"log_every": 2, "sample_every": 0, "checkpoint_every": 0, "keep_last": 10,
                        "progress": False, **logging}}


def train(teacher, out: Path, *, resume=False, stop_at=None, hook=None, **logging) -> tuple[DMDRTrainer, dict]:
    """What ``dmdr train`` does, in-process: seed, build, run (``hook(trainer)`` after every iteration)."""
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    tr = DMDRTrainer(validate_recipe(recipe_dict(teacher, **logging)), out, torch.device("cpu"),
                     console=lambda *a, **k: None)
    if hook is not None:
        it = tr.iteration

        def wrapped():
            o = it()
            hook(tr)
            return o
        tr.iteration = wrapped
    return tr, tr.run(resume=resume, stop_at=stop_at)


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(out / "metrics.jsonl")]


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    last = ckpt.list_checkpoints(out / "checkpoints")[-1]
    t = {f"{f.stem}.{k}": v for f in last.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    t.update({f"student.{k}": v for k, v in load_file(str(out / "student.safetensors")).items()})
    return t


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory) -> Path:
    """One uninterrupted run (shared by the resume tests)."""
    out = tmp_path_factory.mktemp("reference")
    train(teacher, out)
    return out


# ---- exact resume ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_at", [1, 3, 4])  # mid log interval in stage 1; a stage's end; after the reward
def test_interrupted_and_resumed_run_logs_bitwise_the_same(teacher, reference, tmp_path, stop_at):
    _, summary = train(teacher, tmp_path, stop_at=stop_at)
    assert summary["interrupted"]
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    assert saved.name == f"step-{stop_at:07d}"
    state = torch.load(saved / "state.pt", weights_only=True)
    assert int(state["trainer"]["inner_step"]) == 2 * stop_at  # the update-ratio phase is saved with it
    tr, _ = train(teacher, tmp_path, resume=True)
    assert tr.state.global_step == 6 and tr.state.stage == 2
    assert records(tmp_path) == records(reference)  # every logged loss and counter, bit for bit
    a, b = final_tensors(tmp_path), final_tensors(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_at_the_current_step_and_resume_is_exact(teacher, reference, tmp_path):
    def hook(tr):
        if tr.state.global_step == 2 and tr.state.inner_step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the trainer's handler, not the default one
    handler = signal.getsignal(signal.SIGTERM)
    _, summary = train(teacher, tmp_path, hook=hook)
    assert summary["interrupted"] and signal.getsignal(signal.SIGTERM) is handler  # handlers restored
    assert [d.name for d in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-0000002"]
    train(teacher, tmp_path, resume=True)
    assert records(tmp_path) == records(reference)


def test_a_signal_stops_after_one_inner_iteration_and_resume_is_exact(teacher, reference, tmp_path):
    """Stop latency is one inner iteration (a critic update), not a whole generator step of ``ratio`` of them:
    a signal after the critic-only iteration 5 saves there (inner step 5, generator step 2), and the resumed run
    is still bit-for-bit the uninterrupted one."""
    def hook(tr):
        if tr.state.inner_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
    _, summary = train(teacher, tmp_path, hook=hook)
    assert summary["interrupted"]
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    state = torch.load(saved / "state.pt", weights_only=True)
    assert (int(state["trainer"]["global_step"]), int(state["trainer"]["inner_step"])) == (2, 5)
    train(teacher, tmp_path, resume=True)
    assert records(tmp_path) == records(reference)
    a, b = final_tensors(tmp_path), final_tensors(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_checkpoint_with_valid_checksums_is_never_resumed(teacher, reference, tmp_path, capsys):
    """NaN weights written with matching hashes: the checkpoint is skipped like a damaged one (older one used)."""
    train(teacher, tmp_path, stop_at=5, checkpoint_every=1, log_every=1)
    newest = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    sd = load_file(str(newest / "generator.safetensors"))
    from safetensors.torch import save_file
    save_file({k: torch.full_like(v, float("nan")) for k, v in sd.items()}, str(newest / "generator.safetensors"))
    import hashlib
    man = json.loads((newest / "COMPLETE").read_text())
    man["sha256"]["generator.safetensors"] = hashlib.sha256((newest / "generator.safetensors").read_bytes()).hexdigest()
    (newest / "COMPLETE").write_text(json.dumps(man))
    tr, _ = train(teacher, tmp_path, resume=True, checkpoint_every=1, log_every=1)
    err = capsys.readouterr().err
    assert "step-0000005" in err and "non-finite weights" in err
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "student.safetensors")).values())


def test_resume_skips_a_damaged_newest_checkpoint_and_redoes_its_steps(teacher, reference, tmp_path, capsys):
    train(teacher, tmp_path, stop_at=5, checkpoint_every=1, log_every=1)
    newest = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    with open(newest / "generator.safetensors", "r+b") as f:
        f.truncate(100)
    tr, _ = train(teacher, tmp_path, resume=True, checkpoint_every=1, log_every=1)
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "step-0000005" in err and "damaged" in err
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 5 was redone, and its first log line dropped


def test_rng_state_round_trip_includes_gaussian_caches():
    seed_everything(3)
    random.gauss(0, 1)
    np.random.randn()  # both leave a cached second Gaussian
    st = rng_state()
    want = (random.gauss(0, 1), float(np.random.randn()), float(torch.randn(())))
    seed_everything(99)
    set_rng_state(torch.load(_roundtrip(st), weights_only=True))
    assert (random.gauss(0, 1), float(np.random.randn()), float(torch.randn(()))) == want


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_teacher_resume_is_exact(tmp_path):
    from dmdr.recipes import TeacherRecipe
    from dmdr.train.teacher import train_teacher

    r = TeacherRecipe.model_validate({
        "task": "teacher", "seed": 0, "model": {"dim": 16, "depth": 1, "heads": 2},
        "train": {"steps": 6, "batch_size": 8, "warmup": 2}, "eval_steps": 2,
        "logging": {"log_every": 1, "sample_every": 0, "checkpoint_every": 2, "progress": False}})
    quiet = lambda *a, **k: None  # noqa: E731
    for out, kw in ((tmp_path / "full", {}), (tmp_path / "cut", {"max_steps": 3})):
        out.mkdir()
        seed_everything(0)
        train_teacher(r, out, device=torch.device("cpu"), console=quiet, **kw)
    seed_everything(0)
    train_teacher(r, tmp_path / "cut", device=torch.device("cpu"), console=quiet, resume=True)
    assert records(tmp_path / "cut") == records(tmp_path / "full")
    a, b = (load_file(str(tmp_path / d / "teacher.safetensors")) for d in ("cut", "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- numerical faults ------------------------------------------------------------------------------------------
def _nan_generator_loss_from(monkeypatch, step: int):
    import dmdr.train.dmdr as mod

    real = mod.dmd_loss

    def dmd_loss(td, *a, **k):
        out = real(td, *a, **k)
        if _nan_generator_loss_from.trainer.state.global_step >= step:
            out["loss_dmd"] = out["loss_dmd"] * float("nan")
        return out
    monkeypatch.setattr(mod, "dmd_loss", dmd_loss)


def test_non_finite_updates_are_skipped_counted_and_a_streak_stops_the_run(teacher, tmp_path, monkeypatch):
    _nan_generator_loss_from(monkeypatch, 2)

    def hook(tr):
        _nan_generator_loss_from.trainer = tr
        tr.max_nonfinite_streak = 3

    seed_everything(0)
    r = validate_recipe(recipe_dict(teacher, log_every=1, checkpoint_every=1))
    tr = DMDRTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a, **k: None)
    hook(tr)
    g0 = {k: v.clone() for k, v in tr.bundle.generator_state().items()}
    with pytest.raises(TrainingStopped, match="3 non-finite generator losses/gradients in a row") as e:
        tr.run()
    assert "step-0000004" in str(e.value)  # names the last good checkpoint
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r_["skipped_updates"] for r_ in recs] == [0, 0, 1, 2]  # skipped generator updates at steps 3 and 4
    # skipped updates leave the weights alone: the checkpoints after step 2 hold step 2's generator
    g = [load_file(str(d / "generator.safetensors")) for d in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    assert all(torch.equal(g[1][k], g[-1][k]) for k in g0) and not all(torch.equal(g0[k], g[1][k]) for k in g0)
    assert all(torch.isfinite(v).all() for v in g[-1].values())
    # the critic kept training: the streak counts generator updates, not critic successes in between
    assert tr.state.critic_nonfinite_streak == 0 and tr.state.gen_nonfinite_streak == 3


def test_a_nan_weight_is_never_checkpointed(teacher, tmp_path, capsys):
    seed_everything(0)
    tr = DMDRTrainer(validate_recipe(recipe_dict(teacher)), tmp_path, torch.device("cpu"), console=print)
    assert tr.save() is not None
    with torch.no_grad():
        tr.bundle.critic_params[0].fill_(float("nan"))
    tr.state.global_step = 1
    assert tr.save() is None
    assert "non-finite weights in critic" in capsys.readouterr().err
    assert [d.name for d in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step-0000000"]


# ---- through the CLI -------------------------------------------------------------------------------------------
def _cli(*args):
    from dmdr_cli.app import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli_run(teacher, tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run made by ``dmdr train`` (recipe file, run directory)."""
    d = tmp_path_factory.mktemp("cli")
    rec = d / "tiny.yaml"
    rec.write_text(yaml.safe_dump(recipe_dict(teacher, checkpoint_every=2)))
    code, out, err = _cli("train", rec, "--out", d / "run")
    assert code == 0, err
    return rec, d / "run"


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


def test_cli_resume_refuses_a_recipe_change_that_matters(cli_run, tmp_path):
    rec, run = cli_run
    run = _copy(run, tmp_path / "run")
    before = (run / "recipe.yaml").read_text()
    code, _, err = _cli("train", rec, "--out", run, "--resume", "--set", "critic.lora.rank=8",
                        "--set", "generator.steps=3")
    _one_line_error(code, err, "cannot resume", "critic.lora.rank", "generator.steps", "--force")
    assert (run / "recipe.yaml").read_text() == before  # the run still documents what it was trained with


def test_cli_resume_allows_and_reports_harmless_changes(cli_run, tmp_path):
    rec, run = cli_run
    run = _copy(run, tmp_path / "run")
    code, out, err = _cli("train", rec, "--out", run, "--resume", "--set", "logging.log_every=3")
    assert code == 0, err
    assert "resuming with changed fields: logging.log_every" in " ".join(out.split())


def test_cli_resume_with_every_checkpoint_damaged_is_one_line(cli_run, tmp_path):
    rec, run = cli_run
    run = _copy(run, tmp_path / "run")
    for d in ckpt.list_checkpoints(run / "checkpoints"):
        (d / "state.pt").write_bytes(b"garbage")
    code, _, err = _cli("train", rec, "--out", run, "--resume")
    assert code == 2 and "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error: no valid checkpoint in") and "--force" in lines[-1]
    assert all(l.startswith("warning: checkpoint") for l in lines[:-1]) and len(lines) == 1 + len(
        ckpt.list_checkpoints(run / "checkpoints"))


def test_cli_nan_streak_is_one_line_exit_2(cli_run, tmp_path, monkeypatch):
    import dmdr.train.dmdr as mod

    rec, _ = cli_run
    monkeypatch.setattr(mod, "total_loss", lambda terms: torch.tensor(float("nan"), requires_grad=True))
    code, _, err = _cli("train", rec, "--out", tmp_path / "run", "--set", "stages.0.steps=25")
    _one_line_error(code, err, "20 non-finite critic losses", "resume from the last good checkpoint")


# ---- a real process, a real signal -----------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_to_dmdr_train_saves_exits_0_and_resume_completes(teacher, reference, tmp_path):
    rec = tmp_path / "tiny.yaml"
    d = recipe_dict(teacher, log_every=1)
    d["stages"][0]["steps"] = d["stages"][1]["steps"] = 40
    rec.write_text(yaml.safe_dump(d))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dmdr", "train", str(rec), "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stop = read_metrics(metrics)[-1]["step"]
    saved = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved and saved[-1].name == f"step-{stop:07d}", (stop, saved)
    assert "interrupted; continue with" in out
    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    steps = [r["step"] for r in read_metrics(metrics)]
    assert steps == list(range(1, 81))
