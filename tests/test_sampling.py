"""Students sample on their training grid with their training rollout; all noise comes from the caller's generator."""
import torch

from dmdr.models.tiny import TinyDiT, TinyDiTConfig
from dmdr.sampling import StudentInfo, sample_student


def _model():
    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m


def test_sde_sampling_is_reproducible_and_differs_from_ode():
    m, labels = _model(), torch.arange(6) % 10
    sde = StudentInfo(4, 1.0, 0.0, "t", mode="sde")
    ode = StudentInfo(4, 1.0, 0.0, "t", mode="ode")
    a = sample_student(m, labels, sde, generator=torch.Generator().manual_seed(1))
    torch.rand(5)  # the global RNG must not matter
    b = sample_student(m, labels, sde, generator=torch.Generator().manual_seed(1))
    c = sample_student(m, labels, ode, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (6, 1, 8, 8)
    assert not torch.allclose(a, c)


def test_one_step_sampling_is_the_same_in_both_modes():
    m, labels = _model(), torch.arange(4)
    a = sample_student(m, labels, StudentInfo(1, 1.0, 0.0, "t", mode="sde"), generator=torch.Generator().manual_seed(2))
    b = sample_student(m, labels, StudentInfo(1, 1.0, 0.0, "t", mode="ode"), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
