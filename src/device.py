"""Device and precision, chosen once per run: the device, one autocast context and an optional GradScaler."""
from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


def resolve_device(device_type: str | None) -> torch.device:
    """The requested device, or cuda, then mps, then cpu when none is named; an absent device is an error."""
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


def resolve_amp_dtype(amp_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype actually used on `device` (None: no autocast), with a warning where it differs."""
    if amp_dtype == "float32":
        return None
    if device.type == "cpu":
        if amp_dtype == "float16":
            logger.warning("--amp-dtype float16 on a CPU: autocast uses bfloat16 instead (float16 matmuls are slow "
                           "or missing on CPUs)")
        return torch.bfloat16
    if device.type == "cuda" and amp_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        logger.warning("--amp-dtype bfloat16: this GPU lacks bfloat16 (needs Ampere or newer): using float16 "
                       "with a GradScaler instead")
        return torch.float16
    return torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16


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
