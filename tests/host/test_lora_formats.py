"""LoRA files in and out: the kohya layout (core LoraLoader and diffusers/peft read it) and starting from any
LoRA ComfyUI's loader maps."""
import logging

import pytest
import torch

from dev.tiny_families import latent_shape, tiny_conditioning, tiny_model
from tests.host.models import assert_applied_as_trained, load_checkpoint, loaded_output, nonzero_lora, session

pytestmark = pytest.mark.host


def trained_lora(pack, mp):
    from selfperc_pack.nodes import lora

    with session(pack, mp, checkpointing=False) as ses:
        nonzero_lora(ses, up_scale=0.5)
        return lora.lora_state_dict(ses.adapters)


def patched_output(mp, sd, family):
    import comfy.model_management
    import comfy.sd
    from selfperc_pack.nodes import inputs
    from selfperc_pack.nodes.session import release

    loaded, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
    shape = latent_shape(family, None, side=4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    cond = inputs.collate([inputs.model_inputs(mp, tiny_conditioning(family), shape[1:])])
    try:
        comfy.model_management.load_models_gpu([loaded])
        with torch.no_grad():
            return loaded.model.apply_model(x, torch.tensor([0.5]), **cond)
    finally:
        release(loaded)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "qwen_image", "wan21"])
def test_kohya_file_loads_in_core_loraloader_as_the_same_lora(comfy, pack, family, caplog):
    from selfperc_pack.nodes import lora

    mp = tiny_model(family)
    sd = trained_lora(pack, mp)
    kohya = lora.kohya_state_dict(mp, sd)
    assert len(kohya) == len(sd) and all(k.startswith("lora_unet_") for k in kohya)
    with caplog.at_level(logging.WARNING):
        ours, theirs = patched_output(mp, sd, family), patched_output(mp, kohya, family)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert_applied_as_trained(ours, patched_output(mp, {}, family), theirs)
    if family in ("sd15", "sdxl"):  # kohya's SD trainers name UNet layers as diffusers does
        assert not [k for k in kohya if "input_blocks" in k or "output_blocks" in k or "middle_block" in k]
    # and back: starting from the kohya file gives exactly the trained LoRA
    back = lora.read_any_lora(mp, kohya, "x.safetensors")
    assert back.keys() == sd.keys()
    for k in sd:
        torch.testing.assert_close(back[k].reshape(sd[k].shape), sd[k].float())


def test_kohya_file_of_an_sd15_unet_loads_in_diffusers_peft_as_the_same_lora(comfy, pack, tiny_models):
    """The same UNet weights in diffusers (converted with ComfyUI's key map): the kohya LoRA loaded by diffusers'
    own converter into peft gives the output ComfyUI's LoraLoader gives."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from selfperc_pack.nodes import lora

    from dev.diffusers_fixture import diffusers_unet_from_comfy

    mp = load_checkpoint(str(tiny_models["checkpoint"]))[0]
    sd = trained_lora(pack, mp)
    kohya = lora.kohya_state_dict(mp, sd)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    unet = diffusers_unet_from_comfy()
    assert len(converted) == 2 * sum(1 for k in kohya if k.endswith(".alpha"))
    import comfy.model_management
    import comfy.sd
    from selfperc_pack.nodes.session import release

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.zeros(1, 77, 768)
    sigma = torch.tensor([1.0])
    loaded, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
    try:
        comfy.model_management.load_models_gpu([loaded])
        with torch.no_grad():
            comfy_eps = (x - loaded.model.apply_model(x, sigma, c_crossattn=ctx)) / sigma
    finally:
        release(loaded)
    ms = mp.get_model_object("model_sampling")

    def diffusers_eps():
        with torch.no_grad():
            return unet(x / (sigma ** 2 + 1).sqrt(), ms.timestep(sigma), encoder_hidden_states=ctx).sample
    plain = diffusers_eps()
    unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas)
    # two implementations of the UNet (ComfyUI's and diffusers'): their own fp32 rounding differs, hence 1e-3
    assert_applied_as_trained(diffusers_eps(), plain, comfy_eps, rtol=1e-3, atol=1e-3)


def test_init_lora_and_kohya_save_through_the_node(comfy, pack, tiny_models):
    import folder_paths
    from safetensors.torch import load_file, save_file
    from selfperc_pack.nodes import lora

    from dev.datasets import make_dataset
    from tests.host.test_nodes_inprocess import train

    model, clip, vae = load_checkpoint(str(tiny_models["checkpoint"]))
    photos = make_dataset(comfy / "input" / "formats", names=["astronaut", "coffee"]).name
    sd = trained_lora(pack, model)
    start = lora.kohya_state_dict(model, sd)
    save_file(start, f"{folder_paths.get_folder_paths('loras')[0]}/downloaded_kohya.safetensors")
    out = train(pack, model, vae, photos, lora_name="fmt/continued", steps=1, learning_rate=1e-7,
                init_lora="downloaded_kohya.safetensors", save_format="kohya").args
    saved = load_file(folder_paths.get_full_path_or_raise("loras", "fmt/continued.safetensors"))
    assert all(k.startswith("lora_unet_") for k in saved)
    for k in sd:  # one step at lr 1e-7 from the downloaded LoRA: still (almost) that LoRA, at its rank
        torch.testing.assert_close(out[1][k], sd[k], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="resume_from or init_lora"):
        train(pack, model, vae, photos, lora_name="fmt/x", steps=1, init_lora="downloaded_kohya.safetensors",
              resume_from="fmt/continued.safetensors")


@pytest.mark.parametrize("algorithm", ["LoHa", "LoKr", "OFT"])
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_every_adapter_runs_beside_the_layer_as_core_loraloader_applies_it(comfy, pack, family, algorithm, caplog):
    """LoHa / LoKr / OFT behind the switch: on, the function core's loader gives from the saved file; off, the
    base model exactly; trainable; nothing left behind."""
    import comfy.model_management
    import comfy.sd
    from selfperc_pack.nodes import inputs, lora

    mp = tiny_model(family)
    shape = latent_shape(family, None, side=4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5])
    cond = inputs.collate([inputs.model_inputs(mp, tiny_conditioning(family), shape[1:])])
    with session(pack, mp, checkpointing=True, algorithm=algorithm) as ses:
        nonzero_lora(ses, scale=0.2)
        assert all(p.requires_grad for p in ses.params)
        with torch.no_grad():
            on = ses.predict_x0(x, sigma, cond)
            with ses.switch.off():
                off = ses.predict_x0(x, sigma, cond)
        ses.predict_x0(x, sigma, cond).square().mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ses.params)
        sd = lora.lora_state_dict(ses.adapters)
    def output(patcher):
        return loaded_output(patcher, x, sigma, **cond)
    plain = output(mp)
    with caplog.at_level(logging.WARNING):
        loaded, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    ref = output(loaded)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    assert_applied_as_trained(on, off, ref)


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa"])
def test_bf16_adapter_weights_train_and_save(comfy, pack, algorithm, tiny_models):
    from dev.datasets import make_dataset
    from tests.host.test_nodes_inprocess import train

    model, clip, vae = load_checkpoint(str(tiny_models["checkpoint"]))
    with session(pack, model, checkpointing=True, algorithm=algorithm, lora_dtype=torch.bfloat16) as ses:
        assert all(p.dtype == torch.bfloat16 for p in ses.params)
        x = torch.randn(1, 4, 8, 8)
        ses.predict_x0(x, torch.tensor([1.0]), None).square().mean().backward()
        assert any(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in ses.params)
    photos = make_dataset(comfy / "input" / "bf16", names=["astronaut", "coffee"]).name
    out = train(pack, model, vae, photos, lora_name=f"bf16/{algorithm}", steps=2, lora_dtype="bf16",
                algorithm=algorithm).args
    assert all(torch.isfinite(torch.tensor(out[2]["loss"])))


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_init_lora_starts_from_a_file_another_tool_wrote(comfy, pack, tiny_models, tmp_path, layout, caplog):
    """init_lora from a LoRA that diffusers and peft wrote, not this pack: peft's LoRA on the tiny UNet's weights in
    diffusers layout, saved by diffusers' own save_lora_weights (diffusers/peft keys) or converted by diffusers' own
    convert_state_dict_to_kohya (kohya keys). Every layer of it maps (ComfyUI 0.3.75's own key map misses the
    diffusers format's attention layers; the pack adds them), and after one SGD step at lr 1e-7 the node's model
    predicts what the peft model predicts."""
    import comfy.model_management as mm
    import folder_paths
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from selfperc_pack.nodes import lora
    from selfperc_pack.nodes.session import release

    from dev.datasets import make_dataset
    from dev.diffusers_fixture import diffusers_unet_from_comfy
    from tests.host.test_nodes_inprocess import train

    model, clip, vae = load_checkpoint(str(tiny_models["checkpoint"]))
    unet = diffusers_unet_from_comfy()
    torch.manual_seed(0)
    # alpha = rank: diffusers' kohya conversion writes alpha = rank whatever peft's lora_alpha was
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1",
                                                "conv2", "time_emb_proj", "ff.net.2"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_sd = get_peft_model_state_dict(unet)
    name = f"other_tool_{layout}.safetensors"
    dest = f"{folder_paths.get_folder_paths('loras')[0]}/{name}"
    if layout == "diffusers":
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=peft_sd, safe_serialization=True)
        written = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
        assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in written), list(written)[:3]
    else:
        written = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
        assert all(k.startswith("lora_unet_") for k in written), list(written)[:3]
    save_file(written, dest)
    layers = sum(1 for k in peft_sd if ".lora_A." in k)
    with caplog.at_level(logging.WARNING):
        mapped = lora.read_any_lora(model, written, name)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage() or "match no layer" in r.getMessage()]
    assert sum(1 for k in mapped if k.endswith(".lora_up.weight")) == layers > 20

    photos = make_dataset(comfy / "input" / "other_tool", names=["astronaut", "coffee"]).name
    # SGD: a step of lr x gradient (AdamW's first step moves every weight by lr, whatever its gradient: over all
    # weights that adds up to a visible change even at lr 1e-7)
    tuned = train(pack, model, vae, photos, lora_name=f"fmt/from_{layout}", steps=1, learning_rate=1e-7,
                  optimizer="sgd", init_lora=name).args[0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([1.0])
    try:
        mm.load_models_gpu([tuned])
        with torch.no_grad():
            comfy_eps = (x - tuned.model.apply_model(x, sigma, c_crossattn=ctx)) / sigma
    finally:
        release(tuned)
    ms = model.get_model_object("model_sampling")
    with torch.no_grad():
        def eps():
            return unet(x / (sigma ** 2 + 1).sqrt(), ms.timestep(sigma), encoder_hidden_states=ctx).sample
        with_lora = eps()
        unet.disable_adapters()
        plain = eps()
    # two UNet implementations (ComfyUI's, diffusers'): fp32 rounding differs between them, hence 2e-3 (measured:
    # at most 1.1e-3 with diffusers 0.42, below 1e-3 with earlier releases)
    assert_applied_as_trained(with_lora, plain, comfy_eps, rtol=1e-3, atol=2e-3)


def test_init_lora_names_the_tensors_that_match_no_layer_and_ignores_text_encoder_keys(comfy, pack, tiny_models,
                                                                                       caplog):
    from selfperc_pack.nodes import lora

    model = load_checkpoint(str(tiny_models["checkpoint"]))[0]
    sd = lora.kohya_state_dict(model, trained_lora(pack, model))
    extra = {"lora_unet_no_such_block_proj.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_no_such_block_proj.lora_up.weight": torch.zeros(8, 4),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}
    with caplog.at_level(logging.WARNING):
        out = lora.read_any_lora(model, {**sd, **extra}, "mixed.safetensors")
    assert out.keys() == lora.read_any_lora(model, sd, "clean.safetensors").keys()
    notes = [r.getMessage() for r in caplog.records if "match no layer" in r.getMessage()]
    assert len(notes) == 1 and "init_lora mixed.safetensors: 2 of its tensors" in notes[0], notes
    assert "lora_unet_no_such_block_proj" in notes[0] and "lora_te" not in notes[0]
