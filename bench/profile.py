"""`make bench-profile`: where the time of a self-perceptual step goes, against the naive reference.

Two parts, one process, the same model, latents and LoRA as `make bench` (SD1.5 UNet, checkpointing off):
  1. the step's components timed on their own (median of 3 after a warm-up): the online forward + backward,
     the frozen pass to the tap without grad (target), with grad + backward to its input (prediction), and the
     same two through the naive full network. From them, the step time each method would take if nothing but
     its passes cost anything, so b/c's best case on this machine is known from measurement, not FLOPs alone;
  2. torch.profiler over one Trainer step of (b) and (c): the operators that take the time.
Writes bench/profile.md (and .json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch

from bench.worker import latents_for, load_model, selfperc_trainer
from dev.host import REPO_ROOT, import_pack


def timed(fn, n: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def components(model, lat, a) -> dict:
    from selfperc_pack.nodes.session import training_session

    from bench.naive import naive_frozen_features

    x0 = model.model.process_latent_in(lat[:a.batch])
    sigma = torch.full((a.batch,), 2.0)
    out = {}
    with torch.inference_mode(False), training_session(model, a.rank, float(a.rank), 0, "mid_block", False) as ses:
        naive, _copy = naive_frozen_features(ses.mp)

        def online():
            ses.predict_x0(x0, sigma, None).square().mean().backward()

        def fwd_bwd(features):
            def run():
                x = x0.clone().requires_grad_(True)
                features(x, sigma, None).square().mean().backward()
            return run

        def no_grad(features):
            def run():
                with torch.no_grad():
                    features(x0, sigma, None)
            return run

        out["online forward+backward (adapter on)"] = timed(online)
        out["tap: forward, no grad (target)"] = timed(no_grad(ses.frozen_features))
        out["tap: forward + backward to input (prediction)"] = timed(fwd_bwd(ses.frozen_features))
        out["naive: full forward, no grad (target)"] = timed(no_grad(naive))
        out["naive: full forward + backward to input (prediction)"] = timed(fwd_bwd(naive))
    return out


def op_table(model, lat, a, naive: bool, top: int = 12) -> tuple[float, list[dict]]:
    """One profiled Trainer step (after a warm-up step): total seconds, the operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with selfperc_trainer(model, lat, a, naive=naive) as tr:
        tr.step()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            tr.step()
        total = time.perf_counter() - t0
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return total, [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in rows]


def markdown(res: dict) -> str:
    c = res["components"]
    lines = ["# Where the time of a self-perceptual step goes (bench/profile.py)", "",
             f"SD1.5 UNet (random weights), latent {res['size']}x{res['size']}, batch {res['batch']}, LoRA rank "
             f"{res['rank']}, checkpointing off, device {res['device']}.", "",
             "## Components (median of 3, seconds)", "", "| component | s |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in c.items()]
    m = res["model"]
    lines += ["", "Step time if only these passes cost anything (the optimizer and loss are negligible):", "",
              f"- (b) = online + tap target + tap prediction = **{m['b']:.2f} s**",
              f"- (c) = online + full target + full prediction = **{m['c']:.2f} s**",
              f"- best-case b/c on this machine = **{m['b/c']:.2f}** (FLOP-count view: {m['b/c_flops']:.2f})", ""]
    for key, label in (("b", "(b) shipped defaults"), ("c", "(c) naive reference")):
        total, rows = res["profile"][key]
        lines += [f"## torch.profiler, one step of {label}: {total:.2f} s (with profiler overhead)", "",
                  "| operator | self CPU s | calls |", "|---|---|---|"]
        lines += [f"| {r['op']} | {r['self_s']:.3f} | {r['calls']} |" for r in rows] + [""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    ap.add_argument("--flops", type=str, default=None,
                    help="results.json of `make bench` (default: the one for --model), for the FLOP-count view")
    args = ap.parse_args()
    a = SimpleNamespace(batch=args.batch, rank=8, checkpointing=False)
    torch.manual_seed(0)
    import_pack()
    model = load_model(args.model)
    lat = latents_for(args.size, max(4, args.batch))
    comp = components(model, lat, a)
    online = comp["online forward+backward (adapter on)"]
    b = online + comp["tap: forward, no grad (target)"] + comp["tap: forward + backward to input (prediction)"]
    c = (online + comp["naive: full forward, no grad (target)"]
         + comp["naive: full forward + backward to input (prediction)"])
    try:
        default = REPO_ROOT / "bench" / ("results.json" if args.model == "sd15" else "out/quick-results.json")
        f = json.loads(open(args.flops or default).read())["flops"]
        tap, full, step = f["forward_to_tap"], f["forward_full"], f["mse_step"]
        flops_bc = (step + 3 * tap) / (step + 2 * full + tap)  # prediction backward ~ its forward (input grads)
    except (OSError, KeyError, ValueError):
        flops_bc = float("nan")
    res = {"size": args.size, "batch": args.batch, "rank": 8, "device": "cuda" if torch.cuda.is_available() else "cpu",
           "components": comp, "model": {"b": b, "c": c, "b/c": b / c, "b/c_flops": flops_bc},
           "profile": {"b": op_table(model, lat, a, naive=False), "c": op_table(model, lat, a, naive=True)}}
    out = REPO_ROOT / "bench" / ("profile" if args.model == "sd15" else "out/quick-profile")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
