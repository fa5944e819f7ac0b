"""The numeric path follows the hardware: native-bfloat16 detection, --amp-dtype per device, threads, workers."""
from __future__ import annotations

import logging

import pytest
import torch

import biomass5head.device as device
from biomass5head.device import CpuInfo, Runtime, loader_workers, resolve_precision

CPU = torch.device("cpu")
AMX = CpuInfo(cores=2, capability="AVX512", native_bf16=True, bf16_reason="AMX-BF16/AVX512-BF16")
AVX2 = CpuInfo(cores=2, capability="AVX2", native_bf16=False,
               bf16_reason="the CPU has neither AMX-BF16 nor AVX512-BF16")


@pytest.fixture
def x86(monkeypatch):
    """A Linux x86 machine whose /proc/cpuinfo flags the test sets; no oneDNN cap in the environment."""
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    def set_flags(*flags):
        monkeypatch.setattr(device, "_cpu_flags", lambda: {"sse4_2", "avx", "avx2", "fma", *flags})

    return set_flags


@pytest.mark.parametrize("flags, capability, native, reason", [
    (("avx512f", "avx512_bf16", "amx_bf16", "amx_tile"), "AVX512", True, "AMX-BF16/AVX512-BF16"),
    (("avx512f", "avx512_bf16"), "AVX512", True, "AVX512-BF16"),
    (("avx512f",), "AVX512", False, "the CPU has neither AMX-BF16 nor AVX512-BF16"),  # Skylake-X: emulated
    ((), "AVX2", False, "the CPU has neither AMX-BF16 nor AVX512-BF16"),  # e.g. AMD EPYC Zen 2/3
    # The silicon has it but torch was told to run AVX2 kernels (ATEN_CPU_CAPABILITY=avx2): not native.
    (("avx512f", "avx512_bf16", "amx_bf16"), "AVX2", False,
     "the CPU has AMX-BF16/AVX512-BF16 but torch runs its AVX2 kernels (ATEN_CPU_CAPABILITY caps it)"),
])
def test_native_bfloat16_on_x86(x86, flags, capability, native, reason):
    x86(*flags)
    assert device._native_bf16(capability) == (native, reason)


def test_a_onednn_isa_cap_below_bfloat16_is_not_native(x86, monkeypatch):
    x86("avx512f", "avx512_bf16", "amx_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert device._native_bf16("AVX512") == (
        False, "the CPU has AMX-BF16/AVX512-BF16 but ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN from it")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert device._native_bf16("AVX512") == (True, "AMX-BF16/AVX512-BF16")


@pytest.mark.parametrize("features, native", [({"fp", "asimd", "bf16", "sve"}, True), ({"fp", "asimd"}, False)])
def test_native_bfloat16_on_arm(monkeypatch, features, native):
    monkeypatch.setattr(device.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(device, "_cpu_flags", lambda: features)
    assert device._native_bf16("DEFAULT")[0] is native


def test_cpu_info_reports_this_machine_consistently():
    info = device.cpu_info()
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert 1 <= info.cores <= (torch.multiprocessing.cpu_count() or 1)
    if not info.capability.startswith("AVX512") and device.platform.machine() == "x86_64":
        assert not info.native_bf16


# --------------------------------------------------------------------------------------------------------------
# --amp-dtype resolution
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp, cpu, expected, warns", [
    ("float16", AMX, torch.bfloat16, False),  # the reference's default: bfloat16 where the CPU has it ...
    ("float16", AVX2, None, False),  # ... float32 where it would be emulated
    ("bfloat16", AMX, torch.bfloat16, False),
    ("bfloat16", AVX2, torch.bfloat16, True),  # asked for explicitly: runs, with a warning
    ("float32", AMX, None, False),
    ("float32", AVX2, None, False),
])
def test_cpu_precision(caplog, amp, cpu, expected, warns):
    with caplog.at_level(logging.INFO, logger="biomass5head.device"):
        p = resolve_precision(amp, CPU, cpu)
    assert p.dtype == expected and p.requested == amp
    assert p.name == (str(expected).replace("torch.", "") if expected else "float32")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == warns
    if warns:
        assert "several times slower than float32" in warnings[0] and "capability AVX2" in warnings[0]
    assert any(r.getMessage().startswith(f"precision: {p.name}") for r in caplog.records)


@pytest.mark.parametrize("amp, bf16_ok, expected", [
    ("float16", True, torch.float16), ("bfloat16", True, torch.bfloat16), ("bfloat16", False, torch.float16),
    ("float32", True, None),
])
def test_cuda_keeps_the_reference_semantics(monkeypatch, amp, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    cuda = torch.device("cuda")
    p = resolve_precision(amp, cuda, AVX2)  # the CPU is irrelevant on a GPU
    assert p.dtype == expected
    scaler_expected = expected == torch.float16
    if torch.cuda.is_available():
        assert (device.make_grad_scaler(cuda, p.dtype) is not None) == scaler_expected


def test_bfloat16_autocast_on_tiny_tensors_matches_float32():
    """The bfloat16 code path itself, on tensors small enough that emulation costs nothing."""
    from biomass5head.model.backbone import create_backbone
    from biomass5head.model.five_head import FiveHeadModel

    torch.manual_seed(0)
    model = FiveHeadModel(create_backbone("test_vit", 32, pretrained=False)).eval()
    left, right = torch.randn(2, 1, 3, 32, 32), torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        ref = model(left, right)["reg"]
        with device.autocast_context(CPU, resolve_precision("bfloat16", CPU, AMX).dtype):
            low = model(left, right)["reg"]
    assert low.dtype == torch.float32 or low.dtype == torch.bfloat16
    assert torch.isfinite(low.float()).all()
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.05)


# --------------------------------------------------------------------------------------------------------------
# Threads and workers
# --------------------------------------------------------------------------------------------------------------
def test_usable_cores_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(device.Path, "read_text", lambda self: "max 100000")
    assert device.usable_cores() == 3


def test_usable_cores_follow_a_cgroup_quota(monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(device.Path, "read_text", lambda self: "150000 100000\n")  # 1.5 CPUs -> 2 threads
    assert device.usable_cores() == 2


def test_threads_match_the_usable_cores_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(device, "cpu_info", lambda: CpuInfo(1, "AVX2", False, "none"))
        assert device.configure_cpu_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert device.configure_cpu_threads() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("requested, kind, cores, expected", [
    (None, "cuda", 2, 4),  # the reference's default on a GPU
    (None, "cpu", 2, 1),  # a 2-core CPU: one worker overlaps decoding, more take cores from the model
    (None, "cpu", 1, 0),
    (None, "cpu", 16, 4),
    (2, "cpu", 2, 2),  # a number given is kept
    (0, "cuda", 8, 0),
])
def test_loader_workers(monkeypatch, requested, kind, cores, expected):
    monkeypatch.setattr(device, "cpu_info", lambda: CpuInfo(cores, "AVX2", False, "none"))
    assert loader_workers(requested, torch.device(kind)) == expected


def test_runtime_record_names_requested_and_used_dtype(monkeypatch):
    monkeypatch.setattr(device, "cpu_info", lambda: AVX2)
    rt = Runtime(CPU, resolve_precision("float16", CPU, AVX2), 0)
    rec = rt.record()
    assert (rec["amp_dtype_requested"], rec["amp_dtype_used"], rec["cpu_native_bf16"]) == ("float16", "float32", False)
    assert rec["cpu_capability"] == "AVX2" and rec["num_workers_used"] == 0
    assert isinstance(rec["torch"], str)  # plain types only: checkpoints load with weights_only=True
