"""Photos checked before anything is written: every problem listed with its file and reason, fast and in parallel.

Levels: `header` opens each photo's header only (size, mode, EXIF orientation: milliseconds a photo); `full` also
decodes it, which finds truncated files. The policy (NOTES.md):
- errors: a missing, empty, unreadable or truncated photo; a photo that is not a 2:1 landscape stereo pair (within
  2 %), unless the command allows any aspect (`--allow-any-aspect`; `predict --images` always does), in which case
  it is a warning saying how the photo is split;
- warnings: a photo smaller than its tiles need (it is upscaled), a photo that is not RGB (it is converted).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import ExifTags, Image, UnidentifiedImageError

from biomass5head.data.images import (
    PIL_READ_ERRORS,
    SWAPPING_ORIENTATIONS,
    ImageReadError,
    decode_photo,
    needed_size,
)

logger = logging.getLogger(__name__)

CHECK_LEVELS = ("header", "full")
ASPECT_TOLERANCE = 0.02
MAX_LISTED = 20


class PhotoError(ValueError):
    """Photos a command cannot use; the message lists each one with its reason."""


@dataclass(frozen=True)
class PhotoReport:
    """What one photo's check found: `size` (upright width, height) and `mode` when readable, else `error`."""
    path: str
    size: tuple[int, int] | None = None
    mode: str | None = None
    error: str | None = None


def inspect_photo(path: str, level: str = "header") -> PhotoReport:
    """Read one photo's header (and, at `full`, decode it)."""
    try:
        if os.path.getsize(path) == 0:
            return PhotoReport(path, error="empty file (0 bytes)")
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(ExifTags.Base.Orientation, 1) in SWAPPING_ORIENTATIONS:
                w, h = h, w
            mode = im.mode
        if level == "full":
            decode_photo(path)
    except FileNotFoundError:
        return PhotoReport(path, error="file not found")
    except UnidentifiedImageError:
        return PhotoReport(path, error="not an image PIL can read")
    except ImageReadError as exc:
        return PhotoReport(path, error=exc.reason)
    except PIL_READ_ERRORS as exc:
        return PhotoReport(path, error=f"{type(exc).__name__}: {exc}")
    return PhotoReport(path, (w, h), mode)


def inspect_photos(paths: Iterable[str], level: str = "header", workers: int = 8) -> list[PhotoReport]:
    """`inspect_photo` of every path, in parallel threads (header reads wait on the disk, decoding releases the
    GIL), in the order given."""
    paths = [str(p) for p in dict.fromkeys(map(str, paths))]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths) or 1))) as pool:
        return list(pool.map(lambda p: inspect_photo(p, level), paths))


def _listed(items: list[str]) -> str:
    more = f"\n  ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return "\n  " + "\n  ".join(items[:MAX_LISTED]) + more


def check_photos(paths: Iterable[str], grid: tuple[int, int] | None = None, img_size: int | None = None, *,
                 level: str = "header", allow_any_aspect: bool = False, what: str = "photos") -> list[PhotoReport]:
    """Check every photo; raise PhotoError listing every unusable one, log warnings for the usable oddities.
    `grid` and `img_size` (what the model reads) decide what is too small; without them that check is skipped."""
    if level not in CHECK_LEVELS:
        raise ValueError(f"--check-photos must be one of {', '.join(CHECK_LEVELS)}, got {level!r}")
    reports = inspect_photos(paths, level)
    errors = [f"{r.path}: cannot read image: {r.error}" for r in reports if r.error]
    odd_aspect = [r for r in reports if r.size and abs(r.size[0] / r.size[1] / 2 - 1) > ASPECT_TOLERANCE]
    if not allow_any_aspect:
        errors += [f"{r.path}: {r.size[0]}x{r.size[1]} is not a 2:1 landscape stereo pair (left and right views side "
                   "by side); pass --allow-any-aspect to split it at its middle column anyway" for r in odd_aspect]
    if odd_aspect and allow_any_aspect:
        logger.warning("%d %s are not 2:1 stereo pairs; each is split at its middle column into a left and a right "
                       "view, then resized:%s", len(odd_aspect), what,
                       _listed([f"{r.path} ({r.size[0]}x{r.size[1]})" for r in odd_aspect]))
    if grid is not None and img_size is not None:
        need_w, need_h = needed_size(grid, img_size)
        small = [r for r in reports if r.size and (r.size[0] < 2 * need_w or r.size[1] < need_h)]
        if small:
            logger.warning("%d %s are smaller than the tiles need (%dx%d for --grid %d %d at --img-size %d) and are "
                           "upscaled:%s", len(small), what, 2 * need_w, need_h, *grid, img_size,
                           _listed([f"{r.path} ({r.size[0]}x{r.size[1]})" for r in small]))
    not_rgb = [r for r in reports if r.mode and r.mode != "RGB"]
    if not_rgb:
        logger.warning("%d %s are not RGB and are converted to RGB (grayscale photos become gray RGB):%s",
                       len(not_rgb), what, _listed([f"{r.path} ({r.mode})" for r in not_rgb]))
    if errors:  # after the warnings, so that one pass shows everything
        raise PhotoError(f"{len(errors)} of {len(reports)} {what} cannot be used:{_listed(errors)}")
    return reports
