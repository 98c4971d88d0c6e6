"""The demo's model, made here (no weights can be downloaded): an SD3-architecture diffusion model trained on the
handwritten digits that scikit-learn ships, small enough that a 2-core CPU trains it in a few minutes and its
unguided samples are recognisable digits.

* Data: scikit-learn's 1797 8x8 digits, drawn as 64x64 white-on-black images (``digit_images``).
* VAE: ComfyUI's TAESD architecture with 16 latent channels (what VAELoader "taesd3" builds) and hand-set
  weights: a smooth linear autoencoder (``analytic_taesd``), so 64x64 images are 8x8x16 latents.
* Text encoder: a random full-size CLIP-L (SD3's text_encoders.clip_l slot); only the empty prompt is used.
* Diffusion model: ComfyUI's MMDiT (SD3 family, rectified flow, shift 3) at depth 2 (hidden 128, 1.9M
  parameters), trained here with the plain flow-matching MSE objective on the encoded digits, unconditionally
  (the empty prompt's encoding).

All three go into one SD3-layout checkpoint that core CheckpointLoaderSimple detects as SD3.
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dev.host import import_comfy

RES = 64            # image side; latents are 8x8x16
DEPTH = 2           # MMDiT depth: hidden 64 * depth, depth heads (ComfyUI's detection rule)
SEED = 7
# Measured here (samples at cfg 1, 20 euler steps): at batch 32, 2000 steps (lr 1e-3) give blobs, 3000-4500
# (lr 1.5e-3-3e-3) half-formed digits, 6000 (lr 1e-3) mostly recognisable ones at 0.09 s a step; the number of
# steps matters more than the batch: 8000 steps of batch 16 (0.06 s a step) were as good as the 6000 of 32.
BASE_STEPS = 7000
LR = 1e-3
EMA = 0.999
BATCH = 16
NAME = "selfperc_demo_sd3.safetensors"
TRAIN_COUNT = 1200  # digits [0, 1200) train the base and the fine-tunes; the other 597 are held out
LATENT_MEAN, LATENT_GAIN = 0.31, 3.0  # the digits' mean luminance and ~1 / its std after the encoder's blur


@functools.lru_cache(maxsize=2)
def digit_images(res: int = RES) -> np.ndarray:
    """(1797, res, res, 3) uint8: scikit-learn's digits, white on black (as MNIST), smoothly upscaled; made once
    and read-only (copy before changing it)."""
    from sklearn.datasets import load_digits

    digits = load_digits().images  # (N, 8, 8), 0..16
    out = np.empty((len(digits), res, res, 3), np.uint8)
    for i, d in enumerate(digits):
        im = Image.fromarray(np.uint8(d * (255 / 16))).resize((res, res), Image.BICUBIC)
        out[i] = np.asarray(im)[..., None]
    out.setflags(write=False)
    return out


def write_digit_folder(folder: Path, count: int, offset: int = 0) -> Path:
    """PNG files digit_XXXX.png of digits [offset, offset + count) (a dataset folder for the nodes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = digit_images()
    for i in range(offset, min(offset + count, len(images))):
        path = folder / f"digit_{i:04d}.png"
        if not path.exists():
            Image.fromarray(images[i]).save(path)
    return folder


def _blur_kernel() -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    return (k[:, None] * k[None, :]) / 16


def analytic_taesd(latent_channels: int = 16):
    """ComfyUI's TAESD architecture with hand-set weights: a smooth linear autoencoder, built instantly.

    Encoder: blurred stride-2 downsampling of the colours (all signals stay >= 0, so every ReLU is the
    identity), then the luminance standardised over the digits in every latent channel: zero mean and unit
    variance, the scaled-latent convention the diffusion model sees (an offset latent trains far slower). Decoder: the mean over channels -> grey, upsampled x2 three times with a
    blur after each. Grey only and blurry, but faithful for digits; the redundant channels average the model's
    errors out. Training a real autoencoder does not fit the demo's CPU budget.
    """
    import_comfy()
    from comfy.taesd.taesd import TAESD

    vae = TAESD(latent_channels=latent_channels)
    blur = _blur_kernel()
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        enc, dec = vae.taesd_encoder, vae.taesd_decoder
        # encoder: [conv(3,64), Block, conv s2, Block x3, conv s2, Block x3, conv s2, Block x3, conv(64,C)]
        for c in range(3):
            enc[0].weight[c, c, 1, 1] = 1.0
        for i in (2, 6, 10):  # stride-2 convs: per-channel blur
            for c in range(3):
                enc[i].weight[c, c] = blur
        lum = torch.tensor([0.299, 0.587, 0.114])
        enc[14].weight[:, :3, 1, 1] = LATENT_GAIN * lum  # every channel: (luminance - mean) / std of the digits
        enc[14].bias[:] = -LATENT_GAIN * LATENT_MEAN
        # decoder: [Clamp, conv(C,64), ReLU, Block x3, Up, conv, Block x3, Up, conv, Block x3, Up, conv, Block,
        # conv(64,3)]; grey = the mean over channels, undone (the Clamp's tanh dims the brightest strokes ~10%)
        dec[1].weight[:3, :, 1, 1] = 1.0 / LATENT_GAIN / latent_channels
        dec[1].bias[:3] = LATENT_MEAN
        for i in (7, 12, 17):  # convs after each Upsample: per-channel blur
            for c in range(3):
                dec[i].weight[c, c] = blur
        for c in range(3):
            dec[19].weight[c, c, 1, 1] = 1.0
        vae.vae_scale.fill_(1.5305)  # SD3's latent format (VAELoader "taesd3" sets the same)
        vae.vae_shift.fill_(0.0609)
    return vae.eval()


def mmdit_config(depth: int = DEPTH, side: int = 16) -> dict:
    """The unet_config ComfyUI's detection derives from such a file (hidden 64 * depth)."""
    hidden = 64 * depth
    return dict(in_channels=16, out_channels=16, patch_size=2, depth=depth, input_size=None,
                adm_in_channels=768 + 1280,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": hidden}},
                num_patches=side * side, pos_embed_max_size=side, pos_embed_scaling_factor=None,
                x_block_self_attn_layers=[])


def dit_init(dm: torch.nn.Module) -> None:
    """DiT's initialisation, which makes a short training run work: SD3's fixed 2-D sin-cos position embedding
    (a buffer, never trained: random values would leave the tokens without positions) and zero-initialised
    adaLN modulations and output layer (adaLN-Zero: every block starts as the identity)."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    with torch.no_grad():
        side = int(round(dm.pos_embed.shape[1] ** 0.5))
        dm.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(dm.pos_embed.shape[-1], side)).unsqueeze(0))
        for name, mod in dm.named_modules():
            if name.endswith("adaLN_modulation") or name == "final_layer.linear":
                last = mod[-1] if isinstance(mod, torch.nn.Sequential) else mod
                last.weight.zero_()
                last.bias.zero_()


def _random_state(out: Path, seed: int) -> dict[str, torch.Tensor]:
    """SD3-layout state dict: random MMDiT, random CLIP-L (fp16), the analytic TAESD."""
    from dev.tiny_families import build_model
    from dev.tiny_models import build_clip_l

    model = build_model("SD3", mmdit_config(), seed=seed).model.diffusion_model
    dit_init(model)
    sd = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    for k, v in build_clip_l(seed).items():  # cond_stage_model.transformer.* -> SD3's clip_l slot
        sd["text_encoders.clip_l." + k.removeprefix("cond_stage_model.")] = v.half()
    sd.update({f"first_stage_model.{k}": v for k, v in analytic_taesd().state_dict().items()})
    return sd


class _SharedRow(torch.nn.Module):
    """``layer`` applied to the first row only and broadcast: exact (values and gradients) when every row of the
    input is the same, as the one empty-prompt context of unconditional training is. The 4096-wide context
    embedder on 77 tokens per sample is otherwise most of this small model's step."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x[:1]).expand(x.shape[0], *([-1] * (x.ndim - 1)))


def train_base(model_patcher, vae, cond: list, steps: int, log=print, batch: int | None = None,
               count: int = TRAIN_COUNT) -> None:
    """Plain flow-matching MSE (x0-weighted) on the encoded digits, in place, through ComfyUI's own conventions
    (process_latent_in, the model's sigma schedule and timestep, extra_conds for the pooled vector)."""
    import comfy.sampler_helpers
    import comfy.samplers

    model = model_patcher.model
    ms = model.model_sampling
    dm = model.diffusion_model
    with torch.no_grad():
        pixels = torch.tensor(digit_images()[:count]).float() / 255  # the held-out digits stay unseen
        x0_all = model.process_latent_in(vae.encode(pixels))
    extra = comfy.samplers.encode_model_conds(model.extra_conds, comfy.sampler_helpers.convert_cond(cond),
                                              x0_all[:1], torch.device("cpu"), "positive")[0]["model_conds"]
    ctx = extra["c_crossattn"].cond
    y = extra["y"].cond
    batch = batch or BATCH
    g = torch.Generator().manual_seed(SEED + 1)
    dm.train()
    embedder, dm.context_embedder = dm.context_embedder, _SharedRow(dm.context_embedder)
    for p in dm.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dm.parameters(), lr=LR, weight_decay=0.0)
    # an exponential moving average of the weights is what gets saved: it samples far better after a short run
    ema = torch.optim.swa_utils.AveragedModel(dm, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(EMA))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0 = time.time()
    for i in range(steps):
        idx = torch.randint(len(x0_all), (batch,), generator=g)
        x0 = x0_all[idx]
        sigma = ms.sigma(torch.rand(batch, generator=g) * 1000).view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        x_t = (1 - sigma) * x0 + sigma * eps
        v = dm(x_t, ms.timestep(sigma.flatten()), context=ctx.expand(batch, -1, -1), y=y.expand(batch, -1))
        # weighted by sigma^2, i.e. the MSE of the implied x0: a model this small cannot also fit the 1/sigma-
        # amplified velocity at low noise, and the unweighted loss spends it there at the cost of the high noise
        # levels where a sample's shape is decided
        loss = ((v - (eps - x0)).square() * sigma.square()).mean() / sigma.square().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dm.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(dm)
        if (i + 1) % max(1, steps // 10) == 0:
            log(f"  base model step {i + 1}/{steps}  flow-matching mse {loss.item():.4f}  ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        for p, q in zip(dm.parameters(), ema.module.parameters()):
            p.copy_(q)
    dm.context_embedder = embedder
    dm.eval()
    for p in dm.parameters():
        p.requires_grad_(False)


def build(out: Path, steps: int = BASE_STEPS, log=print) -> Path:
    """Write checkpoints/NAME (cached by name): the trained SD3-layout checkpoint."""
    import_comfy()
    import comfy.sd

    from dev.tiny_models import _save_atomic

    ckpt = Path(out) / "checkpoints" / NAME
    if ckpt.exists():
        return ckpt
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    log("[demo] building the model: SD3-architecture MMDiT (depth 2), random CLIP-L, hand-set 16-channel TAESD")
    sd = _random_state(out, SEED)
    probe = ckpt.with_name(".probe-" + NAME)
    _save_atomic(sd, probe)
    try:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(probe), output_vae=True, output_clip=True)[:3]
    finally:
        probe.unlink()
    with torch.no_grad():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    log(f"[demo] training it on scikit-learn's digits with plain flow-matching MSE ({steps} steps, batch {BATCH})")
    train_base(model, vae, cond, steps, log)
    for k, v in model.model.diffusion_model.state_dict().items():
        sd[f"model.diffusion_model.{k}"] = v.detach().clone()
    _save_atomic(sd, ckpt, {"selfperc_demo": f"SD3-architecture MMDiT depth {DEPTH} trained {steps} steps on "
                                             "scikit-learn digits; random CLIP-L; hand-set TAESD"})
    return ckpt
