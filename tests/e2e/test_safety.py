"""Issue 12 through the real server: resume files never run code, giant captions and sizes are bounded."""
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dev.datasets import make_dataset
from tests.e2e import graphs
from tests.e2e.test_server import assert_success, run_expecting_error

pytestmark = pytest.mark.e2e


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling writes the marker file: proof that loading ran code
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def photos(server):
    return make_dataset(server.base / "input" / "safety_photos", names=["astronaut", "coffee"]).name


def _fake_lora(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.x.lora_up.weight": torch.zeros(4, 4)}, str(path))


@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_a_pickled_resume_file_is_refused_and_never_run(server, photos, tmp_path, how):
    loras = server.base / "models" / "loras" / "evil"
    marker = tmp_path / f"pwned_{how}"
    _fake_lora(loras / f"{how}.safetensors")
    payload = {"trainer": _Payload(marker)}
    state = loras / f"{how}.selfperc_state"
    if how == "pickle":
        state.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, state)
    text = run_expecting_error(server, graphs.fine_tune("eps", photos, f"evil/out_{how}", steps=1,
                                                        resume_from=f"evil/{how}.safetensors"))
    assert f"{how}.selfperc_state" in text and "not a valid selfperc state file" in text, text
    assert not marker.exists(), "the resume file's pickle ran"
    assert not (loras / f"out_{how}.safetensors").exists()


def test_an_old_pickle_state_pt_is_not_offered_and_not_loaded(server, photos, tmp_path):
    loras = server.base / "models" / "loras" / "legacy"
    marker = tmp_path / "pwned_legacy"
    _fake_lora(loras / "old.safetensors")
    (loras / "old.state.pt").write_bytes(pickle.dumps({"trainer": _Payload(marker)}))
    options = server.get("/object_info/SelfPerceptualLoraOptions")["SelfPerceptualLoraOptions"]["input"]["optional"][
        "resume_from"][0]
    assert "legacy/old.safetensors" not in options
    # ComfyUI does not check optional combo values against the list: the node itself refuses, naming the file
    text = run_expecting_error(server, graphs.fine_tune("eps", photos, "legacy/out", steps=1,
                                                        resume_from="legacy/old.safetensors"))
    assert "old.state.pt is an old pickle resume file: it is never loaded" in text, text
    assert not marker.exists() and server.alive()


def test_a_multi_megabyte_caption_is_cut_and_training_runs(server):
    d = make_dataset(server.base / "input" / "huge_caption", names=["astronaut", "coffee"])
    (d / "astronaut.txt").write_text("a photo of an astronaut, " * 200_000)  # 5 MB
    entry, log = server.run_logged(graphs.fine_tune("eps", d.name, "safety/caption", steps=2), timeout=300)
    assert_success(server, entry)
    assert f"{d / 'astronaut.txt'}: caption cut to its first 2000 characters" in log
    assert server.alive()


def test_pixels_per_step_are_bounded_before_any_work(server, photos):
    text = run_expecting_error(server, graphs.fine_tune("eps", photos, "safety/big", batch_size=64,
                                                        resolution=2048))
    assert "batch_size 64 x resolution 2048^2 is 256 MP per step, over the 64 MP bound" in text, text
