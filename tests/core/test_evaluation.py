"""The evaluation's distances (selfperc_core.evaluation) against closed forms and their defining properties."""
import numpy as np
import pytest
import torch

from selfperc_core.evaluation import compare, frechet_distance, kernel_distance, noised_features, pooled


def gaussians(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu, s = torch.tensor([1.0, 0.0, -0.5, 0.25]), torch.tensor([1.0, 2.0, 0.5, 1.5])
    return torch.randn(n, 4, generator=g), mu + s * torch.randn(n, 4, generator=g), mu, s


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    """FD(N(0, I), N(mu, diag s^2)) = |mu|^2 + sum(1 + s^2 - 2 s)."""
    x, y, mu, s = gaussians(40_000)
    exact = float(mu.square().sum() + (1 + s.square() - 2 * s).sum())
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.03)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_with_correlated_covariances():
    """Closed form with full covariances: |m1-m2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) (scipy's sqrtm)."""
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    s1, s2 = (a @ a.T + 0.1 * torch.eye(3)).double(), (b @ b.T + 0.1 * torch.eye(3)).double()
    m2 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    n = 60_000
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    y = m2 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    r1 = sqrtm(s1.numpy())
    exact = float(m2.square().sum()) + float(np.trace(s1.numpy() + s2.numpy() - 2 * np.real(sqrtm(r1 @ s2.numpy() @ r1))))
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.03)


def unbiased_mmd2(x, y):
    """The KID estimator written out: unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m = x.shape[0]
    return float((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_kernel_distance_is_the_unbiased_mmd_and_centred_on_zero_for_one_distribution():
    x, y, _, _ = gaussians(300)
    assert kernel_distance(x.double(), y.double()) == pytest.approx(unbiased_mmd2(x.double(), y.double()), rel=1e-6)
    # unbiased: over many small draws from one distribution the estimates average to ~0 (a biased estimator,
    # keeping the diagonal, would sit clearly above 0 at 10 points)
    vals = [kernel_distance(*gaussians(20, seed=s)[:1], gaussians(20, seed=100 + s)[0]) for s in range(200)]
    mean, se = np.mean(vals), np.std(vals) / np.sqrt(len(vals))
    assert abs(mean) < 3 * se, (mean, se)
    assert kernel_distance(x, y) > 10 * se


def test_too_few_images_are_refused_with_why():
    x, y, _, _ = gaussians(10)
    with pytest.raises(ValueError, match="at least 2.*covariance"):
        frechet_distance(x[:1], y)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(x, y[:1])
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(x, y[:, :3])


def test_paired_resampling_spread_and_differences():
    x, y, _, _ = gaussians(200)
    same = compare(x, {"base": y[:50], "tuned": y[:50].clone()}, frechet_distance, bootstraps=8, seed=0,
                   reference="base")
    d = same["tuned - base"]
    assert d.value == 0 and d.std == 0 and d.low == 0 and d.high == 0  # paired: identical models never differ
    assert same["base"].std > 0
    far = compare(x[:100], {"base": x[100:200], "tuned": y[:100]}, frechet_distance, bootstraps=8, reference="base")
    assert far["tuned - base"].low > 0  # a clear difference is outside its own spread
    halves = compare(x[:100], {"base": x[100:200], "tuned": y[:100]}, kernel_distance, bootstraps=8,
                     reference="base", replace=False)
    assert halves["tuned - base"].value > 0 and 0 < halves["tuned - base"].std < float("inf")
    tiny = compare(x[:3], {"base": y[:3], "tuned": y[3:6]}, kernel_distance, bootstraps=8, reference="base",
                   replace=False)
    assert np.isnan(tiny["tuned - base"].std) and tiny["tuned - base"].as_dict()["p05"] is None  # no false zero
    with pytest.raises(ValueError, match="same number of samples"):
        compare(x, {"base": y[:10], "tuned": y[:11]}, frechet_distance)
    # a contrast between two non-reference models is their difference, replicate by replicate
    three = compare(x[:100], {"base": x[100:200], "tuned": y[:100], "mse": y[100:200]}, frechet_distance,
                    bootstraps=8, reference="base", contrasts=(("tuned", "mse"),))
    c = three["tuned - mse"]
    assert c.value == pytest.approx(three["tuned - base"].value - three["mse - base"].value)
    assert c.std > 0 and c.low < c.value < c.high
    # FD's bootstrap replicates are biased upward (repeated points); the reported interval still holds the value
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 32, generator=g, dtype=torch.float64) for _ in range(2))  # few points, wide features
    few = compare(a, {"base": b}, frechet_distance, bootstraps=30, seed=0)["base"]
    assert few.mean > few.value + 5 * few.std  # every replicate far above the value (raw q05 ~15 for a value ~9.5)
    assert few.low < few.value < few.high


def test_noised_features_share_noise_by_index_and_pool_spatially():
    lat = torch.randn(5, 3, 4, 4)
    seen = []

    def feats(x, sigma, cond):
        seen.append((x.clone(), sigma.clone()))
        return x * 2

    out = noised_features(feats, lat, [0.2, 0.6], lambda t: t * 10, lambda s, e, x0: x0 + s.view(-1, 1, 1, 1) * e,
                          batch=2)
    assert set(out) == {0.2, 0.6} and out[0.2].shape == (5, 3)
    again = noised_features(feats, lat[:3], [0.2, 0.6], lambda t: t * 10,
                            lambda s, e, x0: x0 + s.view(-1, 1, 1, 1) * e, batch=3)
    torch.testing.assert_close(again[0.6], out[0.6][:3])  # row i of a stream: the same noise in any batching
    assert not torch.allclose(out[0.2], out[0.6])
    data = noised_features(feats, lat, [0.2], lambda t: t * 10, lambda s, e, x0: x0 + s.view(-1, 1, 1, 1) * e,
                           stream="data")
    assert not torch.allclose(data[0.2], out[0.2])  # the dataset's corruption is independent of the samples'
    huge = noised_features(feats, lat[:1], [0.2], lambda t: t * 10, lambda s, e, x0: x0 + s.view(-1, 1, 1, 1) * e,
                           seed=2**64 - 1)  # the largest seed ComfyUI's widget allows
    assert torch.isfinite(huge[0.2]).all()
    assert pooled(torch.ones(2, 3, 4, 5)).shape == (2, 3)


def test_fd_resamples_stay_within_budget_at_transformer_widths():
    from selfperc_core.evaluation import FD_BUDGET, fd_resamples

    assert fd_resamples(20, 64, 2, 2) == 20  # small features: all resamples
    assert 0 < fd_resamples(20, 1280, 3, 4) < 20  # SD's mid-block: capped
    assert fd_resamples(20, 3072, 3, 4) == 0  # Flux/Qwen width: FD without spread, KID keeps its spread
    n = fd_resamples(1000, 1280, 3, 4)
    assert (n + 1) * 3 * 4 * (1280 / 1024) ** 3 <= FD_BUDGET
