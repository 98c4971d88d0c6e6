import pytest
import torch

from selfperc_core import T_PRIME_STRATEGIES, draw_t, draw_t_prime
from selfperc_core.timesteps import MIN_GAP


@pytest.mark.parametrize("strategy", T_PRIME_STRATEGIES)
def test_t_prime_is_in_range_and_never_equals_t(strategy):
    g = torch.Generator().manual_seed(0)
    t = draw_t(20000, g)
    t[:100] = 0.5  # many repeats of one value
    tp = draw_t_prime(t, strategy, g, (0.2, 0.8))
    assert tp.min() >= 0.2 and tp.max() <= 0.8
    assert ((tp - t).abs() >= MIN_GAP - 1e-7).all()


def test_t_prime_is_independent_of_t_and_uniform_by_default():
    g = torch.Generator().manual_seed(1)
    t = draw_t(50000, g)
    tp = draw_t_prime(t, "uniform", g)
    assert abs(torch.corrcoef(torch.stack([t, tp]))[0, 1]) < 0.02
    hist = torch.histc(tp, bins=10, min=0, max=1) / len(tp)
    assert (hist - 0.1).abs().max() < 0.01


def test_strategies_differ_in_shape():
    g = torch.Generator().manual_seed(2)
    t = draw_t(50000, g)
    low = draw_t_prime(t, "low_noise", g)
    ln = draw_t_prime(t, "logit_normal", g)
    assert low.mean() < 0.4  # E[u^2] = 1/3
    assert (ln - 0.5).abs().mean() < (draw_t_prime(t, "uniform", g) - 0.5).abs().mean()


def test_bad_arguments_are_named():
    t = torch.rand(3)
    with pytest.raises(ValueError, match="unknown t' strategy 'gauss'"):
        draw_t_prime(t, "gauss")
    with pytest.raises(ValueError, match="range"):
        draw_t_prime(t, "uniform", None, (0.9, 0.1))
