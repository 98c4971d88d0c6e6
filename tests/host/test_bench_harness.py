"""The benchmark measures what its tables say (bench/): the naive reference is the plain frozen base model, the
FLOP count sees the early exit, and the profile's memory replay sees an allocation."""
from types import SimpleNamespace

import pytest
import torch

from tests.host.models import load_checkpoint, nonzero_lora, session

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def base(comfy, tiny_models):
    return load_checkpoint(str(tiny_models["checkpoint"]))[0]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["ckpt_off", "ckpt_on"])
def test_naive_reference_is_the_frozen_base_model(pack, base, checkpointing):
    """(c)'s copy must not carry the session's LoRA or tap hooks, nor checkpointed closures calling the online
    layers: its features equal the frozen features bit for bit, and its backward reaches no LoRA parameter."""
    from bench.naive import naive_frozen_features

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.5, 3.0])
    with session(pack, base, checkpointing=checkpointing) as ses:
        nonzero_lora(ses)
        frozen = ses.frozen_features(x, sigma, None)
        online = ses.tap(ses.predict_x0, x, sigma, None)
        assert not torch.allclose(online, frozen)  # the LoRA shows in the features: a copy carrying it would fail

        naive, _copy = naive_frozen_features(ses.mp, checkpointing=checkpointing)
        xr = x.clone().requires_grad_(True)
        got = naive(xr, sigma, None)  # called with the switch on, as the Trainer calls it
        assert torch.equal(got, frozen)
        for p in ses.params:
            p.grad = None
        got.square().mean().backward()
        assert all(p.grad is None for p in ses.params)
        assert xr.grad is not None and xr.grad.abs().sum() > 0
        assert torch.equal(ses.frozen_features(x, sigma, None), frozen)  # the session is untouched by the copy


def test_flop_count_sees_the_early_exit(pack, base):
    from bench.worker import count_flops, latents_for

    f = count_flops(base, latents_for(8, 2), SimpleNamespace(batch=1, rank=4))
    assert 0 < f["forward_to_tap"] < f["forward_full"] < f["mse_step"]


def test_profile_memory_replay_sees_an_allocation(pack):
    from bench.profile import extra_peak_mb

    def two_40mb_tensors():
        a = torch.ones(10_000_000)
        b = a * 2
        del a, b

    assert 75 < extra_peak_mb(two_40mb_tensors) < 90
