"""A finished run's whole prediction as one ONNX graph: both views' tiles in, grams of the five targets out.

Inputs `left` and `right`, float32 (batch, T, 3, S, S): each view's tiles, row-major, normalised with the
backbone's mean and std (`data.images.TileSpec`, what `predict` feeds the model). Output `grams` (batch, 5) in
TARGETS order: every fold model decoded by its own target transform, averaged, then the run's --reconcile and Dead
correction, exactly as `predict --images` computes (`infer/fold_model.py`). The batch axis is dynamic. The graph is
checked with ONNX Runtime against PyTorch on random tiles when it is written.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from biomass5head.constants import CLOVER, DEAD, GDM, GREEN, TARGETS, TOTAL
from biomass5head.infer.fold_model import FoldModel
from biomass5head.infer.run_folder import RunError
from biomass5head.model.postprocess import COMPONENTS_TO_TARGETS, TARGETS_TO_COMPONENTS

logger = logging.getLogger(__name__)

OPSET = 18
MAX_REL_DIFF = 1e-3


class EnsembleGraph(nn.Module):
    """The fold models' average in grams, with the run's post-processing (reconciliation, Dead correction), as one
    module that exports."""

    def __init__(self, folds: list[FoldModel], correction_threshold: float | None, always_correct_dead: bool,
                 shared_backbone: bool = False, reconcile: bool = False):
        super().__init__()
        self.models = nn.ModuleList([fm.model for fm in folds])
        self.transforms = [fm.transform for fm in folds]
        self.threshold, self.always = correction_threshold, always_correct_dead
        self.shared = shared_backbone  # every fold's frozen backbone is the same: encode once, keep one copy
        self.reconcile = reconcile
        self.register_buffer("to_components", torch.tensor(TARGETS_TO_COMPONENTS, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("to_targets", torch.tensor(COMPONENTS_TO_TARGETS, dtype=torch.float32),
                             persistent=False)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        if self.shared:
            b, t = left.shape[:2]
            feats = self.models[0].encode(torch.cat([left, right]).flatten(0, 1)).view(2, b, t, -1)
            outs = [m.forward_features(feats[0], feats[1]) for m in self.models]
        else:
            outs = [m(left, right) for m in self.models]
        grams = torch.stack([tr.decode(o["reg"].float()) for o, tr in zip(outs, self.transforms, strict=True)])
        grams = grams.mean(0)
        if self.reconcile:  # `model.postprocess.reconcile_targets` in torch operations
            grams = (grams @ self.to_components.T).clamp(min=0.0) @ self.to_targets.T
        return self.correct_dead(grams)

    def correct_dead(self, g: torch.Tensor) -> torch.Tensor:
        """`model.postprocess.correct_dead` in torch operations (NaN-free inputs: the decode clamps)."""
        if not self.always and self.threshold is None:
            return g
        total = g[:, TOTAL]
        implied = (total - g[:, GDM]).clamp(min=0.0)
        if self.always:
            mask = torch.ones_like(total, dtype=torch.bool)
        else:
            diff = (total - (g[:, GREEN] + g[:, DEAD] + g[:, CLOVER])).abs()
            positive = total > 0  # (no Where over booleans: ONNX Runtime has no kernel for it)
            mask = (positive & (diff > self.threshold * total)) | (~positive & (diff > 0))
        dead = torch.where(mask, implied, g[:, DEAD])
        return torch.cat([g[:, :DEAD], dead[:, None], g[:, DEAD + 1:]], dim=1)


def export_onnx(graph: EnsembleGraph, tiles: int, size: int, out: Path, batch: int = 2, seed: int = 0) -> float:
    """Write `graph` to `out` (atomically) and check it with ONNX Runtime on random tiles of `batch` photos; returns
    the max relative difference of the grams, which must stay under MAX_REL_DIFF."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise RunError(f"exporting needs onnx and onnxruntime ({exc.name} is missing): pip install -e '.[export]'"
                       ) from None
    graph.eval()
    gen = torch.Generator().manual_seed(seed)
    left, right = (torch.randn(batch, tiles, 3, size, size, generator=gen) for _ in range(2))
    with torch.inference_mode():
        expected = graph(left, right).numpy()
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    # Written in a new folder beside `out`, checked there, then moved into place: a failed export leaves no file.
    # Weights over ~1.5 GB go to `out.name + ".data"` beside the graph (protobuf holds at most 2 GB).
    large = sum(p.numel() * p.element_size() for p in graph.parameters()) > 1.5e9
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp = work / out.name
        torch.onnx.export(graph, (left, right), str(tmp), input_names=["left", "right"], output_names=["grams"],
                          opset_version=OPSET, dynamo=True, external_data=large,
                          dynamic_shapes={"left": {0: batch_dim}, "right": {0: batch_dim}})
        onnx.checker.check_model(str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(["grams"], {"left": left.numpy(), "right": right.numpy()})[0]
        one = session.run(["grams"], {"left": left[:1].numpy(), "right": right[:1].numpy()})[0]  # another batch size
        del session
        rel = float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-3)))
        if one.shape != (1, len(TARGETS)) or not np.allclose(one[0], got[0], rtol=MAX_REL_DIFF, atol=1e-4):
            raise RunError(f"the ONNX graph does not keep a dynamic batch axis (batch 1 gave shape {one.shape})")
        if not rel < MAX_REL_DIFF:
            raise RunError(f"ONNX Runtime and PyTorch disagree: max relative difference {rel:.2e} >= {MAX_REL_DIFF}")
        for f in work.iterdir():  # the graph last, so a reader never finds it without its weights
            if f.name != out.name:
                os.replace(f, out.parent / f.name)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rel
