"""The CUDA branches of training: fused AdamW, a GradScaler only for float16, pinned memory with non-blocking copies,
and `--compile` (also on the CPU, where a C++ compiler exists). The `gpu` tests run wherever CUDA exists and are
skipped elsewhere, saying why."""
from __future__ import annotations

import shutil

import pytest
import torch

import biomass5head.cli.train
from biomass5head.data.datasets import BiomassDataset, make_loader
from biomass5head.data.images import TileSpec
from biomass5head.data.tables import load_train
from biomass5head.device import make_grad_scaler
from biomass5head.model.backbone import create_backbone
from biomass5head.model.checkpoint import load_checkpoint
from biomass5head.model.five_head import FiveHeadModel
from biomass5head.model.predict import forward_batch
from biomass5head.train.stages import Stage, build_optimizer

ARGS = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--grid", "1", "1", "--batch-size", "4",
        "--epochs", "1", "--train-folds", "0", "--num-workers", "0", "--amp-dtype", "float32"]


def _model(device: str) -> FiveHeadModel:
    torch.manual_seed(0)
    return FiveHeadModel(create_backbone("test_vit", 32, pretrained=False)).to(device)


@pytest.mark.gpu
def test_adamw_is_fused_on_cuda_and_steps():
    model = _model("cuda")
    opt = build_optimizer(model, Stage("full", 1, True, 1e-3, 1e-5), 0.01)
    assert opt.defaults["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    out = model(torch.randn(2, 1, 3, 32, 32, device="cuda"), torch.randn(2, 1, 3, 32, 32, device="cuda"))
    out["reg"].sum().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.gpu
def test_grad_scaler_only_for_float16_on_cuda():
    cuda = torch.device("cuda")
    assert isinstance(make_grad_scaler(cuda, torch.float16), torch.amp.GradScaler)
    assert make_grad_scaler(cuda, torch.bfloat16) is None and make_grad_scaler(cuda, None) is None


@pytest.mark.gpu
def test_pinned_batches_copy_without_blocking_to_the_same_numbers(tiny_data):
    df = load_train(tiny_data).iloc[:4]
    model = _model("cuda").eval()
    loader = make_loader(BiomassDataset(df, TileSpec((1, 1), 32, *model.mean_std)), batch_size=4, shuffle=False,
                         num_workers=1, prefetch_factor=2, seed=0, pin_memory=True)
    batch = next(iter(loader))
    assert batch["left"].is_pinned() and batch["right"].is_pinned()
    with torch.no_grad():
        fast = forward_batch(model, batch, torch.device("cuda"))["reg"]  # .to(device, non_blocking=True)
        slow = model(batch["left"].cuda(), batch["right"].cuda())["reg"]
    torch.testing.assert_close(fast, slow)


def _train_compiled_and_plain(tiny_data, tmp_path, device: str, *frozen: str):
    runs = {}
    for name, extra in (("plain", [*frozen]), ("compiled", [*frozen, "--compile"])):
        out = tmp_path / name
        assert biomass5head.cli.train.main(["--base-path", str(tiny_data), "--output-dir", str(out), *ARGS,
                                            "--device-type", device, *extra]) == 0
        runs[name] = load_checkpoint(out / "5head_best_fold0.pth")
    return runs


def _check_compiled(runs, tol: float) -> None:
    plain, compiled = runs["plain"]["model"], runs["compiled"]["model"]
    assert plain.keys() == compiled.keys()  # no "_orig_mod." prefixes: the checkpoint loads like any other
    assert not any("_orig_mod" in k for k in compiled)
    assert runs["compiled"]["config"]["train"]["compile"] is True
    for k in plain:
        torch.testing.assert_close(compiled[k].float(), plain[k].float(), atol=tol, rtol=tol)


@pytest.mark.gpu
def test_compile_on_cuda_trains_like_the_plain_model(tiny_data, tmp_path):
    _check_compiled(_train_compiled_and_plain(tiny_data, tmp_path, "cuda"), 1e-3)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler; none on PATH")
def test_compile_on_the_cpu_trains_like_the_plain_model(tiny_data, tmp_path, monkeypatch):
    # A cache of its own: kernels that inductor cached under other ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA settings
    # were seen to give NaN here (the cache key does not hold them), and a fresh machine compiles from nothing anyway.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # The frozen backbone on pixels: compiled for inference only, a fraction of the compile time of full training.
    _check_compiled(_train_compiled_and_plain(tiny_data, tmp_path, "cpu", "--freeze-backbone", "--no-feature-cache"),
                    1e-4)
