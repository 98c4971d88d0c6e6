"""Prompt-to-Prompt on ComfyUI's UNets: the source and target prompts sampled together as [sources, targets] in
one batch, with attn1 / attn2 replace patches on every transformer block of the UNet that hand the target the
source's attention maps (selfperc_core.attention_edit's edits), and local blending of the two branches'
predictions.

Source rows always go through the host's own attention function (ComfyUI's optimized_attention), so the source
images are what a plain sample of the source prompt gives; maps are computed (float32) only for the rows, layers
and steps an edit or the map image needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import comfy.model_patcher
import comfy.samplers
import torch

from ..selfperc_core import attention_edit as core
from ..selfperc_core import inversion as inv_core
from .inversion import Inversion, _StartAt, check_same_family, check_sampler, check_sigmas
from .joint_attention import check_override_free, joint_layout, override
from .prompt_tokens import Prompt, aligned, encode, word_positions

MODES = core.EDIT_MODES
# Deterministic k-diffusion steps: the source and target rows start from the same noise and stay comparable only
# if the sampler adds none of its own (ancestral / SDE samplers draw different noise for each row).
DETERMINISTIC = ("sample_euler", "sample_heun", "sample_heunpp2", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m",
                 "sample_ipndm", "sample_ipndm_v", "sample_deis", "sample_res_multistep", "sample_unipc",
                 "sample_unipc_bh2", "sample_gradient_estimation")
MAX_WORDS = 32          # reweight / blend entries
BLEND_START = 0.2       # local blending starts after this fraction of the steps (the maps settle first)


# ---- the plan ----------------------------------------------------------------------------------------------

def parse_words(text: str, weighted: bool, what: str) -> list[tuple[str, float]]:
    """``word:weight, other words:weight`` (weighted) or ``word, other words``."""
    out = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        w = 1.0
        if weighted:
            word, sep, num = item.rpartition(":")
            if not sep:
                raise ValueError(f"{what}: {item!r} has no weight; write word:weight, e.g. 'red:2.0'")
            try:
                w = float(num)
            except ValueError:
                raise ValueError(f"{what}: the weight {num.strip()!r} of {word.strip()!r} is not a number") from None
            if not math.isfinite(w) or not 0.0 <= w <= 10.0:
                raise ValueError(f"{what}: the weight {w:g} of {word.strip()!r} is outside 0..10")
            item = word.strip()
        if not item:
            raise ValueError(f"{what}: an entry has no word")
        out.append((item, w))
    if len(out) > MAX_WORDS:
        raise ValueError(f"{what}: {len(out)} entries; at most {MAX_WORDS}")
    return out


@dataclass(frozen=True)
class Plan:
    """What the patches do: built from the prompts and the node's settings before any work."""
    source: Prompt
    target: Prompt
    mode: str
    mapper: tuple | None
    weights: torch.Tensor | None       # (K,) per target position
    cross: float                       # fraction of the steps with edited cross-attention
    self_: float                       # fraction of the steps with injected self-attention
    blend_source: tuple                # positions of the blend words in each prompt
    blend_target: tuple
    blend_words: tuple
    threshold: float = 0.3             # on the normalised maps (Hertz et al.'s)


def make_plan(clip, source_text: str, target_text: str, mode: str, cross: float, self_: float, reweight: str,
              blend: str, threshold: float = 0.3) -> Plan:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    for name, v in (("cross_replace", cross), ("self_replace", self_), ("blend_threshold", threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} {v:g} is outside 0..1")
    src = encode(clip, source_text, "source")
    tgt = encode(clip, target_text, "target")
    if src.cond.shape[1:] != tgt.cond.shape[1:]:
        raise ValueError(f"the source prompt encodes to {src.cond.shape[1]} tokens and the target to "
                         f"{tgt.cond.shape[1]} (ComfyUI encodes in chunks of 77): shorten the longer one so both "
                         "fit the same number of chunks")
    mapper = None
    if mode == "replace":
        if len(src.real) != len(tgt.real):
            raise ValueError(f"mode replace swaps words token for token, but the source prompt has {len(src.real)} "
                             f"tokens and the target {len(tgt.real)} ({' '.join(src.labels)!r} vs "
                             f"{' '.join(tgt.labels)!r}): use mode refine for added or removed words")
    elif mode == "refine":
        mapper = aligned(src, tgt)
    weights = None
    entries = parse_words(reweight, True, "reweight")
    if entries:
        weights = torch.ones(tgt.cond.shape[1])
        for word, w in entries:
            pos = word_positions(clip, tgt, word)
            if not pos:
                raise ValueError(f"reweight: {word!r} is not in the target prompt {target_text!r}")
            weights[pos] = w
    bs, bt, words = [], [], []
    for word, _ in parse_words(blend, False, "blend_words"):
        ps, pt = word_positions(clip, src, word), word_positions(clip, tgt, word)
        if not ps and not pt:
            raise ValueError(f"blend_words: {word!r} is in neither the source prompt {source_text!r} nor the "
                             f"target prompt {target_text!r}")
        bs += ps
        bt += pt
        words.append(word)
    return Plan(src, tgt, mode, mapper, weights, cross, self_, tuple(sorted(set(bs))), tuple(sorted(set(bt))),
                tuple(words), float(threshold))


def paired_conditioning(plan: Plan, pairs: int) -> list:
    """One conditioning whose tensors hold ``pairs`` source rows then ``pairs`` target rows, the batch layout of
    the latent the guider samples."""
    def stack(a, b):
        return torch.cat([a] * pairs + [b] * pairs)
    extras = dict(plan.source.extras)
    for key, a in plan.source.extras.items():
        b = plan.target.extras.get(key)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
                and a.shape[:1] == (1,):
            extras[key] = stack(a, b)
    return [[stack(plan.source.cond, plan.target.cond), extras]]


# ---- the model ---------------------------------------------------------------------------------------------------

def unet_blocks(model):
    """The UNet's block keys and the downsampling levels that have attention; a model without ComfyUI's UNet
    block layout (transformers other than the joint-attention ones joint_attention handles) is refused by name."""
    try:  # host internals, looked up when used (a newer ComfyUI may move them)
        from comfy.ldm.modules.attention import SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample
    except ImportError as e:
        raise RuntimeError(f"Prompt-to-Prompt needs ComfyUI's UNet classes (comfy.ldm.modules.attention."
                           f"SpatialTransformer, ...openaimodel.Downsample), which this ComfyUI lacks: {e}; it was "
                           "tested with ComfyUI 0.3.75") from e

    dm = model.model.diffusion_model
    if not all(hasattr(dm, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"{type(model.model).__name__} ({type(dm).__name__}) is not a UNet with attention blocks "
                         "nor a joint-attention model it knows: Prompt-to-Prompt here patches UNet cross-attention "
                         "(SD1.x, SD2.x, SDXL) and Flux.1's and SD3's joint attention (experimental); other "
                         "transformers (Flux.2, Chroma, Qwen-Image, Wan, ...) are not supported yet")
    ds, levels, keys = 1, set(), []
    for i, blk in enumerate(dm.input_blocks):
        for m in blk:
            if isinstance(m, SpatialTransformer):
                levels.add(ds)
                keys.append(("input", i))
            if isinstance(m, Downsample):
                ds *= 2
    if any(isinstance(m, SpatialTransformer) for m in dm.middle_block):
        levels.add(ds)
        keys.append(("middle", 0))
    keys += [("output", i) for i, blk in enumerate(dm.output_blocks)
             if any(isinstance(m, SpatialTransformer) for m in blk)]
    if not levels or model.model.model_config.unet_config.get("context_dim") is None:
        raise ValueError(f"{type(model.model).__name__} has no cross-attention to text: nothing for "
                         "Prompt-to-Prompt to edit")
    return keys, levels


def check_text_width(model, plan: Plan) -> None:
    """The prompts' tensors must be as wide as the text the model reads (a CLIP of another family fails deep in
    the model otherwise)."""
    dm = model.model.diffusion_model
    want = model.model.model_config.unet_config.get("context_dim")
    for name in ("context_embedder", "txt_in"):  # SD3, Flux: the text input projection
        layer = getattr(dm, name, None)
        want = getattr(layer, "in_features", want)
    have = plan.source.cond.shape[-1]
    if isinstance(want, int) and have != want:
        raise ValueError(f"the CLIP's text is {have} wide but {type(model.model).__name__} reads {want}-wide text: "
                         "connect the model's own text encoder")


def map_level(levels) -> int:
    """The attention resolution the maps are read at: the level closest to a quarter of the latent's side (the
    paper's 16x16 maps of SD at 512 px). Self-attention is injected at it and below."""
    return min(levels, key=lambda d: (abs(math.log2(d) - 2), -d))


@dataclass
class Run:
    """One sampling's state: the step, and the maps summed over steps and map-level layers (per row, position,
    token) that local blending and the map image read."""
    plan: Plan
    pairs: int
    sigmas: list
    latent_hw: tuple
    level: int
    step: int = 0
    maps: torch.Tensor | None = None
    grid: tuple | None = None
    mask: torch.Tensor | None = None
    calls: list = field(default_factory=list)   # (kind, level, step) of each map computation (memory test)
    guide: list | None = None                   # Pix2Pix-Zero's guidance pass: its per-layer losses

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def set_step(self, sigma: float) -> None:
        self.step = sum(1 for s in self.sigmas[:-1] if s > sigma * (1 + 1e-5) + 1e-9)

    def layer_level(self, extra) -> tuple[int, tuple]:
        h, w = extra["activations_shape"][-2:]
        return 2 ** round(math.log2(self.latent_hw[0] / h)), (h, w)

    def rows(self, extra, batch: int):
        chunks = extra.get("cond_or_uncond", [0])
        if batch != len(chunks) * 2 * self.pairs:
            raise RuntimeError(f"Prompt-to-Prompt expected {len(chunks)} x {2 * self.pairs} rows in the model call, "
                               f"got {batch}: a node batched conditionings differently (areas, masks)")
        return core.pair_rows([c == 0 for c in chunks], self.pairs)

    def record(self, ps: torch.Tensor, pt: torch.Tensor, grid: tuple) -> None:
        self.add_maps(ps.mean(1), pt.mean(1), grid)

    def add_maps(self, ms: torch.Tensor, mt: torch.Tensor, grid: tuple) -> None:
        """Adds one layer's head-averaged maps (pairs, Q, K) of the source and target rows."""
        m = torch.cat([ms, mt])  # (2 pairs, Q, K)
        if self.maps is None:
            self.maps, self.grid = torch.zeros_like(m), grid
        self.maps += m


def _attention(q, k, v, extra):
    from comfy.ldm.modules import attention  # the host's current kernel (chosen at its start-up)

    return attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                         transformer_options=extra)


def patches(run: Run):
    """The attn1 (self) and attn2 (cross) replace functions: plain closures (ModelPatcher.clone deep-copies
    model_options; functions are kept, objects would be copied)."""
    plan = run.plan

    def cross(q, k, v, extra):
        out = _attention(q, k, v, extra)
        level, grid = run.layer_level(extra)
        if run.guide is not None:  # Pix2Pix-Zero's guidance pass: every layer's target maps against the source's
            src, tgt = run.rows(extra, q.shape[0])
            if src:
                heads = extra["n_heads"]
                run.guide.append(core.map_guidance_loss(core.attention_probs(q[tgt], k[tgt], heads),
                                                        core.attention_probs(q[src], k[src], heads)))
                run.calls.append(("guide", level, run.step))
            return out
        edit = run.step < round(plan.cross * run.steps)
        record = level == run.level
        if not (edit or record):
            return out
        src, tgt = run.rows(extra, q.shape[0])
        if not src:
            return out
        heads = extra["n_heads"]
        ps, pt = core.attention_probs(q[src], k[src], heads), core.attention_probs(q[tgt], k[tgt], heads)
        run.calls.append(("cross", level, run.step))
        if record:
            run.record(ps, pt, grid)
        if edit:
            w = plan.weights.to(q.device) if plan.weights is not None else None
            out = out.clone()
            out[tgt] = core.attend(core.edit_cross_attention(ps, pt, plan.mode, plan.mapper, w), v[tgt]).to(out)
        return out

    def self_attn(q, k, v, extra):
        out = _attention(q, k, v, extra)
        level, _ = run.layer_level(extra)
        if run.step >= round(plan.self_ * run.steps) or level < run.level:
            return out
        src, tgt = run.rows(extra, q.shape[0])
        if not src:
            return out
        run.calls.append(("self", level, run.step))
        out = out.clone()
        out[tgt] = core.attend(core.attention_probs(q[src], k[src], extra["n_heads"]), v[tgt]).to(out)
        return out
    return cross, self_attn


def check_free(model_options) -> None:
    taken = {n: sorted(map(str, model_options.get("transformer_options", {}).get("patches_replace", {}).get(n, {})))
             for n in ("attn1", "attn2")}
    taken = {n: v for n, v in taken.items() if v}
    if taken:
        raise ValueError(f"the model already has attention replace patches ({taken}; e.g. IPAdapter, SAG-like "
                         "nodes): Prompt-to-Prompt replaces the same attention calls; remove them first")


def check_deterministic(sampler) -> None:
    fn = getattr(getattr(sampler, "sampler_function", None), "__name__", None)
    opts = getattr(sampler, "extra_options", {}) or {}
    if fn not in DETERMINISTIC or float(opts.get("s_churn", 0.0)) != 0.0:
        name = (fn or type(sampler).__name__).removeprefix("sample_")
        raise ValueError(f"sampler {name!r} adds its own noise to each image, so the source and target would not "
                         "share their structure: use a deterministic one (euler, ddim, heun, dpmpp_2m, lms, "
                         "uni_pc, ...)")


class PromptToPromptGuider(comfy.samplers.CFGGuider):
    """Samples each latent twice, as a source and a target image ([sources, targets] in the output), with the
    attention edits of ``plan``; with an ``inversion``, the source rows are put back on its pivot every step
    (Direct Inversion) and the same correction goes to the targets, so a real image is edited."""

    def __init__(self, model, plan: Plan, negative, cfg: float, inversion: Inversion | None = None):
        super().__init__(model)
        self.plan, self.inv, self.negative = plan, inversion, negative
        if inversion is not None:
            check_same_family(model, inversion, "Prompt-to-Prompt")
        self.joint = joint_layout(model)
        self.keys, self.levels = unet_blocks(model) if self.joint is None else ([], set())
        check_text_width(model, plan)
        check_free(model.model_options)
        check_override_free(model.model_options)
        self.set_cfg(cfg)
        self.run: Run | None = None
        self.inner_set_conds({"positive": paired_conditioning(plan, 1), "negative": negative})

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        n = latent_image.shape[0]
        if latent_image.ndim != 4:
            raise ValueError(f"the latent has shape {tuple(latent_image.shape)}; Prompt-to-Prompt takes image "
                             "latents (batch, channels, height, width)")
        start = None
        if self.inv is not None:
            check_sampler(sampler)
            check_sigmas(sigmas, self.inv)
            if tuple(latent_image.shape) != tuple(self.inv.pivots[0].shape):
                raise ValueError(f"the latent given has shape {tuple(latent_image.shape)}, the inversion's is "
                                 f"{tuple(self.inv.pivots[0].shape)}: connect the Invert node's noise latent")
            if denoise_mask is not None:
                raise ValueError("the latent has a noise mask: editing an inversion edits the whole latent")
            image = self.model_patcher.model.process_latent_out(self.inv.pivots[-1].clone()).to(latent_image)
            latent_image = image
            start = torch.cat([self.inv.pivots[0]] * 2)
        else:
            check_deterministic(sampler)
            want = getattr(self.model_patcher.model.latent_format, "latent_channels", latent_image.shape[1])
            if latent_image.shape[1] != want:
                raise ValueError(f"the latent has {latent_image.shape[1]} channels, but this model's latent space "
                                 f"has {want}: make it with this model's VAE or EmptyLatentImage")
        s = sigmas.detach().float().cpu()
        self.run = run = Run(self.plan, n, s.tolist(), tuple(latent_image.shape[-2:]),
                             map_level(self.levels) if self.levels else 0)
        self.inner_set_conds({"positive": paired_conditioning(self.plan, n), "negative": self.negative})
        orig = self.model_options
        self.model_options = self.patched_options(orig, run)
        two = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731  same noise for both branches
        if start is not None:
            sampler = _StartAt(sampler, start)
        try:
            return super().sample(two(noise), two(latent_image), sampler, sigmas, two(denoise_mask), callback,
                                  disable_pbar, seed)
        finally:
            self.model_options = orig

    def patched_options(self, orig: dict, run: Run) -> dict:
        opts = comfy.model_patcher.create_model_options_clone(orig)
        if self.joint is not None:
            opts.setdefault("transformer_options", {})["optimized_attention_override"] = override(run, self.joint)
            return opts
        cross, self_attn = patches(run)
        for key in self.keys:
            opts = comfy.model_patcher.set_model_options_patch_replace(opts, cross, "attn2", *key)
            opts = comfy.model_patcher.set_model_options_patch_replace(opts, self_attn, "attn1", *key)
        return opts

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        run = self.run
        run.set_step(float(timestep.flatten()[0]))
        d = super().predict_noise(x, timestep, model_options, seed)
        n = run.pairs
        if self.inv is not None:
            i = run.step
            sig = self.inv.sigmas.to(x)
            reach = inv_core.denoised_to_reach(self.inv.pivots[i].to(x), self.inv.pivots[i + 1].to(x), sig[i],
                                               sig[i + 1])
            d = d + torch.cat([reach - d[:n]] * 2)
        plan = self.plan
        if plan.blend_words and run.step >= round(BLEND_START * run.steps) and run.maps is not None:
            size = tuple(x.shape[-2:])
            masks = []
            for rows, pos in ((run.maps[:n], plan.blend_source), (run.maps[n:], plan.blend_target)):
                if pos:
                    masks.append(core.blend_mask(rows, pos, run.grid, size, plan.threshold))
            mask = torch.stack(masks).amax(0).to(x.device)
            run.mask = mask.detach().cpu()
            d = torch.cat([d[:n], core.local_blend(d[:n], d[n:], mask)])
        return d
