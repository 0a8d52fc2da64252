"""Atomic file writes: every file the project writes appears whole or not at all.

    write_atomic(path, text_or_bytes)         one call for a finished document
    with atomic_path(path) as tmp: save(tmp)  for writers that want a path (save_pretrained,
                                              savefig, parquet), file or directory

Both write to a temporary name beside the target (same folder, so the rename stays on one file
system) and `os.replace` it into place; a crash or SIGKILL before the rename leaves the old
file (or nothing) and a `.tmp-*` leftover, never a truncated target.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class NotOursError(FileExistsError):
    """A write would replace a directory the project did not create; nothing was written."""


@contextlib.contextmanager
def atomic_path(path, ours=None):
    """Yields a temporary path to write `path` to (a file, or a directory the caller creates);
    renamed into place, replacing what was there, when the block ends without an exception.
    An existing non-empty directory is replaced only when `ours(path)` says this project wrote
    it (e.g. it holds the project's marker file); otherwise NotOursError names it, before
    anything is written: nothing a user created is ever deleted."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()) and not (ours and ours(path)):
        raise NotOursError(f"{path} exists and was not written by safegrpo; not replacing it (choose another "
                           "path, or move it away)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return path


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
