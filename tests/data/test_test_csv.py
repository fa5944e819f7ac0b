"""Tests of data/tables.py on test.csv: order, subsets of targets and every problem reported."""
from __future__ import annotations

import pytest
from competition_files import long_test_rows, make_test, write_csv

from biomass5head.data.tables import TEST_COLUMNS, DataError, load_test


def test_load_test_keeps_order_of_first_appearance(tmp_path):
    rows = long_test_rows()
    rows = [rows[5], rows[0], *rows[6:], *rows[1:5]]  # ID7 first
    make_test(tmp_path, rows)
    images, out = load_test(tmp_path)
    assert list(images.columns) == ["sample_id_prefix", "image_path", "abs_path"]
    assert list(images["sample_id_prefix"]) == ["ID7", "ID9"]
    assert list(images["abs_path"]) == [str(tmp_path / "test" / f"{i}.jpg") for i in ("ID7", "ID9")]
    assert list(out.columns) == ["sample_id", "image_path", "target_name", "sample_id_prefix"]
    assert list(out["sample_id"]) == [r["sample_id"] for r in rows]
    assert list(out["sample_id_prefix"]) == [r["sample_id"].split("__")[0] for r in rows]


def test_load_test_accepts_a_subset_of_targets(tmp_path):
    make_test(tmp_path, long_test_rows(ids=("ID9",), targets=("Dry_Total_g",)), photos=("ID9",))
    images, rows = load_test(tmp_path)
    assert len(images) == 1 and len(rows) == 1


def test_load_test_empty_file_is_an_error(tmp_path):
    write_csv(tmp_path / "test.csv", [], list(TEST_COLUMNS))
    with pytest.raises(DataError, match="no data rows"):
        load_test(tmp_path)


def test_load_test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_test(tmp_path)


def test_load_test_bad_columns(tmp_path):
    write_csv(tmp_path / "test.csv", [dict(sample_id="ID9__GDM_g", path="test/ID9.jpg", target_name="GDM_g")])
    with pytest.raises(DataError) as info:
        load_test(tmp_path)
    assert "test.csv line 1 (header): missing column(s) ['image_path']" in str(info.value)
    assert "unexpected column(s) ['path']" in str(info.value)


def test_load_test_reports_every_problem(tmp_path):
    rows = long_test_rows()
    rows[1] = dict(rows[1], sample_id="ID9__Dry_Moss_g", target_name="Dry_Moss_g")
    rows[2] = dict(rows[0])
    for r in rows[5:]:
        r["image_path"] = "test/ID8.jpg"
    rows.append(dict(sample_id="ID6__GDM_g", image_path="../ID6.jpg", target_name="GDM_g"))
    make_test(tmp_path, rows)
    with pytest.raises(DataError) as info:
        load_test(tmp_path)
    msg = str(info.value)
    assert msg.startswith("4 problem(s)")
    assert "test.csv line 3 (ID9__Dry_Moss_g): unknown target_name 'Dry_Moss_g'" in msg
    assert "test.csv lines 2, 4: duplicate sample_id 'ID9__Dry_Green_g'" in msg
    assert "test.csv lines 7, 8, 9, 10, 11: image_path 'test/ID8.jpg' does not exist" in msg
    assert "test.csv line 12: image_path '../ID6.jpg' resolves to" in msg and "outside the base path" in msg


def test_load_test_image_path_disagrees(tmp_path):
    rows = long_test_rows()
    rows[1]["image_path"] = "test/ID7.jpg"
    make_test(tmp_path, rows)
    with pytest.raises(DataError, match=r"test.csv image ID9 \(lines 2, 3, 4, 5, 6\): image_path disagrees"):
        load_test(tmp_path)
