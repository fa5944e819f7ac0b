"""Atomic writes: a failed write leaves the earlier file as it was and no temporary file, and says in one line which
file could not be written and why (permission, no space, read-only); written files get the umask's usual mode."""
from __future__ import annotations

import errno
import os
import stat
from collections import namedtuple

import pytest
import torch

from biomass5head import fileio
from biomass5head.fileio import WriteError, atomic_path, file_sha256, write_json


def _fail_midway(code):
    def write(tmp):
        tmp.write_text("half of a file")
        raise OSError(code, os.strerror(code))
    return write


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left on the device"),
    (errno.EACCES, "permission denied"),
    (errno.EROFS, "read-only file system"),
])
def test_a_write_that_fails_midway_keeps_the_earlier_file(tmp_path, code, words):
    target = tmp_path / "summary.json"
    write_json(target, {"good": 1})
    before = file_sha256(target)
    with pytest.raises(WriteError, match=f"cannot write {target}: {words}") as err:
        with atomic_path(target) as tmp:
            _fail_midway(code)(tmp)
    assert err.value.errno == code
    assert file_sha256(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_full_disk_under_torch_save_names_the_file_and_the_cause(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError('[enforce fail at inline_container.cc] unexpected pos')."""
    target = tmp_path / "5head_best_fold0.pth"
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda _p: namedtuple("u", "total used free")(10, 10, 0))

    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteError, match=rf"cannot write {target}: no space left on the device \(0 bytes free"):
        with atomic_path(target) as tmp:
            torch.save({}, tmp)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_folder_names_the_target_not_a_temporary_file(tmp_path, monkeypatch):
    def denied(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".x.tmp"))

    monkeypatch.setattr(fileio.tempfile, "mkstemp", denied)
    with pytest.raises(WriteError) as err:
        write_json(tmp_path / "config.json", {})
    assert str(err.value) == (f"cannot write {tmp_path / 'config.json'}: permission denied (is {tmp_path} writable "
                              "by this user?)")


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("x")
            raise KeyError("a bug, not the file system")
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_umasks_mode(tmp_path):
    old = os.umask(0o022)
    try:
        mode = 0o666 & ~0o022
        monkey_mode = fileio._FILE_MODE
        fileio._FILE_MODE = mode
        write_json(tmp_path / "a.json", {})
    finally:
        fileio._FILE_MODE = monkey_mode
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert fileio._FILE_MODE == 0o666 & ~old  # what the process's umask gives, not mkstemp's 0600
