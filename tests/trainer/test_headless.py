"""The headless trainer (selfperc_headless.train) on accelerate + diffusers, with the core's objective unchanged."""
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dev.datasets import make_dataset
from dev.diffusers_fixture import write_model_folder
from dev.host import REPO_ROOT
from tests.trainer.runs import TWO_CPU_PROCESSES, train

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_folder(tmp_path_factory.mktemp("diffusers") / "eps")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "photos", captions=False)


def test_two_processes_equal_one_process_with_the_double_batch(model_dir, data_dir, tmp_path):
    """accelerate launch, 2 CPU processes (torch.distributed, gloo) x batch 1 == 1 process x batch 2."""
    one, lora_one = train(model_dir, data_dir, tmp_path / "one", "--steps", 2, "--batch-size", 2)
    two, lora_two = train(model_dir, data_dir, tmp_path / "two", "--steps", 2, "--batch-size", 1, launcher=TWO_CPU_PROCESSES)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert lora_one.keys() == lora_two.keys()
    # Gradients agree to float rounding (gloo sums in another order); AdamW's first steps move each weight by
    # about lr * sign(grad), so a gradient that is ~0 may flip one weight by up to 2 * lr * steps.
    diffs = torch.cat([(lora_two[k] - lora_one[k]).abs().flatten() for k in lora_one])
    assert diffs.max() <= 2 * 1e-4 * 2 + 1e-6
    assert diffs.mean() < 1e-7
    # only the main process writes
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["log.json", "selfperc_lora.safetensors"]


def test_resume_from_accelerate_state_continues_exactly(model_dir, data_dir, tmp_path):
    straight, lora_a = train(model_dir, data_dir, tmp_path / "a", "--steps", 3, "--batch-size", 2)
    train(model_dir, data_dir, tmp_path / "b", "--steps", 1, "--batch-size", 2, "--save-every", 1)
    resumed, lora_b = train(model_dir, data_dir, tmp_path / "b", "--steps", 3, "--batch-size", 2,
                            "--resume", tmp_path / "b" / "state-000001")
    assert resumed["losses"] == pytest.approx(straight["losses"][1:], rel=1e-5)
    for k in lora_a:
        torch.testing.assert_close(lora_b[k], lora_a[k], rtol=1e-4, atol=1e-6)


def test_lora_loads_in_comfyui_with_no_unloaded_keys(comfy, tiny_models, model_dir, data_dir, tmp_path, caplog):
    import folder_paths

    from nodes import LoraLoaderModelOnly
    from tests.host.models import load_checkpoint
    from tests.host.test_nodes_inprocess import sample_base

    _, lora = train(model_dir, data_dir, tmp_path / "c", "--steps", 2, "--batch-size", 2, "--lr", "1e-3")
    dest = folder_paths.get_folder_paths("loras")[0]
    shutil.copy(tmp_path / "c" / "selfperc_lora.safetensors", f"{dest}/headless.safetensors")
    model = load_checkpoint(str(tiny_models["checkpoint"]))[0]  # the same UNet weights, ComfyUI layout
    with caplog.at_level(logging.WARNING):
        loaded = LoraLoaderModelOnly().load_lora_model_only(model, "headless.safetensors", 1.0)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(loaded.patches) == sum(1 for k in lora if k.endswith(".lora_down.weight")) > 20
    assert not torch.equal(sample_base(loaded), sample_base(model))


@pytest.mark.parametrize("prediction_type,zsnr", [("epsilon", False), ("v_prediction", True)])
def test_diffusers_predictions_match_comfyui_for_the_same_weights(comfy, tiny_models, tmp_path, prediction_type,
                                                                  zsnr):
    """The headless host's sigma-space conventions are ComfyUI's: same x0_hat from the same UNet weights."""
    from diffusers import DDPMScheduler

    from dev.diffusers_fixture import diffusers_unet_from_comfy
    from selfperc_headless import families
    from selfperc_headless.schedules import DiffusersSchedule
    from tests.host.models import as_parameterization, load_checkpoint

    model = load_checkpoint(str(tiny_models["checkpoint"]))[0]
    model = as_parameterization(model, "eps" if prediction_type == "epsilon" else "v_zsnr")
    sched = DiffusersSchedule(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            prediction_type=prediction_type, rescale_betas_zero_snr=zsnr))
    ms = model.get_model_object("model_sampling")
    t = torch.tensor([100.0, 500.0, 969.0]) / 999  # on training timesteps (both round to the nearest one)
    sig = sched.sigma_of_t(t)
    torch.testing.assert_close(sig, torch.tensor([float(ms.percent_to_sigma(1 - float(v))) for v in t]),
                               rtol=2e-3, atol=1e-4)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sig.view(-1, 1, 1, 1)
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])  # applies the model_sampling patch to the BaseModel
    with torch.no_grad():
        ours = families.predictor(diffusers_unet_from_comfy(), families.FAMILIES["sd"], sched)(x, sig)
        theirs = model.model.apply_model(x, sig, c_crossattn=torch.zeros(3, 77, 768))
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_v_prediction_zero_snr_lora_run(tmp_path, data_dir):
    v_dir = write_model_folder(tmp_path / "v", prediction_type="v_prediction", zsnr=True)
    log, lora = train(v_dir, data_dir, tmp_path / "v_out", "--steps", 2, "--batch-size", 2,
                      "--gradient-checkpointing")
    assert len(log["losses"]) == 2 and all(torch.isfinite(torch.tensor(log["losses"])))
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith(".lora_up.weight"))


def test_full_fine_tune_trains_every_weight_against_a_frozen_copy(tmp_path, data_dir):
    """--full: the saved unet/ is the trained network (it loads as that network), every weight moved by about lr
    per AdamW step and no more, and the perceptual network stayed the model as it was loaded."""
    from diffusers import UNet2DConditionModel

    from selfperc_headless import families as F
    from selfperc_headless import train as headless

    v_dir = write_model_folder(tmp_path / "v", prediction_type="v_prediction", zsnr=True)
    lr = 1e-4
    run = headless.main(["--model", str(v_dir), "--data", str(data_dir), "--out", str(tmp_path / "full"),
                         "--resolution", "64", "--steps", "2", "--full", "--lr", str(lr), "--batch-size", "2"])
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "full" / "unet").state_dict()
    trained = run.net.state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    original = F.load_denoiser(v_dir, F.FAMILIES["sd"])
    moves = torch.cat([(trained[k] - v).abs().flatten() for k, v in original.state_dict().items()])
    assert 0.9 * lr <= moves.max() <= 2 * lr * 1.01  # AdamW: at most about lr per step
    assert (moves > 0.1 * lr).float().mean() > 0.5, "most weights should have moved"
    schedule = F.load_schedule(v_dir, F.FAMILIES["sd"], (8, 8))
    untouched = headless.make_view(original, original, F.FAMILIES["sd"], schedule, None, 0.5, 3.5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 3.0])
    with torch.no_grad():
        frozen = run.trainer.view.frozen_features(x, sigma, None)
        torch.testing.assert_close(frozen, untouched.frozen_features(x, sigma, None), rtol=0, atol=0)
        online = headless.make_view(run.net, run.net, F.FAMILIES["sd"], schedule, None, 0.5, 3.5)
        assert not torch.equal(online.frozen_features(x, sigma, None), frozen)


def test_resume_never_unpickles_a_planted_state(model_dir, data_dir, tmp_path):
    """A pickle planted as the state file (or accelerate's custom_checkpoint pickle) is refused, never run."""
    import pickle

    from tests.core.test_state import _Payload

    marker = tmp_path / "pwned"
    state = tmp_path / "planted"
    state.mkdir()
    (state / "trainer.selfperc_state").write_bytes(pickle.dumps({"trainer": _Payload(marker)}))
    (state / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    cmd = [sys.executable, "-m", "selfperc_headless.train", "--model", str(model_dir), "--data", str(data_dir), "--out",
           str(tmp_path / "out"), "--resolution", "64", "--steps", "2", "--resume", str(state)]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode != 0
    assert "trainer.selfperc_state is not a valid selfperc state file" in res.stderr, res.stderr[-2000:]
    assert not marker.exists(), "the planted pickle ran"


def evaluate(model_dir, data_dir, out, *compare, extra=()):
    cmd = [sys.executable, "-m", "selfperc_headless.evaluate", "--model", str(model_dir), "--data", str(data_dir),
           "--resolution", "64", "--samples", "4", "--steps", "4", "--bootstraps", "3", "--noise-levels", "0.2",
           "0.6", "--out", str(out), *[f"--compare={c}" for c in compare], *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_headless_evaluate_measures_a_trained_lora_with_paired_spread(model_dir, data_dir, tmp_path):
    """The node's measurement from the command line: a LoRA written by the trainer against the base model, and a
    LoRA with zero up weights (the base model itself) whose difference is exactly 0 (identical noise)."""
    from safetensors.torch import save_file

    _, lora = train(model_dir, data_dir, tmp_path / "run", "--steps", 2, "--batch-size", 2, "--lr", "1e-2")
    zero = {k: (torch.zeros_like(v) if k.endswith("lora_up.weight") else v) for k, v in lora.items()}
    save_file(zero, str(tmp_path / "zero.safetensors"))
    res = evaluate(model_dir, data_dir, tmp_path / "report.json",
                   f"tuned={tmp_path / 'run' / 'selfperc_lora.safetensors'}", f"zero={tmp_path / 'zero.safetensors'}")
    assert res.returncode == 0, res.stderr[-4000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    for metric in ("FD", "KID"):
        rows = rep["metrics"]["self"][metric]
        assert set(rows) == {"base", "tuned", "zero", "tuned - base", "zero - base"}
        assert rows["zero - base"]["value"] == 0 and rows["zero - base"]["std"] == 0
        assert rows["tuned - base"]["value"] != 0 and rows["base"]["std"] > 0
    assert "self FD" in res.stdout and "tuned - base" in res.stdout


def test_headless_evaluate_refuses_a_foreign_lora_and_too_few_images(model_dir, data_dir, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_not_a_layer.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "foreign.safetensors"))
    res = evaluate(model_dir, data_dir, tmp_path / "r.json", f"x={tmp_path / 'foreign.safetensors'}")
    assert res.returncode != 0 and "lora_unet_not_a_layer matches no layer" in res.stderr
    one = make_dataset(tmp_path / "one", names=["coffee"], captions=False)
    res = evaluate(model_dir, one, tmp_path / "r.json")
    assert res.returncode != 0 and "at least 2" in res.stderr
    assert not (tmp_path / "r.json").exists()  # nothing half-written


def test_captions_are_encoded_once_cached_and_condition_training(tmp_path, data_dir, monkeypatch):
    """With text_encoder/ + tokenizer/ in the model folder, each distinct caption is encoded once (the cache is
    keyed by caption and encoder), the cache alone serves a second run, and captions change the training."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from selfperc_headless import captions as cap

    model = write_model_folder(tmp_path / "te", text_encoder=True)
    captioned = make_dataset(tmp_path / "captioned", captions=True)
    (captioned / "coffee.txt").unlink()  # one image without a caption: the empty prompt
    cache = tmp_path / "cache"
    texts = sorted({p.read_text() for p in captioned.glob("*.txt")} | {""})
    log, _ = train(model, captioned, tmp_path / "a", "--steps", 2, "--batch-size", 2, "--caption-cache", cache)
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == len(texts)  # one entry per distinct caption, the empty one included
    enc_id = cap.encoder_id(model, cap.SD)
    tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    te = CLIPTextModel.from_pretrained(model / "text_encoder").eval()
    for t in texts:
        ids = tok(t, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            want = te(ids).last_hidden_state
        got = load_file(str(cache / f"{cap.cache_key(enc_id, t)}.safetensors"))["context"]
        torch.testing.assert_close(got, want)
    # the cache alone serves the same captions: the encoder is never loaded again
    monkeypatch.setattr(CLIPTextModel, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("encoder loaded")))
    from selfperc_core.dataset import load_dataset

    ds = load_dataset(captioned, 64, "center_crop")
    conds = cap.encode_captions(model, ds.captions, cache, "cpu", log=lambda *_: None)
    assert all(set(c) == {"context"} and c["context"].shape == (1, 77, 768) for c in conds)
    # captions condition training: the same run with them off (zero context) gives other losses
    off, _ = train(model, captioned, tmp_path / "b", "--steps", 2, "--batch-size", 2, "--captions", "off")
    assert off["losses"] != pytest.approx(log["losses"], rel=1e-4)
    # a damaged cache entry is re-encoded, never trusted
    monkeypatch.undo()
    files[0].write_bytes(b"not a safetensors file")
    again = cap.encode_captions(model, ds.captions, cache, "cpu", log=lambda *_: None)
    for a, b in zip(again, conds):
        torch.testing.assert_close(a["context"], b["context"])


def test_trainer_options_and_tensorboard_log_in_the_headless_trainer(model_dir, data_dir, tmp_path):
    """The options the node's option nodes have, as flags: the run trains, and its TensorBoard log holds the global
    losses the trainer reports and the learning rate of each step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "options"
    log, lora = train(model_dir, data_dir, out, "--steps", 3, "--t-law", "logit_normal", "--t-shift", 2.0,
                      "--min-snr-gamma", 5.0, "--mse-weight", 1.0, "--weight-decay", 0.01, "--max-grad-norm", 1.0,
                      "--optimizer", "adafactor", "--lr-schedule", "linear", "--tensorboard")
    assert len(log["losses"]) == 3 and all(torch.isfinite(torch.tensor(log["losses"])))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(log["losses"], rel=1e-6)
    assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx(
        [1e-4 * (1 - i / 3) for i in range(3)], rel=1e-5)


def test_masked_loss_tag_orders_and_regularization_images_in_the_headless_trainer(tmp_path):
    """--shuffle-tags encodes each caption's tag orders (the first tag kept) once into the caption cache;
    --reg-data adds its images at --reg-weight; --masked-loss reads name.mask.png and changes the losses."""
    import numpy as np
    from PIL import Image

    from selfperc_headless import captions as cap

    model = write_model_folder(tmp_path / "te", text_encoder=True)
    data = make_dataset(tmp_path / "tags", names=["astronaut", "coffee"], captions=False)
    (data / "astronaut.txt").write_text("sks person, helmet, flag, stars")
    mask = np.zeros((96, 96), np.uint8)
    mask[:, :48] = 255
    Image.fromarray(mask).save(data / "astronaut.mask.png")
    reg = make_dataset(tmp_path / "reg", names=["chelsea"], captions=False)
    cache = tmp_path / "cache"
    flags = ["--steps", 3, "--batch-size", 3, "--shuffle-tags", 3, "--keep-first-tags", 1, "--reg-data", reg,
             "--reg-weight", 0.5]
    masked, _ = train(model, data, tmp_path / "a", *flags, "--masked-loss", "--caption-cache", cache)
    unmasked = tmp_path / "unmasked"
    shutil.copytree(data, unmasked, ignore=shutil.ignore_patterns("*.mask.png"))
    plain, _ = train(model, unmasked, tmp_path / "b", *flags, "--masked-loss")  # the same run but for the mask
    same, _ = train(model, data, tmp_path / "c", *flags, "--masked-loss")
    assert same["losses"] == pytest.approx(masked["losses"], rel=1e-6)
    assert masked["losses"] != pytest.approx(plain["losses"], rel=1e-4)
    from selfperc_core.dataset import shuffled_tags

    orders = shuffled_tags("sks person, helmet, flag, stars", 1, 3, 0)
    assert len(orders) == 3 and all(o.startswith("sks person, ") for o in orders)
    enc = cap.encoder_id(model, cap.SD)
    assert all((cache / f"{cap.cache_key(enc, o)}.safetensors").is_file() for o in orders)
    assert len(list(cache.glob("*.safetensors"))) == 3 + 1  # the three orders and the empty caption (2 images)
