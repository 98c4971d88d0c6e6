"""The headless host: the self-perceptual objective on accelerate + diffusers + peft, outside ComfyUI.

``python -m selfperc_headless.train`` fine-tunes, ``python -m selfperc_headless.evaluate`` measures. The loss,
loop, dataset rules, tap and metrics are selfperc_core's (pure torch); this package only wires them to diffusers
models, peft adapters and accelerate processes, so the core never imports any of those.
"""
