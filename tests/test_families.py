"""The family seam (dmdr/families): the registry, the protocol each family answers, and a trainer that only asks
its family (a family the trainer has never heard of trains, samples and exports)."""
from pathlib import Path

import pytest
import torch

from dmdr.families import Bundle, Family, family, get_family
from dmdr.families.digits import DigitsFamily
from dmdr.families.registry import FAMILIES, run_family
from dmdr.recipes import load_recipe, validate_recipe
from dmdr.train.dmdr import DMDRTrainer

ROOT = Path(__file__).resolve().parent.parent


def _digits(teacher, **over):
    d = {"task": "dmdr", "name": "fam", "seed": 0, "model": {"teacher": teacher},
         "optim": {"ratio": 2, "lr_gen": 1e-3, "lr_critic": 1e-3, "ema_decay": 0.9},
         "generator": {"steps": 2, "backward_sim": "sde"}, "sample_classes": 3,
         "logging": {"log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False},
         "stages": [{"name": "dmd", "steps": 2, "batch_size": 4}]}
    d.update(over)
    return validate_recipe(d)


def _t2i(name="sd3-medium-4step", *extra):
    return load_recipe(ROOT / "recipes" / f"{name}.yaml", ["model.smoke=true", "logging.progress=false", *extra])


# ---- the registry -------------------------------------------------------------------------------------------------
def test_registry_maps_every_family_to_one_stateless_instance():
    for name in FAMILIES:
        f = family(name)
        assert isinstance(f, Family) and f.name == name and family(name) is f
        assert f.conditioning in ("labels", "prompts")
    assert get_family(_t2i("sdxl-1step")) is family("sdxl")


def test_unknown_family_is_one_line():
    with pytest.raises(ValueError, match=r"model.family='nope' is not a registered family; available: tiny, sd3, sdxl"):
        family("nope")


def test_run_family_reads_the_run_recipe_and_defaults_to_digits(tmp_path):
    assert run_family(tmp_path) is family("tiny")          # no recipe.yaml: a digits run (old layout)
    from dmdr.recipes import save_recipe

    save_recipe(_t2i("sdxl-1step"), tmp_path / "recipe.yaml")
    assert run_family(tmp_path) is family("sdxl")


# ---- the digits family --------------------------------------------------------------------------------------------
def test_digits_sample_inputs_are_fixed_and_leave_the_global_rng_alone(tiny_teacher):
    r = _digits(tiny_teacher)
    fam = get_family(r)
    b = fam.build(r, torch.device("cpu"))
    assert isinstance(b, Bundle) and b.grid.dtype == torch.float32 and b.grid.shape == (3,)
    state = torch.get_rng_state()
    grid = fam.sample_inputs(b, "grid")
    mon = fam.sample_inputs(b, "monitor", n=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert grid.labels.tolist() == [c for c in range(3) for _ in range(10)] and grid.row_labels == ["0", "1", "2"]
    assert grid.step_noise.shape == (2, 30, *b.sample_shape)          # sde: fixed per-step noise
    assert mon.reward_cond.tolist() == [0, 1, 2, 3, 4, 5, 6] and len(mon) == 7
    again = fam.sample_inputs(b, "monitor", n=7)
    assert torch.equal(mon.noise, again.noise) and torch.equal(mon.step_noise, again.step_noise)
    x = fam.sample(b, mon)
    assert x.shape == (7, *b.sample_shape) and torch.equal(x, fam.sample(b, again))
    with pytest.raises(ValueError, match="unknown purpose 'user'"):
        fam.sample_inputs(b, "user")


def test_digits_export_round_trips_through_load_export(tiny_teacher, tmp_path):
    r = _digits(tiny_teacher)
    fam = get_family(r)
    b = fam.build(r, torch.device("cpu"))
    ema = {k: v + 0.01 for k, v in b.generator_state().items()}
    live = {k: v.clone() for k, v in b.generator_state().items()}
    path = fam.export(b, tmp_path / "student.safetensors", state=ema, global_step=3)
    assert all(torch.equal(v, live[k]) for k, v in b.generator_state().items()), "export must not touch live weights"
    fam.load_export(b, path)
    assert all(torch.allclose(v, ema[k]) for k, v in b.generator_state().items())
    from dmdr.sampling import load_student

    _, info = load_student(tmp_path)
    assert (info.steps, info.mode) == (2, "sde")


# ---- the diffusers text-to-image base -----------------------------------------------------------------------------
def test_t2i_sample_inputs_batches_and_seeds():
    r = _t2i()
    fam = get_family(r)
    b = fam.build(r, torch.device("cpu"))
    assert b.sample_prompts and b.resolution == 64 and b.grid.dtype == torch.float32
    prompts = [f"p{i}" for i in range(10)]
    user = fam.sample_inputs(b, "user", prompts=prompts, seed=5)
    assert user.batches == [(prompts[:8], 5), (prompts[8:], 13)] and user.reward_cond == prompts
    mon = fam.sample_inputs(b, "monitor", prompts=["a", "b"], repeats=3)
    assert mon.batches == [(["a", "b"], 9000), (["a", "b"], 9001), (["a", "b"], 9002)]
    assert mon.groups.tolist() == [0, 1, 0, 1, 0, 1] and mon.reward_cond == ["a", "b"] * 3
    ev = fam.sample_inputs(b, "eval", prompts=["a", "b"], seed=1)
    x = fam.sample(b, ev)
    assert x.shape == (2, *b.sample_shape)
    t = fam.sample_teacher(b, ev, steps=2, cfg=1.0)
    assert t.shape == x.shape and not torch.equal(t, x)
    assert fam.render(b, x).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="conditioned on prompts, not class labels"):
        fam.sample_inputs(b, "user", labels=torch.zeros(2))


def test_t2i_data_state_resumes_the_prompt_order():
    r = _t2i()
    fam = get_family(r)
    b = fam.build(r, torch.device("cpu"))
    fam.conditions(b, 3)
    saved = fam.data_state(b)
    nxt = fam.conditions(b, 3).reward
    fam.load_data_state(b, saved)
    assert fam.conditions(b, 3).reward == nxt


def test_t2i_checks_fail_before_any_weights_with_one_line():
    with pytest.raises(ValueError, match="model.config=sdxl-base does not match model.family=sd3; use sd3-medium or "
                                         "sd35-large"):
        family("sd3").config_name(_t2i("sd3-medium-4step", "model.config=sdxl-base"))
    with pytest.raises(ValueError, match=r"model.t_min=0.01: SD3 uses"):
        family("sd3").check(_t2i("sd3-medium-4step", "model.t_min=0.01"))


# ---- the trainer asks its family, not a name ---------------------------------------------------------------------
class _Renamed(DigitsFamily):
    """A family the trainers have never heard of: the digits family under another name, with its own export."""

    name = "renamed"
    calls: list = []

    def sample(self, bundle, inputs, *, steps=None):
        self.calls.append("sample")
        return super().sample(bundle, inputs, steps=steps)

    def export(self, bundle, path, *, state=None, global_step=0):
        self.calls.append(("export", state is not None, global_step))
        out = Path(path).with_suffix(".renamed")
        out.write_text("ok")
        return out


def test_a_new_family_trains_samples_and_exports_through_the_protocol_only(tiny_teacher, tmp_path):
    r = _digits(tiny_teacher)
    fam = _Renamed()
    b = fam.build(r, torch.device("cpu"))
    tr = DMDRTrainer(r, tmp_path, torch.device("cpu"), console=lambda *a, **k: None, bundle=b)
    assert tr.family is fam
    summary = tr.run()
    assert summary["student"] == tmp_path / "student.renamed" and ("export", True, 2) in fam.calls
    assert "sample" in fam.calls and summary["final_grid"].exists()
