"""`make demo`: fine-tune, compare and evaluate, in a real ComfyUI server, on a model this project builds.

1. Builds (once, cached in demo_output/models) a small SD3-architecture model trained on scikit-learn's
   handwritten digits, whose unguided samples are blurry digits, about half clearly recognisable
   (see dev/demo_model.py).
2. Starts the real ComfyUI server with this pack, that checkpoint and two dataset folders of digits: one to
   fine-tune on, one held out for the evaluation.
3. Runs one workflow through the HTTP API, with a console progress bar fed by ComfyUI's websocket:
   - a self-perceptual LoRA fine-tune (the paper's loss) and, as the honest baseline, the same LoRA fine-tune
     with plain MSE instead (perceptual_weight 0, mse_weight 1), everything else equal;
   - Self-Perceptual Evaluate: base, self-perceptual and MSE-baseline models sample from identical noise
     without guidance (cfg 1) and are compared with the held-out digits (FD / KID in the base model's
     features, with their spread over resamples);
   - Perceptual Distance between a digit and the same digit with a blot.
4. Prints the evaluation table and what it shows, and copies the images, both LoRAs and the UI-format workflow
   to demo_output/results.

`python -m dev.demo --serve` opens the same server, model and folders for the browser.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

from dev import demo_model, workflows
from dev.host import REPO_ROOT, ComfyServer, execution_error

OUT = REPO_ROOT / "demo_output"
TRAIN_FOLDER, TRAIN_COUNT = "demo_digits", demo_model.TRAIN_COUNT  # digits 0..1199: base and fine-tunes
HELDOUT_FOLDER = "demo_digits_heldout"                # digits 1200..1796 (597) to evaluate against
FINE_TUNE = dict(steps=300, learning_rate=5e-4, batch_size=16, rank=8, alpha=8.0, seed=1)
EVALUATE = dict(sample_count=128, steps=20, bootstraps=30, max_dataset_images=597, seed=0)


def demo_graph(ckpt_name: str, fine_tune: dict = FINE_TUNE, evaluate: dict = EVALUATE) -> dict:
    """The demo's workflow, as a spec for dev.workflows.build (UI format; the demo saves it for the browser)."""
    res = demo_model.RES
    alpha = fine_tune.get("alpha", 8.0)
    tune = dict({k: v for k, v in fine_tune.items() if k != "alpha"}, vae=(1, 2), model=(1, 0), conditioning=(2, 0),
                dataset_folder=TRAIN_FOLDER, resolution=res, lora=(17, 0))
    return {
        "title": "selfperc_demo",
        "note": ("The demo: a self-perceptual LoRA and the same LoRA trained with plain MSE (the baseline), then "
                 "both against the base model on held-out digits, without guidance. The table says whether a "
                 "difference is beyond its spread."),
        "nodes": {
            1: ("CheckpointLoaderSimple", {"ckpt_name": ckpt_name}, (40, 120), (320, 100)),
            2: ("CLIPTextEncode", {"clip": (1, 1), "text": ""}, (40, 280), (320, 120)),
            3: ("SelfPerceptualFineTune", dict(tune, lora_name="selfperc/demo_selfperceptual", objective=(15, 0)),
                (400, 120), (360, 420)),
            4: ("SelfPerceptualFineTune", dict(tune, lora_name="selfperc/demo_mse_baseline", objective=(16, 0)),
                (400, 920), (360, 420)),
            # the paper's objective, and the baseline: the same LoRA with plain MSE in the model's own loss space
            15: ("SelfPerceptualObjective", {"perceptual_weight": 1.0, "mse_weight": 0.0}, (-340, 120), (340, 380)),
            16: ("SelfPerceptualObjective", {"perceptual_weight": 0.0, "mse_weight": 1.0, "mse_space": "native"},
                 (-340, 920), (340, 380)),
            17: ("SelfPerceptualLoraOptions", {"alpha": alpha, "overwrite": True}, (-340, 520), (340, 300)),
            5: ("SelfPerceptualEvaluate", dict(evaluate, base_model=(1, 0), model=(3, 0), baseline_model=(4, 0),
                                               vae=(1, 2), positive=(2, 0), dataset_folder=HELDOUT_FOLDER,
                                               resolution=res), (800, 120), (360, 600)),
            6: ("SaveImage", {"images": (5, 0), "filename_prefix": "selfperc/demo_evaluation"}, (1200, 120),
                (520, 300)),
            7: ("SaveImage", {"images": (5, 2), "filename_prefix": "selfperc/demo_samples"}, (1200, 460),
                (520, 420)),
            8: ("PreviewAny", {"source": (5, 1)}, (800, 760), (360, 300)),
            9: ("SaveImage", {"images": (3, 4), "filename_prefix": "selfperc/demo_loss_selfperceptual"},
                (1760, 120), (400, 300)),
            10: ("SaveImage", {"images": (4, 4), "filename_prefix": "selfperc/demo_loss_mse_baseline"},
                 (1760, 460), (400, 300)),
            11: ("LoadImage", {"image": "demo_digit.png"}, (40, 1100), (320, 320)),
            12: ("LoadImage", {"image": "demo_digit_blot.png"}, (40, 1460), (320, 320)),
            13: ("SelfPerceptualDistance", {"model": (1, 0), "vae": (1, 2), "image_a": (11, 0), "image_b": (12, 0),
                                            "conditioning": (2, 0)}, (400, 1700), (340, 300)),
            14: ("SaveImage", {"images": (13, 0), "filename_prefix": "selfperc/demo_heatmap"}, (800, 1700),
                 (400, 420)),
        },
    }


def progress_printer(server: ComfyServer, stop: threading.Event):
    """Print ComfyUI's websocket progress (the node's bar + its loss text) on one console line."""
    import asyncio

    import aiohttp

    async def run():
        url = f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}"
        text = ""
        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            while not stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:4] == (3).to_bytes(4, "big"):
                    n = int.from_bytes(msg.data[4:8], "big")
                    text = msg.data[8 + n:].decode("utf-8", "replace")
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data.get("type") == "progress":
                        v, m = data["data"]["value"], data["data"]["max"]
                        bar = "#" * int(30 * v / max(m, 1))
                        print(f"\r  [{bar:<30}] {v}/{m}  {text if 'loss' in text else ''}   ", end="", flush=True)
                    elif data.get("type") == "executing":
                        text = ""  # the loss line belongs to the node that sent it
                        if data["data"].get("node") is None:
                            print(flush=True)
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return

    try:
        asyncio.run(run())
    except Exception as e:  # the bar is a convenience; the run goes on without it
        print(f"  (no live progress: {e})")


def prepare(base: Path, out: Path = OUT, base_steps: int = demo_model.BASE_STEPS, log=print) -> Path:
    """The checkpoint (built once), linked into the server's models/, and the dataset folders in input/."""
    from PIL import Image

    ckpt = demo_model.build(out / "models", steps=base_steps, log=log)
    dst = base / "models" / "checkpoints" / ckpt.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(ckpt)
    demo_model.write_digit_folder(base / "input" / TRAIN_FOLDER, TRAIN_COUNT)
    digits = demo_model.digit_images()
    demo_model.write_digit_folder(base / "input" / HELDOUT_FOLDER, len(digits) - TRAIN_COUNT, offset=TRAIN_COUNT)
    digit = digits[TRAIN_COUNT]
    Image.fromarray(digit).save(base / "input" / "demo_digit.png")
    blot = digit.copy()
    blot[8:24, 40:56] = 255  # a white square in the upper right: the heatmap should light up there
    Image.fromarray(blot).save(base / "input" / "demo_digit_blot.png")
    return ckpt


def summary(report: dict) -> list[str]:
    """What the numbers show, in plain words, whatever they show."""
    from selfperc_core.evaluation import verdict

    out = []
    for space, metrics in report["metrics"].items():
        for metric in ("KID", "FD"):
            rows = metrics.get(metric, {})
            for name, s in rows.items():
                if " - " in name:
                    out.append(f"  {space} {metric}, {name}: {verdict(s)}")
    kid = report["metrics"]["self"]["KID"].get("fine-tuned - baseline")
    if kid is not None:
        v = verdict(kid)
        word = ("beat" if v.startswith("better") else "did worse than" if v.startswith("worse")
                else "could not be told apart from")
        out.append(f"  In short: on this model and these digits the self-perceptual LoRA {word} the same LoRA trained "
                   f"with plain MSE (KID in the base model's features, {report['samples']} samples each).")
    return out


def run_demo(port: int | None = None, out: Path = OUT, base_steps: int = demo_model.BASE_STEPS,
             fine_tune: dict = FINE_TUNE, evaluate: dict = EVALUATE) -> dict:
    """The whole demo; returns the evaluation report. Smaller settings make the quick run the tests use."""
    from selfperc_core.evaluation import report_lines

    base = out / "comfy"
    results = out / "results"
    t0 = time.time()
    ckpt = prepare(base, out, base_steps)
    print(f"[demo] model ready: {ckpt.name} ({time.time() - t0:.0f}s)")
    srv = ComfyServer(base, port=port).start()
    print(f"[demo] ComfyUI {srv.url} (base directory {os.path.relpath(base)})")
    try:
        info = srv.get("/object_info")
        stop = threading.Event()
        threading.Thread(target=progress_printer, args=(srv, stop), daemon=True).start()
        time.sleep(0.5)
        ui_workflow = workflows.build(demo_graph(ckpt.name, fine_tune, evaluate), info)
        prompt = workflows.to_api(ui_workflow, info)
        print(f"[demo] fine-tuning twice on {TRAIN_COUNT} digits ({fine_tune['steps']} steps each: self-perceptual, "
              f"then the plain-MSE baseline), then evaluating on {HELDOUT_FOLDER}")
        entry = srv.run(prompt, timeout=3600)
        check(entry, srv)
        stop.set()
    finally:
        srv.stop()
    results.mkdir(parents=True, exist_ok=True)
    (results / "demo_workflow.json").write_text(json.dumps(ui_workflow, indent=1) + "\n")
    for node, name in (("6", "evaluation_table.png"), ("7", "samples_base_selfperceptual_mse.png"),
                       ("9", "loss_selfperceptual.png"), ("10", "loss_mse_baseline.png"),
                       ("14", "distance_heatmap.png")):
        copy_image(srv, entry, node, results / name)
    for name in ("demo_selfperceptual", "demo_mse_baseline"):
        shutil.copy(base / "models" / "loras" / "selfperc" / f"{name}.safetensors", results / f"{name}.safetensors")
    report = json.loads(entry["outputs"]["8"]["text"][0])
    (results / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + "\n".join(report_lines(report)))
    print("\n[demo] what the numbers show (differences' 5-95% interval over resamples):")
    print("\n".join(summary(report)))
    print(f"\n[demo] done in {time.time() - t0:.0f}s. Results in {os.path.relpath(results)}/:")
    for p in sorted(results.iterdir()):
        print(f"  {os.path.relpath(p)}")
    print("[demo] One small model, one seed: a measurement on this model and data, not a verdict on the method.")
    print("[demo] Open the UI on the same model and files:  .venv/bin/python -m dev.demo --serve  "
          "(then http://127.0.0.1:8188; drag demo_output/results/demo_workflow.json in)")
    return report


def check(entry: dict, srv: ComfyServer) -> None:
    err = execution_error(entry)
    if err:
        raise SystemExit(f"[demo] failed in {err.get('node_type')}: {err.get('exception_message')}\n"
                         f"{srv.log_tail(2000)}")


def copy_image(srv: ComfyServer, entry: dict, node: str, dest: Path, kind: str = "images") -> None:
    img = entry["outputs"][node][kind][0]
    folder = {"output": "output", "temp": "temp"}[img.get("type", "output")]
    shutil.copy(srv.base / folder / img["subfolder"] / img["filename"], dest)


def serve(port: int) -> None:
    base = OUT / "comfy"
    prepare(base)
    srv = ComfyServer(base, port=port).start()
    print(f"[demo] ComfyUI with the pack and the demo model: {srv.url}  (Ctrl-C to stop)")
    print("[demo] Workflow templates: menu Workflow > Browse Templates > comfyui-selfperc")
    try:
        while srv.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="store_true", help="only start the server for the browser")
    ap.add_argument("--port", type=int, default=None)
    a = ap.parse_args()
    serve(a.port or 8188) if a.serve else run_demo(a.port)


if __name__ == "__main__":
    main()
