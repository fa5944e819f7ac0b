"""What `--difficulty realistic` adds to the synthetic set: what real quadrat photos and their labels have.

Each effect, its size, and why (sizes are in the units named; "view" = one stereo half):

Labels (`noisy_labels`):
- Clip-and-weigh error: each of Green, Dead and Clover is multiplied by its own log-normal factor,
  sigma LABEL_SIGMA = 0.15 (about +-15 %: hand sorting into components, drying, cutting height and the quadrat
  edge); GDM and Total are recomputed as sums, so the identities of the real file still hold. A zero stays zero.
  The photo shows the biomass before this error; the CSV has the measured value.

Scene (drawn once per quadrat, so both views share it; `SceneEffects`):
- Camera height: element sizes scale by a log-normal factor (sigma 0.15, clipped to 0.7-1.4) and the counts follow
  from the scaled sizes, so cover per gram is unchanged but blades look shorter or longer (blade length encodes
  the sward height in the easy set).
- Bare-soil patches (probability 0.5): 1-4 soft blobs clearing 5-30 % of the ground; the same grams crowd into
  the rest (counts scaled up by 1 / (1 - cleared)).
- Weeds (probability 0.5): broad-leaf rosettes of a different green (not target material), covering up to about
  12 % of the ground, independent of the targets.
- Litter (probability 0.6): dung pats, twigs and brown leaf litter, not counted as Dead (up to about 8 %).
- Shadows (probability 0.6): a soft-edged shadow (a person, a fence post or cloud edge) that darkens 15-60 %
  of the scene by a factor 0.4-0.75, slightly blue-shifted as shade is.

Camera (per photo, both views; `camera_effects`):
- Exposure: gain log-normal sigma 0.25; gamma 0.8-1.25.
- White balance: per-channel gains log-normal sigma 0.07.
- Blur (probability 0.35): Gaussian, sigma 0.5-2.5 px at 1000 px per view (focus, motion).
- Sensor noise: Gaussian, sigma 2-6 grey levels; JPEG quality 60-95 (`jpeg_quality`).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LABEL_SIGMA = 0.15


def noisy_labels(green: np.ndarray, dead: np.ndarray, clover: np.ndarray, rng: np.random.Generator):
    """Measured (Green, Dead, Clover) grams: each true value times its own log-normal error (zeros stay zero)."""
    out = []
    for grams in (green, dead, clover):
        factor = np.exp(rng.normal(0.0, LABEL_SIGMA, len(grams)) - LABEL_SIGMA ** 2 / 2)  # mean factor 1
        out.append(np.round(np.asarray(grams) * factor, 4))
    return tuple(out)


@dataclass
class SceneEffects:
    """One quadrat's draw of the scene-level effects (see the module docstring)."""
    scale: float
    bare: float  # fraction of ground cleared
    weeds: float  # weed cover fraction
    litter: float  # litter cover fraction
    shadow: float  # 0: none, else the darkening factor

    @classmethod
    def draw(cls, rng: np.random.Generator) -> SceneEffects:
        return cls(scale=float(np.clip(np.exp(rng.normal(0, 0.15)), 0.7, 1.4)),
                   bare=float(rng.uniform(0.05, 0.30)) if rng.random() < 0.5 else 0.0,
                   weeds=float(rng.uniform(0.01, 0.12)) if rng.random() < 0.5 else 0.0,
                   litter=float(rng.uniform(0.01, 0.08)) if rng.random() < 0.6 else 0.0,
                   shadow=float(rng.uniform(0.4, 0.75)) if rng.random() < 0.6 else 0.0)


def _blob_mask(c: int, n: int, frac: float, rng: np.random.Generator, soft: float) -> np.ndarray:
    """(c, c) float32 mask in [0, 1] of n random soft blobs covering about `frac` of the square."""
    cells = 8
    field = cv2.resize(rng.normal(0, 1, (cells, cells)).astype(np.float32), (c, c), interpolation=cv2.INTER_CUBIC)
    for _ in range(n):
        cx, cy = rng.uniform(0, c, 2)
        y, x = np.ogrid[0:c, 0:c]
        field += 2.5 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (rng.uniform(0.08, 0.22) * c) ** 2))
    threshold = np.quantile(field, 1.0 - frac)
    mask = (field >= threshold).astype(np.float32)
    k = max(3, int(soft * c) | 1)
    return cv2.GaussianBlur(mask, (k, k), 0)


def clear_patches(scene: np.ndarray, soil: np.ndarray, fx: SceneEffects, rng: np.random.Generator) -> None:
    """Bare-soil patches: paint the soil back where the vegetation is cleared (in place)."""
    if fx.bare <= 0:
        return
    mask = _blob_mask(scene.shape[0], int(rng.integers(1, 5)), fx.bare, rng, 0.02)[..., None]
    scene[:] = np.clip(scene * (1 - mask) + soil * mask, 0, 255).astype(np.uint8)


def draw_distractors(scene: np.ndarray, fx: SceneEffects, rng: np.random.Generator) -> None:
    """Weeds (broad-leaf rosettes) and litter (dung pats, twigs, brown leaves) that are not target material."""
    c = scene.shape[0]
    if fx.weeds > 0:
        leaf = 0.018 * c * fx.scale
        n = int(fx.weeds * c * c / (6 * 0.8 * leaf * leaf * 0.6))
        colour = np.array([95.0, 140.0, 70.0]) * rng.uniform(0.8, 1.1, 3)
        centres = rng.uniform(0, c, (max(1, n // 6), 2))
        for (cx, cy) in centres:
            for k in range(6):
                ang = k * np.pi / 3 + rng.normal(0, 0.2)
                centre = (int(cx + 0.8 * leaf * np.cos(ang)), int(cy + 0.8 * leaf * np.sin(ang)))
                tone = tuple(float(v) for v in np.clip(colour * rng.uniform(0.8, 1.15), 0, 255))
                cv2.ellipse(scene, centre, (int(leaf), max(1, int(0.55 * leaf))), float(np.degrees(ang)), 0, 360,
                            tone, -1, cv2.LINE_AA)
    if fx.litter > 0:
        area = fx.litter * c * c
        dung = np.array([70.0, 55.0, 40.0])
        for _ in range(int(rng.integers(0, 3))):  # dung pats: large dark discs
            r = int(rng.uniform(0.03, 0.07) * c * fx.scale)
            cv2.circle(scene, tuple(int(v) for v in rng.uniform(0, c, 2)), r,
                       tuple(float(v) for v in dung * rng.uniform(0.8, 1.2)), -1, cv2.LINE_AA)
            area -= np.pi * r * r
        size = 0.012 * c * fx.scale
        n = max(0, int(area / (size * size * 1.5)))
        pts = rng.uniform(0, c, (n, 2))
        brown = np.array([120.0, 90.0, 60.0])
        for (x, y), s in zip(pts, rng.lognormal(0, 0.4, n), strict=True):
            tone = tuple(float(v) for v in np.clip(brown * rng.uniform(0.6, 1.2), 0, 255))
            if rng.random() < 0.3:  # a twig
                ang = rng.uniform(0, np.pi)
                d = 2.5 * size * s * np.array([np.cos(ang), np.sin(ang)])
                cv2.line(scene, (int(x - d[0]), int(y - d[1])), (int(x + d[0]), int(y + d[1])), tone,
                         max(1, int(0.25 * size)), cv2.LINE_AA)
            else:  # a dry leaf
                cv2.ellipse(scene, (int(x), int(y)), (int(size * s), max(1, int(0.6 * size * s))),
                            float(rng.uniform(0, 180)), 0, 360, tone, -1, cv2.LINE_AA)


def cast_shadow(scene: np.ndarray, fx: SceneEffects, rng: np.random.Generator) -> None:
    """A soft shadow over part of the scene (in place), a little bluer than the lit ground."""
    if fx.shadow <= 0:
        return
    c = scene.shape[0]
    mask = _blob_mask(c, int(rng.integers(1, 3)), float(rng.uniform(0.15, 0.6)), rng, 0.08)[..., None]
    tint = np.array([0.92, 0.97, 1.08], np.float32)
    factor = 1.0 - mask * (1.0 - fx.shadow * tint)
    scene[:] = np.clip(scene.astype(np.float32) * factor, 0, 255).astype(np.uint8)


def camera_effects(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure, gamma, white balance, blur and sensor noise of one photo (both views share the camera)."""
    h = photo.shape[0]
    img = photo.astype(np.float32) / 255.0
    if rng.random() < 0.35:
        sigma = rng.uniform(0.5, 2.5) * h / 1000
        if sigma > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), sigma)
    gain = np.exp(rng.normal(0, 0.25)) * np.exp(rng.normal(0, 0.07, 3))
    img = np.clip(img * gain.astype(np.float32), 0, 1) ** np.float32(rng.uniform(0.8, 1.25))
    img = img * 255.0 + rng.normal(0, rng.uniform(2, 6), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_quality(rng: np.random.Generator) -> int:
    return int(rng.integers(60, 96))
