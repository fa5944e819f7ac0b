"""`python -m src.export`: one ONNX graph whose ONNX Runtime output, fed by the README's ONNX Runtime example,
equals `predict --images` on the same photo."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biomass5head.cli.export import main as export_main
from biomass5head.cli.predict import main as predict_main
from biomass5head.constants import TARGETS

ROOT = Path(__file__).resolve().parents[2]


def readme_onnx_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"\*\*ONNX\.\*\*.*?```python\n(.*?)```", text, re.S)
    assert block, "the README's ONNX Runtime example is missing"
    return block.group(1)


def test_readme_example_is_about_ten_lines():
    assert len(readme_onnx_example().strip().splitlines()) <= 12


@pytest.mark.slow
def test_export_matches_predict_through_the_readme_example(serve_run, tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.onnx"
    assert export_main(["--model-dir", str(serve_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r"max relative difference ONNX Runtime vs PyTorch: (\S+)", printed).group(1))
    assert diff < 1e-3
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["shared_backbone"] is True and meta["grid"] == [2, 2] and meta["img_size"] == 32

    photo = sorted((tiny_data / "test").iterdir())[0]
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photo, folder / "photo.jpg")
    assert predict_main(["--model-dir", str(serve_run), "--images", str(folder), "--out",
                         str(tmp_path / "pred.csv"), "--device", "cpu"]) == 0
    expected = pd.read_csv(tmp_path / "pred.csv").iloc[0][list(TARGETS)].to_numpy(float)

    shutil.copy(photo, tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    shown = []
    exec(readme_onnx_example(), {"print": shown.append})  # noqa: S102 - the README's own code, as a user runs it
    got = np.array([shown[0][t] for t in TARGETS], dtype=float)
    for g in (expected, got):  # the run reconciles (SERVE_TRAIN --reconcile), and so does the graph
        assert g[3] == pytest.approx(g[0] + g[2], rel=1e-4) and g[4] == pytest.approx(g[:3].sum(), rel=1e-4)
    rel = np.abs(got - expected) / np.maximum(np.abs(expected), 1e-3)
    print(f"README ONNX Runtime example vs predict --images: max relative difference {rel.max():.2e}")
    assert rel.max() < 1e-3


def test_export_refuses_a_name_without_onnx(serve_run, tmp_path, capsys):
    assert export_main(["--model-dir", str(serve_run), "--out", str(tmp_path / "model.bin")]) == 2
    assert "must end in .onnx" in capsys.readouterr().out
    assert not (tmp_path / "model.bin").exists()
