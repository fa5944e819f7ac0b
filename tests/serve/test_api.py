"""The JSON API of `python -m src.serve` through FastAPI's test client: the estimates equal `predict --images`, the
range, tile weights and OOD check are what they claim, and every bad input gets a 4xx naming the file."""
from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from biomass5head.cli.predict import main as predict_main
from biomass5head.constants import TARGETS
from biomass5head.infer.ood import REFERENCE_FILE, OodReference


def _photos(tiny_data, n=2):
    return sorted((tiny_data / "test").iterdir())[:n]


def _post(client, *files, **form):
    return client.post("/api/predict", files=[("files", f) for f in files], data=form)


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_health_and_model(client, serve_run):
    assert client.get("/api/health").json() == {"status": "ok"}
    m = client.get("/api/model").json()
    assert m["backbone"] == "test_vit" and m["folds"] == [0, 1] and m["img_size"] == 32 and m["grid"] == [2, 2]
    assert m["shared_backbone"] is True and m["quadrat_m2"] == 0.21 and m["oof_weighted_r2"] is None
    assert m["trained"].startswith("20") and m["ood"]["training_photos"] == 30
    assert (serve_run / REFERENCE_FILE).is_file()  # computed once, kept in the run folder


def test_estimates_equal_predict_images(client, serve_run, tiny_data, tmp_path):
    photos = _photos(tiny_data)
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    assert predict_main(["--model-dir", str(serve_run), "--images", str(folder), "--out", str(tmp_path / "p.csv"),
                         "--device", "cpu"]) == 0
    expected = pd.read_csv(tmp_path / "p.csv").set_index("image")
    r = _post(client, *[(p.name, p.read_bytes(), "image/jpeg") for p in photos])
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["name"] for x in results] == [p.name for p in photos]
    for res in results:
        grams = np.array([res["grams"][t] for t in TARGETS])
        np.testing.assert_allclose(grams, expected.loc[res["name"], list(TARGETS)].to_numpy(float), rtol=1e-4)
        # the run reconciles (SERVE_TRAIN --reconcile): GDM and Total are the sums of the components
        assert grams[3] == pytest.approx(grams[0] + grams[2]) and grams[4] == pytest.approx(grams[:3].sum())
        for t in TARGETS:
            assert res["kg_per_ha"][t] == pytest.approx(res["grams"][t] / 0.21 * 10)
            lo, hi = res["range"][t]
            folds = [res["per_fold"][f][t] for f in ("0", "1")]
            assert lo == pytest.approx(min(folds)) and hi == pytest.approx(max(folds))
            assert lo - 1e-6 <= res["grams"][t] <= hi + 1e-6
        tw = res["tile_weights"]
        assert tw["grid"] == [2, 2] and len(tw["left"]) == len(tw["right"]) == 4
        assert sum(tw["left"]) == pytest.approx(1, abs=1e-4) and sum(tw["right"]) == pytest.approx(1, abs=1e-4)
        assert set(res["ood"]) == {"flag", "distance", "threshold", "ratio"} and res["note"] is None


def test_area_changes_kg_per_ha_only(client, tiny_data):
    p = _photos(tiny_data, 1)[0]
    a, b = (_post(client, (p.name, p.read_bytes(), "image/jpeg"), area_m2=str(area)).json()["results"][0]
            for area in (0.21, 0.5))
    assert a["grams"] == b["grams"] and b["area_m2"] == 0.5
    assert b["kg_per_ha"]["Dry_Total_g"] == pytest.approx(a["grams"]["Dry_Total_g"] / 0.5 * 10)


BAD = {  # name -> (bytes, expected status, words the message must hold)
    "notes.txt": (b"grass, 3 kg", 415, "not an image"),
    "empty.jpg": (b"", 400, "empty file"),
    "cut.jpg": (None, 422, "truncated or corrupt"),
    "huge.jpg": (b"\xff" * 600_000, 413, "over the 0.5 MB upload limit"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_file_alone_gets_its_4xx_naming_it(client, tiny_data, name):
    data, status, words = BAD[name]
    if data is None:
        whole = _photos(tiny_data, 1)[0].read_bytes()
        data = whole[: len(whole) // 2]
    r = _post(client, (name, data, "application/octet-stream"))
    assert r.status_code == status
    assert r.json()["detail"].startswith(f"{name}: ") and words in r.json()["detail"]


def test_one_bad_file_does_not_lose_the_others(client, tiny_data):
    good = _photos(tiny_data, 2)
    r = _post(client, (good[0].name, good[0].read_bytes(), "image/jpeg"), ("notes.txt", b"hello", "text/plain"),
              (good[1].name, good[1].read_bytes(), "image/jpeg"))
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["name"] for x in res] == [good[0].name, "notes.txt", good[1].name]
    assert "grams" in res[0] and "grams" in res[2] and res[1]["status"] == 415 and "error" in res[1]


def test_no_files_and_a_bad_area_are_400(client, tiny_data):
    r = client.post("/api/predict")
    assert r.status_code == 400 and "multipart field `files`" in r.json()["detail"]
    p = _photos(tiny_data, 1)[0]
    r = _post(client, (p.name, p.read_bytes(), "image/jpeg"), area_m2="0")
    assert r.status_code == 400 and "area_m2" in r.json()["detail"]
    r = _post(client, (p.name, p.read_bytes(), "image/jpeg"), area_m2="lots")
    assert r.status_code == 422  # FastAPI's own validation answer, naming the field
    assert "area_m2" in json.dumps(r.json())


def test_any_size_orientation_and_mode(client, tiny_data):
    photo = Image.open(_photos(tiny_data, 1)[0]).convert("RGB")
    upright = _post(client, ("up.jpg", _jpeg(photo), "image/jpeg")).json()["results"][0]
    # The same photo stored rotated, with the EXIF tag that turns it upright again (orientation 6: 90 deg CW).
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _post(client, ("rot.jpg", _jpeg(photo.transpose(Image.Transpose.ROTATE_90), exif=exif),
                             "image/jpeg")).json()["results"][0]
    assert (rotated["width"], rotated["height"]) == (upright["width"], upright["height"])
    np.testing.assert_allclose([rotated["grams"][t] for t in TARGETS], [upright["grams"][t] for t in TARGETS],
                               rtol=0.05)  # the same picture, JPEG-compressed once more in another orientation
    square = photo.resize((300, 300))
    buf = io.BytesIO()
    square.convert("L").save(buf, "PNG")
    res = _post(client, ("square.png", buf.getvalue(), "image/png")).json()["results"][0]
    assert "grams" in res and "not a 2:1 stereo pair (300x300 px" in res["note"] and "middle column" in res["note"]
    assert "grayscale photo (L): converted to RGB" in res["note"]


def test_a_photo_unlike_the_training_photos_is_further_away(client, tiny_data):
    p = _photos(tiny_data, 1)[0]
    normal = _post(client, (p.name, p.read_bytes(), "image/jpeg")).json()["results"][0]["ood"]
    blank = _post(client, ("blank.jpg", _jpeg(Image.new("RGB", (224, 112), (250, 20, 200))),
                           "image/jpeg")).json()["results"][0]["ood"]
    assert blank["distance"] > normal["distance"] and blank["flag"] and not normal["flag"]


def test_eight_concurrent_requests_all_answer_alike(client, tiny_data):
    p = _photos(tiny_data, 1)[0]
    data = p.read_bytes()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _post(client, (p.name, data, "image/jpeg")), range(8)))
    assert [a.status_code for a in answers] == [200] * 8
    totals = {a.json()["results"][0]["grams"]["Dry_Total_g"] for a in answers}
    assert len(totals) == 1


def test_numbers_json_cannot_hold_become_null():
    from biomass5head.serve.app import _finite

    assert _finite({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}}) == {
        "a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}


def test_ood_reference_threshold_is_the_99th_percentile_of_own_distances():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 16))
    ref = OodReference.build(train, "test")
    z = (train - train.mean(0)) / (train.std(0) + 1e-6)
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)  # each photo's 5th nearest other photo
    assert ref.threshold == pytest.approx(np.percentile(np.sort(d, 1)[:, 4], 99))
    assert ref.check(train.mean(0))["flag"] is False
    assert ref.check(train.mean(0) + 20 * train.std(0))["flag"] is True
