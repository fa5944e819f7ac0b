"""End-to-end tests of `python -m src.eval_5head_oof` on the tiny synthetic run (log targets, aux heads)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from biomass5head.cli.eval import main
from biomass5head.config import RunConfig
from biomass5head.constants import CLOVER, COMPETITION_WEIGHTS, DEAD, GDM, GREEN, TARGETS, TOTAL
from biomass5head.data.datasets import BiomassDataset
from biomass5head.data.images import IMAGENET_MEAN, IMAGENET_STD, TileSpec
from biomass5head.data.tables import load_train
from biomass5head.infer import fold_model
from biomass5head.model import backbone
from biomass5head.model.checkpoint import load_checkpoint
from biomass5head.model.five_head import build_model
from biomass5head.model.targets import TargetTransform

META = ["sample_id_prefix", "fold", "image_path", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI",
        "Height_Ave_cm"]
TRUE = [f"true_{t}" for t in TARGETS]
PRED = [f"pred_{t}" for t in TARGETS]


def link_run(run, dest, folds=None, config_edit=None):
    """A copy of a run folder with symlinked checkpoints (cheap); `folds` keeps only those checkpoints."""
    dest.mkdir(parents=True)
    shutil.copy(run / "folds.csv", dest / "folds.csv")
    config = json.loads((run / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dest / "config.json").write_text(json.dumps(config))
    for path in run.glob("5head_best_fold*.pth"):
        if folds is None or int(path.stem.removeprefix("5head_best_fold")) in folds:
            (dest / path.name).symlink_to(path)
    return dest


def read_outputs(run_dir):
    return pd.read_csv(run_dir / "oof_predictions.csv"), json.loads((run_dir / "oof_metrics.json").read_text())


@pytest.fixture(scope="module")
def oof_dir(tiny_run, tmp_path_factory):
    """The tiny run evaluated with default options."""
    run_dir = link_run(tiny_run, tmp_path_factory.mktemp("oof") / "run")
    assert main(["--model-dir", str(run_dir)]) == 0
    return run_dir


def _scores(true, pred):
    w = np.broadcast_to(np.asarray(COMPETITION_WEIGHTS), true.shape)
    return r2_score(true.ravel(), pred.ravel(), sample_weight=w.ravel())


def test_metrics_agree_with_the_predictions_csv(oof_dir, tiny_data):
    table, metrics = read_outputs(oof_dir)
    assert list(table.columns) == META + TRUE + PRED
    train = load_train(tiny_data)
    assert len(table) == metrics["n_images"] == len(train) == 30
    folds = pd.read_csv(oof_dir / "folds.csv").set_index("sample_id_prefix")["fold"]
    assert (table["fold"].to_numpy() == folds.loc[table["sample_id_prefix"]].to_numpy()).all()
    np.testing.assert_allclose(table[TRUE].to_numpy(), train.set_index("sample_id_prefix").loc[
        table["sample_id_prefix"], list(TARGETS)].to_numpy())
    true, pred = table[TRUE].to_numpy(), table[PRED].to_numpy()
    assert metrics["weighted_r2"] == pytest.approx(_scores(true, pred), rel=1e-9)
    r2s = []
    for k, t in enumerate(TARGETS):
        row = metrics["per_target"][t]
        r2s.append(r2_score(true[:, k], pred[:, k]))
        assert row["r2"] == pytest.approx(r2s[-1], rel=1e-9)
        assert row["rmse"] == pytest.approx(np.sqrt(mean_squared_error(true[:, k], pred[:, k])), rel=1e-9)
        assert row["mae"] == pytest.approx(mean_absolute_error(true[:, k], pred[:, k]), rel=1e-9)
    mean_r2 = np.dot(COMPETITION_WEIGHTS, r2s) / sum(COMPETITION_WEIGHTS)
    assert metrics["weighted_r2_mean_per_target"] == pytest.approx(mean_r2, rel=1e-9)
    assert sorted(metrics["per_fold"]) == ["0", "1", "2", "3", "4"]
    for fold, m in metrics["per_fold"].items():
        rows = table["fold"] == int(fold)
        assert m["n_images"] == rows.sum()
        assert m["weighted_r2"] == pytest.approx(_scores(true[rows], pred[rows]), rel=1e-9)
    assert metrics["folds_evaluated"] == [0, 1, 2, 3, 4] and metrics["folds_skipped"] == []
    o = metrics["options"]
    assert (o["tta"], o["derive_dead"], o["correction_threshold"], o["apply_context_adjustment"]) == (
        False, False, 0.15, False)
    assert (oof_dir / "oof_pred_vs_true.png").stat().st_size > 0


def test_per_fold_scores_equal_the_checkpoints_validation(oof_dir):
    """Each fold's images by that fold's model, post-processed as in training: the scores training saved."""
    metrics = read_outputs(oof_dir)[1]
    for fold, m in metrics["per_fold"].items():
        best = load_checkpoint(oof_dir / f"5head_best_fold{fold}.pth")["best_score"]
        assert m["weighted_r2"] == pytest.approx(best, abs=1e-5)


def _direct_grams(ckpt_path, df):
    """expm1 of the checkpoint model's output for the rows of df, computed here without biomass5head.infer (same
    batches of 4 and the precision the run's validation used, as config.json records it); the run's Dead correction
    applied by hand."""
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["target_transform"]["log_target"]
    model = build_model(RunConfig.from_dict(ckpt["config"]), pretrained=False)
    model.load_state_dict(ckpt["model"])
    model.eval()
    ds = BiomassDataset(df.reset_index(drop=True), TileSpec((2, 2), 28, *model.mean_std))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    used = ckpt["config"]["runtime"]["amp_dtype_used"]
    with torch.no_grad(), torch.autocast("cpu", dtype=getattr(torch, used), enabled=used != "float32"):
        reg = torch.cat([model(b["left"], b["right"])["reg"].float() for b in loader]).numpy().astype(np.float64)
    grams = np.expm1(reg * np.asarray(ckpt["target_transform"]["scale"]))
    total = grams[:, TOTAL]
    off = np.abs(total - grams[:, [GREEN, DEAD, CLOVER]].sum(1)) / total > 0.15
    grams[off, DEAD] = np.maximum(0.0, total - grams[:, GDM])[off]
    return grams


def test_each_image_is_predicted_in_grams_by_its_own_folds_model(oof_dir, tiny_data):
    table = read_outputs(oof_dir)[0].set_index("sample_id_prefix")
    train = load_train(tiny_data).set_index("sample_id_prefix")
    for fold, other in ((0, 1), (3, 4)):
        df = train.loc[table.index[table["fold"] == fold]].reset_index()
        own = _direct_grams(oof_dir / f"5head_best_fold{fold}.pth", df)
        written = table.loc[df["sample_id_prefix"], PRED].to_numpy()
        np.testing.assert_allclose(written, own, rtol=1e-6)
        assert written[:, TOTAL].min() > np.log1p(written[:, TOTAL]).max()  # grams, not log1p(grams)
        foreign = _direct_grams(oof_dir / f"5head_best_fold{other}.pth", df)
        assert np.abs(foreign / written - 1).max() > 0.01


def test_tta_and_derive_dead(oof_dir, tiny_run, tmp_path, capsys):
    run_dir = link_run(tiny_run, tmp_path / "run", folds=(0, 4))
    assert main(["--model-dir", str(run_dir), "--tta", "--derive-dead"]) == 0
    printed = capsys.readouterr().out
    assert "weighted R2 (global, primary)" in printed and "fold 4: weighted R2" in printed and "TTA on" in printed
    table, metrics = read_outputs(run_dir)
    base = read_outputs(oof_dir)[0].set_index("sample_id_prefix").loc[table["sample_id_prefix"]]
    assert metrics["options"]["tta"] and metrics["options"]["derive_dead"]
    pred = table[PRED].to_numpy()
    np.testing.assert_array_equal(pred[:, DEAD], np.maximum(0.0, pred[:, TOTAL] - pred[:, GDM]))
    assert not np.allclose(pred[:, TOTAL], base["pred_Dry_Total_g"].to_numpy(), rtol=1e-4)


def test_the_runs_context_adjustment_is_applied(oof_dir, tiny_run, tmp_path):
    """A run trained with --apply-context-adjustment: Dead and Clover rescaled by the aux heads' context."""
    run_dir = link_run(tiny_run, tmp_path / "run", folds=(1, 3),
                       config_edit=lambda c: c["post"].update(apply_context_adjustment=True))
    assert main(["--model-dir", str(run_dir)]) == 0
    table, metrics = read_outputs(run_dir)
    base = read_outputs(oof_dir)[0].set_index("sample_id_prefix").loc[table["sample_id_prefix"]]
    assert metrics["options"]["apply_context_adjustment"]
    for t in ("GDM_g", "Dry_Total_g"):
        np.testing.assert_array_equal(table[f"pred_{t}"], base[f"pred_{t}"].to_numpy())
    assert not np.allclose(table["pred_Dry_Clover_g"], base["pred_Dry_Clover_g"].to_numpy())


class MeanPixelModel(torch.nn.Module):
    """Toy model whose output depends only on the mean pixel of each view: flips cannot change it."""
    mean_std = (IMAGENET_MEAN, IMAGENET_STD)

    def view_stat(self, x):
        return x.mean(dim=(1, 2, 3, 4))

    def forward(self, left, right):
        m = self.view_stat(left) + 2 * self.view_stat(right)
        return {"reg": torch.nn.functional.softplus(m[:, None] * torch.linspace(0.5, 1.5, 5))}


class LeftHalfModel(MeanPixelModel):
    """Toy model that looks at the left half of the first tile only: a horizontal flip changes it."""

    def view_stat(self, x):
        return x[:, 0, :, :, : x.shape[-1] // 2].mean(dim=(1, 2, 3))


@pytest.mark.parametrize("toy, invariant", [(MeanPixelModel, True), (LeftHalfModel, False)])
def test_tta_leaves_a_flip_invariant_model_unchanged(toy, invariant, tiny_run, tmp_path, monkeypatch):
    def fake_load(path, opts, device):
        return fold_model.FoldModel(0, toy(), TargetTransform(np.ones(5), log_target=False), None)

    monkeypatch.setattr(fold_model, "load_fold_model", fake_load)
    preds = []
    for extra in ([], ["--tta"]):
        run_dir = link_run(tiny_run, tmp_path / f"run{len(extra)}")
        assert main(["--model-dir", str(run_dir), "--derive-dead", *extra]) == 0
        preds.append(read_outputs(run_dir)[0][PRED].to_numpy())
    assert np.allclose(preds[0], preds[1], rtol=1e-5) == invariant


def test_folds_without_checkpoint_are_skipped_and_reported(tiny_run, tmp_path, caplog):
    """What a run trained with --train-folds 0 2 leaves: checkpoints of folds 0 and 2 only."""
    run_dir = link_run(tiny_run, tmp_path / "run", folds=(0, 2),
                       config_edit=lambda c: c["data"].update(train_folds=[0, 2]))
    assert main(["--model-dir", str(run_dir)]) == 0
    table, metrics = read_outputs(run_dir)
    folds = pd.read_csv(run_dir / "folds.csv")["fold"]
    assert metrics["folds_evaluated"] == [0, 2] and metrics["folds_skipped"] == [1, 3, 4]
    assert metrics["n_images"] == len(table) == folds.isin([0, 2]).sum()
    assert metrics["n_images_skipped"] == (~folds.isin([0, 2])).sum()
    assert sorted(metrics["per_fold"]) == ["0", "2"] and set(table["fold"]) == {0, 2}
    assert "fold 1: no checkpoint" in caplog.text


@pytest.mark.slow  # a few seconds; moved out of README command 2's budget
def test_img_size_may_differ_from_training(tiny_run, tmp_path, caplog):
    """At 56 px the position embeddings are resampled and the photos tiled finer: other numbers than at the
    trained 28 px (which `--img-size 28` reproduces exactly), still finite grams of the same images."""
    run_dir = link_run(tiny_run, tmp_path / "run", folds=(1,))
    assert main(["--model-dir", str(run_dir)]) == 0
    trained = read_outputs(run_dir)[0][PRED].to_numpy()
    assert main(["--model-dir", str(run_dir), "--img-size", "28"]) == 0
    np.testing.assert_array_equal(read_outputs(run_dir)[0][PRED].to_numpy(), trained)
    assert "differs from training" not in caplog.text
    assert main(["--model-dir", str(run_dir), "--img-size", "56"]) == 0
    table, metrics = read_outputs(run_dir)
    assert (metrics["options"]["img_size"], metrics["options"]["img_size_trained"]) == (56, 28)
    larger = table[PRED].to_numpy()
    assert np.isfinite(larger).all() and (larger >= 0).all() and not np.allclose(larger, trained, rtol=1e-3)
    assert "--img-size 56 differs from training (28)" in caplog.text


def _break_folds_csv(run_dir):
    folds = pd.read_csv(run_dir / "folds.csv")
    folds.loc[0, "sample_id_prefix"] = "ID_NOT_IN_DATA"
    folds.to_csv(run_dir / "folds.csv", index=False)


def _stray_checkpoint(run_dir):
    (run_dir / "5head_best_fold7.pth").symlink_to((run_dir / "5head_best_fold0.pth").resolve())


def _no_checkpoints(run_dir):
    for path in run_dir.glob("*.pth"):
        path.unlink()


@pytest.mark.parametrize("args, damage, words", [
    (["--backbone", "vit_base_patch14_reg4_dinov2.lvd142m"], None,
     ["--backbone vit_base_patch14_reg4_dinov2.lvd142m contradicts", "vit_small_patch14_reg4_dinov2"]),
    (["--grid", "3", "3"], None, ["--grid 3 3 contradicts", "--grid 2 2"]),
    (["--hidden-ratio", "0.25"], None, ["--hidden-ratio 0.25 contradicts", "--hidden-ratio 0.5"]),
    (["--num-folds", "3"], None, ["--num-folds 3 disagrees", "folds.csv", "5 folds"]),
    ([], _no_checkpoints, ["holds no checkpoints"]),
    ([], _stray_checkpoint, ["fold(s) [7]", "folds.csv has only folds [0, 1, 2, 3, 4]"]),
    ([], _break_folds_csv, ["do not hold the same images", "ID_NOT_IN_DATA"]),
])
def test_unusable_runs_and_options_are_clear_errors(args, damage, words, tiny_run, tmp_path, caplog, capsys):
    run_dir = link_run(tiny_run, tmp_path / "run")
    if damage:
        damage(run_dir)
    assert main(["--model-dir", str(run_dir), *args]) == 2
    for word in words:
        assert word in caplog.text
    assert "Traceback" not in capsys.readouterr().out + caplog.text
    assert not (run_dir / "oof_metrics.json").exists()


def test_evaluation_and_prediction_need_no_pretrained_weights(tiny_run, tmp_path, monkeypatch):
    """A run trained with --backbone-weights FILE, FILE since deleted: everything comes from the checkpoints."""
    from biomass5head.cli.predict import main as predict_main

    def use_deleted_file(cfg):
        cfg["model"].update(pretrained=True, backbone_weights=str(tmp_path / "deleted.safetensors"))

    run_dir = link_run(tiny_run, tmp_path / "run", folds=(), config_edit=use_deleted_file)
    ckpt = torch.load(tiny_run / "5head_best_fold2.pth", map_location="cpu", weights_only=True)
    use_deleted_file(ckpt["config"])
    torch.save(ckpt, run_dir / "5head_best_fold2.pth")

    def refuse(*args, **kwargs):
        raise AssertionError("tried to load pretrained backbone weights")

    monkeypatch.setattr(backbone, "_create_from_file", refuse)
    monkeypatch.setattr(backbone, "_create_pretrained", refuse)
    assert main(["--model-dir", str(run_dir)]) == 0
    assert read_outputs(run_dir)[1]["folds_evaluated"] == [2]
    assert predict_main(["--model-dir", str(run_dir)]) == 0
    assert (run_dir / "submission.csv").is_file()
