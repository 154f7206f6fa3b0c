"""Samplers: shapes, ode/sde semantics, CFG, and exact log-probabilities of the stochastic rollout."""
import torch

from dmdr import keys as K
from dmdr.models.tiny import TinyDiT, TinyDiTConfig
from dmdr.samplers import (clean_targets, few_step_rollout, gaussian_log_prob, sample_euler, stochastic_rollout,
                           transition_log_prob)
from dmdr.schedules import few_step_grid
from dmdr.scores import cfg_prediction, sample_cfg_scale


def _model():
    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def test_rollout_shapes_and_ode_semantics():
    m, grid = _model(), few_step_grid(4, 3.0, 0.0).float()
    noise, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    roll = few_step_rollout(m, noise, grid, y, mode="ode")
    assert roll[K.X_PER_STEP].shape == (3, 4, 1, 8, 8) and roll[K.X0_PER_STEP].shape == (3, 4, 1, 8, 8)
    assert roll[K.GRID].shape == (3, 5)
    assert torch.equal(roll[K.X_PER_STEP][:, 0], noise)
    # the ODE rollout is the Euler sampler without CFG
    assert torch.allclose(roll[K.SAMPLE], sample_euler(m, noise, grid, y), atol=1e-6)
    # official ode semantics: every step is trained on the final sample
    ct = clean_targets(roll, "ode")
    assert all(torch.equal(ct[:, i], roll[K.SAMPLE]) for i in range(4))
    assert torch.equal(clean_targets(roll, "sde"), roll[K.X0_PER_STEP])


def test_sde_rollout_renoises_each_x0():
    m, grid = _model(), few_step_grid(2, 1.0, 0.0).float()
    noise, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    eps = torch.randn(2, 2, 1, 8, 8)
    roll = few_step_rollout(m, noise, grid, y, mode="sde", step_noise=eps)
    t1 = grid[1]
    expected_x1 = (1 - t1) * roll[K.X0_PER_STEP][:, 0] + t1 * eps[0]
    assert torch.allclose(roll[K.X_PER_STEP][:, 1], expected_x1, atol=1e-6)


def test_cfg_prediction_combines_branches():
    m = _model()
    x, t, y = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([1, 2])
    u = m.null_cond(y)
    c, uu = m(x, t, y), m(x, t, u)
    assert torch.allclose(cfg_prediction(m, x, t, y, u, 3.0), uu + 3.0 * (c - uu), atol=1e-5)
    assert torch.equal(cfg_prediction(m, x, t, y, u, 1.0), c)


def test_cfg_scale_jitter_range():
    torch.manual_seed(0)
    ws = [sample_cfg_scale(7.0) for _ in range(200)]
    assert min(ws) >= 6.5 and max(ws) <= 7.5 and max(ws) - min(ws) > 0.5
    assert sample_cfg_scale(1.0) == 1.0 and sample_cfg_scale(0.0) == 1.0


def test_stochastic_rollout_logprob_recomputes_exactly():
    m, grid = _model(), few_step_grid(3, 1.0, 0.0).float()
    noise, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for reduce in ("mean", "sum"):
        roll = stochastic_rollout(m, noise, grid, y, final_std=0.1, reduce=reduce)
        assert roll[K.LOG_PROB].shape == (4, 3)
        for i in range(3):
            lp = transition_log_prob(m, roll[K.X_PER_STEP][:, i], grid[i].expand(4), grid[i + 1].expand(4),
                                     roll[K.ACTION][:, i], y, last=i == 2, final_std=0.1, reduce=reduce)
            assert torch.equal(lp, roll[K.LOG_PROB][:, i])  # on-policy ratio exactly 1


def test_stochastic_step_std_and_gaussian_log_prob():
    m, grid = _model(), few_step_grid(2, 1.0, 0.0).float()
    roll = stochastic_rollout(m, torch.randn(2, 1, 8, 8), grid, torch.tensor([0, 1]), final_std=0.05)
    assert torch.allclose(roll["std"][:, 0], torch.full((2,), 0.5)) and torch.allclose(roll["std"][:, 1], torch.full((2,), 0.05))
    x, mu = torch.zeros(1, 2), torch.zeros(1, 2)
    lp = gaussian_log_prob(x, mu, 1.0, "sum")
    assert lp.item() == torch.distributions.Normal(0.0, 1.0).log_prob(torch.zeros(2)).sum().item()
    assert gaussian_log_prob(x, mu, 1.0, "mean").item() * 2 == lp.item()
