"""Evaluation of class-conditional digits samples: FID, k-NN precision/recall, accuracy and reward.

All image-space metrics use the fixed **evaluation** network :class:`dmdr.train.classifier.DigitsFeatureNet`
(shipped as ``dmdr/assets/digits_features.safetensors``), never the reward network:

* ``fid``: Fréchet distance between Gaussian fits of its 128-d penultimate features of the samples and of all
  1797 real digits (:func:`dmdr.eval.metrics.fid_from_features`). Biased upwards for few samples: compare runs at
  the same N, ideally N ≈ 1797-2000 (docs/evaluation.md gives the real-vs-real noise floor).
* ``precision`` / ``recall``: k-NN manifold precision/recall in the same feature space
  (:func:`dmdr.eval.metrics.knn_precision_recall`).
* ``accuracy``: fraction with ``argmax DigitsFeatureNet(x) == label``.
* ``reward``: mean of the ``digits_classifier`` reward (the reward network) in ``reward_mode``.

Two more feature spaces (docs/evaluation.md, "three feature spaces"), so that no claim rests on one network:

* ``*_pixels``: raw pixels, 64-d (images in [0, 1] flattened); no network, reproducible by anyone;
* ``*_mlp``: the second evaluation network :class:`dmdr.train.classifier.DigitsMLPFeatureNet` (an MLP, 64-d
  features, trained on the other half ``half_b`` of the data with another seed; ``dmdr/assets/
  digits_features_mlp.safetensors``, recipe ``recipes/digits-features-mlp.yaml``); ``accuracy_mlp`` its argmax.

Each space gives ``fid_<space>``, ``precision_<space>``, ``recall_<space>`` against all 1797 real digits.

Samples files are ``.npz`` with ``images`` float32 (N, 1, 8, 8) in [0, 1] and ``labels`` int64 (N,) in 0..9.

>>> from dmdr.data.digits import load_digits_tensors, to_unit
>>> x, y = load_digits_tensors("holdout")
>>> sorted(k for k in evaluate_samples(to_unit(x), y) if "_" not in k)
['accuracy', 'fid', 'n', 'precision', 'recall', 'reward']
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dmdr.data.digits import load_digits_tensors, to_unit
from dmdr.eval.metrics import fid_from_features, knn_precision_recall

NPZ_FORMAT = "an .npz with 'images' float32 (N, 1, 8, 8) in [0, 1] and 'labels' int64 (N,) in 0..9"
_BATCH = 1024


@lru_cache(maxsize=None)
def _frozen_net(kind: str) -> nn.Module:
    """A shipped evaluation network (``"features"`` or ``"features_mlp"``; CPU, eval mode, frozen), loaded once."""
    from dmdr.rewards.digits import default_checkpoint
    from dmdr.train.classifier import load_classifier

    net = load_classifier(default_checkpoint(kind), expect_kind=kind)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def feature_net() -> nn.Module:
    """The shipped evaluation network."""
    return _frozen_net("features")


def mlp_feature_net() -> nn.Module:
    """The second, independent evaluation network (an MLP trained on the other half of the data)."""
    return _frozen_net("features_mlp")


@torch.no_grad()
def _features_and_logits(net: nn.Module, images01: Tensor) -> tuple[np.ndarray, np.ndarray]:
    feats, logits = [], []
    for i in range(0, len(images01), _BATCH):
        f = net.features(images01[i : i + _BATCH].float().cpu())
        feats.append(f.double().numpy())
        logits.append(net.head(f).double().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def features_and_logits(images01: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation-net features (N, D) and logits (N, 10) of images (N, 1, 8, 8) in [0, 1], as float64 NumPy."""
    return _features_and_logits(feature_net(), images01)


@torch.no_grad()
def space_features(images01: Tensor, space: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (N, D) float64 of images (N, 1, 8, 8) in [0, 1] in one space, and logits (N, 10) or None.

    ``space``: ``"net"`` (the evaluation net, D = 128), ``"pixels"`` (D = 64, no logits), ``"mlp"`` (the second
    evaluation net, D = 64)."""
    if space == "net":
        return features_and_logits(images01)
    if space == "pixels":
        return images01.reshape(len(images01), -1).double().cpu().numpy(), None
    if space == "mlp":
        return _features_and_logits(mlp_feature_net(), images01)
    raise ValueError(f"unknown feature space {space!r}; expected 'net', 'pixels' or 'mlp'")


SPACES = ("net", "pixels", "mlp")  # "net" keeps the historical key names (fid, precision, recall, accuracy)


@lru_cache(maxsize=None)
def _real_space_features(space: str) -> np.ndarray:
    x, _ = load_digits_tensors("all")
    f, _ = space_features(to_unit(x), space)
    f.setflags(write=False)
    return f


def real_features() -> np.ndarray:
    """Evaluation-net features (1797, D) of all real digits (the FID / precision / recall reference), cached."""
    return _real_space_features("net")


def evaluate_samples(images01: Tensor, labels: Tensor, *, k: int = 3, reward_mode: str = "log_prob") -> dict:
    """Metrics of class-conditional samples against all 1797 real digits (see the module docstring).

    images01: (N, 1, 8, 8) in [0, 1]; labels: (N,) long, the classes the samples were generated for.
    Returns ``{"fid", "precision", "recall", "accuracy", "reward", "n"}`` (floats; ``n`` an int) in the
    evaluation net's space, plus ``fid_/precision_/recall_pixels`` and ``fid_/precision_/recall_/accuracy_mlp``.
    """
    _check_images_labels(torch.as_tensor(images01), torch.as_tensor(labels), where="evaluate_samples")
    images01 = torch.as_tensor(images01).float().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    feats, logits = features_and_logits(images01)
    real = real_features()
    pr = knn_precision_recall(real, feats, k=k)
    from dmdr.rewards.base import build_reward

    reward = build_reward("digits_classifier", mode=reward_mode)
    with torch.no_grad():
        r = torch.cat([reward(images01[i : i + _BATCH], labels[i : i + _BATCH]) for i in range(0, len(labels), _BATCH)])
    out = {
        "fid": fid_from_features(real, feats),
        "precision": pr["precision"],
        "recall": pr["recall"],
        "accuracy": float((logits.argmax(1) == labels.numpy()).mean()),
        "reward": float(r.double().mean()),
        "n": int(len(labels)),
    }
    for space in SPACES[1:]:
        f, lg = space_features(images01, space)
        ref = _real_space_features(space)
        pr = knn_precision_recall(ref, f, k=k)
        out.update({f"fid_{space}": fid_from_features(ref, f), f"precision_{space}": pr["precision"],
                    f"recall_{space}": pr["recall"]})
        if lg is not None:
            out[f"accuracy_{space}"] = float((lg.argmax(1) == labels.numpy()).mean())
    return out


def noise_floor(seed: int = 0, k: int = 3) -> dict:
    """FID / precision / recall between two random halves (898 / 899) of the real digits, for permutation ``seed``.

    The value a perfect generator would score at N ≈ 900 samples; returns ``{"fid", "precision", "recall", "n"}``
    with ``n`` the size of the first half.
    """
    real = real_features()
    perm = np.random.default_rng(seed).permutation(len(real))
    a, b = real[perm[: len(real) // 2]], real[perm[len(real) // 2 :]]
    return {"fid": fid_from_features(a, b), **knn_precision_recall(a, b, k=k), "n": int(len(a))}


def _check_images_labels(images: Tensor, labels: Tensor, where: str) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"{where}: images have shape {tuple(images.shape)}; expected {NPZ_FORMAT}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{where}: labels have shape {tuple(labels.shape)} for {images.shape[0]} images; expected {NPZ_FORMAT}")
    if images.shape[0] < 4:
        raise ValueError(f"{where}: need at least 4 samples for FID and precision/recall; got {images.shape[0]}")


def load_samples_npz(path: str | Path) -> tuple[Tensor, Tensor]:
    """Read and validate a samples file; returns images (N, 1, 8, 8) float32 in [0, 1] and labels (N,) int64.

    Raises ``ValueError`` with a one-line message naming the problem and the expected format when the file is
    missing or unreadable, a key is missing, or the images / labels have the wrong shape, dtype or range.
    """
    path = Path(path)
    where = f"samples file {path}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist; expected {NPZ_FORMAT}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / pickle / OSError: all mean "not a valid npz"
        raise ValueError(f"{where} is not a readable .npz ({type(e).__name__}: {e}); expected {NPZ_FORMAT}") from e
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise ValueError(f"{where} lacks key(s) {', '.join(map(repr, missing))} (has {sorted(arrays)}); expected {NPZ_FORMAT}")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.float32:
        raise ValueError(f"{where}: 'images' has dtype {images.dtype}; expected {NPZ_FORMAT}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: 'labels' has dtype {labels.dtype}; expected {NPZ_FORMAT}")
    images_t, labels_t = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
    _check_images_labels(images_t, labels_t, where=where)
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(f"{where}: 'images' range [{np.nanmin(images):.3g}, {np.nanmax(images):.3g}] (or non-finite) "
                         f"is outside [0, 1]; expected {NPZ_FORMAT}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{where}: 'labels' range [{labels.min()}, {labels.max()}] is outside 0..9; expected {NPZ_FORMAT}")
    return images_t, labels_t


_DESCRIPTIONS = {
    "n": "samples evaluated",
    "fid": "FID vs all 1797 real digits (feature net; lower is better)",
    "precision": "k-NN precision: samples on the real manifold",
    "recall": "k-NN recall: real digits covered by samples",
    "accuracy": "feature-net argmax == label",
    "reward": "mean digits_classifier reward (reward net)",
    "fid_pixels": "FID on raw pixels (64-d, no network)",
    "precision_pixels": "k-NN precision on raw pixels",
    "recall_pixels": "k-NN recall on raw pixels",
    "fid_mlp": "FID in the second eval net (MLP, other data half)",
    "precision_mlp": "k-NN precision, second eval net",
    "recall_mlp": "k-NN recall, second eval net",
    "accuracy_mlp": "second eval net argmax == label",
}


def format_table(metrics: dict, title: str = "digits evaluation"):
    """A ``rich.table.Table`` of ``metrics`` (known keys first, with a one-line description each)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    keys = [k for k in _DESCRIPTIONS if k in metrics] + [k for k in metrics if k not in _DESCRIPTIONS]
    for key in keys:
        v = metrics[key]
        text = f"{v:d}" if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else (
            f"{v:.4f}" if isinstance(v, (float, np.floating)) else str(v))
        table.add_row(key, text, _DESCRIPTIONS.get(key, ""))
    return table
