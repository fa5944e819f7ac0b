"""torchrun on the CPU with gloo: a 2-process DDP run against a 1-process run with twice the batch, two torchrun
"nodes" on 127.0.0.1 with the c10d rendezvous, and a failing rank that ends the job. Tiny settings (timm's test_vit
at 32 px); each torchrun process runs one thread."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import biomass5head.cli.eval
import biomass5head.cli.train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
N_VAL = 7  # fold 0: not divisible by 2 ranks, so the sharded validation is uneven
N_FIT = 24  # the other folds: 6 steps of a global batch of 4 in both runs
COMMON = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--grid", "1", "1", "--num-workers", "0",
          "--device-type", "cpu", "--amp-dtype", "float32", "--train-folds", "0"]
# Deterministic: no dropout, no augmentation, no view swap; the same shuffling on 1 and 2 ranks (make_loader).
DETERMINISTIC = ["--dropout", "0", "--aug-prob", "0", "--stereo-swap-prob", "0", "--epochs", "3", "--patience", "9",
                 "--keep-last", "--interval-heads", "3"]  # (the interval loss and accuracies are summed over ranks too)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    """31 photos; fold 0 (scored) holds 7 of them, folds 1-4 the other 24 (trainfold.csv rewritten)."""
    from biomass5head.synthetic.generate import generate

    out = tmp_path_factory.mktemp("ddp") / "data"
    generate(out, n_train=N_VAL + N_FIT, n_test=2, size=(128, 64), seed=3, workers=1)
    folds = pd.read_csv(out / "trainfold.csv")
    folds["fold"] = [0] * N_VAL + [1 + i % 4 for i in range(len(folds) - N_VAL)]
    folds.to_csv(out / "ddp_folds.csv", index=False)
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*launcher: str, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "src.train_5head", *args]
    return subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _data_args(data: Path) -> list[str]:
    return ["--base-path", str(data), "--fold-csv", str(data / "ddp_folds.csv"), "--feature-cache",
            str(data.parent / "cache")]


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def one_rank(ddp_data, tmp_path_factory) -> Path:
    """The single-process run, batch 4."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert biomass5head.cli.train.main([*COMMON, *DETERMINISTIC, *_data_args(ddp_data), "--batch-size", "4",
                                        "--output-dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("per_rank", [["--batch-size", "2"], ["--batch-size", "1", "--grad-accum", "2"]],
                         ids=["batch2", "batch1_accum2"])
def test_two_ranks_with_batch_b_match_one_rank_with_batch_2b(ddp_data, one_rank, per_rank, tmp_path):
    """2 ranks x batch 2 (or x batch 1 x 2 accumulation steps, exchanging gradients only on the update) train
    like 1 process x batch 4: the same losses, the same final weights, the same files."""
    one, two = one_rank, tmp_path / "two"
    start = time.perf_counter()
    proc = torchrun("--standalone", "--nproc-per-node", "2", args=[*COMMON, *DETERMINISTIC, *_data_args(ddp_data),
                                                                  *per_rank, "--output-dir", str(two)])
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"DDP over 2 ranks: global batch {2 * int(per_rank[1])} (--batch-size {per_rank[1]} per rank)" in proc.stdout
    # Exactly the files of a single-process run (rank 0 alone wrote them).
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    log1, log2 = pd.read_csv(one / "log_fold0.csv"), pd.read_csv(two / "log_fold0.csv")
    assert (log1["train_optimizer_steps"] == 6).all() and (log2["train_optimizer_steps"] == 6).all()  # 24 / 4
    loss_diff = np.abs(log1["train_total"] - log2["train_total"]) / log1["train_total"].abs()
    w1, w2 = _weights(one / "5head_last_fold0.pth"), _weights(two / "5head_last_fold0.pth")
    assert w1.keys() == w2.keys()
    weight_diff = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    print(f"DDP 2 ranks {' '.join(per_rank)} vs 1 process --batch-size 4: train loss rel diff per epoch "
          f"{loss_diff.round(8).tolist()}, max weight diff {weight_diff:.2e}; torchrun command {seconds:.1f}s")
    assert loss_diff.max() < 1e-4
    assert weight_diff < 1e-4
    for col in ("train_interval", "train_acc_interval", "val_acc_interval"):
        np.testing.assert_allclose(log2[col], log1[col], rtol=1e-4, atol=1e-6, err_msg=col)

    # Validation: each rank predicted its share of 7 images; the gathered score is the whole fold's, once.
    s1, s2 = (json.loads((d / "summary.json").read_text())["folds"]["0"] for d in (one, two))
    assert s2["n_val"] == N_VAL and abs(s1["best_score"] - s2["best_score"]) < 1e-4
    assert biomass5head.cli.eval.main(["--model-dir", str(two), "--num-workers", "0", "--device", "cpu"]) == 0
    oof = json.loads((two / "oof_metrics.json").read_text())
    assert oof["n_images"] == N_VAL
    best_epoch_row = log2[log2["epoch"] == s2["best_epoch"]].iloc[0]
    assert oof["per_fold"]["0"]["weighted_r2"] == pytest.approx(s2["best_score"], abs=1e-6)
    assert best_epoch_row["val_weighted_r2"] == pytest.approx(s2["best_score"], abs=1e-9)


def test_two_nodes_on_localhost_with_c10d_rendezvous(ddp_data, tmp_path):
    """Two torchrun "machines" (one process each) meet at a c10d rendezvous on 127.0.0.1 and train one frozen-
    backbone run; the feature cache is built by both (a share each) and the run evaluates."""
    run, port = tmp_path / "run", _free_port()
    args = [*COMMON, *_data_args(ddp_data), "--freeze-backbone", "--aug-prob", "0", "--epochs", "2",
            "--batch-size", "4", "--output-dir", str(run)]
    procs = []
    for node in (0, 1):
        launcher = ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "biomass-test", "--rdzv-conf",
                    f"is_host={1 - node}"]
        argv = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "src.train_5head", *args]
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "distributed: rank 0 of 2" in outputs[0] + outputs[1]
    assert "(2 ranks, a share each)" in outputs[0] + outputs[1]
    cached = list((ddp_data.parent / "cache").rglob("*_id.npy"))
    assert len(cached) >= N_VAL + N_FIT
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["folds"]["0"]["n_val"] == N_VAL
    assert biomass5head.cli.eval.main(["--model-dir", str(run), "--num-workers", "0", "--device", "cpu"]) == 0
    assert json.loads((run / "oof_metrics.json").read_text())["n_images"] == N_VAL


def test_a_failing_rank_ends_the_job_with_its_error(ddp_data, tmp_path):
    """A photo that only one rank decodes (its header is fine, its data truncated) fails that rank; torchrun
    stops the other and the job exits non-zero with the rank's message, well before any collective timeout."""
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(ddp_data), str(data)], check=True)
    victim = sorted((data / "train").iterdir())[-1]  # in fold 4: a training photo of fold 0's run
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    start = time.perf_counter()
    proc = torchrun("--standalone", "--nproc-per-node", "2", timeout=180,
                    args=[*COMMON, "--base-path", str(data), "--fold-csv", str(data / "ddp_folds.csv"),
                          "--epochs", "1", "--batch-size", "2", "--output-dir", str(tmp_path / "run")])
    seconds = time.perf_counter() - start
    assert proc.returncode != 0
    assert victim.name in proc.stdout + proc.stderr
    assert seconds < 150


def test_sigterm_under_torchrun_then_resume_under_torchrun(ddp_data, tmp_path):
    """What a scheduler's SIGTERM does to a torchrun job: every rank stops at once, rank 0 leaves the resume state
    and prints how to go on; the same torchrun with --resume completes the run."""
    import signal

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "src.train_5head", *COMMON[:-2], "--train-folds", "0", "1", *_data_args(ddp_data), "--batch-size", "2",
            "--epochs", "30", "--patience", "30", "--save-every", "0", "--output-dir", str(run)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        log = run / "log_fold0.csv"
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert "stopped by SIGTERM at fold 0 epoch" in out
    assert f"resume with: torchrun --standalone --nproc-per-node 2 -m src.train_5head --resume {run}" in out
    assert (run / "5head_last_fold0.pth").is_file() and not list(run.glob(".*"))
    done = torchrun("--standalone", "--nproc-per-node", "2", args=["--resume", str(run)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and sorted(summary["folds"]) == ["0", "1"]
    epochs = pd.read_csv(run / "log_fold0.csv")["epoch"].tolist()
    assert epochs == list(range(len(epochs)))  # each epoch once, in order
