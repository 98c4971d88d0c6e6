"""Inversion under guidance (selfperc_core.inversion) on Gaussian data whose mean is set by the prompt's
embedding: D(x, sigma; mu) is exact in closed form, and the guided denoiser is affine in the unconditional
embedding, so Null-text Inversion can retrace the pivot exactly and plain inversion + cfg provably drifts."""
import pytest
import torch

from selfperc_core.inversion import (
    NullTextSettings,
    denoised_after_shift,
    denoised_to_reach,
    direct_denoised,
    euler_step,
    null_text,
    replay,
    trajectory,
)

S2 = 0.5  # data variance per element; the mean is the embedding


def denoiser(kind):
    """Exact D(x, sigma; mu) for x0 ~ N(mu, S2): eps form x = x0 + sigma eps, flow form x = (1-sigma) x0 + sigma eps."""
    if kind == "eps":
        return lambda x, s, mu: mu + S2 / (S2 + s**2) * (x - mu)
    return lambda x, s, mu: mu + (1 - s) * S2 / ((1 - s) ** 2 * S2 + s**2) * (x - (1 - s) * mu)


def sigmas(kind, n):
    s = torch.linspace(14.6 ** (1 / 7), 0.03 ** (1 / 7), n) ** 7 if kind == "eps" else torch.linspace(1.0, 1 / n, n)
    return torch.cat([s, torch.zeros(1)]).double()


def setup(kind, n=20):
    g = torch.Generator().manual_seed(0)
    cond = (0.6 * torch.randn(2, 4, 6, 6, generator=g)).double()  # the prompt's mean
    null = (0.6 * torch.randn(2, 4, 6, 6, generator=g)).double()   # the empty prompt's
    x0 = cond + S2**0.5 * torch.randn(2, 4, 6, 6, generator=g).double()
    sig = sigmas(kind, n)
    D = denoiser(kind)
    pivots = trajectory(lambda x, s: D(x, s, cond), x0, sig)
    return D, cond, null, x0, sig, pivots


def guided_fn(D, cond, cfg):
    def prepare(i, x, s):
        dc = D(x, s, cond)  # the conditional branch: once per step

        def guided(nulls):
            du = D(x, s, nulls[0])  # once, as ComfyUI's cfg_function combines the two predictions
            return du + (dc - du) * cfg
        return guided
    return prepare


def test_the_step_solved_for_its_denoiser_lands_where_asked():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 5, generator=g).double(), torch.randn(3, 5, generator=g).double()
    for s, s2 in ((14.0, 9.0), (0.5, 0.1), (0.3, 0.0)):
        s, s2 = torch.tensor(s).double(), torch.tensor(s2).double()
        torch.testing.assert_close(euler_step(x, denoised_to_reach(x, y, s, s2), s, s2), y, rtol=0, atol=1e-12)


def test_a_shifted_latents_step_is_handed_to_the_sampler_as_a_denoiser_at_its_own_latent():
    g = torch.Generator().manual_seed(2)
    x, moved, d = (torch.randn(3, 5, generator=g).double() for _ in range(3))
    for s, s2 in ((14.0, 9.0), (0.5, 0.1), (0.3, 0.0)):
        s, s2 = torch.tensor(s).double(), torch.tensor(s2).double()
        torch.testing.assert_close(euler_step(x, denoised_after_shift(d, x, moved, s, s2), s, s2),
                                   euler_step(moved, d, s, s2), rtol=0, atol=1e-12)
        assert torch.equal(denoised_after_shift(d, x, x.clone(), s, s2), d)  # unmoved: exactly D


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_pivot_starts_at_the_image_and_plain_cfg1_replay_comes_back(kind):
    D, cond, null, x0, sig, pivots = setup(kind, n=50)
    assert len(pivots) == len(sig) and torch.equal(pivots[-1], x0)
    back = replay(lambda i, x, s: D(x, s, cond), pivots[0], sig)
    assert torch.mean((back - x0) ** 2) < 0.02 * torch.mean(x0**2)  # DDIM inversion at cfg 1: close, not exact


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_null_text_retraces_the_pivot_at_cfg_where_plain_inversion_drifts(kind):
    D, cond, null, x0, sig, pivots = setup(kind)
    cfg = 7.5
    prepare = guided_fn(D, cond, cfg)
    plain = replay(lambda i, x, s: prepare(i, x, s)([null]), pivots[0], sig)
    plain_err = torch.mean((plain - x0) ** 2).item()
    res = null_text(prepare, pivots, sig, [null], NullTextSettings(inner_steps=200, lr=0.05, early_stop=1e-12))
    err = torch.mean((res.reconstruction - x0) ** 2).item()
    assert plain_err > 0.1, plain_err  # cfg 7.5 from a cfg-1 pivot: far off
    assert err < 1e-4 * plain_err, (err, plain_err)
    # the fitted embeddings replay to the same reconstruction (what the guider does)
    again = replay(lambda i, x, s: prepare(i, x, s)(res.nulls[i]), pivots[0], sig)
    torch.testing.assert_close(again, res.reconstruction, rtol=0, atol=1e-12)
    assert len(res.nulls) == len(sig) - 1 and all(1 <= n <= 200 for n in res.inner_steps)


def test_null_text_with_the_paper_settings_lowers_the_error_many_times():
    D, cond, null, x0, sig, pivots = setup("eps", n=50)
    prepare = guided_fn(D, cond, 7.5)
    plain = replay(lambda i, x, s: prepare(i, x, s)([null]), pivots[0], sig)
    res = null_text(prepare, pivots, sig, [null])  # lr 1e-2, 10 inner steps, early stop 1e-5
    err, plain_err = torch.mean((res.reconstruction - x0) ** 2), torch.mean((plain - x0) ** 2)
    assert err < plain_err / 5, (err, plain_err)
    assert max(res.inner_steps) <= 10


def test_at_cfg_one_the_null_embedding_comes_back_unchanged():
    D, cond, null, x0, sig, pivots = setup("eps")
    res = null_text(guided_fn(D, cond, 1.0), pivots, sig, [null])
    for step in res.nulls:
        assert torch.equal(step[0], null)


def test_early_stop_and_the_learning_rate_schedule_follow_the_paper():
    """At 50 steps the paper's lr is 1e-2 (1 - i/100) and its threshold 1e-5 + 2e-5 i: a denoiser that ignores
    the embedding shows both (the loss never changes, so every step runs all updates unless the threshold is
    above it)."""
    seen = []

    class Probe(torch.optim.Adam):
        def __init__(self, params, lr):
            seen.append(lr)
            super().__init__(params, lr=lr)
    n = 50
    sig = sigmas("eps", n)
    pivots = [torch.zeros(1, 2) for _ in range(n + 1)]
    const = 3e-4  # the squared step error: above the threshold early, below it from i = 15 on (1e-5 + 2e-5 i)
    sig = sig.float()

    def prepare(i, x, s):  # every step lands sqrt(const) off the pivot, whatever the embedding
        return lambda nulls: denoised_to_reach(x, pivots[i + 1] + const**0.5, s, sig[i + 1]) + 0 * nulls[0].sum()
    orig = torch.optim.Adam
    torch.optim.Adam = Probe
    try:
        res = null_text(prepare, pivots, sig, [torch.zeros(1)])
    finally:
        torch.optim.Adam = orig
    torch.testing.assert_close(torch.tensor(seen), 1e-2 * (1 - torch.arange(n) / 100), rtol=1e-6, atol=0)
    want = [10 if 3e-4 >= 1e-5 + 2e-5 * i else 1 for i in range(n)]
    assert res.inner_steps == want, res.inner_steps
    # per-step weights (the paper's units) scale what the threshold sees, not the updates' direction
    part = null_text(prepare, pivots, sig, [torch.zeros(1)], loss_weights=[0.4] * n)
    assert part.inner_steps == [10 if 1.2e-4 >= 1e-5 + 2e-5 * i else 1 for i in range(n)], part.inner_steps
    assert part.losses[0] == pytest.approx(0.4 * res.losses[0], rel=1e-6)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_direct_inversion_puts_the_source_back_on_the_pivot(kind):
    D, cond, null, x0, sig, pivots = setup(kind)
    cfg = 7.5

    def guided(x, s, mu):
        return D(x, s, null) + cfg * (D(x, s, mu) - D(x, s, null))

    def corrected(mu):
        return lambda i, x, s: direct_denoised(guided(x, s, mu), guided(pivots[i], s, cond), pivots[i],
                                               pivots[i + 1], s, sig[i + 1])
    same = replay(corrected(cond), pivots[0], sig)  # identical source and target prompts
    torch.testing.assert_close(same, x0, rtol=0, atol=1e-12)
    plain = replay(lambda i, x, s: guided(x, s, cond), pivots[0], sig)
    assert torch.mean((plain - x0) ** 2) > 0.1
    edit = replay(corrected(cond + 1.0), pivots[0], sig)  # a target prompt that moves the mean
    assert torch.mean((edit - x0 - 1.0) ** 2) < torch.mean((edit - x0) ** 2)


def test_bad_settings_are_refused_by_name():
    for kw, word in (({"inner_steps": 0}, "inner_steps"), ({"lr": 0}, "learning rate"),
                     ({"early_stop": -1}, "early_stop")):
        with pytest.raises(ValueError, match=word):
            NullTextSettings(**kw).validate()
