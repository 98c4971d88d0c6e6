"""The example workflows: written in ComfyUI's UI format from compact specs, and converted back to API format.

``python -m dev.workflows`` regenerates workflows/*.json from the node definitions of a real ComfyUI server
(widget order comes from /object_info, so files stay in step with the nodes). ``to_api`` turns a UI-format
workflow into what POST /prompt takes, the way the frontend does, for tests and the demo.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from dev.host import REPO_ROOT, ComfyServer

WORKFLOWS = REPO_ROOT / "workflows"
CKPT = "v1-5-pruned-emaonly.safetensors"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# id: (class_type, {input: value | (from_id, slot)}, pos, size). Values not given take the node's defaults.
FINE_TUNE = {
    "title": "selfperc_fine_tune_compare",
    "note": ("Self-perceptual fine-tune, then base vs fine-tuned WITHOUT guidance (cfg 1.0).\n\n"
             "1. Pick your SD1.5 / SD2.x checkpoint in the loader.\n"
             "2. Put a folder of images (optional name.txt captions) into ComfyUI/input/ and pick it in "
             "dataset_folder (press R to refresh the list).\n"
             "3. Set steps (200-1000), learning_rate (1e-5..1e-4). The option nodes below the loader hold everything "
             "else (each at its defaults; delete one and its defaults apply): Objective (mse_weight 0 = pure "
             "self-perceptual as in the paper, 1 = 1:1 mix with MSE; perceptual_weight 0 + mse_weight 1 = the plain "
             "MSE baseline), Training Options, LoRA Options, Monitoring.\n"
             "The LoRA is saved to models/loras/<lora_name>.safetensors; the loss curve is plotted below."),
    "nodes": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 120), (320, 100)),
        2: ("SelfPerceptualFineTune", {"model": (1, 0), "vae": (1, 2), "clip": (1, 1), "steps": 200,
                                       "dataset_folder": "my_dataset", "resolution": 512, "objective": (7, 0),
                                       "training": (8, 0), "lora": (9, 0), "monitoring": (10, 0)},
            (400, 120), (360, 420)),
        3: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 4}, (400, 580), (320, 110)),
        4: ("SelfPerceptualSampler", {"model": (2, 0), "base_model": (1, 0), "latent": (3, 0), "vae": (1, 2),
                                      "steps": 30}, (800, 120), (340, 380)),
        5: ("SaveImage", {"images": (4, 1), "filename_prefix": "selfperc/compare"}, (1180, 120), (420, 460)),
        6: ("LossGraphNode", {"loss": (2, 2), "filename_prefix": "selfperc/loss"}, (800, 560), (340, 300)),
        7: ("SelfPerceptualObjective", {}, (40, 260), (320, 380)),
        8: ("SelfPerceptualTrainingOptions", {}, (40, 680), (320, 330)),
        9: ("SelfPerceptualLoraOptions", {}, (40, 1050), (320, 300)),
        10: ("SelfPerceptualMonitoring", {}, (40, 1390), (320, 230)),
    },
}
DISTANCE = {
    "title": "selfperc_perceptual_distance",
    "note": ("Perceptual distance: both images are noised with the same noise and compared in the frozen "
             "model's mid-block features. Identical images give 0 and a flat map; edited regions light up.\n\n"
             "Pick a checkpoint and two images of the same size (LoadImage uploads into input/)."),
    "nodes": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 120), (320, 100)),
        2: ("LoadImage", {"image": "example.png"}, (40, 280), (320, 320)),
        3: ("LoadImage", {"image": "example.png"}, (40, 640), (320, 320)),
        4: ("SelfPerceptualDistance", {"model": (1, 0), "vae": (1, 2), "image_a": (2, 0), "image_b": (3, 0)},
            (400, 120), (340, 300)),
        5: ("SaveImage", {"images": (4, 0), "filename_prefix": "selfperc/heatmap"}, (780, 120), (400, 420)),
    },
}
LOAD_LORA = {
    "title": "selfperc_load_lora_compare",
    "note": ("Load a LoRA saved by the fine-tune node with core LoraLoader and compare it with the base model "
             "from identical noise, without guidance.\n\nPick the checkpoint it was trained on and the LoRA "
             "(models/loras/selfperc/...)."),
    "nodes": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 120), (320, 100)),
        2: ("LoraLoaderModelOnly", {"model": (1, 0), "lora_name": "selfperc/selfperc_lora.safetensors",
                                    "strength_model": 1.0}, (400, 120), (320, 90)),
        3: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 4}, (40, 280), (320, 110)),
        4: ("SelfPerceptualSampler", {"model": (2, 0), "base_model": (1, 0), "latent": (3, 0), "vae": (1, 2),
                                      "steps": 30}, (760, 120), (340, 380)),
        5: ("SaveImage", {"images": (4, 1), "filename_prefix": "selfperc/lora_compare"}, (1140, 120), (420, 460)),
    },
}
EVALUATE = {
    "title": "selfperc_evaluate",
    "note": ("Did the fine-tune help on YOUR data? Base and fine-tuned (base + the LoRA) sample from identical "
             "noise without guidance; each is compared with a dataset folder by Fréchet and kernel distances in "
             "the frozen base model's own features (lower is better), with their spread over resamples.\n\n"
             "1. Pick the checkpoint the LoRA was trained on, the LoRA, and a folder of held-out images in input/.\n"
             "2. For an honest baseline, also train the same LoRA with plain MSE (a Self-Perceptual Objective node "
             "with perceptual_weight 0, mse_weight 1) and connect it as baseline_model. Connect Load CLIP Vision "
             "for distances in CLIP embeddings too.\n"
             "A difference whose interval contains 0 is noise: sample more (sample_count) before concluding."),
    "nodes": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 120), (320, 100)),
        2: ("LoraLoaderModelOnly", {"model": (1, 0), "lora_name": "selfperc/selfperc_lora.safetensors",
                                    "strength_model": 1.0}, (40, 280), (320, 90)),
        3: ("SelfPerceptualEvaluate", {"base_model": (1, 0), "model": (2, 0), "vae": (1, 2),
                                       "dataset_folder": "my_dataset", "resolution": 512}, (400, 120), (360, 600)),
        4: ("SaveImage", {"images": (3, 0), "filename_prefix": "selfperc/evaluation"}, (800, 120), (520, 300)),
        5: ("SaveImage", {"images": (3, 2), "filename_prefix": "selfperc/evaluation_samples"}, (800, 460),
            (520, 420)),
    },
}
REAL_IMAGE_AB = {
    "title": "selfperc_real_image_ab",
    "note": ("A/B on a real image, base vs fine-tuned from identical noise, no guidance.\n\n"
             "mode sample + denoise < 1: SDEdit (the image is noised to that strength and denoised by each "
             "model; denoise 0 returns it unchanged). mode ilvr: the image's coarse layout (ilvr_factor, "
             "ilvr_weight) guides sampling from noise. mode invert: the image is inverted to noise with the base "
             "model's deterministic ODE and reconstructed by each model (steps 50+ for a close reconstruction).\n"
             "Pick the checkpoint, the LoRA and an image (LoadImage uploads into input/)."),
    "nodes": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 120), (320, 100)),
        2: ("LoraLoaderModelOnly", {"model": (1, 0), "lora_name": "selfperc/selfperc_lora.safetensors",
                                    "strength_model": 1.0}, (40, 280), (320, 90)),
        3: ("LoadImage", {"image": "example.png"}, (40, 420), (320, 320)),
        4: ("VAEEncode", {"pixels": (3, 0), "vae": (1, 2)}, (400, 420), (200, 50)),
        5: ("SelfPerceptualSampler", {"model": (2, 0), "base_model": (1, 0), "latent": (4, 0), "vae": (1, 2),
                                      "steps": 30, "denoise": 0.6}, (640, 120), (340, 480)),
        6: ("SaveImage", {"images": (5, 1), "filename_prefix": "selfperc/real_image_ab"}, (1020, 120),
            (420, 460)),
    },
}


def _edit(title: str, note: str, method: str, null_text: bool) -> dict:
    """Real photo -> inversion (-> Null-text Inversion) -> three replays through core SamplerCustomAdvanced:
    the reconstruction with the source prompt, the edit on the base model, the edit on base + LoRA."""
    inv = (9, 0) if null_text else (8, 0)
    nodes = {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 120), (320, 100)),
        2: ("LoraLoaderModelOnly", {"model": (1, 0), "lora_name": "selfperc/selfperc_lora.safetensors",
                                    "strength_model": 1.0}, (40, 280), (320, 90)),
        3: ("LoadImage", {"image": "example.png"}, (40, 420), (320, 320)),
        4: ("VAEEncode", {"pixels": (3, 0), "vae": (1, 2)}, (400, 420), (200, 50)),
        5: ("CLIPTextEncode", {"clip": (1, 1), "text": "a photo of a cat"}, (400, 520), (320, 100)),
        6: ("CLIPTextEncode", {"clip": (1, 1), "text": ""}, (400, 660), (320, 100)),
        7: ("CLIPTextEncode", {"clip": (1, 1), "text": "a photo of a tiger"}, (400, 800), (320, 100)),
        8: ("SelfPerceptualInvert", {"model": (1, 0), "latent": (4, 0), "positive": (5, 0), "negative": (6, 0),
                                     "steps": 50}, (760, 120), (320, 200)),
        10: ("SelfPerceptualInversionGuider", {"model": (1, 0), "inversion": inv, "positive": (5, 0),
                                               "method": method, "cfg": 7.5}, (1120, 120), (320, 150)),
        11: ("SelfPerceptualInversionGuider", {"model": (1, 0), "inversion": inv, "positive": (7, 0),
                                               "method": method, "cfg": 7.5}, (1120, 310), (320, 150)),
        12: ("SelfPerceptualInversionGuider", {"model": (2, 0), "inversion": inv, "positive": (7, 0),
                                               "method": method, "cfg": 7.5}, (1120, 500), (320, 150)),
        13: ("KSamplerSelect", {"sampler_name": "euler"}, (1120, 690), (320, 60)),
        14: ("DisableNoise", {}, (1120, 790), (320, 40)),
    }
    if null_text:
        nodes[9] = ("SelfPerceptualNullTextInversion", {"model": (1, 0), "inversion": (8, 0), "cfg": 7.5},
                    (760, 360), (320, 200))
    for k, g in enumerate((10, 11, 12)):
        nodes[15 + k] = ("SamplerCustomAdvanced", {"noise": (14, 0), "guider": (g, 0), "sampler": (13, 0),
                                                   "sigmas": (8, 2), "latent_image": (8, 1)},
                         (1480, 120 + 220 * k), (300, 180))
        nodes[18 + k] = ("VAEDecode", {"samples": (15 + k, 0), "vae": (1, 2)}, (1820, 120 + 220 * k), (200, 50))
    nodes[21] = ("ImageBatch", {"image1": (18, 0), "image2": (19, 0)}, (2060, 120), (200, 50))
    nodes[22] = ("ImageBatch", {"image1": (21, 0), "image2": (20, 0)}, (2060, 220), (200, 50))
    nodes[23] = ("SaveImage", {"images": (22, 0), "filename_prefix": f"selfperc/{title}"}, (2300, 120), (420, 460))
    return {"title": title, "note": note, "nodes": dict(sorted(nodes.items()))}


_EDIT_COMMON = ("Pick the checkpoint, your LoRA (for the A/B) and a photo; write what the photo shows as the source "
                "prompt (the top text box), and the edit as the target prompt (the third). The saved batch is: "
                "reconstruction (source prompt) | edit with the base model | edit with base + LoRA, all from the "
                "same inversion. The replays need the Invert node's sigmas and noise latent and KSamplerSelect "
                "'euler' or 'ddim' (other samplers are refused); DisableNoise is there because SamplerCustomAdvanced "
                "asks for a NOISE, which the guider does not use.")
NULL_TEXT_EDIT = _edit(
    "selfperc_null_text_edit",
    "Null-text Inversion (Mokady et al.): the photo is DDIM-inverted at cfg 1 (the pivot), then the negative "
    "prompt's embedding is fitted per step so that sampling at cfg 7.5 retraces it (50 steps x up to 10 Adam "
    "updates, each one unconditional forward + backward). The node shows the reconstruction error beside plain DDIM "
    "inversion's at the same cfg.\n\n" + _EDIT_COMMON, "null-text", True)
DIRECT_EDIT = _edit(
    "selfperc_direct_inversion_edit",
    "Direct Inversion (Ju et al., PnP inversion): no optimisation. At every step the source branch's error "
    "against the inversion is measured and corrected, and the target branch gets the same correction, so the "
    "source prompt returns the photo to float rounding at any cfg and a target prompt edits it (two guided evaluations per "
    "step).\n\n" + _EDIT_COMMON, "direct", False)


def _p2p(title: str, note: str, photo: bool, guider: str = "SelfPerceptualPromptToPrompt") -> dict:
    """Prompt-to-Prompt or Pix2Pix-Zero through core SamplerCustomAdvanced: the saved batch is sources then
    edits, and the attention-map grid beside it. With a photo: Invert Image's noise, sigmas and the euler sampler."""
    nodes = {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 120), (320, 100)),
        2: ("CLIPTextEncode", {"clip": (1, 1), "text": ""}, (40, 280), (320, 100)),
        3: (guider, {"model": (1, 0), "clip": (1, 1), "negative": (2, 0)}, (400, 120), (360, 520)),
        5: ("KSamplerSelect", {"sampler_name": "euler"}, (800, 120), (320, 60)),
        8: ("SamplerCustomAdvanced", {"guider": (3, 0), "sampler": (5, 0)}, (1160, 120), (300, 180)),
        9: ("VAEDecode", {"samples": (8, 0), "vae": (1, 2)}, (1500, 120), (200, 50)),
        10: ("SaveImage", {"images": (9, 0), "filename_prefix": f"selfperc/{title}"}, (1740, 120), (420, 460)),
        11: ("SelfPerceptualAttentionMaps", {"guider": (3, 0), "samples": (8, 0)}, (1160, 360), (300, 80)),
        12: ("SaveImage", {"images": (11, 0), "filename_prefix": f"selfperc/{title}_maps"}, (1500, 360),
             (620, 300)),
    }
    if photo:
        nodes[3][1].update(source_prompt="a photo of a cat", inversion=(15, 0))
        if guider == "SelfPerceptualPromptToPrompt":
            nodes[3][1].update(target_prompt="a photo of a tiger")
        nodes |= {
            13: ("LoadImage", {"image": "example.png"}, (40, 420), (320, 320)),
            14: ("VAEEncode", {"pixels": (13, 0), "vae": (1, 2)}, (40, 780), (200, 50)),
            15: ("SelfPerceptualInvert", {"model": (1, 0), "latent": (14, 0), "positive": (16, 0),
                                          "negative": (2, 0), "steps": 50}, (800, 420), (320, 200)),
            16: ("CLIPTextEncode", {"clip": (1, 1), "text": "a photo of a cat"}, (400, 700), (320, 100)),
            6: ("DisableNoise", {}, (800, 220), (320, 40)),
        }
        nodes[8][1].update(noise=(6, 0), sigmas=(15, 2), latent_image=(15, 1))
    else:
        nodes |= {
            4: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, (800, 420), (320, 110)),
            6: ("RandomNoise", {"noise_seed": 0}, (800, 220), (320, 80)),
            7: ("BasicScheduler", {"model": (1, 0), "scheduler": "normal", "steps": 50}, (800, 320), (320, 110)),
        }
        nodes[8][1].update(noise=(6, 0), sigmas=(7, 0), latent_image=(4, 0))
    return {"title": title, "note": note, "nodes": dict(sorted(nodes.items()))}


_P2P_COMMON = ("mode replace swaps words of equal token count (cat -> dog), refine adds words ('a cat' -> 'a fluffy "
               "cat'), reweight scales words ('fluffy:2'). cross_replace / self_replace: the fraction of the first "
               "steps in which the target takes the source's cross- / self-attention maps (more: closer to the "
               "source). blend_words ('cat, dog') limits the edit to where those words attend. The saved batch is "
               "the source image(s) then the edited one(s); the map grid shows where each word attended. Needs a "
               "UNet model (SD1.x, SD2.x, SDXL) and a deterministic sampler.")
P2P = _p2p("selfperc_prompt_to_prompt",
           "Prompt-to-Prompt (Hertz et al.): the source and the target prompt are sampled together from the same "
           "noise, and the target's attention is edited with the source's maps, so the image keeps its layout and "
           "only the words that changed change.\n\n" + _P2P_COMMON, False)
P2P_PHOTO = _p2p("selfperc_prompt_to_prompt_photo",
                 "Prompt-to-Prompt on a real photo: the photo is inverted (Invert Image, DDIM at cfg 1); the source "
                 "branch is put back on the inversion every step (Direct Inversion), so it returns the photo, and "
                 "the target branch edits it with the source's attention maps. Write what the photo shows as the "
                 "source prompt (in the guider and the Invert node's text box) and the edit as the target. Keep "
                 "KSamplerSelect 'euler' (or 'ddim') and the Invert node's sigmas and noise latent.\n\n"
                 + _P2P_COMMON, True)
P2P_FLUX = {
    "title": "selfperc_prompt_to_prompt_flux",
    "note": "Prompt-to-Prompt on Flux.1 (experimental): the source and the target prompt are sampled together from "
            "the same noise and the target's joint attention takes the source's image-to-text maps (the text part "
            "of each image token's attention) and, during self_replace, its image-to-image distribution. Words are "
            "T5's tokens. Flux dev is guidance-distilled: keep cfg 1 (the guidance is the model's own, 3.5). The "
            "saved batch is the source image(s) then the edited one(s); the map grid shows where each T5 token "
            "attended (the double-stream blocks). Pick your Flux.1 dev or schnell files in the three loaders. Not "
            "validated on a real Flux model here: judge the maps before trusting an edit.",
    "nodes": {
        1: ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}, (40, 120), (320, 90)),
        2: ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                               "type": "flux"}, (40, 240), (320, 130)),
        13: ("VAELoader", {"vae_name": "ae.safetensors"}, (40, 400), (320, 60)),
        14: ("CLIPTextEncode", {"clip": (2, 0), "text": ""}, (40, 500), (320, 100)),
        3: ("SelfPerceptualPromptToPrompt", {"model": (1, 0), "clip": (2, 0), "negative": (14, 0), "cfg": 1.0},
            (400, 120), (360, 520)),
        4: ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, (800, 420), (320, 110)),
        5: ("KSamplerSelect", {"sampler_name": "euler"}, (800, 120), (320, 60)),
        6: ("RandomNoise", {"noise_seed": 0}, (800, 220), (320, 80)),
        7: ("BasicScheduler", {"model": (1, 0), "scheduler": "simple", "steps": 28}, (800, 320), (320, 110)),
        8: ("SamplerCustomAdvanced", {"noise": (6, 0), "guider": (3, 0), "sampler": (5, 0), "sigmas": (7, 0),
                                      "latent_image": (4, 0)}, (1160, 120), (300, 180)),
        9: ("VAEDecode", {"samples": (8, 0), "vae": (13, 0)}, (1500, 120), (200, 50)),
        10: ("SaveImage", {"images": (9, 0), "filename_prefix": "selfperc/prompt_to_prompt_flux"}, (1740, 120),
             (420, 460)),
        11: ("SelfPerceptualAttentionMaps", {"guider": (3, 0), "samples": (8, 0)}, (1160, 360), (300, 80)),
        12: ("SaveImage", {"images": (11, 0), "filename_prefix": "selfperc/prompt_to_prompt_flux_maps"},
             (1500, 360), (620, 300)),
    },
}
P2P_FLUX["nodes"] = dict(sorted(P2P_FLUX["nodes"].items()))
_PIX2PIX_ZERO_COMMON = (
    "The edit direction is the mean embedding of the target sentences minus that of the source sentences (one "
    "sentence per line; the same sets on both sides make no edit); strength scales it. guidance moves the edit's "
    "latent towards the source's cross-attention maps before every step (one extra forward + backward per step; 0: "
    "the direction alone). The saved batch is the source image(s) then the edited one(s); the map grid shows where "
    "each word of the source prompt attended in each. The guider's second output is the edited conditioning, for "
    "any sampler. Needs a UNet model (SD1.x, SD2.x, SDXL) and KSamplerSelect 'euler' or 'ddim'.")
PIX2PIX_ZERO = _p2p(
    "selfperc_pix2pix_zero",
    "Pix2Pix-Zero (Parmar et al.): the source prompt and its edited embedding are sampled together from the same "
    "noise; cross-attention guidance keeps the edit's layout on the source's.\n\n" + _PIX2PIX_ZERO_COMMON, False,
    "SelfPerceptualPix2PixZero")
PIX2PIX_ZERO_PHOTO = _p2p(
    "selfperc_pix2pix_zero_photo",
    "Pix2Pix-Zero on a real photo: the photo is inverted (Invert Image, DDIM at cfg 1); the source branch is put "
    "back on the inversion every step (Direct Inversion), so it returns the photo, and the edit branch follows "
    "the direction with its maps guided towards the source's. Write what the photo shows as the source prompt (in "
    "the guider and the Invert node's text box). Keep KSamplerSelect 'euler' (or 'ddim') and the Invert node's "
    "sigmas and noise latent.\n\n" + _PIX2PIX_ZERO_COMMON, True, "SelfPerceptualPix2PixZero")
IMAGIC = {
    "title": "selfperc_imagic",
    "note": ("Imagic (Kawar et al.): edit one photo by fine-tuning.\n\n"
             "1. Put the photo into a folder of ComfyUI/input/ (e.g. input/imagic_photo/photo.png) and pick that "
             "folder in the fine-tune node's dataset_folder; load the same photo in LoadImage.\n"
             "2. Write the edit as the target prompt (the top text box): what the photo should become.\n"
             "3. Optimize Embedding trains the target prompt's embedding, the model frozen, until the model "
             "reconstructs the photo from it; the fine-tune node then trains a LoRA on the photo with that "
             "embedding (the Objective node here: mse_weight 1, perceptual_weight 0 = the paper's denoising loss; "
             "perceptual_weight 1, mse_weight 0 = the self-perceptual loss); ConditioningAverage moves from the "
             "optimised embedding (strength 0) towards the target (strength 1; the paper's 0.7).\n"
             "The grid: the base model | base + the LoRA, from identical noise with the interpolated prompt."),
    "nodes": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 120), (320, 100)),
        2: ("LoadImage", {"image": "example.png"}, (40, 280), (320, 320)),
        3: ("VAEEncode", {"pixels": (2, 0), "vae": (1, 2)}, (40, 640), (200, 50)),
        4: ("CLIPTextEncode", {"clip": (1, 1), "text": "a photo of a cat wearing a red hat"}, (400, 120),
            (320, 100)),
        5: ("CLIPTextEncode", {"clip": (1, 1), "text": ""}, (400, 260), (320, 100)),
        6: ("SelfPerceptualOptimizeEmbedding", {"model": (1, 0), "latent": (3, 0), "conditioning": (4, 0)},
            (400, 400), (340, 230)),
        7: ("PreviewImage", {"images": (6, 2)}, (400, 680), (340, 220)),
        8: ("SelfPerceptualFineTune", {"model": (1, 0), "vae": (1, 2), "conditioning": (6, 0), "steps": 300,
                                       "dataset_folder": "imagic_photo", "resolution": 512, "objective": (9, 0),
                                       "lora_name": "selfperc/imagic_lora"}, (800, 120), (360, 420)),
        9: ("SelfPerceptualObjective", {"perceptual_weight": 0.0, "mse_weight": 1.0}, (800, 580), (320, 380)),
        10: ("ConditioningAverage", {"conditioning_to": (4, 0), "conditioning_from": (6, 0),
                                     "conditioning_to_strength": 0.7}, (1200, 120), (320, 100)),
        11: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, (1200, 260), (320, 110)),
        12: ("SelfPerceptualSampler", {"model": (8, 0), "base_model": (1, 0), "latent": (11, 0), "positive": (10, 0),
                                       "negative": (5, 0), "vae": (1, 2), "cfg": 7.5, "steps": 30},
             (1560, 120), (340, 380)),
        13: ("SaveImage", {"images": (12, 1), "filename_prefix": "selfperc/imagic"}, (1940, 120), (420, 460)),
    },
}
DIFFUSION_CLIP = {
    "title": "selfperc_diffusion_clip",
    "note": ("DiffusionCLIP (Kim et al.): fine-tune a LoRA that moves images from the source text towards the "
             "target text, then edit a photo with it.\n\n"
             "1. Put the images to learn the edit on into a folder of ComfyUI/input/ (e.g. input/diffusionclip_photos/, "
             "a few of one kind: faces, cats, ...) and pick it in dataset_folder.\n"
             "2. Write what they are (source) and what they should become (target).\n"
             "3. Each step inverts an image to t0 with the frozen model, rolls the LoRA model back out in "
             "rollout_steps, and scores every step: 1 - cos(image change, text change), plus the identity term "
             "(the Objective's perceptual_weight: the self-perceptual distance to the image). space 'denoiser' needs "
             "nothing more; 'clip' (SD2.x, SDXL) needs Load CLIP Vision (ViT-H/14, ViT-bigG/14) into the Direction "
             "node.\n"
             "4. The sampler inverts the photo to the same level (denoise = t0, scheduler normal) with the base model "
             "and generates from there with each model: input | base | base + the LoRA."),
    "nodes": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 120), (320, 100)),
        2: ("CLIPTextEncode", {"clip": (1, 1), "text": "a photo of a cat"}, (40, 280), (320, 100)),
        3: ("CLIPTextEncode", {"clip": (1, 1), "text": "a photo of a tiger"}, (40, 420), (320, 100)),
        4: ("SelfPerceptualDirection", {"source": (2, 0), "target": (3, 0), "t0": 0.5, "rollout_steps": 6},
            (400, 120), (340, 230)),
        5: ("SelfPerceptualObjective", {"direction": (4, 0)}, (400, 390), (320, 380)),
        6: ("SelfPerceptualFineTune", {"model": (1, 0), "vae": (1, 2), "steps": 200,
                                       "dataset_folder": "diffusionclip_photos", "resolution": 512,
                                       "objective": (5, 0), "lora_name": "selfperc/diffusionclip_lora"},
            (780, 120), (360, 420)),
        7: ("PreviewImage", {"images": (6, 4)}, (780, 580), (360, 260)),
        8: ("LoadImage", {"image": "example.png"}, (1180, 420), (320, 320)),
        9: ("VAEEncode", {"pixels": (8, 0), "vae": (1, 2)}, (1180, 780), (200, 50)),
        10: ("SelfPerceptualSampler", {"model": (6, 0), "base_model": (1, 0), "latent": (9, 0), "positive": (2, 0),
                                       "vae": (1, 2), "steps": 20, "denoise": 0.5, "mode": "invert"},
             (1180, 120), (340, 280)),
        11: ("SaveImage", {"images": (10, 1), "filename_prefix": "selfperc/diffusion_clip"}, (1560, 120),
             (420, 460)),
    },
}
UPSCALER = "x4-upscaler-ema.safetensors"
SUPER_RESOLUTION = {
    "title": "selfperc_super_resolution",
    "note": ("Super-resolution (SR3 / CDM): fine-tune the SD x4 upscaler with the self-perceptual loss on your own "
             "high-res images, measure it on held-out ones, and use it in a cascade.\n\n"
             "1. Load the SD x4 upscaler (x4-upscaler-ema.safetensors) in the top loader.\n"
             "2. Put high-res images (at least resolution x resolution each) into a folder of ComfyUI/input/ "
             "(e.g. input/highres_photos/) and pick it in the fine-tune's dataset_folder; put other ones into a second "
             "folder for Upscale Evaluate. Each training step averages an image down 4x and degrades it afresh "
             "(the Super-Resolution node: blur, JPEG, CDM's noise augmentation).\n"
             "3. The same run with the Objective's perceptual_weight 0 and mse_weight 1 is the plain-MSE baseline; "
             "connect its LoRA model to the evaluator's baseline_model.\n"
             "4. Cascade: the base model (bottom loader) makes an image, SD_4XUpscale_Conditioning turns it into the "
             "upscaler's input, and the sampler upscales it with the base upscaler and with the fine-tuned one from "
             "the same noise: base | fine-tuned."),
    "nodes": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": UPSCALER}, (40, 120), (320, 100)),
        2: ("SelfPerceptualSuperResolution", {"noise_augmentation_max": 0.2}, (40, 260), (320, 130)),
        3: ("SelfPerceptualObjective", {"super_resolution": (2, 0)}, (40, 430), (320, 380)),
        4: ("SelfPerceptualFineTune", {"model": (1, 0), "vae": (1, 2), "clip": (1, 1), "steps": 500,
                                       "dataset_folder": "highres_photos", "resolution": 512, "objective": (3, 0),
                                       "lora_name": "selfperc/upscaler_lora"}, (400, 120), (360, 420)),
        5: ("PreviewImage", {"images": (4, 4)}, (400, 580), (360, 260)),
        6: ("SelfPerceptualUpscaleEvaluate", {"base_model": (1, 0), "model": (4, 0), "vae": (1, 2),
                                              "dataset_folder": "highres_held_out", "resolution": 512,
                                              "positive": (17, 0), "negative": (17, 0)},
            (800, 120), (360, 420)),
        7: ("PreviewImage", {"images": (6, 2)}, (800, 580), (360, 260)),
        8: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, (40, 880), (320, 100)),
        9: ("CLIPTextEncode", {"clip": (8, 1), "text": "a photo of a cat"}, (40, 1020), (320, 100)),
        10: ("EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 1}, (40, 1160), (320, 110)),
        11: ("KSampler", {"model": (8, 0), "positive": (9, 0), "negative": (9, 0), "latent_image": (10, 0),
                          "steps": 20, "cfg": 1.0}, (400, 880), (320, 260)),
        12: ("VAEDecode", {"samples": (11, 0), "vae": (8, 2)}, (400, 1180), (200, 50)),
        13: ("CLIPTextEncode", {"clip": (1, 1), "text": "a photo of a cat"}, (760, 880), (320, 100)),
        14: ("SD_4XUpscale_Conditioning", {"images": (12, 0), "positive": (13, 0), "negative": (13, 0),
                                           "scale_ratio": 4.0, "noise_augmentation": 0.2}, (760, 1020), (320, 150)),
        15: ("SelfPerceptualSampler", {"model": (4, 0), "base_model": (1, 0), "latent": (14, 2), "positive": (14, 0),
                                       "negative": (14, 1), "vae": (1, 2), "steps": 20}, (1120, 880), (340, 380)),
        16: ("SaveImage", {"images": (15, 1), "filename_prefix": "selfperc/upscaled"}, (1500, 880), (420, 460)),
        17: ("CLIPTextEncode", {"clip": (1, 1), "text": ""}, (1200, 120), (320, 100)),
    },
}
SPECS = [FINE_TUNE, DISTANCE, LOAD_LORA, EVALUATE, REAL_IMAGE_AB, NULL_TEXT_EDIT, DIRECT_EDIT, P2P, P2P_PHOTO, P2P_FLUX,
         PIX2PIX_ZERO, PIX2PIX_ZERO_PHOTO, IMAGIC, DIFFUSION_CLIP,
         SUPER_RESOLUTION]


def _inputs(spec: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) in ComfyUI's order: required, then optional."""
    out = []
    for group in ("required", "optional"):
        for name, val in spec["input"].get(group, {}).items():
            typ, opts = val[0], (val[1] if len(val) > 1 else {})
            out.append((name, "COMBO" if isinstance(typ, list) else typ, opts))
    return out


def has_control(name: str, typ: str, opts: dict) -> bool:
    """Whether the frontend adds a 'control after generate' widget (and saves its value) after this input.

    The frontend adds one for INT inputs that ask for it, and for any INT named seed / noise_seed by default.
    """
    if typ != "INT":
        return False
    return bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))


def _default(typ: str, opts: dict, raw):
    if "default" in opts:
        return opts["default"]
    if typ == "COMBO":
        options = raw if isinstance(raw, list) else opts.get("options", [])
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ)


def build(spec: dict, object_info: dict) -> dict:
    """A UI-format workflow (what ComfyUI's Save writes) for one spec."""
    nodes, links = [], []
    link_id = 0
    incoming: dict[tuple[int, str], int] = {}
    outgoing: dict[tuple[int, int], list[int]] = {}
    for nid, (cls, given, pos, size) in spec["nodes"].items():
        for name, val in given.items():
            if isinstance(val, tuple):
                link_id += 1
                src, slot = val
                out_type = object_info[spec["nodes"][src][0]]["output"][slot]
                typ = next(t for n, t, _ in _inputs(object_info[cls]) if n == name)
                links.append([link_id, src, slot, nid, None, out_type])
                incoming[(nid, name)] = link_id
                outgoing.setdefault((src, slot), []).append(link_id)
    for order, (nid, (cls, given, pos, size)) in enumerate(spec["nodes"].items()):
        info = object_info[cls]
        inputs, widgets = [], []
        for name, typ, opts in _inputs(info):
            raw = (info["input"].get("required", {}) | info["input"].get("optional", {}))[name][0]
            if typ in WIDGET_TYPES:
                value = given.get(name, _default(typ, opts, raw))
                widgets.append(value)
                if has_control(name, typ, opts):
                    widgets.append("fixed")
                inputs.append({"name": name, "type": typ if typ != "COMBO" else "COMBO", "widget": {"name": name},
                               "link": None})
            elif (nid, name) in incoming:
                inputs.append({"name": name, "type": typ, "link": incoming[(nid, name)]})
            else:
                inputs.append({"name": name, "type": typ, "link": None, "shape": 7})
        # UI slot index of linked inputs
        for slot, inp in enumerate(inputs):
            if inp["link"] is not None:
                next(lk for lk in links if lk[0] == inp["link"])[4] = slot
        inputs = [i for i in inputs if "widget" not in i or i["link"] is not None] + \
                 [i for i in inputs if "widget" in i and i["link"] is None]
        outputs = [{"name": n, "type": t, "links": outgoing.get((nid, s), []), "slot_index": s}
                   for s, (t, n) in enumerate(zip(info["output"], info["output_name"]))]
        nodes.append({"id": nid, "type": cls, "pos": list(pos), "size": list(size), "flags": {}, "order": order,
                      "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": cls}, "widgets_values": widgets})
    note_id = max(spec["nodes"]) + 1
    nodes.append({"id": note_id, "type": "Note", "pos": [40, -200], "size": [720, 260], "flags": {},
                  "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                  "widgets_values": [spec["note"]], "color": "#432", "bgcolor": "#653"})
    # links' to_slot must index the node's inputs list as saved
    by_id = {n["id"]: n for n in nodes}
    for lk in links:
        lk[4] = next(i for i, inp in enumerate(by_id[lk[3]]["inputs"]) if inp["link"] == lk[0])
    return {"last_node_id": note_id, "last_link_id": link_id, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def to_api(workflow: dict, object_info: dict) -> dict:
    """UI format -> API format, as the frontend's graphToPrompt does (notes and bypassed nodes dropped)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        cls = node["type"]
        if cls not in object_info or node.get("mode", 0) in (2, 4):
            continue
        values = list(node.get("widgets_values", []))
        linked = {inp["name"]: links[inp["link"]] for inp in node.get("inputs", []) if inp.get("link") is not None}
        inputs = {}
        for name, typ, opts in _inputs(object_info[cls]):
            if typ in WIDGET_TYPES:
                value = values.pop(0) if values else None
                if has_control(name, typ, opts) and values:
                    values.pop(0)
                if name not in linked and value is not None:
                    inputs[name] = value
            if name in linked:
                lk = linked[name]
                inputs[name] = [str(lk[1]), lk[2]]
        prompt[str(node["id"])] = {"class_type": cls, "inputs": inputs}
    return prompt


def set_widgets(prompt: dict, **values) -> dict:
    """Set widget inputs by name across an API-format prompt (what a user sets: checkpoint, folder, sizes)."""
    for node in prompt.values():
        for key, val in values.items():
            if key in node["inputs"] and not isinstance(node["inputs"][key], list):
                node["inputs"][key] = val
    return prompt


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        srv = ComfyServer(Path(tmp)).start()
        try:
            info = srv.get("/object_info")
        finally:
            srv.stop()
    WORKFLOWS.mkdir(exist_ok=True)
    for spec in SPECS:
        path = WORKFLOWS / f"{spec['title']}.json"
        path.write_text(json.dumps(build(spec, info), indent=2) + "\n")
        print(path.relative_to(REPO_ROOT), file=sys.stderr)


if __name__ == "__main__":
    main()
