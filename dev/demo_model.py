"""The demo's model, made here (no weights can be downloaded): a TAESD-shaped VAE and the tiny SD1.x UNet,
the UNet briefly trained on the real photos that scikit-image ships, so that images are recognisable (if blurry)
and the frozen network's features mean something.

* VAE: ComfyUI's own TAESD architecture with hand-set weights (a smooth linear autoencoder, see
  analytic_taesd) whose latents have about unit variance, ComfyUI's SD1 convention (raw latent * 0.18215). Written to models/vae_approx (taesd_encoder/decoder: live
  previews and VAELoader "taesd") and into the checkpoint's VAE slot.
* UNet: the tiny SD1.x UNet trained with the ordinary eps-MSE objective on those latents (unconditional:
  zero context and the empty-prompt context of the checkpoint's random CLIP).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dev.datasets import photo_path
from dev.host import import_comfy

PHOTOS = ["astronaut", "coffee", "chelsea", "camera", "rocket", "motorcycle_left", "motorcycle_right", "retina",
          "hubble_deep_field", "ihc", "brick", "grass"]
RES = 96           # demo image size (latent 12x12): what a 2-core CPU trains in a few minutes
SEED = 7


def photo_bank(size: int = 120) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: each photo resized so its short side is `size`, centre-cropped."""
    from PIL import ImageOps

    out = []
    for name in PHOTOS:
        with Image.open(photo_path(name)) as im:
            im = ImageOps.fit(im.convert("RGB"), (size, size), Image.LANCZOS)
            out.append(torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)


def random_crops(bank: torch.Tensor, n: int, g: torch.Generator, res: int = RES) -> torch.Tensor:
    idx = torch.randint(len(bank), (n,), generator=g)
    off = torch.randint(bank.shape[-1] - res + 1, (n, 2), generator=g)
    crops = torch.stack([bank[i, :, y:y + res, x:x + res] for i, (y, x) in zip(idx.tolist(), off.tolist())])
    flip = torch.rand(n, generator=g) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def _blur_kernel() -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    return (k[:, None] * k[None, :]) / 16


def analytic_taesd():
    """ComfyUI's TAESD architecture with hand-set weights: a smooth linear autoencoder, built instantly.

    Encoder: blurred stride-2 downsampling of the colours (all signals stay >= 0, so every ReLU is the
    identity), then latent = 4 * (colour - 0.5) in 3 channels plus luminance: values of about unit variance,
    ComfyUI's SD1 latent convention. Decoder: latent -> colour, upsampled x2 three times with a blur after each
    (bilinear-like). Recognisable, blurry images from 8x-downsampled latents: enough for a mechanics demo;
    training a real autoencoder does not fit a 10-minute CPU budget.
    """
    import_comfy()
    from comfy.taesd.taesd import TAESD

    vae = TAESD()
    blur = _blur_kernel()
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        enc, dec = vae.taesd_encoder, vae.taesd_decoder
        # encoder: [conv(3,64), Block, conv s2, Block x3, conv s2, Block x3, conv s2, Block x3, conv(64,4)]
        for c in range(3):
            enc[0].weight[c, c, 1, 1] = 1.0
        for i in (2, 6, 10):  # stride-2 convs: per-channel blur
            for c in range(3):
                enc[i].weight[c, c] = blur
        lum = torch.tensor([0.299, 0.587, 0.114])
        for c in range(3):
            enc[14].weight[c, c, 1, 1] = 4.0
            enc[14].weight[3, c, 1, 1] = 4.0 * lum[c]
        enc[14].bias[:] = -2.0
        # decoder: [Clamp, conv(4,64), ReLU, Block x3, Up, conv, Block x3, Up, conv, Block x3, Up, conv, Block, conv(64,3)]
        for c in range(3):
            dec[1].weight[c, c, 1, 1] = 0.25 / 0.95  # undo 4*(c-0.5), with the Clamp's tanh squashing ~5%
            dec[1].bias[c] = 0.5
        for i in (7, 12, 17):  # convs after each Upsample: per-channel blur
            for c in range(3):
                dec[i].weight[c, c] = blur
        for c in range(3):
            dec[19].weight[c, c, 1, 1] = 1.0
        vae.vae_scale.fill_(0.18215)
    return vae.eval()


def train_unet(vae, empty_context: torch.Tensor, steps: int, log=print):
    import_comfy()
    import comfy.model_sampling
    import comfy.supported_models

    from dev.tiny_models import build_unet

    unet = build_unet(seed=SEED)
    cfg = comfy.supported_models.SD15({})
    ms = comfy.model_sampling.ModelSamplingDiscrete(cfg)
    bank = photo_bank()
    g = torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 *
                                              (1 + math.cos(math.pi * s / steps)))
    t0 = time.time()
    for i in range(steps):
        with torch.no_grad():
            x0 = vae.taesd_encoder(random_crops(bank, 8, g) * 0.5 + 0.5)  # = raw latent * 0.18215
        t = torch.randint(0, 1000, (8,), generator=g)
        sigma = ms.sigmas[t]
        eps = torch.randn(x0.shape, generator=g)
        x_t = x0 + eps * sigma.view(-1, 1, 1, 1)
        ctx = torch.where((torch.rand(8, generator=g) < 0.5).view(-1, 1, 1), empty_context, 0 * empty_context)
        out = unet(x_t / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt(), t.float(), context=ctx)
        loss = (out - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if (i + 1) % max(1, steps // 5) == 0:
            log(f"  unet step {i + 1}/{steps}  mse {loss.item():.4f}  ({time.time() - t0:.0f}s)")
    return unet.eval()


def build(out: Path, unet_steps: int = 100, log=print) -> Path:
    """Write checkpoints/selfperc_demo.safetensors and vae_approx/taesd_{encoder,decoder}.safetensors."""
    import_comfy()
    import comfy.sd
    from safetensors.torch import save_file

    from dev.tiny_models import _save_atomic, build_clip_l, write_checkpoint

    ckpt = out / "checkpoints" / "selfperc_demo.safetensors"
    if ckpt.exists():
        return ckpt
    (out / "vae_approx").mkdir(parents=True, exist_ok=True)
    log("[demo] building the TAESD-shaped VAE (hand-set linear autoencoder)")
    vae = analytic_taesd()
    save_file({k: v.contiguous() for k, v in vae.taesd_encoder.state_dict().items()},
              str(out / "vae_approx" / "taesd_encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.taesd_decoder.state_dict().items()},
              str(out / "vae_approx" / "taesd_decoder.safetensors"))

    # the empty-prompt context of the checkpoint's CLIP (random CLIP-L from the seed), via ComfyUI itself
    probe = out / "checkpoints" / ".probe.safetensors"
    write_checkpoint(probe, seed=SEED)
    _, clip, _ = comfy.sd.load_checkpoint_guess_config(str(probe), output_vae=False, output_clip=True)[:3]
    with torch.no_grad():
        empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0][0].float()
    probe.unlink()

    log("[demo] training the tiny SD1.x UNet with plain MSE on the VAE's latents")
    unet = train_unet(vae, empty, unet_steps, log)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({k: v.half() for k, v in build_clip_l(SEED).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(sd, ckpt, {"selfperc_demo": "tiny SD1.x UNet + TAESD VAE trained on scikit-image photos"})
    return ckpt
