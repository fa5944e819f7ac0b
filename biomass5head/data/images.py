"""Photos to model input: decode (reduced-scale when the tiles allow), left/right split, tiling, tensors.

A competition photo is a 2000x1000 JPEG made of two 1000x1000 stereo views side by side. Nothing here
assumes that size: the split is at the middle column of whatever is read.

Each view becomes a ``rows x cols`` grid of ``S x S`` tiles (``S`` = ``--img-size``). Instead of cutting
tiles and resizing each one, the whole view is resized once to ``(rows*S, cols*S)`` and then sliced, which
gives the same tiles. That resize always starts from a source at least as detailed as the result: the
full-resolution half, or, when the tiles need at most half of it, a JPEG decoded at 1/2, 1/4 or 1/8 scale
(libjpeg's DCT scaling through ``PIL.Image.draft``), never smaller than the tiles need. Earlier
implementations cut tiles from an already-downscaled view and upsampled them: more compute, no detail.

Decisions:
- Odd widths: the left view gets ``W // 2`` columns, the right view the remaining ``W - W // 2`` (one more).
  Both are resized to the same size afterwards, so the extra column only nudges the right view's scale.
- EXIF orientation is applied (``ImageOps.exif_transpose``), as ``cv2.imread`` and image viewers do, so a
  phone photo is split the way it looks. Competition photos carry no orientation tag, so for them it is a
  no-op. For a 90-degree tag, the reduced-scale decode is sized in the rotated frame.
- Any mode becomes RGB: grayscale is replicated, alpha is dropped (not composited), palettes are expanded.
- A missing, unreadable or truncated file raises ``ImageReadError`` naming the file; there is never a
  black stand-in image. Truncated data must raise, so ``ImageFile.LOAD_TRUNCATED_IMAGES`` is reset to False
  (with a warning) if someone else turned it on.
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# EXIF orientations that rotate by 90 degrees, i.e. swap width and height.
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# What PIL raises for unreadable data: OSError covers UnidentifiedImageError and "image file is truncated";
# SyntaxError/struct.error/EOFError/ValueError come from broken headers in some plugins.
PIL_READ_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, Image.DecompressionBombError)


class ImageReadError(ValueError):
    """A photo that cannot be used: missing, not an image, truncated or corrupt. The message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        if reason is None:
            # Rebuilt from one message: torch's DataLoader re-raises a worker's error as exc_type(traceback text).
            # Keep the line that names the file, so the user sees the problem rather than a worker traceback.
            lines = [ln for ln in str(path).splitlines() if "cannot read image " in ln]
            message = lines[-1].split("ImageReadError: ", 1)[-1].strip() if lines else str(path)
            self.path, self.reason = None, message
            super().__init__(message)
            return
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def needed_size(grid: Sequence[int], img_size: int) -> tuple[int, int]:
    """(width, height) in pixels of one view resized so that its grid cells are ``img_size`` squares."""
    rows, cols = _check_grid(grid)
    if int(img_size) < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size}")
    return cols * int(img_size), rows * int(img_size)


def _check_grid(grid: Sequence[int]) -> tuple[int, int]:
    if len(grid) != 2 or int(grid[0]) < 1 or int(grid[1]) < 1:
        raise ValueError(f"grid must be two positive integers (rows, cols), got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def _forbid_truncated_loads() -> None:
    # LOAD_TRUNCATED_IMAGES makes PIL pad a cut-off JPEG with grey instead of raising, which would let a
    # damaged photo train silently. It is a process-wide switch, so we turn it back off rather than toggling
    # it around each load (toggling races between threads).
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True; resetting it so truncated photos raise")
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _apply_draft(im: Image.Image, min_size: tuple[int, int] | None) -> int:
    """Ask a JPEG to decode at the most reduced DCT scale (1/1, 1/2, 1/4, 1/8) still >= min_size; returns 1-8.

    Must run before ``load()``. PIL picks divisor ``s`` only where ``W // min_w >= s`` and ``H // min_h >= s``,
    and the decoded size is ``ceil(W / s)``, so the result is never below ``min_size``. Other formats
    (PNG, ...) ignore it and decode fully.
    """
    if min_size is None or im.format != "JPEG":
        return 1
    min_w, min_h = max(1, int(min_size[0])), max(1, int(min_size[1]))
    if im.getexif().get(ExifTags.Base.Orientation, 1) in SWAPPING_ORIENTATIONS:
        min_w, min_h = min_h, min_w  # min_size is given for the upright photo; the JPEG is stored rotated
    full_w = im.size[0]
    drafted = im.draft("RGB", (min_w, min_h))  # (mode, (0, 0, W / s, H / s)) or None when not applicable
    return 1 if drafted is None else round(full_w / drafted[1][2])


def decode_scale(path: str | os.PathLike, min_size: tuple[int, int] | None = None) -> int:
    """Divisor (1, 2, 4 or 8) that ``decode_photo(path, min_size)`` decodes at; reads only the header."""
    try:
        with Image.open(path) as im:
            return _apply_draft(im, min_size)
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except PIL_READ_ERRORS as err:
        raise ImageReadError(path, f"{type(err).__name__}: {err}") from err


def decode_photo(path: str | os.PathLike, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a photo to a writable uint8 RGB array ``(H, W, 3)``, upright per its EXIF orientation.

    ``min_size=(min_w, min_h)`` is the size of the whole photo the caller needs; a JPEG is then decoded at
    the most reduced of 1/1, 1/2, 1/4, 1/8 scale that is still at least that large (less memory, and about
    1.4x / 1.8x faster at 1/2 / 1/4, see benchmarks/bench_decode.py). ``None`` decodes at full resolution.
    Raises ``ImageReadError`` naming the file.
    """
    _forbid_truncated_loads()
    try:
        with Image.open(path) as im:
            _apply_draft(im, min_size)
            im.load()  # decode now, inside the try, so truncation/corruption raises here
            ImageOps.exif_transpose(im, in_place=True)  # no-op (and no copy) without an orientation tag
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            photo = np.array(rgb)  # np.array (not asarray) so the result is writable
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except IsADirectoryError as err:
        raise ImageReadError(path, "is a directory") from err
    except PIL_READ_ERRORS as err:
        raise ImageReadError(path, f"{type(err).__name__}: {err}") from err
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.shape[0] < 1 or photo.shape[1] < 2:
        raise ImageReadError(path, f"decoded to an unusable array of shape {photo.shape}")
    return photo


def split_views(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right stereo views of a photo ``(H, W, 3)``: columns ``[0, W//2)`` and ``[W//2, W)``.

    With an odd width the right view is one column wider. Returns numpy views (no copy) of ``photo``.
    """
    if photo.ndim != 3 or photo.shape[1] < 2:
        raise ValueError(f"expected a photo (H, W, C) with W >= 2, got shape {photo.shape}")
    mid = photo.shape[1] // 2
    return photo[:, :mid], photo[:, mid:]


def resize_view(view: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 view to ``size=(width, height)``; returns a new contiguous array.

    INTER_AREA when shrinking in both directions (it averages every source pixel, so no aliasing);
    INTER_CUBIC when either direction grows (INTER_AREA would fall back to blocky nearest-like output).
    """
    width, height = int(size[0]), int(size[1])
    src_h, src_w = view.shape[:2]
    if (src_w, src_h) == (width, height):
        return np.array(view, order="C")  # a copy, so the result never pins the whole photo in memory
    interp = cv2.INTER_AREA if width <= src_w and height <= src_h else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(view), (width, height), interpolation=interp)


def load_views(path: str | os.PathLike, grid: Sequence[int], img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Left and right views of a photo, each uint8 ``(rows*S, cols*S, 3)`` ready for ``tile_view``.

    The photo is decoded no smaller than both views need (reduced-scale JPEG decoding when that holds),
    split at its middle column, and each half resized once to the tile grid's size. A photo smaller than
    that is enlarged from its full resolution. Raises ``ImageReadError`` for unreadable files.
    """
    need_w, need_h = needed_size(grid, img_size)
    # Both views side by side: the photo needs twice a view's width. Since the decoded width W' >= 2 * need_w,
    # the smaller (left) half, W' // 2, is still >= need_w.
    photo = decode_photo(path, min_size=(2 * need_w, need_h))
    left, right = split_views(photo)
    return resize_view(left, (need_w, need_h)), resize_view(right, (need_w, need_h))


def tile_view(view: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Cut a view ``(rows*h, cols*w, C)`` into ``(rows*cols, h, w, C)`` tiles, row-major (top-left first).

    With views from ``load_views`` the tiles are ``(T, S, S, 3)``. Raises ValueError if the view does not
    divide evenly into the grid.
    """
    rows, cols = _check_grid(grid)
    if view.ndim != 3:
        raise ValueError(f"expected a view (H, W, C), got shape {view.shape}")
    height, width, channels = view.shape
    if height % rows or width % cols:
        raise ValueError(f"view of shape {view.shape} does not divide into a {rows}x{cols} grid")
    tile_h, tile_w = height // rows, width // cols
    tiles = view.reshape(rows, tile_h, cols, tile_w, channels).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(tiles.reshape(rows * cols, tile_h, tile_w, channels))


def tiles_to_tensor(tiles: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 tiles ``(T, S, S, 3)`` to a float32 tensor ``(T, 3, S, S)``: ``(x / 255 - mean) / std``.

    ``mean`` and ``std`` are per-channel in 0-1 units, as timm's ``resolve_data_config`` gives them.
    """
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 tiles (T, S, S, 3), got shape {tiles.shape}")
    if tiles.dtype != np.uint8:
        raise ValueError(f"expected uint8 tiles (photometric work happens before normalising), got {tiles.dtype}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each with std > 0, got {tuple(mean)}, {tuple(std)}")
    # torch.from_numpy warns on read-only arrays and needs a contiguous buffer.
    if not tiles.flags.writeable or not tiles.flags.c_contiguous:
        tiles = np.array(tiles, order="C")
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous().float()  # (T, 3, S, S)
    # Fold /255 into the affine: x * (1 / (255 * std)) - mean / std, one multiply and one subtract.
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    return x.mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)


@dataclass(frozen=True)
class TileSpec:
    """How a photo becomes model input, the values that always travel together: a `grid` (rows, cols) of
    `img_size` px tiles per view, normalised with the backbone's per-channel `mean` and `std` (0-1 units)."""
    grid: tuple[int, int]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "grid", _check_grid(self.grid))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_tensor(self, view: np.ndarray) -> torch.Tensor:
        """One uint8 view as normalised tiles (T, 3, S, S)."""
        return tiles_to_tensor(tile_view(view, self.grid), self.mean, self.std)
