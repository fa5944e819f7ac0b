"""Export a finished run's whole prediction as one ONNX graph (tiles of both views in, grams out, folds averaged).

    python -m src.export --model-dir RUN --out model.onnx

The graph takes `left` and `right` (batch, T, 3, S, S) normalised tiles and gives `grams` (batch, 5); the batch axis
is dynamic. It is checked with ONNX Runtime against PyTorch when written (the max relative difference is printed).
The README shows how to run it on a photo with ONNX Runtime alone.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from biomass5head.cli.common import prog, run_command
from biomass5head.constants import TARGETS
from biomass5head.fileio import write_json

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("python -m src.export"), description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model-dir", required=True, help="a finished run folder (5head_best_fold*.pth, config.json)")
    p.add_argument("--out", required=True, help="the .onnx file to write (a sidecar .json describes its inputs)")
    return p


def export(args: argparse.Namespace) -> int:
    import torch

    from biomass5head.infer.fold_model import backbone_digests, load_fold_model
    from biomass5head.infer.onnx_export import EnsembleGraph, export_onnx
    from biomass5head.infer.run_folder import RunError, open_run, resolve_options

    out = Path(args.out)
    if out.suffix != ".onnx":
        raise RunError(f"--out {out}: the file name must end in .onnx")
    run = open_run(args.model_dir)
    opts = resolve_options(run, {"device": "cpu"})
    post, m = opts.cfg.post, opts.cfg.model
    if post.apply_context_adjustment:
        raise RunError(f"the run in {run.path} applies --apply-context-adjustment, which the ONNX graph does not "
                       "hold: use python -m src.predict for it")
    folds = [load_fold_model(p, opts, torch.device("cpu")) for p in run.checkpoints.values()]
    shared = len(set(backbone_digests(folds))) == 1
    graph = EnsembleGraph(folds, post.correction_threshold, post.always_correct_dead, shared_backbone=shared,
                          reconcile=post.reconcile)
    rel = export_onnx(graph, m.grid[0] * m.grid[1], m.img_size, out)
    tiles = folds[0].tiles(opts)
    meta = {"inputs": {"left": "float32 (batch, T, 3, S, S)", "right": "float32 (batch, T, 3, S, S)"},
            "output": "grams float32 (batch, 5)", "targets": list(TARGETS),
            "grid": list(tiles.grid), "img_size": tiles.img_size, "mean": list(tiles.mean), "std": list(tiles.std),
            "folds": [fm.fold for fm in folds], "backbone": m.backbone, "shared_backbone": shared,
            "run": str(run.path)}
    write_json(out.with_suffix(".json"), meta)
    logger.info("wrote %s (%.1f MB; folds %s, %s backbone, %d tiles of %d px per view) and %s", out,
                out.stat().st_size / 1e6, meta["folds"], "one shared" if shared else "a fold's own",
                tiles.grid[0] * tiles.grid[1], tiles.img_size, out.with_suffix(".json").name)
    print(f"max relative difference ONNX Runtime vs PyTorch: {rel:.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, export, logger)
