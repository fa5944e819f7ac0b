"""Builders of competition files for the data-layer tests: train.csv / test.csv rows and tiny JPEGs."""
from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from biomass5head.constants import TARGETS
from biomass5head.data.tables import TEST_COLUMNS, TRAIN_COLUMNS

IMAGES = [
    dict(id="ID003", date="2015/9/4", state="Tas", species="WhiteClover", ndvi="0.62", height="4.6667",
         targets=(16.2751, 31.9984, 0.0, 16.275, 48.2735)),
    dict(id="ID001", date="2015/4/1", state="NSW", species="Phalaris_Ryegrass_Clover", ndvi="0.55", height="16",
         targets=(7.6, 0.0, 1.5, 9.1, 9.1)),
    dict(id="ID002", date="2015/11/30", state="WA", species="Lucerne", ndvi="0.38", height="1.0",
         targets=(0.0, 2.0, 6.05, 6.05, 8.05)),
]


def save_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 4), (40, 120, 30)).save(path, format="JPEG")


def write_csv(path: Path, rows: list[dict], columns=None) -> None:
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def train_rows(images=IMAGES) -> list[dict]:
    """Long rows, five per image, in the competition's layout (line number = index + 2)."""
    rows = []
    for im in images:
        for name, value in zip(TARGETS, im["targets"], strict=True):
            rows.append(dict(sample_id=f"{im['id']}__{name}", image_path=f"train/{im['id']}.jpg",
                             Sampling_Date=im["date"], State=im["state"], Species=im["species"],
                             Pre_GSHH_NDVI=im["ndvi"], Height_Ave_cm=im["height"], target_name=name,
                             target=str(value)))
    return rows


def make_train(base: Path, rows: list[dict] | None = None, images=IMAGES) -> list[dict]:
    """Write BASE/train.csv (the given rows, or valid ones) and the photos; return the rows written."""
    for im in images:
        save_jpeg(base / "train" / f"{im['id']}.jpg")
    rows = train_rows(images) if rows is None else rows
    write_csv(base / "train.csv", rows, list(TRAIN_COLUMNS))
    return rows


def make_test(base: Path, rows: list[dict], photos=("ID9", "ID7")) -> None:
    for name in photos:
        save_jpeg(base / "test" / f"{name}.jpg")
    write_csv(base / "test.csv", rows, list(TEST_COLUMNS))


def long_test_rows(ids=("ID9", "ID7"), targets=TARGETS) -> list[dict]:
    return [dict(sample_id=f"{i}__{t}", image_path=f"test/{i}.jpg", target_name=t) for i in ids for t in targets]
