"""Adversarial cases against the ``dmdr`` CLI: what an unkind user does, and what must survive it.

    OMP_NUM_THREADS=1 python bench/adversarial_cases.py            # all cases (~1-2 min on one CPU thread)
    OMP_NUM_THREADS=1 python bench/adversarial_cases.py --fast     # only the in-process ones

Each case sets up a situation (a non-run folder passed to ``--force``, a tampered checkpoint manifest, an alias
bomb, a full disk during a checkpoint, a second SIGTERM during a save, ...), runs the CLI on it and checks the
promise of docs/reliability.md: bad input gives exit code 2 and one line ``error: ...`` with no traceback, and
nothing the user had is destroyed, poisoned or silently replaced. Most cases run the CLI in-process
(``typer.testing.CliRunner``) on a tiny random teacher; the ``slow`` ones start real processes (signals, two
processes on one run). Faults the machine cannot produce on demand (read-only file system, full disk) are
injected by patching the one call that would fail (``Path.mkdir``, ``torch.save``) with the matching ``OSError``.

Writes ``bench/results/adversarial_cases.json`` and the table between the ``adversarial-cases`` markers in
``docs/reliability.md``; exits 1 if any promise is broken. ``tests/test_adversarial.py`` runs the same cases.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "recipes" / "digits.yaml")
GRPO = str(ROOT / "recipes" / "digits-grpo.yaml")
TEACHER_RECIPE = str(ROOT / "recipes" / "digits-teacher.yaml")
RESULTS = ROOT / "bench" / "results" / "adversarial_cases.json"
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- adversarial-cases:begin -->", "<!-- adversarial-cases:end -->"


@dataclass
class Case:
    id: str
    group: str
    title: str
    fn: Callable[["Ctx"], "Outcome"]
    slow: bool = False


@dataclass
class Outcome:
    code: int | None
    kept: str
    ok: bool
    detail: str = ""


CASES: list[Case] = []


def case(id: str, group: str, title: str, slow: bool = False):
    def deco(fn):
        CASES.append(Case(id, group, title, fn, slow))
        return fn
    return deco


# ---- helpers ---------------------------------------------------------------------------------------------------------
class Ctx:
    """A scratch directory, a tiny random teacher and a finished smoke run to copy from."""

    def __init__(self, tmp: Path, shared: dict | None = None):
        self.tmp = Path(tmp)
        self.shared = shared if shared is not None else {}

    @property
    def teacher(self) -> str:
        if "teacher" not in self.shared:
            import torch

            from dmdr.models.tiny import TinyDiT, TinyDiTConfig, save_tiny

            d = Path(tempfile.mkdtemp(prefix="adv-teacher-"))
            g = torch.Generator().manual_seed(0)
            m = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2, num_classes=10))
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            save_tiny(m, str(d / "teacher.safetensors"))
            self.shared["teacher"] = str(d / "teacher.safetensors")
        return self.shared["teacher"]

    def smoke_args(self, out, *extra) -> list[str]:
        return ["train", DIGITS, "--smoke", "--out", str(out), "--set", f"model.teacher={self.teacher}",
                "--set", "logging.progress=false", *map(str, extra)]

    def cli(self, *args) -> tuple[int, str, str]:
        from typer.testing import CliRunner

        try:  # torchrl binds a logging handler to sys.stdout at import: import it outside CliRunner's captured streams
            import torchrl  # noqa: F401
        except ImportError:
            pass

        from dmdr_cli.app import app

        res = CliRunner().invoke(app, [str(a) for a in args])
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            import traceback

            err = "".join(traceback.format_exception(res.exception))
            return 1, res.stdout, res.stderr + "\nTraceback (in-process): " + err
        return res.exit_code, res.stdout, res.stderr

    def good_run(self, name: str) -> Path:
        """A copy of one finished smoke run (trained once per context)."""
        if "good_run" not in self.shared:
            src = Path(tempfile.mkdtemp(prefix="adv-run-")) / "run"
            code, _, err = self.cli(*self.smoke_args(src))
            if code != 0:
                raise RuntimeError(f"the reference smoke run failed: {err[-300:]}")
            self.shared["good_run"] = src
        dst = self.tmp / name
        shutil.copytree(self.shared["good_run"], dst)
        return dst

    def sub(self, *args, timeout=300, **kw) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        return subprocess.Popen([sys.executable, "-m", "dmdr", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT), **kw)


def one_line_error(code: int, err: str, needle: str = "") -> tuple[bool, str]:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    ok = (code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
          and needle.lower() in lines[0].lower())
    return ok, (lines[0][:200] if lines else f"(no stderr, exit {code})")


def final_error(code: int, err: str, needle: str = "") -> tuple[bool, str]:
    """Exit 2, no traceback, and the last stderr line is the ``error: ...`` (warnings may come before it)."""
    lines = [l for l in err.strip().splitlines() if l.strip()]
    last = lines[-1] if lines else ""
    ok = code == 2 and last.startswith("error: ") and "Traceback" not in err and needle.lower() in last.lower()
    return ok, (last[:200] if lines else f"(no stderr, exit {code})")


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def refused(ctx: Ctx, args: list, needle: str, kept: str, unchanged: Path | None = None,
            absent: Path | None = None) -> Outcome:
    """Run ``args``; the promise: a one-line error containing ``needle``, exit 2, ``unchanged`` byte-identical and
    ``absent`` not created."""
    before = tree(unchanged) if unchanged is not None else None
    code, _, err = ctx.cli(*args)
    ok, line = one_line_error(code, err, needle)
    if unchanged is not None and tree(unchanged) != before:
        ok, line = False, f"{unchanged} changed; {line}"
    if absent is not None and absent.exists():
        ok, line = False, f"{absent} was created; {line}"
    return Outcome(code, kept, ok, line)


def student_finite(run: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    f = run / "student.safetensors"
    return f.exists() and all(bool(torch.isfinite(v).all()) for v in load_file(str(f)).values())


def retag(ckdir: Path, mutate: Callable[[dict], dict]) -> None:
    """Rewrite a checkpoint's COMPLETE manifest with ``mutate``."""
    p = ckdir / "COMPLETE"
    p.write_text(json.dumps(mutate(json.loads(p.read_text()))))


def rehash(ckdir: Path) -> None:
    """Recompute every checksum (an attacker who rewrites weights and their hashes alike)."""
    import hashlib

    m = json.loads((ckdir / "COMPLETE").read_text())
    m["sha256"] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(ckdir.iterdir())
                   if f.name != "COMPLETE"}
    (ckdir / "COMPLETE").write_text(json.dumps(m))


def nan_generator(ckdir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    f = ckdir / "generator.safetensors"
    sd = load_file(str(f))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}, str(f))
    rehash(ckdir)


def tamper_generator(ckdir: Path) -> None:
    """Replace the generator weights by zeros (finite) without updating the manifest."""
    import torch
    from safetensors.torch import load_file, save_file

    f = ckdir / "generator.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(f)).items()}, str(f))


def checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if re.match(r"^step-\d+$", p.name))


# ---- 1. data loss and poisoning --------------------------------------------------------------------------------------
@case("force-non-run", "data loss", "`--force` on a folder dmdr did not create (a .git tree, a thesis)")
def _(ctx):
    x = ctx.tmp / "X"
    (x / "src" / ".git").mkdir(parents=True)
    (x / "src" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (x / "thesis.tex").write_text("hi")
    return refused(ctx, ctx.smoke_args(x, "--force"), "not a dmdr run directory", "every file of the folder",
                   unchanged=x)


@case("force-symlink", "data loss", "`--force` on a symlink to an earlier run")
def _(ctx):
    run = ctx.good_run("real")
    link = ctx.tmp / "link"
    link.symlink_to(run, target_is_directory=True)
    code, _, err = ctx.cli(*ctx.smoke_args(link, "--force"))
    ok = code == 0 and link.is_symlink() and (run / "student.safetensors").exists() and "Traceback" not in err
    return Outcome(code, "the link (its target holds the new run)", ok, err.strip()[-160:])


@case("lr-inf", "data loss", "`--set optim.lr_gen=.inf`")
def _(ctx):
    out = ctx.tmp / "r"
    return refused(ctx, ctx.smoke_args(out, "--set", "optim.lr_gen=.inf"), "optim.lr_gen", "nothing written",
                   absent=out)


@case("lr-huge-nan-student", "data loss", "a finite but huge lr (1e30) that turns the student into NaN")
def _(ctx):
    out = ctx.tmp / "r"
    code, _, err = ctx.cli(*ctx.smoke_args(out, "--set", "optim.lr_gen=1e30"))
    ok, line = final_error(code, err, "non-finite")
    ok = ok and not (out / "student.safetensors").exists()
    for c in checkpoints(out) if (out / "checkpoints").exists() else []:
        import torch
        from safetensors.torch import load_file
        ok = ok and all(bool(torch.isfinite(v).all()) for v in load_file(str(c / "generator.safetensors")).values())
    return Outcome(code, "no student exported, only finite checkpoints", ok, line)


@case("resume-nan-checkpoint", "data loss", "`--resume` a run whose checkpoints hold NaN weights (valid hashes)")
def _(ctx):
    run = ctx.good_run("r")
    for c in checkpoints(run):
        nan_generator(c)
    before = (run / "student.safetensors").read_bytes()
    code, _, err = ctx.cli(*ctx.smoke_args(run, "--resume"))
    ok, line = final_error(code, err, "no valid checkpoint")
    ok = ok and (run / "student.safetensors").read_bytes() == before
    return Outcome(code, "the good student.safetensors (byte-identical)", ok, line)


for _variant, _mut in {"step-only": lambda m: {"step": m["step"]}, "empty-sha256": lambda m: {**m, "sha256": []},
                       "dropped-entry": lambda m: {**m, "sha256": {k: v for k, v in m["sha256"].items()
                                                                   if k != "generator.safetensors"}}}.items():
    def _make(mut, variant):
        @case(f"manifest-{variant}", "data loss",
              f"tampered weights + COMPLETE edited ({variant.replace('-', ' ')}), then `--resume`")
        def _(ctx):
            run = ctx.good_run("r")
            for c in checkpoints(run):
                tamper_generator(c)   # finite, different weights: only the checksums can tell
                retag(c, mut)
            before = tree(run)
            code, _, err = ctx.cli(*ctx.smoke_args(run, "--resume"))
            ok, line = final_error(code, err, "no valid checkpoint")
            ok = ok and tree(run) == before
            return Outcome(code, "run unchanged; tampered weights never loaded", ok, line)
    _make(_mut, _variant)


@case("no-good-update", "data loss", "every generator loss non-finite (NaN injected into the DMD term)")
def _(ctx):
    import dmdr.train.dmdr as D

    out, real = ctx.tmp / "r", D.dmd_loss

    def nan_loss(td):
        o = real(td)
        o["loss_dmd"] = o["loss_dmd"] * float("nan")
        return o
    with mock.patch.object(D, "dmd_loss", nan_loss):
        code, _, err = ctx.cli(*ctx.smoke_args(out))
    ok, line = final_error(code, err, "none of the")
    ok = ok and not (out / "student.safetensors").exists()
    return Outcome(code, "no student exported (the teacher copy is not passed off as trained)", ok, line)


@case("lock-second-process", "data loss", "a second `dmdr train --resume` while another process holds the run")
def _(ctx):
    import fcntl

    run = ctx.good_run("r")
    fd = os.open(run / ".dmdr-lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # what a running dmdr process holds
        os.pwrite(fd, b"4242", 0)
        return refused(ctx, ctx.smoke_args(run, "--resume"), "in use by another dmdr process", "the whole run",
                       unchanged=run / "checkpoints")
    finally:
        os.close(fd)


@case("lock-two-processes", "data loss", "two real `dmdr train --resume` processes on one run", slow=True)
def _(ctx):
    run = ctx.good_run("r")
    shutil.rmtree(checkpoints(run)[-1])        # back to the end of stage 1: the first process has work to do
    (run / "student.safetensors").unlink()
    first = ctx.sub("train", "--out", run, "--resume", "--set", "stages.1.steps=40", "--set", "logging.progress=false")
    # the first process holds the lock once the run directory is prepared; wait for it
    deadline = time.time() + 120
    import fcntl
    while time.time() < deadline:
        fd = os.open(run / ".dmdr-lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            held = False
        except OSError:
            held = True
        os.close(fd)
        if held or first.poll() is not None:
            break
        time.sleep(0.05)
    second = ctx.sub("train", "--out", run, "--resume")
    out2, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=300)
    ok, line = one_line_error(second.returncode, err2, "in use by another dmdr process")
    # the training records (monitor lines share a step with the training record they follow)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r["step"] for r in recs if "inner_step" in r]
    ok = ok and first.returncode == 0 and steps == sorted(set(steps))
    if first.returncode != 0 or steps != sorted(set(steps)):
        line += f" | first exit {first.returncode}, steps {steps}, first stderr: {err1.strip()[-300:]}"
    return Outcome(second.returncode, "metrics.jsonl written by one process (each step once)", ok, line)


@case("resume-non-run", "data loss", "`--resume` on a folder that is not a run but holds a recipe.yaml")
def _(ctx):
    x = ctx.tmp / "X"
    x.mkdir()
    (x / "recipe.yaml").write_text("my own notes\n")
    return refused(ctx, ["train", DIGITS, "--out", x, "--resume"], "not a dmdr run directory", "recipe.yaml",
                   unchanged=x)


@case("resume-all-damaged", "data loss", "`--resume` on a run whose checkpoints are all damaged")
def _(ctx):
    run = ctx.good_run("r")
    for c in checkpoints(run):
        (c / "state.pt").write_bytes(b"garbage")
    before = (run / "recipe.yaml").read_bytes()
    code, _, err = ctx.cli(*ctx.smoke_args(run, "--resume", "--set", "logging.keep_last=5"))
    ok, line = final_error(code, err, "no valid checkpoint")
    ok = ok and (run / "recipe.yaml").read_bytes() == before
    return Outcome(code, "recipe.yaml (byte-identical)", ok, line)


@case("resume-task-mismatch", "data loss", "`--resume` a DMDR run with the teacher recipe")
def _(ctx):
    run = ctx.good_run("r")
    return refused(ctx, ["train", TEACHER_RECIPE, "--out", run, "--resume"], "task=dmdr run", "the whole run",
                   unchanged=run)


# ---- 2. bad input: one line, exit 2 ----------------------------------------------------------------------------------
# a valid recipe whose reward kwargs hold 9^8 leaves behind a few hundred bytes (only the loader can catch it)
BOMB = ("task: dmdr\nstages:\n  - name: a\n    steps: 1\n    rewards:\n      - name: digits_classifier\n"
        "        weight: 0.1\n        kwargs:\n          a: &a [x, x, x, x, x, x, x, x, x]\n" +
        "".join(f"          {c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh")))


for _cmd in ("validate", "show", "train"):
    def _mk(cmd):
        @case(f"yaml-alias-bomb-{cmd}", "bad input", f"a YAML alias bomb (9^8 leaves in reward kwargs), `{'recipes ' if cmd != 'train' else ''}{cmd}`")
        def _(ctx):
            f = ctx.tmp / "bomb.yaml"
            f.write_text(BOMB)
            args = {"validate": ["recipes", "validate", f], "show": ["recipes", "show", f],
                    "train": ["train", f, "--out", ctx.tmp / "r"]}[cmd]
            t0 = time.time()
            o = refused(ctx, args, "alias bomb", "nothing written", absent=ctx.tmp / "r")
            o.ok = o.ok and time.time() - t0 < 20
            return o
    _mk(_cmd)


@case("yaml-duplicate-key", "bad input", "a duplicate YAML key (`steps:` twice)")
def _(ctx):
    f = ctx.tmp / "dup.yaml"
    f.write_text("task: dmdr\nstages:\n  - name: a\n    steps: 10\n    steps: 1000\n")
    return refused(ctx, ["recipes", "validate", f], "duplicate key", "nothing written")


@case("yaml-bool-for-int", "bad input", "`steps: true` (a bool where an int is expected)")
def _(ctx):
    f = ctx.tmp / "b.yaml"
    f.write_text("task: dmdr\nstages: [{name: a, steps: true}]\n")
    return refused(ctx, ["recipes", "validate", f], "expected an integer", "nothing written")


@case("threads-100000", "bad input", "`runtime.threads: 100000`")
def _(ctx):
    out = ctx.tmp / "r"
    return refused(ctx, ctx.smoke_args(out, "--set", "runtime.threads=100000"), "runtime.threads", "nothing written",
                   absent=out)


@case("batch-too-big", "bad input", "a batch size that cannot fit in memory (10^8)")
def _(ctx):
    out = ctx.tmp / "r"
    return refused(ctx, ["train", DIGITS, "--out", out, "--set", f"model.teacher={ctx.teacher}",
                         "--set", "stages.0.batch_size=100000000"], "GiB", "nothing written", absent=out)


@case("num-too-big", "bad input", "`dmdr sample --num 10^10`")
def _(ctx):
    return refused(ctx, ["sample", "--teacher", "--weights", ctx.teacher, "--num", 10**10, "--out", ctx.tmp / "s.npz"],
                   "--num", "nothing written", absent=ctx.tmp / "s.npz")


@case("name-long", "bad input", "a 5,000-character `name`")
def _(ctx):
    out = ctx.tmp / "r"
    return refused(ctx, ctx.smoke_args(out, "--set", "name=" + "a" * 5000), "name", "nothing written", absent=out)


@case("name-dotdot", "bad input", "a `name` containing `../`")
def _(ctx):
    return refused(ctx, ["train", DIGITS, "--dry-run", "--set", "name=../../escape"], "name", "nothing written")


@case("reward-unknown-kwargs", "bad input", "unknown kwargs for a built-in reward")
def _(ctx):
    out = ctx.tmp / "r"
    return refused(ctx, ctx.smoke_args(out, "--set", "stages.1.rewards.0.kwargs={mdoe: prob}"), "unknown kwargs mdoe",
                   "nothing written (checked before stage 1 trains)", absent=out)


@case("reward-unknown-name", "bad input", "an unknown reward in stage 2 (`train` and `recipes validate`)")
def _(ctx):
    out = ctx.tmp / "r"
    o = refused(ctx, ctx.smoke_args(out, "--set", "stages.1.rewards.0.name=nope"), "unknown reward 'nope'",
                "nothing written (checked before stage 1 trains)", absent=out)
    f = ctx.tmp / "nope.yaml"
    f.write_text(Path(DIGITS).read_text().replace("name: digits_classifier", "name: nope"))
    code, _, err = ctx.cli("recipes", "validate", f)
    o.ok = o.ok and code == 2 and "unknown reward 'nope'" in err
    return o


@case("reward-bad-plugin", "bad input", "a plugin reward whose target does not import")
def _(ctx):
    out = ctx.tmp / "r"
    return refused(ctx, ctx.smoke_args(out, "--set", "stages.1.rewards.0.name=plugin", "--set",
                                       "stages.1.rewards.0.kwargs={target: 'no_such_pkg.mod:f'}"),
                   "cannot import module", "nothing written (checked before stage 1 trains)", absent=out)


@case("device-tpu", "bad input", "`--device tpu` (train and sample)")
def _(ctx):
    o = refused(ctx, ctx.smoke_args(ctx.tmp / "r", "--device", "tpu"), "--device 'tpu'", "nothing written",
                absent=ctx.tmp / "r")
    code, _, err = ctx.cli("sample", "--teacher", "--weights", ctx.teacher, "--device", "tpu", "--out", ctx.tmp / "s.png")
    o.ok = o.ok and one_line_error(code, err, "--device 'tpu'")[0]
    return o


@case("out-under-file", "bad input", "`--out` below a regular file")
def _(ctx):
    f = ctx.tmp / "file"
    f.write_text("keep")
    return refused(ctx, ctx.smoke_args(f / "run"), "is a file", "the file", unchanged=ctx.tmp)


@case("read-only-fs", "bad input", "a read-only file system (EROFS injected at mkdir)")
def _(ctx):
    def ro(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    with mock.patch("pathlib.Path.mkdir", ro):
        return refused(ctx, ctx.smoke_args(ctx.tmp / "r"), "read-only", "nothing written", absent=ctx.tmp / "r")


@case("disk-full-checkpoint", "bad input", "a full disk (ENOSPC) during the second checkpoint, then `--resume`")
def _(ctx):
    import torch

    out = ctx.tmp / "r"
    real, calls = torch.save, []

    def full(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **k)
    with mock.patch("dmdr.train.checkpoint.torch.save", full):
        code, _, err = ctx.cli(*ctx.smoke_args(out))
    ok, line = one_line_error(code, err, "no space left")
    leftovers = list((out / "checkpoints").glob("*.tmp"))
    (out / "checkpoints" / "step-0000009.tmp").write_text("left by another crash")   # a stale .tmp *file*
    code2, _, err2 = ctx.cli(*ctx.smoke_args(out, "--resume"))
    ok = ok and not leftovers and code2 == 0 and student_finite(out)
    return Outcome(code, "checkpoint step 2; `--resume` then completes", ok, line if code2 == 0 else err2[-200:])


@case("grpo-init-teacher-run", "bad input", "GRPO `rl.init` pointing at a teacher run")
def _(ctx):
    t = ctx.tmp / "teacher-run"
    t.mkdir()
    (t / "recipe.yaml").write_text(Path(TEACHER_RECIPE).read_text())
    (t / "checkpoints").mkdir()
    out = ctx.tmp / "g"
    return refused(ctx, ["train", GRPO, "--smoke", "--out", out, "--set", f"model.teacher={ctx.teacher}", "--set",
                         f"rl.init={t}", "--set", "logging.progress=false"], "task=teacher run", "the teacher run",
                   unchanged=t)


for _variant in ("invalid-model-index", "missing-config"):
    def _mk2(variant):
        @case(f"diffusers-{variant}", "bad input",
              f"a diffusers folder with {'an invalid model_index.json' if variant[0] == 'i' else 'a missing transformer/config.json'}")
        def _(ctx):
            m = ctx.tmp / "model"
            (m / "transformer").mkdir(parents=True)
            (m / "model_index.json").write_text("{bad json" if variant[0] == "i" else
                                                '{"transformer": ["diffusers", "SD3Transformer2DModel"]}')
            (ctx.tmp / "p.txt").write_text("a cat\n")
            return refused(ctx, ["train", str(ROOT / "recipes" / "sd3-medium-4step.yaml"), "--device", "cpu", "--out",
                                 ctx.tmp / "r", "--set", f"model.path={m}", "--set", f"data.prompts={ctx.tmp / 'p.txt'}"],
                           "model_index.json" if variant[0] == "i" else "config.json", "the model folder",
                           unchanged=m)
    _mk2(_variant)


for _v in ("nan", "inf"):
    def _mk3(v):
        @case(f"cfg-{v}", "bad input", f"`dmdr sample --cfg {v}`")
        def _(ctx):
            return refused(ctx, ["sample", "--teacher", "--weights", ctx.teacher, "--cfg", v, "--num", 2, "--steps", 2,
                                 "--out", ctx.tmp / "s.npz"], "--cfg", "nothing written", absent=ctx.tmp / "s.npz")
    _mk3(_v)


@case("dmd-cfg-nan", "bad input", "`--set dmd.cfg=.nan` in a recipe")
def _(ctx):
    return refused(ctx, ctx.smoke_args(ctx.tmp / "r", "--set", "dmd.cfg=.nan"), "dmd.cfg", "nothing written",
                   absent=ctx.tmp / "r")


# ---- 3. signals and messages -----------------------------------------------------------------------------------------
def _with_recorder(fn):
    """Run ``fn`` with a SIGTERM/SIGINT recorder as the outer handler: a signal dmdr lets through lands there
    (in a real process it would be a kill: exit 143) instead of killing this process."""
    got = []
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return fn(), got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@case("signal-during-save", "signals", "SIGTERM, then SIGTERM + SIGINT while the checkpoint is being saved")
def _(ctx):
    from dmdr.train import checkpoint as ck

    out, real, n = ctx.tmp / "r", ck.write_checkpoint, []

    def noisy(*a, **k):
        n.append(1)
        if len(n) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)   # the second signal lands inside the save
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    with mock.patch("dmdr.train.checkpoint.write_checkpoint", noisy):
        (code, _, err), leaked = _with_recorder(lambda: ctx.cli(*ctx.smoke_args(out)))
    ok = code == 0 and not leaked and "Traceback" not in err and bool(checkpoints(out))
    return Outcome(code, "a checkpoint; no signal escaped (no 143)", ok, f"leaked={leaked} {err.strip()[-120:]}")


@case("signal-during-save-grpo", "signals", "SIGTERM + SIGINT while GRPO writes its final checkpoint")
def _(ctx):
    from dmdr.train import checkpoint as ck

    out, real = ctx.tmp / "g", ck.write_checkpoint

    def noisy(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    args = ["train", GRPO, "--smoke", "--out", out, "--set", f"model.teacher={ctx.teacher}", "--set",
            "logging.progress=false", "--set", "eval.samples=0"]
    with mock.patch("dmdr.train.checkpoint.write_checkpoint", noisy):
        (code, _, err), leaked = _with_recorder(lambda: ctx.cli(*args))
    ok = code == 0 and not leaked and "Traceback" not in err and bool(checkpoints(out))
    return Outcome(code, "the final checkpoint and student; no signal escaped (no 143)", ok,
                   f"leaked={leaked} {err.strip()[-120:]}")


@case("signal-during-export", "signals", "SIGTERM during the final export of the student")
def _(ctx):
    import dmdr.models.tiny as tiny

    out, real = ctx.tmp / "r", tiny.save_tiny

    def noisy(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    with mock.patch("dmdr.models.tiny.save_tiny", noisy):
        (code, _, err), leaked = _with_recorder(lambda: ctx.cli(*ctx.smoke_args(out)))
    ok = code == 0 and not leaked and student_finite(out)
    return Outcome(code, "the exported student", ok, f"leaked={leaked} {err.strip()[-120:]}")


for _delay in (0.5, 1.5, 3.0):
    def _mk4(delay):
        @case(f"sigterm-startup-{delay:g}s", "signals",
              f"SIGTERM {delay:g} s after launch (imports, validation, model building), then what the message says",
              slow=True)
        def _(ctx):
            out = ctx.tmp / "r"
            p = ctx.sub(*ctx.smoke_args(out))
            time.sleep(delay)
            p.send_signal(signal.SIGTERM)
            stdout, err = p.communicate(timeout=300)
            ok = p.returncode == 0 and "Traceback" not in err and "interrupted" in err + stdout
            m = re.search(r"continue with: dmdr (train [^\n]+)", err + stdout)
            # follow what the message says: the printed command, or the same command again when nothing was written
            q = ctx.sub(*m.group(1).split()) if m else ctx.sub(*ctx.smoke_args(out))
            out2, err2 = q.communicate(timeout=300)
            ok = ok and q.returncode == 0 and student_finite(out)
            last = ([l for l in (err + stdout).strip().splitlines() if "interrupted" in l] or ["(no message)"])[-1]
            return Outcome(p.returncode, "the run folder; the suggested command then completes", ok,
                           last[:160] + f" | next command exit {q.returncode}")
    _mk4(_delay)


@case("continue-command", "signals", "the printed `continue with` command keeps `--set` and `--smoke`")
def _(ctx):
    from dmdr.train.dmdr import DMDRTrainer

    out, real = ctx.tmp / "r", DMDRTrainer.iteration

    def stop_once(self):
        o = real(self)
        if self.state.inner_step == 3 and not getattr(DMDRTrainer, "_adv_stopped", False):
            DMDRTrainer._adv_stopped = True
            self._stop_signal = signal.SIGTERM
        return o
    try:
        with mock.patch.object(DMDRTrainer, "iteration", stop_once):
            code, stdout, err = ctx.cli(*ctx.smoke_args(out, "--set", "logging.keep_last=7"))
    finally:
        DMDRTrainer._adv_stopped = False
    m = re.search(r"continue with: (dmdr train [^\n]+)", stdout)
    if code != 0 or not m:
        return Outcome(code, "", False, f"no continue command: {stdout[-200:]} {err[-200:]}")
    args = m.group(1).split()[1:]
    code2, _, err2 = ctx.cli(*args)
    import yaml
    kept = yaml.safe_load((out / "recipe.yaml").read_text())["logging"]["keep_last"] == 7
    ok = code2 == 0 and kept and "--smoke" in args and student_finite(out)
    return Outcome(code, f"`{m.group(1).replace(str(out), 'RUN')}` resumes with the overrides", ok, err2[-200:])


@case("sample-fallback", "signals", "`dmdr sample` on a run without student.safetensors and a damaged newest checkpoint")
def _(ctx):
    run = ctx.good_run("r")
    (run / "student.safetensors").unlink()
    (checkpoints(run)[-1] / "state.pt").write_bytes(b"x")
    code, _, err = ctx.cli("sample", "--run", run, "--num", 4, "--out", ctx.tmp / "s.npz")
    ok = code == 0 and "damaged" in err and "has no student.safetensors" in err
    return Outcome(code, "samples from the older checkpoint, said on stderr", ok, err.strip()[-200:])


@case("metrics-garbage", "signals", "a garbage line in metrics.jsonl, then `--resume`")
def _(ctx):
    run = ctx.good_run("r")
    ck = checkpoints(run)
    shutil.rmtree(ck[-1])   # resume from the first checkpoint: the run has work left
    (run / "student.safetensors").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write("this is not json\n")
    code, _, err = ctx.cli(*ctx.smoke_args(run, "--resume"))
    rej = run / "metrics.jsonl.rejected"
    ok = code == 0 and "not JSON" in err and rej.exists() and "this is not json" in rej.read_text()
    return Outcome(code, "the line, moved to metrics.jsonl.rejected and reported", ok, err.strip()[-200:])


@case("startup-kill-circle", "signals", "a run killed before its first checkpoint: `--resume` does not send you in a circle")
def _(ctx):
    out = ctx.tmp / "r"
    out.mkdir()
    (out / ".dmdr-run").write_text("{}")
    (out / "recipe.yaml").write_text(Path(DIGITS).read_text())
    code, stdout, err = ctx.cli(*ctx.smoke_args(out, "--resume"))
    ok = code == 0 and "starting the run from the beginning" in stdout and student_finite(out)
    return Outcome(code, "the run folder, started again", ok, (stdout + err).strip()[-200:])


# ---- driver ----------------------------------------------------------------------------------------------------------
def run_case(c: Case, tmp: Path, shared: dict | None = None) -> Outcome:
    ctx = Ctx(tmp, shared)
    try:
        return c.fn(ctx)
    except Exception as e:  # noqa: BLE001 - a crash in a case is a broken promise, reported as such
        return Outcome(None, "", False, f"{type(e).__name__}: {e}"[:300])


def write_table(rows: list[dict]) -> str:
    kept = sum(r["ok"] for r in rows)
    lines = [f"Generated by `OMP_NUM_THREADS=1 python bench/adversarial_cases.py` "
             f"(results: `bench/results/adversarial_cases.json`): **{len(rows)} cases tried, {kept} promises kept**."]
    before = RESULTS.with_name("adversarial_cases_before.json")
    if before.exists():
        b = json.loads(before.read_text())
        lines.append(f"The same script against the code before these fixes (commit e51441a, "
                     f"`{before.relative_to(ROOT)}`): {b['cases']} cases tried, {b['kept']} kept; 3 more were "
                     f"not run there because they crash or hang the process (`runtime.threads: 100000`, the alias "
                     f"bomb in `show` and `train`).")
    lines += ["", "| # | group | case | exit code | what is kept | promise |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['group']} | {r['title']} | {r['code']} | {r['kept']} | "
                     f"{'kept' if r['ok'] else '**broken**'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fast", action="store_true", help="skip the multi-process cases")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/reliability.md")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON results")
    ap.add_argument("--skip", default="", help="comma-separated case ids not to run (e.g. ones that crash an old build)")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    shared: dict = {}
    rows, t_all = [], time.time()
    for c in CASES:
        if (a.fast and c.slow) or c.id in a.skip.split(","):
            continue
        with tempfile.TemporaryDirectory(prefix=f"adv-{c.id}-") as d:
            t0 = time.time()
            o = run_case(c, Path(d), shared)
        detail = re.sub(r"(/tmp|/var/folders)/[^\s:;,)]*", "TMP", o.detail.replace(str(ROOT), "."))
        rows.append({"id": c.id, "group": c.group, "title": c.title, "code": o.code, "kept": o.kept, "ok": o.ok,
                     "detail": detail, "seconds": round(time.time() - t0, 2)})
        print(f"{'ok    ' if o.ok else 'BROKEN'} {c.id:30s} exit {o.code}  {detail.splitlines()[-1][:100] if detail else ''}",
              flush=True)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    a.results.write_text(json.dumps({"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv), "cases": len(rows),
                                   "kept": sum(r["ok"] for r in rows), "seconds": round(time.time() - t_all, 1),
                                   "rows": rows}, indent=1) + "\n")
    table = write_table(rows)
    if not a.no_doc and DOC.exists():
        text = DOC.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            DOC.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    kept = sum(r["ok"] for r in rows)
    print(f"{len(rows)} cases tried, {kept} promises kept ({time.time() - t_all:.0f} s)")
    return 0 if kept == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
