"""Benchmark: cost of a self-perceptual step against ComfyUI's own Train LoRA (see bench/run.py)."""
