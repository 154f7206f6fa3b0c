import numpy as np
import pytest
import torch

from dmdr.eval.metrics import fid_from_features, frechet_distance, gaussian_stats, knn_precision_recall

torch.set_num_threads(1)


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_identical_gaussians_zero():
    rng = np.random.default_rng(0)
    mu, sig = rng.normal(size=6), _random_cov(rng, 6)
    assert frechet_distance(mu, sig, mu, sig) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (2.0, 1.0), (0.0, 0.5), (-1.5, 3.0)])
def test_one_dimensional_closed_form(m, s):
    # N(0,1) vs N(m, s^2): d^2 = m^2 + (1 - s)^2
    assert frechet_distance([0.0], [[1.0]], [m], [[s * s]]) == pytest.approx(m * m + (1 - s) ** 2, abs=1e-12)


def test_diagonal_sums_per_dimension():
    m = np.array([1.0, -2.0, 0.5])
    s = np.array([0.5, 2.0, 1.0])
    expected = float(np.sum(m ** 2 + (1 - s) ** 2))
    assert frechet_distance(np.zeros(3), np.eye(3), m, np.diag(s ** 2)) == pytest.approx(expected, abs=1e-12)


def test_general_matches_sqrtm_formula_and_is_symmetric():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = _random_cov(rng, 5), _random_cov(rng, 5)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_fid_from_features_estimates_the_gaussian_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 2))
    b = rng.normal(size=(20000, 2)) * np.array([2.0, 1.0]) + np.array([1.0, 0.0])
    # N(0,I) vs N((1,0), diag(4,1)): 1 + (1-2)^2 = 2
    assert fid_from_features(a, b) == pytest.approx(2.0, abs=0.08)
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-9)
    mu, cov = gaussian_stats(b)
    assert mu.shape == (2,) and cov.shape == (2, 2)


def test_frechet_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_precision_recall_identical_sets():
    x = np.random.default_rng(0).normal(size=(300, 8))
    assert knn_precision_recall(x, x, k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_hand_computed():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: 1, 1, 1, 1
    fake = np.array([[0.5], [10.0]])  # 0.5 is inside, 10 is outside; fake radii (k=1): 9.5, 9.5
    pr = knn_precision_recall(real, fake, k=1)
    assert pr["precision"] == 0.5
    assert pr["recall"] == 1.0  # every real point is within 9.5 of 0.5


def test_precision_drops_for_far_fakes_and_recall_for_mode_collapse():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 4))
    far = rng.normal(size=(400, 4)) + 20.0
    pr = knn_precision_recall(real, far, k=3)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0
    half = real[:200] + 5.0 * np.array([1, 0, 0, 0])  # half shifted away
    pr = knn_precision_recall(real, np.concatenate([real[200:] + 0.01, half]), k=3)
    assert 0.4 < pr["precision"] < 0.7
    collapsed = real[0] + 0.01 * rng.normal(size=(200, 4))  # mode collapse onto one real point
    pr = knn_precision_recall(real, collapsed, k=3)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.01


def test_precision_recall_argument_errors():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="more than k points"):
        knn_precision_recall(x, x, k=5)
    with pytest.raises(ValueError, match=r"need real \(N, D\)"):
        knn_precision_recall(x, np.zeros((5, 3)))
