"""Stereo-aware augmentation of the left/right uint8 views of one quadrat, and the left/right swap.

Everything here runs on uint8 `(H, W, 3)` views before normalisation and before tiling (applying photometric
changes to normalised floats was a defect of earlier implementations). Geometric transforms are always shared
by the two views, so the stereo geometry stays consistent; photometric transforms are shared (default, as in
the reference) or drawn per view with `stereo_correct=True`, which stops a model from matching identical noise
between the views instead of learning from the scene.
"""
from __future__ import annotations

import os

import albumentations as A
import cv2
import numpy as np

from biomass5head.config import SCALE_PADS

Views = tuple[np.ndarray, np.ndarray]

# Probability of each transform = min(1, aug_prob * weight). Flips, rotation and the colour jitters are the
# main transforms; noise, blur and JPEG artefacts destroy fine leaf detail that biomass depends on, so they
# are drawn less often.
PHOTO_WEIGHTS: dict[str, float] = {
    "brightness_contrast": 1.0,
    "hue_saturation": 1.0,
    "gamma": 0.5,
    "noise": 0.5,
    "blur": 0.25,
    "jpeg": 0.25,
}
# A flip or a 90-degree rotation applied every time is no augmentation at all, so their probability is capped.
MAX_FLIP_PROB = 0.5
# --scale-pad (config.SCALE_PADS): reflect mirrors the photo's own edge into the border a zoom-out leaves (more of
# the same pasture); grey fills it with a neutral colour, so the quadrat shrinks as if the camera were further away.
NEUTRAL_GREY = (128, 128, 128)


def hflip_views(left: np.ndarray, right: np.ndarray) -> Views:
    """Both views mirrored left-right (TTA); returns contiguous copies."""
    return np.ascontiguousarray(left[:, ::-1]), np.ascontiguousarray(right[:, ::-1])


def vflip_views(left: np.ndarray, right: np.ndarray) -> Views:
    """Both views mirrored top-bottom (TTA); returns contiguous copies."""
    return np.ascontiguousarray(left[::-1]), np.ascontiguousarray(right[::-1])


def worker_seed() -> int | None:
    """Seed torch gave the current DataLoader worker (differs per worker and per epoch), None outside workers."""
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover - torch is a dependency, but augment itself does not need it
        return None
    info = get_worker_info()
    return None if info is None else int(info.seed % 2**32)


def seed_compose(compose: A.Compose, seed_seq: np.random.SeedSequence) -> None:
    """Give a Compose and each of its transforms its own random stream derived from `seed_seq`.

    albumentations 2.0 seeds every transform of `Compose(seed=s)` with the same `s`, so the decisions of e.g.
    HorizontalFlip and VerticalFlip come out perfectly correlated (both or neither); distinct seeds avoid that.
    """
    states = seed_seq.generate_state(len(compose.transforms) + 1)
    compose.set_random_seed(int(states[0]))
    for transform, state in zip(compose.transforms, states[1:], strict=True):
        transform.set_random_seed(int(state))


def _geometric(p: float, pair: dict[str, str]) -> A.Compose:
    """Flips and a mild shape-preserving affine; the same parameters reach `image` and `right`."""
    p_flip = min(p, MAX_FLIP_PROB)
    return A.Compose(
        [
            A.HorizontalFlip(p=p_flip),
            A.VerticalFlip(p=p_flip),
            # Reflected borders rather than black corners, which would read as bare ground.
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10),
                     border_mode=cv2.BORDER_REFLECT_101, p=p),
        ],
        additional_targets=pair,
    )


def _photometric(p: float, pair: dict[str, str]) -> A.Compose:
    """Colour, gamma, noise, blur and JPEG changes, each with probability min(1, p * PHOTO_WEIGHTS[name])."""
    w = {name: min(1.0, p * weight) for name, weight in PHOTO_WEIGHTS.items()}
    return A.Compose(
        [
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=w["brightness_contrast"]),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=w["hue_saturation"]),
            A.RandomGamma(gamma_limit=(80, 120), p=w["gamma"]),
            # std_range is a fraction of 255 for uint8: about 2.5 to 12.8 grey levels.
            A.GaussNoise(std_range=(0.01, 0.05), p=w["noise"]),
            A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 1.0), p=w["blur"]),
            A.ImageCompression(quality_range=(70, 95), p=w["jpeg"]),
        ],
        additional_targets=pair,
    )


def _lighting(p: float, pair: dict[str, str]) -> A.Compose:
    """Uneven and coloured light, each with probability p: a hard-edged shadow (a person, a post, a fence) darkening
    one or two polygons by 25-60 %, and the colour of daylight (black-body white balance, 3000-15000 K)."""
    return A.Compose(
        [
            A.RandomShadow(shadow_roi=(0, 0, 1, 1), num_shadows_limit=(1, 2), shadow_dimension=6,
                           shadow_intensity_range=(0.25, 0.6), p=p),
            A.PlanckianJitter(mode="blackbody", p=p),
        ],
        additional_targets=pair,
    )


def _scale(p: float, scale_range: tuple[float, float], pad: str, pair: dict[str, str]) -> A.Compose:
    """Random zoom about the view's centre, the same factor on both views: below 1 the photo shrinks and the border
    is padded (`pad`), above 1 the centre is enlarged and the edges cropped; the view keeps its size."""
    lo, hi = scale_range
    border = cv2.BORDER_REFLECT_101 if pad == "reflect" else cv2.BORDER_CONSTANT
    return A.Compose(
        # balanced_scale: zooming in and out equally likely when the range spans 1 (uniform on each side).
        [A.Affine(scale=(lo, hi), keep_ratio=True, balanced_scale=lo < 1.0 < hi, border_mode=border,
                  fill=NEUTRAL_GREY, p=p)],
        additional_targets=pair,
    )


class StereoAugment:
    """Random augmentation of a (left, right) pair of uint8 views of one quadrat.

    - Geometric (horizontal/vertical flip with p = min(aug_prob, 0.5); affine with scale 0.9-1.1, shift 5%,
      rotation 10 degrees with p = aug_prob; RandomRotate90 with p = min(aug_prob, 0.5) on square views only,
      so the shape never changes): always identical on both views.
    - Photometric (brightness/contrast, hue/saturation, gamma, Gaussian noise, blur, JPEG; probabilities
      `aug_prob * PHOTO_WEIGHTS`): identical on both views when `stereo_correct=False` (the reference's
      default, same parameters and same noise), drawn independently per view when `stereo_correct=True`.
    - Scale (--scale-aug-prob, before everything else, independent of `aug_prob`): with probability `scale_prob` a
      zoom by a factor from `scale_range` about the centre (out: padded by `scale_pad`; in: edges cropped),
      always identical on both views, as the camera's distance is.
    - Light (--light-aug-prob, after the geometric and before the colour transforms, independent of `aug_prob`):
      with probability `light_prob` each, a shadow and a daylight white balance, identical on both views (the
      shadow lies on the scene, the light's colour is the sky's).
    - Swap: after the transforms, left and right are exchanged with probability `swap_prob`.

    `aug_prob=0, swap_prob=0, scale_prob=0, light_prob=0` returns the inputs untouched. Randomness comes only from
    `seed` (see `reseed`): the same seed gives the same outputs. In a forked DataLoader worker that was not reseeded
    explicitly, the first call reseeds from torch's per-worker seed, so workers do not repeat each other's
    augmentations.
    """

    def __init__(self, aug_prob: float = 0.5, stereo_correct: bool = False, swap_prob: float = 0.0,
                 seed: int | None = None, scale_prob: float = 0.0, scale_range: tuple[float, float] = (0.75, 1.25),
                 scale_pad: str = "reflect", light_prob: float = 0.0):
        for name, value in (("aug_prob", aug_prob), ("swap_prob", swap_prob), ("scale_prob", scale_prob),
                            ("light_prob", light_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        if scale_pad not in SCALE_PADS:
            raise ValueError(f"scale_pad must be one of {', '.join(SCALE_PADS)}, got {scale_pad!r}")
        self.aug_prob = float(aug_prob)
        self.stereo_correct = bool(stereo_correct)
        self.swap_prob = float(swap_prob)
        self.scale_prob, self.scale_range, self.scale_pad = float(scale_prob), tuple(scale_range), scale_pad
        self.light_prob = float(light_prob)
        pair = {"right": "image"}
        self._zoom = _scale(self.scale_prob, self.scale_range, scale_pad, pair)
        self._geo = _geometric(self.aug_prob, pair)
        self._rot90 = A.Compose([A.RandomRotate90(p=min(self.aug_prob, MAX_FLIP_PROB))], additional_targets=pair)
        self._photo = _photometric(self.aug_prob, pair)
        self._light = _lighting(self.light_prob, pair)
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart every random stream from `seed` (None: fresh entropy), e.g. per DataLoader worker and epoch."""
        # (spawn(6)'s first five children are spawn(5)'s, so adding the light kept every earlier draw the same)
        geo, rot, photo, swap, zoom, light = np.random.SeedSequence(seed).spawn(6)
        seed_compose(self._zoom, zoom)
        seed_compose(self._geo, geo)
        seed_compose(self._rot90, rot)
        seed_compose(self._photo, photo)
        seed_compose(self._light, light)
        self._rng = np.random.default_rng(swap)
        self._pid = os.getpid()

    def __call__(self, left: np.ndarray, right: np.ndarray) -> Views:
        """Augmented (left, right), same shape and dtype (uint8) as the inputs."""
        _check_views(left, right)
        if self._pid != os.getpid():  # forked worker that nobody reseeded: do not copy the parent's stream
            self.reseed(worker_seed())
        if self.scale_prob > 0.0:
            out = self._zoom(image=left, right=right)
            left, right = np.ascontiguousarray(out["image"]), np.ascontiguousarray(out["right"])
        if self.aug_prob > 0.0 or self.light_prob > 0.0:
            left, right = self._augment(left, right)
        if self.swap_prob > 0.0 and self._rng.random() < self.swap_prob:
            left, right = right, left
        return left, right

    def _augment(self, left: np.ndarray, right: np.ndarray) -> Views:
        out = {"image": left, "right": right}
        if self.aug_prob > 0.0:
            out = self._geo(image=left, right=right)
            if left.shape[0] == left.shape[1]:
                out = self._rot90(image=out["image"], right=out["right"])
        if self.light_prob > 0.0:
            out = self._light(image=out["image"], right=out["right"])
        if self.aug_prob == 0.0:
            return np.ascontiguousarray(out["image"]), np.ascontiguousarray(out["right"])
        if self.stereo_correct:
            left = self._photo(image=out["image"])["image"]
            right = self._photo(image=out["right"])["image"]
        else:
            out = self._photo(image=out["image"], right=out["right"])
            left, right = out["image"], out["right"]
        return np.ascontiguousarray(left), np.ascontiguousarray(right)

    def __repr__(self) -> str:
        scale = (f", scale_prob={self.scale_prob}, scale_range={self.scale_range}, scale_pad={self.scale_pad!r}"
                 if self.scale_prob else "")
        light = f", light_prob={self.light_prob}" if self.light_prob else ""
        return (f"StereoAugment(aug_prob={self.aug_prob}, stereo_correct={self.stereo_correct}, "
                f"swap_prob={self.swap_prob}{scale}{light})")


def augment_from_config(aug, seed: int | None = None, swap: bool = True) -> StereoAugment:
    """The training augmentation an `AugConfig` describes (`swap=False`: without the left/right swap, e.g. for a
    feature bank, where the swap is applied on the features instead)."""
    return StereoAugment(aug_prob=aug.aug_prob, stereo_correct=aug.stereo_correct_aug,
                         swap_prob=aug.stereo_swap_prob if swap else 0.0, seed=seed, scale_prob=aug.scale_aug_prob,
                         scale_range=aug.scale_range, scale_pad=aug.scale_pad, light_prob=aug.light_aug_prob)


def _check_views(left: np.ndarray, right: np.ndarray) -> None:
    """Reject inputs that are not a matching pair of uint8 (H, W, 3) views."""
    for name, view in (("left", left), ("right", right)):
        if not isinstance(view, np.ndarray) or view.dtype != np.uint8 or view.ndim != 3 or view.shape[2] != 3:
            got = f"{view.dtype} {view.shape}" if isinstance(view, np.ndarray) else type(view).__name__
            raise ValueError(f"{name} view must be a uint8 (H, W, 3) array before normalisation, got {got}")
    if left.shape != right.shape:
        raise ValueError(f"left and right views differ in shape: {left.shape} vs {right.shape}")
