"""Inversion / reconstruction and ILVR maths (selfperc_core.realimage) on a Gaussian data distribution, whose
exact denoiser is known in closed form for both the eps/v (x = x0 + sigma eps) and flow (x = (1-sigma) x0 +
sigma eps) forms."""
import pytest
import torch

from selfperc_core.realimage import euler_ode, ilvr, low_pass

M, S2 = 0.3, 0.5  # data: x0 ~ N(M, S2) per element


def denoiser(kind):
    if kind == "eps":
        return lambda x, s: M + S2 / (S2 + s**2) * (x - M)
    a = lambda s: 1 - s  # noqa: E731  flow
    return lambda x, s: M + a(s) * S2 / (a(s) ** 2 * S2 + s**2) * (x - a(s) * M)


def sigmas(kind, n):
    if kind == "eps":  # Karras-like, as ComfyUI's schedules for eps/v models, ending at 0
        s = torch.linspace(80 ** (1 / 7), 0.02 ** (1 / 7), n) ** 7
    else:
        s = torch.linspace(1.0, 1.0 / n, n)
    return torch.cat([s, torch.zeros(1)]).double()


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_inversion_then_reconstruction_returns_the_image_and_converges(kind):
    g = torch.Generator().manual_seed(0)
    x0 = (M + S2**0.5 * torch.randn(4, 3, 8, 8, generator=g)).double()
    errs = []
    for n in (40, 400):  # Euler's error is first order: 10x the steps, ~10x closer
        sig = sigmas(kind, n)
        noise = euler_ode(denoiser(kind), x0, sig.flip(0))
        back = euler_ode(denoiser(kind), noise, sig)
        errs.append(float((back - x0).abs().max()))
    assert errs[1] < 0.05 and errs[1] < errs[0] / 5, errs
    # the inverted latent is noise-like: at sigma_max it has the marginal's scale, not the image's
    sig = sigmas(kind, 100)
    noise = euler_ode(denoiser(kind), x0, sig.flip(0))
    expected_std = (S2 + float(sig[0]) ** 2) ** 0.5 if kind == "eps" else 1.0
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.2)


def test_sampling_follows_the_probability_flow_to_the_data_distribution():
    g = torch.Generator().manual_seed(1)
    sig = sigmas("flow", 200)
    x = euler_ode(denoiser("flow"), torch.randn(20000, generator=g).double(), sig)
    assert float(x.mean()) == pytest.approx(M, abs=0.02) and float(x.var()) == pytest.approx(S2, rel=0.05)


def test_low_pass_keeps_constants_and_removes_fine_detail():
    c = torch.full((2, 4, 16, 16), 0.7)
    torch.testing.assert_close(low_pass(c, 4), c)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(1, 1, 16, 16) - 0.5
    assert float(low_pass(checker, 4).abs().max()) < 1e-6
    v = torch.randn(1, 16, 2, 8, 8)  # (B, C, T, H, W) video latents keep their shape
    assert low_pass(v, 2).shape == v.shape and low_pass(v, 1) is v


def test_ilvr_weight_zero_is_plain_and_weight_one_takes_the_reference_layout():
    g = torch.Generator().manual_seed(2)
    d, ref = torch.randn(2, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    assert ilvr(d, ref, 0.0, 4) is d
    out = ilvr(d, ref, 1.0, 4)
    before = (low_pass(d, 4) - low_pass(ref.expand_as(d), 4)).norm()
    after = (low_pass(out, 4) - low_pass(ref.expand_as(d), 4)).norm()
    assert after < 0.3 * before
    torch.testing.assert_close(out - low_pass(out, 4), d - low_pass(d, 4), atol=0.35, rtol=0)  # detail mostly kept
