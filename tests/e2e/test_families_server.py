"""Every family through the real server's HTTP API: the tiny model of each family is built inside the server by
a test-only node (dev/server_nodes) from ComfyUI's own classes; SD3 also as a file through core UNETLoader."""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dev.datasets import make_dataset, photo
from dev.tiny_families import FAMILIES
from tests.e2e import graphs
from tests.e2e.test_server import assert_success
from tests.host import test_families as host_tests

pytestmark = pytest.mark.e2e
TRAIN = dict(host_tests.TRAIN, resolution=64)  # the node's minimum through the API


@pytest.fixture(scope="module")
def inputs(server):
    folder = make_dataset(server.base / "input" / "families", names=["astronaut", "coffee", "chelsea"]).name
    a = Image.fromarray(photo("astronaut")).resize((32, 32))
    b = a.copy()
    b.paste((0, 255, 0), (16, 16, 32, 32))
    a.save(server.base / "input" / "fam_a.png")
    b.save(server.base / "input" / "fam_b.png")
    return folder


def tiny(family):
    return {"1": {"class_type": "SelfPercTestTinyFamily", "inputs": {"family": family, "side": 4}}}


def sample_to_latent(g, node, model, prefix):
    g[node] = {"class_type": "KSampler", "inputs": {"model": model, "positive": ["1", 3], "negative": ["1", 3],
                                                    "latent_image": ["1", 4], "seed": 0, "steps": 2, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    g[node + "s"] = {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": prefix}}
    return g


def saved_latent(server, entry, node):
    f = entry["outputs"][node]["latents"][0]
    return load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_samples_and_its_lora_loads_through_the_api(server, inputs, family):
    before = server.run(sample_to_latent(tiny(family), "2", ["1", 0], f"fam/{family}_before"))
    assert_success(server, before)

    g = tiny(family)
    g.update(graphs.fine_tune_node("10", dict(TRAIN, model=["1", 0], vae=["1", 2], clip=["1", 1], dataset_folder=inputs,
                              lora_name=f"fam/{family}")))
    g["12"] = {"class_type": "SelfPerceptualSampler",
               "inputs": {"model": ["10", 0], "base_model": ["1", 0], "latent": ["1", 4], "positive": ["1", 3],
                          "vae": ["1", 2], "seed": 1, "steps": 2, "sampler_name": "euler", "scheduler": "normal",
                          "cfg": 1.0, "cfg_rescale": 0.0, "denoise": 1.0}}
    g["13"] = {"class_type": "SaveImage", "inputs": {"images": ["12", 1], "filename_prefix": f"fam/{family}_ab"}}
    g["30"] = {"class_type": "LoadImage", "inputs": {"image": "fam_a.png"}}
    g["31"] = {"class_type": "LoadImage", "inputs": {"image": "fam_b.png"}}
    g["32"] = {"class_type": "SelfPerceptualDistance",
               "inputs": {"model": ["1", 0], "vae": ["1", 2], "image_a": ["30", 0], "image_b": ["31", 0],
                          "noise_level": 0.3, "seed": 0, "feature_layer": "mid_block", "distance": "mse",
                          "overlay": 0.6, "conditioning": ["1", 3]}}
    g["33"] = {"class_type": "SaveImage", "inputs": {"images": ["32", 0], "filename_prefix": f"fam/{family}_heat"}}
    g = sample_to_latent(g, "14", ["10", 0], f"fam/{family}_tuned")  # the node's own MODEL output
    entry = server.run(g)
    assert_success(server, entry)
    assert "10" in entry["outputs"], (entry["outputs"].keys(), server.log_tail(3000))
    assert f"saved fam/{family}.safetensors (2 steps" in entry["outputs"]["10"]["text"][0]
    assert entry["outputs"]["13"]["images"] and entry["outputs"]["33"]["images"]

    g = sample_to_latent(tiny(family), "2", ["1", 0], f"fam/{family}_after")
    g["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "strength_model": 1.0,
                                                               "lora_name": f"fam/{family}.safetensors"}}
    g = sample_to_latent(g, "21", ["20", 0], f"fam/{family}_lora")
    after, log = server.run_logged(g)
    assert_success(server, after)
    assert "lora key not loaded" not in log
    base0, base1 = saved_latent(server, before, "2s"), saved_latent(server, after, "2s")
    assert torch.equal(base0, base1), "the base model samples differently after training"
    # the saved file through core LoraLoaderModelOnly samples what the node's own MODEL output sampled, and that is
    # not the base model's sample (2 steps at lr 1e-3 move the LoRA a little, not nothing)
    tuned, loaded = saved_latent(server, entry, "14s"), saved_latent(server, after, "21s")
    assert (tuned - base0).abs().max() > 1e-4, (tuned - base0).abs().max()
    torch.testing.assert_close(loaded, tuned, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,weight_dtype", [("sd3", "default"), ("sd3", "fp8_e4m3fn"), ("sd35", "default")])
def test_sd3_file_through_core_unetloader_trains(server, inputs, family, weight_dtype):
    """A tiny SD3 (and SD3.5: x-block self-attention) saved as a file is detected by ComfyUI itself (UNETLoader) and
    trains through the API, also with its weights kept in fp8 as ComfyUI stores them (cast per layer; the LoRA trains
    in fp32); the saved LoRA loads back in core LoraLoaderModelOnly with no unloaded key."""
    from safetensors.torch import save_file

    from dev.host import import_comfy
    from dev.tiny_families import tiny_model

    import_comfy()
    name = f"tiny_{family}.safetensors"
    path = server.base / "models" / "diffusion_models" / name
    if not path.exists():
        save_file({k: v.contiguous() for k, v in tiny_model(family).model.diffusion_model.state_dict().items()},
                  str(path))
    g = tiny("sd3")
    g["5"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": weight_dtype}}
    g.update(graphs.fine_tune_node("10", dict(TRAIN, model=["5", 0], vae=["1", 2], conditioning=["1", 3], dataset_folder=inputs,
                              lora_name=f"fam/{family}_{weight_dtype}")))
    entry, log = server.run_logged(g)
    assert_success(server, entry)
    text = entry["outputs"]["10"]["text"][0]
    assert f"saved fam/{family}_{weight_dtype}.safetensors" in text and "final loss nan" not in text
    assert "model_type FLOW" in log
    lora = load_file(str(server.base / "models" / "loras" / "fam" / f"{family}_{weight_dtype}.safetensors"))
    assert any(".x_block.attn2." in k for k in lora) == (family == "sd35")  # SD3.5's second attention trains
    g = sample_to_latent(tiny("sd3"), "21", ["20", 0], f"fam/{family}_{weight_dtype}_lora")
    g["5"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": weight_dtype}}
    g["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["5", 0], "strength_model": 1.0,
                                                               "lora_name": f"fam/{family}_{weight_dtype}.safetensors"}}
    after, log = server.run_logged(g)
    assert_success(server, after)
    assert "lora key not loaded" not in log


def test_sd2_file_through_core_unetloader_trains_as_v_prediction(server, inputs):
    """The tiny UNet at SD2.x's widths, detected as SD20 by core UNETLoader, as v-prediction + zero terminal SNR
    (core ModelSamplingDiscrete), unconditional (SD2's empty 1024-wide conditioning): trains, and the LoRA loads in
    core LoraLoaderModelOnly with no unloaded key."""
    g = {"5": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd2_unet.safetensors", "weight_dtype": "default"}},
         "6": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["5", 0], "sampling": "v_prediction",
                                                                "zsnr": True}},
         "7": {"class_type": "SelfPercTestTinyFamily", "inputs": {"family": "sd20_v", "side": 4}}}
    g.update(graphs.fine_tune_node("10", dict(TRAIN, model=["6", 0], vae=["7", 2], dataset_folder=inputs, lora_name="fam/sd2_file")))
    entry, log = server.run_logged(g)
    assert_success(server, entry)
    assert "model_type EPS" in log  # detection says eps (a tiny file has no v statistics); ModelSamplingDiscrete sets v
    assert "saved fam/sd2_file.safetensors (2 steps" in entry["outputs"]["10"]["text"][0]
    g = {"5": g["5"], "20": {"class_type": "LoraLoaderModelOnly",
                             "inputs": {"model": ["5", 0], "strength_model": 1.0,
                                        "lora_name": "fam/sd2_file.safetensors"}},
         "21": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    g["22"] = {"class_type": "SelfPerceptualSampler",  # unconditional: SD2's empty conditioning
               "inputs": {"model": ["20", 0], "base_model": ["5", 0], "latent": ["21", 0], "seed": 0, "steps": 2,
                          "sampler_name": "euler", "scheduler": "normal", "cfg": 1.0, "cfg_rescale": 0.0,
                          "denoise": 1.0}}
    g["23"] = {"class_type": "SaveLatent", "inputs": {"samples": ["22", 0], "filename_prefix": "fam/sd2_file"}}
    after, log = server.run_logged(g)
    assert_success(server, after)
    assert "lora key not loaded" not in log
