"""The objective's maths and mechanics on a toy network (pure torch, no ComfyUI)."""
import copy
import subprocess
import sys

import pytest
import torch

from selfperc_core import (
    AdapterSwitch,
    FeatureTap,
    LossConfig,
    checkpoint_forward,
    self_perceptual_loss,
    split_prediction,
)
from selfperc_core.adapter import uncheckpoint_forward
from selfperc_core.objective import feature_distance
from tests.core.toy import FLOW, PARAMS, ToyUNet, host_callables, make_batch

ALL = list(PARAMS)


def adapter_params(net):
    return [p for n, p in net.named_parameters() if n.endswith(("down", "up")) and p.requires_grad]


def trained_net(seed=0):
    """A toy net whose LoRA is non-zero, so adapter on/off differ."""
    torch.manual_seed(seed)
    switch = AdapterSwitch()
    net = ToyUNet(switch)
    with torch.no_grad():
        for p in adapter_params(net):
            p.normal_(0, 0.2)
    return net, switch


@pytest.mark.parametrize("name", ALL)
def test_exact_prediction_recovers_x0_and_eps_and_gives_zero_loss(name):
    param = PARAMS[name]
    x0, eps, sigma, sigma_p = make_batch(param=param)
    x_t = param.noise_scaling(sigma, eps, x0)
    x0_hat = param.denoise(x_t, sigma, param.true_output(x0, eps, sigma))
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split_prediction(x_t, sigma, x0_hat, param.noise_scaling), eps, rtol=1e-4, atol=1e-4)

    net, switch = trained_net()
    _, frozen_features, _ = host_callables(net, switch, param)

    def oracle(x_t_, s):  # a perfect online model
        return param.denoise(x_t_, s, param.true_output(x0, eps, s))

    for seed in range(3):  # any t'
        sp = make_batch(param=param, seed=10 + seed)[3]
        parts = self_perceptual_loss(oracle, frozen_features, param.noise_scaling, x0, eps, sigma, sp)
        assert parts.loss.item() < 1e-8


@pytest.mark.parametrize("name", ALL)
def test_renoising_uses_eps_hat_not_eps(name):
    """At t' = t, re-noising (x0_hat, eps_hat) reproduces x_t exactly, so the loss is 0 for ANY prediction.

    An implementation that re-noises x0_hat with the real eps gets x0 + delta instead: a non-zero loss.
    """
    param = PARAMS[name]
    x0, eps, sigma, _ = make_batch(param=param)

    def wrong_model(x_t, s):
        return x0 + 0.5 * torch.randn_like(x0)

    identity = lambda x, s: x  # noqa: E731  (features = the input itself)
    parts = self_perceptual_loss(wrong_model, identity, param.noise_scaling, x0, eps, sigma, sigma)
    assert parts.loss.item() < 1e-8 * (1 + sigma.max().item() ** 2)
    assert parts.mse.item() > 0.1

    # closed form for t' != t with identity features: x_hat_t' - x_t' = (a' - b' a / b) * delta
    sp = make_batch(param=param, seed=5)[3]
    delta = torch.full_like(x0, 0.3)
    parts = self_perceptual_loss(lambda x, s: x0 + delta, identity, param.noise_scaling, x0, eps, sigma, sp)
    ones = torch.ones(len(sigma), 1, 1, 1)
    a, b = param.noise_scaling(sigma, 0 * ones, ones), param.noise_scaling(sigma, ones, 0 * ones)
    ap, bp = param.noise_scaling(sp, 0 * ones, ones), param.noise_scaling(sp, ones, 0 * ones)
    expected = ((ap - bp * a / b) * delta).square().flatten(1).mean(1).mean()
    torch.testing.assert_close(parts.loss, expected, rtol=1e-4, atol=1e-6)
    wrong = (ap * delta).square().flatten(1).mean(1).mean()  # what noising with eps would give
    assert not torch.isclose(parts.loss, wrong, rtol=1e-2)


def test_early_exit_features_equal_full_forward_and_skip_the_up_blocks():
    net, switch = trained_net()
    x = torch.randn(2, 4, 8, 8)
    s = torch.tensor([0.5, 3.0])
    early = FeatureTap(net.mid[-1], early_exit=True)
    full = FeatureTap(net.mid[-1], early_exit=False)
    calls = net.up_calls
    f_early = early(net, x, s)
    assert net.up_calls == calls, "early exit ran the up-blocks"
    f_full = full(net, x, s)
    assert net.up_calls == calls + 1
    torch.testing.assert_close(f_early, f_full, rtol=0, atol=0)


def _loss_and_grads(net, switch, param, batch, **kw):
    predict_x0, frozen_features, tap = host_callables(net, switch, param, early_exit=kw.pop("early_exit", True))
    for p in net.parameters():
        p.grad = None
    parts = self_perceptual_loss(predict_x0, frozen_features, param.noise_scaling, *batch, LossConfig(**kw))
    parts.loss.backward()
    tap.remove()
    return parts.loss.detach(), [p.grad.clone() for p in adapter_params(net)]


@pytest.mark.parametrize("name", ALL)
def test_batched_frozen_pass_equals_two_passes(name):
    param = PARAMS[name]
    net, switch = trained_net()
    batch = make_batch(param=param)
    l1, g1 = _loss_and_grads(net, switch, param, batch, batched_frozen=False, mse_weight=0.5)
    l2, g2 = _loss_and_grads(net, switch, param, batch, batched_frozen=True, mse_weight=0.5)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_early_exit_does_not_change_loss_or_gradients(name):
    param = PARAMS[name]
    net, switch = trained_net()
    batch = make_batch(param=param)
    l1, g1 = _loss_and_grads(net, switch, param, batch, early_exit=True)
    l2, g2 = _loss_and_grads(net, switch, param, batch, early_exit=False)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ALL)
def test_gradient_checkpointing_gives_same_loss_and_gradients(name):
    """Checkpointed blocks are recomputed in backward with the adapter state of their original forward."""
    param = PARAMS[name]
    net, switch = trained_net()
    batch = make_batch(param=param)
    l1, g1 = _loss_and_grads(net, switch, param, batch)
    blocks = [net.inp, net.down, *net.mid, net.up, net.out]
    for m in blocks:
        checkpoint_forward(m, switch)
    try:
        l2, g2 = _loss_and_grads(net, switch, param, batch)
    finally:
        for m in blocks:
            uncheckpoint_forward(m)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_checkpointing_without_state_replay_is_wrong():
    """Why the replay exists: plain checkpointing recomputes frozen passes with the adapter on."""
    param = PARAMS["eps"]
    net, switch = trained_net()
    batch = make_batch(param=param)
    _, g_ref = _loss_and_grads(net, switch, param, batch)
    blocks = [net.inp, net.down, *net.mid]
    for m in blocks:
        checkpoint_forward(m, None)  # no switch: recompute sees whatever state the switch has then
    try:
        try:
            _, g_bad = _loss_and_grads(net, switch, param, batch)
        except torch.utils.checkpoint.CheckpointError:
            return  # torch noticed the mismatch
    finally:
        for m in blocks:
            uncheckpoint_forward(m)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_ref, g_bad))


@pytest.mark.parametrize("name", ALL)
def test_only_adapter_gets_gradients_and_base_stays_bit_identical(name):
    param = PARAMS[name]
    net, switch = trained_net()
    base = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith(("down", "up"))}
    opt = torch.optim.AdamW(adapter_params(net), lr=1e-2)
    predict_x0, frozen_features, _ = host_callables(net, switch, param)
    for i in range(4):
        opt.zero_grad()
        parts = self_perceptual_loss(predict_x0, frozen_features, param.noise_scaling, *make_batch(param=param, seed=i),
                                     LossConfig(mse_weight=0.1))
        parts.loss.backward()
        for n, p in net.named_parameters():
            if n.endswith(("down", "up")):
                assert p.grad is not None, n
            else:
                assert p.grad is None, f"base parameter {n} received a gradient"
        opt.step()
    for k, v in net.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("name", ALL)
def test_short_training_lowers_the_loss_on_a_fixed_batch(name):
    param = PARAMS[name]
    torch.manual_seed(0)
    switch = AdapterSwitch()
    net = ToyUNet(switch)
    frozen_snapshot = copy.deepcopy(net)
    predict_x0, frozen_features, _ = host_callables(net, switch, param)
    batch = make_batch(B=4, param=param, seed=3)
    opt = torch.optim.Adam(adapter_params(net), lr=2e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        parts = self_perceptual_loss(predict_x0, frozen_features, param.noise_scaling, *batch)
        parts.loss.backward()
        opt.step()
        losses.append(parts.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # the frozen network (adapter off) is still the original network
    x, s = batch[0], batch[2]
    with switch.off():
        torch.testing.assert_close(net(x, s), frozen_snapshot(x, s), rtol=0, atol=0)


@pytest.mark.parametrize("name,sigma_value", [("eps", 14.6146), ("v", 4096.0), ("flow", 0.999), ("flow", 1.0)])
def test_extreme_noise_levels_stay_finite(name, sigma_value):
    param = PARAMS[name]
    net, switch = trained_net()
    predict_x0, frozen_features, _ = host_callables(net, switch, param)
    x0, eps, _, sp = make_batch(param=param)
    sigma = torch.full((x0.shape[0],), sigma_value)
    parts = self_perceptual_loss(predict_x0, frozen_features, param.noise_scaling, x0, eps, sigma, sp,
                                 LossConfig(mse_weight=1))
    parts.loss.backward()
    assert torch.isfinite(parts.loss)
    assert all(torch.isfinite(p.grad).all() for p in adapter_params(net))


def test_distance_options():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4) * 2
    torch.testing.assert_close(feature_distance(a, b, "mse"), torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(feature_distance(a, b, "mae"), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(feature_distance(a, b, "mse", normalize=True), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="unknown distance"):
        feature_distance(a, b, "l3")


def test_flow_model_at_sigma_one_has_finite_eps_hat():
    x0, eps, _, _ = make_batch(param=FLOW)
    s = torch.ones(x0.shape[0])
    x_t = FLOW.noise_scaling(s, eps, x0)
    assert torch.isfinite(split_prediction(x_t, s, x0 * 0.5, FLOW.noise_scaling)).all()


def test_core_never_imports_comfyui_or_a_host_library():
    """Every module of the core (found on disk, so a new one is covered) imports without ComfyUI, and without the
    headless host's libraries (diffusers, accelerate, peft) or the metrics library (imported when used)."""
    code = ("import sys, pkgutil, importlib, selfperc_core;"
            "mods=[m.name for m in pkgutil.iter_modules(selfperc_core.__path__)];"
            "[importlib.import_module('selfperc_core.' + m) for m in mods];"
            "assert {'loop', 'dataset', 'model_view', 'state', 'objective', 'evaluation', 'realimage'} <= set(mods), mods;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('comfy','comfy_api','folder_paths','nodes',"
            "'diffusers','accelerate','peft','transformers','torchmetrics')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_conditionings_of_different_lengths_batch_like_comfyui():
    """Repeating a token sequence leaves attention's output unchanged, so captions of 77 and 154 tokens batch."""
    from selfperc_core.model_view import stack_token_conds as batch_conds

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 77, 8, generator=g), torch.randn(1, 154, 8, generator=g)
    out = batch_conds([a, b])
    assert out.shape == (2, 154, 8)
    q = torch.randn(1, 5, 8, generator=g)
    att = torch.nn.functional.scaled_dot_product_attention
    torch.testing.assert_close(att(q, out[:1], out[:1]), att(q, a, a))
    assert torch.equal(out[1:], b)


def test_perceptual_weight_scales_the_loss_and_zero_is_plain_mse_without_frozen_passes():
    param = PARAMS["eps"]
    net, switch = trained_net()
    predict_x0, frozen_features, _ = host_callables(net, switch, param)
    batch = make_batch(param=param)
    one = self_perceptual_loss(predict_x0, frozen_features, param.noise_scaling, *batch)
    two = self_perceptual_loss(predict_x0, frozen_features, param.noise_scaling, *batch, LossConfig(perceptual_weight=2.0))
    torch.testing.assert_close(two.loss, 2 * one.loss)

    def no_frozen(*a):
        raise AssertionError("the MSE baseline must not run the frozen network")
    mse = self_perceptual_loss(predict_x0, no_frozen, param.noise_scaling, *batch,
                               LossConfig(perceptual_weight=0.0, mse_weight=1.0))
    x0, eps, sigma, _ = batch
    expected = (predict_x0(param.noise_scaling(sigma, eps, x0), sigma) - x0).square().mean()
    torch.testing.assert_close(mse.loss, expected)
    assert float(mse.perceptual) == 0.0
    with pytest.raises(ValueError, match="nothing to train"):
        self_perceptual_loss(predict_x0, frozen_features, param.noise_scaling, *batch, LossConfig(perceptual_weight=0.0))


def textbook_target(name, x0, eps, sigma):
    """The raw output each parameterization is trained to give, written from the papers rather than from the
    denoise formulas: eps (Ho et al.); v = alpha_t eps - sigma_t x0 with alpha_t = 1/sqrt(1+sigma^2),
    sigma_t = sigma/sqrt(1+sigma^2) (Salimans & Ho, in k-diffusion's sigma); velocity eps - x0 (rectified flow)."""
    s = sigma.reshape(-1, 1, 1, 1)
    if name == "eps":
        return eps
    if name == "v":
        return eps / (1 + s ** 2).sqrt() - s / (1 + s ** 2).sqrt() * x0
    return eps - x0


@pytest.mark.parametrize("name", ALL)
def test_native_mse_is_the_raw_output_mse_and_x0_space_reweights_it_by_c_out_squared(name):
    from selfperc_core.objective import prediction_mse
    from selfperc_core.schedule import output_scale_fn

    param = PARAMS[name]
    net, switch = trained_net()
    x0, eps, sigma, sp = make_batch(param=param)
    x_t = param.noise_scaling(sigma, eps, x0)
    raw = net(param.scale_in(x_t, sigma), sigma).detach()

    def predict_x0(x, s):  # the host's view: only x0_hat, never the raw output
        return param.denoise(x, s, net(param.scale_in(x, s), s))
    c_out = output_scale_fn(param.denoise)(sigma)
    baseline = LossConfig(perceptual_weight=0.0, mse_weight=1.0)
    native = self_perceptual_loss(predict_x0, None, param.noise_scaling, x0, eps, sigma, sp, baseline, c_out)
    textbook = (raw - textbook_target(name, x0, eps, sigma)).square().mean()
    assert textbook > 0.1  # an untrained net: far from its target
    torch.testing.assert_close(native.loss, textbook, rtol=1e-4, atol=0)
    torch.testing.assert_close(native.mse, textbook, rtol=1e-4, atol=0)
    x0_space = self_perceptual_loss(predict_x0, None, param.noise_scaling, x0, eps, sigma, sp, baseline)
    per_sample = [prediction_mse(predict_x0(x_t, sigma)[i:i + 1], x0[i:i + 1], c_out[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(x0_space.loss, sum(c ** 2 * m for c, m in zip(c_out, per_sample)) / 3, rtol=1e-4, atol=0)
    assert not torch.allclose(x0_space.loss, native.loss, rtol=1e-2)  # the two spaces weight the levels differently


def test_trainer_refuses_an_unknown_mse_space_and_native_without_the_hosts_output_scale():
    from selfperc_core.loop import Trainer, TrainSettings
    from selfperc_core.model_view import ModelView

    param = PARAMS["eps"]
    net, switch = trained_net()
    predict_x0, frozen_features, _ = host_callables(net, switch, param)
    host = ModelView(lambda x, s, c: predict_x0(x, s), lambda x, s, c: frozen_features(x, s), param.noise_scaling,
                     lambda t: 0.03 + t, "eps")
    params = [p for p in net.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="needs the model's output_scale"):
        Trainer(params, [torch.zeros(4, 8, 8)], [None], host, TrainSettings())
    with pytest.raises(ValueError, match="unknown mse_space 'eps'"):
        Trainer(params, [torch.zeros(4, 8, 8)], [None], host, TrainSettings(mse_space="eps"))
    Trainer(params, [torch.zeros(4, 8, 8)], [None], host, TrainSettings(mse_space="x0")).step()
