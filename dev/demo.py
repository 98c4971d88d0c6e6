"""`make demo`: the fine-tune workflow, run in a real ComfyUI server on a model this project builds.

1. Builds (once, cached in demo_output/models) a tiny SD1.x model and a TAESD-shaped VAE trained briefly on the
   photos that scikit-image ships (see dev/demo_model.py).
2. Starts the real ComfyUI server with this pack, the demo model and a dataset folder of those photos.
3. Runs workflows/selfperc_fine_tune_compare.json through the HTTP API (checkpoint, dataset and sizes set for
   the demo), with a console progress bar fed by ComfyUI's websocket, then the perceptual-distance workflow.
4. Copies the LoRA, the loss curve, the no-CFG comparison grid and a distance heatmap to demo_output/results.

What this shows is the mechanics, not a quality gain: on a model this small self-perceptual fine-tuning is not
expected to improve samples (see README). `python -m dev.demo --serve` opens the same server for the browser.
"""
from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

from dev import demo_model, workflows
from dev.datasets import make_dataset, photo
from dev.host import REPO_ROOT, ComfyServer, execution_error

OUT = REPO_ROOT / "demo_output"


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


def prepare(base: Path, log=print) -> Path:
    models = OUT / "models"
    ckpt = demo_model.build(models, log=log)
    srv_models = base / "models"
    for sub, name in (("checkpoints", ckpt.name), ("vae_approx", "taesd_encoder.safetensors"),
                      ("vae_approx", "taesd_decoder.safetensors")):
        (srv_models / sub).mkdir(parents=True, exist_ok=True)
        dst = srv_models / sub / name
        if not dst.exists():
            dst.symlink_to(models / sub / name)
    make_dataset(base / "input" / "demo_photos", captions=False, sizes={})
    return ckpt


def run_demo(port: int | None) -> None:
    base = OUT / "comfy"
    results = OUT / "results"
    t0 = time.time()
    ckpt = prepare(base)
    print(f"[demo] model ready: {ckpt.relative_to(REPO_ROOT)} ({time.time() - t0:.0f}s)")
    srv = ComfyServer(base, port=port).start()
    print(f"[demo] ComfyUI {srv.url} (base directory {base.relative_to(REPO_ROOT)})")
    try:
        info = srv.get("/object_info")
        stop = threading.Event()
        threading.Thread(target=progress_printer, args=(srv, stop), daemon=True).start()
        time.sleep(0.5)

        prompt = workflows.to_api(workflows.load("selfperc_fine_tune_compare.json"), info)
        workflows.set_widgets(prompt, ckpt_name=ckpt.name, dataset_folder="demo_photos", resolution=demo_model.RES, width=demo_model.RES, height=demo_model.RES,
                   lora_name="selfperc/demo_lora", overwrite=True, steps=60, learning_rate=5e-5, batch_size=4,
                   save_every=0, preview_every=20)
        prompt["3"]["inputs"]["batch_size"] = 4
        prompt["4"]["inputs"].update(steps=20, seed=3)
        print("[demo] workflow 1: self-perceptual fine-tune (60 steps) -> base vs fine-tuned, cfg 1.0")
        entry = srv.run(prompt, timeout=1800)
        check(entry, srv)
        results.mkdir(parents=True, exist_ok=True)
        copy_image(srv, entry, "5", results / "comparison_grid_no_cfg.png")
        copy_image(srv, entry, "6", results / "loss_curve.png", kind="images")
        shutil.copy(base / "models" / "loras" / "selfperc" / "demo_lora.safetensors", results / "demo_lora.safetensors")

        a = photo("chelsea")
        from PIL import Image
        img_a = Image.fromarray(a).resize((144, 96))
        img_b = img_a.copy()
        img_b.paste(Image.fromarray(photo("coffee")).resize((40, 40)), (84, 28))
        img_a.save(base / "input" / "demo_a.png")
        img_b.save(base / "input" / "demo_b.png")
        prompt = workflows.to_api(workflows.load("selfperc_perceptual_distance.json"), info)
        workflows.set_widgets(prompt, ckpt_name=ckpt.name)
        prompt["2"]["inputs"]["image"], prompt["3"]["inputs"]["image"] = "demo_a.png", "demo_b.png"
        print("[demo] workflow 2: perceptual distance (a cat photo vs the same with a pasted patch)")
        entry = srv.run(prompt, timeout=600)
        check(entry, srv)
        copy_image(srv, entry, "5", results / "distance_heatmap.png")
        stop.set()
    finally:
        srv.stop()
    print(f"\n[demo] done in {time.time() - t0:.0f}s. Results in {results.relative_to(REPO_ROOT)}/:")
    for p in sorted(results.iterdir()):
        print(f"  {p.relative_to(REPO_ROOT)}")
    print("[demo] This shows the mechanics on a tiny model; no quality gain is claimed (see README).")
    print("[demo] Open the UI on the same model and files:  .venv/bin/python -m dev.demo --serve  "
          "(then http://127.0.0.1:8188)")


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
