"""Drawing of synthetic pasture photos whose content follows the targets.

A scene (one quadrat) is drawn once on a square canvas slightly larger than a view: textured soil, then
three interleaved layers of dead straw, clover trefoils and green grass blades. Cover grows with grams (a
fixed leaf area per gram of each component), blade length with Height_Ave_cm, and the green hue goes from
yellow-green at low NDVI to deep green at high NDVI. The left and right stereo views are two slightly
shifted crops of that scene, each with its own few extra blades, gain and vignetting, as two camera
positions over one quadrat would give. A camera-style date stamp goes in the bottom-right corner.

Everything is drawn with batched OpenCV polylines at up to 1000 px per view side, then resized to the
requested view size; a 2000x1000 photo takes about 0.2 s.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from biomass5head.synthetic.realism import SceneEffects, camera_effects, cast_shadow, clear_patches, draw_distractors

MAX_SIDE = 1000  # drawing resolution cap: a real view is 1000 px for ~35 cm of quadrat
MIN_SIDE = 256  # small outputs are drawn at this size and shrunk, so cover does not depend on output size
MARGIN = 0.06  # canvas margin (fraction of a view) that the two views' shifts move into
# Grams that give a cover intensity of 1 (about 63 % of the ground under that component alone).
GRAMS_PER_UNIT = {"green": 30.0, "dead": 25.0, "clover": 20.0}
LAYERS = 3
COLOUR_BINS = 6


def _grass_colour(ndvi: float) -> np.ndarray:
    """RGB of a healthy blade: yellow-green at NDVI 0.2, deep green at 0.9."""
    t = float(np.clip((ndvi - 0.2) / 0.7, 0.0, 1.0))
    return (1 - t) * np.array([150.0, 150.0, 60.0]) + t * np.array([48.0, 128.0, 38.0])


def _soil(c: int, rng: np.random.Generator) -> np.ndarray:
    """(c, c, 3) uint8 brown soil with blotches at three scales and a few clods/pebbles."""
    base = np.array([108.0, 82.0, 58.0]) * rng.uniform(0.8, 1.15) + rng.normal(0, 6, 3)
    tex = np.zeros((c, c), np.float32)
    scales = ((5, 0.16, cv2.INTER_CUBIC), (40, 0.10, cv2.INTER_LINEAR), (c // 3, 0.09, cv2.INTER_NEAREST))
    for cells, amp, interp in scales:
        small = rng.normal(0, amp, (cells, cells)).astype(np.float32)
        tex += cv2.resize(small, (c, c), interpolation=interp)
    img = np.clip(base[None, None, :] * (1.0 + tex[..., None]), 0, 255).astype(np.uint8)
    n = int(c * c / 2500)
    for shade in (0.6, 1.35):
        pts = rng.uniform(0, c, (n // 2, 1, 2)).astype(np.int32)
        radius = max(1, c // 300)
        cv2.polylines(img, list(np.concatenate([pts, pts + 1], axis=1)), False,
                      tuple(float(v) for v in np.clip(base * shade, 0, 255)), radius * 2)
    return img


def _blades(rng: np.random.Generator, n: int, c: int, length: float, bend: float, tuft: float) -> np.ndarray:
    """(n, 3, 2) int32 polylines base-mid-tip of curved blades; tuft > 0 clusters bases around tuft centres."""
    if tuft > 0:
        centres = rng.uniform(0, c, (max(1, n // 8), 2))
        base = centres[rng.integers(0, len(centres), n)] + rng.normal(0, tuft, (n, 2))
    else:
        base = rng.uniform(0, c, (n, 2))
    ang = rng.uniform(0, 2 * np.pi, n)
    lengths = length * rng.lognormal(0.0, 0.35, n)
    d = np.stack([np.cos(ang), np.sin(ang)], 1)
    tip = base + lengths[:, None] * d
    mid = (base + tip) / 2 + (lengths * rng.normal(0, bend, n))[:, None] * np.stack([-d[:, 1], d[:, 0]], 1)
    return np.round(np.stack([base, mid, tip], 1)).astype(np.int32)


def _trefoils(rng: np.random.Generator, n: int, c: int, radius: float) -> np.ndarray:
    """(3n, 2, 2) int32 segments, one per leaflet of n clover leaves clustered in patches."""
    centres = rng.uniform(0, c, (max(1, n // 25), 2))
    centre = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.06 * c, (n, 2))
    ang = rng.uniform(0, 2 * np.pi, n)[:, None] + np.array([0.0, 2.09, 4.19])[None, :]  # (n, 3)
    rho = radius * rng.lognormal(0.0, 0.2, n)[:, None]
    d = np.stack([np.cos(ang), np.sin(ang)], -1)  # (n, 3, 2)
    seg = np.stack([centre[:, None] + 0.45 * rho[..., None] * d, centre[:, None] + 0.95 * rho[..., None] * d], 2)
    return np.round(seg.reshape(-1, 2, 2)).astype(np.int32)


def _draw(img: np.ndarray, lines: np.ndarray, colour: np.ndarray, thickness: int, rng: np.random.Generator,
          shade: float) -> None:
    """Draw polylines in COLOUR_BINS brightness bins (one OpenCV call per bin) so blades differ in tone."""
    if len(lines) == 0:
        return
    bins = rng.integers(0, COLOUR_BINS, len(lines))
    for k in range(COLOUR_BINS):
        sel = lines[bins == k]
        if len(sel):
            tone = shade * (0.7 + 0.55 * k / (COLOUR_BINS - 1))
            col = tuple(float(v) for v in np.clip(colour * tone + rng.normal(0, 5, 3), 0, 255))
            cv2.polylines(img, list(sel), False, col, thickness + k % 2, cv2.LINE_AA)


def _counts(record: dict, area: float, r: int, scale: float = 1.0) -> tuple[dict, dict]:
    """Number of each element on the canvas and its size in canvas pixels (`scale`: apparent size, camera height)."""
    blade = scale * r * min(0.25, 0.018 + 0.0045 * float(record["Height_Ave_cm"]))  # px, grows with height
    thick = max(1, round(2.5 * r / MAX_SIDE))
    sizes = {"green": blade, "dead": 0.5 * blade + 0.02 * r * scale, "clover": 0.0075 * r * scale, "thick": thick}
    unit_area = {"green": blade * (thick + 0.5), "dead": sizes["dead"] * (max(1, thick - 1) + 0.5),
                 "clover": 4.5 * sizes["clover"] ** 2}
    grams = {"green": record["Dry_Green_g"], "dead": record["Dry_Dead_g"], "clover": record["Dry_Clover_g"]}
    counts = {k: int(round(grams[k] / GRAMS_PER_UNIT[k] * area / unit_area[k])) for k in grams}
    return counts, sizes


def draw_elements(img: np.ndarray, record: dict, counts: dict, sizes: dict, rng: np.random.Generator) -> None:
    """Draw dead straw, clover and green blades in interleaved layers (lower layers darker: shade)."""
    c = img.shape[0]
    green = _grass_colour(float(record["Pre_GSHH_NDVI"]))
    clover = np.array([40.0, 105.0, 55.0])
    straw = np.array([200.0, 182.0, 128.0]) * rng.uniform(0.85, 1.05)
    th = sizes["thick"]
    dead = _blades(rng, counts["dead"], c, sizes["dead"], 0.3, 0.0)
    leaves = _trefoils(rng, counts["clover"], c, sizes["clover"]).reshape(-1, 3, 2, 2)
    grass = _blades(rng, counts["green"], c, sizes["green"], 0.15, 0.25 * sizes["green"])
    for layer in range(LAYERS):
        shade = 0.75 + 0.25 * layer / max(1, LAYERS - 1)
        part = slice(layer, None, LAYERS)
        _draw(img, dead[part], straw, max(1, th - 1), rng, shade)
        _draw(img, leaves[part].reshape(-1, 2, 2), clover, max(2, round(1.05 * sizes["clover"])), rng, shade)
        _draw(img, grass[part], green, th, rng, shade)


@lru_cache(maxsize=4)
def _vignette(r: int) -> np.ndarray:
    """(r, r, 1) float32 light fall-off towards the corners."""
    y, x = np.mgrid[0:r, 0:r].astype(np.float32) / max(1, r - 1) - 0.5
    return (1.0 - 0.45 * (x * x + y * y))[..., None]


def _view(scene: np.ndarray, r: int, record: dict, counts: dict, sizes: dict, out_wh: tuple[int, int],
          rng: np.random.Generator) -> np.ndarray:
    """One stereo view: a shifted crop of the scene plus its own few extra elements, gain and vignetting."""
    m = (scene.shape[0] - r) // 2
    dx, dy = rng.integers(-m // 2, m // 2 + 1, 2)
    view = scene[m + dy:m + dy + r, m + dx:m + dx + r].copy()
    extra = {k: int(rng.poisson(0.04 * v * (r / scene.shape[0]) ** 2)) for k, v in counts.items()}
    draw_elements(view, record, extra, sizes, rng)
    gain = (rng.uniform(0.92, 1.08) * (1 + rng.normal(0, 0.02, 3))).astype(np.float32)
    view = np.clip(view.astype(np.float32) * (_vignette(r) * gain), 0, 255).astype(np.uint8)
    if (r, r) != out_wh:
        interp = cv2.INTER_AREA if out_wh[0] < r else cv2.INTER_CUBIC
        view = cv2.resize(view, out_wh, interpolation=interp)
    return view


def _date_stamp(img: np.ndarray, date: str) -> None:
    """Camera-style orange date stamp `YYYY/MM/DD` in the bottom-right corner of the whole photo."""
    y, mo, d = (int(v) for v in str(date).split("/"))
    text = f"{y:04d}/{mo:02d}/{d:02d}"
    h, w = img.shape[:2]
    scale = 1.4 * h / 1000
    thick = max(1, round(3 * h / 1000))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    org = (max(0, w - tw - round(0.03 * h)), h - round(0.03 * h))
    cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 140, 20), thick, cv2.LINE_AA)


def render_photo(record: dict, size: tuple[int, int], rng: np.random.Generator,
                 realism: np.random.Generator | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB photo of one image record (needs the three components, height, NDVI, date).

    `realism`: a generator for the realistic mode's scene and camera effects (`synthetic/realism.py`); None draws
    the easy set's clean photo (and leaves `rng`'s sequence as the easy set has it)."""
    w, h = int(size[0]), int(size[1])
    left_w = w // 2
    r = int(np.clip(max(w - left_w, h), MIN_SIDE, MAX_SIDE))
    c = r + 2 * int(round(MARGIN * r))
    fx = SceneEffects.draw(realism) if realism is not None else None
    counts, sizes = _counts(record, float(c * c), r, fx.scale if fx else 1.0)
    if fx:
        counts = {k: int(round(v / (1.0 - fx.bare))) for k, v in counts.items()}
    soil = _soil(c, rng)
    scene = soil.copy() if fx else soil
    draw_elements(scene, record, counts, sizes, rng)
    if fx:
        clear_patches(scene, soil, fx, realism)
        draw_distractors(scene, fx, realism)
        cast_shadow(scene, fx, realism)
    left = _view(scene, r, record, counts, sizes, (left_w, h), rng)
    right = _view(scene, r, record, counts, sizes, (w - left_w, h), rng)
    photo = np.ascontiguousarray(np.concatenate([left, right], axis=1))
    _date_stamp(photo, record["Sampling_Date"])
    return camera_effects(photo, realism) if fx else photo
