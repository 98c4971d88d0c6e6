"""`make bench`: a self-perceptual step against ComfyUI's core Train LoRA (MSE), measured side by side.

In one run, on the same model (the full SD1.5 UNet architecture, random weights), latents, batch, LoRA rank,
dtype, seed and gradient-checkpointing setting, each configuration in its own process:
  (a) core Train LoRA node (MSE), as ComfyUI calls it
  (b) Self-Perceptual Fine-Tune's loop with its shipped defaults (mid-block, early exit, LoRA off = frozen)
  (c) the naive reference (bench/naive.py: deep-copied frozen model, two full forward passes)
  (d) (b) with one choice toggled: early exit off; batched frozen passes on
Reports medians and min-max of step time after warm-up, peak memory (process peak RSS on CPU, CUDA max
allocated on GPU), ratios, the FLOP-count floor, and a scaling table. `--quick` runs on the tiny test UNet.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dev.host import REPO_ROOT
from selfperc_core.loop import TrainSettings

# (d2) toggles whatever the shipped default of the frozen passes is
_D2 = (("selfperc_separate", "(b) with separate frozen passes") if TrainSettings().batched_frozen
       else ("selfperc_batched", "(b) with batched frozen passes"))
WIDE_MARKER = "<!-- bench.wide: everything below is written by `make bench-wide` -->"
STEPS, WARMUP = 3, 1  # timed steps after warm-up steps, per configuration process (also bench/pairs.py)
MAIN = [("a", "core_train_lora", "core Train LoRA (MSE)"),
        ("a2", "mse_same_lora", "MSE step with our LoRA (floor baseline)"),
        ("b", "selfperc", "self-perceptual, shipped defaults"),
        ("c", "naive", "naive reference (frozen copy, 2 full passes)"),
        ("d1", "selfperc_no_early_exit", "(b) with early exit off"),
        ("d2", *_D2)]


def worker(method: str, **kw) -> dict:
    args = [sys.executable, "-m", "bench.worker", method] + [f"--{k}={v}" for k, v in kw.items()]
    res = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def summary(r: dict) -> dict:
    t = r["step_times"]
    return {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "n": len(t),
            "peak_memory_mb": r["peak_memory_bytes"] / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny test UNet, few steps (checks the harness)")
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args()
    model = "tiny" if a.quick else "sd15"
    size, steps, warmup = (8, STEPS, WARMUP) if a.quick else (32, a.steps or STEPS, WARMUP)
    sizes = [8, 12] if a.quick else [16, 24, 32]
    out_dir = REPO_ROOT / "bench" / ("out" if a.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    common = dict(model=model, steps=steps, warmup=warmup, rank=8)
    t0 = time.time()
    res = {"model": model, "latent_size": size, "batch": 1, "rank": 8, "steps": steps, "warmup": warmup,
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "tables": {}}
    res["flops"] = worker("flops", model=model, size=size, batch=1)
    f = res["flops"]
    res["floor_ratio"] = 1 + 3 * f["forward_to_tap"] / f["mse_step"]
    for ckpt in (1, 0):
        table = {}
        for key, method, label in MAIN:
            print(f"[bench] checkpointing={ckpt} {key}: {label}", file=sys.stderr, flush=True)
            r = worker(method, size=size, batch=1, checkpointing=ckpt, **common)
            table[key] = dict(summary(r), label=label, device=r["device"], memory_kind=r["memory_kind"])
        med = {k: v["median_s"] for k, v in table.items()}
        mem = {k: v["peak_memory_mb"] for k, v in table.items()}
        table["ratios"] = {"time_b/a": med["b"] / med["a"], "time_c/a": med["c"] / med["a"],
                           "time_b/c": med["b"] / med["c"], "time_b/floor": med["b"] / (med["a2"] * res["floor_ratio"]),
                           "time_b/a2": med["b"] / med["a2"],
                           "time_d1/b": med["d1"] / med["b"], "time_d2/b": med["d2"] / med["b"],
                           "memory_b/a": mem["b"] / mem["a"], "memory_c/a": mem["c"] / mem["a"]}
        res["tables"][f"checkpointing_{'on' if ckpt else 'off'}"] = table
        save(res, out_dir, a.quick)  # keep what is measured even if a later part is cut short
    scaling = []
    for s in sizes:
        for b in (1, 2):
            print(f"[bench] scaling latent {s} batch {b}", file=sys.stderr, flush=True)
            ra = summary(worker("core_train_lora", size=s, batch=b, checkpointing=1, **common))
            ra2 = summary(worker("mse_same_lora", size=s, batch=b, checkpointing=1, **common))
            rb = summary(worker("selfperc", size=s, batch=b, checkpointing=1, **common))
            scaling.append({"latent_size": s, "batch": b, "a_median_s": ra["median_s"],
                            "a2_median_s": ra2["median_s"], "b_median_s": rb["median_s"],
                            "b/a": rb["median_s"] / ra["median_s"], "b/a2": rb["median_s"] / ra2["median_s"]})
            res["scaling"] = scaling
            save(res, out_dir, a.quick)
    res["total_s"] = time.time() - t0
    save(res, out_dir, a.quick)
    print(markdown(res))


def save(res: dict, out_dir: Path, quick: bool) -> None:
    name = "quick-results" if quick else "results"
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = out_dir / f"{name}.md"
    tail = ""  # keep the section `make bench-wide` writes (bench/wide.py)
    if md.exists() and WIDE_MARKER in md.read_text():
        tail = "\n" + WIDE_MARKER + md.read_text().split(WIDE_MARKER, 1)[1]
    md.write_text(markdown(res) + tail)


def markdown(res: dict) -> str:
    f = res["flops"]
    lines = [f"# Benchmark: self-perceptual step vs core Train LoRA ({res['model']} UNet)", "",
             f"Latent {res['latent_size']}x{res['latent_size']}, batch {res['batch']}, LoRA rank {res['rank']}, "
             f"{res['steps']} timed steps after {res['warmup']} warm-up, one process per configuration, "
             f"device {res['tables']['checkpointing_on']['a']['device']} ({res['machine']}); "
             f"memory = {res['tables']['checkpointing_on']['a']['memory_kind']}.", "",
             f"FLOPs (torch.utils.flop_counter): MSE LoRA step {f['mse_step'] / 1e9:.1f} GFLOP, forward to the "
             f"mid-block {f['forward_to_tap'] / 1e9:.1f} GFLOP, full forward {f['forward_full'] / 1e9:.1f} GFLOP. "
             f"Floor for (b) = 1 + 3 x tap / MSE step = **{res['floor_ratio']:.2f} x (a2)**, where (a2) is an MSE "
             f"step with exactly our LoRA and checkpointing (core Train LoRA (a) patches its LoRA into every weight "
             f"on every forward and also trains bias/norm offsets, so it is not the same amount of work; ours runs "
             f"beside each layer, see README).", ""]
    for name, t in res["tables"].items():
        lines += [f"## Gradient checkpointing {name.split('_')[1]}", "",
                  "| | configuration | step median (s) | min-max (s) | peak memory (MB) |", "|---|---|---|---|---|"]
        for k in ("a", "a2", "b", "c", "d1", "d2"):
            v = t[k]
            lines.append(f"| {k} | {v['label']} | {v['median_s']:.3f} | {v['min_s']:.3f}-{v['max_s']:.3f} | "
                         f"{v['peak_memory_mb']:.0f} |")
        r = t["ratios"]
        lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in r.items()] + [""]
    lines += ["## Scaling (checkpointing on)", "",
              "| latent | batch | (a) median s | (a2) median s | (b) median s | b/a | b/a2 |", "|---|---|---|---|---|---|---|"]
    for s in res.get("scaling", []):
        lines.append(f"| {s['latent_size']} | {s['batch']} | {s['a_median_s']:.3f} | {s['a2_median_s']:.3f} | "
                     f"{s['b_median_s']:.3f} | {s['b/a']:.2f} | {s['b/a2']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
