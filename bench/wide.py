"""`make bench-wide`: the self-perceptual step on the architectures people train, at their real width.

Per architecture of bench/archs.py (random weights, fp32, this machine), with gradient checkpointing on and off,
each configuration in its own process (bench/worker.py, the harness of `make bench`):
  (a)  core Train LoRA (MSE), as ComfyUI calls it
  (a2) an MSE step with our adapter (the baseline of the FLOP floor)
  (b)  our step with the shipped defaults (UNets: mid-block; transformers: the block at depth 0.5),
       and for transformers (b) at tap depth 0.25 and 0.75
Targets: time b/floor <= 1.15, peak memory b/a <= 1.15, time b/a <= 1.0.

Then the memory model: activation memory of (b) (checkpointing on) measured above the weights at two sizes per
architecture (and two depths for the transformers: Flux.1, Qwen-Image, SD3.5 Large, Wan 14B), fitted as linear in
tokens (pixels) and blocks, and used to predict each at full depth at 1024x1024 on a GPU (bf16 activations), and
what fits on an 8 / 12 / 16 / 24 GiB card.

``python -m bench.wide [sdxl flux qwen_image scaling memory memory:NAME,...]`` runs those parts (default all; memory:
those architectures' probes only) and rewrites the wide section of bench/results.md; results are kept in
bench/results-wide.json, so parts can be rerun alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.archs import ARCHS
from bench.run import STEPS, WARMUP, summary, worker
from bench.run import WIDE_MARKER as MARKER
from dev.host import REPO_ROOT

SIZES = {"sdxl": 32, "flux": 16, "qwen_image": 16}  # latent side benchmarked (32: 256 px; 16: 128 px)
# Weights: SDXL in bf16, because core Train LoRA without checkpointing keeps a patched copy of every weight for
# backward and with fp32 weights (10.3 GB) that ran this 24 GB machine out of memory; the rest in fp32.
DTYPES = {"sdxl": "bf16", "flux": "fp32", "qwen_image": "fp32", "sd35_large": "fp32", "wan21_14b": "fp32"}
DEPTHS = (0.25, 0.5, 0.75)
TARGETS = {"time_b/floor": 1.15, "memory_b/a": 1.15, "time_b/a": 1.0}
JSON = REPO_ROOT / "bench" / "results-wide.json"
MD = REPO_ROOT / "bench" / "results.md"
GIB = 2**30
# Memory probes: (architecture, latent side, unet_config overrides); the mmap threshold makes freed tensors
# leave the RSS at once, so peak RSS minus the RSS before the steps is the step's activation memory. Per
# transformer: two sizes at one depth and a second depth, which the fit tokens x (c + blocks x s) needs.
PROBES = [("sdxl", 32, {}), ("sdxl", 64, {}),
          ("flux", 16, {"depth": 2, "depth_single_blocks": 4}), ("flux", 48, {"depth": 2, "depth_single_blocks": 4}),
          ("flux", 48, {"depth": 1, "depth_single_blocks": 2}),
          *[(name, side, {key: n}) for name, key in (("qwen_image", "num_layers"), ("sd35_large", "num_blocks"),
                                                     ("wan21_14b", "num_layers"))
            for side, n in ((32, 2), (64, 2), (64, 4))]]
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# Parameters of the released models where the probes cannot extrapolate them (Flux's double and single blocks
# differ in size); the others: from the probes' two depths, linear in blocks
KNOWN_PARAMS = {"flux": 11.9e9}
CARDS_GIB = (8, 12, 16, 24)
CONTEXT_GIB = 0.5  # CUDA context
ALLOCATOR_SHARE = 0.1  # of the card, for the allocator's fragmentation


def is_unet(name: str) -> bool:
    return name == "sdxl"


def run_arch(name: str, steps: int, warmup: int) -> dict:
    size = SIZES[name]
    common = dict(model=name, size=size, batch=1, rank=8, steps=steps, warmup=warmup, dtype=DTYPES[name])
    depths = (0.5,) if is_unet(name) else DEPTHS
    res = {"note": ARCHS[name].note, "dtype": DTYPES[name], "latent_size": size, "text_tokens": ARCHS[name].tokens, "flops": {},
           "tables": {}}
    for d in depths:
        print(f"[bench-wide] {name} flops depth {d}", file=sys.stderr, flush=True)
        res["flops"][str(d)] = worker("flops", model=name, size=size, batch=1, depth=d, dtype=DTYPES[name])
    for ckpt in (1, 0):
        rows = {}
        configs = [("a", "core_train_lora", 0.5, "core Train LoRA (MSE)"),
                   ("a2", "mse_same_lora", 0.5, "MSE step with our LoRA (floor baseline)")]
        configs += [(f"b@{d}" if d != 0.5 else "b", "selfperc", d,
                     "self-perceptual, shipped defaults" + ("" if is_unet(name) else f" (tap {res['flops'][str(d)]['tap']})")
                     if d == 0.5 else f"self-perceptual, tap depth {d} ({res['flops'][str(d)]['tap']})")
                    for d in depths]
        for key, method, d, label in configs:
            print(f"[bench-wide] {name} checkpointing={ckpt} {key}", file=sys.stderr, flush=True)
            try:
                r = worker(method, checkpointing=ckpt, depth=d, **common)
            except RuntimeError as e:
                if key != "a":
                    raise
                # core Train LoRA failing is a result (e.g. its in-place autograd error on Flux without
                # checkpointing); our rows still run
                rows[key] = {"label": label, "error": str(e).strip().splitlines()[-1][:300]}
                continue
            rows[key] = dict(summary(r), label=label, device=r["device"], memory_kind=r["memory_kind"])
            if key.startswith("b"):
                f = res["flops"][str(d)]
                rows[key]["floor_s"] = rows["a2"]["median_s"] * (1 + 3 * f["forward_to_tap"] / f["mse_step"])
        med = {k: v.get("median_s") for k, v in rows.items()}
        mem = {k: v.get("peak_memory_mb") for k, v in rows.items()}

        def ratio(x, y):
            return None if x is None or y is None else x / y
        rows["ratios"] = {"time_b/a": ratio(med["b"], med["a"]), "time_b/floor": med["b"] / rows["b"]["floor_s"],
                          "memory_b/a": ratio(mem["b"], mem["a"]), "time_b/a2": med["b"] / med["a2"]}
        for d in depths:
            if d != 0.5:
                rows["ratios"][f"time_b@{d}/floor"] = med[f"b@{d}"] / rows[f"b@{d}"]["floor_s"]
                rows["ratios"][f"time_b@{d}/a"] = ratio(med[f"b@{d}"], med["a"])
        res["tables"][f"checkpointing_{'on' if ckpt else 'off'}"] = rows
    return res


SCALING = [("flux", 48)]  # (a), (a2), (b) at more tokens, checkpointing on: how b/a moves with the token count


def run_scaling(steps: int, warmup: int) -> list[dict]:
    out = []
    for name, size in SCALING:
        common = dict(model=name, size=size, batch=1, rank=8, steps=steps, warmup=warmup, dtype=DTYPES[name],
                      checkpointing=1)
        row = {"model": name, "latent_size": size, "tokens": tokens(name, size)}
        for key, method in (("a", "core_train_lora"), ("a2", "mse_same_lora"), ("b", "selfperc")):
            print(f"[bench-wide] scaling {name} latent {size} {key}", file=sys.stderr, flush=True)
            row[key] = summary(worker(method, **common))["median_s"]
        out.append(row)
    return out


def run_probes(steps: int, only: set | None = None) -> list[dict]:
    """The memory probes (``only``: of these architectures)."""
    out = []
    os.environ.update(MALLOC)  # inherited by the worker processes
    try:
        for name, size, cfg in PROBES:
            if only and name not in only:
                continue
            print(f"[bench-wide] memory probe {name} latent {size} {cfg}", file=sys.stderr, flush=True)
            r = worker("activations", model=name, size=size, batch=1, rank=8, steps=steps, warmup=1,
                       checkpointing=1, config=json.dumps(cfg, separators=(",", ":")), dtype=DTYPES[name])
            out.append(dict(r, model=name, latent_size=size, config=cfg, tokens=tokens(name, size)))
    finally:
        for k in MALLOC:
            os.environ.pop(k, None)
    return out


def tokens(name: str, side: int) -> int:
    """Sequence length a transformer block sees (image patches, plus the text where it joins them) at the benchmark's
    text tokens, or latent pixels for a UNet."""
    if is_unet(name):
        return side * side
    return ARCHS[name].sequence(side, ARCHS[name].tokens)


def blocks(name: str, cfg: dict) -> int:
    return 0 if is_unet(name) else ARCHS[name].blocks(cfg)


def _transformer_model(name: str, probes: list[dict]) -> dict | None:
    """Fit activation bytes = tokens x (c + blocks x s) to one transformer's probes and predict 1024x1024 at full
    depth (bf16 activations); the weights from the known count or the probes' two depths."""
    import numpy as np

    arch = ARCHS[name]
    if len({p["tokens"] for p in probes}) < 2 or len({blocks(name, p["config"]) for p in probes}) < 2:
        return None
    a = np.array([[p["tokens"], p["tokens"] * blocks(name, p["config"])] for p in probes], dtype=float)
    (c, s), *_ = np.linalg.lstsq(a, np.array([p["activation_bytes"] for p in probes], dtype=float), rcond=None)
    n_tok, n_blk = arch.sequence(128, arch.text_tokens_1024), sum(arch.real_blocks.values())
    act = n_tok * (c + n_blk * s) * (0.5 if DTYPES[name] == "fp32" else 1.0)
    if name in KNOWN_PARAMS:
        params, source = KNOWN_PARAMS[name], "published count"
    else:
        by_depth = {blocks(name, p["config"]): p["weight_bytes"] / 4 for p in probes}  # fp32 probes
        (n1, p1), (n2, p2) = sorted(by_depth.items())[:2]
        params, source = p1 + (n_blk - n1) * (p2 - p1) / (n2 - n1), "extrapolated from the probes' two depths"
    return {"c_bytes_per_token": c, "s_bytes_per_token_block": s, "tokens_1024": n_tok, "blocks": n_blk,
            "fit": [{"tokens": p["tokens"], "blocks": blocks(name, p["config"]),
                     "measured_mb": p["activation_bytes"] / 2**20, "fitted_mb": f / 2**20}
                    for p, f in zip(probes, a @ np.array([c, s]))],
            "params": params, "params_source": source, "activations_gib": act / GIB,
            "weights_gib": {"fp8": params / GIB, "bf16": 2 * params / GIB}}


def memory_model(probes: list[dict]) -> dict:
    """Fit activation bytes = tokens x (c + blocks x s) (transformers) or c0 + k x pixels (SDXL) and predict
    1024x1024."""
    import numpy as np

    model = {}
    sdxl = [p for p in probes if p["model"] == "sdxl"]
    if len(sdxl) >= 2:
        # a constant part (one layer's recompute, LoRA, buffers) plus a part linear in latent pixels
        a = np.array([[1.0, p["tokens"]] for p in sdxl])
        (c0, k), *_ = np.linalg.lstsq(a, np.array([p["activation_bytes"] for p in sdxl], dtype=float), rcond=None)
        act = (c0 + k * 128 * 128) * (0.5 if DTYPES["sdxl"] == "fp32" else 1.0)  # latent 128x128, bf16
        params = 2.567e9  # the SDXL UNet's parameters
        model["sdxl"] = {"constant_bytes": c0, "bytes_per_pixel": k, "params": params,
                         "params_source": "published count", "activations_gib": act / GIB,
                         "weights_gib": {"fp16": 2 * params / GIB}}
    for name in ARCHS:
        mine = [p for p in probes if p["model"] == name]
        if not is_unet(name) and (m := _transformer_model(name, mine)):
            model[name] = m
    return model


def card_verdict(weights_gib: float, activations_gib: float, card_gib: float) -> str:
    """What a card of ``card_gib`` does with this model: "fits (R spare)" when the weights fit beside the activations,
    "stream: W" (the weights_on_device_gb to set, rounded down to 0.5) when they do not, "no" when even the
    activations do not."""
    room = card_gib - CONTEXT_GIB - ALLOCATOR_SHARE * card_gib - activations_gib
    if room <= 0.5:
        return "no"
    if weights_gib <= room:
        return f"fits ({room - weights_gib:.1f} spare)"
    return f"stream: {int(room * 2) / 2:g}"


FIT_NAMES = {"sdxl": "SDXL UNet", "flux": "Flux.1-dev", "qwen_image": "Qwen-Image", "sd35_large": "SD3.5 Large",
             "wan21_14b": "Wan 2.1 / 2.2 14B (one frame)"}


def fits_table(model: dict) -> list[str]:
    """The what-fits-where table (markdown lines) of a memory model."""
    lines = ["| 1024x1024, checkpointing on | weights | activations | "
             + " | ".join(f"{c} GiB card" for c in CARDS_GIB) + " |", "|" + " --- |" * (3 + len(CARDS_GIB))]
    for name, m in model.items():
        for dtype, w in m["weights_gib"].items():
            lines.append(f"| {FIT_NAMES.get(name, name)}, {dtype} weights | {w:.1f} GiB | {m['activations_gib']:.1f} GiB | "
                         + " | ".join(card_verdict(w, m["activations_gib"], c) for c in CARDS_GIB) + " |")
    return lines


def load() -> dict:
    return json.loads(JSON.read_text()) if JSON.exists() else {"archs": {}}


def save(res: dict) -> None:
    JSON.write_text(json.dumps(res, indent=2) + "\n")
    head = MD.read_text().split(MARKER)[0].rstrip() + "\n\n" if MD.exists() else ""
    MD.write_text(head + MARKER + "\n\n" + markdown(res))


def markdown(res: dict) -> str:
    lines = ["# Full-width architectures (`make bench-wide`)", "",
             f"Random weights (fp32, SDXL bf16: see each section) on this machine's CPU ({res.get('machine', '')}), batch 1, LoRA rank 8, "
             f"{res.get('steps', STEPS)} timed steps after {res.get('warmup', WARMUP)} warm-up, one process per "
             "configuration; memory = peak RSS over the timed steps. (a) core Train LoRA, (a2) an MSE step with "
             "our adapter, (b) our step; floor = (a2) x (1 + 3 x forward-to-tap / MSE step) from the FLOP count "
             "at the tap used. Targets: time b/floor <= 1.15, memory b/a <= 1.15, time b/a <= 1.0.", ""]
    for name, r in res["archs"].items():
        lines += [f"## {name}: {r['note']}", "",
                  f"Weights {r['dtype']}, latent {r['latent_size']}x{r['latent_size']}" + ("" if is_unet(name) else
                                                                     f", {r['text_tokens']} text tokens") + ". "
                  + "FLOPs: " + "; ".join(f"tap {f['tap']}: MSE step {f['mse_step'] / 1e9:.0f} GFLOP, forward to "
                                          f"tap {f['forward_to_tap'] / 1e9:.0f}, full forward "
                                          f"{f['forward_full'] / 1e9:.0f}" for f in r["flops"].values()), ""]
        for t_name, t in r["tables"].items():
            lines += [f"### Gradient checkpointing {t_name.split('_')[1]}", "",
                      "| | configuration | step median (s) | min-max (s) | floor (s) | peak memory (MB) |",
                      "|---|---|---|---|---|---|"]
            for k, v in t.items():
                if k == "ratios":
                    continue
                if "error" in v:
                    lines.append(f"| {k} | {v['label']} | **failed**: `{v['error']}` | | | |")
                    continue
                floor = f"{v['floor_s']:.2f}" if "floor_s" in v else ""
                lines.append(f"| {k} | {v['label']} | {v['median_s']:.2f} | {v['min_s']:.2f}-{v['max_s']:.2f} | "
                             f"{floor} | {v['peak_memory_mb']:.0f} |")
            lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
            for k, v in t["ratios"].items():
                target = TARGETS.get(k)
                if v is None:
                    lines.append(f"| {k} | n/a ((a) failed) | {'' if target is None else f'<= {target}'} | n/a |")
                    continue
                lines.append(f"| {k} | {v:.2f} | {'' if target is None else f'<= {target}'} | "
                             f"{'' if target is None else ('yes' if v <= target else '**no**')} |")
            lines.append("")
    if res.get("scaling"):
        lines += ["## How b/a moves with the token count (checkpointing on)", "",
                  "Core Train LoRA patches its LoRA into every weight on every forward, a cost fixed per step; our "
                  "step's extra frozen passes grow with the tokens. So b/a rises towards b/a2 as images grow.", "",
                  "| model | latent | tokens | (a) s | (a2) s | (b) s | b/a | b/a2 |", "|---|---|---|---|---|---|---|---|"]
        rows = []
        for sc in res["scaling"]:
            t = res["archs"].get(sc["model"], {}).get("tables", {}).get("checkpointing_on")
            if t and "median_s" in t.get("a", {}):
                small = res["archs"][sc["model"]]["latent_size"]
                rows.append({"model": sc["model"], "latent_size": small, "tokens": tokens(sc["model"], small),
                             "a": t["a"]["median_s"], "a2": t["a2"]["median_s"], "b": t["b"]["median_s"]})
            rows.append(sc)
        for r in rows:
            lines.append(f"| {r['model']} | {r['latent_size']} | {r['tokens']} | {r['a']:.2f} | {r['a2']:.2f} | "
                         f"{r['b']:.2f} | {r['b'] / r['a']:.2f} | {r['b'] / r['a2']:.2f} |")
        lines.append("")
    m = res.get("memory_model")
    if m:
        lines += ["## Predicted peak memory at 1024x1024 (batch 1, checkpointing on, GPU, bf16 activations)", "",
                  "Model: peak = weights + activations; activations measured on this CPU as peak RSS above "
                  "the RSS before the step (probes below; SDXL with bf16 weights, the transformers fp32 at their "
                  "real width and 2-6 blocks), fitted by least squares as SDXL: bytes = c0 + k x latent pixels, "
                  "transformers: bytes = tokens x (c + blocks x s); fp32 activations are halved for bf16. Tokens: "
                  "the image's 2x2 patches plus, where the text joins the sequence, the text (at 1024 px: Flux 512 T5 "
                  "tokens, SD3.5 77 CLIP + 77 T5, Qwen-Image 256 assumed; Wan's text enters by cross-attention). "
                  "Parameters: the published count where blocks differ in size (Flux), else extrapolated from the "
                  "probes' two depths. Assumes attention memory linear in tokens (SDPA's flash / memory-efficient "
                  "kernels, as on a GPU) and excludes the CUDA context (~0.5 GB) and allocator fragmentation. Where "
                  "the fit over-predicts the smallest probe, memory grew faster than linear between the probes, so "
                  "the prediction at 4,000+ tokens may be low.", "",
                  "| probe | tokens (pixels) | blocks | activation (MB) |", "|---|---|---|---|"]
        for p in res.get("probes", []):
            lines.append(f"| {p['model']} latent {p['latent_size']} {p['config'] or ''} | {p['tokens']} | "
                         f"{blocks(p['model'], p['config']) or 'all'} | {p['activation_bytes'] / 2**20:.0f} |")
        lines += ["", "| model | parameters | tokens at 1024 px | activations (GiB) | fit (measured / fitted MB) |",
                  "|---|---|---|---|---|"]
        for k, v in m.items():
            fit = "; ".join(f"{f['tokens']} x {f['blocks']}: {f['measured_mb']:.0f} / {f['fitted_mb']:.0f}"
                            for f in v.get("fit", []))
            lines.append(f"| {FIT_NAMES.get(k, k)} | {v['params'] / 1e9:.2f}B ({v['params_source']}) | "
                         f"{v.get('tokens_1024', 128 * 128)} | {v['activations_gib']:.2f} | {fit or 'pixels linear'} |")
        lines += ["", f"What fits where: a card holds the CUDA context ({CONTEXT_GIB} GiB), {ALLOCATOR_SHARE:.0%} of "
                  "itself for the allocator, the activations and then the weights; where the weights do not fit, "
                  "`weights_on_device_gb` streams the rest from system RAM.", "", *fits_table(m)]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", default=[*SIZES, "scaling", "memory"])
    ap.add_argument("--steps", type=int, default=STEPS)
    a = ap.parse_args()
    import platform

    res = load()
    res.update(machine=f"{platform.machine()} {platform.processor() or ''}".strip(), steps=a.steps, warmup=WARMUP)
    for part in a.parts:
        t0 = time.time()
        if part == "scaling":
            res["scaling"] = run_scaling(a.steps, WARMUP)
        elif part == "memory" or part.startswith("memory:"):  # memory:NAME,NAME reruns those probes only
            only = set(part.split(":", 1)[1].split(",")) if ":" in part else None
            kept = [p for p in res.get("probes", []) if only and p["model"] not in only]
            res["probes"] = kept + run_probes(1, only)
            res["memory_model"] = memory_model(res["probes"])
        else:
            res["archs"][part] = run_arch(part, a.steps, WARMUP)
        res.setdefault("seconds", {})[part] = time.time() - t0
        save(res)
    print(markdown(res))


if __name__ == "__main__":
    main()
