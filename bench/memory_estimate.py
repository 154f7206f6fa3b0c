"""The `dmdr train --dry-run` peak-GPU-memory estimates of the shipped T2I recipes, and the per-image activation
traces behind them (docs/scale.md, docs/recipes.md). Deterministic (meta-device traces; no weights, no GPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory_estimate.py      # -> bench/results/memory_estimate.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dmdr.models.standins import quiet_diffusers
from dmdr.recipes import load_recipe, recipes_dir
from dmdr.train.memory_estimate import GIB, estimate_t2i_memory, network_activation_bytes, vae_decode_activation_bytes

RECIPES = ("sd3-medium-4step", "sd3-medium-4step-srpo", "sd35-large-4step", "sd35-large-4step-srpo", "sdxl-1step")


def main() -> None:
    out = {"command": "OMP_NUM_THREADS=1 .venv/bin/python bench/memory_estimate.py", "torch": torch.__version__,
           "recipes": {}, "activations_per_image_gib": {}}
    for name in RECIPES:
        e = estimate_t2i_memory(load_recipe(recipes_dir() / f"{name}.yaml"))
        out["recipes"][name] = {**{k: round(v, 3) for k, v in e.gib().items()}, "detail": e.detail, "line": e.line()}
        print(e.line())
    with quiet_diffusers():
        for model, res, tokens in (("sd3-medium", 512, 205), ("sd35-large", 1024, 205), ("sdxl-base", 1024, None)):
            for ck in (False, True):
                b, _ = network_activation_bytes(model, res, torch.bfloat16, checkpointing=ck, text_tokens=tokens)
                out["activations_per_image_gib"][f"{model}/{res}px/ckpt={ck}"] = round(b / GIB, 3)
        for tiny in (False, True):
            for ck in (False, True):
                b, _ = vae_decode_activation_bytes("sdxl-base", 1024, torch.bfloat16, checkpointing=ck, tiny=tiny)
                key = f"{'taesdxl' if tiny else 'vae'}_decode/1024px/ckpt={ck}"
                out["activations_per_image_gib"][key] = round(b / GIB, 3)
    path = Path(__file__).parent / "results" / "memory_estimate.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["activations_per_image_gib"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
