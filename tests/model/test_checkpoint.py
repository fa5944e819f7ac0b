"""Checkpoint files: naming, discovery in a run folder, the payload round trip and the format-version check."""
from __future__ import annotations

import pytest
import torch

from biomass5head.model.checkpoint import (
    FORMAT_VERSION,
    checkpoint_name,
    find_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

PAYLOAD = dict(config={"model": {"backbone": "test_vit"}}, fold=2, epoch=7, best_score=0.5,
               target_transform={"log_target": True, "scale": [1.0] * 5}, context_ratios=None,
               metrics={"raw": {"weighted_r2": 0.4}})


def test_round_trip_keeps_every_field_and_the_weights(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}
    path = tmp_path / checkpoint_name(2)
    save_checkpoint(path, model_state=state, **PAYLOAD)
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION
    assert {k: ckpt[k] for k in PAYLOAD} == PAYLOAD
    assert torch.equal(ckpt["model"]["w"], state["w"]) and ckpt["model"]["b"].shape == (2,)
    assert [p.name for p in tmp_path.iterdir()] == ["5head_best_fold2.pth"]  # no temporary file left


def test_find_checkpoints_sorts_by_fold_and_ignores_other_files(tmp_path):
    for name in ("5head_best_fold10.pth", "5head_best_fold2.pth", "5head_best_fold0.pth", "5head_best_foldx.pth",
                 "5head_best_fold1.pth.tmp", "config.json"):
        (tmp_path / name).write_bytes(b"")
    found = find_checkpoints(tmp_path)
    assert list(found) == [0, 2, 10] and found[10].name == "5head_best_fold10.pth"


@pytest.mark.parametrize("version", [None, FORMAT_VERSION + 1])
def test_another_format_version_is_a_clear_error(tmp_path, version):
    path = tmp_path / checkpoint_name(0)
    payload = {"model": {}, **PAYLOAD}
    if version is not None:
        payload["format_version"] = version
    torch.save(payload, path)
    with pytest.raises(ValueError, match=f"format version {version}, this biomass5head reads version "
                                         f"{FORMAT_VERSION}") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, words", [
    (b"not a torch file", "cannot read checkpoint"),
    ({"weights": {}}, "lacks model, config, fold, target_transform"),
    ([1, 2, 3], "holds a list, not a 5-head checkpoint"),
])
def test_foreign_files_are_clear_errors(tmp_path, content, words):
    path = tmp_path / checkpoint_name(0)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=words):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pth")
