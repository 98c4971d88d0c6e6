"""The LoRA beside each layer equals ComfyUI's own weight-patch LoRA (LoraDiff), for every layer kind it takes."""
import copy

import pytest
import torch

from tests.host.models import assert_applied_as_trained

pytestmark = pytest.mark.host


def layers():
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    return {
        "linear": (ops.Linear(6, 5), (3, 7, 6)),
        "conv2d": (ops.Conv2d(4, 6, 3, padding=1), (2, 4, 9, 9)),
        "conv2d_strided_grouped": (ops.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9, 9)),
        "conv2d_reflect_dilated": (ops.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect"), (2, 4, 9, 9)),
        "conv1d": (ops.Conv1d(4, 6, 3), (2, 4, 11)),
        "conv3d": (ops.Conv3d(2, 3, 3, padding=1), (1, 2, 5, 5, 5)),
    }


KINDS = ["linear", "conv2d", "conv2d_strided_grouped", "conv2d_reflect_dilated", "conv1d", "conv3d"]


@pytest.mark.parametrize("kind", KINDS)
def test_lora_beside_the_layer_equals_comfyuis_patched_weight(comfy, pack, kind):
    from selfperc_pack.nodes import lora
    from selfperc_pack.selfperc_core import AdapterSwitch

    torch.manual_seed(0)
    layer, shape = layers()[kind]
    # ComfyUI's ops skip init (weights are always loaded): the bias would be whatever memory held, once 3e23.
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    model = torch.nn.Module()
    model.diffusion_model = torch.nn.ModuleDict({"layer": layer})
    switch = AdapterSwitch()
    added = lora.add_lora(model, rank=2, alpha=3.0, switch=switch, seed=0, device="cpu")
    adapter = added.adapters["diffusion_model.layer"]
    with torch.no_grad():
        adapter.lora_down.weight.normal_()  # create_train starts it at zero
    x = torch.randn(shape)
    patched = copy.deepcopy(layer)
    patched._forward_hooks.clear()
    with torch.no_grad():
        plain = patched(x)
        patched.weight.copy_(adapter(layer.weight))  # ComfyUI's math: W + alpha/rank * up @ down
        ref = patched(x)
        on = layer(x)
        with switch.off():
            off = layer(x)
    assert_applied_as_trained(on, plain, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    added.remove()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)
