"""API-format graphs (what POST /prompt takes) built from small pieces."""
from __future__ import annotations

CKPT = "tiny_sd15.safetensors"

TRAIN = dict(steps=3, learning_rate=1e-3, rank=4, alpha=4.0, batch_size=2, resolution=64, resize_mode="center_crop",
             seed=0, feature_layer="mid_block", t_prime="uniform", t_prime_min=0.0, t_prime_max=1.0, distance="mse",
             normalize_features=False, mse_weight=0.0, gradient_checkpointing=True, training_dtype="auto",
             overwrite=False, save_every=0, preview_every=0)


def loader(kind: str = "eps") -> dict:
    """Nodes "1" (checkpoint) and "2" (the model re-parameterized as eps / v + zsnr / flow)."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}
    if kind == "eps":
        g["2"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "eps", "zsnr": False}}
    elif kind == "v_zsnr":
        g["2"] = {"class_type": "ModelSamplingDiscrete",
                  "inputs": {"model": ["1", 0], "sampling": "v_prediction", "zsnr": True}}
    elif kind == "flow":
        g["2"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    else:
        raise ValueError(kind)
    return g


def core_sampling() -> dict:
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}}
    g["3"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}}
    g["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["5"] = {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    g["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    g["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "harness"}}
    return g


OPTION_NODES = {"objective": "SelfPerceptualObjective", "training": "SelfPerceptualTrainingOptions",
                "lora": "SelfPerceptualLoraOptions", "monitoring": "SelfPerceptualMonitoring"}


def fine_tune_node(node_id: str, inputs: dict) -> dict:
    """API-format nodes of a fine-tune whose settings are given flat: the node (id ``node_id``) and an option node
    (ids node_id + 1..4) for each option group with a value; the groups come from the pack's own settings."""
    from dev.host import import_pack

    import_pack()
    from selfperc_pack.nodes.settings import split_flat

    base, groups = split_flat(inputs)
    nodes = {node_id: {"class_type": "SelfPerceptualFineTune", "inputs": base}}
    for i, (group, values) in enumerate(sorted(groups.items()), 1):
        nodes[f"{node_id}{i}"] = {"class_type": OPTION_NODES[group], "inputs": values}
        base[group] = [f"{node_id}{i}", 0]
    return nodes


def fine_tune(kind: str, folder: str, lora_name: str, clip: bool = True, **over) -> dict:
    """Fine-tune -> A/B sampler (base vs tuned, no CFG) -> SaveImage, plus core Plot Loss Graph."""
    g = loader(kind)
    inputs = dict(TRAIN, model=["2", 0], vae=["1", 2], dataset_folder=folder, lora_name=lora_name)
    if clip:
        inputs["clip"] = ["1", 1]
    inputs.update(over)
    g.update(fine_tune_node("10", inputs))
    g["11"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["12"] = {"class_type": "SelfPerceptualSampler",
               "inputs": {"model": ["10", 0], "base_model": ["2", 0], "latent": ["11", 0], "seed": 1, "steps": 3,
                          "sampler_name": "euler", "scheduler": "normal", "cfg": 1.0, "cfg_rescale": 0.0,
                          "denoise": 1.0, "vae": ["1", 2]}}
    g["13"] = {"class_type": "SaveImage", "inputs": {"images": ["12", 1], "filename_prefix": f"ab_{kind}"}}
    g["14"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["10", 2], "filename_prefix": "loss"}}
    return g


def load_lora_and_sample(kind: str, lora_file: str) -> dict:
    g = loader(kind)
    g["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["2", 0], "lora_name": lora_file,
                                                               "strength_model": 1.0}}
    g["21"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["22"] = {"class_type": "SelfPerceptualSampler",
               "inputs": {"model": ["20", 0], "base_model": ["2", 0], "latent": ["21", 0], "seed": 1, "steps": 2,
                          "sampler_name": "euler", "scheduler": "normal", "cfg": 1.0, "cfg_rescale": 0.0,
                          "denoise": 1.0, "vae": ["1", 2]}}
    g["23"] = {"class_type": "SaveImage", "inputs": {"images": ["22", 1], "filename_prefix": f"lora_{kind}"}}
    return g


def distance(image_a: str, image_b: str, kind: str = "eps", overlay: float = 0.6) -> dict:
    g = loader(kind)
    g["30"] = {"class_type": "LoadImage", "inputs": {"image": image_a}}
    g["31"] = {"class_type": "LoadImage", "inputs": {"image": image_b}}
    g["32"] = {"class_type": "SelfPerceptualDistance",
               "inputs": {"model": ["2", 0], "vae": ["1", 2], "image_a": ["30", 0], "image_b": ["31", 0],
                          "noise_level": 0.2, "seed": 0, "feature_layer": "mid_block", "distance": "mse",
                          "overlay": overlay}}
    g["33"] = {"class_type": "SaveImage", "inputs": {"images": ["32", 0], "filename_prefix": "heatmap"}}
    return g
