"""Property-based tests of the CSV readers: arbitrary bytes, and valid files with random edits, give either a clean
DataError or a valid table, never another exception."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
from competition_files import make_test, make_train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biomass5head.constants import TARGETS
from biomass5head.data.tables import DataError, load_test, load_train

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_folder() -> Path:
    base = Path(tempfile.mkdtemp(prefix="fuzz_"))
    make_train(base)
    make_test(base, [dict(sample_id=f"ID9__{t}", image_path="test/ID9.jpg", target_name=t) for t in TARGETS])
    return base


def _loads_cleanly(load, base: Path) -> None:
    try:
        table = load(base)
    except DataError:
        return
    table = table[0] if isinstance(table, tuple) else table
    assert isinstance(table, pd.DataFrame) and len(table) > 0


@SETTINGS
@given(content=st.binary(max_size=400), which=st.sampled_from(["train.csv", "test.csv"]))
def test_arbitrary_bytes_are_a_data_error_or_data(content, which):
    base = _valid_folder()
    try:
        (base / which).write_bytes(content)
        _loads_cleanly(load_train if which == "train.csv" else load_test, base)
    finally:
        shutil.rmtree(base)


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["delete", "insert", "replace"]),
                                st.text(alphabet=",;\"\n\r\t -./0123456789abcdeIDNSW_gé", max_size=6)),
                      min_size=1, max_size=6),
       which=st.sampled_from(["train.csv", "test.csv"]))
def test_valid_files_with_random_edits_are_a_data_error_or_data(edits, which):
    base = _valid_folder()
    try:
        text = (base / which).read_text()
        for position, kind, piece in edits:
            i = position % (len(text) + 1)
            if kind == "delete":
                text = text[:i] + text[i + len(piece):]
            elif kind == "insert":
                text = text[:i] + piece + text[i:]
            else:
                text = text[:i] + piece + text[i + len(piece):]
        (base / which).write_text(text)
        _loads_cleanly(load_train if which == "train.csv" else load_test, base)
    finally:
        shutil.rmtree(base)
