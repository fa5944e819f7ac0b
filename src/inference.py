"""Using a finished run: read its folder, resolve evaluation options against it, rebuild its fold models and
predict grams for a DataFrame of images (one fold model, or the average of all of them).

Shared by `src.eval_5head_oof` (each image predicted by the model of the fold that held it out) and
`src.predict` (every image predicted by the average of all fold models).

- A run folder (`src.train_5head`) holds `config.json`, `folds.csv` and `5head_best_fold{k}.pth`.
- Models are always built WITHOUT pretrained weights: every weight comes from the checkpoint, so this works
  offline and after the file given to `--backbone-weights` is gone.
- The "must match training" options (`--backbone`, `--grid`, `--hidden-ratio`, `--dropout`, `--img-size`) are
  overrides: left out, they take the run's value (the reference's default only where the run recorded none).
  A `--backbone`, `--grid` or `--hidden-ratio` that contradicts the run is a RunError naming both values;
  `--img-size` may differ (warning; position embeddings are resampled); `--dropout` does nothing at inference.
- Post-processing is the run's (context adjustment, Dead correction), with `--derive-dead` on top. Context
  adjustment uses each fold's own ratios, so it is applied per fold model; Dead correction and derive-dead act on
  the final prediction (the fold's for OOF, the fold average for prediction).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.layers import resample_abs_pos_embed

from .checkpoint import load_checkpoint
from .config import DEFAULT_BACKBONE, PostConfig, RunConfig
from .dataset import BiomassDataset, make_loader
from .device import loader_workers, resolve_runtime
from .engine import predict
from .feature_cache import FeatureCache, autocast_key, predict_from_cache, state_dict_digest
from .postprocess import apply_postprocess
from .targets import TargetTransform
from .trainer import build_model

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^5head_best_fold(\d+)\.pth$")
# The reference's eval defaults, used only where the run recorded no value (num_workers None: chosen for the
# device, which is the reference's 4 on a GPU; see device.loader_workers).
TABLE_DEFAULTS: dict[str, Any] = {"base_path": "./data", "backbone": DEFAULT_BACKBONE, "grid": (2, 2), "dropout": 0.2,
                                  "hidden_ratio": 0.5, "img_size": 518, "batch_size": 4, "num_workers": None,
                                  "prefetch_factor": 4}
# Where config.json records each of them: (section, key).
RECORDED_AT = {"base_path": ("data", "base_path"), "backbone": ("model", "backbone"), "grid": ("model", "grid"),
               "dropout": ("model", "dropout"), "hidden_ratio": ("model", "hidden_ratio"),
               "img_size": ("model", "img_size"), "batch_size": ("data", "batch_size"),
               "num_workers": ("data", "num_workers"), "prefetch_factor": ("data", "prefetch_factor")}


class RunError(ValueError):
    """A run folder, or an option given against it, that evaluation / prediction cannot use."""


@dataclass
class Run:
    """A run folder: its configuration (config.json, raw and resolved) and its checkpoint files by fold."""
    path: Path
    raw_config: dict
    config: RunConfig
    checkpoints: dict[int, Path]


@dataclass(frozen=True)
class InferenceOptions:
    """Everything prediction needs, resolved from the command line and the run."""
    data_dir: str
    backbone: str
    grid: tuple[int, int]
    img_size: int
    img_size_trained: int
    hidden_ratio: float
    batch_size: int
    num_workers: int | None
    prefetch_factor: int
    device: str | None
    amp_dtype: str
    post: PostConfig = field(default_factory=PostConfig)
    tta: bool = False
    derive_dead: bool = False
    feature_cache: str | None = None  # folder of the frozen-feature cache, None: predict from pixels

    def __post_init__(self):
        if self.batch_size < 1:
            raise RunError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise RunError(f"--num-workers must be >= 0, got {self.num_workers}")

    def record(self) -> dict:
        """Plain dict for oof_metrics.json: what was applied (TTA, post-processing) and with which model settings."""
        d = asdict(self)
        post = d.pop("post")
        return {"tta": self.tta, "derive_dead": self.derive_dead, **post, **d}


@dataclass
class FoldModel:
    """One fold's model (eval mode, on its device) with the transform and context ratios of its checkpoint."""
    fold: int
    model: torch.nn.Module
    transform: TargetTransform
    context_ratios: dict | None


def add_cache_arguments(group) -> None:
    """--feature-cache / --no-feature-cache of eval and predict (used for runs whose backbone stayed frozen)."""
    group.add_argument("--feature-cache", default=None, metavar="DIR",
                       help="frozen-feature cache folder (default: the run's, else <data-dir>/.feature_cache)")
    group.add_argument("--no-feature-cache", action="store_true", help="predict from pixels even for a frozen run")


def find_checkpoints(run_dir: Path) -> dict[int, Path]:
    """{fold: path} of the `5head_best_fold{k}.pth` files in a run folder, by fold."""
    found = {int(m.group(1)): p for p in run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))}
    return dict(sorted(found.items()))


def open_run(model_dir: str | Path) -> Run:
    """Read a run folder's checkpoints list and config.json (the first checkpoint's configuration without it)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise RunError(f"--model-dir {path} is not a folder")
    checkpoints = find_checkpoints(path)
    if not checkpoints:
        raise RunError(f"--model-dir {path} holds no checkpoints (5head_best_fold{{k}}.pth): "
                       "point it at the output folder of a finished train_5head run")
    config_path = path / "config.json"
    if config_path.is_file():
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise RunError(f"{config_path} is not valid JSON: {exc}") from exc
    else:
        logger.info("%s has no config.json: using the configuration stored in the checkpoints", path)
        raw = load_checkpoint(next(iter(checkpoints.values())))["config"]
    return Run(path, raw, RunConfig.from_dict(raw), checkpoints)


def _run_value(run: Run, name: str) -> Any:
    section, key = RECORDED_AT[name]
    value = run.raw_config.get(section, {}).get(key)
    return TABLE_DEFAULTS[name] if value is None else value


def _arch_name(backbone: str) -> str:
    """The architecture part of a timm name: the pretrained tag (after '.') does not change the weights' shapes."""
    return backbone.split(".")[0]


def check_against(trained: dict, given: dict, where: str, hint: str = "") -> None:
    """RunError when a given --backbone, --grid or --hidden-ratio contradicts the trained value."""
    checks = (("backbone", lambda a, b: _arch_name(a) == _arch_name(b)),
              ("grid", lambda a, b: tuple(a) == tuple(b)),
              ("hidden_ratio", lambda a, b: math.isclose(float(a), float(b), rel_tol=1e-9)))
    for name, same in checks:
        if given.get(name) is not None and not same(given[name], trained[name]):
            option = "--" + name.replace("_", "-")
            show = (lambda v: " ".join(map(str, v))) if name == "grid" else str
            raise RunError(f"{option} {show(given[name])} contradicts {where} (trained with {option} "
                           f"{show(trained[name])}){hint.format(option=option)}")


def resolve_options(run: Run, given: dict) -> InferenceOptions:
    """Options from the command line (`given`, None = left out) over the run's values (see module docstring)."""
    value = {name: _run_value(run, name) for name in RECORDED_AT}
    check_against(value, given, f"the run in {run.path}", hint="; leave {option} out to use the run's value")
    if given.get("dropout") is not None and not math.isclose(given["dropout"], value["dropout"]):
        logger.info("--dropout %s ignored: dropout has no effect at inference (the run used %s)", given["dropout"],
                    value["dropout"])
    img_size = value["img_size"] if given.get("img_size") is None else given["img_size"]
    if img_size != value["img_size"]:
        logger.warning("--img-size %d differs from training (%d): position embeddings are resampled; expect "
                       "predictions to differ from the validated ones", img_size, value["img_size"])
    data_dir = given.get("data_dir") or value["base_path"]
    feature_cache = None
    # A backbone frozen for the whole run has the features training cached: reuse them (and cache new photos).
    if run.config.train.mode == "head_only" and run.config.cache.enabled and not given.get("no_feature_cache"):
        feature_cache = given.get("feature_cache") or run.config.cache.dir or str(Path(data_dir) / ".feature_cache")
    pick = {k: given[k] if given.get(k) is not None else value[k] for k in ("batch_size", "num_workers")}
    return InferenceOptions(
        data_dir=str(data_dir), backbone=value["backbone"], grid=tuple(int(g) for g in value["grid"]),
        img_size=int(img_size), img_size_trained=int(value["img_size"]), hidden_ratio=float(value["hidden_ratio"]),
        prefetch_factor=int(value["prefetch_factor"]), device=given.get("device"), amp_dtype=run.config.train.amp_dtype,
        post=run.config.post, tta=bool(given.get("tta")), derive_dead=bool(given.get("derive_dead")),
        feature_cache=feature_cache, **pick)


def runtime(opts: InferenceOptions) -> tuple[torch.device, Any, str]:
    """Device, autocast context and the name of that precision: the run's --amp-dtype as this machine resolves it
    (the same rule as training, so a CPU without native bfloat16 evaluates in float32)."""
    try:
        rt = resolve_runtime(opts.device, opts.amp_dtype, opts.num_workers)
    except ValueError as exc:  # its messages name training's --device-type
        raise RunError(str(exc).replace("--device-type", "--device")) from exc
    return rt.device, rt.autocast(), rt.precision.name


def fit_pos_embed(state: dict, model: torch.nn.Module) -> dict:
    """The state dict with the backbone's position embeddings resampled (timm's resample_abs_pos_embed) to the
    model's patch grid when the checkpoint was trained at another --img-size."""
    key, backbone = "backbone.pos_embed", getattr(model, "backbone", None)
    target = getattr(backbone, "pos_embed", None)
    if key not in state or target is None or state[key].shape == target.shape:
        return state
    n_prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 0))
    old_side = int(round(math.sqrt(state[key].shape[1] - n_prefix)))
    resampled = resample_abs_pos_embed(state[key], new_size=list(backbone.patch_embed.grid_size),
                                       old_size=[old_side, old_side], num_prefix_tokens=n_prefix)
    return {**state, key: resampled}


def load_fold_model(path: Path, opts: InferenceOptions, device: torch.device) -> FoldModel:
    """Rebuild a checkpoint's model (no pretrained weights, at opts.img_size) and load its weights."""
    ckpt = load_checkpoint(path)
    cfg = RunConfig.from_dict(ckpt["config"])
    check_against(asdict(cfg.model), asdict(opts), f"checkpoint {path}",
                  hint="; config.json or the command line disagree with this checkpoint")
    expected = CHECKPOINT_RE.match(path.name)
    if expected and int(expected.group(1)) != int(ckpt["fold"]):
        raise RunError(f"checkpoint {path} holds fold {ckpt['fold']}, not the fold its name says")
    if opts.post.apply_context_adjustment and not ckpt.get("context_ratios"):
        raise RunError(f"checkpoint {path} has no context ratios, but the run applies the context adjustment")
    cfg = replace(cfg, model=replace(cfg.model, img_size=opts.img_size, grad_ckpt=False))
    model = build_model(cfg, pretrained=False)
    try:
        model.load_state_dict(fit_pos_embed(ckpt["model"], model))
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise RunError(f"the weights in {path} do not fit the model its configuration describes: {detail}") from exc
    model.to(device).eval()
    return FoldModel(int(ckpt["fold"]), model, TargetTransform.from_dict(ckpt["target_transform"]),
                     ckpt.get("context_ratios"))


def fold_feature_cache(fm: FoldModel, opts: InferenceOptions, autocast) -> FeatureCache:
    """The frozen-feature cache that holds this fold model's features (keyed by its backbone weights)."""
    return FeatureCache(opts.feature_cache, backbone=opts.backbone, img_size=opts.img_size, grid=opts.grid,
                        weights_digest=state_dict_digest(fm.model.backbone), compute_dtype=autocast_key(autocast))


def predict_grams(fm: FoldModel, df: pd.DataFrame, opts: InferenceOptions, device, autocast,
                  desc: str = "predict") -> np.ndarray:
    """(N, 5) grams of one fold model for the rows of `df` (needs only `abs_path`), with TTA as chosen and the
    run's context adjustment (with this fold's ratios); Dead correction and derive-dead are left to `finish`."""
    if opts.feature_cache:
        cache = fold_feature_cache(fm, opts, autocast)
        out = predict_from_cache(fm.model, fm.transform, df.reset_index(drop=True), cache,
                                 variants=["id", "h", "v"] if opts.tta else ["id"], grid=opts.grid,
                                 img_size=opts.img_size, device=device, autocast=autocast,
                                 batch_size=opts.batch_size, desc=desc)
    else:
        mean, std = fm.model.mean_std
        dataset = BiomassDataset(df.reset_index(drop=True), opts.grid, opts.img_size, mean, std)
        loader = make_loader(dataset, batch_size=opts.batch_size, shuffle=False,
                             num_workers=loader_workers(opts.num_workers, device),
                             prefetch_factor=opts.prefetch_factor, seed=0, pin_memory=device.type == "cuda")
        out = predict(fm.model, loader, device, autocast, fm.transform, grid=opts.grid, tta=opts.tta, desc=desc)
    if not opts.post.apply_context_adjustment:
        return out["pred"]
    return apply_postprocess(out["pred"], correction_threshold=None, always_correct_dead=False,
                             context=(out["probs"], fm.context_ratios))


def finish(pred: np.ndarray, opts: InferenceOptions) -> np.ndarray:
    """The run's Dead correction, then --derive-dead (Dead = max(0, Total - GDM)) when chosen."""
    p = opts.post
    return apply_postprocess(pred, correction_threshold=p.correction_threshold,
                             always_correct_dead=p.always_correct_dead, derive_dead=opts.derive_dead)


def predict_oof(run: Run, df: pd.DataFrame, folds: np.ndarray, opts: InferenceOptions, device, autocast
                ) -> tuple[np.ndarray, list[int], list[int]]:
    """Out-of-fold grams: each row of `df` by the model of its fold (`folds`, aligned with df), post-processed.
    Returns (pred (N, 5), NaN in rows of folds without a checkpoint; folds evaluated; folds skipped)."""
    pred = np.full((len(df), 5), np.nan)
    evaluated, skipped = [], []
    for fold in sorted(set(folds.tolist())):
        rows = np.flatnonzero(folds == fold)
        if fold not in run.checkpoints:
            logger.warning("fold %d: no checkpoint in %s, its %d image(s) are skipped", fold, run.path, len(rows))
            skipped.append(fold)
            continue
        fm = load_fold_model(run.checkpoints[fold], opts, device)
        grams = predict_grams(fm, df.iloc[rows], opts, device, autocast, desc=f"fold {fold} OOF")
        pred[rows] = finish(grams, opts)
        evaluated.append(fold)
        del fm
    return pred, evaluated, skipped


def predict_ensemble(run: Run, df: pd.DataFrame, opts: InferenceOptions, device, autocast) -> np.ndarray:
    """(N, 5) grams: the average of every fold model's prediction (each decoded by its own transform and context
    ratios), then the run's Dead correction and --derive-dead."""
    total = np.zeros((len(df), 5))
    for fold, path in run.checkpoints.items():
        fm = load_fold_model(path, opts, device)
        total += predict_grams(fm, df, opts, device, autocast, desc=f"fold {fold}")
        del fm
    return finish(total / len(run.checkpoints), opts)
