"""Headless self-perceptual trainer on accelerate + diffusers: `python -m selfperc_headless.train ...`, and the
same under `accelerate launch` (multi-GPU, multi-node, or multi-CPU with gloo).

The model folder is a diffusers layout: unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), scheduler/
(prediction_type, rescale_betas_zero_snr) and, optionally, text_encoder/ + tokenizer/ (CLIP). The loss, the loop,
the dataset rules, the feature tap and the adapter switch are the core's; this file only wires them to diffusers,
peft and accelerate. With a text encoder, captions (name.txt) condition training: each is encoded once and
cached (captions.py); without one (or with --captions off) training is unconditional (zero text context), as
the ComfyUI node without a CLIP.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path

import torch

from selfperc_core.adapter import checkpoint_forward
from selfperc_core.dataset import RESIZE_MODES, as_float, load_dataset
from selfperc_core.features import FeatureTap
from selfperc_core.host import ModelHost, frozen_features_fn, stack_token_conds
from selfperc_core.loop import LR_SCHEDULES, OPTIMIZERS, Trainer, TrainSettings, make_optimizer
from selfperc_core.objective import DISTANCES
from selfperc_core.state import load_state_file, save_state_file
from selfperc_core.timesteps import T_PRIME_STRATEGIES
from selfperc_headless.captions import encode_captions, has_text_encoder
from selfperc_headless.diffusers_host import (
    DiffusersSchedule,
    PeftSwitch,
    comfy_lora_state_dict,
    lora_targets,
    unet_predictor,
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m selfperc_headless.train", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="diffusers model folder (unet/, vae/, scheduler/)")
    ap.add_argument("--data", type=Path, required=True, help="folder of training images")
    ap.add_argument("--out", type=Path, required=True, help="output folder (LoRA, checkpoints, log)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=1, help="per process")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--resize-mode", choices=RESIZE_MODES, default="center_crop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="full fine-tune (frozen model = a real frozen copy)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--t-prime", choices=T_PRIME_STRATEGIES, default="uniform")
    ap.add_argument("--t-prime-range", type=float, nargs=2, default=(0.0, 1.0))
    ap.add_argument("--distance", choices=DISTANCES, default="mse")
    ap.add_argument("--normalize", action="store_true")
    ap.add_argument("--mse-weight", type=float, default=0.0)
    ap.add_argument("--perceptual-weight", type=float, default=1.0,
                    help="0 with --mse-weight 1: the same run with plain MSE (the baseline to evaluate against)")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    ap.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                    help="default: accelerate's config / launch flag")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--save-every", type=int, default=0, help="resumable state every N steps (OUT/state-NNNNNN)")
    ap.add_argument("--resume", type=Path, default=None, help="a state folder written by --save-every")
    ap.add_argument("--captions", choices=["auto", "off"], default="auto",
                    help="auto: condition on captions when the model folder has text_encoder/ and tokenizer/")
    ap.add_argument("--caption-cache", type=Path, default=None,
                    help="folder of encoded captions (default OUT/caption_cache); share it between runs")
    ap.add_argument("--log-json", type=Path, default=None, help="write per-step global losses here (main process)")
    return ap.parse_args(argv)


STATE_FILE = "trainer.selfperc_state"


def save_checkpoint(folder: Path, trainer: Trainer, params: list[torch.Tensor]) -> None:
    """Resumable state without pickle (accelerate's own checkpoints unpickle custom objects on load): the
    trainer (optimizer, step, RNG, losses) and the trained weights, in one safetensors state file."""
    save_state_file(folder / STATE_FILE, {"trainer": trainer.state_dict(), "params": list(params)})


def load_checkpoint(folder: Path, trainer: Trainer, params: list[torch.Tensor]) -> None:
    state = load_state_file(folder / STATE_FILE)
    saved = state.get("params") if isinstance(state, dict) else None
    if not isinstance(state.get("trainer") if isinstance(state, dict) else None, dict):
        raise ValueError(f"{folder / STATE_FILE} holds no trainer state")
    if not isinstance(saved, list) or len(saved) != len(params) or any(
            not isinstance(s, torch.Tensor) or s.shape != p.shape for s, p in zip(saved, params)):
        raise ValueError(f"{folder / STATE_FILE} does not hold this run's weights (other rank, model or --full)")
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    trainer.load_state_dict(state["trainer"])


def encode(vae, images: list[torch.Tensor], device) -> list[torch.Tensor]:
    """VAE-encode once (latent cache), scaled by the VAE's scaling_factor: the UNet's latent space."""
    out = []
    with torch.no_grad():
        for img in images:
            x = as_float(img).permute(2, 0, 1)[None].to(device) * 2 - 1
            lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            out.append(lat[0].float().cpu())
    return out


def main(argv=None) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm

    a = parse_args(argv)
    acc = Accelerator(mixed_precision=a.mixed_precision, cpu=not torch.cuda.is_available() or None)
    set_seed(a.seed)
    dev = acc.device
    ds = load_dataset(a.data, a.resolution, a.resize_mode)
    if acc.is_main_process:
        for s in ds.skipped:
            print(f"selfperc: skipped {s.path}: {s.reason}")
        print(f"selfperc: {len(ds.images)} images ({len(ds.skipped)} skipped), {acc.num_processes} process(es)")

    conds = [None] * len(ds.images)
    if a.captions == "auto" and has_text_encoder(a.model):
        with acc.main_process_first():  # the main process encodes and caches; the others then read the cache
            conds = encode_captions(a.model, ds.captions, a.caption_cache or a.out / "caption_cache", dev,
                                    log=print if acc.is_main_process else (lambda *_: None))
    elif acc.is_main_process and any(ds.captions):
        print("selfperc: captions ignored (no text_encoder/ + tokenizer/ in the model folder, or --captions off)")
    vae = AutoencoderKL.from_pretrained(a.model / "vae").to(dev).eval()
    latents = encode(vae, ds.images, dev)
    del vae
    schedule = DiffusersSchedule(DDPMScheduler.from_pretrained(a.model / "scheduler"))
    unet = UNet2DConditionModel.from_pretrained(a.model / "unet").to(dev)
    unet.requires_grad_(False)
    ctx_dim = unet.config.cross_attention_dim

    if a.full:
        frozen = copy.deepcopy(unet).eval()
        unet.requires_grad_(True)
        params, switch, tap_net = list(unet.parameters()), None, frozen
    else:
        from peft import LoraConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(a.seed)
            unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.alpha, init_lora_weights="gaussian",
                                        target_modules=lora_targets(unet)))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        switch, tap_net = PeftSwitch(unet), unet
    if a.gradient_checkpointing:
        for blk in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            checkpoint_forward(blk, switch)

    predict = unet_predictor(unet, schedule, ctx_dim)
    frozen_predict = unet_predictor(tap_net, schedule, ctx_dim)
    tap = FeatureTap(tap_net.mid_block)

    frozen_features = frozen_features_fn(frozen_predict, tap, switch)

    def grad_sync(ps):  # mean of the processes' gradients (no DDP wrapper: the frozen passes reuse the net)
        if acc.num_processes > 1:
            for p in ps:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")

    opt = acc.prepare_optimizer(make_optimizer(a.optimizer, params, a.lr))
    settings = TrainSettings(steps=a.steps, learning_rate=a.lr, batch_size=a.batch_size, seed=a.seed,
                             t_prime=a.t_prime, t_prime_range=tuple(a.t_prime_range), distance=a.distance,
                             normalize=a.normalize, mse_weight=a.mse_weight, perceptual_weight=a.perceptual_weight,
                             optimizer=a.optimizer,
                             lr_schedule=a.lr_schedule, warmup_steps=a.warmup_steps)
    host = ModelHost(predict, frozen_features, schedule.noise_scaling, schedule.sigma_of_t, schedule.parameterization,
                     lambda conds: stack_token_conds(conds).to(dev))
    trainer = Trainer(params, latents, conds, host, settings, device=dev, rank=acc.process_index,
                      world_size=acc.num_processes, grad_sync=grad_sync, accumulation=a.grad_accum, optimizer=opt)
    if a.resume is not None:
        load_checkpoint(a.resume, trainer, params)  # every process reads the same state
    a.out.mkdir(parents=True, exist_ok=True)
    global_losses = []
    bar = tqdm(total=a.steps, initial=trainer.step_count, desc="self-perceptual", disable=not acc.is_main_process)
    while trainer.step_count < a.steps:
        with acc.autocast():
            parts = trainer.step()
        loss = acc.reduce(parts.loss.to(dev), reduction="mean").item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {trainer.step_count}")
        global_losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.5f}")
        if a.save_every and trainer.step_count % a.save_every == 0 and acc.is_main_process:
            save_checkpoint(a.out / f"state-{trainer.step_count:06d}", trainer, params)
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        _write_outputs(a, unet, global_losses, trainer)
    acc.wait_for_everyone()
    acc.end_training()


def _write_outputs(a, unet, global_losses, trainer) -> None:
    from safetensors.torch import save_file

    meta = {"selfperc_objective": "self-perceptual (Lin & Yang 2024)", "steps": str(trainer.step_count),
            "settings": json.dumps({k: str(v) for k, v in vars(a).items()})}
    if a.full:
        unet.save_pretrained(a.out / "unet")
    else:
        tmp = a.out / ".selfperc_lora.safetensors.tmp"
        save_file(comfy_lora_state_dict(unet), str(tmp), metadata=meta)
        os.replace(tmp, a.out / "selfperc_lora.safetensors")
    if a.log_json:
        a.log_json.write_text(json.dumps({"losses": global_losses, "steps": trainer.step_count}))


if __name__ == "__main__":
    main()
