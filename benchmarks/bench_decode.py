"""Throughput of photo decoding and tiling (biomass5head/data/images.py) on synthetic 2000x1000 JPEGs.

    python benchmarks/bench_decode.py --n 20 --grid 2 2 --img-sizes 518 224

Writes ``--n`` photo-like JPEGs (quality 90, roughly the size of the competition's photos) to a temp
directory, then prints photos/s for: decode + split + resize + tile per img-size, and decode alone at full
resolution and at the reduced scale each img-size allows. Single process, single thread for OpenCV, so the
numbers are per data-loader worker.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from biomass5head.data.images import decode_photo, decode_scale, load_views, needed_size, tile_view  # noqa: E402


def photo_like(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Pasture-ish texture: green/brown blobs at several scales plus fine grain, like grass in a quadrat."""
    out = np.zeros((height, width, 3), np.float32)
    for cell, amp in ((200, 60.0), (40, 40.0), (8, 30.0)):
        coarse = rng.normal(0, 1, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        out += amp * cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    out += rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    out += np.array([90, 110, 60], np.float32)  # RGB mean of a green-brown pasture
    return np.clip(out, 0, 255).astype(np.uint8)


def write_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"ID{i:010d}.jpg"
        Image.fromarray(photo_like(2000, 1000, rng)).save(path, quality=90)
        paths.append(path)
    return paths


def rate(fn, paths: list[Path], repeats: int) -> float:
    """Best photos/s of ``repeats`` passes after a warm-up pass; the best pass is the least disturbed by
    other processes on a shared machine."""
    for path in paths:
        fn(path)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            fn(path)
        rates.append(len(paths) / (time.perf_counter() - start))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="number of synthetic photos")
    parser.add_argument("--grid", type=int, nargs=2, default=(2, 2), metavar=("ROWS", "COLS"))
    parser.add_argument("--img-sizes", type=int, nargs="+", default=(518, 224))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # one data-loader worker's view; DataLoader workers run in parallel processes
    grid = tuple(args.grid)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), args.n)
        mean_kb = np.mean([p.stat().st_size for p in paths]) / 1024
        print(f"{args.n} synthetic 2000x1000 JPEGs, quality 90, mean {mean_kb:.0f} KiB; grid {grid[0]}x{grid[1]}")

        full = rate(decode_photo, paths, args.repeats)
        print(f"{'decode only, full resolution':<52s} {full:7.1f} photos/s")
        for size in args.img_sizes:
            need_w, need_h = needed_size(grid, size)
            min_size = (2 * need_w, need_h)
            scale = decode_scale(paths[0], min_size)
            if scale == 1:
                print(f"  (img-size {size}: no reduced decode possible, it decodes at full resolution)")
                continue
            reduced = rate(lambda p, m=min_size: decode_photo(p, m), paths, args.repeats)
            label = f"decode only, 1/{scale} scale (as img-size {size} allows)"
            print(f"{label:<52s} {reduced:7.1f} photos/s")

        for size in args.img_sizes:
            def pipeline(path, s=size):
                left, right = load_views(path, grid, s)
                return tile_view(left, grid), tile_view(right, grid)

            scale = decode_scale(paths[0], (2 * needed_size(grid, size)[0], needed_size(grid, size)[1]))
            label = f"decode+split+tile, img-size {size} (decode 1/{scale})"
            print(f"{label:<52s} {rate(pipeline, paths, args.repeats):7.1f} photos/s")


if __name__ == "__main__":
    main()
