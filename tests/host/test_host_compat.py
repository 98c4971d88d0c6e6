"""What newer ComfyUI releases changed, simulated faithfully on the tested host: a clone() with disable_dynamic, a
training flag, an accelerator out-of-memory error only is_oom() recognises, and host symbols that moved. Each test
fails on code that ignores the feature."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.host.test_imagic import PROMPT, optimize, text
from tests.host.test_realimage_eval import encoded

pytestmark = pytest.mark.host
REPO = Path(__file__).resolve().parents[2]


def dynamic_clone_of(model, calls):
    """``model`` as a newer host's dynamic-VRAM patcher: its clone() takes disable_dynamic (recorded)."""
    base = type(model)

    class DynamicPatcher(base):
        def clone(self, disable_dynamic=False):
            calls.append(disable_dynamic)
            return base.clone(self)

    m = model.clone()
    m.__class__ = DynamicPatcher
    return m


def test_training_clones_without_dynamic_loading_where_the_host_offers_it(models):
    model, clip, vae = models
    calls = []
    optimize(dynamic_clone_of(model, calls), encoded(vae, "chelsea"), text(clip, PROMPT), steps=1)
    assert calls == [True]


def test_the_training_flag_is_set_during_the_steps_and_restored_after_even_on_error(models, monkeypatch):
    import comfy.model_management as mm

    model, clip, vae = models
    monkeypatch.setattr(mm, "in_training", False, raising=False)
    seen = []
    dm = model.model.diffusion_model
    handle = dm.register_forward_pre_hook(lambda mod, args: seen.append(mm.in_training))
    try:
        optimize(model, encoded(vae, "chelsea"), text(clip, PROMPT), steps=2)
        assert seen and all(seen) and mm.in_training is False

        def boom(mod, args):
            raise RuntimeError("boom")
        h2 = dm.register_forward_pre_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                optimize(model, encoded(vae, "chelsea"), text(clip, PROMPT), steps=2)
        finally:
            h2.remove()
        assert mm.in_training is False
    finally:
        handle.remove()


class AcceleratorError(RuntimeError):
    """Newer torch / ComfyUI: some out-of-memory errors arrive as this, which OOM_EXCEPTION does not catch."""


def test_out_of_memory_the_hosts_way_gets_the_friendly_message(models, monkeypatch):
    import comfy.model_management as mm
    from selfperc_pack.nodes.host_compat import is_oom

    model, clip, vae = models
    assert not is_oom(AcceleratorError("CUDA error: out of memory"))  # the tested host has no is_oom
    monkeypatch.setattr(mm, "is_oom", lambda e: isinstance(e, AcceleratorError) and "out of memory" in str(e),
                        raising=False)
    assert is_oom(AcceleratorError("CUDA error: out of memory")) and not is_oom(AcceleratorError("other"))

    def oom(mod, args):
        raise AcceleratorError("CUDA error: out of memory")
    h = model.model.diffusion_model.register_forward_pre_hook(oom)
    try:
        with pytest.raises(MemoryError, match="out of memory while optimising the embedding"):
            optimize(model, encoded(vae, "chelsea"), text(clip, PROMPT), steps=2)
    finally:
        h.remove()


def test_a_moved_host_symbol_names_itself_and_the_tested_comfyui(models, monkeypatch):
    import comfy.weight_adapter.lora
    from selfperc_pack.nodes import lora

    monkeypatch.delattr(comfy.weight_adapter.lora, "LoRAAdapter")
    with pytest.raises(RuntimeError, match=r"comfy\.weight_adapter\.lora\.LoRAAdapter.*tested with ComfyUI 0\.3\.75"):
        lora.add_lora(models[0].model, 4, 4.0, None, 0, "cpu")


def test_the_nodes_load_when_host_internals_they_use_have_moved(comfy):
    """A fresh process where comfy.weight_adapter lost the symbols the pack reads (adapter_maps, LoRAAdapter,
    LoraDiff) and comfy_extras.nodes_model_advanced cannot be imported: every node still registers (the LoRA kinds
    fall back to LoRA); the nodes that need them say so when run."""
    code = (
        "import sys, asyncio\n"
        "from dev.host import import_comfy, import_pack\n"
        "import_comfy()\n"
        "import comfy.sampler_helpers, comfy.weight_adapter, comfy.weight_adapter.lora\n"
        "del comfy.weight_adapter.adapter_maps\n"
        "del comfy.weight_adapter.lora.LoRAAdapter, comfy.weight_adapter.lora.LoraDiff\n"
        "sys.modules['comfy_extras.nodes_model_advanced'] = None\n"
        "pack = import_pack()\n"
        "ext = asyncio.run(pack.comfy_entrypoint())\n"
        "nodes = asyncio.run(ext.get_node_list())\n"
        "from selfperc_pack.nodes.lora import algorithms\n"
        "print(len(nodes), algorithms())\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    count, kinds = res.stdout.strip().splitlines()[-1].split(" ", 1)
    from selfperc_pack.nodes import NODES

    assert int(count) == len(NODES) and kinds == "('LoRA',)"


def test_the_declared_range_and_the_load_warning(monkeypatch, caplog, pack):
    import tomllib
    from selfperc_pack.nodes import host_compat

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]["requires-comfyui"]
    assert declared == host_compat.REQUIRES
    assert host_compat.host_version() == host_compat.TESTED  # the suite runs on the tested host
    for version, warns in (("0.3.10", True), ("0.3.75", False), ("0.46.1", False)):
        caplog.clear()
        monkeypatch.setattr(host_compat, "host_version", lambda v=version: v)
        with caplog.at_level("WARNING", logger="selfperc"):
            host_compat.warn_if_untested()
        assert ("older than the tested range" in caplog.text) == warns, version
