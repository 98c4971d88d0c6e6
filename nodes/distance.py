"""Perceptual Distance: where two images differ in the frozen model's feature space (a heatmap)."""
from __future__ import annotations

import comfy.model_management
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..selfperc_core.model_view import frozen_features_fn
from ..selfperc_core.objective import DISTANCES
from . import bridge, families, inputs

# A perceptually ordered colour map (dark purple -> orange -> yellow), 5 anchors interpolated.
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32) / 255


def colormap(v: torch.Tensor) -> torch.Tensor:
    """(B, H, W) values in [0, 1] -> (B, H, W, 3) colours."""
    x = v.detach().clamp(0, 1).cpu().numpy() * (len(_ANCHORS) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_ANCHORS) - 2)
    f = (x - i)[..., None]
    return torch.from_numpy(_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f)


def distance_map(fa: torch.Tensor, fb: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-location feature distance (B, h, w): channel mean of squared (mse) or absolute (mae) difference."""
    d = (fa - fb).float()
    if distance == "mse":
        return d.square().mean(1)
    if distance == "mae":
        return d.abs().mean(1)
    raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


class PerceptualDistance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfPerceptualDistance",
            display_name="Perceptual Distance (heatmap)",
            category="selfperc/analysis",
            description="Noises both images with the same noise and compares the frozen model's features.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose features define the distance (used frozen)."),
                io.Vae.Input("vae", tooltip="Encodes the images to latents."),
                io.Image.Input("image_a", tooltip="Reference image(s); the heatmap is overlaid on these."),
                io.Image.Input("image_b", tooltip="Compared image(s): same size and batch as image_a, or one."),
                io.Float.Input("noise_level", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise level as a fraction of the schedule (0 = clean, 1 = pure noise)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the shared noise."),
                io.Combo.Input("feature_layer", options=families.UNET_LAYERS, default=families.MID_BLOCK,
                               tooltip="Layer whose features are compared: mid_block (UNet mid-block, or for "
                                       "transformers the block at tap_depth) or a UNet block."),
                io.Combo.Input("distance", options=list(DISTANCES), default="mse",
                               tooltip="Per-location distance: mse or mae."),
                io.Float.Input("overlay", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="Opacity of the heatmap over image_a (1 = heatmap only)."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The model's text input while reading features (e.g. CLIPTextEncode "
                                              "with an empty text). Needed by every family but SD1.x/SD2.x."),
                io.Float.Input("tap_depth", default=families.DEFAULT_DEPTH, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Transformers: the block read, as a fraction of the block stack."),
            ],
            outputs=[
                io.Image.Output(display_name="heatmap", tooltip="Colour-mapped distance over image_a."),
                io.Float.Output(display_name="distance", tooltip="Mean feature distance over the batch."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, image_a, image_b, noise_level, seed, feature_layer, distance, overlay,
                conditioning=None, tap_depth=families.DEFAULT_DEPTH):
        if image_a.shape[1:3] != image_b.shape[1:3]:
            raise ValueError(f"image_a is {image_a.shape[2]}x{image_a.shape[1]} but image_b is "
                             f"{image_b.shape[2]}x{image_b.shape[1]}: the images must have the same size")
        if image_b.shape[0] not in (1, image_a.shape[0]):
            raise ValueError(f"image_b has {image_b.shape[0]} images; give 1 or as many as image_a "
                             f"({image_a.shape[0]})")
        tap = families.tap_point(model.model.diffusion_model, feature_layer, tap_depth)
        prompt = conditioning if conditioning is not None else families.empty_conditioning(model)
        image_b = image_b.expand(image_a.shape[0], -1, -1, -1)
        lat_a = model.model.process_latent_in(vae.encode(image_a[..., :3]).float())
        lat_b = model.model.process_latent_in(vae.encode(image_b[..., :3]).float())
        comfy.model_management.load_models_gpu([model])
        dev = model.load_device
        ms = bridge.model_sampling(model)
        t = torch.tensor([noise_level])
        sigma = bridge.sigma_of_t_fn(ms)(t).expand(lat_a.shape[0]).to(dev)
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(lat_a.shape, generator=g)
        noise_scaling = bridge.noise_scaling_fn(ms)
        x_a = noise_scaling(sigma, eps.to(dev), lat_a.to(dev))  # the same noise for both images
        x_b = noise_scaling(sigma, eps.to(dev), lat_b.to(dev))
        cond = inputs.collate([inputs.model_inputs(model, prompt, tuple(lat_a.shape[1:]), seed)] * lat_a.shape[0])
        read = frozen_features_fn(inputs.predictor(model), tap)
        with tap, torch.no_grad():
            fa, fb = read(x_a, sigma, cond), read(x_b, sigma, cond)
        dmap = distance_map(fa, fb, distance).cpu()
        scalar = float(dmap.mean())
        up = torch.nn.functional.interpolate(dmap[:, None], size=image_a.shape[1:3], mode="bilinear",
                                             align_corners=False)[:, 0]
        peak = float(up.max())
        heat = colormap(up / peak if peak > 0 else up)
        out = (overlay * heat + (1 - overlay) * image_a[..., :3].cpu().float()).clamp(0, 1)
        return io.NodeOutput(out, scalar, ui=ui.PreviewImage(out, cls=cls))
