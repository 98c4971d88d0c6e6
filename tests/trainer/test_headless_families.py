"""The headless trainer on SDXL, SD3 and Flux.1 diffusers models: the same weights predict what ComfyUI predicts,
the tap is the node's, captions are what diffusers' own pipelines feed, the LoRA loads in ComfyUI as the trained
function, 2 processes x B equal 1 process x 2B, and resume is exact."""
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dev.datasets import make_dataset
from dev.diffusers_fixture import FLOW_SCHEDULERS, comfy_model, diffusers_denoiser, write_model_folder
from dev.host import REPO_ROOT
from tests.trainer.runs import TWO_CPU_PROCESSES, train

pytestmark = pytest.mark.host
FAMILIES = ("sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: write_model_folder(root / f, family=f, text_encoder=True) for f in FAMILIES}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "photos", captions=True)


def comfy_inputs(mp, family, cond, shape):
    """ComfyUI's own model inputs (extra_conds) for a diffusers-style conditioning dict, batch shape[0]."""
    import comfy.sampler_helpers
    import comfy.samplers

    extras = {"pooled_output": cond["pooled"][:1]}
    if family == "sdxl":  # the diffusers convention: size embeddings of the image itself
        extras.update(width=shape[-1] * 8, height=shape[-2] * 8)
    if family == "flux":
        extras["guidance"] = 3.5
    conds = comfy.sampler_helpers.convert_cond([[cond["context"][:1], extras]])
    enc = comfy.samplers.encode_model_conds(mp.model.extra_conds, conds, torch.zeros(shape), torch.device("cpu"),
                                            "positive")
    return {k: v.process_cond(batch_size=shape[0], area=None, device=torch.device("cpu")).cond
            for k, v in enc[0]["model_conds"].items()}


def schedule_of(family):
    from diffusers import DDPMScheduler

    from selfperc_headless.schedules import DiffusersSchedule, FlowSchedule

    if family == "sdxl":
        return DiffusersSchedule(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    return FlowSchedule(FLOW_SCHEDULERS[family], 16)


def random_cond(net, family, batch=2, seed=3):
    from selfperc_headless.families import FAMILIES as F
    from selfperc_headless.families import empty_cond

    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn((batch, *v.shape[1:]), generator=g) for k, v in empty_cond(net, F[family]).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_predictions_and_tapped_features_equal_comfyuis(comfy, pack, family):
    """One set of weights in both layouts (converted by ComfyUI's key maps): x0_hat and the frozen features at the
    tap (mid-block; block n//2 and block 0 of the transformers) equal what ComfyUI computes with the node's tap."""
    import comfy.model_management
    from selfperc_pack.nodes import families

    from selfperc_headless import families as F

    mp = comfy_model(family)
    net = diffusers_denoiser(family, model_patcher=mp)
    shape = (2, 4 if family == "sdxl" else 16, 8, 8)
    cond = random_cond(net, family)
    cond = {k: v[:1].expand_as(v) for k, v in cond.items()}  # ComfyUI repeats one conditioning over the batch
    inputs = comfy_inputs(mp, family, cond, shape)
    sched = schedule_of(family)
    ms = mp.get_model_object("model_sampling")
    sigma = ms.sigma(ms.timestep(torch.tensor([0.4, 2.0]))) if family == "sdxl" else torch.tensor([0.3, 0.8])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    comfy.model_management.load_models_gpu([mp])
    dm = mp.model.diffusion_model
    ours_fn = F.predictor(net, F.FAMILIES[family], sched)
    with torch.no_grad():
        theirs = mp.model.apply_model(x, sigma, **inputs)
        ours = ours_fn(x, sigma, cond)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for depth in (0.5, 0.0):
        ct, tp = families.tap_point(dm, "mid_block", depth), F.tap_point(net, F.FAMILIES[family], depth)
        assert ct.name == tp.name
        with ct, tp, torch.no_grad():
            fc = ct.features(lambda x_, s_: mp.model.apply_model(x_, s_, **inputs), x, sigma)
            fd = tp.features(ours_fn, x, sigma, cond)
        assert fd.ndim == 4 and fd.shape[0] == 2
        torch.testing.assert_close(fd, fc, rtol=1e-4, atol=1e-4)


def test_the_diffusers_sd3_file_loaded_by_comfyuis_own_converter_predicts_the_same(comfy, folders):
    """The other direction: the fixture's diffusers transformer file, converted by ComfyUI's own loader
    (UNETLoader's load_diffusion_model detects the diffusers layout and the SD3 family from it), predicts what the
    diffusers model predicts (SDXL and Flux tiny configs are not detectable: see dev/tiny_families)."""
    import comfy.model_management
    import comfy.sd
    import comfy.supported_models
    from safetensors.torch import load_file as read

    from selfperc_headless import families as F

    folder = folders["sd3"]
    mp = comfy.sd.load_diffusion_model_state_dict(read(str(folder / "transformer" /
                                                           "diffusion_pytorch_model.safetensors")))
    assert type(mp.model.model_config) is comfy.supported_models.SD3
    net = F.load_denoiser(folder, F.FAMILIES["sd3"]).eval()
    shape = (2, 16, 8, 8)
    cond = {k: v[:1].expand_as(v) for k, v in random_cond(net, "sd3").items()}
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    comfy.model_management.load_models_gpu([mp])
    with torch.no_grad():
        theirs = mp.model.apply_model(x, sigma, **comfy_inputs(mp, "sd3", cond, shape))
        ours = F.predictor(net, F.FAMILIES["sd3"], schedule_of("sd3"))(x, sigma, cond)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def pipeline(folder, family):
    """The family's own diffusers pipeline on the fixture folder (to compare what it feeds the denoiser)."""
    import diffusers
    import transformers

    sub = {"text_encoder": None, "text_encoder_2": None, "text_encoder_3": None}
    classes = {"sdxl": (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection),
               "sd3": (transformers.CLIPTextModelWithProjection, transformers.CLIPTextModelWithProjection,
                       transformers.T5EncoderModel),
               "flux": (transformers.CLIPTextModel, transformers.T5EncoderModel)}[family]
    parts = {}
    for (name, _), cls in zip(sub.items(), classes):
        tok = name.replace("text_encoder", "tokenizer")
        if (folder / name).is_dir():
            parts[name] = cls.from_pretrained(folder / name)
            parts[tok] = transformers.AutoTokenizer.from_pretrained(folder / tok)
        else:
            parts[name] = parts[tok] = None
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(vae=None, unet=diffusers.UNet2DConditionModel.from_pretrained(
            folder / "unet"), scheduler=None, **parts)
    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    tr = (diffusers.SD3Transformer2DModel if family == "sd3" else diffusers.FluxTransformer2DModel).from_pretrained(
        folder / "transformer")
    return cls(vae=None, transformer=tr, scheduler=None, **parts)


@pytest.mark.parametrize("family,t5", [("sdxl", True), ("sd3", True), ("sd3", False), ("flux", True)])
def test_captions_are_what_the_diffusers_pipeline_feeds(folders, tmp_path, family, t5):
    """Each family's encoding (context tokens, pooled vector) equals its diffusers pipeline's encode_prompt; SD3
    without text_encoder_3/ gets diffusers' zero T5 tokens."""
    from selfperc_headless import families as F
    from selfperc_headless.captions import encode_texts

    folder = folders[family] if t5 else write_model_folder(tmp_path / "sd3_no_t5", family="sd3",
                                                           text_encoder=True, t5=False)
    pipe = pipeline(folder, family)
    text = "a photo of a cat on a red sofa"
    joint = getattr(pipe.transformer.config, "joint_attention_dim", None) if family != "sdxl" else None
    ours = encode_texts(folder, [text], "cpu", F.FAMILIES[family].text, joint_dim=joint)[text]
    with torch.no_grad():
        if family == "sdxl":
            ctx, _, pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
        elif family == "sd3":
            ctx, _, pooled, _ = pipe.encode_prompt(text, None, None, device="cpu", do_classifier_free_guidance=False)
        else:
            ctx, pooled, _ = pipe.encode_prompt(text, None, device="cpu")
    assert set(ours) == {"context", "pooled"}
    torch.testing.assert_close(ours["context"], ctx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=1e-5, atol=1e-5)
    if family == "sd3" and not t5:
        assert ours["context"].shape[1] == 77 + 256 and not ours["context"][:, 77:].any()


def run_in_process(folder, data_dir, out, *extra):
    """The headless trainer's own main() in this process (as `python -m selfperc_headless.train` runs it), at 64 px;
    returns its Run: the trained peft model and the core Trainer stay inspectable."""
    from selfperc_headless import train as headless

    return headless.main(["--model", str(folder), "--data", str(data_dir), "--out", str(out), "--resolution", "64",
                          *map(str, extra)])


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_lora_loads_in_comfyui_as_the_trained_function(comfy, pack, folders, data_dir, tmp_path, family, caplog):
    """A LoRA trained with captions loads in core ComfyUI with no unloaded keys, and ComfyUI's patched model
    predicts what the trained peft model itself predicts (its own LoRA layers, adapter on), not the base."""
    import comfy.sd

    from selfperc_headless import families as F
    from selfperc_headless.peft_lora import PeftSwitch
    from tests.host.models import loaded_output

    run = run_in_process(folders[family], data_dir, tmp_path / "run", "--steps", 2, "--batch-size", 2, "--lr", "1e-2",
                         "--gradient-checkpointing")
    assert len(run.trainer.losses) == 2 and all(torch.isfinite(torch.tensor(run.trainer.losses)))
    lora = load_file(str(tmp_path / "run" / "selfperc_lora.safetensors"))
    prefix = F.FAMILIES[family].lora_prefix
    assert lora and all(k.startswith(prefix) for k in lora)
    mp = comfy_model(family)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    shape = (2, 4 if family == "sdxl" else 16, 8, 8)
    cond = {k: v[:1].expand_as(v) for k, v in random_cond(run.net, family).items()}
    ms = mp.get_model_object("model_sampling")
    sigma = ms.sigma(ms.timestep(torch.tensor([0.4, 2.0]))) if family == "sdxl" else torch.tensor([0.3, 0.8])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = run.trainer.view.predict_x0(x, sigma, cond)  # peft's trained layers, as the run trained them
        with PeftSwitch(run.net).off():
            base = run.trainer.view.predict_x0(x, sigma, cond)
    theirs = loaded_output(patched, x, sigma, **comfy_inputs(mp, family, cond, shape))
    assert (tuned - base).abs().max() > 1e-2, "the LoRA must change the output for the comparison to mean much"
    torch.testing.assert_close(theirs, tuned, rtol=1e-4, atol=1e-4)


def node_conditioning(family, net):
    """The headless zero conditioning as a ComfyUI CONDITIONING (SDXL: size embeddings of the 64 px image)."""
    from selfperc_headless.families import FAMILIES as F
    from selfperc_headless.families import empty_cond

    zero = empty_cond(net, F[family])
    extras = {"pooled_output": zero["pooled"]}
    if family == "sdxl":
        extras.update(width=64, height=64)
    if family == "flux":
        extras["guidance"] = 3.5
    return [[zero["context"], extras]]


@pytest.mark.parametrize("family,prediction", [("sdxl", "epsilon"), ("sdxl", "v_prediction"), ("sd3", "flow"),
                                               ("flux", "flow")])
def test_the_nodes_mse_baseline_is_the_headless_trainers_mse_on_the_same_batch_and_draws(
        comfy, pack, data_dir, tmp_path, family, prediction):
    """perceptual_weight 0, mse_weight 1, mse_space native in the node's session and in the headless trainer, on one
    set of weights in both layouts, the same latents and the same seed (so the same batch, noise and levels): the
    same loss and the same gradients (the latents' always; the LoRA's too where its layers map one to one, the
    UNet: there a random LoRA is copied from the peft model into the node's)."""
    import dataclasses

    from selfperc_pack.nodes import inputs, lora

    from selfperc_core.loop import Trainer
    from selfperc_headless.peft_lora import kohya_state_dict
    from tests.host.models import as_parameterization, session

    v = prediction == "v_prediction"
    folder = write_model_folder(tmp_path / "model", family=family, prediction_type=prediction if v else "epsilon",
                                zsnr=v)
    run = run_in_process(folder, data_dir, tmp_path / "out", "--steps", 0, "--batch-size", 2, "--captions", "off",
                         "--perceptual-weight", 0, "--mse-weight", 1, "--lr", 0, "--rank", 2, "--alpha", 2, "--seed", 3)
    mp = comfy_model(family)
    if v:
        mp = as_parameterization(mp, "v_zsnr")
    if family == "flux":  # the resolution-dependent shift diffusers' Flux pipelines use, for this 64 px image
        from comfy_extras.nodes_model_advanced import ModelSamplingFlux

        mp = ModelSamplingFlux().patch(mp, 1.15, 0.5, 64, 64)[0]
    unet = family == "sdxl"
    start = None
    if unet:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in run.net.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        start = lora.read_any_lora(mp, kohya_state_dict(run.net, "lora_unet_"), "peft")
    latents = [lat.clone().requires_grad_(True) for lat in run.trainer.latents]
    headless = Trainer(run.params, latents, run.trainer.conds, run.trainer.view, run.trainer.s,
                       optimizer=torch.optim.SGD(run.params, lr=0.0))
    theirs = headless.step()
    grads = [lat.grad for lat in latents]  # the batch's 2 images have one, the others none
    cond = node_conditioning(family, run.net)
    with session(pack, mp, checkpointing=False, rank=2, alpha=2.0, start=start) as ses:
        latents_node = [lat.detach().clone().requires_grad_(True) for lat in run.trainer.latents]
        conds = [inputs.model_inputs(ses.mp, cond, tuple(lat.shape)) for lat in latents_node]
        node = Trainer(ses.params, latents_node, conds, ses.view, dataclasses.replace(run.trainer.s),
                       optimizer=torch.optim.SGD(ses.params, lr=0.0))
        assert node.s.mse_space == "native" and not node.s.perceptual_weight
        ours = node.step()
        node_grads = lora.lora_state_dict(ses.adapters, weights=[p.grad for p in ses.params]) if unet else None
    assert float(theirs.perceptual) == float(ours.perceptual) == 0.0
    assert theirs.loss.item() > 0.05
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-4)
    assert [g is None for g in grads] == [lat.grad is None for lat in latents_node]
    assert sum(g is not None for g in grads) == 2
    for a, b in zip(latents_node, grads):
        if b is not None:
            torch.testing.assert_close(a.grad, b, rtol=1e-3, atol=1e-6)
    if unet:  # the LoRA gradients, as a state dict in the node's keys (peft's mapped by ComfyUI's key map)
        with torch.no_grad():
            saved = {n: p.clone() for n, p in run.net.named_parameters() if p.requires_grad}
            for p in run.params:
                p.copy_(p.grad)
            peft_grads = lora.read_any_lora(mp, kohya_state_dict(run.net, "lora_unet_"), "grads")
            for n, p in run.net.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        mapped = [k for k in peft_grads if not k.endswith(".alpha")]
        assert len(mapped) > 20
        for k in mapped:
            torch.testing.assert_close(node_grads[k], peft_grads[k], rtol=1e-3, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_two_processes_equal_one_process_with_the_double_batch(folders, data_dir, tmp_path, family):
    """accelerate launch, 2 CPU processes (gloo) x batch 1 == 1 process x batch 2, with captions; and the captions
    condition training (the same run with --captions off gives other losses)."""
    one, lora_one = train(folders[family], data_dir, tmp_path / "one", "--steps", 2, "--batch-size", 2)
    two, lora_two = train(folders[family], data_dir, tmp_path / "two", "--steps", 2, "--batch-size", 1,
                          "--caption-cache", tmp_path / "one" / "caption_cache", launcher=TWO_CPU_PROCESSES)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert lora_one.keys() == lora_two.keys()
    diffs = torch.cat([(lora_two[k] - lora_one[k]).abs().flatten() for k in lora_one])
    assert diffs.max() <= 2 * 1e-4 * 2 + 1e-6  # AdamW moves a ~0-gradient weight by up to lr per step
    assert diffs.mean() < 1e-6
    off, _ = train(folders[family], data_dir, tmp_path / "off", "--steps", 2, "--batch-size", 2, "--captions", "off")
    # the tiny random Flux barely listens to its text stream (relative loss change ~3e-6 measured); SDXL's
    # cross-attention does (~1e-1)
    assert off["losses"] != (pytest.approx(one["losses"], rel=1e-4) if family == "sdxl" else one["losses"])


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_continues_exactly(folders, data_dir, tmp_path, family):
    straight, lora_a = train(folders[family], data_dir, tmp_path / "a", "--steps", 3, "--batch-size", 2)
    train(folders[family], data_dir, tmp_path / "b", "--steps", 1, "--batch-size", 2, "--save-every", 1)
    resumed, lora_b = train(folders[family], data_dir, tmp_path / "b", "--steps", 3, "--batch-size", 2,
                            "--resume", tmp_path / "b" / "state-000001")
    assert resumed["losses"] == pytest.approx(straight["losses"][1:], rel=1e-5)
    for k in lora_a:
        torch.testing.assert_close(lora_b[k], lora_a[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["sd", *FAMILIES])
def test_fsdp_wrap_units_are_found_by_accelerate(folders, tmp_path, family):
    """--fsdp's wrap units are the blocks the model has: accelerate's own lookup finds every class name (it refuses
    the plugin otherwise), and those classes cover exactly the checkpointed blocks."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    from selfperc_headless import families as F

    folder = folders[family] if family != "sd" else write_model_folder(tmp_path / "sd")
    net = F.load_denoiser(folder, F.detect(folder))
    names = F.block_class_names(net, F.detect(folder))
    classes = tuple(get_module_class_from_name(net, n) for n in names)
    assert names and None not in classes
    wrapped = {id(m) for m in net.modules() if isinstance(m, classes)}
    assert wrapped == {id(b) for b in F.blocks(net, F.detect(folder))}


def test_fsdp_without_gpus_is_refused_with_a_clear_error(folders, data_dir, tmp_path):
    cmd = [sys.executable, "-m", "selfperc_headless.train", "--model", str(folders["flux"]), "--data", str(data_dir),
           "--out", str(tmp_path / "out"), "--resolution", "64", "--steps", "1", "--fsdp"]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "accelerate enables its FSDP plugin on GPUs only" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out" / "selfperc_lora.safetensors").exists()


def test_fsdp_offload_is_accelerates_cpu_offload_policy_and_needs_fsdp(tmp_path, capsys):
    """--fsdp-offload hands accelerate's FSDP2 plugin the host-offload policy (the one the sharded test below runs
    with), and alone, without --fsdp, it is refused naming both flags."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    from selfperc_headless.train import fsdp_plugin, parse_args

    assert isinstance(fsdp_plugin(True).cpu_offload, CPUOffloadPolicy)
    assert not isinstance(fsdp_plugin(False).cpu_offload, CPUOffloadPolicy)
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--fsdp-offload"])
    assert "--fsdp-offload offloads FSDP's shards: add --fsdp" in capsys.readouterr().err


@pytest.mark.parametrize("family,weights,offload", [("flux", "fp32", False), ("flux", "bf16", False),
                                                    ("flux", "fp32", True)])
def test_the_step_on_an_fsdp2_sharded_model_equals_one_process(folders, data_dir, tmp_path, family, weights, offload):
    """What --fsdp relies on, checked on CPU processes: the self-perceptual step (several forwards per step, the
    adapter toggled for the frozen passes, checkpointed blocks, a tap without early exit) on a denoiser sharded
    with FSDP2's fully_shard over 2 processes x batch 1 equals the unsharded step on 1 process x batch 2; also with
    bf16 frozen weights beside fp32 LoRA weights in one FSDP unit (as --mixed-precision bf16 stores them), and
    with --fsdp-offload's CPUOffloadPolicy (the shards and the optimizer step on the host)."""
    worker = str(REPO_ROOT / "tests" / "trainer" / "fsdp_worker.py")

    def run(n, out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               worker, str(folders[family]), str(data_dir), str(out), *extra]
        res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-4000:]
        return json.loads(out.read_text()), load_file(str(out.with_suffix(".safetensors")))

    extra = ["--bf16"] if weights == "bf16" else []
    one, lora_one = run(1, tmp_path / "one.json", "--batch", "2", *extra)
    two, lora_two = run(2, tmp_path / "two.json", "--shard", "--batch", "1", *extra, *(["--offload"] if offload else []))
    assert two["sharded"] == ["DTensor"] and one["sharded"] == ["Parameter"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5 if weights == "fp32" else 1e-3)
    assert lora_one.keys() == lora_two.keys()
    diffs = torch.cat([(lora_two[k] - lora_one[k]).abs().flatten() for k in lora_one])
    assert diffs.max() <= 2 * 1e-3 * 2 + 1e-6 and diffs.mean() < 1e-5


def test_a_model_folder_that_is_not_one_is_refused_naming_the_file(tmp_path):
    from selfperc_headless import families as F

    with pytest.raises(ValueError, match="not a diffusers model folder"):
        F.detect(tmp_path)
    (tmp_path / "transformer").mkdir()
    big = tmp_path / "transformer" / "config.json"
    big.write_text('{"_class_name": "FluxTransformer2DModel", "pad": "' + "x" * (F.MAX_CONFIG_BYTES + 1) + '"}')
    with pytest.raises(ValueError, match=r"config\.json: \d+ bytes, more than a config"):
        F.detect(tmp_path)
    big.write_text('{"_class_name": "WanTransformer3DModel"}')
    with pytest.raises(ValueError, match="holds a WanTransformer3DModel"):
        F.detect(tmp_path)
