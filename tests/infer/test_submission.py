"""End-to-end tests of `python -m src.predict` on the tiny synthetic run: Kaggle submission and photo folders."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from biomass5head.cli.predict import main
from biomass5head.config import RunConfig
from biomass5head.constants import TARGETS
from biomass5head.data.datasets import BiomassDataset
from biomass5head.data.images import TileSpec
from biomass5head.model.five_head import build_model


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
    """The tiny run with symlinked checkpoints, so outputs land in a folder of this module's own."""
    dest = tmp_path_factory.mktemp("predict") / "run"
    dest.mkdir()
    for path in tiny_run.iterdir():
        if path.suffix == ".pth":
            (dest / path.name).symlink_to(path)
        elif path.name in ("config.json", "folds.csv"):
            shutil.copy(path, dest / path.name)
    return dest


@pytest.fixture(scope="module")
def submission(run_dir):
    """The default prediction of test.csv, written to RUN/submission.csv."""
    assert main(["--model-dir", str(run_dir)]) == 0
    return pd.read_csv(run_dir / "submission.csv")


def test_submission_has_test_csvs_ids_in_order_from_the_fold_average(submission, run_dir, tiny_data):
    sub = submission
    test = pd.read_csv(tiny_data / "test.csv")
    assert list(sub.columns) == ["sample_id", "target"]
    assert sub["sample_id"].tolist() == test["sample_id"].tolist()
    assert len(sub) == 5 * test["image_path"].nunique()
    assert np.isfinite(sub["target"]).all() and (sub["target"] >= 0).all()

    # the same numbers computed here without biomass5head.infer: each fold model's expm1(output * scale), the mean
    # over folds in grams, then the run's Dead correction (threshold 0.15) by hand
    test_rows = test.assign(prefix=test["sample_id"].str.split("__").str[0])
    photos = test_rows.drop_duplicates("prefix")
    per_fold = [_direct_grams(path, [str(tiny_data / p) for p in photos["image_path"]])
                for path in sorted(run_dir.glob("5head_best_fold*.pth"))]
    assert len(per_fold) == 5 and not np.allclose(per_fold[0], per_fold[1])
    grams = np.mean(per_fold, axis=0)
    total = grams[:, TARGETS.index("Dry_Total_g")]
    parts = grams[:, [TARGETS.index(t) for t in ("Dry_Green_g", "Dry_Dead_g", "Dry_Clover_g")]].sum(1)
    off = np.abs(total - parts) / total > 0.15
    dead = TARGETS.index("Dry_Dead_g")
    grams[off, dead] = np.maximum(0.0, total - grams[:, TARGETS.index("GDM_g")])[off]
    row_of = {p: i for i, p in enumerate(photos["prefix"])}
    want = [grams[row_of[p], TARGETS.index(t)] for p, t in zip(test_rows["prefix"], test_rows["target_name"],
                                                                  strict=True)]
    np.testing.assert_allclose(sub["target"], want, rtol=1e-5)  # a row matched to the wrong photo is far off


def _direct_grams(ckpt_path, paths, with_context: bool = False):
    """(N, 5) grams of one checkpoint for photos, decoded by hand (log target: expm1 of output times scale), in the
    run's batches of 4 and float32 (the tiny run's precision); `with_context` adds the aux heads' probabilities
    and the checkpoint's context ratios."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["target_transform"]["log_target"] and ckpt["config"]["runtime"]["amp_dtype_used"] == "float32"
    cfg = RunConfig.from_dict(ckpt["config"])
    model = build_model(cfg, pretrained=False)
    model.load_state_dict(ckpt["model"])
    model.eval()
    ds = BiomassDataset(pd.DataFrame({"abs_path": paths}), TileSpec(cfg.model.grid, cfg.model.img_size,
                                                                   *model.mean_std))
    with torch.no_grad():
        outs = [model(b["left"], b["right"]) for b in torch.utils.data.DataLoader(ds, batch_size=4)]
    reg = torch.cat([o["reg"] for o in outs])
    grams = np.expm1(reg.double().numpy() * np.asarray(ckpt["target_transform"]["scale"]))
    if not with_context:
        return grams
    probs = {h: torch.cat([o[h] for o in outs]).softmax(1).double().numpy() for h in ("state", "month", "species")}
    return grams, probs, ckpt["context_ratios"]


@pytest.mark.slow  # 3-6 s (processes or an extra run): in .ci/run's slow pass; README command 2 under 6 min
def test_images_folder_gives_one_row_per_photo(submission, run_dir, tiny_data, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    jpgs = sorted((tiny_data / "test").glob("*.jpg"))[:2]
    for path in jpgs:
        shutil.copy(path, photos / path.name)
    Image.open(jpgs[0]).save(photos / "zz_field.PNG")
    (photos / "notes.txt").write_text("not a photo")
    assert main(["--model-dir", str(run_dir), "--images", str(photos), "--tta"]) == 0
    table = pd.read_csv(run_dir / "photo_predictions.csv")
    assert list(table.columns) == ["image", *TARGETS]
    assert table["image"].tolist() == [jpgs[0].name, jpgs[1].name, "zz_field.PNG"]
    assert (table[list(TARGETS)].to_numpy() >= 0).all()
    # --tta changes the numbers; without it, a photo gets what the submission gave its image
    assert main(["--model-dir", str(run_dir), "--images", str(photos), "--out", str(tmp_path / "plain.csv")]) == 0
    plain = pd.read_csv(tmp_path / "plain.csv").set_index("image")
    assert not np.allclose(plain[list(TARGETS)].to_numpy(), table[list(TARGETS)].to_numpy())
    sub = submission.set_index("sample_id")["target"]
    for path in jpgs:
        want = [sub[f"{path.stem}__{t}"] for t in TARGETS]
        np.testing.assert_allclose(plain.loc[path.name, list(TARGETS)].to_numpy(float), want, rtol=2e-2)


def _data_dir(tmp_path, text):
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.csv").write_text(text)
    return ["--data-dir", str(data)]


def _photos(tmp_path, broken):
    photos = tmp_path / "photos"
    photos.mkdir()
    if broken:
        Image.new("RGB", (64, 32), (90, 120, 60)).save(photos / "a_good.jpg")
        (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return ["--images", str(photos), "--num-workers", "1"]  # a worker: its errors must still read clearly


@pytest.mark.parametrize("setup, words", [
    (lambda tmp: _data_dir(tmp, "sample_id,image_path,target_name\n"), ["test.csv", "no data rows"]),
    (lambda tmp: _data_dir(tmp, "id,path\nA,b.jpg\n"), ["test.csv", "missing column"]),
    (lambda tmp: _photos(tmp, broken=True), ["cannot read image", "broken.jpg"]),
    (lambda tmp: _photos(tmp, broken=False), ["holds no photos"]),
])
def test_bad_inputs_are_clear_errors_without_output(setup, words, run_dir, tmp_path, caplog, capsys):
    out = tmp_path / "out.csv"
    assert main(["--model-dir", str(run_dir), "--out", str(out), *setup(tmp_path)]) == 2
    for word in words:
        assert word in caplog.text
    assert "Traceback" not in capsys.readouterr().out + caplog.text
    assert not out.exists() and not list(tmp_path.glob(".out.csv*"))


def test_run_without_checkpoints_is_a_clear_error(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    assert main(["--model-dir", str(tmp_path / "run")]) == 2
    assert "holds no checkpoints" in caplog.text
    assert not (tmp_path / "run" / "submission.csv").exists()


@pytest.mark.slow  # 3-6 s (processes or an extra run): in .ci/run's slow pass; README command 2 under 6 min
def test_context_adjustment_uses_each_folds_ratios_before_the_fold_average(run_dir, tiny_data, tmp_path):
    """A run with --apply-context-adjustment: each fold's grams are adjusted with that fold's ratios and its aux
    probabilities, then averaged (adjusting the average with one fold's ratios gives other numbers)."""
    import json

    from biomass5head.model.postprocess import apply_context_adjustment, correct_dead

    ctx_run = tmp_path / "ctx"
    ctx_run.mkdir()
    for path in run_dir.iterdir():
        if path.suffix == ".pth":
            (ctx_run / path.name).symlink_to(path.resolve())
    config = json.loads((run_dir / "config.json").read_text())
    config["post"]["apply_context_adjustment"] = True
    (ctx_run / "config.json").write_text(json.dumps(config))
    images = tmp_path / "photos"
    images.mkdir()
    test = pd.read_csv(tiny_data / "test.csv").drop_duplicates("image_path")
    for rel in test["image_path"]:
        shutil.copy(tiny_data / rel, images / Path(rel).name)
    assert main(["--model-dir", str(ctx_run), "--images", str(images)]) == 0
    written = pd.read_csv(ctx_run / "photo_predictions.csv")
    paths = [str(images / name) for name in written["image"]]
    folds = [_direct_grams(p, paths, with_context=True) for p in sorted(ctx_run.glob("5head_best_fold*.pth"))]
    per_fold = np.mean([apply_context_adjustment(g, probs, ratios) for g, probs, ratios in folds], axis=0)
    expected = correct_dead(per_fold, threshold=0.15)
    np.testing.assert_allclose(written[list(TARGETS)].to_numpy(), expected, rtol=1e-5)
    g0, probs0, ratios0 = folds[0]
    other_order = correct_dead(apply_context_adjustment(np.mean([f[0] for f in folds], axis=0), probs0, ratios0),
                               threshold=0.15)
    assert not np.allclose(expected, other_order, rtol=1e-3)
