"""Tests of data/tables.py on train.csv: long -> wide conversion, label indices and validation messages."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from competition_files import IMAGES, make_train, save_jpeg, train_rows, write_csv

from biomass5head.constants import IGNORE_INDEX, MONTHS, SPECIES_GROUPS, STATES, TARGETS
from biomass5head.data.tables import TRAIN_COLUMNS, DataError, load_train


def line_of(rows: list[dict], sample_id: str) -> int:
    return next(i for i, r in enumerate(rows) if r["sample_id"] == sample_id) + 2


def train_error(tmp_path: Path, rows: list[dict]) -> str:
    make_train(tmp_path, rows)
    with pytest.raises(DataError) as info:
        load_train(tmp_path)
    return str(info.value)


# ---------------------------------------------------------------- load_train: valid data

def test_long_to_wide_values_and_columns(tmp_path):
    make_train(tmp_path)
    df = load_train(tmp_path)
    assert list(df.columns) == [
        "sample_id_prefix", "image_path", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm",
        *TARGETS, "month", "species_group", "state_idx", "month_idx", "species_idx", "abs_path",
    ]
    assert list(df["sample_id_prefix"]) == ["ID001", "ID002", "ID003"]
    row = df.set_index("sample_id_prefix").loc["ID003"]
    assert [row[t] for t in TARGETS] == pytest.approx(IMAGES[0]["targets"])
    assert row["image_path"] == "train/ID003.jpg"
    assert row["Sampling_Date"] == "2015/9/4" and row["State"] == "Tas" and row["Species"] == "WhiteClover"
    assert row["Pre_GSHH_NDVI"] == pytest.approx(0.62) and row["Height_Ave_cm"] == pytest.approx(4.6667)
    assert row["month"] == 9
    assert row["abs_path"] == str(tmp_path / "train" / "ID003.jpg")
    assert os.path.isabs(row["abs_path"]) and os.path.isfile(row["abs_path"])
    for t in TARGETS:
        assert df[t].dtype.kind == "f"
    for col in ("month", "state_idx", "month_idx", "species_idx"):
        assert df[col].dtype.kind == "i"


def test_targets_in_any_row_order(tmp_path):
    rows = train_rows()[::-1]
    make_train(tmp_path, rows)
    df = load_train(tmp_path).set_index("sample_id_prefix")
    for im in IMAGES:
        assert [df.loc[im["id"], t] for t in TARGETS] == pytest.approx(im["targets"])


def test_species_groups_state_and_month_indices(tmp_path, caplog):
    images = [dict(IMAGES[0]), dict(IMAGES[1]), dict(IMAGES[2], species="Dandelion")]
    make_train(tmp_path, images=images)
    with caplog.at_level(logging.WARNING, logger="biomass5head.data.tables"):
        df = load_train(tmp_path).set_index("sample_id_prefix")
    assert df.loc["ID003", "species_group"] == "Clover"  # WhiteClover
    assert df.loc["ID001", "species_group"] == "Phalaris_Clover"  # Phalaris_Ryegrass_Clover
    assert df.loc["ID002", "species_group"] == "Other"  # unknown
    assert df.loc["ID002", "Species"] == "Dandelion"  # the raw string is kept
    assert list(df["species_idx"]) == [SPECIES_GROUPS.index(g) for g in ("Phalaris_Clover", "Other", "Clover")]
    assert list(df["state_idx"]) == [STATES.index(s) for s in ("NSW", "WA", "Tas")]
    assert list(df["month"]) == [4, 11, 9]
    assert list(df["month_idx"]) == [MONTHS.index(m) for m in (4, 11, 9)] == [2, 9, 7]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Dandelion" in warnings[0] and "Other" in warnings[0] and "ID002" in warnings[0]


def test_mixed_species_is_other_without_warning(tmp_path, caplog):
    make_train(tmp_path, images=[dict(IMAGES[0], species="Mixed")])
    with caplog.at_level(logging.WARNING, logger="biomass5head.data.tables"):
        df = load_train(tmp_path)
    assert df["species_group"].tolist() == ["Other"]
    assert not caplog.records


def test_unknown_state_is_ignored_with_warning(tmp_path, caplog):
    make_train(tmp_path, images=[dict(IMAGES[0], state="Qld"), IMAGES[1]])
    with caplog.at_level(logging.WARNING, logger="biomass5head.data.tables"):
        df = load_train(tmp_path).set_index("sample_id_prefix")
    assert df.loc["ID003", "state_idx"] == IGNORE_INDEX and df.loc["ID003", "State"] == "Qld"
    assert df.loc["ID001", "state_idx"] == STATES.index("NSW")
    assert any("'Qld'" in r.getMessage() and "ID003" in r.getMessage() for r in caplog.records)


def test_month_outside_competition_is_ignored_with_warning(tmp_path, caplog):
    make_train(tmp_path, images=[dict(IMAGES[0], date="2015/3/12"), dict(IMAGES[1], date="2015/12/1"), IMAGES[2]])
    with caplog.at_level(logging.WARNING, logger="biomass5head.data.tables"):
        df = load_train(tmp_path).set_index("sample_id_prefix")
    assert df.loc["ID003", "month"] == 3 and df.loc["ID003", "month_idx"] == IGNORE_INDEX
    assert df.loc["ID001", "month"] == 12 and df.loc["ID001", "month_idx"] == IGNORE_INDEX
    assert df.loc["ID002", "month_idx"] == MONTHS.index(11)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "month 3" in text and "month 12" in text and "ID003" in text and "ID001" in text


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    rows = make_train(tmp_path)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    lines.insert(3, "")  # a blank line 4: the row that was line 4 is now line 5
    bad = rows[2]["sample_id"]
    lines[4] = lines[4].replace(f",{rows[2]['target']}", ",oops")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n\n")
    with pytest.raises(DataError) as info:
        load_train(tmp_path)
    assert f"train.csv line 5 ({bad}): target 'oops' is not a number" in str(info.value)


# ---------------------------------------------------------------- load_train: one test per problem

def test_missing_train_csv_names_the_path(tmp_path):
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match="not found") as info:
        load_train(tmp_path)
    assert str(tmp_path / "train.csv") in str(info.value)


def test_missing_and_extra_columns(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "Height_Ave_cm"} | {"Notes": "x"} for r in train_rows()]
    make_train(tmp_path)
    write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(DataError) as info:
        load_train(tmp_path)
    msg = str(info.value)
    assert "train.csv line 1 (header): missing column(s) ['Height_Ave_cm']" in msg
    assert "unexpected column(s) ['Notes']" in msg
    assert msg.startswith("2 problem(s)")


def test_header_only_file_is_an_error(tmp_path):
    make_train(tmp_path, rows=[])
    with pytest.raises(DataError, match="no data rows"):
        load_train(tmp_path)


def test_image_with_a_missing_target(tmp_path):
    rows = [r for r in train_rows() if r["sample_id"] != "ID001__Dry_Dead_g"]
    msg = train_error(tmp_path, rows)
    assert "train.csv image ID001 (lines 7, 8, 9, 10): missing target(s) ['Dry_Dead_g']" in msg


def test_image_with_a_duplicated_target(tmp_path):
    rows = train_rows()
    rows[1] = dict(rows[1], sample_id="ID003__Dry_Green_g", target_name="Dry_Green_g")  # two Green, no Dead
    msg = train_error(tmp_path, rows)
    assert "train.csv image ID003" in msg
    assert "target(s) given more than once ['Dry_Green_g']" in msg
    assert "missing target(s) ['Dry_Dead_g']" in msg
    assert "train.csv lines 2, 3: duplicate sample_id 'ID003__Dry_Green_g'" in msg


def test_duplicate_sample_id(tmp_path):
    rows = train_rows()
    rows.append(dict(rows[0]))
    msg = train_error(tmp_path, rows)
    assert f"train.csv lines 2, {len(rows) + 1}: duplicate sample_id 'ID003__Dry_Green_g'" in msg


@pytest.mark.parametrize("sample_id", ["ID003_Dry_Green_g", "ID003__Dry_Dead_g_x", "__Dry_Green_g", "ID003"])
def test_malformed_sample_id(tmp_path, sample_id):
    rows = train_rows()
    rows[0] = dict(rows[0], sample_id=sample_id)
    msg = train_error(tmp_path, rows)
    assert (f"train.csv line 2: sample_id {sample_id!r} does not match '<image id>__<target_name>' "
            f"with target_name 'Dry_Green_g'") in msg


def test_sample_id_suffix_disagrees_with_target_name(tmp_path):
    rows = train_rows()
    rows[0] = dict(rows[0], sample_id="ID003__Dry_Dead_g")
    msg = train_error(tmp_path, rows)
    assert "line 2: sample_id 'ID003__Dry_Dead_g' does not match" in msg


@pytest.mark.parametrize("value, problem", [
    ("abc", "target 'abc' is not a number"),
    ("", "target is empty"),
    ("nan", "target 'nan' is NaN"),
    ("inf", "target 'inf' is infinite"),
    ("-0.5", "target '-0.5' is negative"),
])
def test_bad_target_values(tmp_path, value, problem):
    rows = train_rows()
    rows[6] = dict(rows[6], target=value)
    msg = train_error(tmp_path, rows)
    assert f"train.csv line 8 ({rows[6]['sample_id']}): {problem}" in msg


def test_non_numeric_ndvi_and_height_are_errors(tmp_path):
    rows = train_rows()
    for r in rows[:5]:
        r.update(Pre_GSHH_NDVI="high", Height_Ave_cm="-3")
    msg = train_error(tmp_path, rows)
    assert "train.csv line 2 (ID003__Dry_Green_g): Pre_GSHH_NDVI 'high' is not a number" in msg
    assert "train.csv line 6 (ID003__Dry_Total_g): Height_Ave_cm '-3' is negative" in msg


@pytest.mark.parametrize("date", ["2015-13-01", "2015/13/1", "04.09.2015", "yesterday", ""])  # ISO itself is accepted
def test_unparseable_date(tmp_path, date):
    rows = train_rows()
    for r in rows[:5]:
        r["Sampling_Date"] = date
    msg = train_error(tmp_path, rows)
    assert f"train.csv line 3 (ID003__Dry_Dead_g): Sampling_Date {date!r} is not a date written YYYY/M/D" in msg
    assert "disagrees" not in msg


def test_image_that_does_not_exist(tmp_path):
    rows = make_train(tmp_path)
    (tmp_path / "train" / "ID001.jpg").unlink()
    with pytest.raises(DataError) as info:
        load_train(tmp_path)
    msg = str(info.value)
    assert "train.csv lines 7, 8, 9, 10, 11: image_path 'train/ID001.jpg' does not exist" in msg
    assert str(tmp_path / "train" / "ID001.jpg") in msg
    assert line_of(rows, "ID001__Dry_Green_g") == 7


@pytest.mark.parametrize("outside", ["../elsewhere.jpg", "train/../../elsewhere.jpg", "ABSOLUTE"])
def test_image_outside_base(tmp_path, outside):
    base = tmp_path / "base"
    save_jpeg(tmp_path / "elsewhere.jpg")  # it exists, but is not under BASE
    outside = str(tmp_path / "elsewhere.jpg") if outside == "ABSOLUTE" else outside
    rows = train_rows()
    for r in rows[10:15]:
        r["image_path"] = outside
    base.mkdir()
    msg = train_error(base, rows)
    assert f"train.csv lines 12, 13, 14, 15, 16: image_path {outside!r} resolves to" in msg
    assert "outside the base path" in msg


def test_absolute_image_path_inside_base_is_accepted(tmp_path):
    rows = train_rows()
    for r in rows[:5]:
        r["image_path"] = str(tmp_path / "train" / "ID003.jpg")
    make_train(tmp_path, rows)
    df = load_train(tmp_path).set_index("sample_id_prefix")
    assert df.loc["ID003", "abs_path"] == str(tmp_path / "train" / "ID003.jpg")


def test_symlinked_image_folder_is_inside_base(tmp_path):
    base, store = tmp_path / "base", tmp_path / "store"
    for im in IMAGES:
        save_jpeg(store / f"{im['id']}.jpg")
    base.mkdir()
    (base / "train").symlink_to(store, target_is_directory=True)
    write_csv(base / "train.csv", train_rows(), list(TRAIN_COLUMNS))
    df = load_train(base)
    assert df["abs_path"].tolist() == [str(base / "train" / f"{i}.jpg") for i in ("ID001", "ID002", "ID003")]


def test_unknown_target_name(tmp_path):
    rows = train_rows()
    rows[4] = dict(rows[4], sample_id="ID003__Dry_Weed_g", target_name="Dry_Weed_g")
    msg = train_error(tmp_path, rows)
    assert "train.csv line 6 (ID003__Dry_Weed_g): unknown target_name 'Dry_Weed_g'" in msg
    assert "missing target(s) ['Dry_Total_g']" in msg


@pytest.mark.parametrize("column, value", [
    ("State", "Vic"), ("Species", "Ryegrass"), ("Sampling_Date", "2015/9/5"), ("Pre_GSHH_NDVI", "0.7"),
    ("Height_Ave_cm", "5"), ("image_path", "train/ID001.jpg"),
])
def test_metadata_disagrees_within_an_image(tmp_path, column, value):
    rows = train_rows()
    rows[3] = dict(rows[3], **{column: value})
    msg = train_error(tmp_path, rows)
    assert f"train.csv image ID003 (lines 2, 3, 4, 5, 6): {column} disagrees between rows of the same image" in msg
    assert repr(value) in msg
    assert msg.startswith("1 problem(s)")


def test_equal_numbers_written_differently_agree(tmp_path):
    rows = train_rows()
    rows[3] = dict(rows[3], Pre_GSHH_NDVI="0.620", Height_Ave_cm="4.66670")
    make_train(tmp_path, rows)
    assert load_train(tmp_path).set_index("sample_id_prefix").loc["ID003", "Pre_GSHH_NDVI"] == pytest.approx(0.62)


def test_all_problems_reported_together(tmp_path):
    rows = train_rows()
    rows[0] = dict(rows[0], target="-1")
    rows[5] = dict(rows[5], Sampling_Date="someday")
    rows[7] = dict(rows[7], sample_id="ID001__Dry_Bogus_g", target_name="Dry_Bogus_g")
    rows.append(dict(rows[12]))
    for r in rows[10:15]:
        r["image_path"] = "train/missing.jpg"
    msg = train_error(tmp_path, rows)
    expected = [
        "line 2 (ID003__Dry_Green_g): target '-1' is negative",
        "line 7 (ID001__Dry_Green_g): Sampling_Date 'someday' is not a date",
        "line 9 (ID001__Dry_Bogus_g): unknown target_name 'Dry_Bogus_g'",
        "image ID001 (lines 7, 8, 9, 10, 11): missing target(s) ['Dry_Clover_g']",
        "lines 14, 17: duplicate sample_id 'ID002__Dry_Clover_g'",
        "image_path 'train/missing.jpg' does not exist",
        "image ID002 (lines 12, 13, 14, 15, 16, 17): target(s) given more than once ['Dry_Clover_g']",
    ]
    for text in expected:
        assert text in msg
    assert str(tmp_path / "train.csv") in msg.splitlines()[0]


def test_iso_dates_are_read_and_semicolons_get_a_hint(tmp_path):
    rows = train_rows()
    for r in rows:
        y, m, d = r["Sampling_Date"].split("/")
        r["Sampling_Date"] = f"{y}-{int(m):02d}-{int(d):02d}"
    make_train(tmp_path, rows)
    assert sorted(load_train(tmp_path)["month"]) == [4, 9, 11]
    text = (tmp_path / "train.csv").read_text().replace(",", ";")
    (tmp_path / "train.csv").write_text(text)
    with pytest.raises(DataError, match="train.csv looks separated by semicolons: save it with commas"):
        load_train(tmp_path)


def test_implausible_targets_warn_by_default_and_fail_when_strict(tmp_path, caplog):
    rows = train_rows()
    rows[4]["target"] = "1e12"  # ID003's Dry_Total_g, while Green + Dead + Clover is 48.27 g
    make_train(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        assert len(load_train(tmp_path)) == 3
    assert "1 image(s) with implausible targets" in caplog.text
    assert "image ID003: Dry_Total_g 1e+12 != Green + Dead + Clover 48.2735; above 2000 g: Dry_Total_g 1e+12" \
        in caplog.text
    with pytest.raises(DataError, match="implausible targets"):
        load_train(tmp_path, strict=True)
