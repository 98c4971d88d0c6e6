"""The headless trainer run as a user runs it: a subprocess, optionally under accelerate launch."""
import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from dev.host import REPO_ROOT

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TWO_CPU_PROCESSES = ACCELERATE + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                                  "no", "--dynamo_backend", "no"]


def train(model_dir, data_dir, out, *extra, launcher=None):
    """Run the trainer at 64 px; returns (its loss log, its LoRA file's tensors)."""
    cmd = (launcher or [sys.executable]) + ["-m", "selfperc_headless.train", "--model", str(model_dir), "--data",
                                            str(data_dir), "--out", str(out), "--resolution", "64",
                                            "--log-json", str(out / "log.json"), *map(str, extra)]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "selfperc_lora.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600
    return json.loads((out / "log.json").read_text()), load_file(str(out / "selfperc_lora.safetensors"))
