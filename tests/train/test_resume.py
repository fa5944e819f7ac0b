"""Stop and resume: a run stopped by SIGTERM / SIGINT at a given epoch and resumed with `--resume RUN` ends exactly
like the same run without the stop (weights, best scores, logs), for single-stage, two-stage (stopped in either
stage) and feature-cache runs; the stop leaves no temporary file and says how to resume."""
from __future__ import annotations

import json
import signal

import pandas as pd
import pytest
import torch

import biomass5head.train.trainer
from biomass5head.cli.train import main
from biomass5head.interrupt import Stopped

BASE = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--grid", "1", "2", "--batch-size", "4",
        "--num-workers", "0", "--device-type", "cpu", "--amp-dtype", "float32", "--epochs", "4",
        "--train-folds", "0", "1", "--aug-prob", "0.5", "--stereo-swap-prob", "0.5", "--save-every", "0"]
MODES = {
    "single_stage": ([], 2),
    "two_stage_in_stage_1": (["--two-stage", "--freeze-epochs", "2", "--aug-prob", "0"], 1),
    "two_stage_in_stage_2": (["--two-stage", "--freeze-epochs", "2"], 3),
    "cached": (["--freeze-backbone", "--aug-prob", "0"], 2),
    # the weight average and the interval heads' bins are part of what a resumed fold must get back
    "cached_ema_interval_heads": (["--freeze-backbone", "--aug-prob", "0", "--ema-decay", "0.9",
                                   "--interval-heads", "3"], 2),
}
# The single-stage case runs by default; the others in .ci/run's slow pass (they take 4-6 s each on 2 cores).
MODE_PARAMS = [pytest.param(m, marks=[] if m == "single_stage" else [pytest.mark.slow]) for m in sorted(MODES)]
TIMING = ["seconds", "samples_per_s"]


def _run(data, out, extra, stop_at=None, signum=signal.SIGTERM) -> int:
    """main() on `data`; with `stop_at`, the signal arrives while fold 0 trains epoch `stop_at`."""
    argv = ["--base-path", str(data), "--output-dir", str(out), "--feature-cache", str(out.parent / "cache"),
            *BASE, *extra]
    if stop_at is None:
        return main(argv)
    original = biomass5head.train.trainer.train_one_epoch

    def stopping(model, loader, *a, epoch=0, **kw):
        if epoch == stop_at and not (out / "5head_best_fold1.pth").exists():
            raise Stopped(signum)  # what the signal handler raises, mid-epoch
        return original(model, loader, *a, epoch=epoch, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(biomass5head.train.trainer, "train_one_epoch", stopping)
        return main(argv)


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_a_stopped_and_resumed_run_ends_like_an_uninterrupted_one(mode, tiny_data, tmp_path, capsys):
    extra, stop_at = MODES[mode]
    assert _run(tiny_data, tmp_path / "a" / "run", extra) == 0
    stopped = tmp_path / "b" / "run"
    assert _run(tiny_data, stopped, extra, stop_at=stop_at) == 128 + signal.SIGTERM
    said = capsys.readouterr().out
    assert f"stopped by SIGTERM at fold 0 epoch {stop_at}; resume with: python -m src.train_5head --resume " \
           f"{stopped}" in said and "Traceback" not in said
    assert (stopped / "5head_last_fold0.pth").is_file() and not (stopped / "summary.json").exists()
    assert not [p.name for p in stopped.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert len(pd.read_csv(stopped / "log_fold0.csv")) == stop_at

    assert main(["--resume", str(stopped)]) == 0
    for fold in (0, 1):
        a = torch.load(tmp_path / "a" / "run" / f"5head_best_fold{fold}.pth", weights_only=True)
        b = torch.load(stopped / f"5head_best_fold{fold}.pth", weights_only=True)
        assert (a["epoch"], a["best_score"]) == (b["epoch"], pytest.approx(b["best_score"], abs=1e-9))
        assert a["interval_bins"] == b["interval_bins"]  # (None without --interval-heads)
        for name, tensor in a["model"].items():
            torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6)
        log_a = pd.read_csv(tmp_path / "a" / "run" / f"log_fold{fold}.csv").drop(columns=TIMING)
        log_b = pd.read_csv(stopped / f"log_fold{fold}.csv").drop(columns=TIMING)
        pd.testing.assert_frame_equal(log_a, log_b, rtol=1e-6, atol=1e-9)  # each epoch exactly once
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["complete"] and sorted(summary["folds"]) == ["0", "1"]
    assert not list(stopped.glob("5head_last_fold*.pth"))  # removed when each fold ended


@pytest.mark.slow  # 3-6 s (processes or an extra run): in .ci/run's slow pass; README command 2 under 6 min
def test_ctrl_c_exits_130_and_resume_refuses_other_options(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(tiny_data, run, [], stop_at=1, signum=signal.SIGINT) == 130
    assert "stopped by SIGINT at fold 0 epoch 1" in capsys.readouterr().out
    assert main(["--resume", str(run), "--epochs", "9", "--lr", "0.1"]) == 2
    assert "--epochs, --lr cannot be given with it" in capsys.readouterr().out
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "no config.json there" in capsys.readouterr().out
    assert main(["--resume", str(run), "--num-workers", "0", "--keep-last"]) == 0
    assert (run / "5head_last_fold0.pth").is_file() and (run / "5head_last_fold1.pth").is_file()


@pytest.mark.slow
def test_sigterm_to_a_real_run_then_resume_gives_a_complete_run_folder(tiny_data, tmp_path):
    """What `timeout -s TERM` does to `python -m src.train_5head`, then `--resume`."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "src.train_5head", "--base-path", str(tiny_data), "--output-dir", str(run),
            *BASE[:14], "--epochs", "40", "--train-folds", "0", "1", "--save-every", "0"]
    proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        log = run / "log_fold0.csv"
        if log.is_file() and len(log.read_text().splitlines()) >= 3:  # two epochs of fold 0 done
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM at fold 0 epoch" in out and f"--resume {run}" in out and "Traceback" not in out + err
    assert (run / "5head_last_fold0.pth").is_file() and not list(run.glob(".*"))
    done = subprocess.run([sys.executable, "-m", "src.train_5head", "--resume", str(run)], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and sorted(summary["folds"]) == ["0", "1"]
    assert {p.name for p in run.glob("5head_best_fold*.pth")} == {"5head_best_fold0.pth", "5head_best_fold1.pth"}
    assert (run / "learning_curves.png").is_file() and not list(run.glob("5head_last_fold*.pth"))
    epochs = pd.read_csv(run / "log_fold0.csv")["epoch"].tolist()
    assert epochs == list(range(len(epochs)))  # each epoch once, in order


@pytest.mark.slow  # two runs of two passes each (4-6 s)
def test_a_run_stopped_in_its_refit_pass_resumes_there(tiny_data, tmp_path, capsys):
    """--refit: the selection pass's final state is kept, so a stop in the refit pass resumes the refit (from its own
    state file) without training the selection pass again, and ends like the uninterrupted run."""
    extra = ["--freeze-backbone", "--aug-prob", "0", "--select-on", "inner", "--refit", "--train-folds", "0"]
    whole = tmp_path / "a" / "run"
    assert _run(tiny_data, whole, extra) == 0
    refit_epochs = json.loads((whole / "summary.json").read_text())["folds"]["0"]["refit_epochs"]
    assert len(pd.read_csv(whole / "log_fold0.csv")) == 4 and 1 <= refit_epochs <= 4
    stop_call = 4 + refit_epochs - 1  # the refit pass's last epoch (its first when it has one only)
    calls = []
    original = biomass5head.train.trainer.train_one_epoch

    def stopping(*a, **kw):
        calls.append(kw.get("epoch"))
        if len(calls) == stop_call + 1:
            raise Stopped(signal.SIGTERM)
        return original(*a, **kw)

    stopped = tmp_path / "b" / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(biomass5head.train.trainer, "train_one_epoch", stopping)
        assert _run(tiny_data, stopped, extra) == 128 + signal.SIGTERM
    assert (stopped / "5head_last_fold0.pth").is_file()  # the selection pass's final state
    assert (stopped / "5head_last_fold0_refit.pth").is_file() == (refit_epochs > 1)
    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(biomass5head.train.trainer, "train_one_epoch", stopping)
        assert main(["--resume", str(stopped)]) == 0
    assert calls == [refit_epochs - 1] if refit_epochs > 1 else calls == [0]  # only what the stop cut off
    a = torch.load(whole / "5head_best_fold0.pth", weights_only=True)
    b = torch.load(stopped / "5head_best_fold0.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == refit_epochs - 1
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6)
    for log in ("log_fold0.csv", "log_fold0_refit.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(whole / log).drop(columns=TIMING),
                                      pd.read_csv(stopped / log).drop(columns=TIMING), rtol=1e-6, atol=1e-9)
    assert not list(stopped.glob("5head_last_fold*.pth"))
