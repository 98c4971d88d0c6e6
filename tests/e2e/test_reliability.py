"""Reliability through the real server: bad datasets, Cancel, isolation of the base model, back-to-back runs."""
import time

import pytest
from PIL import Image

from dev.bad_datasets import write_bad_files, write_odd_modes, write_symlink_loop
from dev.datasets import make_dataset
from tests.e2e import graphs
from tests.e2e.test_server import assert_success, run_expecting_error

pytestmark = pytest.mark.e2e


def folder(server, name, fill):
    d = server.base / "input" / name
    d.mkdir(parents=True, exist_ok=True)
    fill(d)
    return name


BAD = {
    "bad_empty": (lambda d: None, ["has no image files"]),
    "bad_only_text": (lambda d: (d / "a.txt").write_text("caption") and (d / "b.json").write_text("{}"),
                      ["has no image files"]),
    "bad_corrupt": (lambda d: (d / "x.png").write_bytes(b"not a png" * 20), ["no usable images", "x.png"]),
    "bad_truncated": (lambda d: write_bad_files(d) and [p.unlink() for p in d.iterdir()
                                                        if not p.name.startswith("truncated")],
                      ["no usable images", "truncated.png", "truncated.jpg"]),
    "bad_tiny": (lambda d: Image.new("RGB", (5, 4)).save(d / "tiny.png"), ["tiny.png", "smaller than 8x8"]),
    "bad_caption": (lambda d: (Image.new("RGB", (64, 64)).save(d / "c.png"),
                               (d / "c.txt").write_bytes("\xe9t\xe9".encode("latin-1"))), ["c.txt", "not UTF-8"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_dataset_gives_a_clear_error_and_the_server_keeps_running(server, name):
    fill, expected = BAD[name]
    folder(server, name, fill)
    text = run_expecting_error(server, graphs.fine_tune("eps", name, f"bad/{name}", steps=1))
    for piece in expected:
        assert piece in text, text
    assert name in text  # the folder is named
    assert not (server.base / "models" / "loras" / "bad" / f"{name}.safetensors").exists()


def test_mixed_folder_trains_on_the_usable_images_and_logs_the_skips(server):
    def fill(d):
        write_odd_modes(d)
        write_bad_files(d)
        write_symlink_loop(d)
    folder(server, "mixed", fill)
    entry, log = server.run_logged(graphs.fine_tune("eps", "mixed", "rel/mixed", steps=2))  # Plot Loss Graph: 2 points
    assert_success(server, entry)
    mixed = server.base / "input" / "mixed"
    assert f"selfperc: 7 images from {mixed} (6 skipped)" in log, log
    skipped = [line.split(f"skipped {mixed}/")[1] for line in log.splitlines() if f"selfperc: skipped {mixed}/" in line]
    for name in ("corrupt.png", "truncated.jpg", "tiny.png", "badcaption.png", "loop"):
        assert any(entry_.startswith(name + ":") for entry_ in skipped), (name, skipped)


def test_very_large_image_is_downscaled_and_trains(server):
    from dev.bad_datasets import write_large_jpeg

    folder(server, "huge", lambda d: write_large_jpeg(d / "huge.jpg"))
    entry, log = server.run_logged(graphs.fine_tune("eps", "huge", "rel/huge", steps=2))
    assert_success(server, entry)
    assert f"selfperc: 1 images from {server.base / 'input' / 'huge'} (0 skipped)" in log, log


def saved_image_pixels(server, entry, node="7"):
    img = entry["outputs"][node]["images"][0]
    with Image.open(server.base / "output" / img["subfolder"] / img["filename"]) as im:
        return im.tobytes()


def test_base_model_is_untouched_by_training_and_two_runs_back_to_back_succeed(server):
    photos = make_dataset(server.base / "input" / "iso_photos", names=["astronaut", "coffee"]).name
    before = saved_image_pixels(server, server.run(graphs.core_sampling()))
    a = server.queue(graphs.fine_tune("eps", photos, "iso/a", steps=2))
    b = server.queue(graphs.fine_tune("eps", photos, "iso/b", steps=2))
    c = server.queue(graphs.core_sampling())
    for pid in (a, b):
        assert_success(server, server.wait(pid))
    after = saved_image_pixels(server, server.wait(c))
    assert before == after, "the base model samples differently after training"


def test_cancel_stops_training_within_a_step_and_keeps_the_last_checkpoint(server):
    """Cancel (POST /interrupt) mid-run: counted in the node's own progress messages, at most the step in flight
    completes after it (its message may already be on the way); the last save_every checkpoint stays whole."""
    from dev.host import ProgressWatcher

    photos = make_dataset(server.base / "input" / "cancel_photos", names=["astronaut", "coffee"]).name
    lora_dir = server.base / "models" / "loras" / "cancel"
    before = saved_image_pixels(server, server.run(graphs.core_sampling()))
    with ProgressWatcher(server) as progress:
        pid = server.queue(graphs.fine_tune("eps", photos, "cancel/run", steps=400, save_every=2))
        deadline = time.time() + 240
        while not ((lora_dir / "run.safetensors").exists() and progress.last_value() >= 4):
            assert time.time() < deadline, server.log_tail(3000)
            time.sleep(0.05)
        at_interrupt = progress.last_value()
        status, _ = server.post("/interrupt", {})
        assert status == 200
        entry = server.wait(pid, timeout=120)
        time.sleep(0.5)  # any progress message still on its way
        steps_after = progress.last_value() - at_interrupt
        times = [t for t, v, m in progress.events if m == 400]
    msgs = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in msgs, msgs
    assert progress.events[-1][2] == 400 and progress.last_value() < 400
    assert steps_after <= 1, f"{steps_after} steps ran after the interrupt (at step {at_interrupt})"
    step_time = (times[-1] - times[0]) / max(1, len(times) - 1)
    print(f"cancel: {steps_after} step(s) after the interrupt at step {at_interrupt}; a step took {step_time:.2f}s")
    import safetensors.torch
    sd = safetensors.torch.load_file(str(lora_dir / "run.safetensors"))
    assert sd and (lora_dir / "run.selfperc_state").exists()
    assert not [p for p in lora_dir.iterdir() if p.name.endswith(".tmp")], "a half-written file was left"
    assert server.alive()
    after = server.run(graphs.core_sampling())
    assert_success(server, after)
    assert saved_image_pixels(server, after) == before, "a cancelled run left something on the base model"
