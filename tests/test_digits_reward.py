from pathlib import Path
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmdr.data.digits import load_digits_tensors, to_unit
from dmdr.eval.report import evaluate_samples, feature_net, format_table, load_samples_npz
from dmdr.rewards.base import available_rewards, build_reward
from dmdr.rewards.digits import default_checkpoint
from dmdr.train.classifier import (DigitsClassifier, DigitsFeatureNet, accuracy, load_classifier, random_shift,
                                   save_classifier, train_digits_classifier)

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def holdout01():
    x, y = load_digits_tensors("holdout")
    return to_unit(x), y


# ---------------------------------------------------------------- reward

def test_registered_with_spec():
    assert "digits_classifier" in available_rewards()
    r = build_reward("digits_classifier")
    assert r.spec.differentiable and r.spec.reads_labels and r.spec.input_range == (0, 1) and r.spec.resolution == 8
    assert not any(p.requires_grad for p in r.parameters())


def test_modes_agree_with_definitions(holdout01):
    x, y = holdout01[0][:32], holdout01[1][:32]
    lp = build_reward("digits_classifier", mode="log_prob")(x, y)
    assert lp.shape == (32,) and (lp <= 0).all()
    nce = build_reward("digits_classifier", mode="neg_cross_entropy")(x, y)
    assert torch.allclose(lp, nce)
    logits = load_classifier(default_checkpoint("reward"))(x)
    assert torch.allclose(lp, -F.cross_entropy(logits, y, reduction="none"), atol=1e-6)
    p = build_reward("digits_classifier", mode="prob")(x, y)
    assert torch.allclose(p, lp.exp(), atol=1e-6)
    conf = build_reward("digits_classifier", mode="confidence")
    c = conf(x, y)
    assert (c >= p - 1e-6).all()
    assert torch.equal(c, conf(x, (y + 1) % 10))  # confidence ignores the label
    assert torch.equal(c, conf(x, None))


def test_reward_prefers_the_true_label(holdout01):
    x, y = holdout01
    r = build_reward("digits_classifier")
    assert (r(x, y) > r(x, (y + 3) % 10)).float().mean() > 0.97


def test_gradient_flows_and_ascent_increases_reward():
    r = build_reward("digits_classifier")
    x = torch.full((8, 1, 8, 8), 0.3, requires_grad=True)
    y = torch.arange(8)
    s = r(x, y)
    (g,) = torch.autograd.grad(s.sum(), x)
    assert g.shape == x.shape and (g.flatten(1).norm(dim=1) > 0).all()
    z = x.detach().clone()
    before = r(z, y)
    for _ in range(10):
        z.requires_grad_(True)
        (g,) = torch.autograd.grad(r(z, y).sum(), z)
        z = (z + 0.05 * g.sign()).clamp(0, 1).detach()
    assert (r(z, y) > before).all()


def test_reward_errors():
    with pytest.raises(ValueError, match="unknown digits_classifier mode 'bogus'"):
        build_reward("digits_classifier", mode="bogus")
    r = build_reward("digits_classifier")
    with pytest.raises(ValueError, match="reads the class labels"):
        r(torch.zeros(2, 1, 8, 8), None)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 8, 8\)"):
        r(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not exist"):
        build_reward("digits_classifier", checkpoint="/nonexistent/clf.safetensors")
    with pytest.raises(ValueError, match="expected a 'reward' network"):
        build_reward("digits_classifier", checkpoint=str(default_checkpoint("features")))


# ---------------------------------------------------------------- shipped classifiers

def test_shipped_classifiers_accuracy(holdout01):
    x, y = holdout01
    reward_net = load_classifier(default_checkpoint("reward"))
    assert isinstance(reward_net, DigitsClassifier) and not reward_net.training
    assert accuracy(reward_net, x, y) >= 0.95
    feat = feature_net()
    assert isinstance(feat, DigitsFeatureNet)
    assert feat.features(x[:5]).shape == (5, 128)
    assert accuracy(feat, x, y) >= 0.95
    for net in (reward_net, feat):
        assert sum(p.numel() for p in net.parameters()) < 100_000


def test_save_load_round_trip_and_errors(tmp_path):
    model = DigitsClassifier(width=4, hidden=8)
    path = save_classifier(model, tmp_path / "c.safetensors", metrics={"holdout_accuracy": 0.5})
    loaded = load_classifier(path)
    x = torch.rand(3, 1, 8, 8)
    assert loaded.config == {"width": 4, "hidden": 8} and torch.equal(loaded(x), model(x))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["dmdr_classifier"])["kind"] == "reward"

    with pytest.raises(ValueError, match="missing.safetensors does not exist"):
        load_classifier(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors"):
        load_classifier(junk)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="nometa.safetensors has no 'dmdr_classifier' metadata"):
        load_classifier(tmp_path / "nometa.safetensors")
    bad = {k: v for k, v in model.state_dict().items() if k != "fc2.bias"}
    save_file(bad, str(tmp_path / "bad.safetensors"),
              metadata={"dmdr_classifier": json.dumps({"kind": "reward", "config": model.config})})
    with pytest.raises(ValueError, match="bad.safetensors does not match its declared 'reward' config"):
        load_classifier(tmp_path / "bad.safetensors")


def test_training_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m1, met = train_digits_classifier("reward", steps=20, batch_size=32, lr=3e-3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    m2, _ = train_digits_classifier("reward", steps=20, batch_size=32, lr=3e-3, seed=7)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert met["kind"] == "reward" and 0 <= met["holdout_accuracy"] <= 1 and met["split"] == "train"
    with pytest.raises(ValueError, match="unknown classifier kind"):
        train_digits_classifier("bogus", steps=1, batch_size=1, lr=1e-3, seed=0)


def test_random_shift_moves_by_at_most_one_pixel():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 4] = 1.0
    s = random_shift(x, torch.Generator().manual_seed(0))
    pos = s.flatten(1).argmax(1)
    r, c = pos // 8, pos % 8
    assert (s.flatten(1).sum(1) == 1).all()
    assert ((r - 3).abs() <= 1).all() and ((c - 4).abs() <= 1).all()
    assert len(set(zip(r.tolist(), c.tolist()))) > 1


# ---------------------------------------------------------------- evaluation

def test_evaluate_real_vs_noise(holdout01):
    x, y = holdout01
    real = evaluate_samples(x, y)
    assert {"fid", "precision", "recall", "accuracy", "reward", "n"} <= set(real) and real["n"] == len(y)
    assert real["accuracy"] >= 0.95 and real["fid"] < 2.0 and real["precision"] > 0.9
    noise = evaluate_samples(torch.rand(len(y), 1, 8, 8, generator=torch.Generator().manual_seed(0)), y)
    assert noise["fid"] > 20 * max(real["fid"], 1.0)
    assert noise["precision"] < 0.3 and noise["accuracy"] < 0.4 and noise["reward"] < real["reward"]
    table = format_table(real)
    assert [c.header for c in table.columns] == ["metric", "value", "meaning"]
    assert list(table.columns[0].cells)[:2] == ["n", "fid"]


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_samples_npz_validation(tmp_path, holdout01):
    x, y = holdout01
    ok = _write(tmp_path / "ok.npz", images=x[:10].numpy(), labels=y[:10].numpy())
    xi, yi = load_samples_npz(ok)
    assert torch.equal(xi, x[:10]) and yi.dtype == torch.int64

    cases = {
        "missing": (None, "does not exist"),
        "nolabels": (dict(images=x[:10].numpy()), "lacks key\\(s\\) 'labels'"),
        "shape": (dict(images=x[:10].numpy().reshape(10, 64), labels=y[:10].numpy()), r"images have shape \(10, 64\)"),
        "dtype": (dict(images=(x[:10].numpy() * 255).astype(np.uint8), labels=y[:10].numpy()), "dtype uint8"),
        "range": (dict(images=x[:10].numpy() * 2 - 1, labels=y[:10].numpy()), r"outside \[0, 1\]"),
        "nlabels": (dict(images=x[:10].numpy(), labels=y[:9].numpy()), r"labels have shape \(9,\) for 10 images"),
        "labelrange": (dict(images=x[:10].numpy(), labels=y[:10].numpy() + 10), "outside 0..9"),
        "labeldtype": (dict(images=x[:10].numpy(), labels=y[:10].numpy().astype(np.float32)), "'labels' has dtype float32"),
    }
    for name, (arrays, msg) in cases.items():
        path = tmp_path / f"{name}.npz"
        if arrays is not None:
            _write(path, **arrays)
        with pytest.raises(ValueError, match=msg) as e:
            load_samples_npz(path)
        assert "\n" not in str(e.value) and "expected an .npz" in str(e.value)
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_samples_npz(tmp_path / "garbage.npz")




@pytest.mark.slow
def test_classifier_recipe_reproduces_the_shipped_weights(tmp_path):
    """`dmdr train recipes/digits-classifier.yaml` gives the shipped reward network bit for bit (1 CPU thread)."""
    import torch as _t

    if _t.backends.cpu.get_cpu_capability() != "AVX512":  # the SIMD path the shipped weights were trained on
        import pytest as _p

        _p.skip(f"the shipped weights were trained on AVX512; this CPU takes the {_t.backends.cpu.get_cpu_capability()} "
                f"path, whose float rounding gives other bits (same rule as tests/test_refactor_identity.py)")
    import torch
    from safetensors import safe_open
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    root = Path(__file__).resolve().parent.parent
    res = CliRunner().invoke(app, ["train", str(root / "recipes" / "digits-classifier.yaml"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.stderr
    a = safe_open(str(tmp_path / "r" / "digits_classifier.safetensors"), "pt")
    b = safe_open(str(root / "dmdr" / "assets" / "digits_classifier.safetensors"), "pt")
    assert set(a.keys()) == set(b.keys())
    assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
