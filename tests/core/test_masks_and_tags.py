"""Masked loss, per-sample (regularization) weights and tag shuffling against their definitions (no ComfyUI)."""
import numpy as np
import pytest
import torch
from PIL import Image

from selfperc_core.dataset import MASK_SUFFIX, load_dataset, shuffled_tags
from selfperc_core.loop import SampleExtras
from selfperc_core.objective import LossConfig, LossWeights, grid_mask, masked_mean, self_perceptual_loss
from tests.core.test_loop import trainer


def test_the_masked_mean_is_the_plain_mean_under_ones_and_ignores_the_masked_out_part():
    v = torch.rand(2, 3, 4, 4)
    ones = torch.ones(2, 1, 4, 4)
    torch.testing.assert_close(masked_mean(v, ones), v.flatten(1).mean(1))
    half = torch.zeros(2, 1, 4, 4)
    half[..., :2] = 1
    torch.testing.assert_close(masked_mean(v, half), v[..., :2].flatten(1).mean(1))
    torch.testing.assert_close(masked_mean(v, 5 * half), masked_mean(v, half))  # the mask's scale does not matter


def test_the_mask_reaches_a_coarser_grid_as_each_cells_mean():
    m = torch.zeros(1, 1, 8, 8)
    m[..., :2, :] = 1  # the top quarter
    g = grid_mask(m, torch.zeros(1, 5, 2, 2))
    torch.testing.assert_close(g, torch.tensor([[[[0.5, 0.5], [0.0, 0.0]]]]))
    assert grid_mask(m[:, :, None], torch.zeros(1, 5, 8, 8)).shape == (1, 1, 8, 8)  # a video latent's (1, 1, h, w)


def _loss(x0_hat, mask=None, sample=None, mse_weight=1.0):
    x0, eps = torch.zeros(2, 4, 8, 8), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 1.0])
    return self_perceptual_loss(lambda x, s: x0_hat, lambda x, s: x, lambda s, e, x: x + s.view(-1, 1, 1, 1) * e,
                                x0, eps, sigma, torch.tensor([0.3, 0.7]), LossConfig(mse_weight=mse_weight),
                                weights=LossWeights(sample=sample, mask=mask))


def test_masked_out_positions_get_no_gradient_and_an_all_ones_mask_changes_nothing():
    x0_hat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    plain = _loss(x0_hat)
    assert _loss(x0_hat, torch.ones(2, 1, 8, 8)).loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    _loss(x0_hat, mask).loss.backward()
    grad = x0_hat.grad
    assert grad[..., 4:].abs().max() == 0 and grad[..., :4].abs().min() > 0


def test_sample_weights_weigh_each_samples_loss():
    x0_hat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    one = [_loss(x0_hat, sample=torch.tensor(w)) for w in ([1.0, 0.0], [0.0, 1.0])]
    both = _loss(x0_hat, sample=torch.tensor([2.0, 0.5]))
    assert both.loss.item() == pytest.approx(2.0 * one[0].loss.item() + 0.5 * one[1].loss.item(), rel=1e-5)


def test_the_trainer_with_ones_masks_and_unit_weights_trains_exactly_as_without():
    plain, p0 = trainer(batch_size=2, seed=3, mse_weight=0.5)
    masked, p1 = trainer(batch_size=2, seed=3, mse_weight=0.5)
    masked.masks = [torch.ones(1, 8, 8)] * 3 + [None] * 3
    masked.sample_weights = [1.0] * 6
    for _ in range(3):
        assert plain.step().loss.item() == pytest.approx(masked.step().loss.item(), rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(p0, p1))
    half, _ = trainer(batch_size=2, seed=3, mse_weight=0.5)
    m = torch.zeros(1, 8, 8)
    m[:, :, :4] = 1
    half.masks = [m] * 6
    assert half.step().loss.item() != pytest.approx(plain.losses[0], rel=1e-3)


def test_masks_and_weights_must_match_the_images_and_not_replace_the_objective():
    tr, params = trainer()
    with pytest.raises(ValueError, match="6 latents but 2 masks"):
        type(tr)(params, tr.latents, tr.conds, tr.view, tr.s, conditions=SampleExtras(masks=[None, None]))
    with pytest.raises(ValueError, match="not a replacement one"):
        type(tr)(params, tr.latents, tr.conds, tr.view, tr.s, objective=lambda *a: None,
                 conditions=SampleExtras(weights=[1.0] * 6))


def test_shuffled_tags_keep_the_first_tags_and_give_distinct_orders_fixed_by_the_seed():
    cap = "sks dog, red collar, grass, sunny, park, running"
    orders = shuffled_tags(cap, keep=2, n=6, seed=0)
    assert orders[0] == cap and len(orders) == len(set(orders)) == 6
    for o in orders:
        tags = o.split(", ")
        assert tags[:2] == ["sks dog", "red collar"] and sorted(tags[2:]) == sorted(cap.split(", ")[2:])
    assert shuffled_tags(cap, 2, 6, 0) == orders and shuffled_tags(cap, 2, 6, 1) != orders
    assert shuffled_tags("one, two", 1, 8, 0) == ["one, two"]  # one tag to move: no other order
    assert shuffled_tags("a, b, c", 0, 16, 0) == shuffled_tags("a, b, c", 0, 16, 0) and \
        len(shuffled_tags("a, b, c", 0, 16, 0)) == 6  # all 3! orders, no more
    assert shuffled_tags(None, 1, 4, 0) == [None]


def _save(path, arr, mode=None):
    Image.fromarray(arr, mode).save(path)


def test_masks_come_from_the_alpha_channel_or_a_mask_file_and_are_cropped_with_the_image(tmp_path):
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :32, 3] = 255  # left half opaque
    _save(tmp_path / "a.png", rgba)
    rgb = np.full((64, 96, 3), 90, np.uint8)
    _save(tmp_path / "b.png", rgb)
    side = np.zeros((32, 48), np.uint8)
    side[:16] = 255  # top half
    _save(tmp_path / ("b" + MASK_SUFFIX), side)
    _save(tmp_path / "c.png", rgb)  # no mask: weight 1 everywhere
    _save(tmp_path / "d.png", rgb)
    _save(tmp_path / ("d" + MASK_SUFFIX), np.zeros((64, 96), np.uint8))  # all black: skipped
    _save(tmp_path / "e.png", rgb)
    _save(tmp_path / ("e" + MASK_SUFFIX), np.zeros((64, 64), np.uint8))  # another shape: skipped, named
    ds = load_dataset(tmp_path, 32, masks=True)
    assert [p.name for p in ds.files] == ["a.png", "b.png", "c.png"]
    reasons = {s.path.name: s.reason for s in ds.skipped}
    assert "all black" in reasons["d.png"] and "e.mask.png is 64x64, not the image's shape 96x64" in reasons["e.png"]
    a, b, c = ds.masks
    assert a.shape == (32, 32) and c is None
    # 64x48 covers 32x32 at 42.7x32, centre-cropped from x = 5.3: the opaque half is the crop's first 16 columns
    assert a[:, :14].min() > 240 and a[:, 18:].max() < 3
    green = ds.images[0][..., 1]  # red where opaque, white (composited) where transparent: the mask lies on the image
    assert bool(((a > 128) == (green < 128)).all())
    assert b[:15].min() > 240 and b[17:].max() < 3
    plain = load_dataset(tmp_path, 32)
    assert len(plain.files) == 8 and all(m is None for m in plain.masks)  # off: mask files are images as before
