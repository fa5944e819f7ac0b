"""Device, CPU threads and precision, chosen once per run from the hardware: the device, one autocast context and
an optional GradScaler.

On a CPU the numeric path follows the chip. bfloat16 autocast pays only where the CPU multiplies bfloat16 natively
(AMX-BF16 or AVX512-BF16 on x86, the BF16 extension on Arm); elsewhere torch emulates it and a ViT runs 6-12x
slower than in float32. So `--amp-dtype float16` (the default) means bfloat16 on a CPU with native support and
float32 on any other, and an explicit `--amp-dtype bfloat16` on a CPU without it still runs, with a warning.
CUDA keeps the reference's meaning (float16 with a GradScaler, or bfloat16 where the GPU has it).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from biomass5head.distributed import Dist

logger = logging.getLogger(__name__)

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bfloat16 dot products.
_ONEDNN_BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                     "ALL", "DEFAULT"}


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU offers torch: usable cores, torch's kernel capability and native bfloat16 (with the reason)."""
    cores: int
    capability: str
    native_bf16: bool
    bf16_reason: str

    def describe(self) -> str:
        bf16 = "native bfloat16" if self.native_bf16 else "no native bfloat16"
        return f"{self.cores} usable cores, torch CPU capability {self.capability}, {bf16} ({self.bf16_reason})"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers) where set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" (no quota) or "200000 100000" (2 CPUs)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _x86_bf16_features() -> list[str]:
    flags = _cpu_flags()
    if flags:
        return [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    # No /proc/cpuinfo (macOS, Windows): torch's own cpuinfo-based probes.
    found = []
    for probe, name in (("_is_amx_tile_supported", "AMX-BF16"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        fn = getattr(torch.cpu, probe, None)
        with contextlib.suppress(Exception):
            if fn is not None and fn():
                found.append(name)
    return found


def _native_bf16(capability: str) -> tuple[bool, str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        features = _x86_bf16_features()
        if not features:
            return False, "the CPU has neither AMX-BF16 nor AVX512-BF16"
        if not capability.startswith("AVX512"):
            return False, (f"the CPU has {'/'.join(features)} but torch runs its {capability} kernels "
                           "(ATEN_CPU_CAPABILITY caps it)")
        isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
        if isa not in _ONEDNN_BF16_ISAS:
            return False, f"the CPU has {'/'.join(features)} but ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN from it"
        return True, "/".join(features)
    if machine in ("aarch64", "arm64"):
        if "bf16" in _cpu_flags():
            return True, "Arm BF16 extension"
        return False, "the CPU lacks the Arm BF16 extension"
    return False, f"no native bfloat16 known for {machine or 'this CPU'}"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The CPU as torch will use it (cached: the hardware does not change within a process)."""
    capability = str(torch.backends.cpu.get_cpu_capability())
    native, reason = _native_bf16(capability)
    return CpuInfo(usable_cores(), capability, native, reason)


def configure_cpu_threads(processes: int = 1) -> int:
    """Intra-op threads = the cores this process may use (torch's default counts the machine's cores, which can
    be more than a container or an affinity mask allows), shared by `processes` on the machine (torchrun's local
    processes: more threads than cores in all makes every process many times slower). An explicit OMP_NUM_THREADS
    wins. Returns the count."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = max(1, cpu_info().cores // max(1, processes))
    if torch.get_num_threads() != cores:
        torch.set_num_threads(cores)
    return cores


REFERENCE_WORKERS = 4  # the reference's --num-workers default, kept on GPUs


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader worker processes for `--num-workers requested` (None: left out, chosen for the device).

    On a GPU the reference's 4. On a CPU the workers and the model share the same cores, and a photo decodes in
    milliseconds while the model spends hundreds on it: one worker overlaps decoding with the model (on 2 cores,
    frozen ViT-S/14 at 112 px on pixels: 1 worker 46.8 s per epoch, 0 workers 49.4-50.4 s, 2 workers 51.1 s), more
    take cores away from it. So one worker per four usable cores, at least one where there are two cores or more.
    A number given is kept."""
    if requested is not None:
        return requested
    if device.type != "cpu":
        return REFERENCE_WORKERS
    cores = cpu_info().cores
    return 0 if cores < 2 else max(1, cores // 4)


def resolve_device(device_type: str | None, local_rank: int | None = None) -> torch.device:
    """The requested device, or cuda, then mps, then cpu when none is named; an absent device is an error. Under
    torchrun (`local_rank` given) a CUDA device is the GPU of the process's local rank."""
    device = _resolve_device(device_type)
    if device.type == "cuda" and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} needs GPU {local_rank}, but this machine has "
                             f"{torch.cuda.device_count()}: lower --nproc-per-node")
        return torch.device("cuda", local_rank)
    return device


def _resolve_device(device_type: str | None) -> torch.device:
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device_type is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device-type cuda: no CUDA device is available here "
                         "(use --device-type cpu, or leave it out)")
    if device_type == "mps" and not mps_ok:
        raise ValueError("--device-type mps: Apple MPS is not available here (use --device-type cpu, or leave it out)")
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device-type must be cuda, mps or cpu, got {device_type!r}")
    return torch.device(device_type)


@dataclass(frozen=True)
class Precision:
    """The autocast dtype a run computes in (None: plain float32) for the `--amp-dtype` it asked for, and why."""
    requested: str
    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        """"float32", "bfloat16" or "float16": what config.json and the feature cache record."""
        return str(self.dtype).replace("torch.", "") if self.dtype is not None else "float32"


def resolve_precision(amp_dtype: str, device: torch.device, cpu: CpuInfo | None = None) -> Precision:
    """The precision `--amp-dtype amp_dtype` means on `device` (see the module docstring); logs the choice."""
    if amp_dtype == "float32":
        p = Precision(amp_dtype, None, "float32 asked for: autocast off")
    elif device.type == "cpu":
        p = _cpu_precision(amp_dtype, cpu or cpu_info())
    elif device.type == "cuda" and amp_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        logger.warning("--amp-dtype bfloat16: this GPU lacks bfloat16 (needs Ampere or newer): using float16 "
                       "with a GradScaler instead")
        p = Precision(amp_dtype, torch.float16, "the GPU lacks bfloat16")
    else:
        dtype = torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16
        p = Precision(amp_dtype, dtype, f"--amp-dtype {amp_dtype} on {device.type}")
    logger.info("precision: %s (%s)", p.name if p.dtype is None else f"{p.name} autocast", p.reason)
    return p


def _cpu_precision(amp_dtype: str, cpu: CpuInfo) -> Precision:
    if cpu.native_bf16:
        why = "float16 matmuls are slow on CPUs; " if amp_dtype == "float16" else ""
        return Precision(amp_dtype, torch.bfloat16, f"{why}this CPU has native bfloat16: {cpu.bf16_reason}")
    if amp_dtype == "bfloat16":
        logger.warning("--amp-dtype bfloat16 on a CPU without native bfloat16 (%s, capability %s): torch emulates "
                       "it, several times slower than float32 here; leave --amp-dtype out (or pass float32) for "
                       "the fast path", cpu.bf16_reason, cpu.capability)
        return Precision(amp_dtype, torch.bfloat16, f"asked for explicitly; emulated: {cpu.bf16_reason}")
    return Precision(amp_dtype, None, f"no native bfloat16 on this CPU ({cpu.bf16_reason}; capability "
                                      f"{cpu.capability}): float32 is 6-12x faster here than emulated bfloat16")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """One autocast context for the run, or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler only for float16 on CUDA, where gradients can underflow."""
    if dtype == torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes: device, precision and DataLoader workers, resolved once from the hardware."""
    device: torch.device
    precision: Precision
    num_workers: int
    dist: Dist = Dist()  # this process's rank under torchrun (a single process: rank 0 of 1)

    def autocast(self):
        """A fresh autocast context for the run's precision (a no-op for float32)."""
        return autocast_context(self.device, self.precision.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A new GradScaler where the precision needs one (float16 on CUDA), else None."""
        return make_grad_scaler(self.device, self.precision.dtype)

    @property
    def dtype_name(self) -> str:
        """"float32", "bfloat16" or "float16": the compute dtype, as the feature cache keys it."""
        return self.precision.name

    def record(self) -> dict:
        """What config.json keeps of it: the dtype asked for and the one actually used, and why."""
        out = {"device": str(self.device), "amp_dtype_requested": self.precision.requested,
               "amp_dtype_used": self.precision.name, "amp_reason": self.precision.reason,
               "num_workers_used": self.num_workers, "torch": str(torch.__version__),
               "world_size": self.dist.world_size}
        if self.device.type == "cpu":
            cpu = cpu_info()
            out.update(cpu_capability=cpu.capability, cpu_native_bf16=cpu.native_bf16, cpu_cores=cpu.cores,
                       intra_op_threads=torch.get_num_threads())
        return out


def resolve_runtime(device_type: str | None, amp_dtype: str, num_workers: int | None, dist: Dist | None = None
                    ) -> Runtime:
    """Device, threads, precision and workers for a run (one rank's, under torchrun); logs the CPU it found."""
    dist = dist or Dist()
    device = resolve_device(device_type, dist.local_rank if dist.enabled else None)
    if device.type == "cpu":
        threads = configure_cpu_threads(dist.local_world_size)
        logger.info("CPU: %s; %d intra-op threads", cpu_info().describe(), threads)
    return Runtime(device, resolve_precision(amp_dtype, device), loader_workers(num_workers, device), dist)
