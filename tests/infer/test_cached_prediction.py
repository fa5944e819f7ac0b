"""Evaluation and prediction of a frozen-backbone run from the feature cache: the same numbers as from pixels, TTA as
the mean of the id, h and v variants, and the cache reused."""
from __future__ import annotations

import numpy as np
import pandas as pd
from cache_runs import (
    PRED_COLS,
    evaluate,
    npy_files,
    spies,
)

from biomass5head.cli import predict as predict_cli
from biomass5head.data.feature_cache import (
    FeatureCache,
    state_dict_digest,
)
from biomass5head.data.tables import load_train
from biomass5head.infer import fold_model, run_folder
from biomass5head.infer.fold_model import finish, predict_from_cache
from biomass5head.infer.oof import read_run_folds


def test_eval_reuses_the_runs_cache_and_matches_pixels(head_only):
    cached, rec = evaluate(head_only.out)  # the run's --feature-cache folder, from config.json
    assert rec.encodes == 0 and rec.decodes("pixels") == [] and rec.decodes("cache") == []
    # folds 0 and 1, then the ridge probe that eval compares with (all 30 training photos)
    assert sum("reused all" in m for m in rec.log) == 3 and any("reused all 30 entries" in m for m in rec.log)
    pixels, rec = evaluate(head_only.out, "--no-feature-cache")
    assert rec.decodes("cache") == [] and len(rec.decodes("pixels")) == len(pixels)
    assert cached["sample_id_prefix"].tolist() == pixels["sample_id_prefix"].tolist()
    np.testing.assert_allclose(cached[PRED_COLS].to_numpy(), pixels[PRED_COLS].to_numpy(), rtol=1e-4, atol=1e-5)
    # the run trained in float32 (--amp-dtype float32): tight; bfloat16 tolerance would be ~1e-2 relative


def test_eval_tta_with_the_cache_averages_id_h_v(head_only, tiny_data, tmp_path):
    cache = tmp_path / "cache"
    plain, _ = evaluate(head_only.out, "--feature-cache", str(cache))
    tta, rec = evaluate(head_only.out, "--tta", "--feature-cache", str(cache))
    n = len(tta)
    # per fold: the id entries of the plain evaluation are reused, h and v are computed now
    assert rec.encodes > 0 and rec.decodes("pixels") == []
    sizes = tta["fold"].value_counts()
    for k in sizes:
        assert any(f"reusing {k} entries, computing {2 * k}" in m for m in rec.log), rec.log
    names = [f.name.rsplit("_", 1)[1] for f in npy_files(cache)]
    assert sorted(set(names)) == ["h.npy", "id.npy", "v.npy"] and len(names) == 3 * n
    pixels, _ = evaluate(head_only.out, "--tta", "--no-feature-cache")
    np.testing.assert_allclose(tta[PRED_COLS].to_numpy(), pixels[PRED_COLS].to_numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(tta[PRED_COLS].to_numpy(), plain[PRED_COLS].to_numpy(), rtol=1e-6, atol=0)
    # fold 0's rows: the mean in grams of the three variants' predictions, then the run's post-processing
    run = run_folder.open_run(head_only.out)
    opts = run_folder.resolve_options(run, {"feature_cache": str(cache)})
    rt = run_folder.runtime(opts)
    df = load_train(tiny_data)
    rows = df[read_run_folds(run, df, None) == 0].reset_index(drop=True)
    fm = fold_model.load_fold_model(run.checkpoints[0], opts, rt.device)
    fc = FeatureCache(cache, backbone=opts.cfg.model.backbone, weights_digest=state_dict_digest(fm.model.backbone),
                      tiles=fm.tiles(opts), compute_dtype=rt.dtype_name)
    with spies() as rec:
        per_variant = [predict_from_cache(fm, rows, fc, opts, rt, variants=[v])["pred"] for v in ("id", "h", "v")]
    assert rec.encodes == 0
    expected = finish(np.mean(per_variant, axis=0), opts)
    np.testing.assert_allclose(tta.loc[tta["fold"] == 0, PRED_COLS].to_numpy(), expected, rtol=1e-6, atol=1e-6)


def test_predict_with_the_cache_matches_pixels_and_reuses_it(head_only, tiny_data, tmp_path):
    cache = tmp_path / "cache"
    args = ["--model-dir", str(head_only.out), "--feature-cache", str(cache), "--out"]
    with spies() as rec:
        assert predict_cli.main([*args, str(tmp_path / "cached.csv")]) == 0
    # 4 test photos: computed with fold 0's model, reused by fold 1's (same frozen backbone)
    assert any("reusing 0 entries, computing 4" in m for m in rec.log) and any("reused all 4" in m for m in rec.log)
    assert len(npy_files(cache)) == 4
    with spies() as rec:
        assert predict_cli.main([*args, str(tmp_path / "again.csv")]) == 0
    assert rec.encodes == 0 and rec.decodes("cache") == [] and rec.decodes("pixels") == []
    with spies() as rec:
        assert predict_cli.main(["--model-dir", str(head_only.out), "--no-feature-cache", "--out",
                                 str(tmp_path / "pixels.csv")]) == 0
    assert rec.decodes("cache") == [] and rec.decodes("pixels")
    cached, again, pixels = (pd.read_csv(tmp_path / f"{n}.csv") for n in ("cached", "again", "pixels"))
    assert cached["sample_id"].tolist() == pixels["sample_id"].tolist()
    np.testing.assert_array_equal(cached["target"], again["target"])
    np.testing.assert_allclose(cached["target"], pixels["target"], rtol=1e-4, atol=1e-5)
