"""Writes that never leave a half-written file or folder behind: everything comet_ext saves
(models, memories, checkpoints, sweep results) goes through here.

A temporary file or folder next to the target is written, given the permissions a plain
`open` / `os.makedirs` would have given it (mkstemp / mkdtemp create them private, 0600 /
0700, which would make a shared model folder unreadable to everyone else), flushed to disk
(fsync: else after a power loss the rename may be on disk before the data, an empty file in
place of the old one) and renamed into place: a reader sees the old version or the new one,
never a mix.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Collection, Optional


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    """Flushes a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary file beside `path`, which then replaces `path`."""
    atomic_write_all([(path, write)])


def atomic_write_all(writes: list[tuple[str | os.PathLike, Callable[[str], None]]]) -> None:
    """Each write(tmp) of `writes` ((path, write) pairs) fills a temporary file beside its path;
    once every one is written and on disk, they replace their paths in order. A write that fails
    (a full disk, Ctrl-C) leaves every path as it was; only a crash between the renames, a few
    system calls, can leave some replaced and some not (formats that pair their files, like
    checkpoint's save id, refuse that mix)."""
    done: list[tuple[str, str]] = []  # (tmp, path)
    try:
        for path, write in writes:
            path = os.fspath(path)
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                       dir=os.path.dirname(os.path.abspath(path)))
            os.close(fd)
            done.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
    except BaseException:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for tmp, path in done:
        os.replace(tmp, path)
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(path)) for _, path in done):
        _fsync(folder)  # the renames


def atomic_folder(folder: str | os.PathLike, fill: Callable[[str], None],
                  replaces: Collection[str] = ()) -> None:
    """fill(tmp) fills a temporary folder beside `folder`, which then takes its place.

    An existing `folder` is replaced whole, so it may hold only the entries named in `replaces`
    (what an earlier save put there): anything else is refused with a ValueError before `fill`
    runs, as is a file. A symlink is followed: the folder it points to is replaced, the link
    stays. Where the system can (Linux's renameat2 RENAME_EXCHANGE) the new and the old folder
    trade places in one step, so a crash at any moment leaves one of them under the name;
    elsewhere the old one is moved aside first (a crash between the two renames leaves it
    beside the name, as `.NAME.*.old`). The old one is deleted once the new one is in place.
    """
    folder = os.path.realpath(os.fspath(folder))
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise ValueError(f"{folder!r} is a file, not a folder")
        other = sorted(set(os.listdir(folder)) - set(replaces))
        if other:
            raise ValueError(f"{folder!r} holds {', '.join(other[:5])}{', ...' if len(other) > 5 else ''}, "
                             f"which saving there would delete (a save replaces the whole folder); save into "
                             f"a new or empty folder" + (" or an earlier save's" if replaces else ""))
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp: Optional[str] = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".", suffix=".tmp", dir=parent)
    old = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        for where, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(where, name))
            _fsync(where)
        if os.path.isdir(folder) and _exchange(tmp, folder):
            old, tmp = tmp, None  # the old folder now sits where the new one was written
        else:
            if os.path.isdir(folder):
                old = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".", suffix=".old", dir=parent)
                os.replace(folder, old)  # (an empty directory as the target is replaced)
            os.replace(tmp, folder)
            tmp = None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if not os.path.exists(folder):
                os.replace(old, folder)  # put the old version back
            else:
                os.rmdir(old)  # still the empty placeholder: the old folder never moved
        raise
    _fsync(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swaps two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where
    the C library, the kernel or the file system does not have it."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
