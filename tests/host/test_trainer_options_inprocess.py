"""The trainer options in-process with the real host: the caption prefix and caption dropout reach the real CLIP
text encoder, and bad values are refused before work, naming them."""
import pytest
import torch

from dev.datasets import make_dataset
from tests.host.models import as_parameterization, watch_trainers
from tests.host.test_nodes_inprocess import train

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def captioned(comfy):
    return make_dataset(comfy / "input" / "options_photos", names=["astronaut", "coffee"]).name


@pytest.fixture(scope="module")
def uncaptioned(comfy):
    return make_dataset(comfy / "input" / "options_plain", names=["chelsea"], captions=False).name


def test_the_caption_prefix_and_the_empty_caption_reach_the_text_encoder(pack, models, captioned, uncaptioned,
                                                                       monkeypatch):

    model, clip, vae = models
    seen = []
    tokenize = clip.tokenize
    monkeypatch.setattr(clip, "tokenize", lambda text, *a, **k: seen.append(text) or tokenize(text, *a, **k))

    trainers = watch_trainers(monkeypatch)
    out = train(pack, model, vae, captioned, clip=clip, lora_name="opt/prefix", steps=2, caption_prefix="sks, ",
                caption_dropout=0.5)
    assert len(out.args[2]["loss"]) == 2
    (tr,) = trainers
    assert tr.s.caption_dropout == 0.5 and len(tr.empty_conds) == len(tr.conds) == 2
    import comfy.conds
    own, empty = tr.conds[0]["c_crossattn"].cond, tr.empty_conds[0]["c_crossattn"].cond
    expected = clip.encode_from_tokens_scheduled(tokenize(""))[0][0]
    assert torch.equal(empty, expected) and not torch.equal(own, empty)  # the dropped samples' input: the empty text
    assert isinstance(tr.empty_conds[0]["c_crossattn"], comfy.conds.CONDCrossAttn)
    captions = [t for t in seen if t]
    assert len(captions) == 2 and all(t.startswith("sks, ") and len(t) > len("sks, ") for t in captions), seen
    seen.clear()
    train(pack, model, vae, uncaptioned, clip=clip, lora_name="opt/prefix_alone", steps=1, caption_prefix="sks, ")
    assert seen == ["sks"]  # an image without a caption: the prefix alone


def test_bad_trainer_options_are_refused_before_work_naming_them(pack, models, captioned, comfy):
    model, clip, vae = models
    cases = [(dict(caption_dropout=0.2), None, "caption_dropout needs the CLIP input"),
             (dict(caption_prefix="sks, "), None, "caption_prefix needs the CLIP input"),
             (dict(optimizer="sgd", weight_decay=0.01), clip, "weight_decay is decoupled weight decay"),
             (dict(min_snr_gamma=5.0, mse_space="x0", mse_weight=1.0), clip, "set mse_space 'native'"),
             (dict(min_snr_gamma=5.0), clip, "mse_weight 0 leaves out"),
             (dict(t_law="logit_normal", t_law_std=0.0), clip, "t_law_std 0.0"),
             (dict(max_grad_norm=-1.0), clip, "max_grad_norm -1.0"),
             (dict(shuffle_tags=2), None, "shuffle_tags needs the CLIP input"),
             (dict(shuffle_tags=17), clip, "shuffle_tags 17 must be within"),
             (dict(regularization_weight=0.0), clip, "regularization_weight 0.0"),
             (dict(regularization_folder="no_such_folder"), clip, "no_such_folder")]
    for over, c, message in cases:
        with pytest.raises(ValueError, match=message):
            train(pack, model, vae, captioned, clip=c, lora_name="opt/refused", **over)
    with pytest.raises(ValueError, match="min_snr_gamma is for eps and v models; this model is 'flow'"):
        train(pack, as_parameterization(model, "flow"), vae, captioned, clip=clip, lora_name="opt/refused",
              min_snr_gamma=5.0, mse_weight=1.0, steps=1)
    assert not list((comfy / "models" / "loras" / "opt").glob("refused*"))


def test_repeat_folders_reach_the_loop_and_the_lora_says_how_many_samples(pack, models, comfy):
    import folder_paths
    from safetensors import safe_open

    root = comfy / "input" / "options_repeats"
    make_dataset(root / "4_cats", names=["chelsea"], captions=False)
    make_dataset(root / "plain", names=["coffee"], captions=False)
    model, clip, vae = models
    out = train(pack, model, vae, root.name, lora_name="opt/repeats", steps=1, batch_size=1, repeat_folders=True)
    with safe_open(folder_paths.get_full_path_or_raise("loras", out.args[3]), "pt") as f:
        meta = f.metadata()
    assert meta["dataset_images"] == "2" and meta["dataset_samples"] == "5"


def test_tensorboard_logs_the_runs_losses_learning_rate_and_validation(pack, models, comfy):
    import folder_paths
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = make_dataset(comfy / "input" / "options_tb", names=["chelsea", "coffee", "astronaut"], captions=False)
    model, clip, vae = models
    out = train(pack, model, vae, root.name, lora_name="opt/tb", steps=3, batch_size=1, tensorboard=True,
                lr_schedule="linear", validation_split=0.34)
    folder = comfy / "output" / "selfperc_tensorboard" / "opt" / "tb"
    assert folder.is_dir() and str(folder).startswith(folder_paths.get_output_directory())
    events = EventAccumulator(str(folder))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert losses == pytest.approx(out.args[2]["loss"], rel=1e-6)
    lrs = [e.value for e in events.Scalars("train/learning_rate")]
    assert lrs == pytest.approx([1e-3 * (1 - i / 3) for i in range(3)], rel=1e-5)  # linear decay, as applied
    assert len(events.Scalars("validation/self_perceptual")) == 2  # at the start and the end


def test_tensorboard_without_its_package_is_refused_before_work(pack, models, captioned, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    model, clip, vae = models
    with pytest.raises(ValueError, match="TensorBoard logging needs the tensorboard package: pip install tensorboard"):
        train(pack, model, vae, captioned, lora_name="opt/no_tb", tensorboard=True)


def test_the_disk_latent_cache_skips_encoding_on_a_second_run_and_never_reads_a_stale_entry(pack, models, comfy,
                                                                                          monkeypatch):
    import copy

    from selfperc_pack.nodes import latent_cache

    root = make_dataset(comfy / "input" / "options_cache", names=["chelsea", "coffee"], captions=False)
    model, clip, vae = models
    folder = comfy / "user" / "selfperc" / "latent_cache"
    calls = []
    encode = type(vae).encode
    monkeypatch.setattr(type(vae), "encode", lambda self, px: calls.append(px.shape) or encode(self, px))
    kw = dict(steps=2, batch_size=1, cache_latents_to_disk=True)
    first = train(pack, model, vae, root.name, lora_name="opt/cache1", **kw).args[2]["loss"]
    assert len(calls) == 2 and len(list(folder.glob("*/*.safetensors"))) >= 2
    calls.clear()
    second = train(pack, model, vae, root.name, lora_name="opt/cache2", **kw).args[2]["loss"]
    assert calls == [] and second == first  # read back, bit for bit the same run
    train(pack, model, vae, root.name, lora_name="opt/cache3", resolution=32, **kw)
    assert len(calls) == 2  # another resolution: other pixels, other keys
    calls.clear()
    other = copy.copy(vae)
    other.first_stage_model = copy.deepcopy(vae.first_stage_model)
    with torch.no_grad():
        list(other.first_stage_model.parameters())[-1].add_(1e-3)  # one weight of the last layer changed
    train(pack, model, other, root.name, lora_name="opt/cache4", **kw)
    assert len(calls) == 2  # another VAE: other keys
    calls.clear()
    weight = list(vae.first_stage_model.parameters())[0]
    with torch.inference_mode(False), torch.no_grad():
        saved = weight.detach().clone()
        weight.add_(1e-3)  # the same VAE object, a weight changed in place
        try:
            train(pack, model, vae, root.name, lora_name="opt/cache4b", **kw)
        finally:
            weight.copy_(saved)
    assert len(calls) == 2  # its identity is its weights now, not the object
    calls.clear()
    for f in folder.glob("*/*.safetensors"):
        f.write_bytes(b"\x80\x04not a safetensors file")  # garbage (a pickle's opening bytes): never unpickled
    third = train(pack, model, vae, root.name, lora_name="opt/cache5", **kw).args[2]["loss"]
    assert len(calls) == 2 and third == first  # unreadable entries are misses, encoded and rewritten
    cache = latent_cache.LatentCache(vae, folder, max_bytes=1)
    cache.bound()
    assert not list(folder.glob("*/*.safetensors"))  # the size bound deletes the least recently used first


def test_masks_tag_orders_and_regularization_images_reach_the_loop(pack, models, comfy, monkeypatch):
    """A name.mask.png weighs its image (pooled onto the latent), tag orders are encoded once each by the real CLIP
    and drawn per step (the first tag kept), and regularization images join the samples with their weight; the LoRA
    file says so."""
    import json

    import folder_paths
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    model, clip, vae = models
    folder = make_dataset(comfy / "input" / "options_masked", names=["astronaut", "coffee"], captions=False)
    (folder / "astronaut.txt").write_text("sks person, helmet, flag, moon dust, stars")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).resize(Image.open(folder / "astronaut.png").size).save(folder / "astronaut.mask.png")
    reg = make_dataset(comfy / "input" / "options_reg", names=["chelsea", "camera"], captions=False)
    seen = []
    tokenize = clip.tokenize
    monkeypatch.setattr(clip, "tokenize", lambda text, *a, **k: seen.append(text) or tokenize(text, *a, **k))

    trainers = watch_trainers(monkeypatch)
    out = train(pack, model, vae, folder.name, clip=clip, lora_name="opt/masked", steps=6, batch_size=1,
                masked_loss=True, shuffle_tags=4, keep_first_tags=1, regularization_folder=reg.name,
                regularization_weight=0.5)
    assert len(out.args[2]["loss"]) == 6
    (tr,) = trainers
    assert len(tr.latents) == 4 and tr.sample_weights == [1.0, 1.0, 0.5, 0.5]
    m = tr.masks[0]
    assert m.shape == (1, 8, 8) and m[..., :4].min() > 0.95 and m[..., 4:].max() < 0.05
    assert tr.masks[1] is None  # no mask: every position alike
    orders = [t for t in seen if t.startswith("sks person, ")]
    assert len(set(orders)) == 4 and len(orders) == 5  # each order encoded once (the own one also as the caption)
    assert all(sorted(o.split(", ")) == sorted("sks person, helmet, flag, moon dust, stars".split(", "))
               for o in orders)
    picked = [tr.condition(0, tr.conds[0], s)["c_crossattn"].cond for s in range(12)]
    assert any(not torch.equal(picked[0], p) for p in picked[1:])  # another order on other steps
    assert torch.equal(tr.condition(1, tr.conds[1], 3)["c_crossattn"].cond, tr.conds[1]["c_crossattn"].cond)
    with safe_open(folder_paths.get_full_path_or_raise("loras", "opt/masked.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["masked_loss"] == "true" and meta["shuffle_tags"] == "4" and meta["regularization_images"] == "2"
    assert json.loads(meta["regularization_weight"]) == 0.5 and meta["regularization_folder"] == reg.name
