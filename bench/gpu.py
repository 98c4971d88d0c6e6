"""`make bench-gpu`: core Train LoRA against the pack's step at 1024x1024 on one large GPU, at the real size.

Real-size SDXL (the whole UNet, fp16 weights) and Flux.1-dev (full depth, 19 double + 38 single blocks, fp8 weights
computed in bf16, 4096 image + 512 text tokens), random weights (nothing is downloaded), gradient checkpointing on,
each configuration in its own process (bench/worker.py, the harness of `make bench`):
  (a)  core Train LoRA (MSE), as ComfyUI calls it
  (a2) an MSE step with our adapter (the FLOP floor's baseline)
  (b)  our self-perceptual step with the shipped defaults
Reported: median step time, b/a, b/a2 (what the self-perceptual terms add to the same MSE step) and peak memory
b/a, into bench/results-gpu.json and
bench/results-gpu.md. About 6 minutes on an H100/H200-class GPU.

``--set smoke`` runs the same harness on this CPU with 1 block per stack and 128 px, to check it before a GPU is
lent (its numbers mean nothing); ``--set tokens`` measures the Flux.1-width step at 4096 + 512 tokens with one block
per stack on whatever device there is (bench/results-tokens.*); ``--only NAME`` runs one row. ``--exact-rss`` (CPU):
glibc returns freed memory at once (MALLOC_MMAP_THRESHOLD_), so peak RSS is the peak of live memory rather than of
what the allocator kept; slower steps, rows named NAME+mmap.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

from bench.run import summary, worker
from dev.host import REPO_ROOT

OUT = REPO_ROOT / "bench"
METHODS = (("a", "core_train_lora"), ("a2", "mse_same_lora"), ("b", "selfperc"))
# name -> (architecture, weights, unet_config overrides, latent side, text tokens); 128: 1024 px through an 8x VAE
CONFIGS = {
    "sdxl": ("sdxl", "fp16", {}, 128, 77),
    "flux": ("flux", "fp8", {"depth": 19, "depth_single_blocks": 38}, 128, 512),
}
# #31's real token counts on this CPU: Flux.1 width at 4096 image + 512 text tokens, 1 double + 1 single block (the
# full depth does not fit the time), fp32 weights; the SDXL UNet at a 128x128 latent (1024 px: every conv at full
# width and resolution, attention over 1024 and 256 tokens) with one transformer layer per attention block instead
# of 2 / 10
_SDXL_THIN = {"transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
              "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1]}
TOKENS = {"flux_4608_tokens": ("flux", "fp32", {"depth": 1, "depth_single_blocks": 1}, 128, 512),
          "sdxl_128_latent": ("sdxl", "fp32", _SDXL_THIN, 128, 77)}
SMOKE = {
    "sdxl": ("sdxl", "fp32", _SDXL_THIN, 16, 77),
    "flux": ("flux", "fp8", {"depth": 1, "depth_single_blocks": 1}, 16, 512),
}


SETS = {"gpu": CONFIGS, "smoke": SMOKE, "tokens": TOKENS}


def run(configs: dict, steps: int, warmup: int) -> dict:
    rows = {}
    for name, (arch, dtype, config, side, tokens) in configs.items():
        row = {"arch": arch, "dtype": dtype, "config": config, "latent_side": side, "text_tokens": tokens,
               "steps": steps, "warmup": warmup}
        for key, method in METHODS:
            t0 = time.time()
            r = worker(method, model=arch, dtype=dtype, config=json.dumps(config), size=side, steps=steps,
                       warmup=warmup, checkpointing=1, **{"text-tokens": tokens})
            row[key] = dict(summary(r), device=r["device"], memory_kind=r["memory_kind"], wall_s=time.time() - t0)
            print(f"{name} {key}: {row[key]['median_s']:.3f} s/step, peak {row[key]['peak_memory_mb']:.0f} MB "
                  f"({r['device']})", flush=True)
        a, a2, b = row["a"], row["a2"], row["b"]
        row["ratios"] = {"time_b/a": b["median_s"] / a["median_s"], "time_b/a2": b["median_s"] / a2["median_s"],
                         "memory_b/a": b["peak_memory_mb"] / a["peak_memory_mb"]}
        rows[name] = row
    return rows


def markdown(res: dict) -> str:
    title = {"gpu": "GPU run (`make bench-gpu`)", "smoke": "Harness check (`--set smoke`: the numbers mean nothing)",
             "tokens": "Real token counts (`python -m bench.gpu --set tokens`)"}[res["set"]]
    device = sorted({r[k]["device"] for r in res["rows"].values() for k in ("a", "a2", "b")})
    lines = [f"# {title}",
             "", f"{res['machine']} ({', '.join(device)}); timed steps after warm-up steps per row; gradient "
             "checkpointing on; a: core Train LoRA, a2: an MSE step with our adapter, b: ours.", "",
             "| row | weights | latent | text tokens | steps | a s/step | a2 s/step | b s/step | b/a | b/a2 | memory b/a |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res["rows"].items():
        q = r["ratios"]
        steps = f"{r.get('steps', res['steps'])} after {r.get('warmup', res['warmup'])}"
        times = [f"{r[k]['median_s']:.3f}" for k in ("a", "a2", "b")] + [f"{q['time_b/a']:.2f}", f"{q['time_b/a2']:.2f}"]
        if not r.get("times_valid", True):  # memory-only rows (another process shared the CPU)
            times = ["n/a"] * len(times)
        lines.append(f"| {name} | {r['dtype']} | {r['latent_side']}x{r['latent_side']} | {r['text_tokens']} | {steps} | "
                     + " | ".join(times) + f" | {q['memory_b/a']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=list(SETS), default="gpu",
                    help="gpu: the real sizes; smoke: the harness at tiny depth (numbers mean nothing); tokens: "
                         "Flux width at 4096 + 512 tokens, one block per stack")
    ap.add_argument("--only", action="append", help="run only these rows")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--exact-rss", action="store_true",
                    help="CPU: freed memory leaves the RSS at once (peak of live memory; slower steps)")
    a = ap.parse_args(argv)
    configs = {k + ("+mmap" if a.exact_rss else ""): v for k, v in SETS[a.set].items() if not a.only or k in a.only}
    if a.exact_rss:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the worker processes
    try:
        rows = run(configs, a.steps, a.warmup)
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None) if a.exact_rss else None
    res = {"set": a.set, "machine": platform.node() or platform.machine(), "steps": a.steps, "warmup": a.warmup,
           "rows": rows}
    path = OUT / f"results-{a.set}.json"
    if a.only and path.exists():  # rows run alone join the set's earlier rows (each stays dated by its own run)
        res["rows"] = {**json.loads(path.read_text()).get("rows", {}), **res["rows"]}
    if a.set != "smoke":  # a smoke run never overwrites measured figures
        path.write_text(json.dumps(res, indent=1))
        (OUT / f"results-{a.set}.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
