"""Saved-activation bytes of Wan2.1-T2V-1.3B at real size, traced on the meta device (figures in docs/families/wan.md).

For one clip of 480×832 and the frame counts below: the transformer forward with grad (bf16, 512 UMT5 tokens) with
and without gradient checkpointing, and the differentiable VAE decode (float32, as WanPipeline keeps the VAE) of the
first F frames (F = 1 is ``model.reward_frames: 1``), plus the ``--dry-run`` estimate of the shipped recipe.
Shapes only: no weights, no memory, deterministic (no timing). Results: ``bench/results/wan_memory.json``.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/wan_memory.py      # ~2 min on one CPU core
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dmdr.models.standins import quiet_diffusers
from dmdr.train.memory_estimate import GIB
from dmdr.train.memory_wan import wan_activation_bytes, wan_decode_activation_bytes

NAME = "wan2.1-t2v-1.3b"
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from dmdr.families import family
    from dmdr.recipes import load_recipe

    out = {"config": NAME, "height": 480, "width": 832, "unit": "GiB", "transformer_bf16": {}, "vae_decode_fp32": {},
           "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/wan_memory.py"}
    with quiet_diffusers():
        for frames in (81, 49):
            for ckpt in (False, True):
                a, _ = wan_activation_bytes(NAME, 480, 832, frames, torch.bfloat16, checkpointing=ckpt)
                out["transformer_bf16"][f"{frames}_frames{'_checkpointing' if ckpt else ''}"] = round(a / GIB, 2)
        for frames in (1, 5, 81):
            a, _ = wan_decode_activation_bytes(NAME, 480, 832, frames, torch.float32)
            out["vae_decode_fp32"][f"{frames}_frames"] = round(a / GIB, 2)
    recipe_file = ROOT / "recipes" / f"{NAME}-4step.yaml"
    for label, sets in (("recipe", []), ("recipe_all_frames_rewarded", ["model.reward_frames=null"]),
                        ("recipe_no_checkpointing", ["model.gradient_checkpointing=false"])):
        r = load_recipe(recipe_file, sets)
        est = family("wan").memory(r)
        out[f"dry_run_{label}"] = {k: round(v, 2) for k, v in est.gib().items()}
    path = ROOT / "bench" / "results" / "wan_memory.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
