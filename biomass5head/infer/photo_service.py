"""A finished run loaded once to answer for single photos: what the web page and its JSON API (`serve/`) show.

For each photo: the five estimates in grams (the fold average, post-processed exactly as `predict --images` does),
every fold's own estimate (and each flip when TTA is on) for the range, the attention-pooling weight of every tile,
and the out-of-distribution check (`ood.py`). When every fold shares one frozen backbone (a head-only run), a
photo's tiles are encoded once and all fold heads run on the same features.
"""
from __future__ import annotations

import io
import json
import logging
import threading
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image

from biomass5head.constants import TARGETS
from biomass5head.data.augment import hflip_views, vflip_views
from biomass5head.data.feature_cache import FeatureCache, ensure_features
from biomass5head.data.images import ImageReadError, decode_photo, needed_size, resize_view, split_views
from biomass5head.data.photo_check import ASPECT_TOLERANCE
from biomass5head.data.tables import load_train
from biomass5head.infer.fold_model import backbone_digests, fold_feature_cache, load_fold_model
from biomass5head.infer.ood import pooled, reference_for_run
from biomass5head.infer.run_folder import open_run, resolve_options, runtime
from biomass5head.model.postprocess import apply_postprocess

logger = logging.getLogger(__name__)

QUADRAT_M2 = 0.21  # the competition's quadrat: 70 cm x 30 cm


class PhotoError(ValueError):
    """A photo that cannot be used; `status` is the HTTP answer it deserves."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def kg_per_ha(grams: float, area_m2: float = QUADRAT_M2) -> float:
    """Grams of dry matter on `area_m2` as kg per hectare (1 g/m^2 = 10 kg/ha)."""
    return float(grams) / area_m2 * 10.0


class PhotoPredictor:
    """The run's fold models on one device, answering for one photo at a time (thread-safe)."""

    def __init__(self, model_dir, device: str | None = None, tta: bool = False, ood: bool = True):
        self.run = open_run(model_dir)
        self.opts = resolve_options(self.run, {"device": device, "tta": tta})
        self.rt = runtime(self.opts)
        self.folds = [load_fold_model(p, self.opts, self.rt.device) for p in self.run.checkpoints.values()]
        self.tiles = self.folds[0].tiles(self.opts)
        digests = backbone_digests(self.folds)
        self.shared_backbone = len(set(digests)) == 1
        self._first_digest = digests[0]  # the first fold's backbone: the OOD check's features
        self._lock = threading.Lock()
        key = (f"{self.opts.cfg.model.backbone}:{self._first_digest}:"
               f"{self.tiles.img_size}:{list(self.tiles.grid)}:{self.rt.dtype_name}:{self.opts.cfg.model.tile_feature}")
        self.ood, self.ood_status = (reference_for_run(self.run.path, self._training_features, key) if ood
                                     else (None, "off (--no-ood)"))
        logger.info("loaded %s: folds %s, %s backbone%s; out-of-distribution check: %s", self.run.path,
                    [fm.fold for fm in self.folds], "one shared" if self.shared_backbone else "a fold's own",
                    "" if self.shared_backbone else " per fold", self.ood_status)

    # --- what the run is ---------------------------------------------------------------------------------
    def describe(self) -> dict:
        cfg, path = self.opts.cfg, self.run.path
        oof = path / "oof_metrics.json"
        score = json.loads(oof.read_text()).get("weighted_r2") if oof.is_file() else None
        trained = datetime.fromtimestamp((path / "config.json").stat().st_mtime, timezone.utc).isoformat(
            timespec="seconds")
        return {"run": path.name, "backbone": cfg.model.backbone, "folds": [fm.fold for fm in self.folds],
                "img_size": cfg.model.img_size, "grid": list(cfg.model.grid), "trained": trained,
                "oof_weighted_r2": score, "targets": list(TARGETS), "tta": self.opts.tta,
                "shared_backbone": self.shared_backbone, "quadrat_m2": QUADRAT_M2, "device": str(self.rt.device),
                "ood": self.ood_status if self.ood is None else
                {"source": self.ood.source, "threshold": self.ood.threshold, "training_photos": len(self.ood.train)}}

    def _training_features(self) -> tuple[np.ndarray, str]:
        """Tile features of the run's training photos through the first fold's backbone (from the cache if there)."""
        paths = [str(p) for p in load_train(self.opts.data_dir)["abs_path"]]
        fm, cfg = self.folds[0], self.opts.cfg
        cache = (fold_feature_cache(fm, self.opts, self.rt) if self.opts.feature_cache else
                 FeatureCache(cfg.cache.resolved_dir(self.opts.data_dir), backbone=cfg.model.backbone, tiles=self.tiles,
                              tile_feature=cfg.model.tile_feature,
                              weights_digest=self._first_digest, compute_dtype=self.rt.dtype_name))
        cached = sum(cache.file(p, "id").exists() for p in paths)
        table = ensure_features(cache, fm.model, paths, ["id"], tiles=self.tiles, runtime=self.rt,
                                batch_size=self.opts.cfg.data.batch_size, desc="training photos' features")
        how = (f"from the feature cache ({len(paths)} training photos)" if cached == len(paths) else
               f"computed from the {len(paths)} training photos ({cached} were cached)")
        return np.stack([table[p]["id"] for p in paths]), how

    # --- one photo ---------------------------------------------------------------------------------------
    def decode(self, name: str, data: bytes) -> tuple[np.ndarray, str | None]:
        """An uploaded file as an upright RGB photo, and a note when it is not a 2:1 stereo pair."""
        if not data:
            raise PhotoError(f"{name}: empty file", 400)
        need_w, need_h = needed_size(self.tiles.grid, self.tiles.img_size)
        try:
            photo = decode_photo(io.BytesIO(data), min_size=(2 * need_w, need_h))
        except ImageReadError as exc:
            reason = exc.reason.replace(f"{io.BytesIO!r}", "")
            if "cannot identify image file" in reason or "UnidentifiedImageError" in reason:
                raise PhotoError(f"{name}: not an image (JPEG or PNG expected)", 415) from None
            raise PhotoError(f"{name}: truncated or corrupt image ({reason})", 422) from None
        h, w = photo.shape[:2]
        notes = []
        with Image.open(io.BytesIO(data)) as im:  # the header only: was it in colour?
            if im.mode in ("1", "L", "LA", "I", "I;16", "F"):
                notes.append(f"a grayscale photo ({im.mode}): converted to RGB, the model was trained on colour")
        if abs(w / h / 2 - 1) > ASPECT_TOLERANCE:
            notes.append(f"not a 2:1 stereo pair ({w}x{h} px, {w / h:.2f}:1): split at its middle column into a left "
                         f"and a right view of {w // 2}x{h} px, each resized to {need_w}x{need_h} px "
                         f"({self.tiles.grid[0]}x{self.tiles.grid[1]} tiles)")
        return photo, "; ".join(notes) or None

    @torch.inference_mode()
    def predict(self, photo: np.ndarray) -> dict:
        """Grams (fold average, post-processed), every fold's (and flip's) estimate, tile weights (2, T) and the
        out-of-distribution check for one upright RGB photo."""
        need = needed_size(self.tiles.grid, self.tiles.img_size)
        left, right = (resize_view(v, need) for v in split_views(photo))
        variants = [(left, right)]
        if self.opts.tta:
            variants += [hflip_views(left, right), vflip_views(left, right)]
        x = torch.stack([self.tiles.to_tensor(v) for pair in variants for v in pair]).to(self.rt.device)  # (2V,T,..)
        with self._lock, self.rt.autocast():
            shared = self._encode(self.folds[0].model, x) if self.shared_backbone else None
            per_fold, means, weights, first = [], [], [], None
            for fm in self.folds:
                feats = shared if shared is not None else self._encode(fm.model, x)  # (V, 2, T, D)
                first = feats if first is None else first  # the first fold's features: the OOD check's reference
                out = fm.model.forward_features(feats[:, 0], feats[:, 1])
                grams = fm.transform.decode(out["reg"].float()).cpu().numpy().astype(np.float64)  # (V, 5)
                mean = grams.mean(0, keepdims=True)  # over the flips, in grams, as predict does
                if self.opts.cfg.post.apply_context_adjustment:  # then the factors, as predict_grams applies them
                    probs = {h: out[h].float().softmax(1).cpu().numpy() for h in ("state", "month", "species")}
                    ratios = fm.context_ratios
                    mean = apply_postprocess(mean, correction_threshold=None, always_correct_dead=False,
                                             context=({h: p.mean(0, keepdims=True) for h, p in probs.items()}, ratios))
                    grams = apply_postprocess(grams, correction_threshold=None, always_correct_dead=False,
                                              context=(probs, ratios))
                per_fold.append(grams)
                means.append(mean[0])
                weights.append(fm.model.tile_weights(feats[:1, 0], feats[:1, 1])[0].float().cpu().numpy())
        per_fold = np.stack(per_fold)  # (F, V, 5)
        post = self.opts.cfg.post
        finish = lambda g: apply_postprocess(g, correction_threshold=post.correction_threshold,  # noqa: E731
                                             always_correct_dead=post.always_correct_dead,
                                             reconcile=post.reconcile)
        grams = finish(np.mean(means, axis=0, keepdims=True))[0]  # the fold average, as predict_ensemble does
        each = finish(per_fold.reshape(-1, 5))  # every fold x flip, post-processed alike
        return {"grams": grams, "each": each, "folds": [fm.fold for fm in self.folds],
                "per_fold": each.reshape(per_fold.shape)[:, 0],  # each fold's estimate of the photo as it is
                "tile_weights": np.mean(weights, axis=0),
                "ood": self.ood.check(pooled(first[0].cpu().numpy())) if self.ood else None}

    @staticmethod
    def _encode(model, x: torch.Tensor) -> torch.Tensor:
        """(2V, T, 3, S, S) tiles of V (left, right) pairs -> (V, 2, T, D) features."""
        n2, t = x.shape[:2]
        return model.encode(x.flatten(0, 1)).float().view(n2 // 2, 2, t, -1)
