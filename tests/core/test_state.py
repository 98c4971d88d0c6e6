"""Resume state without pickle: round trip of a real optimizer state, and files that must be refused unread."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from selfperc_core.state import StateFileError, load_state_file, pack_state, save_state_file, unpack_state


class _Payload:
    """Unpickling this runs code (writes a marker file): what a malicious resume file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def adamw_state():
    p = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.95))
    for _ in range(2):
        opt.zero_grad()
        sum((x ** 2).sum() for x in p).backward()
        opt.step()
    return p, opt


def test_round_trip_restores_optimizer_rng_and_python_values(tmp_path):
    p, opt = adamw_state()
    g = torch.Generator().manual_seed(7)
    g.manual_seed(3)
    state = {"trainer": {"optimizer": opt.state_dict(), "rng": g.get_state(), "step": 2, "losses": [0.5, float("inf")],
                         "settings": {"t_prime_range": (0.0, 1.0), "distance": "mse", "normalize": False, "x": None}}}
    save_state_file(tmp_path / "s.selfperc_state", state)
    back = load_state_file(tmp_path / "s.selfperc_state")
    assert back["trainer"]["settings"] == state["trainer"]["settings"]  # tuples stay tuples
    assert back["trainer"]["losses"] == [0.5, float("inf")] and back["trainer"]["step"] == 2
    assert set(back["trainer"]["optimizer"]["state"]) == {0, 1}  # int keys stay ints
    opt2 = torch.optim.AdamW([torch.nn.Parameter(x.detach().clone()) for x in p], lr=1e-3)
    opt2.load_state_dict(back["trainer"]["optimizer"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    before, after = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in (0, 1):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(after[k][name], before[k][name])
    g2 = torch.Generator()
    g2.set_state(back["trainer"]["rng"])
    assert torch.equal(torch.rand(4, generator=g2), torch.rand(4, generator=g))


def test_one_tensor_used_twice_is_stored_once():
    t = torch.ones(2)
    tensors, skel = pack_state({"a": t, "b": [t]})
    assert len(tensors) == 1
    back = unpack_state(tensors, skel)
    assert torch.equal(back["a"], back["b"][0])


def test_unknown_objects_are_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="cannot store a object"):
        pack_state({"x": object()})


@pytest.mark.parametrize("kind", ["pickle", "torch_save", "garbage", "foreign_safetensors", "bad_skeleton"])
def test_malicious_or_foreign_files_are_refused_without_running_code(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.selfperc_state"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"trainer": _Payload(marker)}))
    elif kind == "torch_save":
        torch.save({"trainer": _Payload(marker)}, path)
    elif kind == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif kind == "foreign_safetensors":
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(2)}, str(path))
    else:
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "selfperc-state/1",
                                                              "selfperc_state": '{"$tensor": "nope"}'})
    with pytest.raises(StateFileError, match="evil.selfperc_state"):
        load_state_file(path)
    assert not marker.exists(), "loading the file ran code"


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = save_state_file(tmp_path / "big.selfperc_state", {"x": torch.zeros(1000)})
    with pytest.raises(StateFileError, match="big.selfperc_state is .* bytes, more than the 100"):
        load_state_file(path, max_bytes=100)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_permissions_any_new_file_gets(tmp_path, umask):
    """Not mkstemp's 0600: a saved LoRA must be readable as ComfyUI's own files are (0666 less the umask)."""
    from selfperc_core.state import atomic_write

    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "sub" / "a.safetensors", lambda tmp: Path(tmp).write_bytes(b"x"))
        plain = tmp_path / "plain"
        plain.write_bytes(b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask == plain.stat().st_mode & 0o777
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]
