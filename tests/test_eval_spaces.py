"""`dmdr eval` in three feature spaces: evaluation net, raw pixels, and the second (MLP) evaluation net."""
import json

import numpy as np
import pytest
import torch

from dmdr.data.digits import load_digits_tensors, to_unit
from dmdr.eval.report import evaluate_samples, space_features


def test_halves_are_disjoint_stratified_and_cover_the_data():
    xa, ya = load_digits_tensors("half_a")
    xb, yb = load_digits_tensors("half_b")
    x, y = load_digits_tensors("all")
    assert len(ya) + len(yb) == len(y) == 1797 and abs(len(ya) - len(yb)) <= 10
    for c in range(10):
        assert abs(int((ya == c).sum()) - int((yb == c).sum())) <= 1
    flat = lambda t: {tuple(r) for r in t.reshape(len(t), -1).tolist()}  # noqa: E731
    assert len(flat(xa) & flat(xb)) < 20  # only exact duplicate images of the data set can appear in both


def test_every_space_scores_real_digits_near_zero_and_noise_far():
    x, y = load_digits_tensors("all")
    real = evaluate_samples(to_unit(x), y)
    noise = evaluate_samples(torch.rand(500, 1, 8, 8), torch.arange(500) % 10)
    for key in ("fid", "fid_pixels", "fid_mlp"):
        assert real[key] < 1e-6, key  # the reference itself
        assert noise[key] > 1.0 if key != "fid_pixels" else noise[key] > 0.5, key
    for key in ("precision_pixels", "recall_pixels", "precision_mlp", "recall_mlp"):
        assert real[key] == 1.0
    assert real["accuracy_mlp"] > 0.98  # the second eval net classifies real digits
    assert noise["recall_pixels"] < 0.05


def test_pixel_space_is_the_flattened_images():
    imgs = torch.rand(7, 1, 8, 8)
    f, logits = space_features(imgs, "pixels")
    assert logits is None and f.shape == (7, 64) and np.allclose(f, imgs.reshape(7, 64).double().numpy())
    f, logits = space_features(imgs, "mlp")
    assert f.shape == (7, 64) and logits.shape == (7, 10)
    with pytest.raises(ValueError, match="unknown feature space 'inception'"):
        space_features(imgs, "inception")


def test_cli_eval_reports_all_spaces(tmp_path):
    from typer.testing import CliRunner

    from dmdr_cli.app import app

    x, y = load_digits_tensors("holdout")
    npz = tmp_path / "s.npz"
    np.savez(npz, images=to_unit(x).numpy().astype(np.float32), labels=y.numpy())
    r = CliRunner().invoke(app, ["eval", str(npz), "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"fid", "fid_pixels", "fid_mlp", "recall_pixels", "recall_mlp", "accuracy_mlp"} <= set(m)
    assert "fid_pixels" in r.output and "fid_mlp" in r.output


@pytest.mark.slow
def test_shipped_mlp_eval_net_reproduces_bit_identically(tmp_path):
    """recipes/digits-features-mlp.yaml retrains dmdr/assets/digits_features_mlp.safetensors exactly (1 thread)."""
    import torch as _t

    if _t.backends.cpu.get_cpu_capability() != "AVX512":  # the SIMD path the shipped weights were trained on
        import pytest as _p

        _p.skip(f"the shipped weights were trained on AVX512; this CPU takes the {_t.backends.cpu.get_cpu_capability()} "
                f"path, whose float rounding gives other bits (same rule as tests/test_refactor_identity.py)")
    from safetensors.torch import load_file

    from dmdr.recipes import load_recipe
    from dmdr.rewards.digits import default_checkpoint
    from dmdr.train.classifier import train_digits_classifier

    r = load_recipe("recipes/digits-features-mlp.yaml")
    t = r.train
    model, metrics = train_digits_classifier(t.kind, steps=t.steps, batch_size=t.batch_size, lr=t.lr, seed=r.seed,
                                             split=t.split, weight_decay=t.weight_decay,
                                             label_smoothing=t.label_smoothing, augment=t.augment)
    shipped = load_file(str(default_checkpoint("features_mlp")))
    assert set(shipped) == set(model.state_dict())
    assert all(torch.equal(shipped[k], v) for k, v in model.state_dict().items())
    assert metrics["other_half_accuracy"] > 0.97
