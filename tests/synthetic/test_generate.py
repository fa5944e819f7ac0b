"""Synthetic data set: competition layout, target identities, determinism, photos that show the targets, CLI."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from biomass5head.cli.synthetic import main
from biomass5head.constants import STATES, TARGETS
from biomass5head.synthetic import params as P
from biomass5head.synthetic.generate import FILE_TARGET_ORDER, generate, sample_records
from biomass5head.synthetic.render import render_photo
from biomass5head.synthetic.write import plot_examples

SIZE = (224, 112)
N_TRAIN, N_TEST = 24, 4
TRAIN_COLUMNS = ["sample_id", "image_path", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm",
                 "target_name", "target"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "data"
    generate(out, n_train=N_TRAIN, n_test=N_TEST, size=SIZE, seed=0, workers=1)  # a pool costs more than 28 photos
    return out


def _wide(base: Path) -> pd.DataFrame:
    long = pd.read_csv(base / "train.csv")
    return long.pivot(index="image_path", columns="target_name", values="target")


def test_files_and_columns(data_dir):
    train, test = pd.read_csv(data_dir / "train.csv"), pd.read_csv(data_dir / "test.csv")
    assert list(train.columns) == TRAIN_COLUMNS
    assert list(test.columns) == ["sample_id", "image_path", "target_name"]
    assert len(train) == 5 * N_TRAIN and len(test) == 5 * N_TEST
    for df, split in ((train, "train"), (test, "test")):
        ids = df.sample_id.str.split("__").str[0]
        assert (df.groupby(ids).target_name.apply(tuple) == FILE_TARGET_ORDER).all()
        assert (df.sample_id == ids + "__" + df.target_name).all()
        assert (df.image_path == split + "/" + ids + ".jpg").all()
        assert ids.str.fullmatch(r"ID\d{10}").all()
        assert sorted(p.name for p in (data_dir / split).iterdir()) == sorted(set(ids + ".jpg"))
    assert not set(train.image_path.str[6:]) & set(test.image_path.str[5:])
    assert train.Sampling_Date.str.fullmatch(r"2015/[1-9]\d?/[1-9]\d?").all()
    assert (train.groupby("image_path")[TRAIN_COLUMNS[2:7]].nunique() == 1).all().all()  # metadata per image


def test_targets_identities_and_coverage(data_dir):
    wide = _wide(data_dir)
    assert (wide >= 0).all().all()
    assert np.allclose(wide.GDM_g, wide.Dry_Green_g + wide.Dry_Clover_g, atol=2e-4)
    assert np.allclose(wide.Dry_Total_g, wide.Dry_Green_g + wide.Dry_Dead_g + wide.Dry_Clover_g, atol=2e-4)
    assert (wide.GDM_g > 0).all()
    train = pd.read_csv(data_dir / "train.csv")
    assert set(train.State) == set(STATES)
    assert train.Sampling_Date.nunique() >= 5 and train.Sampling_Date.str.split("/").str[1].nunique() >= 5


def test_photos_are_jpegs_of_the_size(data_dir):
    for path in [*(data_dir / "train").iterdir(), *(data_dir / "test").iterdir()]:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == SIZE and im.mode == "RGB"


def test_trainfold_covers_every_image(data_dir):
    folds = pd.read_csv(data_dir / "trainfold.csv")
    assert list(folds.columns) == ["sample_id_prefix", "fold"]
    ids = pd.read_csv(data_dir / "train.csv").sample_id.str.split("__").str[0].unique()
    assert sorted(folds.sample_id_prefix) == sorted(ids)
    assert set(folds.fold) == {0, 1, 2, 3, 4}
    dates = pd.read_csv(data_dir / "train.csv").drop_duplicates("image_path").set_index("image_path").Sampling_Date
    folds["date"] = dates.loc["train/" + folds.sample_id_prefix + ".jpg"].to_numpy()
    assert (folds.groupby("date").fold.nunique() == 1).all()  # grouped by sampling date


def _files(base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.mark.slow  # a few seconds; moved out of README command 2's budget
def test_deterministic_for_a_seed(tmp_path):
    kw = {"n_train": 6, "n_test": 1, "size": (64, 32)}
    generate(tmp_path / "a", seed=5, workers=1, **kw)
    generate(tmp_path / "b", seed=5, workers=2, **kw)
    generate(tmp_path / "c", seed=6, workers=1, **kw)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert (tmp_path / "a/train.csv").read_bytes() != (tmp_path / "c/train.csv").read_bytes()


def test_greenness_follows_green_biomass():
    records = sample_records(30, seed=3).to_dict("records")
    greenness, green = [], []
    for i, rec in enumerate(records):
        rgb = render_photo(rec, SIZE, np.random.default_rng(i)).astype(np.float32)
        greenness.append(float((rgb[..., 1] - (rgb[..., 0] + rgb[..., 2]) / 2).mean()))
        green.append(rec["Dry_Green_g"])
    rho = pd.Series(greenness).corr(pd.Series(green), method="spearman")
    assert rho > 0.5, rho


def test_stereo_views_differ_a_little():
    rec = sample_records(1, seed=0).iloc[0].to_dict()
    photo = render_photo(rec, (400, 200), np.random.default_rng(0)).astype(np.float32)
    left, right = photo[:, :200], photo[:, 200:]
    assert np.abs(left - right).mean() > 1.0  # not a copy
    assert np.abs(left.mean((0, 1)) - right.mean((0, 1))).max() < 25  # but the same quadrat


def test_sampled_targets_match_the_real_summary():
    df = sample_records(2000, seed=0)
    for t in TARGETS:
        real = P.REAL_SUMMARY["mean"][t]
        assert abs(df[t].mean() - real) < 0.25 * real + 1.0, t
        assert abs((df[t] == 0).mean() - P.REAL_SUMMARY["zero_frac"][t]) < 0.05, t
    assert df.Dry_Green_g.corr(df.Dry_Total_g) > 0.7
    assert df.Height_Ave_cm.between(1, 70).all() and df.Pre_GSHH_NDVI.between(0.16, 0.91).all()


CLI_ARGS = ["--n-train", "6", "--n-test", "1", "--size", "64x32", "--quiet"]


@pytest.mark.slow  # a few seconds; moved out of README command 2's budget
def test_cli_writes_and_refuses_an_existing_run(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["--out", str(out), *CLI_ARGS]) == 0
    assert {p.name for p in out.iterdir()} == {"train.csv", "test.csv", "trainfold.csv", "train", "test"}
    assert "wrote 6 training and 1 test photos" in capsys.readouterr().out
    before = (out / "train.csv").read_bytes()
    assert main(["--out", str(out), *CLI_ARGS, "--seed", "1"]) == 2
    assert "already holds a data set" in capsys.readouterr().out
    assert (out / "train.csv").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    assert main(["--out", str(out), *CLI_ARGS, "--seed", "1", "--overwrite"]) == 0
    assert (out / "train.csv").read_bytes() != before and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary folder left


@pytest.mark.parametrize("bad", [["--size", "abc"], ["--size", "0x10"], ["--size", "225x112"], ["--n-train", "3"]])
def test_cli_rejects_bad_options(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), *bad])
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    def broken(out, **kwargs):
        (Path(out) / "train.csv").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr("biomass5head.synthetic.write.generate", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["--out", str(tmp_path / "set"), *CLI_ARGS])
    assert list(tmp_path.iterdir()) == []


def test_preview_figure(data_dir, tmp_path):
    png = plot_examples(data_dir, tmp_path / "fig.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_reads_back_with_the_data_layer(data_dir, caplog):
    from biomass5head.data.tables import load_test, load_train

    with caplog.at_level(logging.WARNING):
        train = load_train(data_dir)
        images, rows = load_test(data_dir)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert len(train) == N_TRAIN and len(images) == N_TEST and len(rows) == 5 * N_TEST
    wide = _wide(data_dir)
    got = train.set_index("image_path").loc[wide.index, list(TARGETS)]
    assert np.allclose(got.to_numpy(), wide[list(TARGETS)].to_numpy())
    assert train.sample_id_prefix.is_unique and re.fullmatch(r"ID\d{10}", train.sample_id_prefix.iloc[0])
