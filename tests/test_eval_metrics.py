"""quantsd.eval.metrics: torchmetrics vs direct numpy/scipy vs torch-fidelity on fixed features."""

import numpy as np
import pytest
import torch

from quantsd.eval import metrics as M


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(120, 24))
    b = rng.normal(loc=0.3, scale=1.2, size=(100, 24)) + 0.2 * rng.normal(size=(100, 24)) @ rng.normal(size=(24, 24))
    return a, b


def test_fid_of_a_set_against_itself_is_zero(feats):
    a, _ = feats
    assert abs(M.fid(a, a)) < 1e-6
    assert abs(M.fid_numpy(a, a)) < 1e-6


def test_fid_equals_direct_numpy_scipy_and_torch_fidelity(feats):
    a, b = feats
    tm, ref = M.fid(a, b), M.fid_numpy(a, b)
    assert tm > 1.0
    assert tm == pytest.approx(ref, rel=1e-8)
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    tf = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(a)),
                                  fid_features_to_statistics(torch.from_numpy(b)), False)
    assert tm == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)


def test_fid_is_symmetric_and_positive_for_shifted_sets(feats):
    a, b = feats
    assert M.fid(a, b) == pytest.approx(M.fid(b, a), rel=1e-6)
    assert M.fid(a, a + 1.0) == pytest.approx(a.shape[1] * 1.0, rel=1e-6)  # pure mean shift: ||1||^2


def test_kid_equals_direct_numpy_on_the_same_subsets(feats):
    a, b = feats
    tm = M.kid(a, b, subsets=20, subset_size=50, seed=3)
    ref = M.kid_numpy(a, b, subsets=20, subset_size=50, seed=3)
    assert tm[0] == pytest.approx(ref[0], rel=1e-9, abs=1e-12)
    assert tm[1] == pytest.approx(ref[1], rel=1e-9, abs=1e-12)
    assert tm[0] > 0


def test_kid_agrees_with_torch_fidelity_given_identical_features(feats):
    # with subset size == set size every subset is the whole set, so the random draws cannot differ
    a, b = feats
    n = 100
    tm_mean, _ = M.kid(a[:n], b[:n], subsets=3, subset_size=n)
    from torch_fidelity.metric_kid import kid_features_to_metric

    tf = kid_features_to_metric(torch.from_numpy(a[:n]), torch.from_numpy(b[:n]), kid_subsets=3,
                                kid_subset_size=n, kid_degree=3, kid_gamma=None, kid_coef0=1, verbose=False,
                                rng_seed=0)
    assert tm_mean == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-7)


def test_kid_of_two_samples_of_one_distribution_is_near_zero(feats):
    rng = np.random.default_rng(5)
    a1, a2 = rng.normal(size=(300, 24)), rng.normal(size=(300, 24))
    same, _ = M.kid(a1, a2, subsets=10, subset_size=200)
    diff, _ = M.kid(a1, feats[1], subsets=10, subset_size=100)
    assert abs(same) < 0.02 * diff


def test_kid_subset_larger_than_the_sets_is_a_clear_error(feats):
    a, b = feats
    with pytest.raises(ValueError, match="kid-subset-size=1000.*120 real and 100 generated"):
        M.kid(a, b, subset_size=1000)


def test_inception_score_equals_numpy_and_torch_fidelity():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(90, 10))
    tm = M.inception_score(logits, splits=5, seed=7)
    ref = M.inception_score_numpy(logits, splits=5, seed=7)
    assert tm[0] == pytest.approx(ref[0], rel=1e-9)
    assert tm[1] == pytest.approx(ref[1], rel=1e-7)
    from torch_fidelity.metric_isc import isc_features_to_metric

    with pytest.warns(UserWarning):  # torch's std of a single split
        one = M.inception_score(logits, splits=1)
    tf = isc_features_to_metric(torch.from_numpy(logits), splits=1, shuffle=False)
    assert one[0] == pytest.approx(tf["inception_score_mean"], rel=1e-9)
    # uniform predictions -> IS 1; confident distinct classes -> IS = number of classes
    assert M.inception_score(np.zeros((20, 10)), splits=2)[0] == pytest.approx(1.0)
    with pytest.warns(UserWarning):
        assert M.inception_score(np.eye(10).repeat(2, 0) * 50, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def test_latent_mse_and_psnr():
    z = np.zeros((3, 4, 2, 2))
    assert M.latent_mse(z, z) == 0
    assert M.latent_mse(z + 0.5, z) == pytest.approx(0.25)
    img = np.full((2, 8, 8, 3), 100, np.uint8)
    assert M.psnr(img, img) is None
    other = img.copy()
    other[..., 0] += 3  # MSE = 9/3 = 3
    assert M.psnr(other, img) == pytest.approx(10 * np.log10(255 ** 2 / 3))
    with pytest.raises(ValueError, match="shapes differ"):
        M.latent_mse(z, z[:2])
