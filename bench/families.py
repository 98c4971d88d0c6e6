"""Seconds per self-perceptual training step of the node's loop on the tiny fixture of every family
(dev/tiny_families.py, random weights, latent of a 64 px image, batch 2, rank 4, checkpointing on) on this
machine: what a step costs per architecture at toy size, not a prediction for real sizes.

``python -m bench.families`` writes bench/families.md.
"""
from __future__ import annotations

import statistics
import time

import torch

import tests  # noqa: F401  bind the repo's tests namespace before ComfyUI's tree is on sys.path
from dev.host import REPO_ROOT, import_comfy, import_pack


def step_seconds(family: str, steps: int = 5, warmup: int = 1) -> tuple[float, int, str]:
    from selfperc_pack.nodes import inputs
    from selfperc_pack.nodes.session import SessionSpec, training_session
    from selfperc_pack.selfperc_core.loop import Trainer, TrainSettings

    from dev.tiny_families import latent_shape, tiny_conditioning, tiny_model

    mp, shape = tiny_model(family), latent_shape(family, None, side=8)
    g = torch.Generator().manual_seed(0)
    lat = [torch.randn(shape[1:], generator=g) for _ in range(4)]
    with torch.inference_mode(False), training_session(mp, SessionSpec(latent_shape=shape[1:], batch=2)) as ses:
        conds = [inputs.model_inputs(ses.mp, tiny_conditioning(family), shape[1:])] * len(lat)
        tr = Trainer(ses.params, lat, conds, ses.view, TrainSettings(batch_size=2))
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            tr.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        n = sum(p.numel() for p in mp.model.diffusion_model.parameters())
        return statistics.median(times), n, ses.tap_name


def main() -> None:
    import_comfy()
    import_pack()
    from dev.tiny_families import FAMILIES, latent_shape

    rows = ["| family | params | latent (batch 1) | tap | s / step (median of 5) |", "| --- | --- | --- | --- | --- |"]
    for fam in FAMILIES:
        s, n, tap = step_seconds(fam)
        rows.append(f"| {fam} | {n / 1e6:.2f}M | {tuple(latent_shape(fam, None, side=8))} | {tap} | {s:.3f} |")
        print(rows[-1], flush=True)
    text = (f"# Step cost per family (tiny fixtures, {torch.get_num_threads()} CPU threads)\n\n{__doc__}\n"
            + "\n".join(rows) + "\n")
    (REPO_ROOT / "bench" / "families.md").write_text(text)


if __name__ == "__main__":
    main()
