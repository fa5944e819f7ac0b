"""Files: atomic writing (a temporary file beside the target, then a rename, so no reader ever sees half a file) and
the sha256 of a file."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's files are private (0600)
_WRITE_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system"}
LOW_SPACE_BYTES = 1 << 20  # a write that fails with less free space than this failed for want of space


class WriteError(OSError):
    """A file that could not be written, with the path and the cause in one line (the earlier file, if any, is
    unchanged)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _write_error(path: Path, exc: BaseException, free: int | None) -> WriteError | None:
    """The WriteError for a failed write, or None when the failure is not about the file system."""
    code = getattr(exc, "errno", None)
    if (code not in _WRITE_ERRNOS and isinstance(exc, (OSError, RuntimeError)) and free is not None
            and free < LOW_SPACE_BYTES):
        code = errno.ENOSPC  # e.g. torch.save's "unexpected pos" when the disk filled up mid-write
    if code not in _WRITE_ERRNOS:
        return None
    hint = {errno.ENOSPC: f" ({free if free is not None else 0} bytes free in {path.parent})",
            errno.EACCES: f" (is {path.parent} writable by this user?)"}.get(code, "")
    return WriteError(code, f"cannot write {path}: {_WRITE_ERRNOS[code]}{hint}")


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder; on success rename it onto `path` (with the umask's usual
    mode), on error remove it. Permission, space and read-only failures become one-line WriteErrors naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise (_write_error(path, exc, _free_bytes(path.parent)) or exc) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        with contextlib.suppress(OSError):  # some file systems (vfat, CIFS) refuse chmod: the file is still good
            os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        free = _free_bytes(path.parent) if isinstance(exc, Exception) else None  # before the partial file goes
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        error = _write_error(path, exc, free) if isinstance(exc, Exception) else None
        if error is not None:
            raise error from exc
        raise


def write_json(path, data) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path, df) -> None:
    """Write a DataFrame without its index, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
