"""One shared base, per-call adapter scales, and an explicit trainable set (the DynaDG layout)."""
import pytest
import torch

from dmdr.models.lora import AdapterView, adapter_scope, add_lora, lora_parameters, set_trainable
from dmdr.models.tiny import LORA_TARGETS, TinyDiT, TinyDiTConfig


@pytest.fixture
def base():
    torch.manual_seed(0)
    m = TinyDiT(TinyDiTConfig(dim=32, depth=1, heads=2))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m.requires_grad_(False)
    add_lora(m, "critic", rank=4, alpha=4, target_modules=LORA_TARGETS)
    add_lora(m, "generator", rank=4, alpha=4, target_modules=LORA_TARGETS)
    for name in ("critic", "generator"):
        for p in lora_parameters(m, name):
            torch.nn.init.normal_(p, std=0.2)
    return m


def _io():
    return torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])


def test_add_lora_keeps_requires_grad_and_starts_frozen(base):
    assert not any(p.requires_grad for p in base.parameters())


def test_scale_zero_is_the_base_and_scales_are_linear_in_lora_output(base):
    x, t, y = _io()
    with adapter_scope(base, None):
        ref = base(x, t, y)
    assert torch.equal(AdapterView(base, "critic", 0.0)(x, t, y), ref)
    # at the first LoRA layer the contribution is linear in the scale
    layer = base.blocks[0].qkv
    h = torch.randn(3, 32)
    with adapter_scope(base, "critic", 1.0):
        d1 = layer(h) - layer.base_layer(h)
    with adapter_scope(base, "critic", 2.0):
        d2 = layer(h) - layer.base_layer(h)
    assert torch.allclose(d2, 2 * d1, atol=1e-6)


def test_adapters_are_independent_and_scopes_restore(base):
    x, t, y = _io()
    a = AdapterView(base, "critic", 1.0)(x, t, y)
    b = AdapterView(base, "generator", 1.0)(x, t, y)
    assert not torch.allclose(a, b)
    scalings = [dict(l.scaling) for l in base.modules() if hasattr(l, "scaling") and isinstance(l.scaling, dict)]
    with pytest.raises(RuntimeError):
        with adapter_scope(base, "critic", 5.0):
            raise RuntimeError("boom")
    after = [dict(l.scaling) for l in base.modules() if hasattr(l, "scaling") and isinstance(l.scaling, dict)]
    assert scalings == after
    assert torch.equal(AdapterView(base, "critic", 1.0)(x, t, y), a)


def test_trainable_set_is_explicit_and_gradients_reach_only_it(base):
    crit, gen = lora_parameters(base, "critic"), lora_parameters(base, "generator")
    set_trainable(base, crit)
    assert {id(p) for p in base.parameters() if p.requires_grad} == {id(p) for p in crit}
    x, t, y = _io()
    AdapterView(base, "critic", 2.0)(x, t, y).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crit if p.shape[0] != 0)
    assert all(p.grad is None for p in gen)
    # a view of another adapter changes no requires_grad flags (peft's set_adapter would)
    AdapterView(base, "generator", 1.0)(x, t, y)
    assert {id(p) for p in base.parameters() if p.requires_grad} == {id(p) for p in crit}


def test_unknown_adapter_is_an_error(base):
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        lora_parameters(base, "nope")
