"""DiffusionCLIP's directional fine-tune (the fine-tune node with a Self-Perceptual Direction in its Objective),
in-process with the real host on the tiny SD1.x checkpoint: it trains along the direction, core LoraLoader loads
its LoRA as trained, it resumes exactly, and bad directions are refused before any work."""
import json
import logging

import pytest
import torch

from dev.datasets import make_dataset
from tests.host.models import fine_tune_inputs
from tests.host.test_realimage_eval import node

pytestmark = pytest.mark.host
BASE = dict(steps=20, learning_rate=1e-2, rank=4, alpha=4.0, batch_size=1, resolution=64, seed=0,
            perceptual_weight=0.1)


@pytest.fixture(scope="module")
def one_photo(comfy):
    return make_dataset(comfy / "input" / "dclip_one", names=["chelsea"], captions=False).name


def text(clip, t):
    return clip.encode_from_tokens_scheduled(clip.tokenize(t))


def direction(clip, space="denoiser", source="a photo of a cat", target="a photo of a dog", **kw):
    from selfperc_pack.nodes.diffusion_clip import Direction

    return Direction(text(clip, source), text(clip, target), space, **{"t0": 0.4, "rollout_steps": 3, "inversion_steps": 8,
                                                                      **kw})


def fine_tune(model, vae, folder, d, **kw):
    args = dict(BASE, lora_name=kw.pop("lora_name", "dclip/run"))
    args.update(kw)
    return node("SelfPerceptualFineTune").execute(model=model, vae=vae, dataset_folder=folder,
                                                  **fine_tune_inputs(direction=d, **args))


def tiny_clip_vision(tmp_path, projection_dim: int, seed: int = 0):
    """A CLIP_VISION of ComfyUI's own class (ClipVisionModel) at a tiny size, random weights."""
    import comfy.clip_vision

    config = dict(attention_dropout=0.0, dropout=0.0, hidden_act="quick_gelu", hidden_size=32, image_size=32,
                  initializer_factor=1.0, initializer_range=0.02, intermediate_size=64, layer_norm_eps=1e-5,
                  model_type="clip_vision_model", num_attention_heads=2, num_channels=3, num_hidden_layers=2,
                  patch_size=8, projection_dim=projection_dim)
    path = tmp_path / f"tiny_clip_vision_{projection_dim}.json"
    path.write_text(json.dumps(config))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.ones_like(v) if ("layer_norm" in k or "layrnorm" in k) and k.endswith("weight") else
              torch.randn(v.shape, generator=g) * 0.05) for k, v in cv.get_sd().items()}
    missing, unexpected = cv.load_sd(sd)
    assert not unexpected
    return cv


def sample(model, seed=3):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    cond = [[torch.zeros(1, 77, 768), {}]]
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 3, 1.0, "euler", "normal", cond, cond,
                               latent, disable_pbar=True, seed=seed)


def test_the_directional_fine_tune_moves_along_the_text_and_core_loraloader_loads_its_lora(models, one_photo,
                                                                                        caplog):
    import folder_paths
    from safetensors import safe_open

    from nodes import LoraLoaderModelOnly

    model, clip, vae = models
    before = sample(model)
    out = fine_tune(model, vae, one_photo, direction(clip), lora_name="dclip/denoiser")
    tuned, lora_sd, losses, name = out.args[:4]
    losses = losses["loss"]
    assert len(losses) == 20 and all(v == v for v in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print("directional fine-tune: mean loss of the first and last 4 of 20 steps", first, last)
    assert last < 0.8 * first, (first, last)  # one image, repeated: the directional loss falls
    with safe_open(folder_paths.get_full_path_or_raise("loras", name), "pt") as f:
        meta = f.metadata()
    assert meta["selfperc_objective"].startswith("directional (DiffusionCLIP") and meta["direction_space"] == "denoiser"
    assert float(meta["t0"]) == 0.4 and meta["rollout_steps"] == "3"

    with caplog.at_level(logging.WARNING):
        loaded = LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(loaded.patches) == sum(1 for k in lora_sd if k.endswith(".lora_up.weight")) > 20
    assert torch.equal(sample(model), before), "the base MODEL samples differently after training"
    on = sample(tuned)
    assert (on - before).abs().mean() > 1e-3, "the trained LoRA changes nothing"
    torch.testing.assert_close(sample(loaded), on, rtol=1e-5, atol=1e-5)


def test_the_directional_fine_tune_resumes_exactly(models, one_photo):
    model, clip, vae = models
    d = direction(clip)
    straight = fine_tune(model, vae, one_photo, d, steps=4, lora_name="dclip/straight").args
    fine_tune(model, vae, one_photo, d, steps=2, lora_name="dclip/half")
    resumed = fine_tune(model, vae, one_photo, d, steps=2, lora_name="dclip/half", overwrite=True,
                        resume_from="dclip/half.safetensors").args
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-5)
    for k in straight[1]:
        torch.testing.assert_close(resumed[1][k], straight[1][k], rtol=1e-5, atol=1e-7)


def test_the_clip_space_trains_the_lora_through_the_decoded_image_alone(models, pack, tmp_path):
    """On a tiny SDXL (a family whose pooled output is a CLIP embedding) with a CLIP_VISION of its pooled width: with
    no identity or MSE term the only path from the loss to the LoRA is VAE decode -> CLIP vision; the LoRA gets a
    gradient there, and the VAE and CLIP weights none."""
    import contextlib

    from selfperc_pack.nodes.diffusion_clip import Direction, check, prepared
    from selfperc_pack.selfperc_core.directional import DirectionalConfig
    from selfperc_pack.selfperc_core.loop import Trainer, TrainSettings

    from dev.tiny_families import latent_shape, tiny_conditioning, tiny_model
    from tests.host.models import session

    _, _, vae = models
    mp, src, tgt = tiny_model("sdxl"), tiny_conditioning("sdxl", seed=0), tiny_conditioning("sdxl", seed=7)
    cv = tiny_clip_vision(tmp_path, src[0][1]["pooled_output"].shape[-1])
    d = Direction(src, tgt, "clip", t0=0.5, rollout_steps=2, clip_vision=cv, inversion_steps=4)
    check(d, mp)
    shape = latent_shape("sdxl", None, side=4)[1:]
    latents = [torch.randn(shape, generator=torch.Generator().manual_seed(1))]
    config = DirectionalConfig(identity_weight=0.0)
    with torch.inference_mode(False), session(pack, mp, checkpointing=True, latent_shape=shape) as ses, \
            prepared(d, ses, latents, vae, config, 0, True, contextlib.nullcontext) as (objective, view, items):
        assert items[0].ref is not None and items[0].ref.shape == (src[0][1]["pooled_output"].shape[-1],)
        tr = Trainer(ses.params, latents, items, view, TrainSettings(learning_rate=1e-2, seed=0), objective=objective)
        tr.optimizer.zero_grad()
        b = view.collate(items)
        x0 = latents[0][None]
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        parts = objective(x0, eps, torch.tensor([1.0]), torch.tensor([1.0]), b, lambda loss: loss.backward())
        assert parts.backward_done and 0 < float(parts.direction) < 2 and float(parts.perceptual) == 0
        grads = [p.grad for p in ses.params if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), "no gradient through the VAE and CLIP"
        assert all(p.grad is None for p in vae.first_stage_model.parameters())
        assert all(p.grad is None for p in cv.model.parameters())
        losses = [tr.step().loss.item() for _ in range(2)]
        assert all(v == v for v in losses)


def test_the_image_embedding_is_comfyuis_and_differentiable(models, tmp_path):
    """The embedder's preprocessing is ComfyUI's clip_preprocess but for its 8-bit rounding (no gradient), so its
    embedding is core's encode_image of the decoded image up to that rounding, and it has a gradient."""
    from selfperc_pack.nodes.diffusion_clip import ImageEmbedder
    from selfperc_pack.nodes.session import make_trainable_tensors

    model, clip, vae = models
    cv = tiny_clip_vision(tmp_path, 768, seed=1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = cv.encode_image(vae.decode(model.model.process_latent_out(x)))["image_embeds"]
    with torch.inference_mode(False):
        for m in (vae.first_stage_model, cv.model):
            make_trainable_tensors(m)
        x = x.clone().requires_grad_(True)
        emb = ImageEmbedder(model, vae, cv)(x)
        emb.square().sum().backward()
    torch.testing.assert_close(emb.detach(), ref, rtol=0.05, atol=0.02 * float(ref.abs().mean()))
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_directions_are_refused_before_work_naming_them(models, one_photo, tmp_path, comfy):
    from selfperc_pack.nodes.diffusion_clip import Direction

    model, clip, vae = models
    cat, dog = text(clip, "a photo of a cat"), text(clip, "a photo of a dog")
    cases = [
        (direction(clip, t0=0.95), r"t0 0.95 is outside the schedule: it must be in \(0, 0.9\]"),
        (direction(clip, rollout_steps=0), "rollout_steps 0"),
        (Direction(cat, [[cat[0][0].clone(), dict(cat[0][1])]]), "identical: there is no direction"),
        (Direction(cat, cat + dog), "the target conditioning has 2 entries"),
        (Direction(cat, dog, "clip"), "'clip' needs a CLIP_VISION"),
        (Direction(cat, dog, "clip", clip_vision=tiny_clip_vision(tmp_path, 768)),
         "'clip' is not available for SD15: SD1.x checkpoints carry no text projection"),
        (direction(clip, inversion_steps=201), "inversion_steps 201"),
        (Direction(cat, dog, "sideways"), "unknown direction space 'sideways'"),
    ]
    for d, message in cases:
        with pytest.raises(ValueError, match=message):
            fine_tune(model, vae, one_photo, d, lora_name="dclip/refused")
    with pytest.raises(ValueError, match="needs an identity term"):
        fine_tune(model, vae, one_photo, direction(clip), perceptual_weight=0.0, lora_name="dclip/refused")
    assert not list((comfy / "models" / "loras" / "dclip").glob("refused*"))


def test_a_run_resumes_only_in_the_mode_and_direction_it_was_started_in(models, one_photo):
    model, clip, vae = models
    fine_tune(model, vae, one_photo, direction(clip), steps=1, lora_name="dclip/mode")
    resume = dict(steps=1, lora_name="dclip/mode", overwrite=True, resume_from="dclip/mode.safetensors")
    with pytest.raises(ValueError, match="dclip/mode.safetensors was trained with a direction"):
        fine_tune(model, vae, one_photo, None, **resume)
    with pytest.raises(ValueError, match=r"trained with another direction \(t0 0.4 -> 0.3\)"):
        fine_tune(model, vae, one_photo, direction(clip, t0=0.3), **resume)


TRANSFORMERS = ("sdxl", "sd3", "flux", "qwen_image", "wan21")


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_the_denoiser_direction_trains_on_other_families_and_clip_is_refused_where_the_space_differs(pack, comfy,
                                                                                                    family, tmp_path):
    """The 'denoiser' space needs nothing but the model: on tiny SDXL and transformer families the directional loss
    falls on a fixed image; the 'clip' space passes SDXL with a CLIP_VISION of its pooled width and refuses the
    others by name (their pooled output is not a CLIP text embedding)."""
    import contextlib

    from selfperc_pack.nodes.diffusion_clip import Direction, check, prepared
    from selfperc_pack.selfperc_core.directional import DirectionalConfig
    from selfperc_pack.selfperc_core.loop import Trainer, TrainSettings

    from dev.tiny_families import latent_shape, tiny_conditioning, tiny_model
    from tests.host.models import session

    mp, src, tgt = tiny_model(family), tiny_conditioning(family, seed=0), tiny_conditioning(family, seed=7)
    shape = latent_shape(family, None, side=4)[1:]
    d = Direction(src, tgt, t0=0.5, rollout_steps=2, inversion_steps=4)
    check(d, mp)
    latents = [torch.randn(shape, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode(False), session(pack, mp, checkpointing=True, latent_shape=shape) as ses, \
            prepared(d, ses, latents, None, DirectionalConfig(identity_weight=0.1), 0, True,
                     contextlib.nullcontext) as (objective, view, items):
        tr = Trainer(ses.params, latents, items, view, TrainSettings(learning_rate=1e-2, seed=0), objective=objective)
        losses = [float(tr.step().direction) for _ in range(8)]
    assert all(v == v for v in losses) and min(losses[-3:]) < 0.95 * losses[0], losses  # the directional term

    pooled = src[0][1].get("pooled_output")
    width = pooled.shape[-1] if pooled is not None else 64
    clip_direction = Direction(src, tgt, "clip", clip_vision=tiny_clip_vision(tmp_path, width))
    if family == "sdxl":
        check(clip_direction, mp)
        other = Direction(src, tgt, "clip", clip_vision=tiny_clip_vision(tmp_path, width + 8))
        with pytest.raises(ValueError, match=f"CLIP_VISION's space does not match the text encoder's: its image_embeds "
                                             f"are {width + 8} wide, the source conditioning's pooled output {width}; "
                                             "SDXL needs OpenCLIP ViT-bigG/14"):
            check(other, mp)
    else:
        with pytest.raises(ValueError, match=f"'clip' is not available for {type(mp.model.model_config).__name__}: "
                                             "its pooled text output is not a CLIP embedding"):
            check(clip_direction, mp)
