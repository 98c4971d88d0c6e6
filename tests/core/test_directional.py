"""DiffusionCLIP's directional loss and rollout (selfperc_core/directional.py), against formulas and on the toy."""
import math

import pytest
import torch

from selfperc_core import AdapterSwitch
from selfperc_core.directional import (
    DirectionalConfig,
    Rollout,
    check_rollout,
    directional_loss,
    directional_loss_parts,
    invert,
    rollout_sigmas,
)
from selfperc_core.inversion import euler_step
from selfperc_core.loop import Trainer, TrainSettings
from selfperc_core.model_view import ModelView
from tests.core.toy import EPS, ToyUNet, host_callables


def test_directional_loss_is_zero_parallel_two_opposite_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 4, 8, 8, generator=g)
    other = torch.randn(3, 4, 8, 8, generator=g)
    torch.testing.assert_close(directional_loss(d, d), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(directional_loss(d, 3.0 * d), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(directional_loss(d, -d), torch.full((3,), 2.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(directional_loss(0.01 * d, 50.0 * other), directional_loss(d, other))
    cos = (d * other).flatten(1).sum(1) / (d.flatten(1).norm(dim=1) * other.flatten(1).norm(dim=1))
    torch.testing.assert_close(directional_loss(d, other), 1 - cos)
    # one text direction for the whole batch
    torch.testing.assert_close(directional_loss(d, d[:1]), directional_loss(d, d[:1].expand_as(d)))
    assert directional_loss(d[:1], d[:1])[0] < directional_loss(d[1:2], d[:1])[0]


def test_the_rollout_runs_from_t0_to_clean_in_equal_steps_and_refuses_t0_outside_the_schedule():
    sigmas = rollout_sigmas(lambda t: t * 10.0, 0.5, 4)
    torch.testing.assert_close(sigmas, torch.tensor([5.0, 3.75, 2.5, 1.25, 0.0]))
    for t0 in (0.0, -0.1, 1.2, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="t0 .* outside the schedule"):
            check_rollout(t0, 4)
    with pytest.raises(ValueError, match=r"t0 0.95 is outside the schedule: it must be in \(0, 0.9\]"):
        check_rollout(0.95, 4, t_max=0.9)
    for steps in (0, 201):
        with pytest.raises(ValueError, match="rollout_steps"):
            check_rollout(0.5, steps)
    with pytest.raises(ValueError, match="direction_weight is 0"):
        DirectionalConfig(direction_weight=0.0).validate()
    with pytest.raises(ValueError, match="identity_weight nan"):
        DirectionalConfig(identity_weight=float("nan")).validate()


def _linear_case():
    """A one-weight 'model' (x0_hat = w x), a fixed text direction, features = 2x: small enough to write by hand."""
    g = torch.Generator().manual_seed(3)
    x0, start, eps = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    sigmas = torch.tensor([3.0, 1.5, 0.0])
    sigma_p = torch.tensor([0.7, 2.0])
    d_text = torch.randn(1, 4, 4, 4, generator=g)
    return x0, start, eps, sigmas, sigma_p, d_text


def test_each_rollout_step_is_scored_and_its_graph_ends_at_its_own_model_call():
    x0, start, eps, sigmas, sigma_p, d_text = _linear_case()
    cfg = DirectionalConfig(direction_weight=1.0, identity_weight=0.5, mse_weight=0.25)

    def run(w, backward=None):
        return directional_loss_parts(lambda x, s: w * x, lambda x, s: 2.0 * x, EPS.noise_scaling, x0, eps, sigma_p,
                                      Rollout(start, sigmas, lambda x0_hat: x0_hat - x0, lambda x, s: d_text), cfg,
                                      backward=backward)

    w = torch.tensor(0.8, requires_grad=True)
    parts = run(w)
    assert not parts.backward_done
    parts.loss.backward()
    w_steps = torch.tensor(0.8, requires_grad=True)
    per_step = run(w_steps, backward=lambda loss: loss.backward())  # each step's graph freed before the next
    assert per_step.backward_done and not per_step.loss.requires_grad
    torch.testing.assert_close(per_step.loss, parts.loss.detach())
    torch.testing.assert_close(w_steps.grad, w.grad)

    def by_hand(w, detach):
        x, total = start, 0.0
        s_p = sigma_p.reshape(-1, 1, 1, 1)
        for k in range(2):
            x0_hat = w * x
            cos = torch.nn.functional.cosine_similarity((x0_hat - x0).flatten(1), d_text.flatten(1), dim=1)
            ident = ((2.0 * (x0_hat + s_p * eps) - 2.0 * (x0 + s_p * eps)) ** 2).flatten(1).mean(1).mean()
            total = total + ((1 - cos).mean() + 0.5 * ident + 0.25 * ((x0_hat - x0) ** 2).mean()) / 2
            step = x0_hat.detach() if detach else x0_hat
            x = x + (sigmas[k + 1] - sigmas[k]) * (x - step) / sigmas[k]
        return total

    w2 = torch.tensor(0.8, requires_grad=True)
    expected = by_hand(w2, detach=True)
    expected.backward()
    torch.testing.assert_close(parts.loss.detach(), expected.detach())
    torch.testing.assert_close(w.grad, w2.grad)
    w3 = torch.tensor(0.8, requires_grad=True)
    by_hand(w3, detach=False).backward()
    assert abs(float(w3.grad - w.grad)) > 1e-3 * abs(float(w.grad))  # a graph through the whole rollout differs
    assert parts.direction is not None and 0 < float(parts.direction) < 2


def test_an_exact_reconstruction_has_no_identity_or_mse_term_and_a_zero_change_scores_one():
    x0, start, eps, sigmas, sigma_p, d_text = _linear_case()
    parts = directional_loss_parts(lambda x, s: x0.clone(), lambda x, s: 2.0 * x, EPS.noise_scaling, x0, eps, sigma_p,
                                   Rollout(start, sigmas, lambda x0_hat: x0_hat - x0, lambda x, s: d_text),
                                   DirectionalConfig(identity_weight=1.0, mse_weight=1.0))
    assert float(parts.perceptual) == 0.0 and float(parts.mse) == 0.0
    assert float(parts.loss) == pytest.approx(1.0)


def toy_view():
    torch.manual_seed(0)
    switch = AdapterSwitch()
    net = ToyUNet(switch)
    predict, frozen, _ = host_callables(net, switch, EPS)
    view = ModelView(lambda x, s, c: predict(x, s), lambda x, s, c: frozen(x, s), EPS.noise_scaling,
                     lambda t: 0.03 + t * 10.0, "eps")
    return net, switch, view


def test_the_frozen_rollout_from_its_inversion_returns_near_the_image_and_training_moves_along_the_direction():
    net, switch, view = toy_view()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 8, 8, generator=g) * 0.5
    sigmas = rollout_sigmas(view.sigma_of_t, 0.3, 8)

    def frozen_denoise(x, s):
        with switch.off(), torch.no_grad():
            return view.predict_x0(x, s.reshape(1).expand(x.shape[0]), None)
    start = invert(frozen_denoise, x0, sigmas)
    x = start
    for k in range(len(sigmas) - 1):
        x = euler_step(x, frozen_denoise(x, sigmas[k]), sigmas[k], sigmas[k + 1])
    assert (x - x0).square().mean() < 0.05 * x0.square().mean()  # DDIM inversion's approximation, at 8 steps

    d_text = torch.randn(1, 4, 8, 8, generator=g)

    def objective(x0_b, eps, sigma, sigma_p, cond, backward):
        return directional_loss_parts(lambda x, s: view.predict_x0(x, s, None), lambda x, s: view.frozen_features(
            x, s, None), view.noise_scaling, x0_b, eps, sigma_p,
            Rollout(start.expand_as(x0_b), sigmas.to(x0_b), lambda h: h - x0_b, lambda x, s: d_text),
            DirectionalConfig(identity_weight=0.1), backward=backward)

    params = [p for p in net.parameters() if p.requires_grad]
    tr = Trainer(params, [x0[0]], [None], view, TrainSettings(learning_rate=3e-3, seed=0, mse_space="x0"),
                 objective=objective)
    first = [float(tr.step().direction) for _ in range(3)]
    for _ in range(40):
        tr.step()
    last = [float(tr.step().direction) for _ in range(3)]
    assert math.fsum(last) < 0.7 * math.fsum(first), (first, last)
    state = tr.state_dict()
    assert state["step"] == 46 and len(state["losses"]) == 46
