"""The trainer's self-perceptual step on an FSDP2-sharded denoiser, on CPU processes (gloo).

accelerate turns its FSDP plugin on only on GPUs, so this worker shards with torch's ``fully_shard`` -- the call
accelerate's FSDP2 plugin makes for each block and then the root -- and otherwise runs the trainer's own pieces
(LoRA, adapter switch, tap without early exit, checkpointed blocks, the core loop). Run under
``python -m torch.distributed.run --nproc_per_node N tests/trainer/fsdp_worker.py MODEL DATA OUT.json [--shard]
[--offload]``.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from selfperc_core.adapter import checkpoint_forward  # noqa: E402
from selfperc_core.dataset import load_dataset  # noqa: E402
from selfperc_core.loop import Distributed, Trainer, TrainSettings  # noqa: E402
from selfperc_headless import families as fam  # noqa: E402
from selfperc_headless.captions import encode_captions  # noqa: E402
from selfperc_headless.peft_lora import PeftSwitch, kohya_state_dict  # noqa: E402
from selfperc_headless.train import add_lora, encode, make_view  # noqa: E402


def main(model_dir: Path, data_dir: Path, out: Path, shard: bool, steps: int = 2, batch: int = 1,
         weights: torch.dtype = torch.float32, offload: bool = False) -> None:
    from diffusers import AutoencoderKL

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    family = fam.detect(model_dir)
    ds = load_dataset(data_dir, 64)
    conds = encode_captions(model_dir, ds.captions, out.parent / f"cache-{rank}", "cpu", family.text,
                            joint_dim=getattr(fam.load_denoiser(model_dir, family).config, "joint_attention_dim",
                                              None), log=lambda *_: None)
    latents = encode(AutoencoderKL.from_pretrained(model_dir / "vae").eval(), ds.images, "cpu")
    net = fam.load_denoiser(model_dir, family, weights).requires_grad_(False)  # the LoRA stays fp32
    add_lora(net, 4, 4.0, seed=0)
    switch = PeftSwitch(net)
    for blk in fam.blocks(net, family):
        checkpoint_forward(blk, switch)
    if shard:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        # --fsdp-offload's policy (accelerate passes CPUOffloadPolicy()); unpinned: no accelerator here
        policy = CPUOffloadPolicy(pin_memory=False) if offload else OffloadPolicy()
        for blk in fam.blocks(net, family):
            fully_shard(blk, offload_policy=policy)
        fully_shard(net, offload_policy=policy)
    params = [p for p in net.parameters() if p.requires_grad]
    schedule = fam.load_schedule(model_dir, family, (8, 8))
    view = make_view(net, net, family, schedule, switch, 0.5, 3.5, early_exit=not shard)
    settings = TrainSettings(steps=steps, learning_rate=1e-3, batch_size=batch, seed=0)
    trainer = Trainer(params, latents, conds, view, settings, device=torch.device("cpu"), dist=Distributed(rank, world))
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == torch.bfloat16):  # as acc.autocast()
            loss = trainer.step().loss.clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    lora = kohya_state_dict(net, family.lora_prefix)  # every rank: gathers the shards
    if rank == 0:
        from safetensors.torch import save_file

        save_file(lora, str(out.with_suffix(".safetensors")))
        out.write_text(json.dumps({"losses": losses, "sharded": [type(p).__name__ for p in params[:1]]}))
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still gathers or writes
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), "--shard" in sys.argv,
         batch=int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 1,
         weights=torch.bfloat16 if "--bf16" in sys.argv else torch.float32, offload="--offload" in sys.argv)
    # The result is written; skip the interpreter's teardown, where a rank of the CPU-offload run once aborted
    # ("terminate called without an active exception": a C++ thread freed while still joinable).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
