"""Shared fixtures: the real ComfyUI (in-process and as a server), tiny models, real-photo datasets."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import tests  # noqa: F401  bind this repo's tests namespace first: the ComfyUI tree put on sys.path has one too
from dev.host import REPO_ROOT

MODELS_CACHE = REPO_ROOT / ".cache" / "models"
ARTIFACTS = REPO_ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The tiny SD1.x checkpoint and UNet file, built once and cached in .cache/models."""
    from dev.tiny_models import TINY_SD2_UNET_CONFIG, write_checkpoint, write_unet

    return {"checkpoint": write_checkpoint(MODELS_CACHE / "checkpoints" / "tiny_sd15.safetensors"),
            "unet": write_unet(MODELS_CACHE / "diffusion_models" / "tiny_sd15_unet.safetensors"),
            "sd2_unet": write_unet(MODELS_CACHE / "diffusion_models" / "tiny_sd2_unet.safetensors",
                                   config=TINY_SD2_UNET_CONFIG)}


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The real ComfyUI imported in-process, with its folders redirected to a temporary base."""
    from dev.host import import_comfy

    import_comfy()
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_inproc")
    for sub in ("input", "output", "temp", "user", "models/loras"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_user_directory(str(base / "user"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.add_model_folder_path("loras", str(base / "models" / "loras"), is_default=True)
    yield base
    # free ModelPatchers while ComfyUI's modules still exist (else their __del__ complains at exit)
    import gc

    import comfy.model_management

    comfy.model_management.unload_all_models()
    from tests.host.models import load_checkpoint

    load_checkpoint.cache_clear()
    gc.collect()


@pytest.fixture(scope="session")
def pack(comfy):
    """This repository imported as ComfyUI imports a custom node pack (a package named after its folder)."""
    from dev.host import import_pack

    return import_pack()


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_models):
    """One real ComfyUI server for the session, with this pack in custom_nodes and the tiny models."""
    from dev.host import ComfyServer

    base = tmp_path_factory.mktemp("comfy_server")
    # test-only nodes (tiny models of every family) from an extra custom_nodes folder, never shipped
    extra = base / "test_nodes.yaml"
    extra.write_text(f"selfperc_tests:\n    custom_nodes: {REPO_ROOT / 'dev' / 'server_nodes'}\n")
    srv = ComfyServer(base, extra_args=["--extra-model-paths-config", str(extra)])
    for kind, path in (("checkpoints", tiny_models["checkpoint"]), ("diffusion_models", tiny_models["unet"]),
                       ("diffusion_models", tiny_models["sd2_unet"])):
        os.symlink(path, srv.base / "models" / kind / path.name)
    srv.start()
    yield srv
    srv.stop()
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(srv.log_path, ARTIFACTS / "server.log")
