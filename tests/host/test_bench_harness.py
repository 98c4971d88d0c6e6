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


def test_wide_memory_model_recovers_a_linear_law_and_reports_the_fit(pack):
    """bench.wide's fit: activation bytes = tokens x (c + blocks x s) per transformer, bytes per latent pixel for
    SDXL; parameters linear in blocks; the what-fits-where verdicts follow from the stated budget."""
    from bench.archs import ARCHS
    from bench.wide import PROBES, blocks, card_verdict, markdown, memory_model, tokens

    law = {name: (3000.0 + 100 * i, 500.0 + 10 * i) for i, name in enumerate(ARCHS)}
    base, per_block = 1e8, 2e8
    probes = []
    for name, size, cfg in PROBES:
        n, c, s = tokens(name, size), *law[name]
        act = 5e6 + n * 2000.0 if name == "sdxl" else n * (c + blocks(name, cfg) * s)
        probes.append({"model": name, "latent_size": size, "config": cfg, "tokens": n, "activation_bytes": act,
                       "weight_bytes": 4 * (base + blocks(name, cfg) * per_block)})
    m = memory_model(probes)
    assert set(m) == set(ARCHS), "every architecture with probes gets a prediction"
    for name in ARCHS:
        if name == "sdxl":
            continue
        c, s = law[name]
        assert abs(m[name]["c_bytes_per_token"] - c) < 1e-6 * c and abs(m[name]["s_bytes_per_token_block"] - s) < 1e-6 * s
        assert all(abs(f["measured_mb"] - f["fitted_mb"]) < 1e-6 for f in m[name]["fit"])
        n_blk = sum(ARCHS[name].real_blocks.values())
        if name != "flux":  # Flux's count is the published one
            assert abs(m[name]["params"] - (base + n_blk * per_block)) < 1e-3 * per_block
        assert m[name]["tokens_1024"] == 64 * 64 + (ARCHS[name].text_tokens_1024 if ARCHS[name].joint else 0)
    assert abs(m["sdxl"]["activations_gib"] - (5e6 + 2000.0 * 128 * 128) / 2**30) < 1e-9
    # a 16 GiB card keeps 0.5 + 1.6 GiB; 2 GiB of activations leave 11.9 GiB of room for the weights
    assert card_verdict(11.0, 2.0, 16) == "fits (0.9 spare)"
    assert card_verdict(12.0, 2.0, 16) == "stream: 11.5"
    assert card_verdict(5.0, 7.0, 8) == "no"
    text = markdown({"archs": {}, "probes": probes, "memory_model": m})
    assert "Predicted peak memory" in text and "8 GiB card" in text and "SD3.5 Large, bf16 weights" in text


def test_make_bench_profile_runs_on_the_tiny_unet(tmp_path):
    """`make bench-profile`'s script end to end on the tiny UNet (it once broke on a missing setting unnoticed)."""
    import json
    import subprocess
    import sys

    from dev.host import REPO_ROOT

    res = subprocess.run([sys.executable, "-m", "bench.profile", "--model", "tiny", "--size", "8", "--checkpointing",
                          "1", "--flops", str(tmp_path / "none.json")], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((REPO_ROOT / "bench" / "out" / "quick-profile.json").read_text())
    assert out["model_name"] == "tiny test UNet" and out["settings"][0]["checkpointing"] is True
    assert out["settings"][0]["components"] and out["settings"][0]["profile"]["b"]
