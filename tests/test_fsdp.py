"""FSDP2 (``runtime.distributed: fsdp2``) on CPU with gloo: per-block sharding, DCP checkpoints, resharding resume.

Fast tests run one rank in this process (a 1-process gloo group, torchrun's variables set by monkeypatch);
the ``slow`` ones launch ``torchrun`` with 2 (and 1) processes: ``pytest -m slow tests/test_fsdp.py``."""
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dmdr.train import checkpoint as ckpt
from dmdr.train import fsdp
from dmdr.train.distributed import DistributedError, setup
from dmdr.train.runtime import read_metrics

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = ("time", "gen_steps_per_s")


def _recipe(teacher: str, mode: str = "fsdp2", **runtime) -> dict:
    return {"task": "dmdr", "name": "fsdp", "seed": 0, "runtime": {"device": "cpu", "distributed": mode, **runtime},
            "model": {"teacher": teacher}, "critic": {"lora": {"rank": 4, "alpha": 4}},
            "generator": {"steps": 2}, "dmd": {"cfg": 2.0, "dynadg": {"horizon": 4}, "dynars": {"horizon": 4}},
            "optim": {"ratio": 2, "lr_gen": 1e-3, "lr_critic": 1e-3, "ema_decay": 0.9},
            "stages": [{"name": "cold", "steps": 3, "batch_size": 4},
                       {"name": "joint", "steps": 2, "batch_size": 4,
                        "rewards": [{"name": "digits_classifier", "weight": 0.1}]}],
            "logging": {"log_every": 1, "sample_every": 0, "checkpoint_every": 2, "keep_last": 5, "progress": False}}


def _records(run: Path):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run / "metrics.jsonl")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank(monkeypatch):
    """torchrun's environment for a 1-process launch; the process group is destroyed afterwards."""
    import torch.distributed as dist

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DMDR_DISTRIBUTED", raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _train(recipe: dict, out: Path, *, resume=False, stop_at=None):
    from dmdr.recipes import validate_recipe
    from dmdr.train.dmdr import DMDRTrainer
    from dmdr.train.runtime import prepare_run_dir, seed_everything

    r = validate_recipe(recipe)
    prepare_run_dir(out, resume=resume, force=False)
    seed_everything(r.seed)
    tr = DMDRTrainer(r, out, torch.device("cpu"), console=lambda *a, **k: None)
    tr.run(resume=resume, stop_at=stop_at)
    from dmdr.train.rundir import release_lock

    release_lock(out)
    return tr


def _full(tr) -> dict:
    out = {n: fsdp.full_state(sd) for n, sd in tr.tensors().items()}
    for which in ("opt_gen", "opt_critic"):
        st = getattr(tr, which).state_dict()["state"]
        out[which] = {f"{i}.{k}": fsdp.full(v) for i, s in st.items() for k, v in s.items()}
    return out


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].keys() == b[n].keys(), n
        for k in a[n]:
            assert torch.equal(a[n][k], b[n][k]), f"{n}.{k}"


# ---- fast: errors and sharding plan ---------------------------------------------------------------------------------
def test_fsdp2_needs_torchrun_and_a_supported_layout(monkeypatch, tiny_teacher):
    from dmdr.recipes import validate_recipe

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DMDR_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    r = validate_recipe(_recipe(tiny_teacher))
    with pytest.raises(DistributedError, match=r"^runtime.distributed=fsdp2 needs a torchrun launch: torchrun "):
        setup(r)
    bad = _recipe(tiny_teacher)
    bad["critic"] = {"lora": None}
    with pytest.raises(DistributedError, match="does not support critic.lora: null"):
        fsdp.check_layout(validate_recipe(bad))
    ddp = validate_recipe(_recipe(tiny_teacher, "ddp", fsdp={"param_dtype": "bf16"}))
    with pytest.raises(DistributedError, match=r"runtime.fsdp.param_dtype is set but the distributed mode is ddp"):
        setup(ddp)
    with pytest.raises(Exception, match="param_dtype"):
        validate_recipe(_recipe(tiny_teacher, fsdp={"param_dtype": "fp16"}))


def test_block_units_of_the_model_families():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from dmdr.models.tiny import TinyDiT, TinyDiTConfig

    tiny = TinyDiT(TinyDiTConfig(dim=32, depth=3, heads=2))
    assert fsdp.block_modules(tiny) == list(tiny.blocks)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4)
    assert fsdp.block_modules(sd3) == list(sd3.transformer_blocks)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4))
    assert fsdp.block_modules(flux) == list(flux.transformer_blocks) + list(flux.single_transformer_blocks)


def test_dcp_metadata_reader_refuses_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|not allowed"):
        fsdp._MetadataUnpickler(__import__("io").BytesIO(pickle.dumps(Evil()))).load()
    ok = pickle.dumps({"size": torch.Size([2, 3]), "dtype": torch.bfloat16})
    assert fsdp._MetadataUnpickler(__import__("io").BytesIO(ok)).load() == {"size": torch.Size([2, 3]),
                                                                          "dtype": torch.bfloat16}


# ---- fast: one rank in this process -----------------------------------------------------------------------------------
def test_fsdp2_one_rank_equals_plain_run_and_resumes_exactly(one_rank, tiny_teacher, tmp_path):
    """FSDP2 with 1 process: sharded DTensor parameters, the same bits as a plain single-process run, DCP
    checkpoints (manifest format dcp, .metadata checksummed), stop at 3 + resume = the uninterrupted run; a plain
    (no torchrun) process resumes the DCP checkpoint to the same bits."""
    from torch.distributed.tensor import DTensor

    sharded = _train(_recipe(tiny_teacher), tmp_path / "fsdp")
    assert sharded.dist.sharded and isinstance(sharded.bundle.critic_params[0], DTensor)
    assert isinstance(sharded.bundle.generator_params[0], DTensor)
    assert all(isinstance(v, DTensor) for s in sharded.opt_gen.state.values() for k, v in s.items() if k != "step")
    got = _full(sharded)
    last = ckpt.list_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1]
    manifest = json.loads((last / "COMPLETE").read_text())
    assert manifest["format"] == "dcp" and manifest["world_size"] == 1
    assert {".metadata", "__0_0.distcp", "state.pt", "recipe.yaml"} <= set(manifest["sha256"])
    ckpt.verify_checkpoint(last)
    assert (tmp_path / "fsdp" / "student.safetensors").exists()

    cut = _train(_recipe(tiny_teacher), tmp_path / "cut", stop_at=3)
    assert cut.state.global_step == 3
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-plain")
    resumed = _train(_recipe(tiny_teacher), tmp_path / "cut", resume=True)
    _assert_equal(_full(resumed), got)
    assert _records(tmp_path / "cut") == _records(tmp_path / "fsdp")

    import torch.distributed as dist

    dist.destroy_process_group()
    os.environ.pop("WORLD_SIZE")  # no torchrun: the plain trainer
    plain = _train(_recipe(tiny_teacher, "none"), tmp_path / "plain")
    assert not plain.dist.sharded
    _assert_equal(_full(plain), got)  # FSDP2 at world size 1 is bitwise the plain run
    from_dcp = _train(_recipe(tiny_teacher, "none"), tmp_path / "cut-plain", resume=True)
    _assert_equal(_full(from_dcp), got)  # the plain trainer reads DCP shards into whole tensors


def test_fsdp2_options_reach_fully_shard_and_bf16_keeps_fp32_master_weights(one_rank, tiny_teacher, tmp_path):
    rec = _recipe(tiny_teacher, fsdp={"param_dtype": "bf16", "reduce_dtype": "fp32"})
    rec["stages"] = rec["stages"][:1]
    tr = _train(rec, tmp_path / "bf16")
    p = tr.bundle.critic_params[0]
    assert p.dtype == torch.float32 and tr.state.global_step == 3
    assert tr.bundle.base.blocks[0]._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
    assert tr.bundle.base._get_fsdp_state()._mp_policy.reduce_dtype == torch.float32
    for unit in [tr.bundle.base, *tr.bundle.base.blocks]:   # every unit, root included, reshards after forward
        assert unit._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
    plain = {n: fsdp.full_state(sd) for n, sd in tr.tensors().items()}
    assert all(bool(torch.isfinite(v).all()) for sd in plain.values() for v in sd.values())


def test_fsdp2_resumes_a_single_process_checkpoint(one_rank, tiny_teacher, tmp_path, monkeypatch):
    """The existing format stays loadable: a plain run's safetensors checkpoint resumes under FSDP2 (whole tensors
    distributed into shards) with the same bits as the plain run resumed in one process."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "1")
    with monkeypatch.context() as m:
        m.delenv("WORLD_SIZE")
        _train(_recipe(tiny_teacher, "none"), tmp_path / "a", stop_at=3)
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        plain = _train(_recipe(tiny_teacher, "none"), tmp_path / "a", resume=True)
        assert not (ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")[-1] / ".metadata").exists()
    assert not dist.is_initialized()
    sharded = _train(_recipe(tiny_teacher), tmp_path / "b", resume=True)
    assert sharded.dist.sharded
    _assert_equal(_full(sharded), _full(plain))


# ---- slow: torchrun, 2 processes ------------------------------------------------------------------------------------
WORKER = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    import torch
    from dmdr.recipes import validate_recipe
    from dmdr.train import fsdp
    from dmdr.train.dmdr import DMDRTrainer
    from dmdr.train.runtime import prepare_run_dir, resolve_device, seed_everything

    recipe = validate_recipe(json.loads(Path(sys.argv[1]).read_text()))
    out, reports, how = Path(sys.argv[2]).resolve(), Path(sys.argv[3]), sys.argv[4]
    stop_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
    dev = resolve_device("cpu")
    prepare_run_dir(out, resume=how != "fresh", force=False)
    seed_everything(recipe.seed)
    tr = DMDRTrainer(recipe, out, dev, console=print)
    if how == "load":   # read the newest checkpoint, train nothing
        tr.resume()
    else:
        tr.run(resume=how == "resume", stop_at=stop_at)
    full = {n: fsdp.full_state(sd) for n, sd in tr.tensors().items()}
    for which in ("opt_gen", "opt_critic"):
        st = getattr(tr, which).state_dict()["state"]
        full[which] = {f"{i}.{k}": fsdp.full(v) for i, s in st.items() for k, v in s.items()}
    h = hashlib.sha256()
    for name, sd in sorted(full.items()):
        for k, v in sorted(sd.items()):
            h.update(name.encode() + k.encode() + v.contiguous().numpy().tobytes())
    local = sum(fsdp.local(p).numel() for p in tr.bundle.critic_params)
    if tr.dist.is_main:
        torch.save(full, reports / "full.pt")
    (reports / f"rank{tr.dist.rank}.json").write_text(json.dumps({
        "world": tr.dist.world_size, "mode": tr.dist.mode, "digest": h.hexdigest(), "step": tr.state.global_step,
        "critic_local_numel": local, "critic_numel": sum(p.numel() for p in tr.bundle.critic_params)}))
''')


def _torchrun(nproc: int, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DMDR_DISTRIBUTED", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    for _ in range(2):  # one retry: gloo on a loaded machine occasionally aborts at start-up (ecosystem.md §5)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if res.returncode == 0 or "SIGABRT" not in res.stderr:
            return res
    return res


def _launch(tmp_path, nproc, run, how, *extra, mode="fsdp2", teacher):
    rec = tmp_path / f"recipe-{mode}.json"
    rec.write_text(json.dumps(_recipe(teacher, mode)))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    reports = tmp_path / f"rep-{run}-{how}-{nproc}"
    reports.mkdir()
    res = _torchrun(nproc, worker, rec, tmp_path / run, reports, how, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    reps = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(nproc)]
    return reps, torch.load(reports / "full.pt", weights_only=True), res.stdout


@pytest.mark.slow
def test_fsdp2_two_ranks_match_ddp_and_resume_is_exact(tiny_teacher, tmp_path):
    """2 gloo processes: parameters are halved per rank, the run equals the DDP run (same per-rank data), the
    checkpoint is DCP (one shard file per rank), and stop at 3 + resume (2 processes) is bitwise the full run."""
    full, w, _ = _launch(tmp_path, 2, "full", "fresh", teacher=tiny_teacher)
    assert [r["world"] for r in full] == [2, 2] and full[0]["digest"] == full[1]["digest"]
    assert all(r["critic_local_numel"] * 2 == r["critic_numel"] for r in full)  # sharded, not replicated
    assert [r["step"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    last = ckpt.list_checkpoints(tmp_path / "full" / "checkpoints")[-1]
    assert {f.name for f in last.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt", "COMPLETE"}
    ddp, w_ddp, _ = _launch(tmp_path, 2, "ddp", "fresh", mode="ddp", teacher=tiny_teacher)
    for n in ("generator", "critic", "ema"):
        for k in w[n]:
            torch.testing.assert_close(w[n][k], w_ddp[n][k], rtol=1e-5, atol=1e-6)
    losses = [{k: v for k, v in r.items() if k.startswith("loss_")} for r in _records(tmp_path / "full")]
    losses_ddp = [{k: v for k, v in r.items() if k.startswith("loss_")} for r in _records(tmp_path / "ddp")]
    assert len(losses) == 5 and [l.keys() for l in losses] == [l.keys() for l in losses_ddp]
    for a, b in zip(losses, losses_ddp):  # the logged (rank-averaged) losses too
        assert all(b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7) for k in a)
    cut, _, _ = _launch(tmp_path, 2, "cut", "fresh", 3, teacher=tiny_teacher)
    assert cut[0]["step"] == 3
    resumed, _, _ = _launch(tmp_path, 2, "cut", "resume", teacher=tiny_teacher)
    assert resumed[0]["digest"] == resumed[1]["digest"] == full[0]["digest"]
    assert _records(tmp_path / "cut") == _records(tmp_path / "full")


@pytest.mark.slow
def test_dcp_checkpoint_reshards_across_world_sizes(tiny_teacher, tmp_path):
    """A 2-process checkpoint loads into 1 process (and a 1-process one into 2) with the same whole tensors
    (weights, EMA, AdamW moments), and a resumed run with a changed world size goes on to the end."""
    _, at3, _ = _launch(tmp_path, 2, "two", "fresh", 3, teacher=tiny_teacher)
    shutil.copytree(tmp_path / "two", tmp_path / "two-b")
    _, loaded1, _ = _launch(tmp_path, 1, "two", "load", teacher=tiny_teacher)
    _assert_equal(loaded1, at3)
    reps, _, out = _launch(tmp_path, 1, "two-b", "resume", teacher=tiny_teacher)
    assert reps[0]["step"] == 5 and "written by 2 process(es), this run has 1" in out
    assert [r["step"] for r in read_metrics(tmp_path / "two-b" / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    _, one3, _ = _launch(tmp_path, 1, "one", "fresh", 3, teacher=tiny_teacher)
    shutil.copytree(tmp_path / "one", tmp_path / "one-b")
    _, loaded2, _ = _launch(tmp_path, 2, "one", "load", teacher=tiny_teacher)
    _assert_equal(loaded2, one3)
    reps, _, _ = _launch(tmp_path, 2, "one-b", "resume", teacher=tiny_teacher)
    assert [r["step"] for r in reps] == [5, 5] and reps[0]["digest"] == reps[1]["digest"]


def test_export_sees_whole_lora_tensors_and_the_shards_come_back(one_rank):
    """The text-to-image export runs the family's own writer on whole tensors (peft's state dict of the gathered
    adapter); afterwards the module holds its sharded DTensor parameters again."""
    from peft import get_peft_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from dmdr.models.lora import add_lora, lora_state_dict
    from dmdr.models.tiny import TinyDiT, TinyDiTConfig

    ctx = fsdp.setup(None)
    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=2, heads=2))
    add_lora(m, "generator", rank=2, alpha=2, target_modules=["qkv", "fc1"])
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    want = {k: v.clone() for k, v in get_peft_model_state_dict(m, adapter_name="generator").items()}
    assert fsdp.shard_module(m, init_device_mesh("cpu", (ctx.world_size,))) == 3
    gathered = fsdp.full_state(lora_state_dict(m, "generator"))
    assert all(isinstance(v, DTensor) for v in lora_state_dict(m, "generator").values())
    got = fsdp.with_whole_parameters(m, gathered, lambda: get_peft_model_state_dict(m, adapter_name="generator"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(isinstance(v, DTensor) for v in got.values())
    assert all(isinstance(v, DTensor) for v in lora_state_dict(m, "generator").values())


def test_other_tasks_refuse_fsdp2(tmp_path):
    import yaml

    from dmdr.recipes import validate_recipe
    from dmdr.train.tasks import run_task

    raw = yaml.safe_load((ROOT / "recipes" / "digits-grpo.yaml").read_text())
    raw.setdefault("runtime", {})["distributed"] = "fsdp2"
    with pytest.raises(DistributedError, match="fsdp2 is for task: dmdr, not task: grpo"):
        run_task(validate_recipe(raw), tmp_path, torch.device("cpu"))
    raw["runtime"] = {"fsdp": {"reduce_dtype": "bf16"}}
    with pytest.raises(DistributedError, match="runtime.fsdp.reduce_dtype is set"):
        run_task(validate_recipe(raw), tmp_path, torch.device("cpu"))


def test_cli_fsdp2_without_torchrun_is_one_line(monkeypatch, tiny_teacher, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DMDR_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(_recipe(tiny_teacher)))
    res = CliRunner().invoke(app, ["train", str(rec), "--out", str(tmp_path / "run")])
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: runtime.distributed=fsdp2 needs a torchrun launch") and "Traceback" not in res.stderr


@pytest.mark.slow
def test_torchrun_fsdp2_sd3_smoke_exports_the_trained_lora(tmp_path):
    """`torchrun --nproc_per_node=2 -m dmdr train recipes/sd3-medium-4step.yaml --smoke` with fsdp2: the SD3
    stand-in (real config, shrunk) trains sharded, DCP checkpoints hold one shard file per rank, and the exported
    diffusers LoRA (which the SD3 pipeline reads) equals the generator LoRA of the last checkpoint."""
    import torch.distributed.checkpoint as dcp
    from diffusers import StableDiffusion3Pipeline

    run = tmp_path / "run"
    res = _torchrun(2, "-m", "dmdr", "train", ROOT / "recipes" / "sd3-medium-4step.yaml", "--smoke", "--out", run,
                    "--set", "logging.progress=false", "--set", "runtime.distributed=fsdp2", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    last = ckpt.list_checkpoints(run / "checkpoints")[-1]
    assert json.loads((last / "COMPLETE").read_text())["world_size"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {f.name for f in last.iterdir()}
    data = torch.load(last / "state.pt", weights_only=True)["data_ranks"]  # each rank's own prompt order
    assert len(data) == 2 and int(data[0]["seed"]) != int(data[1]["seed"])
    md = fsdp._safe_reader(last).read_metadata().state_dict_metadata
    want = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items() if k.startswith("generator.")}
    dcp.load(want, storage_reader=fsdp._safe_reader(last))
    lora = StableDiffusion3Pipeline.lora_state_dict(run / "student_lora")
    lora = lora[0] if isinstance(lora, tuple) else lora
    assert len(lora) == len(want) > 0
    for k, v in want.items():  # generator.net.<path>.lora_A.generator.weight -> transformer.<path>.lora_A.weight
        key = "transformer." + k[len("generator.net."):].replace(".generator.weight", ".weight")
        assert torch.equal(lora[key].to(v.dtype), v), key
    assert any(v.abs().sum() > 0 for k, v in want.items() if ".lora_B." in k)  # the generator did train


def test_fsdp2_lora_generator_and_monitor_rollbacks_match_the_plain_run(one_rank, tiny_teacher, tmp_path):
    """A LoRA generator on the sharded base, with monitors that roll back every step (snapshots and restores of
    sharded weights and AdamW states): bitwise the plain single-process run, and the same metrics."""
    import torch.distributed as dist

    rec = _recipe(tiny_teacher)
    rec["generator"]["lora"] = {"rank": 4, "alpha": 4}
    rec["stages"] = rec["stages"][:1]
    rec["monitors"] = {"every": 1, "samples": 20, "rollback": {"max_rollbacks": 20, "lr_factor": 0.9},
                       "checks": [{"kind": "x0_norm", "threshold": 1.0e-9, "action": "rollback"}]}
    sharded = _train(rec, tmp_path / "fsdp")
    assert sharded.bundle.generator_is_lora and sharded.monitor.bank.rollbacks >= 2
    got = _full(sharded)
    dist.destroy_process_group()
    os.environ.pop("WORLD_SIZE")
    plain = _train({**rec, "runtime": {"device": "cpu", "distributed": "none"}}, tmp_path / "plain")
    _assert_equal(_full(plain), got)
    assert _records(tmp_path / "plain") == _records(tmp_path / "fsdp")


@pytest.mark.slow
def test_torchrun_fsdp2_sdxl_smoke_exports_the_full_generator(tmp_path):
    """SDXL's layout (critic LoRA on the sharded base + a second, full-weights sharded UNet generator) under fsdp2
    with 2 processes: the exported diffusers UNet folder equals the generator of the last DCP checkpoint."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    run = tmp_path / "run"
    res = _torchrun(2, "-m", "dmdr", "train", ROOT / "recipes" / "sdxl-1step.yaml", "--smoke", "--out", run,
                    "--set", "logging.progress=false", "--set", "runtime.distributed=fsdp2", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    last = ckpt.list_checkpoints(run / "checkpoints")[-1]
    md = fsdp._safe_reader(last).read_metadata().state_dict_metadata
    want = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items() if k.startswith("generator.")}
    dcp.load(want, storage_reader=fsdp._safe_reader(last))
    unet = load_file(str(run / "student_unet" / "diffusion_pytorch_model.safetensors"))
    assert len(unet) == len(want) > 0
    for k, v in want.items():
        assert torch.equal(unet[k[len("generator."):]].to(v.dtype), v), k


def test_each_rank_resumes_its_own_prompt_order():
    from dmdr.data.prompts import PromptSampler

    samplers = [PromptSampler([f"p{i}" for i in range(7)], batch_size=1, seed=s) for s in (0, 1_000_003)]
    for n, s in zip((3, 9), samplers):  # rank 1 went into its second epoch
        for _ in range(n):
            s.next_batch()
    ranks = [fsdp.data_tensors(s.state_dict()) for s in samplers]
    state = {"data": samplers[0].state_dict(), "data_ranks": ranks}
    for r, s in enumerate(samplers):
        back = fsdp.data_state_for(state, r)
        fresh = PromptSampler([f"p{i}" for i in range(7)], batch_size=1, seed=123)
        fresh.load_state_dict(back)
        assert fresh.seed == s.seed and fresh._order == s._order and fresh.cursor == s.cursor
    assert fsdp.data_state_for(state, 2) is None                  # a new rank keeps its own fresh order
    plain = {"data": samplers[0].state_dict()}
    assert fsdp.data_state_for(plain, 1) is plain["data"]          # an older checkpoint: rank 0's state, as DDP


def test_fsdp2_failed_checkpoint_write_is_one_line_and_keeps_the_last_one(one_rank, tiny_teacher, tmp_path,
                                                                          monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    rec = _recipe(tiny_teacher)
    rec["stages"] = rec["stages"][:1]
    tr = _train(rec, tmp_path / "run")
    before = [d.name for d in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    tr.state.global_step += 1

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save = dcp.save
    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint step 4 .*No space left on device.*"
                                                   r"the last complete checkpoint .*step-0000003 is intact"):
        tr.save()
    assert [d.name for d in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == before
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(dcp, "save", real_save)
    monkeypatch.setattr(ckpt, "_sha256", full_disk)   # rank 0's manifest step fails: every rank raises
    with pytest.raises(ckpt.CheckpointError, match="cannot write checkpoint step 4"):
        tr.save()
    assert [d.name for d in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == before


def test_dry_run_of_an_fsdp2_recipe_without_torchrun_prints_per_gpu_memory(monkeypatch):
    """`dmdr train RECIPE --dry-run` of an fsdp2 recipe needs no torchrun: it builds unsharded and adds the per-GPU
    estimate; its parts add up with the one-GPU estimate (the sharded part divided by N)."""
    import re

    from typer.testing import CliRunner

    from dmdr.recipes import load_recipe
    from dmdr.train.memory_estimate import GIB, estimate_t2i_memory
    from dmdr_cli.app import app

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DMDR_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    recipe = ROOT / "recipes" / "sd3-medium-4step.yaml"
    res = CliRunner().invoke(app, ["train", str(recipe), "--dry-run", "--smoke", "--set", "runtime.distributed=fsdp2"])
    assert res.exit_code == 0, res.output
    head = re.search(r"fsdp2 per GPU \(estimate\): replicated ([\d.]+) GiB \+ gathered ([\d.]+) \+ activations "
                     r"([\d.]+) \+ sharded \(([\d.]+)\) / N", res.output)
    per_n = {int(n): float(v) for n, v in re.findall(r"N=(\d+): ([\d.]+) GiB", res.output)}
    assert head and sorted(per_n) == [2, 4, 8] and per_n[2] > per_n[4] > per_n[8]
    rep, gat, act, sh = map(float, head.groups())
    for n, v in per_n.items():
        assert v == pytest.approx(rep + gat + act + sh / n, abs=0.11)
    est = estimate_t2i_memory(load_recipe(recipe, []))
    assert rep + sh == pytest.approx((est.weights + est.optimiser) / GIB, abs=0.11)  # nothing lost or counted twice
    assert 0 < gat < sh


def test_an_fsdp2_checkpoint_reads_like_any_other(one_rank, tiny_teacher, tmp_path):
    """``read_checkpoint`` of a DCP checkpoint gives the whole generator/critic/EMA tensors (read on demand), so
    ``dmdr sample`` of an interrupted FSDP2 run (no student.safetensors yet) samples its latest generator."""
    import torch.distributed as dist

    from dmdr.sampling import load_student

    tr = _train(_recipe(tiny_teacher), tmp_path / "run", stop_at=3)
    want = _full(tr)
    dist.destroy_process_group()
    last = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    tensors, state, _ = ckpt.read_checkpoint(last)
    assert sorted(tensors) == ["critic", "ema", "generator"] and "opt_gen_groups" in state
    for name in ("generator", "critic", "ema"):
        assert tensors[name].keys() == want[name].keys()
        assert all(torch.equal(tensors[name][k], want[name][k]) for k in want[name])
    assert not (tmp_path / "run" / "student.safetensors").exists()
    model, info = load_student(tmp_path / "run")
    assert all(torch.equal(model.state_dict()[k], want["generator"][k]) for k in want["generator"])
    assert info.steps == 2
