"""Headless evaluation: `python -m selfperc_headless.evaluate`, the Evaluate node's measurement for diffusers
models and folders of images.

Base (the diffusers model folder: SD1.x, SD2.x, SDXL, SD3 or Flux.1, see selfperc_headless.families) and each
fine-tune (a LoRA written by `selfperc_headless.train`, in kohya format, or a fully fine-tuned unet/ or
transformer/ folder) sample from identical noise without guidance, with the deterministic probability-flow ODE
(selfperc_core.realimage: DDIM for eps/v models, the flow ODE for flow models). Samples and the images of --data
are compared in the frozen base model's features at the trainer's tap (UNet mid-block, or the block at --tap-depth)
at the --noise-levels, by FD and KID with their paired spread (selfperc_core.evaluation, the node's code). The
conditioning is --prompt encoded by the folder's text encoders (the empty prompt by default), or the zero
conditioning where the folder has none.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from selfperc_core.dataset import load_dataset
from selfperc_core.evaluation import MIN_IMAGES, build_report, distances, noised_features, report_lines
from selfperc_core.features import DEFAULT_DEPTH
from selfperc_core.model_view import frozen_features_fn
from selfperc_core.realimage import euler_ode
from selfperc_core.state import atomic_write
from selfperc_headless import families as fam
from selfperc_headless.captions import encode_texts, has_text_encoder
from selfperc_headless.train import encode

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m selfperc_headless.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True,
                    help="diffusers model folder (unet/ or transformer/, vae/, scheduler/)")
    ap.add_argument("--data", type=Path, required=True, help="folder of (held-out) images to compare with")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                    help="a fine-tune to measure: NAME=a LoRA .safetensors or NAME=a unet/ or transformer/ folder "
                         "(repeatable)")
    ap.add_argument("--samples", type=int, default=32, help="samples per model (identical noise for all)")
    ap.add_argument("--steps", type=int, default=30, help="ODE (DDIM) steps")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-levels", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    ap.add_argument("--bootstraps", type=int, default=20)
    ap.add_argument("--max-images", type=int, default=256, help="dataset images used (the first by name)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prompt", default="", help="the conditioning, encoded by the folder's text encoders")
    ap.add_argument("--tap-depth", type=float, default=DEFAULT_DEPTH, help="transformers: the tapped block (0..1)")
    ap.add_argument("--guidance", type=float, default=0.0,
                    help="Flux dev's distilled guidance input; 0: the model's default (3.5)")
    ap.add_argument("--out", type=Path, default=None, help="write the report JSON here")
    a = ap.parse_args(argv)
    if a.samples < MIN_IMAGES:
        ap.error(f"--samples {a.samples}: a distance between distributions needs at least {MIN_IMAGES}")
    if any(not 0 < t < 1 for t in a.noise_levels):
        ap.error("--noise-levels must lie strictly between 0 and 1")
    for item in a.compare:
        if "=" not in item or not item.split("=", 1)[0]:
            ap.error(f"--compare {item!r}: give NAME=PATH")
    return a


def lora_deltas(net, sd: dict[str, torch.Tensor], source: Path, prefix: str = "lora_unet_"
                ) -> dict[str, torch.Tensor]:
    """Weight deltas (alpha / rank) * up @ down per layer of a kohya-format LoRA ('<prefix><module>', diffusers
    names); every key must name a layer of ``net`` (a LoRA of another model is an error, not a silent no-op)."""
    layers = {n.replace(".", "_"): m for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear,
                                                                                      torch.nn.Conv2d))}
    out = {}
    other = sorted(k for k in sd if not k.endswith(LORA_SUFFIXES))
    if other:
        raise ValueError(f"{source}: holds {other[0]} (a LoHa/LoKr/DoRA or text-encoder key); only plain LoRA "
                         "weights of the denoiser (lora_down/lora_up/alpha) are merged here")
    bases = {k[: -len(s)] for k in sd for s in LORA_SUFFIXES if k.endswith(s)}
    if not bases:
        raise ValueError(f"{source}: not a kohya-format LoRA ({prefix}*.lora_down/lora_up.weight); the ComfyUI "
                         "node writes one for UNets with save_format kohya, the headless trainer always does")
    for base in sorted(bases):
        name = base[len(prefix):] if base.startswith(prefix) else None
        if name not in layers or f"{base}.lora_down.weight" not in sd or f"{base}.lora_up.weight" not in sd:
            raise ValueError(f"{source}: LoRA key {base} matches no layer of this model")
        down, up = sd[f"{base}.lora_down.weight"].float(), sd[f"{base}.lora_up.weight"].float()
        alpha = float(sd.get(f"{base}.alpha", torch.tensor(float(down.shape[0]))))
        w = layers[name].weight
        out[name] = ((up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * alpha / down.shape[0]
                     ).reshape(w.shape)
    return out


class Merged:
    """``unet`` with weight deltas added in place for the ``with`` block, restored exactly afterwards."""

    def __init__(self, unet, deltas: dict[str, torch.Tensor]):
        self.layers = {n.replace(".", "_"): m for n, m in unet.named_modules()}
        self.deltas, self.saved = deltas, {}

    def __enter__(self):
        with torch.no_grad():
            for name, d in self.deltas.items():
                w = self.layers[name].weight
                self.saved[name] = w.detach().clone()
                w.add_(d.to(w))

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, w0 in self.saved.items():
                self.layers[name].weight.copy_(w0)


def ode_sigmas(schedule, steps: int) -> torch.Tensor:
    """``steps`` noise levels from the noisiest to the cleanest, then 0: evenly spaced training timesteps (ComfyUI's
    'normal' spacing) for DDPM schedules, evenly spaced t through the shift for flow schedules."""
    if schedule.kind == "flow":
        sig = schedule.sigma_of_t(torch.linspace(1, 0, steps + 1)[:-1])
    else:
        n = len(schedule.log_sigmas)
        sig = schedule.sigma_of_timestep(torch.linspace(n - 1, 0, steps))
    return torch.cat([sig, torch.zeros(1)])


def sample(predict, shape: tuple, count: int, seed: int, sigmas: torch.Tensor, batch: int, device,
           cond=None) -> torch.Tensor:
    """``count`` latents from the ODE; sample i starts from the noise of seed + i, whichever model samples.
    ``cond(n)``: the conditioning of a chunk of n (None: the zero conditioning)."""
    out = []
    for start in range(0, count, batch):
        idx = range(start, min(count, start + batch))
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in idx])
        x = noise.to(device) * sigmas[0]  # x at sigma_max: sigma * noise (+ a vanishing multiple of x0)
        c = cond(len(idx)) if cond is not None else None
        with torch.no_grad():
            out.append(euler_ode(lambda xi, s: predict(xi, s.expand(xi.shape[0]).to(device), c), x,
                                 sigmas.to(device)).float().cpu())
    return torch.cat(out)


def prompt_cond(a, family, net, dev):
    """The --prompt's conditioning (batch 1) from the folder's text encoders, or None (zero conditioning)."""
    if not has_text_encoder(a.model, family.text):
        print("selfperc evaluate: no text encoders in the model folder: the zero conditioning", flush=True)
        return None
    return encode_texts(a.model, [a.prompt], dev, family.text,
                        joint_dim=getattr(net.config, "joint_attention_dim", None))[a.prompt]


def read_compares(a, family, net, dev) -> dict:
    """Every --compare, read (and refused) before any sampling: a LoRA's weight deltas, or a fine-tuned denoiser."""
    from safetensors.torch import load_file

    tuned = {}
    for item in a.compare:
        name, path = item.split("=", 1)
        path = Path(path)
        if path.is_dir():
            if path.name != family.denoiser:
                raise SystemExit(f"--compare {item}: a full fine-tune of this {family.name} model is a "
                                 f"{family.denoiser}/ folder")
            tuned[name] = fam.load_denoiser(path.parent, family).to(dev).eval().requires_grad_(False)
        elif path.suffix == ".safetensors":
            tuned[name] = lora_deltas(net, load_file(str(path)), path, family.lora_prefix)
        else:
            raise SystemExit(f"--compare {item}: give a .safetensors LoRA or a {family.denoiser}/ folder")
    return tuned


def sample_all(a, family, net, tuned: dict, schedule, shape: tuple, dev, batch_cond) -> dict[str, torch.Tensor]:
    """The base model's and every fine-tune's samples, from identical noise."""
    sigmas = ode_sigmas(schedule, a.steps)

    def run(model):
        return sample(fam.predictor(model, family, schedule, a.guidance), shape, a.samples, a.seed, sigmas,
                      a.batch_size, dev, batch_cond)
    samples = {"base": run(net)}
    for name, t in tuned.items():
        print(f"selfperc evaluate: sampling {name}", flush=True)
        if isinstance(t, dict):
            with Merged(net, t):
                samples[name] = run(net)
        else:
            samples[name] = run(t)
    return samples


def main(argv=None) -> dict:
    from diffusers import AutoencoderKL

    a = parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    family = fam.detect(a.model)
    images = load_dataset(a.data, a.resolution, max_images=a.max_images).images
    if len(images) < MIN_IMAGES:
        raise SystemExit(f"{a.data}: {len(images)} usable image(s); the distances need at least {MIN_IMAGES}")
    net = fam.load_denoiser(a.model, family).to(dev).eval().requires_grad_(False)
    tuned = read_compares(a, family, net, dev)
    cond1 = prompt_cond(a, family, net, dev)
    batch_cond = None if cond1 is None else (lambda n: {k: v.expand(n, *v.shape[1:]) for k, v in cond1.items()})
    real = torch.stack(encode(AutoencoderKL.from_pretrained(a.model / "vae").to(dev).eval(), images, dev))
    shape = tuple(real.shape[1:])
    schedule = fam.load_schedule(a.model, family, shape[-2:])
    samples = sample_all(a, family, net, tuned, schedule, shape, dev, batch_cond)
    with fam.tap_point(net, family, a.tap_depth) as tap:
        feats = frozen_features_fn(fam.predictor(net, family, schedule, a.guidance), tap)

        def stack(lat, stream):
            per = noised_features(feats, lat, a.noise_levels, schedule.sigma_of_t, schedule.noise_scaling,
                                  cond=batch_cond, seed=a.seed, batch=a.batch_size, stream=stream, device=dev)
            return torch.stack([per[t] for t in a.noise_levels], 1)
        real_f = stack(real, "data")
        fake_f = {k: stack(v, "samples") for k, v in samples.items()}
    report = build_report({"self": distances(real_f, fake_f, a.bootstraps, a.seed)},
                          tap=f"the base {family.name} model's {tap.name}", width=real_f.shape[-1],
                          levels=a.noise_levels, samples=a.samples, dataset_images=len(images), dataset=str(a.data),
                          cfg=1.0, steps=a.steps, sampler="probability-flow ODE (Euler)", family=family.name,
                          prompt=a.prompt, seed=a.seed, bootstraps=a.bootstraps, latent_shape=list(shape))
    print("\n".join(report_lines(report)))
    if a.out is not None:
        atomic_write(a.out, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    return report


if __name__ == "__main__":
    main()
