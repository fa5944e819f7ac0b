"""Tests for data/images.py: decode scale, split, tiling geometry, errors, colour modes, normalisation."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from biomass5head.data import images
from biomass5head.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageReadError,
    decode_photo,
    decode_scale,
    load_views,
    needed_size,
    split_views,
    tile_view,
    tiles_to_tensor,
)

# Distinct colours, one per grid cell (up to 3x3).
PALETTE = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
     [128, 0, 0], [0, 128, 0], [0, 0, 128]],
    dtype=np.uint8,
)


def textured(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth blobs plus fine grain (so JPEG and resizing have work to do)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    grain = rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def save(array: np.ndarray, path, **kwargs) -> str:
    Image.fromarray(array).save(path, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def photo_2000(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("photos") / "ID0000000001.jpg"
    return save(textured(2000, 1000), path, quality=90)


def grid_view(rows: int, cols: int, size: int) -> np.ndarray:
    view = np.zeros((rows * size, cols * size, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            view[r * size:(r + 1) * size, c * size:(c + 1) * size] = PALETTE[r * cols + c]
    return view


# --- geometry -------------------------------------------------------------------------------------------------


def test_needed_size_is_width_height():
    assert needed_size((2, 3), 10) == (30, 20)
    with pytest.raises(ValueError):
        needed_size((0, 2), 10)
    with pytest.raises(ValueError):
        needed_size((2, 2), 0)


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (1, 2), (3, 3), (2, 1)])
def test_tile_view_count_shape_and_row_major_order(grid):
    rows, cols = grid
    tiles = tile_view(grid_view(rows, cols, 7), grid)
    assert tiles.shape == (rows * cols, 7, 7, 3)
    assert tiles.dtype == np.uint8 and tiles.flags.c_contiguous
    for i, tile in enumerate(tiles):
        assert (tile == PALETTE[i]).all(), f"tile {i} has the wrong colour"


def test_tile_view_rejects_uneven_view():
    with pytest.raises(ValueError, match="grid"):
        tile_view(np.zeros((10, 11, 3), np.uint8), (2, 2))


@pytest.mark.parametrize("width", [10, 11])
def test_split_views_at_middle_column(width):
    photo = np.zeros((4, width, 3), np.uint8)
    photo[:, : width // 2] = 255
    left, right = split_views(photo)
    assert left.shape[1] == width // 2 and right.shape[1] == width - width // 2
    assert (left == 255).all() and (right == 0).all()


@pytest.mark.parametrize("width", [400, 401])
def test_load_views_left_is_left_half(tmp_path, width):
    photo = np.zeros((200, width, 3), np.uint8)
    photo[:, : width // 2] = (200, 30, 30)
    photo[:, width // 2:] = (30, 30, 200)
    path = save(photo, tmp_path / "split.png")
    left, right = load_views(path, grid=(2, 2), img_size=32)
    assert left.shape == right.shape == (64, 64, 3)
    np.testing.assert_allclose(left.reshape(-1, 3).mean(0), (200, 30, 30), atol=1)
    np.testing.assert_allclose(right.reshape(-1, 3).mean(0), (30, 30, 200), atol=1)


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (1, 2), (3, 3)])
def test_load_views_shapes_and_tiles(tmp_path, grid):
    path = save(textured(300, 150), tmp_path / "p.jpg", quality=90)
    left, right = load_views(path, grid=grid, img_size=28)
    rows, cols = grid
    for view in (left, right):
        assert view.shape == (rows * 28, cols * 28, 3) and view.dtype == np.uint8
        assert tile_view(view, grid).shape == (rows * cols, 28, 28, 3)


def test_load_views_enlarges_small_photo(tmp_path):
    path = save(textured(100, 50), tmp_path / "small.jpg")
    left, right = load_views(path, grid=(2, 2), img_size=56)  # views are 50x50, tiles need 112x112
    assert left.shape == right.shape == (112, 112, 3)


# --- source detail: reduced-scale decode only when it is still enough ----------------------------------------


def spy_decode(monkeypatch) -> list[tuple[int, ...]]:
    """Record the shape of every photo decode_photo returns (what load_views resizes from)."""
    shapes: list[tuple[int, ...]] = []
    real = images.decode_photo

    def spy(path, min_size=None):
        photo = real(path, min_size)
        shapes.append(photo.shape)
        return photo

    monkeypatch.setattr(images, "decode_photo", spy)
    return shapes


def test_large_tiles_decode_at_full_resolution(photo_2000, monkeypatch):
    shapes = spy_decode(monkeypatch)
    left, _ = load_views(photo_2000, grid=(2, 2), img_size=518)  # needs 1036x1036 per view > 1000x1000
    assert shapes == [(1000, 2000, 3)]
    assert left.shape == (1036, 1036, 3)
    assert decode_scale(photo_2000, (2 * 1036, 1036)) == 1


def test_small_tiles_decode_reduced_but_enough(photo_2000, monkeypatch):
    shapes = spy_decode(monkeypatch)
    left, right = load_views(photo_2000, grid=(2, 2), img_size=112)  # needs 224x224 per view
    assert decode_scale(photo_2000, (448, 224)) == 4
    assert shapes == [(250, 500, 3)]
    assert left.shape == right.shape == (224, 224, 3)



@pytest.mark.parametrize("img_size, expected_shape", [(250, (500, 1000, 3)), (251, (1000, 2000, 3))])
def test_exactly_half_still_reduces(photo_2000, monkeypatch, img_size, expected_shape):
    # grid 2x2 at 250 needs 500x500 views: exactly half of 1000x1000, so the 1/2-scale decode suffices.
    shapes = spy_decode(monkeypatch)
    load_views(photo_2000, grid=(2, 2), img_size=img_size)
    assert shapes == [expected_shape]


@pytest.mark.parametrize("min_size", [(448, 224), (250, 125), (1000, 500), (2000, 1000), (1, 1)])
def test_decode_never_below_min_size(photo_2000, min_size):
    photo = decode_photo(photo_2000, min_size=min_size)
    assert photo.shape[1] >= min_size[0] and photo.shape[0] >= min_size[1]
    assert decode_photo(photo_2000).shape == (1000, 2000, 3)


def test_odd_width_reduced_decode_keeps_left_view_large_enough(tmp_path):
    path = save(textured(2001, 1001), tmp_path / "odd.jpg")
    left, right = split_views(decode_photo(path, min_size=(1000, 500)))
    assert left.shape[1] >= 500 and right.shape[1] >= 500 and left.shape[0] >= 500


def test_reduced_decode_close_to_full_decode(photo_2000):
    grid, size = (2, 2), 112
    need = needed_size(grid, size)
    full_left, full_right = split_views(decode_photo(photo_2000))
    reference = [cv2.resize(v, need, interpolation=cv2.INTER_AREA) for v in (full_left, full_right)]
    for got, ref in zip(load_views(photo_2000, grid, size), reference, strict=True):
        diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        assert diff.mean() < 2.5, f"mean abs diff {diff.mean():.2f}"


def test_png_always_decodes_fully(tmp_path):
    path = save(textured(400, 200), tmp_path / "p.png")
    assert decode_scale(path, (50, 25)) == 1
    assert decode_photo(path, min_size=(50, 25)).shape == (200, 400, 3)


def test_exif_orientation_is_applied_and_draft_uses_rotated_frame(tmp_path):
    stored = textured(400, 800)  # stored portrait; orientation 6 means "rotate 90 clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    assert decode_photo(path).shape == (400, 800, 3)  # upright landscape
    photo = decode_photo(path, min_size=(200, 100))  # upright 800x400 -> divisor 4 -> 200x100
    assert photo.shape == (100, 200, 3)
    assert decode_scale(path, (200, 100)) == 4


# --- errors ---------------------------------------------------------------------------------------------------


def test_missing_file_raises_naming_it(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageReadError, match="nope.jpg"):
        decode_photo(path)
    with pytest.raises(ImageReadError, match="nope.jpg"):
        load_views(path, (2, 2), 28)


@pytest.mark.parametrize("img_size", [500, 28])  # full and reduced-scale decode
def test_truncated_jpeg_raises(photo_2000, tmp_path, img_size):
    data = open(photo_2000, "rb").read()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg") as info:
        load_views(path, (1, 1), img_size)
    assert isinstance(info.value, ValueError) and "truncated" in str(info.value)


def test_truncated_jpeg_raises_even_if_pil_told_to_allow_it(photo_2000, tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = open(photo_2000, "rb").read()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        decode_photo(path)


@pytest.mark.parametrize("content", [b"not an image at all\n", b""])
def test_non_image_raises_naming_it(tmp_path, content):
    path = tmp_path / "notes.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="notes.jpg"):
        decode_photo(path)


def test_directory_raises(tmp_path):
    with pytest.raises(ImageReadError, match=str(tmp_path.name)):
        decode_photo(tmp_path)


# --- colour modes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_non_rgb_inputs_become_rgb(tmp_path, mode):
    rgb = textured(64, 32)
    path = tmp_path / f"img_{mode}.png"
    Image.fromarray(rgb).convert(mode).save(path)
    photo = decode_photo(path)
    assert photo.shape == (32, 64, 3) and photo.dtype == np.uint8
    if mode in ("L", "LA"):
        assert (photo[..., 0] == photo[..., 1]).all() and (photo[..., 1] == photo[..., 2]).all()
    if mode == "RGBA":
        assert (photo == rgb).all()
    left, right = load_views(path, (1, 2), 16)
    assert left.shape == right.shape == (16, 32, 3)


def test_grayscale_jpeg(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.fromarray(textured(400, 200)).convert("L").save(path)
    assert decode_photo(path, min_size=(100, 50)).shape == (50, 100, 3)


# --- tensors --------------------------------------------------------------------------------------------------


def test_tiles_to_tensor_values_and_shape():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tiles = np.zeros((3, 5, 5, 3), np.uint8)
    tiles[1] = 255
    tiles[2, ..., 0], tiles[2, ..., 1], tiles[2, ..., 2] = 10, 128, 250
    x = tiles_to_tensor(tiles, mean, std)
    assert x.shape == (3, 3, 5, 5) and x.dtype == torch.float32 and x.is_contiguous()
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    expected = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - m) / s
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x[0, :, 0, 0], -torch.tensor(mean) / torch.tensor(std))


def test_tiles_to_tensor_from_tile_view_and_readonly_input():
    view = grid_view(2, 2, 4)
    view.setflags(write=False)
    tiles = tile_view(view, (2, 2))
    tiles.setflags(write=False)
    x = tiles_to_tensor(tiles, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert x.shape == (4, 3, 4, 4)
    torch.testing.assert_close(x[1, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]))  # top-right tile is green


def test_tiles_to_tensor_rejects_bad_input():
    with pytest.raises(ValueError):
        tiles_to_tensor(np.zeros((2, 4, 4, 3), np.float32), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError):
        tiles_to_tensor(np.zeros((4, 4, 3), np.uint8), IMAGENET_MEAN, IMAGENET_STD)


def test_image_read_error_survives_dataloader_worker(tmp_path):
    """A worker's ImageReadError reaches the main process as ImageReadError, naming the file (not a RuntimeError)."""
    from torch.utils.data import DataLoader, Dataset

    missing = tmp_path / "gone.jpg"

    class Broken(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return load_views(missing, grid=(1, 1), img_size=14)

    with pytest.raises(ImageReadError) as info:
        list(DataLoader(Broken(), num_workers=1))
    assert str(info.value).startswith(f"cannot read image {missing}")
    assert "Traceback" not in str(info.value)
