"""Headless self-perceptual trainer on accelerate + diffusers: `python -m selfperc_headless.train ...`, and the
same under `accelerate launch` (multi-GPU, multi-node, or multi-CPU with gloo), optionally sharded with
accelerate's FSDP plugin (`--fsdp`).

The model folder is a diffusers layout: the denoiser (unet/ for SD1.x, SD2.x and SDXL; transformer/ for SD3 and
Flux.1), vae/ (AutoencoderKL), scheduler/ and, optionally, the family's text encoders and tokenizers
(selfperc_headless.families, .captions). The loss, the loop, the dataset rules, the feature tap and the adapter
switch are the core's; this file only wires them to diffusers, peft and accelerate. With the text encoders,
captions (name.txt) condition training: each is encoded once and cached; without them (or with --captions off)
training uses the zero conditioning.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from selfperc_core.adapter import checkpoint_forward
from selfperc_core.dataset import (
    MAX_CAPTION_CHARS,
    MAX_SHUFFLES,
    RESIZE_MODES,
    as_float,
    caption_orders,
    load_dataset,
    mask_at,
    repeated,
    with_prefix,
)
from selfperc_core.features import DEFAULT_DEPTH, check_depth
from selfperc_core.loop import (
    LR_SCHEDULES,
    OPTIMIZERS,
    Distributed,
    Hooks,
    SampleExtras,
    Trainer,
    TrainSettings,
    fit,
    make_optimizer,
    pick_fresh,
)
from selfperc_core.model_view import ModelView, frozen_features_fn
from selfperc_core.objective import DISTANCES, MSE_SPACES
from selfperc_core.run_log import RunLog, check_available
from selfperc_core.schedule import output_scale_fn
from selfperc_core.state import atomic_write, load_run_state, save_run_state
from selfperc_core.timesteps import T_LAWS, T_PRIME_STRATEGIES
from selfperc_headless import families as fam
from selfperc_headless.captions import encode_captions, has_text_encoder
from selfperc_headless.peft_lora import PeftSwitch, kohya_state_dict

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m selfperc_headless.train", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True,
                    help="diffusers model folder (unet/ or transformer/, vae/, scheduler/)")
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
    ap.add_argument("--tap-depth", type=float, default=DEFAULT_DEPTH,
                    help="transformers: the tapped block's depth in the whole stack (0..1); UNets: the mid-block")
    ap.add_argument("--guidance", type=float, default=0.0,
                    help="Flux dev's distilled guidance input while training; 0: the model's default (3.5), as the "
                         "node's 0")
    ap.add_argument("--t-prime", choices=T_PRIME_STRATEGIES, default="uniform")
    ap.add_argument("--t-prime-range", type=float, nargs=2, default=(0.0, 1.0))
    ap.add_argument("--distance", choices=DISTANCES, default="mse")
    ap.add_argument("--normalize", action="store_true")
    ap.add_argument("--mse-weight", type=float, default=0.0)
    ap.add_argument("--mse-space", choices=MSE_SPACES, default="native",
                    help="the MSE term's space: native (eps-, v- or velocity-MSE, the loss the model was trained with) "
                         "or x0 (core ComfyUI Train LoRA's)")
    ap.add_argument("--perceptual-weight", type=float, default=1.0,
                    help="0 with --mse-weight 1: the same run with plain MSE (the baseline to evaluate against)")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    add_trainer_options(ap)
    ap.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                    help="default: accelerate's config / launch flag; the frozen weights are stored in this dtype")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--fsdp", action="store_true",
                    help="shard the denoiser over the processes with accelerate's FSDP plugin (FSDP2, one unit per "
                         "block); needs GPUs")
    ap.add_argument("--fsdp-offload", action="store_true",
                    help="with --fsdp: keep the shards (frozen and LoRA weights, gradients, optimizer state) in host "
                         "RAM and run the optimizer there; each block is copied to the GPU for its forward/backward "
                         "(FSDP2's CPUOffloadPolicy): the least GPU memory, at the cost of the transfers")
    ap.add_argument("--save-every", type=int, default=0, help="resumable state every N steps (OUT/state-NNNNNN)")
    ap.add_argument("--resume", type=Path, default=None, help="a state folder written by --save-every")
    ap.add_argument("--captions", choices=["auto", "off"], default="auto",
                    help="auto: condition on captions when the model folder has the family's text encoders")
    ap.add_argument("--caption-cache", type=Path, default=None,
                    help="folder of encoded captions (default OUT/caption_cache); share it between runs")
    ap.add_argument("--log-json", type=Path, default=None, help="write per-step global losses here (main process)")
    a = ap.parse_args(argv)
    try:
        check_args(a)
    except ValueError as e:
        ap.error(str(e))
    return a


def check_args(a: argparse.Namespace) -> None:
    """The core's rules, as the node applies them, and the flags' combinations; raises ValueError naming the flag."""
    check_depth(a.tap_depth)
    settings_of(a).validate()
    if a.tensorboard:
        check_available()
    if len(a.caption_prefix) > MAX_CAPTION_CHARS // 4:
        raise ValueError(f"--caption-prefix is {len(a.caption_prefix)} characters; at most {MAX_CAPTION_CHARS // 4}")
    if not 0 <= a.shuffle_tags <= MAX_SHUFFLES or a.keep_first_tags < 0:
        raise ValueError(f"--shuffle-tags {a.shuffle_tags} must be within [0, {MAX_SHUFFLES}], --keep-first-tags "
                         f"{a.keep_first_tags} at least 0")
    if not (math.isfinite(a.reg_weight) and 0 < a.reg_weight <= 100):
        raise ValueError(f"--reg-weight {a.reg_weight} must be within (0, 100]")
    if a.reg_data is not None and not a.reg_data.is_dir():
        raise ValueError(f"--reg-data {a.reg_data} is not a folder")
    if a.fsdp_offload and not a.fsdp:
        raise ValueError("--fsdp-offload offloads FSDP's shards: add --fsdp")
    if a.fsdp and (a.save_every or a.resume or a.full):
        raise ValueError("--save-every, --resume and --full are not supported with --fsdp yet (sharded optimizer "
                         "state; an unsharded frozen copy)")


def add_trainer_options(ap: argparse.ArgumentParser) -> None:
    """The options trainer users expect, as the node's option nodes have them (defaults: off / the paper's)."""
    ap.add_argument("--weight-decay", type=float, default=0.0, help="decoupled (adamw, adafactor, prodigy); 0: none")
    ap.add_argument("--max-grad-norm", type=float, default=0.0, help="clip the gradients' total norm; 0: no clipping")
    ap.add_argument("--t-law", choices=T_LAWS, default="uniform", help="the online level t's law (the paper's: "
                                                                        "uniform)")
    ap.add_argument("--t-law-mean", type=float, default=0.0, help="logit_normal: the normal's mean")
    ap.add_argument("--t-law-std", type=float, default=1.0, help="logit_normal: the normal's std")
    ap.add_argument("--t-shift", type=float, default=1.0, help="static shift s t / (1 + (s - 1) t) of t; 1: none")
    ap.add_argument("--min-snr-gamma", type=float, default=0.0, help="Min-SNR-gamma MSE weights (eps / v); 0: none")
    ap.add_argument("--caption-prefix", default="", help="put before every caption (a trigger word: 'sks, ')")
    ap.add_argument("--caption-dropout", type=float, default=0.0,
                    help="fraction of samples trained on the empty caption")
    ap.add_argument("--repeat-folders", action="store_true",
                    help="kohya's N_name subfolders repeat their images N times")
    ap.add_argument("--masked-loss", action="store_true",
                    help="weigh each image's loss by its alpha channel or name.mask.png beside it")
    ap.add_argument("--shuffle-tags", type=int, default=0,
                    help=f"encode up to N orders of each caption's comma-separated tags, draw one per step "
                         f"(0..{MAX_SHUFFLES}; 0: as written)")
    ap.add_argument("--keep-first-tags", type=int, default=1, help="tags that stay first when shuffling")
    ap.add_argument("--reg-data", type=Path, default=None,
                    help="regularization (prior-preservation) images, trained beside --data")
    ap.add_argument("--reg-weight", type=float, default=1.0, help="the regularization images' loss weight")
    ap.add_argument("--tensorboard", action="store_true",
                    help="TensorBoard event files in OUT/tensorboard (needs the tensorboard package)")


STATE_FILE = "trainer.selfperc_state"


def save_checkpoint(folder: Path, trainer: Trainer, names: list[str], params: list[torch.Tensor]) -> None:
    """Resumable state without pickle (accelerate's own checkpoints unpickle custom objects on load), in the core's
    run-state format (as the node writes it): the trainer's state and the trained weights by name."""
    save_run_state(folder / STATE_FILE, trainer.state_dict(), dict(zip(names, params)))


def load_checkpoint(folder: Path, trainer: Trainer, params: list[torch.Tensor]) -> None:
    state, saved, _ = load_run_state(folder / STATE_FILE)
    saved = list((saved or {}).values())
    if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params)):
        raise ValueError(f"{folder / STATE_FILE} does not hold this run's weights (other rank, model or --full)")
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    trainer.load_state_dict(state)


def encode(vae, images: list[torch.Tensor], device) -> list[torch.Tensor]:
    """VAE-encode once (latent cache) into the denoiser's latent space: (mean - shift_factor) * scaling_factor."""
    scale, shift = fam.latent_scale(vae.config)
    out = []
    with torch.no_grad():
        for img in images:
            x = as_float(img).permute(2, 0, 1)[None].to(device=device, dtype=vae.dtype) * 2 - 1
            lat = (vae.encode(x).latent_dist.mean - shift) * scale
            out.append(lat[0].float().cpu())
    return out


def add_lora(net: torch.nn.Module, rank: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """peft LoRA on every linear and conv layer of the denoiser; its weights in float32 (master weights)."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                   target_modules=fam.lora_targets(net)))
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def fsdp_plugin(offload: bool = False):
    from accelerate.utils import FullyShardedDataParallelPlugin

    # FSDP2: one unit per block (the class names are set from the loaded model, see main), the root holding the
    # embedders; weights resharded after each forward; the LoRA weights are gathered to full tensors for saving;
    # offload: accelerate's CPUOffloadPolicy (pinned host shards)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False, cpu_offload=offload)


@dataclass
class Run:
    """One headless run, set up: what the loop and the outputs need."""
    args: argparse.Namespace
    acc: object                 # the accelerate Accelerator
    family: fam.Family
    net: torch.nn.Module        # the trained denoiser (with the peft LoRA, or fully trained with --full)
    params: list[torch.Tensor]
    trainer: Trainer

    @property
    def param_names(self) -> list[str]:
        return [n for n, p in self.net.named_parameters() if p.requires_grad]


def accelerator(a: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    acc = Accelerator(mixed_precision=a.mixed_precision, cpu=not torch.cuda.is_available() or None,
                      fsdp_plugin=fsdp_plugin(a.fsdp_offload) if a.fsdp else None)
    if a.fsdp and acc.distributed_type != DistributedType.FSDP:
        raise SystemExit("--fsdp: accelerate enables its FSDP plugin on GPUs only (this run is "
                         f"{acc.distributed_type}); leave --fsdp off here")
    set_seed(a.seed)
    return acc


def training_data(a, acc, family: fam.Family, net) -> tuple[list[torch.Tensor], list, SampleExtras]:
    """The dataset's latents (VAE-encoded once; --reg-data's images after its own), per-image conditionings
    (captions with --caption-prefix, or None each) and what the samples carry beside them: the empty caption's
    conditioning (--caption-dropout), the tag orders (--shuffle-tags), masks (--masked-loss), weights (--reg-weight)."""
    from diffusers import AutoencoderKL

    dev, say = acc.device, print if acc.is_main_process else (lambda *_: None)
    ds = load_dataset(a.data, a.resolution, a.resize_mode, repeat_folders=a.repeat_folders, masks=a.masked_loss)
    n_data = len(ds.images)
    if a.reg_data is not None:
        reg = load_dataset(a.reg_data, a.resolution, a.resize_mode, repeat_folders=a.repeat_folders,
                           masks=a.masked_loss)
        ds.extend(reg)
    for s in ds.skipped:
        say(f"selfperc: skipped {s.path}: {s.reason}")
    say(f"selfperc: {family.name} model, {n_data} images + {len(ds.images) - n_data} regularization "
        f"({len(ds.skipped)} skipped), {acc.num_processes} process(es)")
    conds, empty, orders = [None] * len(ds.images), None, None
    if a.captions == "auto" and has_text_encoder(a.model, family.text):
        texts = with_prefix(ds.captions[:n_data], a.caption_prefix) + ds.captions[n_data:]
        orders = [[t] for t in texts] if not a.shuffle_tags else caption_orders(
            ds.captions, n_data, a.caption_prefix, a.keep_first_tags, a.shuffle_tags, a.seed)
        flat = [t for o in orders for t in o] + ([""] if a.caption_dropout else [])  # "": the dropped samples'
        with acc.main_process_first():  # the main process encodes and caches; the others then read the cache
            bf16 = DTYPES[acc.mixed_precision] == torch.bfloat16
            encoded = encode_captions(a.model, flat, a.caption_cache or a.out / "caption_cache", dev, family.text,
                                      torch.bfloat16 if bf16 else torch.float32,
                                      getattr(net.config, "joint_attention_dim", None), log=say)
        if a.caption_dropout:
            empty = [encoded[-1]] * len(ds.images)
        starts = [sum(len(o) for o in orders[:i]) for i in range(len(orders))]
        orders = [encoded[s:s + len(o)] for s, o in zip(starts, orders)]
        conds = [o[0] for o in orders]
    else:
        why = "--captions off" if a.captions == "off" else "the model folder has no text encoders of its family"
        say(f"selfperc: zero text conditioning ({why}); captions are not used")
        if a.caption_prefix or a.caption_dropout or a.shuffle_tags:
            raise SystemExit(f"selfperc: --caption-prefix, --caption-dropout and --shuffle-tags need captions, but "
                             f"{why}")
    vae = AutoencoderKL.from_pretrained(a.model / "vae").to(dev).eval()
    order = repeated(list(range(len(ds.images))), ds.repeats)  # kohya's N_name folders (references, no copies)
    latents = encode(vae, ds.images, dev)
    extras = SampleExtras(
        empty=[empty[i] for i in order] if empty is not None else None,
        fresh=pick_fresh([orders[i] for i in order], empty) if a.shuffle_tags and orders else None,
        masks=[mask_at(ds.masks[i], tuple(latents[i].shape)) for i in order] if a.masked_loss else None,
        weights=[1.0 if i < n_data else a.reg_weight for i in order] if a.reg_data is not None else None)
    return [latents[i] for i in order], [conds[i] for i in order], extras


def trainable(a, acc, family: fam.Family, net) -> tuple[torch.nn.Module, list, object, torch.nn.Module, object]:
    """The adapter (peft LoRA, or the whole net with --full beside a frozen copy), checkpointing, FSDP sharding:
    (net, params, switch, the net the frozen features come from, optimizer)."""
    if a.full:
        frozen = copy.deepcopy(net).eval()
        net.requires_grad_(True)
        params, switch, tap_net = list(net.parameters()), None, frozen
    else:
        params = add_lora(net, a.rank, a.alpha, a.seed)
        switch, tap_net = PeftSwitch(net), net
    if a.gradient_checkpointing:
        for blk in fam.blocks(net, family):
            checkpoint_forward(blk, switch)
    opt = make_optimizer(a.optimizer, params, a.lr, a.weight_decay)
    if a.fsdp:
        acc.state.fsdp_plugin.transformer_cls_names_to_wrap = fam.block_class_names(net, family)
        net, opt = acc.prepare(net, opt)  # shards the weights in place; the optimizer now holds the shards
        params, tap_net = [p for p in net.parameters() if p.requires_grad], net
    else:
        opt = acc.prepare_optimizer(opt)
    return net, params, switch, tap_net, opt


def settings_of(a: argparse.Namespace) -> TrainSettings:
    return TrainSettings(steps=a.steps, learning_rate=a.lr, batch_size=a.batch_size, seed=a.seed, t_prime=a.t_prime,
                         t_prime_range=tuple(a.t_prime_range), distance=a.distance, normalize=a.normalize,
                         mse_weight=a.mse_weight, perceptual_weight=a.perceptual_weight, mse_space=a.mse_space,
                         optimizer=a.optimizer, lr_schedule=a.lr_schedule, warmup_steps=a.warmup_steps,
                         accumulation=a.grad_accum, weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm,
                         t_law=a.t_law, t_law_mean=a.t_law_mean, t_law_std=a.t_law_std, t_shift=a.t_shift,
                         min_snr_gamma=a.min_snr_gamma, caption_dropout=a.caption_dropout)


def setup(a: argparse.Namespace) -> Run:
    """Everything before the first step: accelerate, the model, the data, the adapter, the core's Trainer."""
    acc = accelerator(a)
    family = fam.detect(a.model)
    net = fam.load_denoiser(a.model, family, torch.float32 if a.full else DTYPES[acc.mixed_precision])
    net.requires_grad_(False)
    if not a.fsdp:  # under FSDP each process keeps only its shard on the device (prepare moves it)
        net.to(acc.device)
    latents, conds, extras = training_data(a, acc, family, net)
    schedule = fam.load_schedule(a.model, family, (a.resolution // 8, a.resolution // 8))
    net, params, switch, tap_net, opt = trainable(a, acc, family, net)
    view = make_view(net, tap_net, family, schedule, switch, a.tap_depth, a.guidance, early_exit=not a.fsdp)

    def grad_sync(ps):  # mean of the processes' gradients (no DDP wrapper: the frozen passes reuse the net)
        if acc.num_processes > 1 and not a.fsdp:  # FSDP reduce-scatters the gradients itself
            for p in ps:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")

    trainer = Trainer(params, latents, conds, view, settings_of(a), device=acc.device,
                      dist=Distributed(acc.process_index, acc.num_processes, grad_sync), optimizer=opt,
                      conditions=extras)
    if a.resume is not None:
        load_checkpoint(a.resume, trainer, params)  # every process reads the same state
    return Run(a, acc, family, net, params, trainer)


def train(run: Run) -> list[float]:
    """Train to --steps with the core's loop; returns the global (all-process mean) loss of every step run."""
    from tqdm.auto import tqdm

    a, acc, trainer = run.args, run.acc, run.trainer
    a.out.mkdir(parents=True, exist_ok=True)
    losses = []
    bar = tqdm(total=a.steps, initial=trainer.step_count, desc=f"self-perceptual ({run.family.name})",
               disable=not acc.is_main_process)
    log = RunLog(a.out / "tensorboard") if a.tensorboard and acc.is_main_process else None

    def after_step(step, parts):
        losses.append(acc.reduce(parts.loss.to(acc.device), reduction="mean").item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
        if log is not None or acc.num_processes > 1:  # every process reduces; the main one writes
            glob = {k: acc.reduce(torch.as_tensor(getattr(parts, k)).float().to(acc.device), reduction="mean")
                    for k in ("perceptual", "mse")}
            if log is not None:
                log.step(step, dataclasses.replace(parts, loss=torch.tensor(losses[-1]), **glob),
                         trainer.optimizer.param_groups[0]["lr"])

    def save(step):
        if acc.is_main_process:
            save_checkpoint(a.out / f"state-{step:06d}", trainer, run.param_names, run.params)
    try:
        fit(trainer, a.steps, Hooks(context=acc.autocast, after_step=after_step, save=save), a.save_every)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return losses


def main(argv=None) -> Run:
    run = setup(parse_args(argv))
    losses = train(run)
    acc = run.acc
    acc.wait_for_everyone()
    lora = None if run.args.full else kohya_state_dict(run.net, run.family.lora_prefix)  # every process: FSDP
    if acc.is_main_process:
        _write_outputs(run.args, run.net, lora, losses, run.trainer, run.family)
    acc.wait_for_everyone()
    acc.end_training()
    return run


def make_view(net, tap_net, family: fam.Family, schedule, switch, depth: float, guidance: float,
              early_exit: bool = True) -> ModelView:
    """The core's view of a diffusers denoiser: predictions through ``net`` (adapter on), features of ``tap_net``
    (the same net with the adapter off, or a frozen copy) at the family's tap."""
    # FSDP (un)shards each block in its forward hooks: the forward must run to the end for them all to run
    tap = fam.tap_point(tap_net, family, depth, early_exit)
    frozen = frozen_features_fn(fam.predictor(tap_net, family, schedule, guidance), tap, switch)
    return ModelView(fam.predictor(net, family, schedule, guidance), frozen, schedule.noise_scaling,
                     schedule.sigma_of_t, schedule.parameterization, fam.collate, output_scale_fn(schedule.denoise))


def _write_outputs(a, net, lora, global_losses, trainer, family) -> None:
    from safetensors.torch import save_file

    meta = {"selfperc_objective": "self-perceptual (Lin & Yang 2024)", "steps": str(trainer.step_count),
            "family": family.name, "mse_space": a.mse_space, "settings": json.dumps({k: str(v) for k, v in vars(a).items()})}
    if a.full:
        net.save_pretrained(a.out / family.denoiser)
    else:
        atomic_write(a.out / "selfperc_lora.safetensors", lambda tmp: save_file(lora, tmp, metadata=meta))
    if a.log_json:
        a.log_json.write_text(json.dumps({"losses": global_losses, "steps": trainer.step_count}))


if __name__ == "__main__":
    main()
