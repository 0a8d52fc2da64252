"""Atomic file writes, and the folders the project owns: every file the project writes appears
whole or not at all, and only inside a folder the project created.

    write_atomic(path, text_or_bytes)         one call for a finished document
    with atomic_path(path) as tmp: save(tmp)  for writers that want a path (save_pretrained,
                                              savefig, parquet), file or directory
    own_dir(path)                             a folder to write into: created and marked, or one
                                              marked earlier (or empty); anything else is refused
    foreign_entries(path), remove_ours(path)  what in a folder is not ours, at every depth; delete
                                              a folder or file only when nothing in it is foreign

Writes go to a temporary name beside the target (same folder, so the rename stays on one file
system) and `os.replace` it into place; a crash or SIGKILL before the rename leaves the old
file (or nothing) and a `.NAME.tmp-PID` leftover, never a truncated target.

Ownership: a folder the project creates holds a marker file, `.safegrpo`, listing what the
project put there (names, or glob patterns for a library's files such as TensorBoard's event
files). write_atomic / atomic_path add their target to the listing of a marked folder; a
directory written whole by atomic_path is marked itself with every file in it. An entry of a
marked folder is ours when it is listed (a listed folder must itself be ours, recursively), is
the marker, or is one of our temporaries; everything else is the user's, and the project never
replaces or deletes it, nor a folder holding it. A folder without a marker is never written into
by the entry points that take a user's path (train.out_dir, data.synth_dir, eval's --out and
--cache): they call own_dir first.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import threading
from pathlib import Path

MARKER = ".safegrpo"
_TEMP = re.compile(r"^\..+\.tmp-\d+$")           # temporary_name's pattern
_LISTINGS = threading.RLock()   # a marker is read, changed and replaced whole: one thread at a time


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class NotOursError(FileExistsError):
    """A write or delete would touch something the project did not create; nothing was done."""


# ------------------------------------------------------------------------------- ownership
def is_marked(folder) -> bool:
    return (Path(folder) / MARKER).is_file()


def _listing(folder: Path) -> list[str]:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = data.get("entries", []) if isinstance(data, dict) else []
    return [n for n in names if isinstance(n, str)]


def _write_listing(folder: Path, names) -> None:
    with _LISTINGS:
        tmp = temporary_name(folder / MARKER)
        tmp.write_text(json.dumps({"written_by": "safegrpo", "entries": sorted(set(names))}, indent=0),
                       encoding="utf-8")
        os.replace(tmp, folder / MARKER)


def register(folder, *names: str) -> None:
    """Add names (or glob patterns) to a marked folder's listing (nothing when it is not marked)."""
    folder = Path(folder)
    with _LISTINGS:                  # (the endpoint client's threads write into one cache folder)
        if is_marked(folder):
            have = _listing(folder)
            if not set(names) <= set(have):
                _write_listing(folder, [*have, *names])


def unregister(folder, *names: str) -> None:
    folder = Path(folder)
    with _LISTINGS:
        if is_marked(folder):
            _write_listing(folder, [n for n in _listing(folder) if n not in names])


def mark(folder, names=()) -> None:
    """Mark `folder` (which the project just created) as ours, listing `names`."""
    _write_listing(Path(folder), names)


def _listed(name: str, listing: list[str]) -> bool:
    return any(name == n or fnmatch.fnmatchcase(name, n) for n in listing)


def foreign_entries(path) -> list[Path]:
    """What under `path` the project did not write (empty: all of it is ours; the path itself
    when it is an unmarked folder). A file is judged by its folder's listing."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return []
    if not is_marked(path):
        return [path]
    listing, out = _listing(path), []
    for e in sorted(path.iterdir()):
        if e.name == MARKER or _TEMP.match(e.name):
            continue
        if not _listed(e.name, listing):
            out.append(e)
        elif e.is_dir() and not e.is_symlink() and "*" not in listing:
            out.extend(foreign_entries(e))
    return out


def remove_ours(path) -> None:
    """Delete `path` (a file or folder) and unlist it from its folder; raises NotOursError,
    deleting nothing, when anything under it is not ours."""
    path = Path(path)
    foreign = foreign_entries(path)
    if foreign:
        raise NotOursError(f"{path} holds files safegrpo did not write ({', '.join(map(str, foreign[:5]))}"
                           f"{' ...' if len(foreign) > 5 else ''}); not deleting it")
    _remove(path)
    unregister(path.parent, path.name)


def own_dir(path, adopt=None) -> Path:
    """The folder `path`, ready for the project to write into: created (with its parents) and
    marked when missing, marked when empty, accepted when marked. `adopt(path)`: an earlier
    version's output (no marker) to take over, returning the names it wrote there. Any other
    folder raises NotOursError naming it: nothing a user created is written into."""
    path = Path(path)
    if path.is_dir() and is_marked(path):
        return path
    if path.exists() and not path.is_dir():
        raise NotOursError(f"{path} is a file, not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()):
        names = adopt(path) if adopt else None
        if names is None:
            first = sorted(p.name for p in path.iterdir())[:3]
            raise NotOursError(f"{path} holds files safegrpo did not write ({', '.join(first)}); it writes only into "
                               f"folders it created. Choose another path (if this is safegrpo output from before "
                               f"its folders were marked, move it away)")
        mark(path, names)
    else:
        path.mkdir(parents=True, exist_ok=True)
        mark(path)
    register(path.parent, path.name)
    return path


# ---------------------------------------------------------------------------- atomic writes
def _all_files(folder: Path) -> list[str]:
    return [e.name for e in folder.iterdir() if e.name != MARKER]


def _mark_tree(folder: Path) -> None:
    """Mark a directory the project wrote whole, and every folder in it, listing all they hold."""
    for sub in [p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()]:
        mark(sub, _all_files(sub))
    mark(folder, _all_files(folder))


@contextlib.contextmanager
def atomic_path(path, ours=None):
    """Yields a temporary path to write `path` to (a file, or a directory the caller creates);
    renamed into place, replacing what was there, when the block ends without an exception.
    What is replaced must be ours: an existing directory when nothing in it is foreign
    (`foreign_entries`; or, when given, when `ours(path)` says so: an export or the tiny model,
    whose own marker says what they are), an existing file of a marked folder when that folder lists it. Otherwise
    NotOursError names it, before anything is written. A directory written here is marked with
    all it holds, and the target is listed in its folder's marker."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()):
        if not (ours(path) if ours else is_marked(path) and not foreign_entries(path)):
            raise NotOursError(f"{path} exists and was not written by safegrpo; not replacing it (choose another "
                               "path, or move it away)")
    elif path.is_file() and is_marked(path.parent) and not _listed(path.name, _listing(path.parent)):
        raise NotOursError(f"{path} was not written by safegrpo; not replacing it (move it away)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and not tmp.is_symlink():
            _mark_tree(tmp)
        register(path.parent, path.name)
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


def remove_temporaries(folder) -> None:
    """Delete our `.NAME.tmp-PID` leftovers in a marked folder (its owner's job alone: a reader
    never deletes, since a live writer may be filling one)."""
    folder = Path(folder)
    if is_marked(folder):
        for p in folder.iterdir():
            if _TEMP.match(p.name):
                _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
