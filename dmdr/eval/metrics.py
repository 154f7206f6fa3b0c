"""Sample-quality metrics on feature vectors: Fréchet distance (FID) and k-NN precision / recall.

Pure functions on arrays (NumPy or torch, converted to float64 NumPy). Features are (N, D).

* Fréchet distance between Gaussians N(μ1, Σ1), N(μ2, Σ2) (Heusel et al., 2017, "GANs trained by a two
  time-scale update rule ..."; Dowson & Landau, 1982)::

      d² = ||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^{1/2})

  with Tr (Σ1 Σ2)^{1/2} = Tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2} computed from symmetric eigen-decompositions
  (negative eigenvalues from round-off are clipped to 0), so no complex arithmetic is involved.
* k-NN precision / recall (Kynkäänniemi et al., 2019, "Improved precision and recall metric for assessing
  generative models"): the manifold of a set Φ is ∪_{φ∈Φ} B(φ, d_k(φ)), d_k the distance to the k-th nearest
  *other* point of Φ. precision = fraction of fake points inside the real manifold; recall = fraction of real
  points inside the fake manifold.

>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(200, 4))
>>> round(fid_from_features(x, x), 6), knn_precision_recall(x, x, k=3)
(0.0, {'precision': 1.0, 'recall': 1.0})
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _np64(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    mu: (D,); sigma: (D, D) symmetric PSD. Returns a float ≥ 0 (tiny negative round-off is clipped to 0).
    """
    mu1, mu2 = _np64(mu1).reshape(-1), _np64(mu2).reshape(-1)
    s1, s2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"frechet_distance shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    r1 = _sqrt_psd(s1)
    w = np.linalg.eigvalsh(r1 @ ((s2 + s2.T) / 2) @ r1)
    tr_covmean = float(np.sqrt(np.clip(w, 0, None)).sum())
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(d, 0.0)


def gaussian_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64."""
    f = _np64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D); got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def fid_from_features(a: Any, b: Any) -> float:
    """FID between the Gaussian fits of feature sets a (N, D) and b (M, D). Biased upwards for small N, M."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def _pairwise_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0, None))


def _kth_nn_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point of x to its k-th nearest other point (self excluded)."""
    d = _pairwise_dist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _coverage(manifold: np.ndarray, radii: np.ndarray, query: np.ndarray, chunk: int = 1024) -> float:
    """Fraction of query points within radii[j] of some manifold point j."""
    inside = 0
    for i in range(0, len(query), chunk):
        d = _pairwise_dist(query[i : i + chunk], manifold)
        inside += int((d <= radii[None, :]).any(axis=1).sum())
    return inside / len(query)


def knn_precision_recall(real_feats: Any, fake_feats: Any, k: int = 3) -> dict[str, float]:
    """k-NN precision and recall (Kynkäänniemi et al., 2019); see the module docstring.

    real_feats (N, D), fake_feats (M, D) with N, M > k. Returns ``{"precision": p, "recall": r}`` in [0, 1].
    """
    real, fake = _np64(real_feats), _np64(fake_feats)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need real (N, D) and fake (M, D) features; got {real.shape} and {fake.shape}")
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(f"need k >= 1 and more than k points in each set; got k={k}, N={len(real)}, M={len(fake)}")
    precision = _coverage(real, _kth_nn_radius(real, k), fake)
    recall = _coverage(fake, _kth_nn_radius(fake, k), real)
    return {"precision": precision, "recall": recall}
