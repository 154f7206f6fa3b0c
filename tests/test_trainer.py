"""The DMDR trainer on a tiny random teacher: the update ratio, schedules, stages and outputs."""
import json

import pytest
import torch

from dmdr.recipes import validate_recipe
from dmdr.train.dmdr import DMDRTrainer, recipe_changes


def _recipe(teacher, **over):
    d = {"task": "dmdr", "name": "t", "seed": 0,
         "model": {"teacher": teacher},
         "critic": {"lora": {"rank": 4, "alpha": 4}},
         "optim": {"ratio": 3, "lr_gen": 1e-3, "lr_critic": 1e-3},
         "dmd": {"dynadg": {"horizon": 4, "scale0": 0.5}, "dynars": {"horizon": 4}},
         "generator": {"steps": 2, "backward_sim": "sde"},
         "logging": {"log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False},
         "stages": [{"name": "cold", "steps": 3, "batch_size": 4},
                    {"name": "joint", "steps": 2, "batch_size": 4, "lr_gen": 5e-4,
                     "rewards": [{"name": "digits_classifier", "weight": 0.5}]}]}
    for k, v in over.items():
        d[k] = v
    return validate_recipe(d)


def test_update_ratio_is_exact(tiny_teacher):
    torch.manual_seed(0)
    tr = DMDRTrainer(_recipe(tiny_teacher), None, torch.device("cpu"))
    gen_updates = 0
    for i in range(1, 13):
        out = tr.iteration()
        gen_updates += int("loss_dmd" in out)
        assert ("loss_dmd" in out) == (i % 3 == 0)
        assert "loss_fake_score" in out
    assert tr.state.inner_step == 12 and tr.state.global_step == gen_updates == 4


def test_generator_update_changes_only_the_generator_and_critic_only_the_critic(tiny_teacher):
    torch.manual_seed(0)
    tr = DMDRTrainer(_recipe(tiny_teacher), None, torch.device("cpu"))
    g0 = [p.detach().clone() for p in tr.bundle.generator_params]
    c0 = [p.detach().clone() for p in tr.bundle.critic_params]
    base0 = {n: p.detach().clone() for n, p in tr.bundle.base.named_parameters() if "lora" not in n}
    tr.iteration()  # critic only
    assert all(torch.equal(a, b) for a, b in zip(g0, tr.bundle.generator_params))
    assert any(not torch.equal(a, b) for a, b in zip(c0, tr.bundle.critic_params))
    c1 = [p.detach().clone() for p in tr.bundle.critic_params]
    tr.iteration()
    tr.iteration()  # third: critic + generator
    assert any(not torch.equal(a, b) for a, b in zip(g0, tr.bundle.generator_params))
    # the teacher (frozen base) never moves
    assert all(torch.equal(p, base0[n]) for n, p in tr.bundle.base.named_parameters() if "lora" not in n)
    assert c1 is not None


def test_dynadg_schedule_in_metrics_and_stage_carry_over(tiny_teacher, tmp_path):
    torch.manual_seed(0)
    tr = DMDRTrainer(_recipe(tiny_teacher), tmp_path, torch.device("cpu"))
    opt_state_ids = id(tr.opt_gen)
    summary = tr.run()
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in recs] == ["cold"] * 3 + ["joint"] * 2
    lam = [r["lambda_real"] for r in recs]
    assert lam[0] == pytest.approx(0.5) and lam[2] == pytest.approx(0.25) and lam[4] == 0.0
    assert all("loss_reward_digits_classifier" in r for r in recs[3:])
    assert not any("loss_reward_digits_classifier" in r for r in recs[:3])
    assert recs[3]["lr_gen"] == 5e-4 and recs[0]["lr_gen"] == 1e-3
    assert id(tr.opt_gen) == opt_state_ids and tr.opt_gen.state  # same optimiser, state carried over
    assert (tmp_path / "student.safetensors").exists() and summary["final_grid"].exists()
    assert tr.state.stage == 2 and tr.state.inner_step == 15


def test_recipe_changes_classifies_fields(tiny_teacher):
    a = _recipe(tiny_teacher)
    b = _recipe(tiny_teacher, logging={"log_every": 7, "progress": False}, generator={"steps": 3})
    blocking, harmless = recipe_changes(a, b)
    assert "generator.steps" in blocking and "logging.log_every" in harmless
