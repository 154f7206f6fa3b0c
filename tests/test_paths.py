"""Float64 round trips of every conversion, against the hand-derived equations of dmdr.paths."""
import pytest
import torch

from dmdr.paths import DDPMEps, FlowMatching, scaled_linear_alphas_cumprod



@pytest.fixture(autouse=True)
def _f64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _batch(B=5):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.999], dtype=torch.float64)[:B]
    return x0, eps, t


def test_flow_matching_renoise_and_target_by_hand():
    p = FlowMatching()
    x0, eps, t = _batch()
    x_t = p.renoise(x0, t, eps)
    assert torch.allclose(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps, atol=0, rtol=0)
    assert torch.equal(p.target(x0, eps, t), eps - x0)


def test_flow_matching_round_trips_t_min_zero():
    p = FlowMatching(t_min=0.0)
    x0, eps, t = _batch()
    x_t = p.renoise(x0, t, eps)
    v = p.target(x0, eps, t)
    assert torch.allclose(p.to_x0(x_t, t, v), x0, atol=1e-12)
    assert torch.allclose(p.to_eps(x_t, t, v), eps, atol=1e-12)
    assert torch.allclose(p.from_x0(x_t, t, x0), v, atol=1e-12)


def test_flow_matching_t_min_matches_official_formula():
    # official SD3 code: x0 = x_t + (0.001 - t) * v ; from_x0 must invert exactly that map
    p = FlowMatching(t_min=0.001)
    x0, eps, t = _batch()
    x_t = p.renoise(x0, t, eps)
    v = torch.randn_like(x0)
    assert torch.allclose(p.to_x0(x_t, t, v), x_t + (0.001 - t.view(-1, 1, 1, 1)) * v, atol=0)
    assert torch.allclose(p.from_x0(x_t, t, p.to_x0(x_t, t, v)), v, atol=1e-10)


def test_flow_matching_euler_step_equals_ddim_step():
    p = FlowMatching()
    x0, eps, t = _batch()
    x_t = p.renoise(x0, t, eps)
    v = torch.randn_like(x0)
    t2 = t * 0.5
    ddim = p.renoise(p.to_x0(x_t, t, v), t2, p.to_eps(x_t, t, v))
    assert torch.allclose(p.step(x_t, t, t2, v), ddim, atol=1e-12)


def test_ddpm_alphas_by_hand():
    a = scaled_linear_alphas_cumprod()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert a.shape == (1000,)
    assert torch.isclose(a[0], 1 - betas[0])
    assert torch.isclose(a[1], (1 - betas[0]) * (1 - betas[1]))
    assert a[-1] < 0.01 and torch.all(a[1:] < a[:-1])


def test_ddpm_index_mapping_and_sdxl_one_step():
    p = DDPMEps()
    assert p.index(0.399).item() == 399
    assert p.index(1.0).item() == 999  # clamped
    assert p.index(0.0).item() == 0
    assert p.index(torch.tensor([0.0004, 0.0006])).tolist() == [0, 1]


def test_ddpm_round_trips():
    p = DDPMEps()
    x0, eps, t = _batch()
    x_t = p.renoise(x0, t, eps)
    a = p.alphas_cumprod[p.index(t)].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-12)
    assert torch.equal(p.target(x0, eps, t), eps)
    assert torch.allclose(p.to_x0(x_t, t, eps), x0, atol=1e-10)
    assert torch.allclose(p.from_x0(x_t, t, x0), eps, atol=1e-10)
    assert torch.equal(p.to_eps(x_t, t, eps), eps)
