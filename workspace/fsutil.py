"""Folders that are replaced whole: a new result is built beside the old one (`staging()`), then swapped in, so a
reader (or a run killed midway) finds either the complete old folder or the complete new one, never a mix and
never nothing. Used by the prepare stage and the evaluation cache (`--force` rebuilds), like the base-model build.

On Linux the swap is one `renameat2(RENAME_EXCHANGE)` system call (atomic); where that call is missing it falls
back to two renames, and `recover()` puts an old folder back if a run died between them.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path
from typing import Iterator

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two existing paths; False when the system cannot."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _old_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.old-{os.getpid()}")


def recover(final: Path) -> None:
    """Before building `final` again: put back an old folder a killed swap left aside (only when `final` is gone),
    and remove the staging and old folders of runs that are no longer alive."""
    parent = final.parent
    if not parent.exists():
        return
    for p in sorted(parent.glob(f".{final.name}.*-*")):
        kind, _, pid = p.name.rpartition("-")
        if not pid.isdigit() or _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if kind.endswith(".old") and not final.exists():
            p.rename(final)  # the swap died between its two renames: the old result is still complete
        else:
            shutil.rmtree(p, ignore_errors=True)


def swap_in(new: Path, final: Path) -> None:
    """Make the complete folder `new` become `final`, replacing an existing `final`; the old one is removed after."""
    if not final.exists():
        new.rename(final)
        return
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old result
        return
    old = _old_path(final)
    final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """`with staging(final) as tmp:` write the new result into tmp; on success it is swapped in as `final`, on any
    error (or Ctrl-C) tmp is removed and `final` is untouched."""
    recover(final)
    tmp = staging_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
