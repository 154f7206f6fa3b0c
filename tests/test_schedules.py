"""Schedule values against hand-computed references (method.md §2.1, §2.6, §2.7)."""
import math

import pytest
import torch

from dmdr.schedules import (cosine_decay, dynadg_scale, dynars_beta_params, few_step_grid, sample_dynars,
                            sample_grid_steps, sample_uniform)


@pytest.mark.parametrize("n,shift,tmin,expected", [
    (4, 3.0, 0.001, [1.0, 0.90012, 0.75037, 0.50100, 0.001]),   # SD3-Medium (method.md §2.1 table)
    (4, 5.0, 0.001, [1.0, 0.93758, 0.83361, 0.62594, 0.001]),   # SD3.5-Large
    (1, 1.0, 0.0, [1.0, 0.0]),                                  # SiT / digits 1-step
])
def test_few_step_grid_reference_values(n, shift, tmin, expected):
    g = few_step_grid(n, shift, tmin)
    assert g.dtype == torch.float64 and g.shape == (n + 1,)
    assert torch.allclose(g, torch.tensor(expected, dtype=torch.float64), atol=5e-6)


def test_few_step_grid_formula_by_hand():
    g = few_step_grid(3, 2.0, 0.0)
    base = [1.0, 2 / 3, 1 / 3, 0.0]
    assert g.tolist() == pytest.approx([2 * b / (1 + b) for b in base])


def test_grid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        few_step_grid(0)
    with pytest.raises(ValueError, match="shift"):
        few_step_grid(2, shift=0)


@pytest.mark.parametrize("frac,alpha,beta", [(0.0, 4.0, 1.5), (0.25, 3.5607, 1.4268), (0.5, 2.5, 1.25),
                                             (0.75, 1.4393, 1.0732), (1.0, 1.0, 1.0), (3.0, 1.0, 1.0)])
def test_dynars_reference_values(frac, alpha, beta):
    a, b = dynars_beta_params(int(frac * 2000), 2000, 4.0, 1.5)
    assert a == pytest.approx(alpha, abs=1e-4) and b == pytest.approx(beta, abs=1e-4)


def test_dynars_samples_follow_the_beta_mean():
    torch.manual_seed(0)
    tau = sample_dynars(20000, 0, 2000, 4.0, 1.5)
    assert tau.shape == (20000,) and tau.min() >= 0 and tau.max() <= 1
    assert tau.double().mean().item() == pytest.approx(4 / 5.5, abs=0.01)  # Beta(4,1.5) mean 0.727
    u = sample_dynars(20000, 5000, 2000)
    assert u.double().mean().item() == pytest.approx(0.5, abs=0.01)          # annealed to U(0,1)


def test_dynadg_reference_values():
    assert dynadg_scale(0, 2000, 0.5) == 0.5
    assert dynadg_scale(1000, 2000, 0.5) == pytest.approx(0.25)
    assert dynadg_scale(500, 2000, 0.5) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert dynadg_scale(2000, 2000, 0.5) == 0.0 and dynadg_scale(9999, 2000, 0.5) == 0.0
    assert dynadg_scale(10, 0, 0.5) == 0.0  # horizon 0 = off (SDXL)


def test_cosine_decay_endpoints():
    assert cosine_decay(0, 10) == 1.0 and cosine_decay(10, 10) == 0.0 and cosine_decay(5, 10) == pytest.approx(0.5)


def test_uniform_and_discrete_samplers():
    torch.manual_seed(0)
    u = sample_uniform(1000, 0.001, 1.0)
    assert u.min() >= 0.001 and u.max() <= 1.0
    i = sample_grid_steps(1000, 4)
    assert i.dtype == torch.long and set(i.tolist()) == {0, 1, 2, 3}
