"""The bad-input matrix: every entry point given what a hostile but fair user might give it. Each case asserts the
exit code, the file / row / option named in the message, no traceback, and that no earlier output changed."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from biomass5head import fileio
from biomass5head.cli import check, eval, predict, report, synthetic, train, weights
from biomass5head.fileio import file_sha256

TRAIN = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--grid", "1", "2", "--epochs", "1",
         "--train-folds", "0", "--device-type", "cpu", "--amp-dtype", "float32", "--num-workers", "0"]


class Env:
    """A fresh copy of the tiny data set and of the tiny run (checkpoints linked) for one case."""

    def __init__(self, tmp: Path, data: Path, run: Path):
        self.tmp, self.data, self.run = tmp, tmp / "data", tmp / "run"
        shutil.copytree(data, self.data)
        self.run.mkdir()
        for path in run.iterdir():
            if path.suffix == ".pth":
                (self.run / path.name).symlink_to(path)
            elif path.name in ("config.json", "folds.csv", "summary.json"):
                shutil.copy(path, self.run / path.name)
        (self.run / "oof_metrics.json").write_text('{"earlier": "evaluation"}')  # an earlier output to protect
        (self.run / "photo_predictions.csv").write_text("image,earlier\n")

    def photo(self, k: int = 0) -> Path:
        return sorted((self.data / "train").glob("*.jpg"))[k]

    def train_argv(self, *extra) -> list[str]:
        return ["--base-path", str(self.data), "--output-dir", str(self.tmp / "out"), *TRAIN, *extra]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _portrait(path: Path) -> None:
    Image.new("RGB", (112, 224), (40, 120, 30)).save(path, format="JPEG")


def _semicolons(path: Path) -> None:
    path.write_text(path.read_text().replace(",", ";"))


def _huge_total(path: Path) -> None:
    import pandas as pd

    df = pd.read_csv(path)
    df.loc[df.index[df["target_name"] == "Dry_Total_g"][0], "target"] = 1e12
    df.to_csv(path, index=False)


def _deny_writes(mp) -> None:
    def denied(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    mp.setattr(fileio.tempfile, "mkstemp", denied)


def _bad_version(env: Env) -> None:
    target = env.run / "5head_best_fold0.pth"
    ckpt = torch.load(target.resolve(), weights_only=True)
    target.unlink()
    torch.save({**ckpt, "format_version": 99}, target)


# (command, setup(env, monkeypatch) -> argv, exit code, words in the output)
CASES = {
    "train_empty_photo": (train, lambda e, mp: (e.photo(0).write_bytes(b""), e.train_argv())[1], 2,
                          ["cannot read image: empty file (0 bytes)", "1 of 30 training photos"]),
    "train_truncated_photo_full_check": (train, lambda e, mp: (_truncate(e.photo(1)), e.train_argv(
        "--check-photos", "full"))[1], 2, ["cannot read image", "truncated"]),
    "train_portrait_photo": (train, lambda e, mp: (_portrait(e.photo(2)), e.train_argv())[1], 2,
                             ["112x224 is not a 2:1 landscape stereo pair", "--allow-any-aspect"]),
    "train_semicolon_csv": (train, lambda e, mp: (_semicolons(e.data / "train.csv"), e.train_argv())[1], 2,
                            ["train.csv looks separated by semicolons"]),
    "train_no_train_csv": (train, lambda e, mp: ((e.data / "train.csv").unlink(), e.train_argv())[1], 2,
                           ["train.csv not found"]),
    "train_zero_epochs": (train, lambda e, mp: e.train_argv("--epochs", "0"), 2, ["--epochs must be >= 1, got 0"]),
    "train_fold_csv_missing_images": (train, lambda e, mp: ((e.tmp / "f.csv").write_text(
        "sample_id_prefix,fold\nID0,0\n"), e.train_argv("--fold-csv", str(e.tmp / "f.csv")))[1], 2, ["fold file"]),
    "train_into_an_existing_run": (train, lambda e, mp: e.train_argv("--output-dir", str(e.run)), 2,
                                   ["already holds a run"]),
    "train_unwritable_output": (train, lambda e, mp: (_deny_writes(mp), e.train_argv())[1], 2,
                                ["cannot write", "config.json: permission denied"]),
    "train_resume_with_options": (train, lambda e, mp: ["--resume", str(e.run), "--epochs", "3"], 2,
                                  ["--epochs cannot be given with it"]),
    "train_resume_not_a_run": (train, lambda e, mp: ["--resume", str(e.data)], 2, ["no config.json there"]),
    "eval_missing_model_dir": (eval, lambda e, mp: ["--model-dir", str(e.tmp / "nope")], 2, ["is not a folder"]),
    "eval_corrupt_checkpoint": (eval, lambda e, mp: ((e.run / "5head_best_fold0.pth").unlink(), (
        e.run / "5head_best_fold0.pth").write_bytes(b"junk"), ["--model-dir", str(e.run)])[2], 2,
        ["cannot read checkpoint", "5head_best_fold0.pth"]),
    "eval_other_format_version": (eval, lambda e, mp: (_bad_version(e), ["--model-dir", str(e.run)])[1], 2,
                                  ["format version 99"]),
    "eval_grid_contradiction": (eval, lambda e, mp: ["--model-dir", str(e.run), "--grid", "1", "2"], 2,
                                ["--grid 1 2 contradicts"]),
    "eval_batch_size_zero": (eval, lambda e, mp: ["--model-dir", str(e.run), "--batch-size", "0"], 2,
                             ["--batch-size must be >= 1, got 0"]),
    "eval_empty_photo": (eval, lambda e, mp: (e.photo(3).write_bytes(b""), ["--model-dir", str(e.run),
                                                                            "--data-dir", str(e.data)])[1], 2,
                         ["empty file (0 bytes)"]),
    "predict_empty_images_folder": (predict, lambda e, mp: ((e.tmp / "empty").mkdir(), [
        "--model-dir", str(e.run), "--images", str(e.tmp / "empty")])[1], 2, ["holds no photos"]),
    "predict_broken_photo": (predict, lambda e, mp: ((e.tmp / "p").mkdir(), (e.tmp / "p" / "x.jpg").write_text("no"), [
        "--model-dir", str(e.run), "--images", str(e.tmp / "p")])[2], 2, ["x.jpg: cannot read image"]),
    "predict_semicolon_test_csv": (predict, lambda e, mp: (_semicolons(e.data / "test.csv"), [
        "--model-dir", str(e.run), "--data-dir", str(e.data)])[1], 2, ["test.csv looks separated by semicolons"]),
    "predict_unwritable_out": (predict, lambda e, mp: (_deny_writes(mp), ["--model-dir", str(e.run), "--data-dir",
                                                                          str(e.data)])[1], 2,
                               ["cannot write", "submission.csv: permission denied"]),
    "check_empty_photo": (check, lambda e, mp: (e.photo(0).write_bytes(b""), [str(e.data)])[1], 1,
                          ["empty file (0 bytes)"]),
    "check_strict_implausible": (check, lambda e, mp: (_huge_total(e.data / "train.csv"), [str(e.data), "--strict"])[1],
                                 1, ["implausible targets", "Dry_Total_g 1e+12 != Green + Dead + Clover"]),
    "synthetic_existing_data_set": (synthetic, lambda e, mp: ["--out", str(e.data), "--quiet"], 2,
                                    ["already holds a data set"]),
    "weights_missing_onnx": (weights, lambda e, mp: ["import-imgfocus", "--onnx", str(e.tmp / "no.onnx"), "--out",
                                                     str(e.tmp / "w.safetensors")], 2, ["no such file"]),
    "report_not_evaluated": (report, lambda e, mp: ((e.run / "oof_metrics.json").unlink(), [
        "--model-dir", str(e.run)])[1], 2, ["oof_metrics.json is missing"]),
}
ARGPARSE = {
    "train_grid_one_value": (train, ["--grid", "1"]),
    "eval_no_model_dir": (eval, []),
    "synthetic_bad_size": (synthetic, ["--out", "x", "--size", "225x112"]),
}


def _checksums(*folders: Path) -> dict[str, str]:
    return {str(p): file_sha256(p) for f in folders if f.exists() for p in sorted(f.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tiny_data, tiny_run, tmp_path, capsys, monkeypatch):
    command, setup, code, words = CASES[case]
    env = Env(tmp_path, tiny_data, tiny_run)
    argv = setup(env, monkeypatch)
    before = _checksums(env.run, env.data)
    assert command.main(argv) == code
    said = capsys.readouterr()
    text = said.out + said.err
    for word in words:
        assert word in text, f"{word!r} not in:\n{text[-3000:]}"
    assert "Traceback" not in text
    assert _checksums(env.run, env.data) == before  # nothing earlier changed, no file half-written
    assert not (tmp_path / "out").exists()  # training refused before writing anything


@pytest.mark.parametrize("case", sorted(ARGPARSE))
def test_bad_option_syntax_exits_2_with_usage(case, capsys):
    command, argv = ARGPARSE[case]
    with pytest.raises(SystemExit) as exit_:
        command.main(argv)
    assert exit_.value.code == 2 and "usage:" in capsys.readouterr().err


def test_the_matrix_covers_every_entry_point():
    assert {c[0] for c in CASES.values()} == {train, eval, predict, check, synthetic, weights, report}
    json.dumps(sorted(CASES))  # the ids are plain names (the closing note lists them)


@pytest.mark.parametrize("command, argv_of", [
    (eval, lambda e: ["--model-dir", str(e.run)]),
    (predict, lambda e: ["--model-dir", str(e.run), "--data-dir", str(e.data)]),
])
def test_ctrl_c_during_eval_or_predict_exits_130_and_keeps_earlier_outputs(command, argv_of, tiny_data, tiny_run,
                                                                           tmp_path, capsys, monkeypatch):
    import signal

    from biomass5head.infer import fold_model
    from biomass5head.interrupt import Stopped

    def interrupted(*a, **kw):
        raise Stopped(signal.SIGINT)

    env = Env(tmp_path, tiny_data, tiny_run)
    monkeypatch.setattr(fold_model, "predict", interrupted)
    before = _checksums(env.run)
    assert command.main(argv_of(env)) == 130
    said = capsys.readouterr().out
    assert "stopped by SIGINT" in said and "Traceback" not in said
    assert _checksums(env.run) == before and not list(env.run.glob(".*"))
