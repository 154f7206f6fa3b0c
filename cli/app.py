"""``dmdr``: train, sample, eval and inspect recipes. Thin: parse, validate, call the library, print.

Heavy imports (torch, diffusers, torchrl) happen inside commands so that ``dmdr --help`` is fast. Bad input
(recipes, arguments, files, checkpoints) prints one line ``error: ...`` on stderr and exits with code 2;
set ``DMDR_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DMDR: distil a diffusion/flow teacher into a few-step student with DMD + RL.")
recipes_app = typer.Typer(no_args_is_help=True, help="List, show and validate recipes.")
app.add_typer(recipes_app, name="recipes")


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def guarded(fn):
    """Turn user errors into one line + exit 2 (tracebacks only with DMDR_DEBUG=1)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
            if os.environ.get("DMDR_DEBUG"):
                raise
            msg = " ".join(str(e).split()) or e.__class__.__name__
            fail(msg)
        except OSError as e:  # read-only file system, full disk, quota, ...: one line, exit 2
            if os.environ.get("DMDR_DEBUG"):
                raise
            from dmdr.train.rundir import os_error_message

            fail(os_error_message(e, str(e.filename or "a file")))
    return wrapper


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


# ---- train -----------------------------------------------------------------------------------------------------------
SMOKE_OVERRIDES = {
    "teacher": ["train.steps=6", "train.batch_size=16", "train.warmup=2", "eval_steps=4", "logging.log_every=2",
                "logging.sample_every=0", "logging.checkpoint_every=0"],
    "classifier": ["train.steps=6", "train.batch_size=16"],
    "dmdr": ["logging.log_every=1", "logging.sample_every=0", "logging.checkpoint_every=0"],
}


@app.command()
@guarded
def train(
    recipe: Optional[str] = typer.Argument(None, help="recipe YAML file (or the name of a shipped recipe, e.g. "
                                           "digits); with --resume it defaults to the run's own recipe.yaml"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<name>-<time>)"),
    set_: List[str] = typer.Option([], "--set", "-s", help="override a recipe field: key=value (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="build everything, print a summary, write nothing"),
    smoke: bool = typer.Option(False, "--smoke", help="a few iterations of every stage on a tiny configuration"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its newest valid checkpoint"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing run directory (only one dmdr created)"),
    device: Optional[str] = typer.Option(None, "--device", help="auto|cpu|cuda (overrides runtime.device)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32|bf16 (overrides runtime.precision)"),
):
    """Train from a recipe: the teacher, a classifier, or a DMDR student (stages: cold start, then DMD + RL)."""
    from dmdr.train import startup
    from dmdr.train.rundir import release_lock

    old = startup.install()  # a signal before the training loop: one clean message, exit 0
    try:
        _train(recipe, out, set_, dry_run, smoke, resume, force, device, precision)
    except startup.Interrupted as e:
        from dmdr.train.rundir import is_run_dir

        if out is not None and is_run_dir(out):
            nxt = f"continue with: dmdr train --out {out} --resume{' --smoke' if smoke else ''}"
        else:
            nxt = "nothing was written; run the same command again"
        typer.echo(f"interrupted by signal {e.signum} during {e.phase}; {nxt}", err=True)
    finally:
        release_lock()
        startup.restore(old)


def _train(recipe, out, set_, dry_run, smoke, resume, force, device, precision):
    import time

    from dmdr.recipes import load_recipe, resolve_recipe_path

    overrides = list(set_)
    if device is not None:
        if device not in ("auto", "cpu", "cuda"):
            fail(f"--device {device!r}: use auto, cpu or cuda")
        overrides.append(f"runtime.device={device}")
    if precision is not None:
        if precision not in ("fp32", "bf16"):
            fail(f"--precision {precision!r}: use fp32 or bf16")
        overrides.append(f"runtime.precision={precision}")
    if recipe is None:
        if not (resume and out is not None):
            fail("pass a RECIPE (a .yaml file or a shipped name, e.g. digits); only --resume --out DIR may omit it")
        recipe = str(out / "recipe.yaml")
    path = resolve_recipe_path(recipe)
    r = load_recipe(path, overrides)
    if smoke:
        smoke_over = SMOKE_OVERRIDES.get(r.task, []) + overrides
        if r.task == "dmdr":
            smoke_over += [f"stages.{i}.batch_size=8" for i in range(len(r.stages))]
        if r.task in ("dmdr", "grpo"):   # the family's offline stand-ins (T2I: model.smoke=true)
            from dmdr.families.registry import get_family

            smoke_over += get_family(r).smoke_overrides(r)
        r = load_recipe(path, smoke_over)
    if resume and out is None:
        fail("--resume needs --out DIR (the run to continue)")
    _preflight(r, path, out if resume else None)
    from dmdr.train import startup

    startup.check()  # a signal recorded so far ends start-up here, cleanly
    if out is None:
        out = Path("runs") / f"{r.name}{'-smoke' if smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"

    import torch

    from dmdr.train.runtime import prepare_run_dir, resolve_device, seed_everything

    dev = resolve_device(r.runtime.device)
    from dmdr.train.memfit import check_recipe_fits

    check_recipe_fits(r, dev)  # refuse a batch that cannot fit, before allocating anything
    startup.check()
    if r.runtime.threads:
        torch.set_num_threads(r.runtime.threads)
    con = _console()
    if dry_run:
        _dry_run(r, dev, con)
        return
    out = prepare_run_dir(out, resume=resume, force=force)
    startup.check()
    from dmdr.recipes import save_recipe
    from dmdr.train import distributed

    main = distributed.is_main()  # under torchrun only rank 0 writes and prints
    if resume and r.task != "classifier" and not _has_checkpoint_dirs(out):
        # killed before its first checkpoint: nothing to resume and nothing to lose; start it again
        con.print(f"{out} has no checkpoint yet: starting the run from the beginning", soft_wrap=True)
        resume = False
        if main:
            from dmdr.train.runtime import truncate_metrics

            truncate_metrics(out / "metrics.jsonl", 0)
    if main and not (resume and r.task != "classifier"):  # a resume writes recipe.yaml once its checkpoint loaded
        save_recipe(r, out / "recipe.yaml")
    seed_everything(r.seed)
    t0 = time.time()
    from dmdr.train.tasks import run_task

    startup.check()
    if r.task not in ("dmdr", "grpo"):  # no loop handler there: a signal during training raises (clean message)
        startup.set_phase("raise")
    files = run_task(r, out, dev, resume=resume, smoke=smoke, console=con.print)
    startup.set_phase("done")
    if files.pop("interrupted", False) and main:
        con.print(f"interrupted; continue with: dmdr train --out {out} --resume{' --smoke' if smoke else ''}",
                  soft_wrap=True)
    if main:
        _report(con, out, files, t0)


def _preflight(r, path, resume_out: Optional[Path]) -> None:
    """Checks that need no model: every stage's rewards and plugins; on --resume, the run's task."""
    from dmdr.rewards.preflight import check_recipe_rewards

    try:
        check_recipe_rewards(r)
    except ValueError as e:
        fail(f"{path}: {e}")
    from dmdr.train.rundir import is_run_dir, looks_like_legacy_run

    if resume_out is not None and (is_run_dir(resume_out) or looks_like_legacy_run(resume_out)):
        import yaml

        from dmdr import safe_yaml

        try:
            old = safe_yaml.load((resume_out / "recipe.yaml").read_text())
        except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
            fail(f"--resume: {resume_out / 'recipe.yaml'} is unreadable ({' '.join(str(e).split())[:80]}); "
                 f"pass the run's RECIPE explicitly")
        task = old.get("task") if isinstance(old, dict) else None
        if task != r.task:
            fail(f"cannot resume: {resume_out} is a task={task} run but {path} has task={r.task}; pass the "
                 f"recipe the run was started with (or omit RECIPE: --resume reads the run's own recipe.yaml)")


def _has_checkpoint_dirs(out: Path) -> bool:
    """Any ``checkpoints/step-*`` entry (complete or not): a damaged run is not silently started over."""
    d = out / "checkpoints"
    return d.is_dir() and any(p.name.startswith("step-") for p in d.iterdir())


def _report(con, out: Path, files: dict, t0: float) -> None:
    import time

    con.print(f"[bold green]done[/] in {time.time() - t0:.1f}s — run directory: {out}")
    for name, p in files.items():
        if p:
            con.print(f"  {name:18s} {p}")
    con.print(f"  {'metrics':18s} {out / 'metrics.jsonl'}")
    con.print(f"  {'checkpoints':18s} {out / 'checkpoints'}")
    con.print(f"  {'recipe':18s} {out / 'recipe.yaml'}")


def _dry_run(r, dev, con) -> None:
    con.print(f"recipe {r.name!r} (task={r.task}) is valid; device={dev}")
    if r.task == "dmdr":  # the family's memory estimate, before any weights are loaded
        from dmdr.families.registry import get_family

        est = get_family(r).memory(r)
        if est is not None:
            con.print(est.line(), soft_wrap=True)
            if r.runtime.distributed == "fsdp2":  # per-GPU memory when sharded over N processes (docs/distributed.md)
                from dmdr.train.fsdp import memory_lines

                for line in memory_lines(r, est):
                    con.print(line, soft_wrap=True)
    if r.task == "dmdr":
        from dmdr.train.dmdr import DMDRTrainer
        from dmdr.train.fsdp import dry_run_recipe

        tr = DMDRTrainer(dry_run_recipe(r), None, dev, console=con.print)  # fsdp2 without torchrun: unsharded
        for st in r.stages:
            for term in st.rewards:
                tr.reward(term.name, term.kwargs)
        ng = sum(p.numel() for p in tr.bundle.generator_params)
        nc = sum(p.numel() for p in tr.bundle.critic_params)
        con.print(f"generator: {ng:,} trainable params; critic LoRA: {nc:,}; grid {tr.grid.tolist()}")
        for st in r.stages:
            rewards = ", ".join(f"{t.name} (w {t.weight:g})" for t in st.rewards) or "none"
            con.print(f"  stage {st.name}: {st.steps} generator steps x ratio {r.optim.ratio}, batch {st.batch_size}, "
                      f"rewards: {rewards}", soft_wrap=True)
    con.print("dry run: nothing written")


# ---- sample ----------------------------------------------------------------------------------------------------------
@app.command()
@guarded
def sample(
    run: Optional[Path] = typer.Option(None, "--run", help="a DMDR run directory: sample its latest student"),
    teacher: bool = typer.Option(False, "--teacher", help="sample the teacher instead (Euler, optional CFG)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="teacher weights (default builtin:digits-teacher)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="sampling steps (student default: its training N; teacher: 50)"),
    cfg: float = typer.Option(1.0, "--cfg", help="teacher classifier-free guidance scale (1 = none)"),
    num: Optional[int] = typer.Option(None, "--num", help="number of samples (digits default 100; text-to-image "
                                      "default: one per prompt)"),
    class_: Optional[int] = typer.Option(None, "--class", help="only this class (default: cycle through classes)"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help=".npz (images, labels) or .png (labelled grid)"),
    device: str = typer.Option("cpu", "--device", help="auto|cpu|cuda"),
    prompt: List[str] = typer.Option([], "--prompt", help="text-to-image runs: a prompt (repeatable)"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="text-to-image runs: a prompt file "
                                                "(.txt one per line, or .jsonl)"),
):
    """Sample digits from a trained student (--run DIR) or the teacher (--teacher); for a text-to-image run
    (sd3/sdxl), sample its generator LoRA on --prompt/--prompts with the training-time grid."""
    if (run is None) == (not teacher):
        fail("pass exactly one of --run DIR or --teacher")
    if steps is not None and steps < 1:
        fail(f"--steps {steps}: must be at least 1")
    if num is not None and num < 1:
        fail(f"--num {num}: must be at least 1")
    from dmdr.families.registry import run_family

    fam = run_family(run) if run is not None else None
    if fam is not None and fam.conditioning == "prompts":
        _sample_prompt_run(fam, run, prompt, prompts_file, steps=steps, num=num, seed=seed, out=out, device=device,
                           class_=class_)
        return
    if prompt or prompts_file is not None:
        fail("--prompt/--prompts need a text-to-image run (--run DIR of an sd3/sdxl recipe)")
    num = 100 if num is None else num
    if out.suffix not in (".npz", ".png"):
        fail(f"--out {out}: use a .npz or .png file name")
    if not (cfg >= 0 and cfg != float("inf")):
        fail(f"--cfg {cfg}: must be a finite number >= 0")
    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device {device!r}: use auto, cpu or cuda")
    import numpy as np
    import torch

    from dmdr.data.digits import to_unit
    from dmdr.sampling import load_student, sample_student, sample_teacher
    from dmdr.train.runtime import resolve_device

    dev = resolve_device(device)
    if teacher:
        from dmdr.models.tiny import load_tiny

        model = load_tiny(weights or "builtin:digits-teacher").to(dev)
        n_classes = model.config.num_classes
    else:
        model, info = load_student(run, warn=lambda m: typer.echo(m, err=True))
        model = model.to(dev)
        n_classes = model.config.num_classes
    if class_ is not None and not 0 <= class_ < n_classes:
        fail(f"--class {class_}: out of range; the model has classes 0..{n_classes - 1}")
    from dmdr.train.memfit import require_fit, sample_bytes

    n_steps = steps or (50 if teacher else info.steps)
    require_fit(sample_bytes(model.config, num, n_steps), dev, f"--num {num}", sample_bytes(model.config, 1, n_steps),
                "lower --num")
    labels = torch.full((num,), class_) if class_ is not None else torch.arange(num) % n_classes
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if teacher:
            x = sample_teacher(model, labels.to(dev), steps=steps or 50, cfg=cfg, generator=g)
        else:
            x = sample_student(model, labels.to(dev), info, steps=steps, generator=g)
    images = to_unit(x).float().cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        tmp = out.with_suffix(".tmp.npz")
        np.savez(tmp, images=images.numpy().astype(np.float32), labels=labels.numpy().astype(np.int64))
        tmp.replace(out)
    else:
        from dmdr.eval.grid import save_grid

        order = torch.argsort(labels, stable=True)
        save_grid(images[order], out, nrow=max(1, min(10, num // max(1, len(labels.unique())))) if class_ is None else 10)
    typer.echo(f"wrote {num} samples to {out}")


def _sample_prompt_run(fam, run: Path, prompt: List[str], prompts_file: Optional[Path], *, steps: Optional[int],
                       num: Optional[int], seed: int, out: Path, device: str, class_: Optional[int]) -> None:
    """Rebuild the run's bundle from DIR/recipe.yaml through its family, load the newest checkpoint's generator
    (EMA if saved), sample with the training-time grid (N steps by default) and write the family's sample file."""
    if class_ is not None:
        fail("--class is for digits runs; pass --prompt TEXT or --prompts FILE")
    if out.suffix not in fam.sample_suffixes:
        fail(f"--out {out}: model.family={fam.name} samples are written as {' or '.join(fam.sample_suffixes)} "
             f"(e.g. --out samples{fam.sample_suffixes[0]})")
    if out.suffix in (".mp4", ".gif"):  # a video file: .mp4 without the encoder fails now, not after sampling
        from dmdr.video import check_video_suffix

        check_video_suffix(out)
    if not prompt and prompts_file is None:
        fail("a text-to-image run needs --prompt TEXT (repeatable) or --prompts FILE")
    from dmdr.data.prompts import load_prompts
    from dmdr.recipes import load_recipe
    from dmdr.train.runtime import resolve_device

    texts = list(prompt)
    if prompts_file is not None:
        if not prompts_file.is_file():
            fail(f"--prompts {prompts_file}: no such file")
        texts += load_prompts(prompts_file)
    texts = [texts[i % len(texts)] for i in range(num)] if num is not None else texts
    recipe = load_recipe(run / "recipe.yaml")
    bundle, path = fam.load_student(run, recipe, resolve_device(device), warn=lambda m: typer.echo(m, err=True))
    fam.prepare_inference(bundle)  # e.g. merge the generator LoRA: the same student, a plain network
    inputs = fam.sample_inputs(bundle, "user", prompts=texts, seed=seed)
    images = fam.render(bundle, fam.sample(bundle, inputs, steps=steps))
    fam.save_samples(bundle, images, inputs, out)
    typer.echo(f"wrote {len(texts)} samples ({steps or recipe.generator.steps} steps, {path.name}) to {out}")


# ---- eval ------------------------------------------------------------------------------------------------------------
@app.command("eval")
@guarded
def eval_(
    samples: Optional[Path] = typer.Argument(None, help=".npz from `dmdr sample --out X.npz` (images N×1×8×8 in "
                                             "[0,1], labels)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the metrics as JSON here"),
    run: Optional[Path] = typer.Option(None, "--run", help="text-to-image: a run directory (student vs teacher)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="text-to-image: prompt file (.txt or .jsonl)"),
    teacher_steps: int = typer.Option(28, "--teacher-steps", help="text-to-image: teacher sampling steps"),
    teacher_cfg: Optional[float] = typer.Option(None, "--teacher-cfg", help="text-to-image: teacher CFG "
                                                "(default: the run's dmd.cfg)"),
    seeds: int = typer.Option(2, "--seeds", help="text-to-image: seeds per prompt (>= 2)"),
    reward: List[str] = typer.Option([], "--reward", help="text-to-image: an extra (held-out) reward, "
                                     "NAME or NAME:{yaml kwargs} (repeatable); the training rewards are always in"),
    clip_checkpoint: Optional[str] = typer.Option(None, "--clip-checkpoint", help="text-to-image: CLIP model for "
                                                  "the CLIP score and diversity (default: the run's clip reward)"),
    grid: Optional[Path] = typer.Option(None, "--grid", help="text-to-image: side-by-side PNG (default "
                                        "RUN/eval_t2i.png)"),
    device: str = typer.Option("cpu", "--device", help="text-to-image: auto|cpu|cuda"),
):
    """Digits: FID, k-NN precision/recall, class accuracy and mean reward of SAMPLES.npz. Text-to-image
    (--run DIR --prompts FILE): student vs teacher on the same prompts and seeds (rewards, CLIP score,
    diversity) and a side-by-side grid."""
    import json

    if run is not None:
        if samples is not None:
            fail("pass either SAMPLES.npz (digits) or --run DIR --prompts FILE (text-to-image), not both")
        _eval_t2i(run, prompts, json_out, teacher_steps=teacher_steps, teacher_cfg=teacher_cfg, seeds=seeds,
                  rewards=reward, clip_checkpoint=clip_checkpoint, grid=grid, device=device)
        return
    if samples is None:
        fail("pass SAMPLES.npz (digits) or --run DIR --prompts FILE (a text-to-image run)")
    from dmdr.eval.report import evaluate_samples, format_table, load_samples_npz

    images, labels = load_samples_npz(samples)
    metrics = evaluate_samples(images, labels)
    _console().print(format_table(metrics))
    if json_out:
        json_out.write_text(json.dumps(metrics, indent=2))
        typer.echo(f"wrote {json_out}")


def _eval_t2i(run: Path, prompts: Optional[Path], json_out: Optional[Path], **kw) -> None:
    import json

    from dmdr.data.prompts import load_prompts
    from dmdr.eval.t2i import evaluate_t2i_run, format_t2i_table

    if prompts is None:
        fail("--run needs --prompts FILE (the evaluation prompts, .txt one per line or .jsonl)")
    if not prompts.is_file():
        fail(f"--prompts {prompts}: no such file")
    grid = kw.pop("grid") or run / "eval_t2i.png"
    res = evaluate_t2i_run(run, load_prompts(prompts), grid=grid, **kw)
    _console().print(format_t2i_table(res))
    typer.echo(f"wrote {res['grid']}")
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))
        typer.echo(f"wrote {json_out}")


# ---- report ----------------------------------------------------------------------------------------------------------
@app.command()
@guarded
def report(
    run: Path = typer.Argument(..., help="a run directory (the --out of `dmdr train`)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default RUN/report.html)"),
):
    """One self-contained HTML page of a run: loss/reward/monitor curves, sample grids over time, eval tables,
    alarms and the resolved recipe (inline SVG/JS, images as data URIs; opens with no network)."""
    from dmdr.eval.html_report import build_report

    typer.echo(f"wrote {build_report(run, out)}")


# ---- recipes ---------------------------------------------------------------------------------------------------------
@recipes_app.command("list")
@guarded
def recipes_list():
    """List the shipped recipes."""
    from dmdr.recipes import read_recipe_dict, recipes_dir

    d = recipes_dir()
    for f in sorted(d.glob("*.yaml")):
        try:
            data = read_recipe_dict(f)
            typer.echo(f"{f.stem:24s} task={data.get('task', '?'):10s} {f}")
        except ValueError:
            typer.echo(f"{f.stem:24s} (unreadable) {f}")


@recipes_app.command("show")
@guarded
def recipes_show(recipe: str = typer.Argument(..., help="recipe file or shipped name"),
                 set_: List[str] = typer.Option([], "--set", "-s")):
    """Print the fully resolved recipe (defaults filled in)."""
    from dmdr.recipes import load_recipe, recipe_to_yaml, resolve_recipe_path

    typer.echo(recipe_to_yaml(load_recipe(resolve_recipe_path(recipe), list(set_))), nl=False)


@recipes_app.command("validate")
def recipes_validate(files: List[Path] = typer.Argument(..., help="recipe files")):
    """Validate recipe files; exit 2 if any is invalid (one line per problem)."""
    from dmdr.recipes import load_recipe
    from dmdr.rewards.preflight import check_recipe_rewards

    bad = 0
    for f in files:
        try:
            r = load_recipe(f)
            try:
                check_recipe_rewards(r)  # every stage's rewards and plugin targets, now rather than at stage 2
            except ValueError as e:
                raise ValueError(f"{f}: {e}") from None
            typer.echo(f"ok       {f} (task={r.task})")
        except ValueError as e:
            bad += 1
            typer.echo(f"error: {e}", err=True)
    if bad:
        raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
