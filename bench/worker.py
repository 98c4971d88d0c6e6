"""One benchmark configuration in its own process (so peak memory is per configuration).

Prints one JSON line: step times (after warm-up), peak memory, and what ran.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import sys
import time

import torch

from dev.host import REPO_ROOT, import_comfy, import_pack

CACHE = REPO_ROOT / ".cache" / "bench"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def sd15_unet_config() -> dict:
    """ComfyUI's SD1.5 UNet (as model detection reads it from a real SD1.5 file)."""
    return dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
                use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_temporal_attention=False,
                use_temporal_resblock=False)


def load_model(which: str, dtype: str = "fp32", overrides: dict | None = None):
    """A ComfyUI ModelPatcher: the full SD1.5 UNet (random, cached), the tiny test UNet, or one of the full-width
    architectures of bench/archs.py (random, built in-process)."""
    import_comfy()
    import comfy.sd

    from bench import archs
    from dev.tiny_models import write_unet

    if which in archs.ARCHS:
        return archs.build(which, DTYPES[dtype], **(overrides or {}))
    if which == "sd15":
        path = write_unet(CACHE / "sd15_unet_random.safetensors", seed=0, config=sd15_unet_config())
    else:
        path = write_unet(REPO_ROOT / ".cache" / "models" / "diffusion_models" / "tiny_sd15_unet.safetensors")
    return comfy.sd.load_diffusion_model(str(path))


def latents_for(size: int, n: int, model=None) -> torch.Tensor:
    from bench.archs import latent_shape

    shape = latent_shape(model, size) if model is not None else (4, size, size)
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g)


def conditioning_for(which: str, tokens: int = 0) -> list | None:
    """The CONDITIONING every configuration trains on: None (the node's empty prompt) for the SD1.5 UNets,
    text-encoder-shaped for the others (which need one); ``tokens``: text tokens instead of the architecture's."""
    from bench import archs

    return archs.conditioning(which, tokens) if which in archs.ARCHS else None


def per_image_inputs(mp, conditioning: list | None, lat: torch.Tensor) -> list:
    """The Trainer's per-image conditioning list (None: the empty prompt)."""
    if conditioning is None:
        return [None] * len(lat)
    from selfperc_pack.nodes.inputs import model_inputs

    return [model_inputs(mp, conditioning, tuple(lat.shape[1:]))] * len(lat)


def batch_inputs(ses, conditioning: list | None, lat: torch.Tensor, n: int):
    """One batch's model inputs for ``n`` images (None: the empty prompt)."""
    if conditioning is None:
        return None
    return ses.view.collate(per_image_inputs(ses.mp, conditioning, lat[:n]))


def on_cuda() -> bool:
    """Whether ComfyUI's compute device, the one the nodes train on, is a GPU: one answer for the timing, memory
    and dtype choices (torch.cuda.is_available() differs from it under ComfyUI's --cpu)."""
    from selfperc_pack.nodes import bridge

    return bridge.device().type == "cuda"


def reset_peak_memory() -> bool:
    """Start the peak-memory count now (after loading and warm-up, so it is the peak of the timed steps).

    CUDA: torch's allocator peak. CPU on Linux: the kernel's peak RSS (VmHWM) is reset by writing 5 to
    /proc/self/clear_refs; elsewhere the process peak since start is all there is.
    """
    if on_cuda():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(reset_worked: bool) -> tuple[int, str]:
    """(bytes, what they are) for the timed steps."""
    if on_cuda():
        return torch.cuda.max_memory_allocated(), "CUDA max allocated over the timed steps"
    if reset_worked:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) * 1024, "peak RSS over the timed steps (VmHWM reset after warm-up)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS since start (incl. loading)"


class StepClock:
    """Step times from ComfyUI's progress-bar hook (both nodes update their bar once per optimizer step).

    Resets the peak-memory count when the timed steps begin (after ``warmup`` steps).
    """

    def __init__(self, warmup: int):
        self.stamps, self.warmup, self.reset_worked = [], warmup, False

    def __call__(self, value, total, preview=None, node_id=None):
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == self.warmup + 1:
            self.reset_worked = reset_peak_memory()

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def run_core_train_lora(model, lat, a) -> tuple[list[float], bool]:
    """(a) ComfyUI's Train LoRA node, called as ComfyUI calls it (input lists, inference mode outside)."""
    import comfy.utils
    from comfy_extras.nodes_train import TrainLoraNode

    clock = StepClock(a.warmup)
    comfy.utils.set_progress_bar_global_hook(clock)
    cond = a.conditioning or [[torch.zeros(1, 77, 768), {}]]
    # As our step computes: bf16 on a GPU, else in the weights' dtype (bf16 weights compute in bf16 on a CPU too)
    dtype = "bf16" if on_cuda() or a.dtype == "bf16" else "fp32"
    kw = dict(model=model, positive=cond, batch_size=a.batch, grad_accumulation_steps=1,
              steps=a.warmup + a.steps + 1, learning_rate=1e-4, rank=a.rank, optimizer="AdamW",
              loss_function="MSE", seed=0, training_dtype=dtype, lora_dtype="bf16" if on_cuda() else "fp32",
              algorithm="LoRA",
              gradient_checkpointing=a.checkpointing, existing_lora="[None]")
    # As a dataset graph feeds it (one latent per image, an output list): this ComfyUI's node only defines
    # its multi-resolution flag on that path and fails on a single batched LATENT.
    inputs = {k: [v] for k, v in kw.items()}
    inputs["latents"] = [{"samples": lat[i:i + 1]} for i in range(lat.shape[0])]
    with torch.inference_mode():
        TrainLoraNode.execute(**inputs)
    return clock.steps(), clock.reset_worked


@contextlib.contextmanager
def selfperc_trainer(model, lat, a, early_exit=True, batched=None, naive=False):
    """The node's own training loop (Trainer in a training_session) on ``lat``; ``batched=None``: the default."""
    from selfperc_pack.nodes import bridge
    from selfperc_pack.nodes.session import SessionSpec, training_session
    from selfperc_pack.selfperc_core.loop import Trainer, TrainSettings

    from bench.naive import naive_frozen_features

    lat = model.model.process_latent_in(lat)
    settings = TrainSettings(learning_rate=1e-4, batch_size=a.batch)
    if batched is not None:
        settings.batched_frozen = batched
    with torch.inference_mode(False), training_session(model, SessionSpec(
            a.rank, float(a.rank), checkpointing=a.checkpointing, early_exit=early_exit, depth=a.depth)) as ses:
        host = ses.view
        if naive:
            frozen, _copy = naive_frozen_features(ses.mp, checkpointing=a.checkpointing)
            host = dataclasses.replace(host, frozen_features=frozen)
        conds = per_image_inputs(ses.mp, a.conditioning, lat)
        yield Trainer(ses.params, [x for x in lat.clone()], conds, host, settings, device=bridge.device())


def seconds(fn) -> float:
    """Wall time of ``fn()`` as the node trains (bf16 autocast on a GPU, fp32 on a CPU), synchronized on a GPU."""
    cuda = on_cuda()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed_steps(step, a) -> tuple[list[float], bool]:
    """Run ``step()`` warm-up + timed times as the node runs its steps; the peak-memory count restarts when the
    timed steps begin."""
    times, reset_worked = [], False
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            reset_worked = reset_peak_memory()
        times.append(seconds(step))
    return times, reset_worked


def run_selfperc(model, lat, a, **choices) -> tuple[list[float], bool]:
    """(b)-(d): timed Trainer steps."""
    with selfperc_trainer(model, lat, a, **choices) as tr:
        return timed_steps(tr.step, a)


def run_mse_same_lora(model, lat, a) -> tuple[list[float], bool]:
    """(a') an MSE LoRA step with exactly our LoRA and checkpointing (x0-space MSE, as core Train LoRA): the
    baseline the FLOP floor is applied to, since core Train LoRA also trains bias/norm offsets on every layer."""
    from selfperc_pack.nodes import bridge
    from selfperc_pack.nodes.session import SessionSpec, training_session
    from selfperc_pack.selfperc_core.timesteps import draw_t

    lat = model.model.process_latent_in(lat)
    with torch.inference_mode(False), training_session(model, SessionSpec(
            a.rank, float(a.rank), checkpointing=a.checkpointing)) as ses:
        ms = ses.model_sampling
        ns, sig = bridge.noise_scaling_fn(ms), bridge.sigma_of_t_fn(ms)
        opt = torch.optim.AdamW(ses.params, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        dev = bridge.device()
        cond = batch_inputs(ses, a.conditioning, lat, a.batch)

        def step():
            idx = torch.randperm(len(lat), generator=g)[: a.batch]
            x0 = lat[idx].to(dev)
            sigma = sig(draw_t(a.batch, g, ses.view.t_range)).to(dev)  # the node's t-range for this model
            x_t = ns(sigma, torch.randn(x0.shape, generator=g).to(dev), x0)
            loss = (ses.predict_x0(x_t, sigma, cond) - x0).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return timed_steps(step, a)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


def measure_activations(model, lat, a) -> dict:
    """Peak memory of (b)'s steps above what the process held before them (weights, runtime): the activation
    memory one step needs. Run with MALLOC_MMAP_THRESHOLD_ set so freed tensors leave the RSS (bench/wide.py)."""
    with selfperc_trainer(model, lat, a) as tr:
        tr.step()  # first-step allocations (optimizer state, caches) belong to the baseline
        base = torch.cuda.memory_allocated() if on_cuda() else rss_bytes()  # the same kind as peak_memory's
        reset_worked = reset_peak_memory()
        for _ in range(a.steps):
            seconds(tr.step)
        peak, _kind = peak_memory(reset_worked)
    return {"activation_bytes": peak - base, "baseline_bytes": base, "peak_bytes": peak,
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())}


def count_flops(model, lat, a) -> dict:
    """FLOPs of one MSE LoRA step (forward + backward) and of one forward up to the mid-block."""
    from selfperc_pack.nodes import bridge
    from selfperc_pack.nodes.session import SessionSpec, training_session
    from torch.utils.flop_counter import FlopCounterMode

    lat = model.model.process_latent_in(lat[: a.batch]).to(bridge.device())
    sigma = torch.full((a.batch,), 1.0, device=lat.device)
    with torch.inference_mode(False), training_session(model, SessionSpec(
            a.rank, float(a.rank), checkpointing=False, depth=getattr(a, "depth", 0.5))) as ses:
        x = lat.clone().requires_grad_(False)
        cond = batch_inputs(ses, getattr(a, "conditioning", None), lat, a.batch)
        with FlopCounterMode(display=False) as fc:
            out = ses.predict_x0(x, sigma, cond)
            (out - lat).square().mean().backward()
        mse_step = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            ses.frozen_features(x, sigma, cond)
        to_tap = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            ses.predict_x0(x, sigma, cond)
        full_fwd = fc.get_total_flops()
    return {"mse_step": mse_step, "forward_to_tap": to_tap, "forward_full": full_fwd, "tap": ses.tap_name}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["core_train_lora", "mse_same_lora", "selfperc", "selfperc_no_early_exit",
                                       "selfperc_batched", "selfperc_separate", "naive", "flops",
                                       "activations"])
    from bench.archs import ARCHS

    ap.add_argument("--model", default="sd15", choices=["sd15", "tiny", *ARCHS])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                    help="weights of the built architectures (fp8: stored in fp8, computed in bf16)")
    ap.add_argument("--text-tokens", type=int, default=0, help="text tokens per prompt (0: the architecture's)")
    ap.add_argument("--depth", type=float, default=0.5, help="tap depth fraction (transformers)")
    ap.add_argument("--config", default="{}", help="JSON overrides of the architecture's unet_config (block counts)")
    ap.add_argument("--size", type=int, default=32, help="latent side")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    import_pack()
    model = load_model(a.model, a.dtype, json.loads(a.config))
    lat = latents_for(a.size, max(4, a.batch), model)
    a.conditioning = conditioning_for(a.model, a.text_tokens)
    if a.method == "flops":
        print(json.dumps(count_flops(model, lat, a)))
        return
    if a.method == "activations":
        print(json.dumps(measure_activations(model, lat, a)))
        return
    t0 = time.perf_counter()
    if a.method == "core_train_lora":
        times, reset_worked = run_core_train_lora(model, lat, a)
    elif a.method == "mse_same_lora":
        times, reset_worked = run_mse_same_lora(model, lat, a)
    else:
        batched = {"selfperc_batched": True, "selfperc_separate": False, "naive": False}.get(a.method)
        times, reset_worked = run_selfperc(model, lat, a, early_exit=a.method != "selfperc_no_early_exit", batched=batched,
                             naive=a.method == "naive")
    steps = times[a.warmup: a.warmup + a.steps]
    peak, memory_kind = peak_memory(reset_worked)
    print(json.dumps({"method": a.method, "step_times": steps, "peak_memory_bytes": peak, "memory_kind": memory_kind,
                      "wall": time.perf_counter() - t0, "device": "cuda" if on_cuda() else "cpu"}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
