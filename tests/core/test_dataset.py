"""The dataset reader's policy (pure: PIL + torch), including every awkward file the node must survive."""
import os
import subprocess
import sys

import pytest
import torch

from dev.bad_datasets import write_bad_files, write_large_jpeg, write_odd_modes, write_symlink_loop
from dev.datasets import make_dataset
from selfperc_core.dataset import MAX_CAPTION_CHARS, DatasetError, as_float, bucket_size, cache_bytes, load_dataset


def test_real_photos_with_captions(tmp_path):
    make_dataset(tmp_path / "d")
    ds = load_dataset(tmp_path / "d", 64)
    assert len(ds.images) == 6 and not ds.skipped
    assert all(img.shape == (64, 64, 3) and img.dtype == torch.uint8 for img in ds.images)
    assert all(0 <= as_float(img).min() and as_float(img).max() <= 1 for img in ds.images)
    assert "a photo of a cat" in ds.captions


def test_odd_modes_all_load_and_exif_is_applied(tmp_path):
    made = write_odd_modes(tmp_path)
    ds = load_dataset(tmp_path, 256, "buckets")
    assert sorted(p.name for p in ds.files) == sorted(made) and not ds.skipped
    shapes = {p.name: img.shape for p, img in zip(ds.files, ds.images)}
    assert shapes["exif_rotated.jpg"][0] > shapes["exif_rotated.jpg"][1], "EXIF rotation not applied (portrait)"
    assert shapes["mode_L.png"][0] < shapes["mode_L.png"][1]  # the same photo unrotated is landscape
    rgba = ds.images[[p.name for p in ds.files].index("mode_RGBA.png")]
    assert as_float(rgba).min() > 0.99, "transparent pixels must become white"


def test_bad_files_are_skipped_with_reasons_and_good_ones_kept(tmp_path):
    bad = write_bad_files(tmp_path)
    make_dataset(tmp_path, names=["coffee"])
    ds = load_dataset(tmp_path, 64)
    assert [p.name for p in ds.files] == ["coffee.jpg"]
    reasons = {s.path.name: s.reason for s in ds.skipped}
    assert set(bad) <= set(reasons)
    assert "smaller than 8x8" in reasons["tiny.png"]
    assert "not UTF-8" in reasons["badcaption.png"]


@pytest.mark.parametrize("setup,expect", [
    (lambda d: None, "has no image files"),
    (lambda d: (d / "notes.txt").write_text("hi") and (d / "data.csv").write_text("1"), "has no image files"),
    (lambda d: write_bad_files(d), "has no usable images"),
])
def test_no_usable_image_fails_naming_folder_and_reasons(tmp_path, setup, expect):
    d = tmp_path / "ds"
    d.mkdir()
    setup(d)
    with pytest.raises(DatasetError, match=expect) as e:
        load_dataset(d, 64)
    assert str(d) in str(e.value)
    if "usable" in expect:
        assert "corrupt.png" in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found: .*nope"):
        load_dataset(tmp_path / "nope", 64)


def test_symlink_loop_does_not_hang(tmp_path):
    make_dataset(tmp_path, names=["chelsea"])
    write_symlink_loop(tmp_path)
    ds = load_dataset(tmp_path, 64)
    assert len(ds.images) == 1
    assert any("symlink" in s.reason for s in ds.skipped)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_skipped(tmp_path):
    make_dataset(tmp_path, names=["chelsea", "coffee"])
    os.chmod(tmp_path / "coffee.jpg", 0)
    ds = load_dataset(tmp_path, 64)
    assert [s.path.name for s in ds.skipped] == ["coffee.jpg"]


def test_special_files_are_skipped_without_blocking(tmp_path):
    """Unreadable entries a root process can still meet: a FIFO (a read would block forever), a dangling link."""
    make_dataset(tmp_path, names=["chelsea"])
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.jpg")
    ds = load_dataset(tmp_path, 64)
    assert len(ds.images) == 1
    assert {s.path.name for s in ds.skipped} == {"pipe.png", "dangling.jpg"}


def test_very_large_jpeg_is_downscaled_without_exhausting_memory(tmp_path):
    """Measured in a fresh process: a process's peak RSS cannot grow past an earlier, larger peak, so the same
    check inside the test process could pass whatever the reader does."""
    write_large_jpeg(tmp_path / "huge.jpg")
    code = ("import resource, sys; from selfperc_core.dataset import load_dataset;"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            "ds = load_dataset(sys.argv[1], 64); assert ds.images[0].shape == (64, 64, 3);"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    grown_mb = float(res.stdout.strip().splitlines()[-1])
    assert grown_mb < 200, f"decoding grew the process by {grown_mb:.0f} MB (a full decode is ~324 MB)"


def test_bucket_sizes_keep_aspect_and_multiples():
    assert bucket_size(1000, 500, 512) == (704, 384)
    w, h = bucket_size(300, 900, 256)
    assert w % 64 == 0 and h % 64 == 0 and h > w


def test_bad_resolution_and_mode(tmp_path):
    make_dataset(tmp_path, names=["chelsea"])
    with pytest.raises(DatasetError, match="multiple of 8"):
        load_dataset(tmp_path, 100)
    with pytest.raises(DatasetError, match="unknown resize mode"):
        load_dataset(tmp_path, 64, "stretch")


def test_multi_megabyte_caption_is_cut_with_a_note_naming_the_file(tmp_path):
    make_dataset(tmp_path, names=["chelsea", "coffee"], captions=False)
    (tmp_path / "chelsea.txt").write_text("a cat " * 1_000_000)  # 6 MB
    (tmp_path / "coffee.txt").write_text("a cup of coffee")
    ds = load_dataset(tmp_path, 64)
    caps = dict(zip((p.name for p in ds.files), ds.captions))
    assert len(caps["chelsea.png"]) <= MAX_CAPTION_CHARS and caps["chelsea.png"].startswith("a cat a cat")
    assert caps["coffee.jpg"] == "a cup of coffee"
    assert [(n.path.name, n.reason) for n in ds.notes] == [
        ("chelsea.txt", f"caption cut to its first {MAX_CAPTION_CHARS} characters")]


def test_caption_cut_inside_a_multibyte_character_stays_valid(tmp_path):
    make_dataset(tmp_path, names=["chelsea"], captions=False)
    (tmp_path / "chelsea.txt").write_bytes(b"x" + "\u732b".encode() * 5000)  # 3-byte characters, cut mid-way
    ds = load_dataset(tmp_path, 64)
    assert ds.captions[0].startswith("x\u732b") and len(ds.captions[0]) == MAX_CAPTION_CHARS
    assert not ds.skipped


def test_decoded_cache_is_bounded_before_decoding(tmp_path):
    make_dataset(tmp_path, names=["chelsea", "coffee"])
    assert cache_bytes(2, 512) == 2 * 512 * 512 * 3
    with pytest.raises(DatasetError, match="2 images at 512px need .* GiB in memory before encoding"):
        load_dataset(tmp_path, 512, max_cache_bytes=cache_bytes(2, 512) - 1)
    assert len(load_dataset(tmp_path, 64, max_cache_bytes=cache_bytes(2, 64)).images) == 2


def test_too_many_files_is_refused_before_decoding(tmp_path, monkeypatch):
    import selfperc_core.dataset as dataset

    make_dataset(tmp_path, names=["chelsea", "coffee", "astronaut"])
    monkeypatch.setattr(dataset, "MAX_IMAGES", 2)
    with pytest.raises(DatasetError, match="has more than 2 images"):
        load_dataset(tmp_path, 64)
    monkeypatch.setattr(dataset, "MAX_IMAGES", 100)
    for i in range(10):
        (tmp_path / f"note{i}.txt").write_text("x")
    monkeypatch.setattr(dataset, "MAX_SCAN_ENTRIES", 8)  # counted while listing, whatever the entries are
    with pytest.raises(DatasetError, match="holds more than 8 entries"):
        load_dataset(tmp_path, 64)


def test_max_images_reads_only_the_first_files_and_bounds_memory_by_them(tmp_path):
    folder = make_dataset(tmp_path / "d", captions=False)
    everything = load_dataset(folder, 64)
    first = load_dataset(folder, 64, max_images=2, max_cache_bytes=cache_bytes(2, 64))
    assert first.files == everything.files[:2] and len(first.images) == 2
    with pytest.raises(DatasetError, match="need"):
        load_dataset(folder, 64, max_cache_bytes=cache_bytes(2, 64))


def test_kohya_repeat_folders_count_their_images_n_times_and_bad_counts_are_refused(tmp_path):
    from selfperc_core.dataset import MAX_REPEATS, repeated

    make_dataset(tmp_path / "3_cats", names=["chelsea"])
    make_dataset(tmp_path / "1_mugs", names=["coffee"])
    make_dataset(tmp_path / "plain", names=["astronaut"])  # no N_ prefix: once
    make_dataset(tmp_path / "3_cats" / "10_inner", names=["camera"])  # only the first level's name counts
    assert load_dataset(tmp_path, 64).repeats == [1, 1, 1, 1]  # off by default: a folder may be called 2023_trip
    ds = load_dataset(tmp_path, 64, repeat_folders=True)
    by_folder = {f.relative_to(tmp_path).parts[0]: r for f, r in zip(ds.files, ds.repeats)}
    assert by_folder == {"3_cats": 3, "1_mugs": 1, "plain": 1} and sorted(ds.repeats) == [1, 1, 3, 3]
    order = repeated(list(range(len(ds.files))), ds.repeats)
    assert len(order) == 8 and all(order.count(i) == r for i, r in enumerate(ds.repeats))
    for bad in ("0_none", f"{MAX_REPEATS + 1}_many"):
        other = tmp_path.parent / f"bad_{bad}"
        make_dataset(other / bad, names=["coffee"])
        with pytest.raises(DatasetError, match=f"dataset subfolder '{bad}' .* repeat count"):
            load_dataset(other, 64, repeat_folders=True)
