"""DMD / fake-score / reward losses: hand-derived float64 gradients and the invariants of method.md §2.4."""
import pytest
import torch
from tensordict import TensorDict

from dmdr.keys import MissingKeyError
from dmdr.losses import dmd_gradient, dmd_loss, fake_score_loss, merge_terms, reward_loss, total_loss
from dmdr.losses.dmd import DMDKeys


def _td(x0, real, fake):
    return TensorDict(x0_pred=x0, x0_real=real, x0_fake=fake, batch_size=[x0.shape[0]])


def test_dmd_gradient_matches_hand_derivation_float64():
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 3, 2, 2, 2
    x0 = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    real = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    fake = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    out = dmd_loss(_td(x0, real, fake))
    out["loss_dmd"].backward()
    # hand: g_b = (fake - real) / (mean_CHW |x0 - real| + 1e-8) ; dL/dx0 = g / (B C H W)
    norm = (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8
    expected = (fake - real) / norm / (B * C * H * W)
    assert torch.allclose(x0.grad, expected, atol=1e-15, rtol=1e-12)
    # the loss value: 0.5 * mean(g^2)
    assert out["loss_dmd"].item() == pytest.approx(0.5 * (((fake - real) / norm) ** 2).mean().item(), rel=1e-12)


def test_dmd_gradient_is_zero_when_scores_agree():
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    real = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    out = dmd_loss(_td(x0, real, real.clone()))
    out["loss_dmd"].backward()
    assert torch.count_nonzero(x0.grad) == 0
    assert out["loss_dmd"].item() == 0.0 and out["dmd_real_fake_gap"].item() == 0.0


def test_dmd_normalisation_is_per_sample():
    # scaling one sample's distance to the real estimate rescales only that sample's gradient
    x0 = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    real = torch.zeros_like(x0)
    real[0] += 1.0
    real[1] += 4.0
    fake = real + 0.5
    g = dmd_gradient(x0, real, fake)
    assert torch.allclose(g[0], torch.full((1, 2, 2), 0.5 / 1.0, dtype=torch.float64))
    assert torch.allclose(g[1], torch.full((1, 2, 2), 0.5 / 4.0, dtype=torch.float64))


def test_dmd_nan_to_num_and_direction():
    x0 = torch.zeros(1, 1, 2, 2, requires_grad=True)
    real = torch.zeros(1, 1, 2, 2)          # |x0 - real| = 0 → normaliser 1e-8, huge but finite
    fake = torch.full((1, 1, 2, 2), float("nan"))
    g = dmd_gradient(x0, real, fake)
    assert torch.isfinite(g).all()
    # gradient descent moves x0 toward the real estimate and away from the fake one
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)
    dmd_loss(_td(x, torch.ones(1, 1, 2, 2), -torch.ones(1, 1, 2, 2)))["loss_dmd"].backward()
    assert (x.grad < 0).all()  # -grad points to +1 (real)


def test_dmd_keys_are_renamable_and_missing_keys_are_named():
    x0 = torch.randn(2, 1, 2, 2, requires_grad=True)
    td = TensorDict(gen=x0, r=torch.zeros(2, 1, 2, 2), f=torch.ones(2, 1, 2, 2), batch_size=[2])
    out = dmd_loss(td, keys=DMDKeys(x0_pred="gen", x0_real="r", x0_fake="f"))
    assert set(out.keys()) == {"loss_dmd", "dmd_grad_norm", "dmd_real_fake_gap", "dmd_weight"}
    with pytest.raises(MissingKeyError, match="'x0_real'.*rename with keys="):
        dmd_loss(TensorDict(x0_pred=x0, batch_size=[2]))


def test_fake_score_loss_and_reward_loss():
    pred = torch.tensor([[1.0, 2.0]], requires_grad=True)
    out = fake_score_loss(TensorDict(fake_pred=pred, fake_target=torch.tensor([[0.0, 0.0]]), batch_size=[1]))
    assert out["loss_fake_score"].item() == pytest.approx(2.5)
    r = torch.tensor([0.2, 0.9], requires_grad=True)
    td = TensorDict(reward_clip=r, batch_size=[2])
    hinged = reward_loss(td, "clip", weight=0.3, hinge=0.7)
    assert hinged["loss_reward_clip"].item() == pytest.approx(0.3 * (0.5 + 0.0) / 2)
    assert hinged["reward_clip"].item() == pytest.approx(0.55)
    plain = reward_loss(td, "clip", weight=2.0, per_element=4)
    assert plain["loss_reward_clip"].item() == pytest.approx(2.0 * -0.55 / 4)


def test_total_loss_sums_only_loss_keys():
    a = TensorDict(loss_a=torch.tensor(1.0), diag=torch.tensor(100.0), batch_size=[])
    b = TensorDict(loss_b=torch.tensor(2.0), batch_size=[])
    terms = merge_terms(a, b)
    assert total_loss(terms).item() == 3.0
    with pytest.raises(ValueError, match="two loss terms"):
        merge_terms(a, a)
