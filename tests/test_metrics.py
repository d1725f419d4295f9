"""Frechet distance / KID against closed forms (scipy), and the shipped digits feature network."""

import numpy as np
import pytest
import torch
from scipy import linalg

from ddpm_from_scratch import metrics as M


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipy_sqrtm_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 3, 16):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        covmean = linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-10)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_1d_gaussians_is_the_wasserstein_formula():
    # W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance([0.3], [[4.0]], [-0.2], [[0.25]]) == pytest.approx(0.25 + 1.5**2, rel=1e-12)


def test_frechet_distance_of_features_uses_fitted_gaussians():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(500, 4)), rng.normal(0.5, 2.0, size=(400, 4))
    expected = M.frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert M.frechet_distance_features(f1, f2) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="features"):
        M.frechet_distance_features(f1[:, 0], f2)


def _mmd_loops(x, y):
    k = lambda a, b: (a @ b / x.shape[1] + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_unbiased_mmd_matches_the_definition_and_is_unbiased():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.3, 1.0, size=(9, 3))
    assert M.polynomial_mmd_unbiased(x, y) == pytest.approx(_mmd_loops(x, y), rel=1e-10)
    # same distribution: the unbiased estimate averages to 0; the biased (V-statistic) one does not
    vals, biased = [], []
    for _ in range(300):
        a, b = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
        vals.append(M.polynomial_mmd_unbiased(a, b))
        k = lambda p, q: (p @ q.T / 3 + 1.0) ** 3  # noqa: E731
        biased.append(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())
    vals, biased = np.array(vals), np.array(biased)
    se = vals.std() / np.sqrt(len(vals))
    assert abs(vals.mean()) < 3 * se
    assert biased.mean() > 10 * se
    mean, std = M.kernel_inception_distance(rng.normal(size=(200, 3)), rng.normal(1.0, 1.0, size=(200, 3)),
                                            num_subsets=10, subset_size=100, generator=torch.Generator().manual_seed(0))
    assert mean > 5 * max(std, 1e-12) / np.sqrt(10)


def test_shipped_digits_classifier_is_accurate_on_digits_for_unet():
    net = M.load_digits_classifier()
    x, y = M.digits_images(8, "test")
    from ddpm_from_scratch.data import digits_split_indices

    train_idx, test_idx = digits_split_indices()
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0 and len(train_idx) + len(test_idx) == 1797
    with torch.no_grad():
        acc = float((net(M.to_digit_input(x)).argmax(1) == y).float().mean())
    assert acc >= 0.95


def test_digit_features_any_resolution_and_fdd_separates_digits_from_noise():
    extract = M.digits_feature_extractor()
    x8, _ = M.digits_images(8, "test")
    x16, _ = M.digits_images(16, "test")
    f8, f16 = M.compute_features(extract, x8), M.compute_features(extract, x16)
    assert f8.shape == (len(x8), M.DigitsClassifier.feature_dim) and f16.shape == f8.shape
    three = M.compute_features(extract, x16.expand(-1, 3, -1, -1))
    torch.testing.assert_close(three, f16, atol=1e-5, rtol=1e-4)
    train16, _ = M.digits_images(16, "train")
    noise = torch.rand(len(x16), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fdd_same = M.frechet_distance_images(train16, x16, extract)
    fdd_noise = M.frechet_distance_images(noise, x16, extract)
    assert 0 < fdd_same < 0.1 * fdd_noise
    kid_same, _ = M.kid_images(train16, x16, extract, num_subsets=5, subset_size=200)
    kid_noise, _ = M.kid_images(noise, x16, extract, num_subsets=5, subset_size=200)
    assert kid_same < 0.1 * kid_noise


def test_inception_extractor_is_optional_and_never_downloads():
    ok, reason = M.inception_available()
    if not ok:
        with pytest.raises(RuntimeError, match="unavailable"):
            M.inception_feature_extractor()
        pytest.skip(f"Inception features not available offline: {reason}")
    extract = M.inception_feature_extractor()
    feats = extract(torch.zeros(2, 1, 8, 8))
    assert feats.shape == (2, 2048)
