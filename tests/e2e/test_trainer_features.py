"""Trainer features through the real server: adapters, optimizer/schedule/accumulation, EMA, kohya files,
starting from a LoRA; each saved file is loaded back by core LoraLoaderModelOnly with no unloaded keys."""
import pytest
from safetensors.torch import load_file

from dev.datasets import make_dataset
from tests.e2e import graphs
from tests.e2e.test_server import assert_success

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def photos(server):
    return make_dataset(server.base / "input" / "features", names=["astronaut", "coffee"]).name


def train_and_reload(server, photos, name, files=(), **over):
    entry = server.run(graphs.fine_tune("eps", photos, f"feat/{name}", steps=2, **over))
    assert_success(server, entry)
    for f in (f"feat/{name}.safetensors", *files):
        reload, log = server.run_logged(graphs.load_lora_and_sample("eps", f))
        assert_success(server, reload)
        assert "lora key not loaded" not in log, f
    return entry, load_file(str(server.base / "models" / "loras" / "feat" / f"{name}.safetensors"))


@pytest.mark.parametrize("algorithm", ["LoHa", "LoKr", "OFT"])
def test_each_adapter_trains_saves_and_loads_in_core(server, photos, algorithm):
    _, sd = train_and_reload(server, photos, algorithm.lower(), algorithm=algorithm)
    marker = {"LoHa": ".hada_w1_a", "LoKr": ".lokr_w", "OFT": ".oft_blocks"}[algorithm]
    assert any(marker in k for k in sd), list(sd)[:5]


def test_ema_kohya_schedule_accumulation_and_optimizer_together(server, photos):
    entry, sd = train_and_reload(server, photos, "combo", files=("feat/combo_ema.safetensors",), ema_decay=0.9,
                                 save_weights="raw+ema", save_format="kohya", lr_schedule="cosine", warmup_steps=1,
                                 gradient_accumulation=2, optimizer="rmsprop")
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    assert "saved feat/combo.safetensors (2 steps" in entry["outputs"]["10"]["text"][0]


def test_init_lora_starts_from_a_downloaded_kohya_file(server, photos):
    """A kohya file as downloaded (here: written by an earlier run) starts the run: the continued LoRA has its keys,
    ranks and alphas, and 2 AdamW steps at lr 1e-3 moved each of its weights by at most about 2e-3 (a fresh start
    would have zero down-weights and random up-weights: far from it)."""
    import shutil

    import torch

    _, shared = train_and_reload(server, photos, "to_share", save_format="kohya", learning_rate=1e-2)
    loras = server.base / "models" / "loras"
    shutil.copy(loras / "feat" / "to_share.safetensors", loras / "downloaded.safetensors")
    _, continued = train_and_reload(server, photos, "continued", init_lora="downloaded.safetensors",
                                    save_format="kohya", learning_rate=1e-3)
    assert continued.keys() == shared.keys() and len(shared) > 60
    moves = {k: (continued[k] - shared[k]).abs().max().item() for k in shared if not k.endswith(".alpha")}
    assert max(moves.values()) <= 2 * 1e-3 * 1.01, max(moves.values())
    assert sum(v > 0 for v in moves.values()) > len(moves) // 2  # it trained on from there
    assert all(torch.equal(continued[k], shared[k]) for k in shared if k.endswith(".alpha"))
    assert any(shared[k].abs().max() > 1e-2 for k in shared if k.endswith(".lora_down.weight"))  # not a fresh start


def test_validation_sample_prompts_and_the_loss_curve_through_the_api(server):
    from PIL import Image

    folder = make_dataset(server.base / "input" / "feat_val", names=["astronaut", "coffee", "chelsea"]).name
    g = graphs.fine_tune("eps", folder, "feat/val", steps=2, batch_size=1, validation_split=0.34, validation_every=1,
                         sample_prompts="a photo of a cat\na red car", sample_every=1)
    g["15"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 4], "filename_prefix": "feat/curve"}}
    entry, log = server.run_logged(g)
    assert_success(server, entry)
    out = entry["outputs"]
    assert "validation self-perceptual" in out["10"]["text"][0]
    assert [i["filename"] for i in out["10"]["images"]] == ["step_000001.png", "step_000002.png"]
    for i in out["10"]["images"]:
        assert (server.base / "output" / i["subfolder"] / i["filename"]).is_file()
    curve = out["15"]["images"][0]
    with Image.open(server.base / "output" / curve["subfolder"] / curve["filename"]) as im:
        assert im.size == (768, 384)
    assert "selfperc: 1 of 3 images held out for validation" in log
    validations = [line for line in log.splitlines() if "selfperc: validation at step" in line]
    assert [line.split("validation at step ")[1].split(":")[0] for line in validations] == ["0", "1", "2"], log


def test_timestep_law_min_snr_decay_clipping_and_caption_options_through_the_api(server, photos):
    """The trainer options users bring from kohya / ai-toolkit / SimpleTuner, set on the option nodes through the
    server: the run trains, its LoRA loads in core, and the file's settings say what ran."""
    import json

    from safetensors import safe_open

    over = dict(t_law="logit_normal", t_law_mean=0.2, t_law_std=0.9, t_shift=2.0, min_snr_gamma=5.0,
                optimizer="adafactor", weight_decay=0.01, max_grad_norm=1.0, caption_prefix="sks, ",
                caption_dropout=0.5, perceptual_weight=1.0, mse_weight=0.5)
    train_and_reload(server, photos, "options", **over)
    with safe_open(str(server.base / "models" / "loras" / "feat" / "options.safetensors"), "pt") as f:
        meta = f.metadata()
    settings = json.loads(meta["settings"])
    for k in ("t_law", "t_law_mean", "t_law_std", "t_shift", "min_snr_gamma", "optimizer", "weight_decay",
              "max_grad_norm", "caption_dropout"):
        assert settings[k] == over[k], k
    assert meta["caption_prefix"] == "sks, "


def test_masked_loss_tag_shuffle_and_regularization_images_through_the_api(server, photos):
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    folder = server.base / "input" / "features_masked"
    make_dataset(folder, names=["astronaut", "coffee"], captions=False)
    (folder / "coffee.txt").write_text("sks cup, saucer, steam, table")
    with Image.open(folder / "astronaut.png") as im:
        a = np.zeros((im.size[1], im.size[0]), np.uint8)
    a[: a.shape[0] // 2] = 255
    Image.fromarray(a).save(folder / "astronaut.mask.png")
    reg = make_dataset(server.base / "input" / "features_reg", names=["chelsea"], captions=False).name
    train_and_reload(server, folder.name, "masked", masked_loss=True, shuffle_tags=3, keep_first_tags=1,
                     regularization_folder=reg, regularization_weight=0.7)
    with safe_open(str(server.base / "models" / "loras" / "feat" / "masked.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["masked_loss"], meta["shuffle_tags"], meta["regularization_images"]) == ("true", "3", "1")
    assert meta["dataset_images"] == "2" and meta["dataset_samples"] == "3"  # the regularization image is a sample
