"""model/predict.py: batched prediction in grams, flip TTA averaging of both the grams and the aux probabilities,
and the flip of tiled views."""
from __future__ import annotations

import numpy as np
import torch

from biomass5head.device import Precision, Runtime
from biomass5head.model.predict import flip_tiles, predict
from biomass5head.model.targets import TargetTransform

CPU = Runtime(torch.device("cpu"), Precision("float32", None, "tests"), 0)


class FlipSensitive(torch.nn.Module):
    """reg and aux logits from the left view's first tile, left half vs right half: a flip changes both."""

    def forward(self, left, right):
        tile = left[:, 0]  # (B, 3, S, S)
        a, b = tile[..., : tile.shape[-1] // 2].mean((1, 2, 3)), tile[..., tile.shape[-1] // 2:].mean((1, 2, 3))
        return {"reg": torch.stack([a, b, a + b, a * 0 + 1, b * 0 + 2], 1).abs(),
                "state": torch.stack([a, b, a - b, b - a], 1)}


def test_tta_averages_grams_and_aux_probabilities_over_the_three_views():
    torch.manual_seed(0)
    batch = {"left": torch.rand(3, 4, 3, 8, 8), "right": torch.rand(3, 4, 3, 8, 8), "target": torch.zeros(3, 5),
             "index": torch.arange(3)}
    model, grid = FlipSensitive(), (2, 2)
    out = predict(model, [batch], CPU, TargetTransform(np.ones(5), log_target=False), grid=grid, tta=True)
    views = [batch["left"], flip_tiles(batch["left"], grid, True), flip_tiles(batch["left"], grid, False)]
    outs = [model(v, batch["right"]) for v in views]
    np.testing.assert_allclose(out["pred"], torch.stack([o["reg"] for o in outs]).mean(0).numpy(), rtol=1e-6)
    probs = torch.stack([o["state"].softmax(1) for o in outs]).mean(0).numpy()
    np.testing.assert_allclose(out["probs"]["state"], probs, rtol=1e-6)
    assert not np.allclose(out["probs"]["state"], outs[0]["state"].softmax(1).numpy())  # the flips mattered
    plain = predict(model, [batch], CPU, TargetTransform(np.ones(5), log_target=False), grid=grid)
    np.testing.assert_allclose(plain["pred"], outs[0]["reg"].numpy(), rtol=1e-6)


def test_flip_tiles_mirrors_whole_views():
    grid = (2, 3)
    view = torch.arange(2 * 4 * 3 * 4, dtype=torch.float32).reshape(1, 1, 8, 12).expand(1, 3, 8, 12)
    tiles = view.reshape(1, 3, 2, 4, 3, 4).permute(0, 2, 4, 1, 3, 5).reshape(1, 6, 3, 4, 4)  # row-major tiles

    def to_tiles(v):
        return v.reshape(1, 3, 2, 4, 3, 4).permute(0, 2, 4, 1, 3, 5).reshape(1, 6, 3, 4, 4)

    assert torch.equal(flip_tiles(tiles, grid, horizontal=True), to_tiles(view.flip(-1)))
    assert torch.equal(flip_tiles(tiles, grid, horizontal=False), to_tiles(view.flip(-2)))
