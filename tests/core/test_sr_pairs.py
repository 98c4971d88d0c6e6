"""The super-resolution pairs against their definitions, and the loop's per-step fresh condition (no ComfyUI)."""
import math

import pytest
import torch

from selfperc_core.super_resolution import (
    Degradation,
    bicubic,
    check_factor,
    degrade,
    downscale,
    draw_degradation,
    gaussian_blur,
    psnr,
)
from tests.core.test_loop import trainer


def test_the_low_res_image_is_the_mean_of_each_factor_box():
    x = torch.randn(2, 3, 12, 8, generator=torch.Generator().manual_seed(0))
    boxes = x.view(2, 3, 3, 4, 2, 4).mean(dim=(3, 5))
    torch.testing.assert_close(downscale(x, 4), boxes)
    with pytest.raises(ValueError, match=r"\(8x12\) do not divide by the factor 5"):
        downscale(x, 5)


def test_sizes_the_factor_does_not_allow_are_refused_naming_them():
    with pytest.raises(ValueError, match="resolution 24 .* too small for factor 4: the low-res side would be 6 px"):
        check_factor(4, 24, 24, "resolution 24")
    with pytest.raises(ValueError, match="factor 1 must be an integer within"):
        check_factor(1, 64, 64)
    check_factor(4, 32, 64)


def test_the_blur_is_a_normalised_gaussian_and_sigma_0_is_the_image_itself():
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert gaussian_blur(x, 0.0) is x
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.5), flat)  # weights sum to 1, borders reflected
    sigma, r = 1.0, 3
    k1 = torch.exp(-0.5 * (torch.arange(-r, r + 1.0) / sigma) ** 2)
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    inner = torch.nn.functional.conv2d(x, k2.expand(3, 1, -1, -1), groups=3)  # no padding: the interior
    torch.testing.assert_close(gaussian_blur(x, sigma)[..., r:-r, r:-r], inner, rtol=1e-5, atol=1e-6)


def test_each_draw_is_uniform_within_its_bounds_and_fixed_by_its_seed():
    d = Degradation(blur_max=2.0, noise_augmentation_max=0.4, jpeg_min_quality=60).validate()
    draws = [draw_degradation(d, s) for s in range(4000)]
    assert draw_degradation(d, 7) == draws[7]
    for name, hi in (("blur", 2.0), ("level", 0.4)):
        v = torch.tensor([getattr(x, name) for x in draws])
        assert 0 <= float(v.min()) and float(v.max()) <= hi
        assert float(v.mean()) == pytest.approx(hi / 2, rel=0.03)  # uniform: mean hi/2, sd hi/sqrt(12)
        assert float(v.std()) == pytest.approx(hi / math.sqrt(12), rel=0.05)
    q = torch.tensor([x.quality for x in draws])
    assert int(q.min()) == 60 and int(q.max()) == 100 and len(set(q.tolist())) == 41
    assert len({x.seed for x in draws}) > 3990
    none = draw_degradation(Degradation(), 3)
    assert (none.blur, none.level, none.quality) == (0.0, 0.0, 0)


def test_degrade_blurs_then_calls_the_codec_at_the_drawn_quality():
    low = torch.rand(1, 3, 8, 8) * 2 - 1
    d = draw_degradation(Degradation(blur_max=1.0, jpeg_min_quality=50), 4)
    seen = []
    out = degrade(low, d, lambda x, q: seen.append(q) or x + 1)
    assert seen == [d.quality]
    torch.testing.assert_close(out, gaussian_blur(low, d.blur) + 1)
    with pytest.raises(ValueError, match="needs a codec"):
        degrade(low, d)
    for bad, message in ((dict(blur_max=-0.1), "blur_max"), (dict(noise_augmentation_max=1.5), "noise_aug"),
                         (dict(jpeg_min_quality=101), "jpeg_min_quality")):
        with pytest.raises(ValueError, match=message):
            Degradation(**bad).validate()


def test_psnr_and_the_bicubic_baseline():
    ref = torch.zeros(2, 3, 4, 4)
    x = ref + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    torch.testing.assert_close(psnr(x, ref), 10 * torch.log10(4 / torch.tensor([0.01, 0.04])))
    low = torch.rand(1, 3, 4, 4)
    up = bicubic(low, 4)
    assert up.shape == (1, 3, 16, 16)
    torch.testing.assert_close(bicubic(torch.full((1, 3, 4, 4), 0.5), 4), torch.full((1, 3, 16, 16), 0.5))


def test_the_fresh_condition_gets_a_seed_per_sample_and_step_and_a_resumed_run_the_same():
    plain, _ = trainer(batch_size=2, seed=4)
    tr, _ = trainer(batch_size=2, seed=4)
    seen = []
    tr.condition = lambda i, c, seed: seen.append((i, seed)) or c
    a, b = plain._draw(), tr._draw()
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a[:5], b[:5]))  # draws kept
    assert not a[5].any() and len(set(b[5].tolist())) == 2
    for _ in range(3):
        tr.step()
    assert len(seen) == 6 and len({s for _, s in seen}) == 6
    state = tr.state_dict()
    tr.step()
    after = seen[-2:]
    again, _ = trainer(batch_size=2, seed=4)
    again.condition = lambda i, c, seed: seen.append((i, seed)) or c
    again.load_state_dict(state)
    again.step()
    assert seen[-2:] == after
