"""The family-interface refactor (issue 12) changes no result: hash what unchanged smoke recipes produce.

For each case, ``dmdr train RECIPE --smoke`` runs on one thread with the recipe's fixed seed, and this script
records the sha256 of the content (tensors + metadata, see :func:`content_sha256`) of every exported student file (the files the run lists: ``student``, ``lora`` ...) and the
losses the run logged (``metrics.jsonl``, every number of every line, as floats printed with ``repr``). Run it once on
the code before the change (``--label before``) and once after (``--label after``) into the same results file; the
``identical`` field then says whether every hash and every loss matches bit for bit.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/refactor_identity.py --label before --out bench/results/refactor_identity.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/refactor_identity.py --label after  --out bench/results/refactor_identity.json

Float results are bitwise reproducible only on the same CPU code path: the file records
``torch.backends.cpu.get_cpu_capability()`` next to each label (tests/test_refactor_identity.py compares against a
recorded hash only when the capability matches).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DMDR = [sys.executable, "-m", "dmdr_cli"] if not (ROOT / ".venv/bin/dmdr").exists() else [str(ROOT / ".venv/bin/dmdr")]

CASES = {  # name -> (recipe, extra --set overrides)
    "digits": ("recipes/digits.yaml", []),
    "digits-grpo": ("recipes/digits-grpo.yaml", []),
    "sd3-medium-4step": ("recipes/sd3-medium-4step.yaml", []),
    "sdxl-1step": ("recipes/sdxl-1step.yaml", []),
}
COMMON = ["logging.progress=false", "runtime.threads=1"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(path: Path) -> str:
    """sha256 of a safetensors file's content: every tensor (name, dtype, shape, bytes, in name order) and the
    metadata (key order). The file's own bytes are not reproducible: safetensors writes its metadata map in a
    random order (a Rust HashMap), so two identical runs give different file hashes."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        h.update(json.dumps(sorted((f.metadata() or {}).items())).encode())
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch_uint8()).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def torch_uint8():
    import torch

    return torch.uint8


def student_files(run: Path) -> list[Path]:
    """Every exported student file of a run directory (not checkpoints, samples or logs)."""
    out = []
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if not p.is_file() or rel.parts[0] in ("checkpoints", "samples", "monitors") or p.suffix != ".safetensors":
            continue
        out.append(p)
    return out


def _clock(key: str) -> bool:
    """Wall-clock / memory fields: they vary between runs and are no result."""
    return key.endswith(("_s", "_sec", "per_s")) or any(s in key for s in ("time", "wall", "mem", "throughput", "eta_"))


def losses(run: Path) -> list[dict]:
    """The numbers of metrics.jsonl, without wall-clock fields."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        rows.append({k: repr(v) for k, v in sorted(d.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and not _clock(k)})
    return rows


def run_case(name: str, recipe: str, extra: list[str], tmp: Path) -> dict:
    out = tmp / name
    cmd = [*DMDR, "train", recipe, "--smoke", "--out", str(out), "--force"]
    for o in COMMON + extra:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return {"command": " ".join(["dmdr", *cmd[len(DMDR):]]).replace(str(tmp), "$TMP"),
            "students": {str(p.relative_to(out)): content_sha256(p) for p in student_files(out)},
            "metrics_sha256": hashlib.sha256(json.dumps(losses(out)).encode()).hexdigest(),
            "last_losses": losses(out)[-1] if losses(out) else {}, "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="before | after (a key of the results file)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/refactor_identity.json")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    a = ap.parse_args()
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "dmdr", "cli"],
                                capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        cases = {n: run_case(n, *CASES[n], Path(tmp)) for n in a.cases}
    data = json.loads(a.out.read_text()) if a.out.exists() else {}
    data[a.label] = {"commit": rev, "uncommitted_changes_in_dmdr_or_cli": dirty,
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                     "command": f"OMP_NUM_THREADS=1 python bench/refactor_identity.py --label {a.label}", "cases": cases}
    if "before" in data and "after" in data:
        b, f = data["before"]["cases"], data["after"]["cases"]
        data["identical"] = {n: (b[n]["students"] == f[n]["students"] and b[n]["metrics_sha256"] == f[n]["metrics_sha256"])
                             for n in b if n in f}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({n: c["students"] | {"metrics": c["metrics_sha256"]} for n, c in cases.items()}, indent=1))
    if "identical" in data:
        print("identical:", data["identical"])


if __name__ == "__main__":
    main()
