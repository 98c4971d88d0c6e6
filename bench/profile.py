"""`make bench-profile`: where the time of a self-perceptual step goes, against the naive reference.

Two parts, one process, the same model, latents and LoRA as `make bench` (SD1.5 UNet), with gradient
checkpointing off and on:
  1. the step's components timed on their own (median of 5 after a warm-up), with the peak memory each adds:
     the online forward + backward, the frozen pass to the tap without grad (target), with grad + backward to
     its input (prediction), and the same two through the naive full network. From them, the step time each
     method would take if nothing but its passes cost anything, so b/c's best case on this machine is known from
     measurement, not FLOPs alone. With checkpointing on, also the prediction pass run NOT checkpointed, to
     show what its recompute costs in time and saves in memory;
  2. torch.profiler over one Trainer step of (b) and (c): the operators that take the time.
Writes bench/profile.md (and .json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from types import SimpleNamespace

import torch

from bench.worker import latents_for, load_model, on_cuda, seconds, selfperc_trainer
from dev.host import REPO_ROOT, import_pack

ONLINE = "online forward+backward (adapter on)"
TAP_TARGET, TAP_PRED = "tap: forward, no grad (target)", "tap: forward + backward to input (prediction)"
FULL_TARGET = "naive: full forward, no grad (target)"
FULL_PRED = "naive: full forward + backward to input (prediction)"


def extra_peak_mb(fn) -> float:
    """Peak memory one run of ``fn`` adds above what is allocated before it (tensor memory, MB).

    CUDA: the allocator's peak. CPU: process RSS cannot show it (freed memory stays resident), so the CPU
    allocator's allocations and frees are replayed from a torch.profiler trace, in op order.
    """
    if on_cuda():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds(fn)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        seconds(fn)
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def timed(fn, n: int = 5) -> dict:
    """Median seconds of ``n`` runs after a warm-up (min, max too), then one more run for its peak memory."""
    seconds(fn)  # warm-up
    times = [seconds(fn) for _ in range(n)]
    return {"s": statistics.median(times), "min": min(times), "max": max(times), "extra_mb": extra_peak_mb(fn)}


@contextlib.contextmanager
def not_checkpointed(ses):
    """The session's model without checkpointing (for the frozen prediction pass alone)."""
    from selfperc_pack.nodes.families import checkpointed_blocks
    from selfperc_pack.selfperc_core.adapter import checkpoint_forward, uncheckpoint_forward

    blocks = checkpointed_blocks(ses.mp.model.diffusion_model)
    for b in blocks:
        uncheckpoint_forward(b)
    try:
        yield
    finally:
        for b in blocks:
            checkpoint_forward(b, ses.switch)


def components(model, lat, a) -> dict:
    from selfperc_pack.nodes import bridge
    from selfperc_pack.nodes.session import SessionSpec, training_session

    from bench.naive import naive_frozen_features

    x0 = model.model.process_latent_in(lat[:a.batch]).to(bridge.device())
    sigma = torch.full((a.batch,), 2.0, device=x0.device)
    out = {}
    with torch.inference_mode(False), training_session(model, SessionSpec(
            a.rank, float(a.rank), checkpointing=a.checkpointing)) as ses:
        naive, _copy = naive_frozen_features(ses.mp, checkpointing=a.checkpointing)

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

        out[ONLINE] = timed(online)
        out[TAP_TARGET] = timed(no_grad(ses.frozen_features))
        out[TAP_PRED] = timed(fwd_bwd(ses.frozen_features))
        out[FULL_TARGET] = timed(no_grad(naive))
        out[FULL_PRED] = timed(fwd_bwd(naive))
        if a.checkpointing:
            with not_checkpointed(ses):
                out[TAP_PRED + ", this pass not checkpointed"] = timed(fwd_bwd(ses.frozen_features))
    return out


def op_table(model, lat, a, naive: bool, top: int = 12) -> tuple[float, list[dict]]:
    """One profiled Trainer step (after a warm-up step): total seconds, the operators by self time (on a GPU,
    self GPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = on_cuda()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with selfperc_trainer(model, lat, a, naive=naive) as tr:
        seconds(tr.step)
        with profile(activities=acts) as prof:
            total = seconds(tr.step)

    def self_us(e):
        return e.self_device_time_total if cuda else e.self_cpu_time_total
    rows = sorted(prof.key_averages(), key=self_us, reverse=True)[:top]
    return total, [{"op": e.key, "self_s": self_us(e) / 1e6, "calls": e.count} for e in rows]


def best_case(comp: dict, flops: dict | None, checkpointing: bool) -> dict:
    """Step times if only the passes cost anything, and b/c from the FLOP count for comparison."""
    b = comp[ONLINE]["s"] + comp[TAP_TARGET]["s"] + comp[TAP_PRED]["s"]
    c = comp[ONLINE]["s"] + comp[FULL_TARGET]["s"] + comp[FULL_PRED]["s"]
    res = {"b": b, "c": c, "b/c": b / c, "b/c_flops": float("nan")}
    if flops:
        # Units of FLOPs; a backward to the input only ~ its forward; checkpointing re-runs each forward that
        # gradients pass through once more (the online pass, and the prediction pass up to the tap).
        tap, full, step = flops["forward_to_tap"], flops["forward_full"], flops["mse_step"]
        rc = 1 if checkpointing else 0
        online = step + rc * full
        res["b/c_flops"] = (online + 3 * tap + rc * tap) / (online + 2 * full + tap + rc * tap)
    return res


def markdown(res: dict) -> str:
    lines = ["# Where the time of a self-perceptual step goes (bench/profile.py)", "",
             f"{res['model_name']} (random weights), latent {res['size']}x{res['size']}, batch {res['batch']}, LoRA rank "
             f"{res['rank']}, device {res['device']}. Extra peak MB: the most tensor memory a component allocates "
             "above what is allocated before it (CUDA: allocator peak; CPU: replayed from a profiler trace).", ""]
    for setting in res["settings"]:
        c, m = setting["components"], setting["model"]
        on = "on" if setting["checkpointing"] else "off"
        lines += [f"## Gradient checkpointing {on}", "",
                  "### Components (median of 5 after a warm-up)", "",
                  "| component | s | min-max s | extra peak MB |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['s']:.3f} | {v['min']:.3f}-{v['max']:.3f} | {v['extra_mb']:.0f} |"
                  for k, v in c.items()]
        lines += ["", "Step time if only these passes cost anything (the optimizer and loss are negligible):", "",
                  f"- (b) = online + tap target + tap prediction = **{m['b']:.2f} s**",
                  f"- (c) = online + full target + full prediction = **{m['c']:.2f} s**",
                  f"- best-case b/c on this machine = **{m['b/c']:.2f}** (FLOP-count view: {m['b/c_flops']:.2f})",
                  ""]
        for key, label in (("b", "(b) shipped defaults"), ("c", "(c) naive reference")):
            total, rows = setting["profile"][key]
            lines += [f"### torch.profiler, one step of {label}: {total:.2f} s (with profiler overhead)", "",
                      f"| operator | self {'GPU' if res['device'] == 'cuda' else 'CPU'} s | calls |", "|---|---|---|"]
            lines += [f"| {r['op']} | {r['self_s']:.3f} | {r['calls']} |" for r in rows] + [""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    ap.add_argument("--checkpointing", type=int, choices=[0, 1], nargs="+", default=[0, 1])
    ap.add_argument("--flops", type=str, default=None,
                    help="results.json of `make bench` (default: the one for --model), for the FLOP-count view")
    args = ap.parse_args()
    torch.manual_seed(0)
    import_pack()
    model = load_model(args.model)
    lat = latents_for(args.size, max(4, args.batch))
    try:
        default = REPO_ROOT / "bench" / ("results.json" if args.model == "sd15" else "out/quick-results.json")
        flops = json.loads(open(args.flops or default).read())["flops"]
    except (OSError, KeyError, ValueError):
        flops = None
    settings = []
    for ckpt in args.checkpointing:
        a = SimpleNamespace(batch=args.batch, rank=8, checkpointing=bool(ckpt), depth=0.5,
                            conditioning=None)  # the shipped tap, the empty prompt (as make bench)
        comp = components(model, lat, a)
        settings.append({"checkpointing": a.checkpointing, "components": comp,
                         "model": best_case(comp, flops, a.checkpointing),
                         "profile": {"b": op_table(model, lat, a, naive=False),
                                     "c": op_table(model, lat, a, naive=True)}})
    res = {"model_name": "SD1.5 UNet" if args.model == "sd15" else "tiny test UNet", "size": args.size,
           "batch": args.batch, "rank": 8, "device": "cuda" if on_cuda() else "cpu",
           "settings": settings}
    out = REPO_ROOT / "bench" / ("profile" if args.model == "sd15" else "out/quick-profile")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
