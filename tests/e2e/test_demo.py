"""`make demo` end to end through the real server, at reduced sizes: the digit model builds and loads as SD3, both
fine-tunes run and save loadable LoRAs, Evaluate reports all three models with their differences, and every
result file is written."""
import json

import pytest
from PIL import Image

from dev import demo, demo_model

pytestmark = pytest.mark.e2e


def test_digit_autoencoder_round_trips_and_the_checkpoint_is_sd3(comfy, tmp_path):
    import comfy.sd
    import comfy.supported_models
    import torch

    images = demo_model.digit_images()
    assert images.shape == (1797, demo_model.RES, demo_model.RES, 3)
    ckpt = demo_model.build(tmp_path, steps=2, log=lambda *_: None)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
    assert type(model.model.model_config) is comfy.supported_models.SD3
    assert vae.latent_channels == 16
    with torch.no_grad():
        px = torch.tensor(images[:8]).float() / 255
        lat = vae.encode(px)
        back = vae.decode(lat)
    assert lat.shape == (8, 16, 8, 8)
    scaled = model.model.process_latent_in(lat)  # what the diffusion model sees: about unit size
    assert 0.5 < scaled.std() < 3.0
    # blurry (8x down, 8x up) but faithful: each reconstruction is nearest to its own digit among the 8
    dist = (back[:, None] - px[None]).abs().mean(dim=(2, 3, 4))  # (reconstruction, original)
    assert torch.equal(dist.argmin(dim=1), torch.arange(8)), dist
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    assert cond[0][0].shape == (1, 77, 4096) and cond[0][1]["pooled_output"].shape == (1, 2048)


def test_quick_demo_runs_through_the_server(tmp_path, capsys):
    report = demo.run_demo(
        out=tmp_path, base_steps=10,
        fine_tune=dict(demo.FINE_TUNE, steps=2, batch_size=4),
        evaluate=dict(demo.EVALUATE, sample_count=6, steps=3, bootstraps=4, max_dataset_images=12))
    printed = capsys.readouterr().out
    results = tmp_path / "results"
    for name in ("evaluation_table.png", "samples_base_selfperceptual_mse.png", "loss_selfperceptual.png",
                 "loss_mse_baseline.png", "distance_heatmap.png"):
        with Image.open(results / name) as im:
            assert im.width > 32 and im.height > 32, name
    from safetensors import safe_open

    for name, weights in (("demo_selfperceptual", (1.0, 0.0)), ("demo_mse_baseline", (0.0, 1.0))):
        with safe_open(str(results / f"{name}.safetensors"), "pt") as f:
            assert any("lora" in k for k in f.keys()), name
            settings = json.loads(f.metadata()["settings"])
        # the baseline is plain MSE in the model's own (velocity) loss space, the rest of the run the same
        assert (settings["perceptual_weight"], settings["mse_weight"]) == weights and settings["mse_space"] == "native"
    rows = report["metrics"]["self"]["KID"]
    assert set(rows) == {"base", "fine-tuned", "baseline", "fine-tuned - base", "baseline - base",
                         "fine-tuned - baseline"}
    assert report["samples"] == 6 and report["dataset_images"] == 12
    assert json.loads((results / "evaluation.json").read_text()) == report
    ui = json.loads((results / "demo_workflow.json").read_text())
    tunes = [n for n in ui["nodes"] if n["type"] == "SelfPerceptualFineTune"]
    assert len(tunes) == 2
    assert "fine-tuned - base" in printed and "what the numbers show" in printed
