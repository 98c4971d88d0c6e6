"""The memory lever in-process with the real host: weights_on_device_gb keeps only part of the model's weights on
its device (ComfyUI's own partial unloading; the rest is cast onto the device layer by layer as it runs). On this
CPU both devices are the CPU, so the lever's whole code path runs (lowvram casting in forward, checkpointing's
recompute and backward) and the trained LoRA must be exactly the one trained without it."""
import pytest
import torch

from dev.datasets import make_dataset
from tests.host.test_nodes_inprocess import train

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def photos(comfy):
    return make_dataset(comfy / "input" / "mem_photos", names=["astronaut", "coffee"]).name


def test_streamed_weights_train_exactly_the_same_lora(pack, models, photos, monkeypatch):
    from selfperc_pack.nodes import session

    model, clip, vae = models
    seen = []
    stream = session.stream_weights

    def spy(mp, budget):
        left = stream(mp, budget)
        casting = [n for n, m in mp.model.diffusion_model.named_modules() if getattr(m, "comfy_cast_weights", False)]
        seen.append((budget, left, mp.model_size(), len(casting)))
        return left
    monkeypatch.setattr(session, "stream_weights", spy)

    full = train(pack, model, vae, photos, lora_name="mem/full", steps=3).args
    assert seen == []  # 0: ComfyUI decides (here: everything on the device), the lever is not used
    streamed = train(pack, model, vae, photos, lora_name="mem/streamed", steps=3,
                     weights_on_device_gb=0.004).args
    ((budget, left, size, casting),) = seen
    assert left <= budget < size and casting > 10  # most layers really are cast in from the offload device
    assert streamed[2]["loss"] == full[2]["loss"]  # every step's loss, bit for bit
    assert streamed[1].keys() == full[1].keys()
    for k in full[1]:
        assert torch.equal(streamed[1][k], full[1][k]), k
    # the shared model comes back as it was: no layer left casting, nothing left offloaded
    dm = model.model.diffusion_model
    assert not [n for n, m in dm.named_modules() if getattr(m, "comfy_cast_weights", False)
                and not getattr(m, "prev_comfy_cast_weights", True)]
    assert not getattr(model.model, "model_lowvram", False)


def test_a_weight_budget_out_of_range_is_refused_before_work(pack, models, photos):
    model, clip, vae = models
    with pytest.raises(ValueError, match="weights_on_device_gb nan must be within"):
        train(pack, model, vae, photos, lora_name="mem/bad", steps=1, weights_on_device_gb=float("nan"))
