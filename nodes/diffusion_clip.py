"""DiffusionCLIP (Kim et al. 2022) as a mode of the fine-tune: the Direction a Self-Perceptual Direction node gives
the Objective node, its checks, and what a run hands the core's directional loss (each image's inversion to t0, the
two texts' model inputs, the direction space).

Spaces: ``denoiser`` (no extra model): the text direction is the frozen model's own prediction change between the
target and the source text at the rollout's point, the image change x0_hat - x0 in latent space. ``clip``: both in a
CLIP's joint space, the text change from the conditionings' pooled outputs, the image change from a connected
CLIP_VISION on the decoded images; only families whose pooled text output ComfyUI projects into that space.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import comfy.model_management
import torch

from ..selfperc_core.adapter import OutOfPlace
from ..selfperc_core.directional import (
    DIRECTION_SPACES,
    DirectionalConfig,
    Rollout,
    check_rollout,
    clip_input,
    directional_loss_parts,
    invert,
    normalized,
    rollout_sigmas,
)
from ..selfperc_core.model_view import default_t_range
from . import bridge, inputs

# The families whose CONDITIONING's pooled_output is the text encoder's projected embedding (sd1_clip's
# return_projected_pooled) with the projection in the checkpoint, i.e. in the joint space of the CLIP that encoder
# belongs to; that CLIP's vision tower is the CLIP_VISION to connect. Flux, SD3, HiDream, Hunyuan: an unprojected
# or concatenated pooled vector.
CLIP_SPACES = {"SD20": "OpenCLIP ViT-H/14 (image_embeds 1024, e.g. clip_vision_h)",
               "SDXL": "OpenCLIP ViT-bigG/14 (image_embeds 1280, e.g. clip_vision_g)"}
# SD1.x checkpoints carry no text_projection for CLIP-L (the UNet never reads the pooled output); ComfyUI leaves that
# layer as allocated, so the pooled output is not a CLIP embedding.
NO_PROJECTION = {"SD15"}


@dataclass(frozen=True, eq=False)
class Direction:
    """DiffusionCLIP's edit: from the ``source`` text towards the ``target`` text (SELFPERC_DIRECTION)."""
    source: list
    target: list
    space: str = "denoiser"
    t0: float = 0.5
    rollout_steps: int = 6
    direction_weight: float = 1.0
    clip_vision: object = None
    inversion_steps: int = 40  # DiffusionCLIP's: a finer inversion than the rollout, so the start is the image's

    def validate(self) -> "Direction":
        if self.space not in DIRECTION_SPACES:
            raise ValueError(f"unknown direction space {self.space!r}; choose one of {DIRECTION_SPACES}")
        check_rollout(self.t0, self.rollout_steps)
        check_rollout(self.t0, self.inversion_steps, what="inversion_steps")
        DirectionalConfig(direction_weight=self.direction_weight).validate()
        for name in ("source", "target"):
            cond = getattr(self, name)
            if len(cond) != 1:
                raise ValueError(f"the {name} conditioning has {len(cond)} entries; the direction takes one "
                                 "prompt's conditioning each (one CLIPTextEncode)")
            if not torch.isfinite(cond[0][0]).all():
                raise ValueError(f"the {name} conditioning has NaN or Inf values")
        if _same(self.source, self.target):
            raise ValueError("the source and target conditionings are identical: there is no direction to edit along")
        if self.space == "clip" and self.clip_vision is None:
            raise ValueError("direction space 'clip' needs a CLIP_VISION connected (the vision tower of the CLIP the "
                             "model's text encoder belongs to); 'denoiser' needs none")
        return self


def _same(a: list, b: list) -> bool:
    ta, tb = a[0][0], b[0][0]
    pa, pb = a[0][1].get("pooled_output"), b[0][1].get("pooled_output")
    same_tokens = ta.shape == tb.shape and torch.equal(ta, tb)
    same_pooled = (pa is None and pb is None) or (pa is not None and pb is not None and pa.shape == pb.shape
                                                  and torch.equal(pa, pb))
    return same_tokens and same_pooled


def clip_family(model) -> str | None:
    """The CLIP_SPACES key of the model's family (its config class or a base of it), or None."""
    for cls in type(model.model.model_config).__mro__:
        if cls.__name__ in CLIP_SPACES:
            return cls.__name__
    return None


def clip_width(clip_vision) -> int:
    """The width of a CLIP_VISION's image_embeds (its visual projection); refuses encoders that are not CLIP."""
    import comfy.clip_model

    model = getattr(clip_vision, "model", None)
    siglip = getattr(clip_vision, "return_all_hidden_states", False)  # how ComfyUI marks its SigLIP towers
    if not isinstance(model, comfy.clip_model.CLIPVisionModelProjection) or siglip:
        kind = "SigLIP" if siglip else type(model).__name__
        raise ValueError(f"the CLIP_VISION is a {kind} model, not a CLIP vision tower: its embeddings are not in a "
                         "CLIP text encoder's space")
    projection = getattr(model, "visual_projection", None)
    if not isinstance(projection, torch.nn.Module):
        raise ValueError("the CLIP_VISION has no visual projection: its embeddings are not in a text encoder's space")
    return int(projection.weight.shape[0])


def check(direction: Direction, model) -> None:
    """Every rule that needs the model, before any work: t0 inside the levels the model is trained on, and for
    'clip' a family and a CLIP_VISION of one joint space."""
    d = direction.validate()
    t_max = default_t_range(bridge.parameterization(bridge.model_sampling(model)))[1]
    check_rollout(d.t0, d.rollout_steps, t_max)
    if d.space != "clip":
        return
    family = clip_family(model)
    name = type(model.model.model_config).__name__
    if any(c.__name__ in NO_PROJECTION for c in type(model.model.model_config).__mro__):
        raise ValueError(f"direction space 'clip' is not available for {name}: SD1.x checkpoints carry no text "
                         "projection for CLIP-L, so the conditioning's pooled output is not a CLIP embedding; use the "
                         "'denoiser' space")
    if family is None:
        raise ValueError(f"direction space 'clip' is not available for {name}: its pooled text output is not a CLIP "
                         f"embedding (supported: {', '.join(f'{k} with {v}' for k, v in CLIP_SPACES.items())}); use "
                         "the 'denoiser' space")
    width = clip_width(d.clip_vision)
    for which in ("source", "target"):
        pooled = getattr(d, which)[0][1].get("pooled_output")
        if pooled is None:
            raise ValueError(f"the {which} conditioning has no pooled_output (encode it with the model's CLIP "
                             "text encoder) for the 'clip' direction space")
        if pooled.shape[-1] != width:
            raise ValueError(f"the CLIP_VISION's space does not match the text encoder's: its image_embeds are "
                             f"{width} wide, the {which} conditioning's pooled output {pooled.shape[-1]}; {name} "
                             f"needs {CLIP_SPACES[family]}")


@dataclass
class Item:
    """One image's inputs to the directional loss."""
    source: dict           # the model inputs of the source text
    target: dict           # ... of the target text
    start: torch.Tensor    # the image inverted to t0 (C, ...)
    ref: torch.Tensor | None = None  # its CLIP image embedding ('clip' space)


@dataclass
class Batch:
    source: dict
    target: dict
    start: torch.Tensor
    ref: torch.Tensor | None


def metadata(direction: Direction) -> dict:
    return {"selfperc_objective": "directional (DiffusionCLIP, Kim et al. 2022) with the self-perceptual distance "
                                  "as its identity term", "direction_space": direction.space, "t0": direction.t0,
            "rollout_steps": direction.rollout_steps, "inversion_steps": direction.inversion_steps,
            "direction_weight": direction.direction_weight}


RESUMED_KEYS = ("direction_space", "t0", "rollout_steps", "inversion_steps", "direction_weight")


def check_resume(meta: dict, direction: Direction | None, name: str) -> None:
    """A run resumes only in the mode it was started in: a directional LoRA directionally, with the same space, t0,
    steps and weight (read from the LoRA's metadata), a self-perceptual one without a direction."""
    was = str(meta.get("selfperc_objective", "")).startswith("directional")
    if was != (direction is not None):
        raise ValueError(f"{name} was trained {'with' if was else 'without'} a direction (DiffusionCLIP); resume it "
                         f"{'with the same' if was else 'without a'} Self-Perceptual Direction")
    if direction is None:
        return
    now = metadata(direction)
    changed = [f"{k} {meta.get(k)} -> {now[k]}" for k in RESUMED_KEYS if str(meta.get(k)) != str(now[k])]
    if changed:
        raise ValueError(f"{name} was trained with another direction ({', '.join(changed)}); resume it with the "
                         "settings it was started with")


class ImageEmbedder:
    """Latents (the model's space) -> CLIP image embeddings, differentiably: decode with the VAE, resize and
    normalise as CLIP expects (not ComfyUI's clip_preprocess, which rounds to 8 bits: no gradient), the vision tower."""

    def __init__(self, model_patcher, vae, clip_vision):
        self.mp, self.vae, self.cv = model_patcher, vae, clip_vision

    def __call__(self, x0_hat: torch.Tensor) -> torch.Tensor:
        vae, cv = self.vae, self.cv
        z = self.mp.model.process_latent_out(x0_hat)
        first = next(vae.first_stage_model.parameters())
        # in the VAE's own dtype, not the run's autocast (SDXL's VAE overflows in fp16); ComfyUI's CLIP layers add in
        # place, which backward cannot go through
        with torch.autocast(first.device.type, enabled=False), OutOfPlace():
            images = vae.process_output(vae.first_stage_model.decode(z.to(device=first.device, dtype=vae.vae_dtype)))
            pixels = clip_input(images.float(), cv.image_size, cv.image_mean, cv.image_std)
            out = cv.model(pixel_values=pixels.to(cv.load_device), intermediate_output=-2)[2]
        return out.float().to(x0_hat.device)


def inverted_items(ses, latents: list[torch.Tensor], source: list, target: list, sigmas: torch.Tensor, embed,
                   seed: int, autocast) -> list[Item]:
    """One Item per latent: the two texts' model inputs (built once per shape) and the image inverted along
    ``sigmas`` (to sigmas[0]) with the frozen model at the source text (and its CLIP embedding, with ``embed``)."""
    view, dev = ses.view, bridge.device()
    per_shape: dict[tuple, tuple[dict, dict]] = {}
    items = []
    for lat in latents:
        shape = tuple(lat.shape)
        if shape not in per_shape:
            per_shape[shape] = (inputs.model_inputs(ses.mp, source, shape, seed),
                                inputs.model_inputs(ses.mp, target, shape, seed))
        src, tgt = per_shape[shape]
        x0 = lat[None].to(dev)
        c = view.collate([src])
        with torch.no_grad(), ses.switch.off(), autocast():
            start = invert(lambda x, s: view.predict_x0(x, s.reshape(1).to(dev), c), x0, sigmas.to(dev))
            ref = normalized(embed(x0)).cpu()[0] if embed is not None else None
        items.append(Item(src, tgt, start[0].float().cpu(), ref))
    return items


def collate_fn(view):
    def collate(batch: list[Item]) -> Batch:
        return Batch(view.collate([i.source for i in batch]), view.collate([i.target for i in batch]),
                     torch.stack([i.start for i in batch]),
                     None if batch[0].ref is None else torch.stack([i.ref for i in batch]))
    return collate


def make_objective(ses, sigmas: torch.Tensor, config: DirectionalConfig, native_mse: bool, embed=None,
                   text: torch.Tensor | None = None):
    """The core Trainer's objective: (x0, eps, sigma, sigma', Batch) -> the directional loss's parts; the denoiser
    space without ``embed``, else the CLIP space with the fixed text change ``text``."""
    view = ses.view

    def objective(x0, eps, sigma, sigma_p, b: Batch, backward=None):
        if embed is None:
            def text_direction(x, s):
                with ses.switch.off():
                    return view.predict_x0(x, s, b.target) - view.predict_x0(x, s, b.source)

            def image_change(x0_hat):
                return x0_hat - x0
        else:
            def text_direction(x, s):
                return text

            def image_change(x0_hat):
                return normalized(embed(x0_hat)) - b.ref.to(x0_hat.device)
        rollout = Rollout(b.start.to(x0), sigmas.to(x0.device), image_change, text_direction)
        return directional_loss_parts(
            lambda x, s: view.predict_x0(x, s, b.source), lambda x, s: view.frozen_features(x, s, b.source),
            view.noise_scaling, x0, eps, sigma_p, rollout, config, view.output_scale if native_mse else None,
            backward)
    return objective


@contextlib.contextmanager
def prepared(direction: Direction, ses, latents: list[torch.Tensor], vae, config: DirectionalConfig, seed: int,
             native_mse: bool, autocast, guidance: float = 0.0):
    """(the objective for the core Trainer, the view it collates through, one Item per latent); for 'clip', the VAE
    and CLIP_VISION made differentiable (their weights frozen) for the run."""
    from .session import frozen_weights, make_trainable_tensors

    sigmas = rollout_sigmas(ses.view.sigma_of_t, direction.t0, direction.rollout_steps)
    source, target = (inputs.with_guidance(c, guidance) for c in (direction.source, direction.target))
    with contextlib.ExitStack() as stack:
        embed = text = None
        if direction.space == "clip":
            cv = direction.clip_vision
            comfy.model_management.load_models_gpu([ses.mp, vae.patcher, cv.patcher])
            for module in (vae.first_stage_model, cv.model):
                make_trainable_tensors(module)  # loaded under inference mode: autograd cannot save those weights
                stack.enter_context(frozen_weights(module))
            embed = ImageEmbedder(ses.mp, vae, cv)
            pooled = [c[0][1]["pooled_output"].float().reshape(1, -1).to(bridge.device()) for c in (source, target)]
            text = normalized(pooled[1]) - normalized(pooled[0])
        inversion = rollout_sigmas(ses.view.sigma_of_t, direction.t0, direction.inversion_steps)
        items = inverted_items(ses, latents, source, target, inversion, embed, seed, autocast)
        yield (make_objective(ses, sigmas, config, native_mse, embed, text),
               dataclasses.replace(ses.view, collate=collate_fn(ses.view)), items)


def config_of(objective, direction: Direction) -> DirectionalConfig:
    """The directional loss's weights from the Objective node: perceptual_weight weighs the identity term (the
    self-perceptual distance), mse_weight the MSE to the image, distance / normalize_features the identity's D."""
    cfg = DirectionalConfig(direction_weight=direction.direction_weight, identity_weight=objective.perceptual_weight,
                            mse_weight=objective.mse_weight, distance=objective.distance,
                            normalize=objective.normalize_features)
    return cfg.validate()
