"""`python -m src.data DIR` / `biomass5head check DIR`: summary, problems of both files, exit codes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from competition_files import long_test_rows, make_test, make_train, train_rows, write_csv

from biomass5head.cli.check import main
from biomass5head.data.tables import TEST_COLUMNS

ROOT = Path(__file__).resolve().parents[2]


def test_cli_valid_data_prints_summary(tmp_path, capsys):
    make_train(tmp_path)
    make_test(tmp_path, long_test_rows())
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train.csv: 3 images" in out
    assert "NSW: 1, Tas: 1, WA: 1" in out
    assert "4: 1, 9: 1, 11: 1" in out
    assert "Clover: 1" in out and "Phalaris_Clover: 1" in out and "Lucerne: 1" in out
    assert f"Dry_Total_g {(48.2735 + 9.1 + 8.05) / 3:.2f}" in out
    assert "test.csv: 2 images, 10 rows" in out


def test_cli_train_only_is_fine(tmp_path, capsys):
    make_train(tmp_path)
    assert main([str(tmp_path)]) == 0
    assert "test.csv" not in capsys.readouterr().out


def test_cli_reports_problems_of_both_files_and_fails(tmp_path, capsys):
    rows = train_rows()
    rows[0]["target"] = "x"
    make_train(tmp_path, rows)
    write_csv(tmp_path / "test.csv", [], list(TEST_COLUMNS))
    assert main([str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "target 'x' is not a number" in captured.err
    assert "no data rows" in captured.err
    assert "train.csv: 3 images" not in captured.out


@pytest.mark.slow  # 3-6 s (processes or an extra run): in .ci/run's slow pass; README command 2 under 6 min
def test_cli_module_exit_codes(tmp_path):
    def run(base: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "src.data", str(base)], cwd=ROOT, capture_output=True, text=True)

    missing = run(tmp_path)
    assert missing.returncode == 1 and str(tmp_path / "train.csv") in missing.stderr
    make_train(tmp_path)
    ok = run(tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "train.csv: 3 images" in ok.stdout
