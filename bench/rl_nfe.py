"""Network evaluations per GRPO iteration for each regulariser, counted by the trainer (``nfe_total``,
:mod:`dmdr.train.nfe`), on the shipped ``recipes/digits-grpo.yaml`` at ``generator.steps`` N (B = 64, G = 8,
32-transition minibatches, 2 PPO epochs). A count, not a timing: it does not depend on the machine or its load.

    OMP_NUM_THREADS=1 python bench/rl_nfe.py --steps 4      # -> bench/results/rl_nfe.json

Each configuration runs 2 iterations from the teacher-initialised student; iteration 2 is reported (iteration 1
also holds a 2-sample log-prob shape probe).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "none": ["rl.regularizer=none"],
    "kl": ["rl.regularizer=kl"],
    "dmd (optim.ratio 5 fresh critic updates per step: the old default)": ["rl.regularizer=dmd"],
    "dmd, 1 critic update per step, fresh samples": ["rl.regularizer=dmd", "rl.critic_updates=1"],
    "dmd, 1 critic update per step, reusing the rollout": ["rl.regularizer=dmd", "rl.critic_updates=1",
                                                           "rl.critic_reuse_rollout=true"],
    "dmd_ca_adv, 1 critic update per step, reusing the rollout": ["rl.regularizer=dmd_ca_adv", "dmd.cfg=2.0",
                                                                  "rl.critic_updates=1",
                                                                  "rl.critic_reuse_rollout=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import torch

    from dmdr.recipes import load_recipe
    from dmdr.train.grpo import GRPOTrainer

    torch.set_num_threads(1)
    rows = {}
    for name, over in CONFIGS.items():
        with tempfile.TemporaryDirectory() as d:
            r = load_recipe(ROOT / "recipes" / "digits-grpo.yaml", [
                "runtime.device=cpu", f"generator.steps={args.steps}", "iterations=2", "eval.samples=0",
                "logging.progress=false", "logging.log_every=1", "logging.sample_every=0",
                "logging.checkpoint_every=0", *over])
            GRPOTrainer(r, Path(d), torch.device("cpu"), console=lambda *a: None).run()
            m = [json.loads(l) for l in (Path(d) / "metrics.jsonl").read_text().splitlines()][-1]
        rows[name] = {k: m[k] for k in ("nfe_forward", "nfe_backward", "nfe_total", "ppo_updates")}
        rows[name]["overrides"] = over
        print(name, rows[name]["nfe_total"], flush=True)
    kl = rows["kl"]["nfe_total"]
    for v in rows.values():
        v["ratio_to_kl"] = v["nfe_total"] / kl
    out = {"command": f"OMP_NUM_THREADS=1 python bench/rl_nfe.py --steps {args.steps}",
           "recipe": "recipes/digits-grpo.yaml", "steps": args.steps,
           "unit": "samples through a network per iteration, forward + backward", "configs": rows}
    path = ROOT / "bench" / "results" / ("rl_nfe.json" if args.steps == 4 else f"rl_nfe_n{args.steps}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
