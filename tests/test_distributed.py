"""Data-parallel DMDR under torchrun on CPU (gloo, 2 processes): identical replicas, per-rank data, rank-0 I/O,
exact resume. Slow (each launch starts 2 Python processes): ``pytest -m slow tests/test_distributed.py``."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from dmdr.train import checkpoint as ckpt
from dmdr.train.distributed import DistContext, DistributedError, mode_for, setup
from dmdr.train.runtime import read_metrics

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = ("time", "gen_steps_per_s")

WORKER = textwrap.dedent('''
    """Run the DMDR trainer on every rank; report a digest of the state and every file this rank touched."""
    import hashlib, json, os, sys
    from pathlib import Path

    out, reports = Path(sys.argv[2]).resolve(), Path(sys.argv[3])
    touched = []

    def audit(event, args):  # every write-open, mkdir, rename, delete under the run directory
        if event in ("open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.unlink", "shutil.rmtree"):
            path = args[0]
            if event == "open" and not (isinstance(args[1], str) and set(args[1]) & set("wax+")) and not (
                    isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                return
            if isinstance(path, (str, bytes, os.PathLike)) and str(os.fsdecode(path)).startswith(str(out)):
                touched.append(f"{event} {os.fsdecode(path)}")
    sys.addaudithook(audit)

    import torch
    from dmdr.recipes import validate_recipe
    from dmdr.train.dmdr import DMDRTrainer
    from dmdr.train.runtime import prepare_run_dir, resolve_device, seed_everything

    recipe = validate_recipe(json.loads(Path(sys.argv[1]).read_text()))
    resume, stop_at = sys.argv[4] == "resume", (int(sys.argv[5]) if len(sys.argv) > 5 else None)
    dev = resolve_device("cpu")
    prepare_run_dir(out, resume=resume, force=False)
    seed_everything(recipe.seed)
    tr = DMDRTrainer(recipe, out, dev, console=print)
    labels = tr.bundle.sample_cond(8)[0].tolist()  # per-rank data stream (drawn before training)
    summary = tr.run(resume=resume, stop_at=stop_at)
    h = hashlib.sha256()
    for name, sd in sorted(tr.tensors().items()):
        for k, v in sorted(sd.items()):
            h.update(name.encode() + k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    for opt in (tr.opt_gen, tr.opt_critic):
        for s in opt.state_dict()["state"].values():
            for v in s.values():
                h.update(v.cpu().numpy().tobytes())
    rank = tr.dist.rank
    (reports / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": tr.dist.world_size, "digest": h.hexdigest(), "labels": labels,
        "step": tr.state.global_step, "interrupted": summary["interrupted"], "touched": touched}))
''')


def _recipe(teacher: str) -> dict:
    return {"task": "dmdr", "name": "ddp", "seed": 0, "runtime": {"device": "cpu"},
            "model": {"teacher": teacher}, "critic": {"lora": {"rank": 4, "alpha": 4}},
            "generator": {"steps": 2}, "dmd": {"cfg": 2.0, "dynadg": {"horizon": 4}, "dynars": {"horizon": 4}},
            "optim": {"ratio": 2, "lr_gen": 1e-3, "lr_critic": 1e-3, "ema_decay": 0.9},
            "stages": [{"name": "cold", "steps": 3, "batch_size": 4},
                       {"name": "joint", "steps": 2, "batch_size": 4,
                        "rewards": [{"name": "digits_classifier", "weight": 0.1}]}],
            "logging": {"log_every": 1, "sample_every": 0, "checkpoint_every": 2, "keep_last": 5, "progress": False}}


def _torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DMDR_DISTRIBUTED": "ddp"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    for attempt in range(2):  # one retry: gloo on a loaded machine occasionally aborts at start-up (ecosystem.md §5)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if res.returncode == 0 or "SIGABRT" not in res.stderr:
            return res
    return res


def _launch(tmp_path, name, teacher, *extra):
    rec = tmp_path / "recipe.json"
    rec.write_text(json.dumps(_recipe(teacher)))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    reports = tmp_path / f"reports-{name}-{extra[0]}"
    reports.mkdir()
    res = _torchrun(worker, rec, tmp_path / name, reports, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)]


def _records(run: Path):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run / "metrics.jsonl")]


@pytest.mark.slow
def test_ddp_replicas_identical_rank0_writes_and_resume_is_exact(tiny_teacher, tmp_path):
    full = _launch(tmp_path, "full", tiny_teacher, "fresh")
    assert [r["world"] for r in full] == [2, 2] and all(r["step"] == 5 for r in full)
    assert full[0]["digest"] == full[1]["digest"]          # weights, EMA and optimiser states identical
    assert full[0]["labels"] != full[1]["labels"]          # ...from different per-rank data
    assert full[0]["touched"] and full[1]["touched"] == []  # only rank 0 wrote anything in the run directory
    steps = [r["step"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]                          # one line per step, not one per rank
    state = torch.load(ckpt.list_checkpoints(tmp_path / "full" / "checkpoints")[-1] / "state.pt", weights_only=True)
    assert int(state["world_size"]) == 2 and len(state["rng_ranks"]) == 2

    cut = _launch(tmp_path, "cut", tiny_teacher, "fresh", 3)
    assert all(r["interrupted"] and r["step"] == 3 for r in cut)
    resumed = _launch(tmp_path, "cut", tiny_teacher, "resume")
    assert resumed[0]["digest"] == resumed[1]["digest"] == full[0]["digest"]  # bitwise the uninterrupted run
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")


@pytest.mark.slow
def test_torchrun_dmdr_train_cli(tiny_teacher, tmp_path):
    rec = tmp_path / "tiny.yaml"
    rec.write_text(yaml.safe_dump(_recipe(tiny_teacher)))
    res = _torchrun("-m", "dmdr", "train", rec, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "student.safetensors").exists()
    assert [d.name for d in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step-0000005"


# ---- fast, single-process -------------------------------------------------------------------------------------------
def test_single_process_context_is_inert(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("DMDR_DISTRIBUTED", raising=False)
    ctx = setup()
    assert not ctx.active and ctx.is_main and mode_for() == "none"
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    ctx.average_grads_([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert ctx.any(True) and not ctx.any(False) and ctx.mean_scalars({"a": 1.0}) == {"a": 1.0}
    assert ctx.gather_tensor_dicts({"x": torch.ones(1)})[0]["x"].item() == 1.0


def test_bad_modes_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("DMDR_DISTRIBUTED", "horovod")
    with pytest.raises(DistributedError, match="use one of none, ddp, fsdp2"):
        mode_for()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("DMDR_DISTRIBUTED", "none")
    with pytest.raises(DistributedError, match="overwrite each other"):
        setup()
    monkeypatch.setenv("DMDR_DISTRIBUTED", "fsdp2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(DistributedError, match="fsdp2 needs a torchrun launch"):  # tests/test_fsdp.py covers it
        setup()
    assert isinstance(DistContext(world_size=2, rank=1), DistContext) and not DistContext(rank=1).is_main
