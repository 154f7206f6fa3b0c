"""FSDP2 on the device it is for: the digits DMDR run on CUDA/NCCL, sharded with ``runtime.distributed: fsdp2``.

What it checks (docs/distributed.md, "What has run"), on ``--device cuda`` (default) or ``cpu``:

1. ``plain``: one process without torchrun, 5 generator steps (2 stages, a reward, EMA, LoRA critic, full-weights
   generator);
2. ``fsdp``: the same recipe under ``torchrun --nproc_per_node=N`` (N = the GPU count, or ``--nproc``) with fsdp2;
3. ``cut`` + ``resume``: stopped at step 3, resumed with the same N: must equal ``fsdp`` bitwise;
4. ``reshard``: the step-3 checkpoint resumed with 1 process when N > 1 (or 2 when N == 1 and two devices exist):
   must reach step 5.

Per case: the SHA-256 over the whole (gathered) generator, critic, EMA and AdamW states, wall time, and on CUDA the
peak memory of rank 0. For N == 1, ``fsdp`` is also compared with ``plain`` (max abs difference; bitwise on the
CPU here). Writes one JSON file (default ``bench/results/device_fsdp.json``).

    bash bench/device_fsdp.sh                 # GPU machine
    bash bench/device_fsdp.sh --device cpu    # CPU (gloo), e.g. to check the script itself
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r'''
import hashlib, json, sys
from pathlib import Path
import torch
from dmdr.recipes import validate_recipe
from dmdr.train import fsdp
from dmdr.train.dmdr import DMDRTrainer
from dmdr.train.runtime import prepare_run_dir, resolve_device, seed_everything

recipe = validate_recipe(json.loads(Path(sys.argv[1]).read_text()))
out, report, how = Path(sys.argv[2]).resolve(), Path(sys.argv[3]), sys.argv[4]
stop_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
dev = resolve_device(recipe.runtime.device)
prepare_run_dir(out, resume=how == "resume", force=False)
seed_everything(recipe.seed)
tr = DMDRTrainer(recipe, out, dev, console=lambda *a, **k: None)
tr.run(resume=how == "resume", stop_at=stop_at)
full = {n: fsdp.full_state(sd) for n, sd in tr.tensors().items()}
for which in ("opt_gen", "opt_critic"):
    st = getattr(tr, which).state_dict()["state"]
    full[which] = {f"{i}.{k}": fsdp.full(v) for i, s in st.items() for k, v in s.items()}
h = hashlib.sha256()
for name, sd in sorted(full.items()):
    for k, v in sorted(sd.items()):
        h.update(name.encode() + k.encode() + v.float().contiguous().numpy().tobytes())
if tr.dist.is_main:
    torch.save(full, report.with_suffix(".pt"))
    report.write_text(json.dumps({
        "world": tr.dist.world_size, "mode": tr.dist.mode, "digest": h.hexdigest(), "step": tr.state.global_step,
        "peak_bytes_rank0": int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None}))
'''


def _recipe(teacher: str, device: str, mode: str) -> dict:
    return {"task": "dmdr", "name": "fsdp-bench", "seed": 0, "runtime": {"device": device, "distributed": mode},
            "model": {"teacher": teacher}, "critic": {"lora": {"rank": 4, "alpha": 4}},
            "generator": {"steps": 2}, "dmd": {"cfg": 2.0, "dynadg": {"horizon": 4}, "dynars": {"horizon": 4}},
            "optim": {"ratio": 2, "lr_gen": 1e-3, "lr_critic": 1e-3, "ema_decay": 0.9},
            "stages": [{"name": "cold", "steps": 3, "batch_size": 8},
                       {"name": "joint", "steps": 2, "batch_size": 8,
                        "rewards": [{"name": "digits_classifier", "weight": 0.1}]}],
            "logging": {"log_every": 1, "sample_every": 0, "checkpoint_every": 2, "keep_last": 5, "progress": False}}


def _run(cmd: list[str], timeout: int) -> tuple[int, float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("DMDR_DISTRIBUTED", None)
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return res.returncode, time.time() - t0, (res.stdout + res.stderr)[-2000:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--nproc", type=int, default=0, help="processes for the fsdp cases (0: GPU count, CPU: 2)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "device_fsdp.json"))
    ap.add_argument("--timeout", type=int, default=150, help="seconds per launch")
    a = ap.parse_args()
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device; use --device cpu")
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    n = a.nproc or (gpus if a.device == "cuda" else 2)
    other = 1 if n > 1 else (2 if a.device == "cpu" or gpus >= 2 else 0)
    work = Path(tempfile.mkdtemp(prefix="dmdr-fsdp-bench-"))
    from dmdr.models.tiny import TinyDiT, TinyDiTConfig, save_tiny

    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=64, depth=4, heads=4, num_classes=10))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    teacher = str(work / "teacher.safetensors")
    save_tiny(m, teacher)
    (work / "worker.py").write_text(WORKER)
    recipes = {}
    for mode in ("none", "fsdp2"):
        recipes[mode] = work / f"recipe-{mode}.json"
        recipes[mode].write_text(json.dumps(_recipe(teacher, a.device, mode)))
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cases = [("plain", [sys.executable, str(work / "worker.py"), str(recipes["none"]), str(work / "plain")], "fresh"),
             ("fsdp", tr + [f"--nproc_per_node={n}", str(work / "worker.py"), str(recipes["fsdp2"]),
                            str(work / "fsdp")], "fresh"),
             ("cut", tr + [f"--nproc_per_node={n}", str(work / "worker.py"), str(recipes["fsdp2"]),
                           str(work / "cut")], "fresh", "3"),
             ("resume", tr + [f"--nproc_per_node={n}", str(work / "worker.py"), str(recipes["fsdp2"]),
                              str(work / "cut")], "resume")]
    results: dict = {"device": a.device, "nproc": n, "torch": torch.__version__, "python": platform.python_version(),
                     "gpu": torch.cuda.get_device_name(0) if gpus else None, "gpus": gpus,
                     "loadavg_start": os.getloadavg(), "cases": {}}
    for name, cmd, how, *extra in cases:
        if name == "resume" and other:  # keep a copy of the step-3 run for the resharding case
            shutil.copytree(work / "cut", work / "cut-other")
        report = work / f"{name}.json"
        code, wall, tail = _run(cmd + [str(report), how, *extra], a.timeout)
        rec = json.loads(report.read_text()) if code == 0 and report.exists() else {"error": tail}
        results["cases"][name] = {**rec, "rc": code, "wall_s": round(wall, 1)}
        print(name, results["cases"][name].get("digest", "FAILED")[:16], f"{wall:.1f}s", flush=True)
    if other:
        code, wall, tail = _run(tr + [f"--nproc_per_node={other}", str(work / "worker.py"), str(recipes["fsdp2"]),
                                      str(work / "cut-other"), str(work / "reshard.json"), "resume"], a.timeout)
        rep = work / "reshard.json"
        results["cases"]["reshard"] = {**(json.loads(rep.read_text()) if code == 0 and rep.exists() else
                                          {"error": tail}), "rc": code, "wall_s": round(wall, 1)}
    c = results["cases"]
    checks = {"fsdp_resume_bitwise": c["resume"].get("digest") == c["fsdp"].get("digest") is not None,
              "reshard_reached_step_5": c.get("reshard", {}).get("step") == 5 if other else None}
    if n == 1 and "error" not in c["plain"] and "error" not in c["fsdp"]:
        a_, b_ = torch.load(work / "plain.pt", weights_only=True), torch.load(work / "fsdp.pt", weights_only=True)
        checks["fsdp1_vs_plain_max_abs"] = max(float((a_[g][k].float() - b_[g][k].float()).abs().max())
                                               for g in a_ for k in a_[g])
    results["checks"] = checks
    results["loadavg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(checks), "->", a.out)
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if checks["fsdp_resume_bitwise"] and checks["reshard_reached_step_5"] is not False else 1)


if __name__ == "__main__":
    main()
