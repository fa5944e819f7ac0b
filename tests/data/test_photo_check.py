"""Photos checked up front (`data/photo_check.py`): every unusable photo listed with its reason in one error, the
usable oddities (too small, not RGB, not 2:1 where allowed) as warnings, header and full levels."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from biomass5head.data.photo_check import PhotoError, check_photos, inspect_photo


def photo(folder, name, size=(64, 32), mode="RGB", fmt="JPEG"):
    path = folder / name
    Image.new(mode, size, 120 if mode == "L" else (40, 120, 30)).save(path, format=fmt)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    return tmp_path


def test_good_photos_pass_both_levels_silently(folder, caplog):
    paths = [photo(folder, f"{i}.jpg") for i in range(3)] + [photo(folder, "p.png", fmt="PNG")]
    with caplog.at_level(logging.WARNING):
        for level in ("header", "full"):
            reports = check_photos(paths, (1, 2), 16, level=level)
            assert [r.size for r in reports] == [(64, 32)] * 4 and {r.mode for r in reports} == {"RGB"}
    assert caplog.text == ""


def test_every_unusable_photo_is_listed_with_its_reason(folder):
    good = photo(folder, "good.jpg")
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "text.jpg"
    text.write_text("not a photo")
    portrait = photo(folder, "portrait.jpg", size=(32, 64))
    square = photo(folder, "square.jpg", size=(64, 64))
    missing = folder / "missing.jpg"
    paths = [good, str(empty), str(text), portrait, square, str(missing)]
    with pytest.raises(PhotoError) as err:
        check_photos(paths, level="header", what="training photos")
    message = str(err.value)
    assert message.startswith("5 of 6 training photos cannot be used:")
    assert f"{empty}: cannot read image: empty file (0 bytes)" in message
    assert f"{text}: cannot read image: not an image PIL can read" in message
    assert f"{portrait}: 32x64 is not a 2:1 landscape stereo pair" in message and "--allow-any-aspect" in message
    assert f"{square}: 64x64 is not a 2:1" in message and f"{missing}: cannot read image: file not found" in message
    assert "good.jpg" not in message


def test_truncation_is_found_by_the_full_level_only(folder):
    path = folder / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (128, 256, 3), dtype=np.uint8)  # large scan data
    Image.fromarray(noise).save(path, format="JPEG")
    path = str(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    assert inspect_photo(path, "header").error is None
    assert "truncated" in inspect_photo(path, "full").error
    with pytest.raises(PhotoError, match="cut.jpg: cannot read image: .*truncated"):
        check_photos([path], level="full")


def test_usable_oddities_are_warnings_that_say_what_happens(folder, caplog):
    small = photo(folder, "small.jpg", size=(20, 10))
    gray = photo(folder, "gray.jpg", mode="L")
    portrait = photo(folder, "portrait.jpg", size=(32, 64))
    with caplog.at_level(logging.WARNING):
        check_photos([small, gray, portrait], (2, 2), 8, allow_any_aspect=True, what="photos in my_photos")
    assert "1 photos in my_photos are not 2:1 stereo pairs; each is split at its middle column" in caplog.text
    assert "small.jpg (20x10)" in caplog.text and "are smaller than the tiles need (32x16 for --grid 2 2 at " \
           "--img-size 8) and are upscaled" in caplog.text
    assert f"{gray} (L)" in caplog.text and "converted to RGB" in caplog.text


def test_exif_rotation_decides_the_aspect(folder):
    path = folder / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored as 32x64, shown turned by 90 degrees: 64x32
    Image.new("RGB", (32, 64), (1, 2, 3)).save(path, format="JPEG", exif=exif)
    assert inspect_photo(str(path)).size == (64, 32)
    check_photos([str(path)])


def test_an_unknown_level_is_a_clear_error(folder):
    with pytest.raises(ValueError, match="--check-photos must be one of header, full"):
        check_photos([photo(folder, "a.jpg")], level="fast")
