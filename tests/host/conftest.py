"""Fixtures shared by the editing tests: the tiny SD1.x checkpoint (its real CLIP tokenizer) and an empty negative."""
import pytest

from tests.host.models import load_checkpoint


@pytest.fixture(scope="module")
def models(comfy, pack, tiny_models):
    return load_checkpoint(str(tiny_models["checkpoint"]))


@pytest.fixture(scope="module")
def neg(models):
    clip = models[1]
    return clip.encode_from_tokens_scheduled(clip.tokenize(""))
