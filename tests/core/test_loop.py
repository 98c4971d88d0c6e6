"""The training loop's schedule, optimizers and gradient accumulation on the toy network (no ComfyUI)."""
import math

import pytest
import torch

from selfperc_core import AdapterSwitch
from selfperc_core.loop import LR_SCHEDULES, OPTIMIZERS, Trainer, TrainSettings, lr_factor
from selfperc_core.model_view import ModelView
from selfperc_core.schedule import output_scale_fn
from tests.core.toy import EPS, ToyUNet, host_callables


def trainer(accumulation=1, batch_size=1, seed=0, **settings):
    torch.manual_seed(0)
    switch = AdapterSwitch()
    net = ToyUNet(switch)
    predict, frozen, _ = host_callables(net, switch, EPS)
    host = ModelView(lambda x, s, c: predict(x, s), lambda x, s, c: frozen(x, s), EPS.noise_scaling,
                     lambda t: 0.03 + t * 10.0, "eps", output_scale=output_scale_fn(EPS.denoise))
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(4, 8, 8, generator=g) for _ in range(6)]
    params = [p for p in net.parameters() if p.requires_grad]
    s = TrainSettings(**{"learning_rate": 1e-3, **settings}, batch_size=batch_size, seed=seed, accumulation=accumulation)
    return Trainer(params, latents, [None] * len(latents), host, s), params


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch():
    one, p_one = trainer(accumulation=1, batch_size=4)
    acc, p_acc = trainer(accumulation=4, batch_size=1)
    for _ in range(3):
        a, b = one.step(), acc.step()
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)
    for x, y in zip(p_one, p_acc):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_schedules_follow_their_formulas():
    assert [lr_factor(i, "constant", 0, 10) for i in range(10)] == [1.0] * 10
    assert [lr_factor(i, "constant", 4, 10) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [lr_factor(i, "linear", 0, 4) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    for i in range(2, 12):
        p = (i - 2) / 10
        assert lr_factor(i, "cosine", 2, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * p)))
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_factor(0, "step", 0, 1)


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_the_trainer_applies_the_schedule_to_the_optimizer(schedule):
    tr, _ = trainer(lr_schedule=schedule, warmup_steps=2, steps=6)
    seen = []
    for _ in range(6):
        tr.step()
        seen.append(tr.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3 * lr_factor(i, schedule, 2, 6) for i in range(6)])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_exactly(name):
    from selfperc_core.state import pack_state, unpack_state

    straight, p_straight = trainer(optimizer=name)
    for _ in range(4):
        straight.step()
    half, p_half = trainer(optimizer=name)
    for _ in range(2):
        half.step()
    state = unpack_state(*pack_state(half.state_dict()))  # through the resume file's encoding
    weights = [p.detach().clone() for p in p_half]
    resumed, p_res = trainer(optimizer=name)
    with torch.no_grad():
        for p, w in zip(p_res, weights):
            p.copy_(w)
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.step()
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    for x, y in zip(p_straight, p_res):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)
    assert type(straight.optimizer).__name__.lower() == name


def test_ema_follows_its_formula_and_resumes():
    from selfperc_core.state import pack_state, unpack_state

    tr, params = trainer(ema_decay=0.9)
    expected = None
    for _ in range(4):
        tr.step()
        now = [p.detach().clone() for p in params]
        expected = now if expected is None else [0.9 * e + 0.1 * w for e, w in zip(expected, now)]
    for e, got in zip(expected, tr.ema_params()):
        torch.testing.assert_close(got, e, rtol=1e-6, atol=1e-8)
    assert any(not torch.equal(e, p) for e, p in zip(tr.ema_params(), params)), "EMA must lag the raw weights"
    state = unpack_state(*pack_state(tr.state_dict()))
    again, p2 = trainer(ema_decay=0.9)
    with torch.no_grad():
        for a, b in zip(p2, params):
            a.copy_(b)
    again.load_state_dict(state)
    for a, b in zip(again.ema_params(), tr.ema_params()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ema_decay"):
        trainer(ema_decay=1.5)


def test_validation_is_repeatable_and_follows_the_weights():
    tr, params = trainer()
    g = torch.Generator().manual_seed(9)
    held = [torch.randn(4, 8, 8, generator=g) for _ in range(2)]
    first = tr.validate(held, [None, None], seed=3)
    assert tr.validate(held, [None, None], seed=3) == first  # same draws, same weights: same numbers
    assert tr.validate(held, [None, None], seed=4) != first
    with torch.no_grad():
        for p in params:  # all of them: a fresh LoRA's up matrices are zero
            p.add_(0.1)
    assert tr.validate(held, [None, None], seed=3) != first
    assert all(p.grad is None for p in params), "validation must not leave gradients"
