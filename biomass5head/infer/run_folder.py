"""Opening a finished run's folder: its configuration and checkpoints, and the eval / predict options resolved
against its own `RunConfig` (`infer.fold_model` rebuilds and runs its fold models).

- A run folder (`python -m src.train_5head`) holds `config.json`, `folds.csv` and `5head_best_fold{k}.pth`.
- The options eval and predict share are overrides of the run's configuration, applied with
  `dataclasses.replace`: left out, they take the run's value. A `--backbone`, `--grid` or `--hidden-ratio` that
  contradicts the run is a RunError naming both values; `--img-size` may differ (warning; position embeddings are
  resampled); `--dropout` does nothing at inference.
- Post-processing is the run's (context adjustment, Dead correction), with `--derive-dead` on top.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from biomass5head.config import DataConfig, RunConfig
from biomass5head.data.photo_check import check_photos
from biomass5head.device import Runtime, resolve_runtime
from biomass5head.model.checkpoint import find_checkpoints, load_checkpoint

logger = logging.getLogger(__name__)


# The eval table's defaults (5head_arguments.md), used only for what a run's config.json did not record; they differ
# from training's in --batch-size alone.
EVAL_TABLE = RunConfig(data=DataConfig(batch_size=4))


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
    """What eval and predict run with: `cfg` is the run's own RunConfig with the command line's overrides
    (`--data-dir` as `data.base_path`, `--img-size`, `--batch-size`, `--num-workers`); the rest only inference has."""
    cfg: RunConfig
    img_size_trained: int
    device: str | None = None
    tta: bool = False
    derive_dead: bool = False
    feature_cache: str | None = None  # folder of the frozen-feature cache, None: predict from pixels

    @property
    def data_dir(self) -> str:
        return self.cfg.data.base_path

    def record(self) -> dict:
        """Plain dict for oof_metrics.json: what was applied (TTA, post-processing) and with which model settings."""
        m, d = self.cfg.model, self.cfg.data
        return {"tta": self.tta, "derive_dead": self.derive_dead, **asdict(self.cfg.post), "data_dir": d.base_path,
                "backbone": m.backbone, "grid": list(m.grid), "img_size": m.img_size,
                "img_size_trained": self.img_size_trained, "hidden_ratio": m.hidden_ratio,
                "batch_size": d.batch_size, "num_workers": d.num_workers, "prefetch_factor": d.prefetch_factor,
                "device": self.device, "amp_dtype": self.cfg.train.amp_dtype, "feature_cache": self.feature_cache}


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
    return Run(path, raw, RunConfig.from_dict(raw, base=EVAL_TABLE), checkpoints)


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


def resolve_options(run: Run, given: dict[str, Any]) -> InferenceOptions:
    """The command line (`given`, None = left out) as overrides of the run's configuration (see module docstring)."""
    cfg = run.config
    check_against(asdict(cfg.model), given, f"the run in {run.path}",
                  hint="; leave {option} out to use the run's value")
    if given.get("dropout") is not None and not math.isclose(given["dropout"], cfg.model.dropout):
        logger.info("--dropout %s ignored: dropout has no effect at inference (the run used %s)", given["dropout"],
                    cfg.model.dropout)
    img_size = cfg.model.img_size if given.get("img_size") is None else int(given["img_size"])
    if img_size != cfg.model.img_size:
        logger.warning("--img-size %d differs from training (%d): position embeddings are resampled; expect "
                       "predictions to differ from the validated ones", img_size, cfg.model.img_size)
    data_dir = str(given.get("data_dir") or cfg.data.base_path)
    picked = {k: given[k] if given.get(k) is not None else getattr(cfg.data, k) for k in ("batch_size", "num_workers")}
    picked.update(check_photos=given.get("check_photos") or "header",
                  allow_any_aspect=bool(given.get("allow_any_aspect")) or cfg.data.allow_any_aspect)
    feature_cache = None
    # A backbone frozen for the whole run has the features training cached: reuse them (and cache new photos).
    if cfg.train.mode == "head_only" and cfg.cache.enabled and not given.get("no_feature_cache"):
        feature_cache = given.get("feature_cache") or cfg.cache.resolved_dir(data_dir)
    try:
        resolved = replace(cfg, model=replace(cfg.model, img_size=img_size, grad_ckpt=False),
                           data=replace(cfg.data, base_path=data_dir, **picked))
    except ValueError as exc:  # the config's own checks name the option (--batch-size, --img-size, ...)
        raise RunError(str(exc)) from exc
    return InferenceOptions(resolved, img_size_trained=cfg.model.img_size, device=given.get("device"),
                            tta=bool(given.get("tta")), derive_dead=bool(given.get("derive_dead")),
                            feature_cache=feature_cache)


def runtime(opts: InferenceOptions) -> Runtime:
    """Device, precision and workers: the run's --amp-dtype as this machine resolves it (the same rule as training,
    so a CPU without native bfloat16 evaluates in float32)."""
    try:
        return resolve_runtime(opts.device, opts.cfg.train.amp_dtype, opts.cfg.data.num_workers)
    except ValueError as exc:  # its messages name training's --device-type
        raise RunError(str(exc).replace("--device-type", "--device")) from exc


def check_run_photos(opts: InferenceOptions, paths, what: str, any_aspect: bool = False) -> None:
    """The photos a command is about to predict, checked as training checks its own (`data.photo_check`);
    `any_aspect` accepts photos that are not 2:1 with a warning (`predict --images`)."""
    m, d = opts.cfg.model, opts.cfg.data
    check_photos(paths, m.grid, m.img_size, level=d.check_photos, allow_any_aspect=any_aspect or d.allow_any_aspect,
                 what=what)
