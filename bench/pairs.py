"""`make bench-pairs`: b/c measured over alternating pairs of runs, so one slow or fast process cannot decide it.

Two complete `make bench` runs of the same code gave b/c 0.88 and 0.75 with checkpointing on (0.67 and 0.78
off): each configuration runs once, minutes apart, on a machine whose speed drifts. Here (b) and (c) run back to
back, N times per checkpointing setting, in alternating order (b,c then c,b: a drift favours neither), each in
its own process exactly as `make bench` runs them; each pair gives one b/c. Writes bench/pairs.md (and .json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from bench.run import STEPS, WARMUP, summary, worker
from dev.host import REPO_ROOT


def markdown(res: dict) -> str:
    lines = ["# b/c over alternating pairs (bench/pairs.py)", "",
             f"{res['model']} UNet, latent {res['size']}x{res['size']}, batch 1, LoRA rank 8, {res['steps']} timed "
             f"steps after {res['warmup']} warm-up per process; (b) shipped defaults, (c) naive reference.", ""]
    for name, t in res["settings"].items():
        lines += [f"## Gradient checkpointing {name}", "", "| pair | order | (b) median s | (c) median s | b/c |",
                  "|---|---|---|---|---|"]
        lines += [f"| {i + 1} | {p['order']} | {p['b']:.3f} | {p['c']:.3f} | {p['b/c']:.3f} |"
                  for i, p in enumerate(t["pairs"])]
        s = t["summary"]
        lines += ["", f"b/c over {len(t['pairs'])} pairs: median **{s['median']:.3f}**, min-max "
                      f"{s['min']:.3f}-{s['max']:.3f}; ratio of the medians of all (b) and all (c) steps "
                      f"{s['pooled']:.3f}.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny test UNet (checks the harness)")
    a = ap.parse_args()
    model, size = ("tiny", 8) if a.quick else ("sd15", 32)
    common = dict(model=model, size=size, batch=1, rank=8, steps=STEPS, warmup=WARMUP)
    res = {"model": model, "size": size, "steps": STEPS, "warmup": WARMUP, "settings": {}}
    out = REPO_ROOT / "bench" / ("out/quick-pairs" if a.quick else "pairs")
    out.parent.mkdir(parents=True, exist_ok=True)
    for ckpt in (1, 0):
        pairs, steps = [], {"b": [], "c": []}
        for i in range(a.pairs):
            order = ("b", "c") if i % 2 == 0 else ("c", "b")
            med = {}
            for key in order:
                print(f"[pairs] checkpointing={ckpt} pair {i + 1} {key}", file=sys.stderr, flush=True)
                r = worker("selfperc" if key == "b" else "naive", checkpointing=ckpt, **common)
                med[key] = summary(r)["median_s"]
                steps[key] += r["step_times"]
            pairs.append({"order": ",".join(order), "b": med["b"], "c": med["c"], "b/c": med["b"] / med["c"]})
        ratios = [p["b/c"] for p in pairs]
        res["settings"]["on" if ckpt else "off"] = {
            "pairs": pairs, "summary": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                        "pooled": statistics.median(steps["b"]) / statistics.median(steps["c"])}}
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
