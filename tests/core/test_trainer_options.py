"""The trainer options users expect (timestep laws, min-SNR, weight decay, clipping, Adafactor, caption dropout),
each against its formula on the toy network (no ComfyUI)."""
import copy
import math

import pytest
import torch

from selfperc_core.loop import TrainSettings, make_optimizer
from selfperc_core.objective import min_snr_weight, prediction_mse
from selfperc_core.timesteps import TLaw, draw_t
from tests.core.test_loop import trainer


@pytest.mark.parametrize("law", [TLaw(), TLaw("logit_normal"), TLaw("logit_normal", 0.5, 0.8),
                                 TLaw(shift=3.0), TLaw("logit_normal", -0.3, 1.2, shift=2.5)])
def test_each_timestep_law_draws_by_its_distribution_function(law):
    g = torch.Generator().manual_seed(0)
    t = draw_t(40000, g, (0.1, 0.9), law=law.validate())
    assert 0.1 <= float(t.min()) and float(t.max()) <= 0.9
    u = (t - 0.1) / 0.8
    grid = torch.linspace(0.05, 0.95, 19)
    empirical = torch.stack([(u <= q).float().mean() for q in grid])
    assert float((empirical - law.cdf(grid)).abs().max()) < 0.012  # Kolmogorov-Smirnov at 40000 draws: ~0.007 at 1%


def test_the_default_law_draws_what_uniform_training_always_drew():
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(draw_t(64, a, (0.0, 0.9)), 0.9 * torch.rand(64, generator=b))


def test_a_shift_moves_draws_towards_noise_by_its_formula():
    u = torch.tensor([0.1, 0.5, 0.9])
    g = torch.Generator().manual_seed(1)
    shifted = draw_t(3, g, law=TLaw(shift=3.0))
    plain = torch.rand(3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert torch.all(TLaw(shift=3.0).cdf(u) < u)  # fewer draws below any level


def test_bad_laws_are_refused_naming_the_setting():
    for law, message in [(TLaw("beta"), "unknown t_law 'beta'"), (TLaw(std=0.0), "t_law_std 0.0"),
                         (TLaw(shift=0.0), "t_shift 0.0"), (TLaw(shift=float("nan")), "t_shift nan")]:
        with pytest.raises(ValueError, match=message):
            law.validate()


def test_min_snr_weights_follow_their_formula_for_each_parameterization():
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0])
    snr = 1 / sigma ** 2  # 100, 4, 1, 1/9
    g = torch.minimum(snr, torch.tensor(5.0))
    torch.testing.assert_close(min_snr_weight(sigma, 5.0, -sigma), g / snr)  # eps: c_out = -sigma
    torch.testing.assert_close(min_snr_weight(sigma, 5.0, -sigma / (sigma ** 2 + 1).sqrt()), g / (snr + 1))  # v
    torch.testing.assert_close(min_snr_weight(sigma, 5.0, torch.ones(4)), g)  # x0-prediction: c_out = 1
    edm = min_snr_weight(sigma, 5.0, sigma * 0.5 / (sigma ** 2 + 0.25).sqrt(), sigma_data=0.5)
    snr_edm = 0.25 / sigma ** 2
    torch.testing.assert_close(edm, torch.minimum(snr_edm, torch.tensor(5.0)) / (snr_edm + 1))
    assert float(min_snr_weight(sigma, 5.0, -sigma)[0]) == pytest.approx(0.05)  # high SNR weighed down 20x
    x0, x0_hat = torch.zeros(4, 2, 3), torch.arange(24.0).reshape(4, 2, 3)
    w = torch.tensor([0.5, 1.0, 2.0, 0.0])
    expected = sum(float(w[i]) * float((x0_hat[i] ** 2).mean()) for i in range(4)) / 4
    assert float(prediction_mse(x0_hat, x0, weights=w)) == pytest.approx(expected)


def test_min_snr_weighs_the_trainers_mse_term_by_its_formula_and_not_the_validation():
    kw = dict(perceptual_weight=0.0, mse_weight=1.0)
    plain, _ = trainer(**kw)
    weighted, _ = trainer(min_snr_gamma=0.01, **kw)  # below the toy's SNRs: every weight below 1
    draw = plain._draw()
    a, b = plain._micro_batch(draw, 0), weighted._micro_batch(draw, 0)  # batch 1, the same model and draws
    sigma = plain.view.sigma_of_t(draw[1][:1])
    w = min_snr_weight(sigma, 0.01, plain.view.output_scale(sigma))
    assert float(b.mse) == pytest.approx(float(w[0]) * float(a.mse), rel=1e-5) and float(w[0]) != 1.0
    latents = plain.latents[:2]
    assert plain.validate(latents, [None, None], seed=3) == weighted.validate(latents, [None, None], seed=3)
    for bad, message in [(dict(min_snr_gamma=5.0, mse_space="x0", mse_weight=1.0), "set mse_space 'native'"),
                         (dict(min_snr_gamma=5.0), "mse_weight 0 leaves out"),
                         (dict(t_law_std=2.0), "with t_law 'uniform' leave them"),
                         (dict(t_law="logit_normal", t_shift=1e30), "out of range"),
                         (dict(optimizer="adamw", weight_decay=1e6), "weight_decay 1000000.0")]:
        with pytest.raises(ValueError, match=message):
            TrainSettings(**bad).validate()


def test_weight_decay_is_decoupled_and_only_where_the_optimizer_decouples_it():
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer("adamw", [p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))  # a zero gradient: decay alone
    for name in ("adam", "sgd", "rmsprop"):
        with pytest.raises(ValueError, match=f"weight_decay is decoupled weight decay, for adamw, adafactor or prodigy; the "
                                             f"optimizer '{name}'"):
            TrainSettings(optimizer=name, weight_decay=0.01).validate()


def test_gradient_clipping_bounds_the_update_of_plain_sgd():
    def update_norm(**settings):
        tr, params = trainer(optimizer="sgd", learning_rate=1.0, **settings)
        before = [p.detach().clone() for p in params]
        tr.step()
        return math.sqrt(sum(float((p.detach() - b).square().sum()) for p, b in zip(params, before)))
    free = update_norm()  # lr 1: the gradient's own norm (7e-5 on the toy)
    assert free > 5e-5
    # torch's clip_grad_norm_ scales by bound / (norm + 1e-6)
    assert update_norm(max_grad_norm=1e-5) == pytest.approx(1e-5 * free / (free + 1e-6), rel=1e-4)
    assert update_norm(max_grad_norm=1.0) == pytest.approx(free, rel=1e-6)  # above the norm: untouched


def test_adafactor_moves_a_zero_started_lora_as_far_as_adamw_at_the_same_learning_rate():
    def moved(name):
        tr, params = trainer(optimizer=name, learning_rate=1e-3)
        before = [p.detach().clone() for p in params]
        for _ in range(5):
            tr.step()
        return math.sqrt(sum(float((p.detach() - b).square().sum()) for p, b in zip(params, before)))
    ratio = moved("adafactor") / moved("adamw")
    assert 0.1 < ratio < 10, ratio  # torch's default eps2 would make it ~1e-3


def test_adafactor_trains_and_resumes_exactly():
    a, pa = trainer(optimizer="adafactor", learning_rate=1e-2)
    for _ in range(2):
        a.step()
    state = copy.deepcopy(a.state_dict())  # as read back from a file: not the live optimizer's tensors
    b, pb = trainer(optimizer="adafactor", learning_rate=1e-2)
    for _ in range(2):
        b.step()
    b.load_state_dict(state)
    a.step(), b.step()
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y)


def test_caption_dropout_replaces_that_fraction_of_samples_by_the_empty_caption():
    tr, _ = trainer(caption_dropout=0.3, batch_size=4)
    drops = torch.cat([tr._draw()[4] for _ in range(2500)])
    p = float(drops.float().mean())
    assert abs(p - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(drops)), p
    seen = []
    tr.conds = ["own"] * len(tr.latents)
    tr.empty_conds = ["empty"] * len(tr.latents)
    tr.view.collate = lambda conds: seen.append(list(conds)) or None
    tr.objective = lambda *a: None  # only the batch's conditionings are looked at
    draw = tr._draw()
    tr._micro_batch(draw, 0)
    assert seen[-1] == ["empty" if d else "own" for d in draw[4].tolist()]
    with pytest.raises(ValueError, match="caption_dropout 1.0 must be within"):
        TrainSettings(caption_dropout=1.0).validate()


def test_prodigy_is_prodigyopts_own_trains_resumes_exactly_and_is_refused_by_name_without_its_package(monkeypatch):
    import builtins

    prodigyopt = pytest.importorskip("prodigyopt")
    tr, params = trainer(batch_size=2, seed=1, optimizer="prodigy", learning_rate=1.0, weight_decay=0.01)
    assert type(tr.optimizer) is prodigyopt.Prodigy and tr.optimizer.param_groups[0]["decouple"]
    first = [tr.step().loss.item() for _ in range(6)]
    assert tr.optimizer.param_groups[0]["d"] > 2e-6  # the step-size estimate grew from its d0 1e-6
    state = copy.deepcopy(tr.state_dict())
    weights = [p.detach().clone() for p in params]
    after = [tr.step().loss.item() for _ in range(2)]
    again, p2 = trainer(batch_size=2, seed=1, optimizer="prodigy", learning_rate=1.0, weight_decay=0.01)
    with torch.no_grad():
        for p, w in zip(p2, weights):
            p.copy_(w)
    again.load_state_dict(state)
    assert [again.step().loss.item() for _ in range(2)] == after and all(math.isfinite(x) for x in first)
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "prodigyopt" else real_import(name, *a, **k))
    with pytest.raises(ValueError, match="needs the prodigyopt package"):
        make_optimizer("prodigy", params, 1.0)
